"""Side-by-side latency: default schedules vs a tuning log (and optionally ONNX Runtime int8).

    .venv/bin/python tuning_logs/side_by_side.py [LOG_DIR [ROUNDS]]
        [--model ONNX --calib NPZ] [--target T] [--threads N] [--ort] [--host]

Defaults: the bundled model, int8, ``x86_64-avx2``, the shipped log, 2 threads.
Compiles the int8 model in one process with the default schedules and with the log
(``compile_relax(mod, spec, database=load_database(...))``: the records compile
applies, i.e. those that beat the default schedule timed in the model), checks the
outputs agree, then times ``main`` on one input, interleaved in ROUNDS rounds so load
changes hit every engine alike; prints medians as JSON. ``--ort``: also ONNX Runtime on
``benchmarks/bench_models.py``'s int8 QDQ model (per-channel, ``intra_op_num_threads``
= threads). ``--host``: also qcompile int8 untuned for ``--target host``.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("log", nargs="?", default=str(ROOT / "tuning_logs/fashion_mnist_cnn-x86_64-avx2"))
    ap.add_argument("rounds", nargs="?", type=int, default=7)
    ap.add_argument("--model", default=str(ROOT / "examples/fashion_mnist_cnn.onnx"))
    ap.add_argument("--calib", default=str(ROOT / "examples/fashion_mnist_calib.npz"))
    ap.add_argument("--target", default="x86_64-avx2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ort", action="store_true")
    ap.add_argument("--host", action="store_true")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts

    import numpy as np
    import onnx
    import tvm
    from tvm import relax

    from qcompile.frontend import import_onnx
    from qcompile.pipeline import compile_relax
    from qcompile.quantize import QuantConfig, quantize_model
    from qcompile.quantize.calibrate import load_calibration
    from qcompile.target import get_target
    from qcompile.tune import coverage_detail, load_database

    imp = import_onnx(args.model)
    calib = load_calibration(args.calib, imp.inputs)
    inp = imp.inputs[0]
    x = np.random.default_rng(0).standard_normal(
        [int(d) for d in inp.shape]).astype("float32")
    if "fashion" in Path(args.model).name:  # a real test image for the bundled model
        data = np.load(ROOT / "examples/fashion_mnist_test.npz")
        x = data[[k for k in data.files if k != "labels"][0]][:1].astype("float32")

    def quantized(spec):
        cfg = QuantConfig()
        if hasattr(cfg, "sqnr"):
            cfg.sqnr = False
        return quantize_model(imp, calib, cfg, spec).mod

    spec = get_target(args.target)
    mod = quantized(spec)
    db = load_database(args.log, spec)
    tuned, untuned = coverage_detail(mod, spec, db)
    print(f"coverage: {len(tuned)}/{len(tuned) + len(untuned)} kernels use a tuned record: "
          f"{tuned}", flush=True)
    fns, outs = {}, {}
    arg = tvm.runtime.tensor(x)
    builds = [("default", spec, mod, None), ("tuned", spec, mod, db)]
    if args.host:
        host = get_target("host")
        builds.append((f"host-{host.name}", host, quantized(host), None))
    for name, sp, m, d in builds:
        t = time.time()
        ex = compile_relax(m, sp, database=d)
        print(f"{name}: compiled in {time.time() - t:.1f}s", flush=True)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        fn = vm["main"]
        o = fn(arg)
        outs[name] = (o[0] if not hasattr(o, "numpy") else o).numpy()
        fns[name] = (lambda f=fn: f(arg))
    diff = float(np.abs(outs["default"] - outs["tuned"]).max())
    print(f"outputs default vs tuned: max abs diff {diff}", flush=True)
    if args.ort:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_models

        model = onnx.load(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            sess = bench_models._ort_session(bench_models._ort_int8(model, "m", x, tmp),
                                             args.threads)
        feed = {model.graph.input[0].name: x}
        fns["ort-int8"] = lambda: sess.run(None, feed)
    # per sample: enough calls for ~20 ms, the median of the per-call times
    res = {k: [] for k in fns}
    reps = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(3, min(200, int(0.02 / max(time.perf_counter() - t0, 1e-7))))
    for _ in range(args.rounds):
        for name, fn in fns.items():
            # ONNX Runtime's and TVM's pool threads spin for a while after a run; let
            # them go idle so they do not steal the cores from the next engine.
            time.sleep(0.2)
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            res[name].append((time.perf_counter() - t0) / reps[name] * 1e6)
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {"threads": args.threads, "load_average": os.getloadavg(), "median_us": med,
           "speedup_tuned_vs_default": med["default"] / med["tuned"]}
    if "ort-int8" in med:
        out.update({f"{k}_vs_ort_int8": med[k] / med["ort-int8"] for k in med
                    if k != "ort-int8"})
    out["rounds_us"] = {k: [round(v, 1) for v in vs] for k, vs in res.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
