"""The ``qcompile`` command: a thin layer over the Python API.

Verbs: targets, compile, measure, tune, report. Heavy imports (TVM, onnx)
happen inside the verbs, so ``qcompile --help`` and ``qcompile targets`` stay
fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, threads
from .errors import QCompileError

EPILOG = """examples:
  qcompile targets
  qcompile compile examples/fashion_mnist_cnn.onnx --target host -o out/cnn-int8 \\
      --calib examples/fashion_mnist_calib.npz
  qcompile measure examples/fashion_mnist_cnn.onnx --target host \\
      --data examples/fashion_mnist_test.npz --calib examples/fashion_mnist_calib.npz --out out/report
  qcompile measure out/cnn-int8 --rpc 127.0.0.1:9090 --out out/board-report
  qcompile report out/report

`--target` takes a bundled target name (see `qcompile targets`), `host` (the best
target this machine runs), or a path to a target .toml file.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", "-t", default="host",
                        help="bundled target name, 'host', or path/to/board.toml (default: host)")
    parser.add_argument("--input-shape", action="append", metavar="NAME:DxD...",
                        help="static shape for an input with dynamic dims, e.g. "
                             "input:1x3x224x224 (repeatable)")


def _add_quant_options(parser: argparse.ArgumentParser, default_quantize: str) -> None:
    parser.add_argument("--quantize", choices=["int8", "none"] +
                        (["both"] if default_quantize == "both" else []),
                        default=default_quantize,
                        help=f"int8: quantize conv/matmul to int8 kernels; none: float "
                             f"(default: {default_quantize})")
    parser.add_argument("--calib", metavar="DATA",
                        help="calibration data for int8: .npz with one array per input "
                             "(samples on axis 0), or a directory of images")
    try:
        from .quantize import cli_options
    except ImportError:
        return
    cli_options.add_arguments(parser)


def _quant_config(args, spec):
    if getattr(args, "quantize", "none") == "none":
        return None
    try:
        from .quantize import cli_options
    except ImportError:
        return None
    return cli_options.config_from_args(args, spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a float ONNX model into a fast int8 module for a hardware "
                    "target with Apache TVM, and measure latency and accuracy against float.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    verbs.add_parser("targets", help="list the bundled targets")

    comp = verbs.add_parser("compile", help="compile an ONNX model into an artifact "
                            "directory (lib.so + manifest.json)")
    comp.add_argument("model", help="path to a .onnx file")
    _add_model_options(comp)
    comp.add_argument("-o", "--output", required=True, metavar="DIR",
                      help="artifact directory to write (replaced atomically)")
    _add_quant_options(comp, "int8")
    comp.add_argument("--tuning-log", metavar="DIR", type=_tuning_log_arg,
                      help="MetaSchedule database from `qcompile tune` to apply; default: "
                           "the shipped tuning_logs/ where kernels match; 'none': default "
                           "schedules only")

    meas = verbs.add_parser("measure", help="run float and int8 on a device; report latency "
                            "and agreement/accuracy vs float")
    meas.add_argument("model", help="a .onnx file (compiled here) or an artifact directory")
    _add_model_options(meas)
    meas.add_argument("--data", metavar="NPZ", help=".npz evaluation data: one array per "
                      "input (samples on axis 0), optional 'labels'")
    meas.add_argument("--limit", type=_positive_int, help="evaluate at most N samples")
    meas.add_argument("--out", default="qcompile-report", metavar="DIR",
                      help="report directory (default: ./qcompile-report)")
    meas.add_argument("--rpc", metavar="HOST:PORT", help="measure on a TVM RPC server")
    meas.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM RPC tracker to get a "
                      "board from (with --rpc-key)")
    meas.add_argument("--rpc-key", metavar="KEY", help="board key at the tracker (default: "
                      "the target's rpc_key)")
    meas.add_argument("--repeat", type=_positive_int, default=50,
                      help="timed repeats (default 50)")
    meas.add_argument("--threads", type=_positive_int,
                      help="runtime threads (default: the physical cores this process may "
                           "use, or TVM_NUM_THREADS when set; over RPC the board's server "
                           "pool can only be shrunk)")
    meas.add_argument("--emulated", action="store_true",
                      help="label timings as emulated (board under qemu)")
    _add_quant_options(meas, "both")
    meas.add_argument("--tuning-log", metavar="DIR", type=_tuning_log_arg,
                      help="tuning database to apply (as for compile; 'none': no tuning log)")

    tune = verbs.add_parser("tune", help="autotune the model's kernels with MetaSchedule "
                            "(XGBoost cost model) into a reusable tuning log")
    tune.add_argument("model", help="path to a .onnx file")
    _add_model_options(tune)
    _add_quant_options(tune, "int8")
    tune.add_argument("--threads", type=_positive_int,
                      help="threads each measured trial runs with (default: the physical "
                           "cores this process may use, or TVM_NUM_THREADS when set); "
                           "tune with the count you will deploy with")
    try:
        from . import tune_cli
    except ImportError:
        tune_cli = None
    if tune_cli is not None:
        tune_cli.add_arguments(tune)

    rep = verbs.add_parser("report", help="re-render report.md and plots from report.json")
    rep.add_argument("directory", help="a report directory written by `qcompile measure`")
    return parser


