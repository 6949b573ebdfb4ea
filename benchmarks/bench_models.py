"""Side-by-side latency: qcompile (untuned default schedules) vs ONNX Runtime and OpenVINO.

    .venv/bin/python benchmarks/bench_models.py [--runs 30] [--threads 1 2] [--models ...]

Models: ResNet-18 and MobileNetV2 architectures built here with onnx.helper (random
He-scaled weights, BatchNorm folded into conv bias, 1x3x224x224 input) and the bundled
``examples/fashion_mnist_cnn.onnx``. For each model and thread count, in one process:

* ``ort fp32``  onnxruntime, graph optimizations on, ``intra_op_num_threads`` = threads
* ``ort int8``  onnxruntime on ``quantize_static`` QDQ per-channel (random calibration)
* ``ov fp32``   OpenVINO (CPU plugin) on the same fp32 ONNX, ``inference_num_threads`` =
                threads, latency hint, 1 stream, inference precision f32 (on AMX/AVX-512
                BF16 CPUs OpenVINO would otherwise run an fp32 model in bf16)
* ``ov int8``   OpenVINO on the same ORT QDQ per-channel model (its low-precision
                transformations run the QDQ-wrapped convs/matmuls as int8 kernels; the
                row records how many executed layers ran in i8/u8), when ``openvino``
                is installed (``pip install .[bench]``)
* ``qc fp32``   qcompile float, default schedules, ``TVM_NUM_THREADS`` = threads
* ``qc int8``   qcompile int8 (``qcompile.quantize``: min-max calibration on 8 random
                batches, its target defaults), when that package is importable

Each timing: warm-up, then the median of ``--runs`` single runs; the engines are
timed round-robin in 5 rounds, so that load from other processes on a shared machine
falls on all of them alike. Threads are set per
process for TVM (its pool reads TVM_NUM_THREADS once), so each thread count runs in a
child process. Writes ``benchmarks/results/bench_models.md`` (+ ``.json``) and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- model builders
class _G:
    def __init__(self, seed=0):
        from onnx import helper, numpy_helper  # noqa: F401

        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def _name(self, p):
        self.k += 1
        return f"{p}{self.k}"

    def const(self, arr, p="c"):
        from onnx import numpy_helper

        name = self._name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, inputs, **attrs):
        from onnx import helper

        out = self._name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, groups=1, act="relu"):
        fan_in = cin // groups * k * k
        w = (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in))
        b = 0.05 * self.rng.standard_normal(cout)
        y = self.node("Conv", [x, self.const(w.astype(np.float32), "w"),
                               self.const(b.astype(np.float32), "b")],
                      kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                      group=groups)
        if act == "relu":
            y = self.node("Relu", [y])
        elif act == "relu6":
            y = self.node("Clip", [y, self.const(np.float32(0.0)), self.const(np.float32(6.0))])
        return y

    def model(self, name, x_shape, y, n_out):
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, [x_shape[0], n_out])],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def _head(g, x, c, n_out=1000):
    x = g.node("GlobalAveragePool", [x])
    x = g.node("Flatten", [x], axis=1)
    w = g.rng.standard_normal((c, n_out)) * np.sqrt(1.0 / c)
    x = g.node("MatMul", [x, g.const(w.astype(np.float32), "fc")])
    return g.node("Add", [x, g.const((0.01 * g.rng.standard_normal(n_out)).astype(np.float32))])


def resnet18(seed=0):
    g = _G(seed)
    x = g.conv("input", 3, 64, 7, stride=2)
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for blk in range(2):
            s = stride if blk == 0 else 1
            y = g.conv(x, cin, cout, 3, stride=s)
            y = g.conv(y, cout, cout, 3, act=None)
            sc = x if (s == 1 and cin == cout) else g.conv(x, cin, cout, 1, stride=s, act=None)
            x = g.node("Relu", [g.node("Add", [y, sc])])
            cin = cout
    return g.model("resnet18", (1, 3, 224, 224), _head(g, x, 512), 1000)


def mobilenet_v2(seed=0):
    g = _G(seed)
    x = g.conv("input", 3, 32, 3, stride=2, act="relu6")
    cin = 32
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]
    for t, c, n, s in cfg:
        for i in range(n):
            stride = s if i == 0 else 1
            hid = cin * t
            y = x if t == 1 else g.conv(x, cin, hid, 1, act="relu6")
            y = g.conv(y, hid, hid, 3, stride=stride, groups=hid, act="relu6")
            y = g.conv(y, hid, c, 1, act=None)
            x = g.node("Add", [x, y]) if (stride == 1 and cin == c) else y
            cin = c
    x = g.conv(x, cin, 1280, 1, act="relu6")
    return g.model("mobilenet_v2", (1, 3, 224, 224), _head(g, x, 1280), 1000)


def fashion_cnn():
    import onnx

    return onnx.load(str(ROOT / "examples" / "fashion_mnist_cnn.onnx"))


MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "fashion_cnn": fashion_cnn}


# --------------------------------------------------------------------------- timing helpers
def _median_ms(fn, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _input_of(model):
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    return inp.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _ort_session(model_bytes, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _ort_int8(model, name, x, workdir):
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(workdir) / f"{name}_fp32.onnx"
    pre = Path(workdir) / f"{name}_pre.onnx"
    dst = Path(workdir) / f"{name}_int8.onnx"
    onnx.save(model, str(src))
    try:
        quant_pre_process(str(src), str(pre))
    except Exception:  # noqa: BLE001 - pre-processing is optional
        pre = src
    iname = model.graph.input[0].name
    rng = np.random.default_rng(1)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{iname: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)}
                                 for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=False)
    return dst.read_bytes()


def _ov_request(path, threads):
    """An OpenVINO CPU infer request for the ONNX file ``path`` and the number of its
    executed layers that run in int8 (runtime precision I8/U8)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32",
        # no thread pinning: the machine is shared, and neither ORT nor TVM pins either
        "ENABLE_CPU_PINNING": "NO"})
    int8_layers = 0
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind, prec = (info[k].astype(str) if k in info else ""
                      for k in ("layerType", "runtimePrecision"))
        if kind in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution") \
                and prec.lower() in ("i8", "u8"):
            int8_layers += 1
    return compiled.create_infer_request(), int8_layers


