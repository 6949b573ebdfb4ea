"""Side-by-side: the bundled model, int8, x86_64-avx2, default schedules vs the shipped tuning log."""
import sys, time, json
import numpy as np, tvm
from tvm import relax
from qcompile.frontend import import_onnx
from qcompile.target import get_target
from qcompile.pipeline import compile_relax
from qcompile.quantize import QuantConfig, quantize_model
from qcompile.quantize.calibrate import load_calibration
from qcompile.tune import load_database, coverage_detail

log = sys.argv[1] if len(sys.argv) > 1 else "tuning_logs/fashion_mnist_cnn-x86_64-avx2"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
spec = get_target("x86_64-avx2")
imp = import_onnx("examples/fashion_mnist_cnn.onnx")
calib = load_calibration("examples/fashion_mnist_calib.npz", imp.inputs)
mod = quantize_model(imp, calib, QuantConfig(), spec).mod
db, reports = load_database(log, spec, with_report=True)
tuned, untuned = coverage_detail(mod, spec, db)
print(f"coverage: {len(tuned)}/{len(tuned)+len(untuned)} kernels tuned: {tuned}; default: {untuned}")
x = np.load("examples/fashion_mnist_test.npz")
x = x[[k for k in x.files if k != "labels"][0]][:1].astype("float32")
vms, outs = {}, {}
for name, d in (("default", None), ("tuned", db)):
    t = time.time(); ex = compile_relax(mod, spec, database=d)
    print(f"{name}: compiled in {time.time()-t:.1f}s")
    vms[name] = relax.VirtualMachine(ex, tvm.cpu())
    o = vms[name]["main"](tvm.runtime.tensor(x))
    outs[name] = (o[0] if not hasattr(o, "numpy") else o).numpy()
print("outputs identical:", np.array_equal(outs["default"], outs["tuned"]),
      "max abs diff", float(np.abs(outs["default"] - outs["tuned"]).max()))
res = {"default": [], "tuned": []}
for r in range(rounds):  # interleaved, so load changes hit both alike
    for name in ("default", "tuned"):
        te = vms[name].time_evaluator("main", tvm.cpu(), number=100, repeat=1)(tvm.runtime.tensor(x))
        res[name].append(te.results[0] * 1e6)
med = {k: float(np.median(v)) for k, v in res.items()}
print(json.dumps({"median_us": med, "speedup": med["default"] / med["tuned"],
                  "rounds_us": {k: [round(v, 1) for v in vs] for k, vs in res.items()}}, indent=1))
