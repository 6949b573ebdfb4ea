"""Top-1 on the bundled Fashion-MNIST CNN: float vs qcompile int8 vs ONNX Runtime int8.

    .venv/bin/python benchmarks/quant_accuracy.py [--target x86_64-avx2] [--methods ...]
        [--test slice|full] [--config LABEL:key=value,...]

Same 256 calibration images (examples/fashion_mnist_calib.npz) for every int8
row; accuracy on the committed 2000-image test slice (examples/fashion_mnist_test.npz),
or with ``--test full`` on all 10,000 Fashion-MNIST test images read from the Debian
package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist, preprocessed as
examples/train_fashion_mnist.py does; its first 2000 must equal the committed slice).
``--config`` adds QuantConfig variants (same syntax as benchmarks/real_models.py).

``--calib-seeds S [S ...]`` instead repeats the qcompile-vs-ORT comparison over
independent calibration sets: for each seed, 256 images drawn without replacement
from the Fashion-MNIST TRAIN set (``np.random.default_rng(seed).choice(60000, 256)``,
the draw examples/train_fashion_mnist.py makes with its CALIB_SEED, same
preprocessing), the same images for qcompile (default ``QuantConfig()``) and for ORT
``quantize_static``; accuracy on the full 10k test set per seed, mean ± std, and the
paired per-seed difference (mean, standard error, t interval, sign test over seeds).
``--seed-eval train`` scores the same study on 10,000 TRAIN images outside every drawn
calibration set (a second labelled set: is a gap a property of the test set?).
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


def _strip_output_qdq(path) -> None:
    """Rewrite the QDQ model at ``path`` without the Q/DQ pair on its (first) output."""
    import onnx

    m = onnx.load(str(path))
    out = m.graph.output[0].name
    producer = {o: n for n in m.graph.node for o in n.output}
    dq = producer.get(out)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return
    inner = q.input[0]
    m.graph.node.remove(dq)
    m.graph.node.remove(q)
    for n in m.graph.node:
        for i, o in enumerate(n.output):
            if o == inner:
                n.output[i] = out
    onnx.save(m, str(path))


def ort_quantize(model_path, calib, out_path, reduce_range=False, preprocess=False,
                 float_logits=False):
    """ORT ``quantize_static`` QDQ per-channel of ``model_path`` into ``out_path``.

    ``preprocess`` (--ort-preprocess): ORT's recommended ``quant_pre_process`` first (shape
    inference + graph optimization, which folds BatchNorm into Conv); without it ORT
    quantizes the raw graph, each conv output before its BatchNorm.
    ``float_logits`` (--ort-float-logits): remove the QuantizeLinear/DequantizeLinear pair
    ``quantize_static`` puts on the model output, so ORT's last Gemm writes float logits as
    qcompile's does. Quantized to uint8, about 0.8 % of the test images get exactly tied
    top-2 logits, which argmax breaks towards the lower class index."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(str(out_path) + ".pre.onnx")
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        model_path = pre

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(model_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=reduce_range)
    if float_logits:
        _strip_output_qdq(out_path)


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
    parser.add_argument("--calib-seeds", nargs="+", type=int, default=None,
                        help="instead: repeat qcompile default int8 vs ORT over calibration "
                             "sets of 256 train images drawn with each seed (full test set)")
    parser.add_argument("--seed-eval", choices=("test", "train"), default="test",
                        help="with --calib-seeds: score on the 10k test set (default) or on "
                             "10,000 TRAIN images outside every calibration set drawn (labelled "
                             "images the model was trained on: a second labelled set, to see "
                             "whether a gap is a property of the test set)")
    parser.add_argument("--seed-config", default=None,
                        help="with --calib-seeds: a QuantConfig variant LABEL:key=value,... "
                             "instead of the defaults (a diagnostic, not a way to pick a "
                             "config on the test set)")
    parser.add_argument("--ort-preprocess", action="store_true",
                        help="run ORT's quant_pre_process (folds BatchNorm) before quantize_static")
    parser.add_argument("--ort-float-logits", action="store_true",
                        help="drop the Q/DQ pair quantize_static puts on the model output")
    parser.add_argument("--requant-timing", action="store_true",
                        help="instead: time the float vs fixed-point requantize epilogue")
    args = parser.parse_args(argv)
    os.environ.setdefault("QCOMPILE_NO_PROGRESS", "1")
    if args.requant_timing:
        return requant_timing(args)
    if args.calib_seeds:
        return calib_seed_study(args)

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
            ort_quantize(args.model, calib_x, out, reduce_range, args.ort_preprocess,
                         args.ort_float_logits)
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


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_fmnist",
                                                  EXAMPLES / "train_fashion_mnist.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test (ties dropped): P(a split at least this uneven | p = 1/2)."""
    from math import comb

    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def paired_summary(diffs) -> dict:
    """Mean, sample std, standard error, 95 % t interval and sign test of per-seed
    differences (qcompile minus ORT, points of top-1)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else float("nan")
    se = std / np.sqrt(n) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * se) if n > 1 else float("nan")
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    return {"n": n, "mean": mean, "std": std, "se": se, "ci95": (mean - half, mean + half),
            "wins": wins, "losses": losses, "ties": n - wins - losses,
            "sign_p": sign_test_p(wins, losses)}


def calib_seed_study(args) -> int:
    """qcompile default int8 vs ORT quantize_static over independent calibration sets."""
    from qcompile.frontend import import_onnx
    from qcompile.quantize import QuantConfig, quantize_model
    from qcompile.quantize.calibrate import CalibrationData
    from qcompile.target import get_target

    spec = get_target(args.target)
    train = _train_module()
    train_u8, train_labels = train.load_split("train")
    draws = {seed: np.random.default_rng(seed).choice(train_u8.shape[0], 256, replace=False)
             for seed in args.calib_seeds}
    if args.seed_eval == "test":
        x, labels = load_test("full")
        which = "full 10,000-image test set"
    else:
        used = np.unique(np.concatenate(list(draws.values())))
        rest = np.setdiff1d(np.arange(train_u8.shape[0]), used)
        pick = np.sort(np.random.default_rng(10 ** 6).choice(rest, 10000, replace=False))
        x, labels = train.preprocess(train_u8[pick]), train_labels[pick]
        which = "10,000 train images outside every calibration set (seen in training)"
    imported = import_onnx(args.model)
    float_ref = ort_logits(args.model, x)
    float_acc = 100 * np.mean(float_ref.argmax(1) == labels)
    ort_name = ("ORT quantize_static QDQ" + (" reduce_range" if spec.reduce_range else "")
                + (", pre-processed" if args.ort_preprocess else "")
                + (", float logits" if args.ort_float_logits else ""))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from real_models import parse_config

    label, kwargs = parse_config(args.seed_config) if args.seed_config else ("defaults", {})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.calib_seeds:
            calib_x = train.preprocess(train_u8[draws[seed]])
            batches = CalibrationData([{"input": calib_x[i:i + 64]}
                                       for i in range(0, len(calib_x), 64)],
                                      f"train images, seed {seed}")
            result = quantize_model(imported, batches, QuantConfig(progress=False, **kwargs),
                                    spec)
            bits = result.summary["weights"]["bits"]
            qc = tvm_logits(result.mod, spec, x).argmax(1)
            out = Path(tmp) / f"ort_{seed}.onnx"
            ort_quantize(args.model, calib_x, out, bool(spec.reduce_range),
                         args.ort_preprocess, args.ort_float_logits)
            ort = ort_logits(out, x).argmax(1)
            qc_right, ort_right = qc == labels, ort == labels
            row = {"seed": seed, "bits": bits,
                   "qc": 100 * float(np.mean(qc_right)), "ort": 100 * float(np.mean(ort_right)),
                   "only_qc": int(np.sum(qc_right & ~ort_right)),
                   "only_ort": int(np.sum(~qc_right & ort_right)),
                   "qc_agree": 100 * float(np.mean(qc == float_ref.argmax(1))),
                   "ort_agree": 100 * float(np.mean(ort == float_ref.argmax(1)))}
            rows.append(row)
            print(f"  seed {seed}: qcompile {row['qc']:.2f} %, ORT {row['ort']:.2f} % "
                  f"({row['only_qc']} / {row['only_ort']})", file=sys.stderr, flush=True)
    bits = rows[0]["bits"]
    print(f"\nBundled Fashion-MNIST CNN, {which}, target {spec.name} "
          f"({bits}-bit weights), qcompile int8 {label}{' ' + str(kwargs) if kwargs else ''}"
          f" vs `{ort_name}`; float {float_acc:.2f} %; "
          f"{len(rows)} calibration sets of 256 train images\n")
    print("| calibration seed | qcompile int8 (%) | ORT (%) | qcompile − ORT (points) | "
          "only qcompile right / only ORT right | sign-test p (images) | "
          "agreement with float qc / ORT (%) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['qc']:.2f} | {r['ort']:.2f} | {r['qc'] - r['ort']:+.2f} | "
              f"{r['only_qc']} / {r['only_ort']} | {sign_test_p(r['only_qc'], r['only_ort']):.2g}"
              f" | {r['qc_agree']:.2f} / {r['ort_agree']:.2f} |")
    qc = np.array([r["qc"] for r in rows])
    ort = np.array([r["ort"] for r in rows])
    s = paired_summary(qc - ort)
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else float("nan"))
    print(f"| mean ± std | {qc.mean():.3f} ± {sd(qc):.3f} | {ort.mean():.3f} ± {sd(ort):.3f} | "
          f"{s['mean']:+.3f} ± {s['std']:.3f} | "
          f"{np.mean([r['only_qc'] for r in rows]):.1f} / "
          f"{np.mean([r['only_ort'] for r in rows]):.1f} | | "
          f"{np.mean([r['qc_agree'] for r in rows]):.2f} / "
          f"{np.mean([r['ort_agree'] for r in rows]):.2f} |")
    print(f"\nPaired over seeds (qcompile − ORT): mean {s['mean']:+.3f} points, standard error "
          f"{s['se']:.3f}, 95 % t interval [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]; "
          f"qcompile ahead on {s['wins']} seeds, behind on {s['losses']}, tied on {s['ties']} "
          f"(sign test p = {s['sign_p']:.2g}). Float − qcompile: "
          f"{float_acc - qc.mean():+.3f} points on average, worst seed "
          f"{float_acc - qc.min():+.3f}.")
    return 0


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