def qc_executable(model, name, int8: bool, target_name: str):
    """qcompile's executable of ``model`` (float, or int8 calibrated on 8 noisy copies of
    the benchmark input) and the compile seconds; shared with profile_kernels.py."""
    import onnx

    from qcompile.frontend import import_onnx
    from qcompile.pipeline import compile_relax
    from qcompile.target import get_target

    spec = get_target(target_name)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.onnx"
        onnx.save(model, str(path))
        imported = import_onnx(str(path))
        mod = imported.mod
        if int8:
            iname, x = _input_of(model)
            calib = [{iname: (x + 0.1 * np.random.default_rng(i).standard_normal(x.shape))
                      .astype(np.float32)} for i in range(8)]
            mod = _quantize(imported, calib, spec)
        ex = compile_relax(mod, spec)
    return ex, time.perf_counter() - t0


def _qc_build(model, name, int8: bool, target_name: str):
    """Compile with qcompile; returns (run_fn, compile_seconds) or raises."""
    import tvm
    from tvm import relax

    ex, secs = qc_executable(model, name, int8, target_name)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    _, x = _input_of(model)
    arg = tvm.runtime.tensor(x)
    fn = vm["main"]
    return (lambda: fn(arg)), secs


def _quantize(imported, calib, spec):
    """qcompile's quantizer with its defaults for ``spec`` (API owned by qcompile.quantize)."""
    from qcompile.quantize import QuantConfig, quantize_model

    cfg = QuantConfig()
    if hasattr(cfg, "sqnr"):
        cfg.sqnr = False  # the per-layer error report is not part of the timing
    if hasattr(cfg, "progress"):
        cfg.progress = False
    return quantize_model(imported, calib, cfg, spec).mod