def cmd_targets(_args) -> int:
    from .target import host_cpu_features, host_target_name, list_targets

    specs = list_targets()
    rows = [("name", "arch", "int8 intrinsic", "runs here", "description")]
    for spec in specs:
        rows.append((spec.name, spec.arch, spec.int8_intrinsic,
                     "yes" if spec.runs_here() else "no", spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    if not host_cpu_features():
        print("\n(could not read /proc/cpuinfo: 'runs here' may be wrong)")
    try:
        print(f"\n--target host = {host_target_name()} on this machine")
    except QCompileError as exc:
        print(f"\n--target host: {exc}")
    return 0


def _calibration(args, imported):
    if args.quantize in ("none",) or not getattr(args, "calib", None):
        return getattr(args, "calib", None)
    try:
        from .quantize import load_calibration
    except ImportError:
        return args.calib
    return load_calibration(args.calib, imported.inputs)


def _tuning_log_arg(value: str):
    """``--tuning-log none`` turns the shipped logs off (compile_model's ``False``)."""
    return False if value.lower() == "none" else value


def cmd_compile(args) -> int:
    from .build import compile_model
    from .frontend import import_onnx, parse_shape_overrides
    from .target import get_target

    spec = get_target(args.target)
    imported = import_onnx(args.model, parse_shape_overrides(args.input_shape))
    artifact = compile_model(imported, spec, args.output, quantize=args.quantize,
                             calib=_calibration(args, imported),
                             quant_config=_quant_config(args, spec),
                             tuning_log=args.tuning_log, log=_say)
    print(f"{artifact.directory}  target={spec.name}  quantize={args.quantize}  "
          f"build={artifact.manifest['build_seconds']:.1f}s")
    return 0


def cmd_measure(args) -> int:
    from .frontend import import_onnx, parse_shape_overrides
    from .measure import MeasureOptions, measure
    from .target import get_target

    if args.rpc and args.rpc_tracker:  # measure would quietly use --rpc alone
        raise QCompileError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT "
                            "(with --rpc-key), not both")
    calib = args.calib
    quant_config = None
    if not os.path.isdir(args.model) and args.quantize in ("int8", "both"):
        spec = get_target(args.target)
        if calib:
            imported = import_onnx(args.model, parse_shape_overrides(args.input_shape))
            calib = _calibration(args, imported)
        quant_config = _quant_config(argparse.Namespace(**{**vars(args), "quantize": "int8"}),
                                     spec)
    options = MeasureOptions(repeat=args.repeat, threads=args.threads, limit=args.limit,
                             emulated=args.emulated)
    target = None if (os.path.isdir(args.model) and args.target == "host") else args.target
    report = measure(args.model, target, data=args.data, out=args.out, rpc=args.rpc,
                     tracker=args.rpc_tracker, key=args.rpc_key, quantize=args.quantize,
                     calib=calib, quant_config=quant_config, tuning_log=args.tuning_log,
                     input_shapes=parse_shape_overrides(args.input_shape), options=options,
                     log=_say)
    print(report.to_markdown())
    return 0


def cmd_tune(args) -> int:
    try:
        from . import tune_cli
    except ImportError as exc:
        raise QCompileError(f"tuning is not available in this build ({exc})") from None
    from .frontend import import_onnx, parse_shape_overrides
    from .target import get_target

    spec = get_target(args.target)
    imported = import_onnx(args.model, parse_shape_overrides(args.input_shape))
    mod = imported.mod
    if args.quantize == "int8":
        from .build import _quantize

        mod, _ = _quantize(imported, _calibration(args, imported), _quant_config(args, spec),
                           spec, _say)
    return tune_cli.run(args, mod, spec, imported.name) or 0


def cmd_report(args) -> int:
    from .report import rerender

    for path in rerender(args.directory):
        print(path)
    return 0


COMMANDS = {"targets": cmd_targets, "compile": cmd_compile, "measure": cmd_measure,
            "tune": cmd_tune, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # before anything runs a TVM kernel: the pool's size is fixed on first use
    remote = getattr(args, "rpc", None) or getattr(args, "rpc_tracker", None)
    threads.configure(None if (remote and args.verb == "measure")
                      else getattr(args, "threads", None))
    try:
        return COMMANDS[args.verb](args)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a qcompile bug, not a user mistake: short, then details
        if os.environ.get("QCOMPILE_DEBUG"):
            raise
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        print(f"qcompile: internal error ({type(exc).__name__}: {first[:300]}); this is a "
              "bug in qcompile: rerun with QCOMPILE_DEBUG=1 for the traceback and report it",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
