"""``measure``: run float and int8 builds of a model on a device, time them
with TVM's time evaluator there, and compare their outputs with the float
reference (onnxruntime on this machine) on evaluation data.

The device is this machine, or a board reached through TVM RPC (``--rpc`` or
``--rpc-tracker`` + ``--rpc-key``). What has been measured is kept: if the
board dies mid-run, the report still holds every section finished before it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DeviceError, QCompileError
from .report import Report, accuracy, compare_outputs, latency_summary

DEFAULT_RANDOM_SAMPLES = 8


@dataclass
class MeasureOptions:
    repeat: int = 50
    min_repeat_ms: int = 20
    threads: int | None = None
    limit: int | None = None  # evaluation samples (None: all)
    emulated: bool = False
    progress: bool = True


def measure(model: str | os.PathLike, target=None, *, data=None, out=None, rpc=None,
            tracker=None, key=None, quantize: str = "both", calib=None, quant_config=None,
            tuning_log=None, input_shapes=None, options: MeasureOptions | None = None,
            log=None) -> Report:
    """Build (or take) artifacts, run them on the device and return a :class:`Report`.

    ``model`` is an ONNX file (built here as float and/or int8, per ``quantize``:
    "both", "int8" or "none") or an artifact directory (measured as it is).
    """
    from .artifact import read_artifact
    from .build import compile_model
    from .frontend import import_onnx
    from .target import get_target

    options = options or MeasureOptions()
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if not (rpc or tracker):  # an API caller gets the CLI's thread count too (see threads.py)
        from . import threads as threads_mod

        threads_mod.configure(options.threads)
    out = Path(out or "qcompile-report")
    artifacts: dict[str, object] = {}
    model_path = Path(model)
    if model_path.is_dir():
        artifact = read_artifact(model_path)
        artifacts["int8" if artifact.quantized else "float"] = artifact
        try:
            spec = get_target(target or artifact.target_name)
        except QCompileError as exc:  # the manifest names a target this machine lacks
            raise type(exc)(f"{model_path}: {exc}") from None
        onnx_path = artifact.manifest["model"]["path"]
        inputs = artifact.inputs
    else:
        spec = get_target(target)
        imported = import_onnx(model_path, input_shapes)
        for notice in imported.notices:
            say(f"note: {notice}")
        onnx_path, inputs = str(model_path), imported.inputs
        kinds = {"both": ["float", "int8"], "none": ["float"], "int8": ["int8"]}.get(quantize)
        if kinds is None:
            raise QCompileError(f"quantize must be both, int8 or none, not '{quantize}'")
        for kind in kinds:
            artifacts[kind] = compile_model(
                imported, spec, out / f"artifact-{kind}",
                quantize="int8" if kind == "int8" else "none",
                calib=calib, quant_config=quant_config,
                tuning_log=tuning_log, log=say)
    feeds, labels, data_note = _evaluation_data(data, inputs, options.limit)
    session, device_label = _open_session(rpc, tracker, key, spec)
    emulated = options.emulated
    if session is not None:
        from .rpc import board_info

        board = board_info(session)  # the emulated board says so about itself
        if board.get("emulated"):
            emulated = True
            device_label += f" ({board.get('emulator', 'emulated')} {board.get('arch', '')})"
    report = Report(model=Path(onnx_path).stem, target=spec.name, device=device_label,
                    emulated=emulated, environment=_environment(spec, session))
    report.notes.append(data_note)
    if emulated:
        report.notes.append("timings were taken under emulation: they show that the code "
                            "runs and how float and int8 compare there, never board speed")
    reference = _reference_outputs(onnx_path, feeds, report, say)
    lost = None  # the DeviceError that ended the run early, raised once the report is out
    try:
        for kind, artifact in artifacts.items():
            say(f"measuring {kind} on {device_label} ...")
            try:
                section = _measure_artifact(artifact, feeds, labels, reference, session,
                                            options, say)
            except DeviceError as exc:
                report.notes.append(f"{kind}: not measured: {exc}")
                lost = exc
                break  # the board is gone; keep what is measured
            if reference is None and kind == "int8" and report.float:
                section["agreement"] = compare_outputs(report.float.pop("_outputs"),
                                                       section["_outputs"])
                section["agreement"]["reference"] = "qcompile float"
            setattr(report, kind, section)
            tuning = section.get("tuning") or {}
            if tuning.get("tuned_kernels"):
                logs = tuning["log"]
                if tuning.get("shipped"):  # the package's tuning_logs/<name>, by name
                    logs = "shipped tuning_logs/ " + ", ".join(
                        Path(d).name for d in logs.split(", "))
                report.notes.append(
                    f"{kind}: {tuning['tuned_kernels']} of {tuning['total_kernels']} kernels "
                    f"use a tuned record ({logs}): {', '.join(tuning.get('tuned', []))}; "
                    "the rest default schedules")
            if kind == "int8":
                report.quantization = artifact.manifest.get("quantization")
                fp32_bytes = ((report.quantization or {}).get("weight_bytes") or {}).get("fp32")
                if report.float is not None and fp32_bytes:
                    report.float.setdefault("weight_bytes", fp32_bytes)
    finally:
        for section in (report.float, report.int8):
            if section:
                section.pop("_outputs", None)
        report.write(out)
    say(f"wrote {out}/report.json and {out}/report.md")
    if lost is not None:
        raise DeviceError(f"{lost} (what was measured before is in {out}/report.json)")
    return report


def _environment(spec, session) -> dict:
    import tvm

    env = {"tvm": tvm.__version__, "target_isa": ", ".join(spec.isa_features)}
    if session is None:
        import platform

        env["host"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    return env


def _open_session(rpc, tracker, key, spec):
    if rpc is None and tracker is None:
        if not spec.runs_here():
            raise DeviceError(f"target {spec.name} cannot run on this machine; measure it on "
                              "a board: --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key K")
        return None, "local (this machine)"
    from . import rpc as rpc_mod

    if rpc:  # a server reached directly matches a key only if it was started with one
        session = rpc_mod.connect(rpc=rpc, key=key)
        return session, f"rpc {rpc}"
    key = key or spec.rpc_key
    session = rpc_mod.connect(tracker=tracker, key=key)
    label = f"rpc tracker {tracker} key {key}"
    return session, label


def _set_threads(session, threads: int | None, say) -> int | None:
    """Pin the runtime's thread pool size on the device (None: leave the default).

    Returns the pool size the runs use. TVM can shrink a pool that exists but never
    grow it (see :mod:`qcompile.threads`), so a request above it is reported.
    """
    import tvm

    getter = session.get_function("runtime.NumThreads") if session else \
        tvm.get_global_func("runtime.NumThreads")
    if threads:
        config = session.get_function("runtime.config_threadpool") if session else \
            tvm.get_global_func("runtime.config_threadpool")
        config(1, int(threads))
    used = int(getter())
    if threads and used < threads:
        where = ("start the board's RPC server with TVM_NUM_THREADS set" if session else
                 "set TVM_NUM_THREADS before TVM first runs in this process")
        say(f"note: asked for {threads} threads, the runtime pool has {used}: {where}")
    return used


def _measure_artifact(artifact, feeds, labels, reference, session, options, say) -> dict:
    from .artifact import load

    try:
        runner = load(artifact.directory, session=session)
        threads = _set_threads(session, options.threads, say)
        outputs = []
        iterator = feeds
        if options.progress and sys.stderr.isatty() and len(feeds) > 50:
            from tqdm import tqdm

            iterator = tqdm(feeds, desc="  evaluating", unit="batch", file=sys.stderr)
        for feed in iterator:
            outputs.append(runner.run(feed)[0])
        samples = runner.time(feeds[0], repeat=options.repeat,
                              min_repeat_ms=options.min_repeat_ms)
    except QCompileError:
        raise
    except Exception as exc:
        if session is not None:
            raise DeviceError(f"the board stopped answering while running "
                              f"{artifact.directory.name}: {_first(exc)}") from None
        raise
    section = {"artifact": str(artifact.directory), "latency_ms": latency_summary(samples,
                                                                                   threads),
               "library_bytes": artifact.manifest["library"]["bytes"], "_outputs": outputs}
    tuning = artifact.manifest.get("tuning") or {}
    if tuning.get("total_kernels"):
        section["tuning"] = {k: tuning[k] for k in ("log", "shipped", "tuned_kernels",
                                                    "total_kernels", "tuned") if k in tuning}
    elif "tuning" in artifact.manifest:  # built with no record applied: all default
        section["tuning"] = {"log": None, "tuned_kernels": 0}
    quant = artifact.manifest.get("quantization") or {}
    weight_bytes = quant.get("weight_bytes") or {}
    if isinstance(weight_bytes, dict) and weight_bytes:
        # fp32 weights for a float build, int8 (+ int32 bias) for a quantized one
        section["weight_bytes"] = weight_bytes.get("int8" if artifact.quantized else "fp32")
    if reference is not None:
        section["agreement"] = compare_outputs(reference, outputs)
        section["agreement"]["reference"] = "onnxruntime float"
    if labels is not None:
        section["accuracy"] = accuracy(outputs, labels)
    say(f"  median {section['latency_ms']['median']:.3f} ms over "
        f"{section['latency_ms']['count']} repeats")
    return section


def _evaluation_data(data, inputs, limit):
    from .artifact import load_feed_npz

    if data is not None:
        feeds, labels = load_feed_npz(data, inputs, limit)
        count = sum(len(next(iter(f.values()))) for f in feeds)
        return feeds, labels, f"evaluation data: {data} ({count} samples" + \
            (", with labels)" if labels is not None else ", no labels)")
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(limit or DEFAULT_RANDOM_SAMPLES):
        feeds.append({i.name: _random_array(rng, i) for i in inputs})
    return feeds, None, (f"evaluation data: {len(feeds)} seeded random inputs (pass --data "
                         "for real data; agreement on random inputs says little about "
                         "accuracy)")


def _random_array(rng, info):
    if info.dtype.startswith("float"):
        return rng.standard_normal(info.shape).astype(info.dtype)
    if info.dtype == "bool":
        return rng.integers(0, 2, info.shape).astype(bool)
    return rng.integers(0, 8, info.shape).astype(info.dtype)


def _reference_outputs(onnx_path, feeds, report, say):
    """Float outputs of the source model under onnxruntime, and its latency."""
    # onnxruntime's telemetry writes ~/.cache/Microsoft/... and $TMPDIR/.ses on every
    # session unless this is set before its import: measure writes only its --out.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort
    except ImportError:
        report.notes.append("onnxruntime not installed: int8 is compared with qcompile float "
                            "(pip install qcompile[ref] for the onnxruntime reference)")
        return None
    if not Path(onnx_path).is_file():
        report.notes.append(f"source model {onnx_path} not found: no onnxruntime reference")
        return None
    say("running the onnxruntime float reference ...")
    import onnx

    try:  # a manifest may name any file: a bad one means no reference, not a crash
        model = onnx.load(onnx_path)
        if model.ir_version > 10:  # onnxruntime 1.31 refuses newer IR versions
            model.ir_version = 10
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(model.SerializeToString(), session_options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        report.notes.append(f"source model {onnx_path} cannot be run by onnxruntime "
                            f"({_first(exc)}): no onnxruntime reference")
        return None
    outputs = [session.run(None, feed)[0] for feed in feeds]
    started = time.perf_counter()
    timings = []
    while len(timings) < 50 and time.perf_counter() - started < 5:
        t0 = time.perf_counter()
        session.run(None, feeds[0])
        timings.append((time.perf_counter() - t0) * 1000)
    report.reference = {"kind": "onnxruntime float", "detail": f"onnxruntime {ort.__version__}"
                        f" CPUExecutionProvider on the host, {len(outputs)} samples",
                        "latency_ms": {"onnxruntime fp32 (host)": float(np.median(timings))}}
    return outputs


def _first(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