def _accepts(cls, field):
    import inspect

    try:
        return field in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- one process per thread count
def _interleaved_medians(fns: dict, runs: int, rounds: int = 5, warmup: int = 3,
                         settle_s: float = 0.05) -> dict:
    """Median ms per engine, timed round-robin (``rounds`` rounds of ``runs/rounds`` runs
    each) so that load changes on a shared machine hit every engine alike.

    Each engine's turn starts with a pause of ``settle_s`` and one untimed call: ORT's and
    TVM's thread pools spin-wait after a parallel call, and a previous engine's spinning
    workers would otherwise steal the cores from the first runs of the next one (measured
    at 2 threads: ORT fp32 MobileNetV2 5.4 ms alone, 23 ms right after a qcompile run).
    Runs within a turn are back to back, as a deployed model runs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = max(1, -(-runs // rounds))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            time.sleep(settle_s)
            fn()
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}


def run_child(args):
    """Time every model at ``args.threads[0]`` threads; print one JSON line."""
    threads = args.threads[0]
    rows = []
    try:
        import qcompile.quantize as _q

        have_q = hasattr(_q, "quantize_model")
    except Exception:  # noqa: BLE001
        have_q = False
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            model = MODELS[name]()
            iname, x = _input_of(model)
            row = {"model": name, "threads": threads}
            fns = {}
            sess = _ort_session(model.SerializeToString(), threads)
            fns["ort_fp32_ms"] = lambda s=sess: s.run(None, {iname: x})
            int8_path = None
            try:
                qsess = _ort_session(_ort_int8(model, name, x, workdir), threads)
                fns["ort_int8_ms"] = lambda s=qsess: s.run(None, {iname: x})
                int8_path = Path(workdir) / f"{name}_int8.onnx"
            except Exception as exc:  # noqa: BLE001
                row["ort_int8_error"] = f"{type(exc).__name__}: {exc}"[:300]
            fp32_path = Path(workdir) / f"{name}_fp32_ov.onnx"
            fp32_path.write_bytes(model.SerializeToString())
            for key, path in (("ov_fp32", fp32_path), ("ov_int8", int8_path)):
                if path is None:
                    continue
                try:
                    req, n8 = _ov_request(path, threads)
                    fns[f"{key}_ms"] = lambda r=req: r.infer({0: x})
                    if key == "ov_int8":
                        row["ov_int8_layers"] = n8
                except Exception as exc:  # noqa: BLE001 - not installed, or it refuses
                    row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            try:
                fn, secs = _qc_build(model, name, False, args.target)
                row["qc_fp32_compile_s"] = secs
                fns["qc_fp32_ms"] = fn
            except Exception as exc:  # noqa: BLE001
                row["qc_fp32_error"] = f"{type(exc).__name__}: {exc}"[:300]
            if not have_q:
                row["qc_int8_error"] = "qcompile.quantize not importable yet (float-only run)"
            else:
                try:
                    fn, secs = _qc_build(model, name, True, args.target)
                    row["qc_int8_compile_s"] = secs
                    fns["qc_int8_ms"] = fn
                except Exception as exc:  # noqa: BLE001
                    row["qc_int8_error"] = f"{type(exc).__name__}: {exc}"[:300]
            row.update(_interleaved_medians(fns, args.runs))
            rows.append(row)
            print(f"[{threads} thr] {name}: " + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                if k not in ("model", "threads")), file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(rows), flush=True)


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def write_report(rows, args):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "bench_models" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# qcompile vs ONNX Runtime and OpenVINO: latency (ms, median of "
        f"{args.runs} runs after warm-up, interleaved, batch 1)", "",
        f"Machine: {cpu}, {os.cpu_count()} cores. qcompile target `{args.target}`, untuned "
        "default schedules. Generated by `benchmarks/bench_models.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
        "| model | threads | ORT fp32 | ORT int8 (QDQ per-ch) | OV fp32 | OV int8 (same QDQ) "
        "| qc fp32 | qc int8 | qc fp32 / ORT fp32 | qc int8 / ORT int8 | qc int8 / OV int8 "
        "| qc fp32 / qc int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def ratio(a, b):
            return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "—"

        lines.append(
            f"| {r['model']} | {r['threads']} | {_fmt(r.get('ort_fp32_ms'))} | "
            f"{_fmt(r.get('ort_int8_ms'))} | {_fmt(r.get('ov_fp32_ms'))} | "
            f"{_fmt(r.get('ov_int8_ms'))} | {_fmt(r.get('qc_fp32_ms'))} | "
            f"{_fmt(r.get('qc_int8_ms'))} | {ratio('qc_fp32_ms', 'ort_fp32_ms')} | "
            f"{ratio('qc_int8_ms', 'ort_int8_ms')} | {ratio('qc_int8_ms', 'ov_int8_ms')} | "
            f"{ratio('qc_fp32_ms', 'qc_int8_ms')} |")
    notes = sorted({f"{r['model']}: {k}: {v}" for r in rows for k, v in r.items()
                    if k.endswith("_error")})
    ov8 = sorted({f"{r['model']} {r['ov_int8_layers']}" for r in rows if "ov_int8_layers" in r})
    if ov8:
        notes.append("OpenVINO int8: executed conv/matmul layers in int8 per model: "
                     + ", ".join(ov8) + ". OpenVINO runs with inference precision f32 "
                     "(its non-quantized layers in fp32, as ORT's).")
    if args.target != "host":
        notes.append(f"qcompile code is limited to `{args.target}`'s ISA; ONNX Runtime "
                     "dispatches at run time to the best ISA of this CPU (here AVX-512 / "
                     "VNNI), so the ratios overstate the gap on a real AVX2-only machine.")
    comp = [f"{r['model']}: fp32 {r['qc_fp32_compile_s']:.1f} s" +
            (f", int8 {r['qc_int8_compile_s']:.1f} s" if "qc_int8_compile_s" in r else "")
            for r in rows if "qc_fp32_compile_s" in r and r["threads"] == args.threads[0]]
    if comp:
        lines += ["", "qcompile compile time (import + quantize + schedules + build): " +
                  "; ".join(comp)]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        _plot(rows, RESULTS / f"{stem}.png")
    except Exception as exc:  # noqa: BLE001
        print(f"no chart: {exc}", file=sys.stderr)
    print("\n".join(lines))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ort_fp32_ms", "ORT fp32"), ("ort_int8_ms", "ORT int8"),
            ("ov_fp32_ms", "OpenVINO fp32"), ("ov_int8_ms", "OpenVINO int8"),
            ("qc_fp32_ms", "qcompile fp32"), ("qc_int8_ms", "qcompile int8")]
    labels = [f"{r['model']}\n{r['threads']} thr" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(keys)
    for i, (k, lab) in enumerate(keys):
        vals = [r.get(k, 0) or 0 for r in rows]
        ax.bar(np.arange(len(rows)) + (i - (len(keys) - 1) / 2) * width, vals, width, label=lab)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("latency (ms, median)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("qcompile (untuned) vs ONNX Runtime and OpenVINO")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--target", default="host")
    p.add_argument("--tag", default="", help="suffix of the result files (bench_models_<tag>.md)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args)
    rows = []
    for t in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        cmd = [sys.executable, __file__, "--child", "--runs", str(args.runs), "--threads", str(t),
               "--target", args.target, "--models", *args.models]
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
        for line in out.stdout.splitlines():
            if line.startswith("RESULT "):
                rows += json.loads(line[len("RESULT "):])
        if out.returncode:
            print(f"child for {t} threads exited {out.returncode}", file=sys.stderr)
    write_report(rows, args)


if __name__ == "__main__":
    main()
