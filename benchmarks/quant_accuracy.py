"""Top-1 on the bundled Fashion-MNIST CNN: float vs qcompile int8 vs ONNX Runtime int8.

    .venv/bin/python benchmarks/quant_accuracy.py [--target x86_64-avx2] [--methods ...]
        [--test slice|full] [--config LABEL:key=value,...]

Same 256 calibration images (examples/fashion_mnist_calib.npz) for every int8
row; accuracy on the committed 2000-image test slice (examples/fashion_mnist_test.npz),
or with ``--test full`` on all 10,000 Fashion-MNIST test images read from the Debian
package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist, preprocessed as
examples/train_fashion_mnist.py does; its first 2000 must equal the committed slice).
``--config`` adds QuantConfig variants (same syntax as benchmarks/real_models.py).
ONNX Runtime's row is ``quantize_static(QuantFormat.QDQ, per_channel=True)``
(uint8 activations, int8 weights, MinMax calibration), run by ORT itself.
Prints a Markdown table; not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def ort_logits(model_path, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 100]})[0]
                           for i in range(0, len(x), 100)])


def ort_quantize(model_path, calib, out_path, reduce_range=False):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(model_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=reduce_range)


def load_test(which):
    """(inputs, labels): the committed 2000-image slice or the full 10k test set."""
    test = np.load(EXAMPLES / "fashion_mnist_test.npz")
    if which == "slice":
        return test["input"], test["labels"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_fmnist",
                                                  EXAMPLES / "train_fashion_mnist.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    images, labels = train.load_split("t10k")
    x = train.preprocess(images)
    if not np.array_equal(x[:len(test["input"])], test["input"]):
        raise SystemExit("the full test set does not start with the committed slice")
    return x, labels.astype(np.int64)


def tvm_logits(mod, spec, x):
    import tvm
    from tvm import relax

    from qcompile.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, spec), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy()
                           for i in range(len(x))])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86_64-avx2")
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy", "mse"])
    parser.add_argument("--model", default=str(EXAMPLES / "fashion_mnist_cnn.onnx"))
    parser.add_argument("--test", choices=("slice", "full"), default="slice",
                        help="the committed 2000-image slice or the full 10k test set")
    parser.add_argument("--config", action="append", default=[],
                        help="extra variant LABEL:key=value,... (QuantConfig fields)")
    parser.add_argument("--no-bc-row", action="store_true",
                        help="leave out the mse row without bias correction")
    parser.add_argument("--requant-timing", action="store_true",
                        help="instead: time the float vs fixed-point requantize epilogue")
    args = parser.parse_args(argv)
    os.environ.setdefault("QCOMPILE_NO_PROGRESS", "1")
    if args.requant_timing:
        return requant_timing(args)

    from qcompile.frontend import import_onnx
    from qcompile.quantize import QuantConfig, load_calibration, quantize_model
    from qcompile.target import get_target

    spec = get_target(args.target)
    x, labels = load_test(args.test)
    calib_x = np.load(EXAMPLES / "fashion_mnist_calib.npz")["input"]

    rows = []
    correct = {}  # row name -> per-image "top-1 right" (for the paired comparison with ORT)

    def add(name, logits, float_logits, seconds=None, note=""):
        acc = 100 * np.mean(logits.argmax(1) == labels)
        agree = 100 * np.mean(logits.argmax(1) == float_logits.argmax(1))
        err = np.sum((logits.astype(np.float64) - float_logits) ** 2)
        sqnr = 10 * np.log10(np.sum(float_logits.astype(np.float64) ** 2) / max(err, 1e-300))
        rows.append((name, acc, agree, sqnr, seconds, note))
        correct[name] = logits.argmax(1) == labels
        print(f"  {name}: {acc:.2f}%", file=sys.stderr)

    float_ref = ort_logits(args.model, x)
    add("float (ONNX Runtime)", float_ref, float_ref)
    imported = import_onnx(args.model)
    add("float (qcompile)", tvm_logits(imported.mod, spec, x), float_ref)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_models import parse_config

    variants = [(f"qcompile int8, {m}", {"method": m}) for m in args.methods]
    if not args.no_bc_row:
        variants.append(("qcompile int8, mse, no bias correction",
                         {"method": "mse", "bias_correction": False}))
    variants += [parse_config(c) for c in args.config]
    for label, kwargs in variants:
        started = time.perf_counter()
        calib = load_calibration(EXAMPLES / "fashion_mnist_calib.npz", imported.inputs)
        config = QuantConfig(progress=False, **kwargs)
        result = quantize_model(imported, calib, config, spec)
        seconds = time.perf_counter() - started
        bits = result.summary["weights"]["bits"]
        add(label, tvm_logits(result.mod, spec, x), float_ref, seconds,
            f"per-channel {bits}-bit weights, uint8 activations")
    with tempfile.TemporaryDirectory() as tmp:
        for reduce_range in (False, True):
            out = Path(tmp) / f"ort_int8_{reduce_range}.onnx"
            started = time.perf_counter()
            ort_quantize(args.model, calib_x, out, reduce_range)
            seconds = time.perf_counter() - started
            add(f"ORT quantize_static QDQ{' reduce_range' if reduce_range else ''}",
                ort_logits(out, x), float_ref, seconds,
                f"per-channel {7 if reduce_range else 8}-bit weights, uint8 activations, MinMax")

    which = ("committed 2000-image test slice" if args.test == "slice" else
             "full 10,000-image test set")
    print(f"\nBundled Fashion-MNIST CNN, {which}, target {spec.name}, "
          f"256 calibration images\n")
    print("| model | top-1 (%) | top-1 agreement with float (%) | logit SQNR vs float (dB) "
          "| quantize time (s) | notes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, acc, agree, sqnr, seconds, note in rows:
        t = f"{seconds:.1f}" if seconds is not None else ""
        q = f"{sqnr:.1f}" if np.isfinite(sqnr) and sqnr < 100 else "exact"
        print(f"| {name} | {acc:.2f} | {agree:.2f} | {q} | {t} | {note} |")
    paired_with_ort(rows, correct, spec)
    return 0


def paired_with_ort(rows, correct, spec) -> None:
    """Per image, against ORT with the same weight bits: how many only qcompile gets
    right, how many only ORT, and the exact two-sided sign-test (McNemar) p-value --
    whether an accuracy difference of a few images is more than chance."""
    from math import comb

    ort = "ORT quantize_static QDQ" + (" reduce_range" if spec.reduce_range else "")
    if ort not in correct:
        return
    print(f"\nPaired with `{ort}` (same weight bits as this target):\n")
    print("| model | only qcompile right | only ORT right | sign-test p |")
    print("| --- | --- | --- | --- |")
    for name, *_ in rows:
        if not name.startswith("qcompile int8"):
            continue
        a = int(np.sum(correct[name] & ~correct[ort]))
        b = int(np.sum(~correct[name] & correct[ort]))
        n, k = a + b, min(a, b)
        p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
        print(f"| {name} | {a} | {b} | {p:.2f} |")


def requant_timing(args) -> int:
    """Whole-model time of the int8 module with each requantize epilogue."""
    import tvm
    from tvm import relax

    from qcompile.frontend import import_onnx
    from qcompile.pipeline import compile_relax
    from qcompile.quantize import QuantConfig, load_calibration, quantize_model
    from qcompile.quantize.realize import realize
    from qcompile.target import get_target

    spec = get_target(args.target)
    test = np.load(EXAMPLES / "fashion_mnist_test.npz")
    print("| batch | requantize | time min (ms) | time median (ms) | top-1 on 400 (%) |")
    print("| --- | --- | --- | --- | --- |")
    for batch in (1, 50):
        imported = import_onnx(args.model, {"input": (batch, 1, 28, 28)})
        calib = load_calibration(EXAMPLES / "fashion_mnist_calib.npz", imported.inputs)
        base = quantize_model(imported, calib, QuantConfig(progress=False, sqnr=False), spec)
        x, labels = test["input"][:400], test["labels"][:400]
        for mode in ("float", "fixed"):
            mod, _ = realize(base.float_mod, base.plan, base.qparams, True,
                             base.summary["weights"]["reduce_range"], requant=mode)
            vm = relax.VirtualMachine(compile_relax(mod, spec), tvm.cpu())
            logits = np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + batch])).numpy()
                                     for i in range(0, len(x), batch)])
            times = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=5)(
                tvm.runtime.tensor(x[:batch])).results
            acc = 100 * np.mean(logits.argmax(1) == labels)
            print(f"| {batch} | {mode} | {min(times) * 1e3:.3f} | "
                  f"{np.median(times) * 1e3:.3f} | {acc:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
