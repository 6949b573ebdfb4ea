"""Real-weight models: float vs qcompile int8 vs ONNX Runtime int8, agreement with float.

    .venv/bin/python benchmarks/real_models.py [--models mobilenet_v2 efficientnet_lite0 minilm]
        [--methods minmax percentile entropy mse] [--config LABEL:key=value,...] [--target host]

Needs the files written by ``/work/torchenv/bin/python benchmarks/prepare_models.py``
in ``benchmarks/models/`` (MobileNetV2 and EfficientNet-Lite0 with ImageNet weights,
all-MiniLM-L6-v2, 14 real photos + 44 disjoint calibration crops, 24 + 16 sentences).

Reference ("float") is the exported ONNX model run by ONNX Runtime in fp32 (it
matches torch to ~1e-5). Rows:

* ``qcompile float``: the same model compiled by qcompile without quantization;
* ``qcompile int8, METHOD``: ``quantize_model`` with ``QuantConfig(method=METHOD)``
  (per-channel int8 weights, uint8 activations, the target's reduce_range default),
  calibration batches = the calibration photos / sentences;
* ``--config LABEL:k=v,...``: extra QuantConfig variants (``skip`` takes ``|``-separated
  node names or op types, e.g. ``skip=/classifier/classifier.1/Gemm``; the accuracy
  fallback's ``eval_data``: unset = the calibration crops, ``eval`` = the evaluation photos
  themselves (in-sample), ``other_scenes`` = only the 16 crops of scenes that are not
  evaluation photos);
* ``ORT int8 static``: ``onnxruntime.quantization.quantize_static`` QDQ, per_channel=True,
  uint8 activations, int8 weights, MinMax, the same calibration data, run by ORT;
* MiniLM also ``ORT int8 dynamic``: ``quantize_dynamic`` (int8 weights, per-channel).

Image metrics over the 14 evaluation photos: top-1 agreement with float (count),
top-5 overlap (mean |top5_float ∩ top5_int8| / 5), logit SQNR in dB
(10·log10(Σref² / Σerr²) over all logits), mean per-photo logit cosine, and the int8
layers with their share of the model's multiply-accumulates.
MiniLM: sentence embedding = attention-mask mean pool of ``last_hidden_state``;
mean (and min) cosine vs the float embedding over the 24 evaluation sentences;
nearest neighbour (cosine, excluding itself) agreement with float and whether the
full similarity ranking of every sentence is identical; hidden-state SQNR.

Writes ``benchmarks/results/real_models.md`` (+ ``.json``) and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "benchmarks" / "models"
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {
    "mobilenet_v2": {"kind": "image", "onnx": "mobilenet_v2.onnx",
                     "eval": "photos_eval.npz", "calib": "photos_calib.npz"},
    "efficientnet_lite0": {"kind": "image", "onnx": "efficientnet_lite0.onnx",
                           "eval": "photos_eval_lite.npz", "calib": "photos_calib_lite.npz"},
    "minilm": {"kind": "text", "onnx": "minilm.onnx", "data": "sentences.npz"},
}
TARGETS = {"image": {"top1_all": True, "sqnr_db": 25.0},
           "text": {"mean_cosine": 0.99, "same_nn": True}}


# --------------------------------------------------------------------------- data
def load_data(name, models_dir=MODELS_DIR):
    """(eval feeds, calib feeds, extra): lists of {input: array[1, ...]} dicts."""
    info = MODELS[name]
    if info["kind"] == "image":
        ev = np.load(models_dir / info["eval"])
        ca = np.load(models_dir / info["calib"])
        x, c = ev["input"], ca["input"]
        return ([{"input": x[i:i + 1]} for i in range(len(x))],
                [{"input": c[i:i + 1]} for i in range(len(c))],
                {"names": [str(n) for n in ev["names"]],
                 "calib_names": [str(n) for n in ca["names"]]})
    d = np.load(models_dir / info["data"])

    def feeds(split):
        ids, mask = d[f"{split}_input_ids"], d[f"{split}_attention_mask"]
        return [{"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}
                for i in range(len(ids))]

    return feeds("eval"), feeds("calib"), {"mask": d["eval_attention_mask"],
                                          "sentences": [str(s) for s in d["eval_sentences"]]}


def other_scene_crops(calib_feeds, calib_names, eval_names):
    """The calibration crops taken from photos that are NOT evaluation photos (16 of 44:
    8 other scenes and their mirrors). The other 28 crops are different crops of the 14
    evaluation scenes (resized to 288, a corner crop, one of them mirrored): no tensor
    equals an evaluation photo, but the scenes are the same."""
    scene = [n.split("@")[0].split(":")[0] for n in calib_names]
    return [f for f, s in zip(calib_feeds, scene) if s not in set(eval_names)]


def mac_counts(onnx_model):
    """{Conv/Gemm/MatMul node name: multiply-accumulates per sample} from ONNX shape
    inference (how the int8 share of the compute is stated); a path or a ModelProto."""
    import onnx
    from onnx import shape_inference

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    model = shape_inference.infer_shapes(onnx_model)
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.output) + list(g.input)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    macs = {}
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        w = shapes.get(node.input[1])
        if not out or not w:
            continue
        per_out = int(np.prod(w[1:])) if node.op_type == "Conv" else (
            w[1] if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in
                                                  node.attribute) else w[0])
        macs[node.name] = int(np.prod([d for d in out[1:] if d])) * per_out
    return macs


def batched(feeds, size):
    """Concatenate single-sample feeds into batches of ``size`` (calibration)."""
    out = []
    for i in range(0, len(feeds), size):
        chunk = feeds[i:i + size]
        out.append({k: np.concatenate([f[k] for f in chunk]) for k in chunk[0]})
    return out


# --------------------------------------------------------------------------- runners
def ort_run(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def tvm_run(mod, spec, feeds, input_names):
    import tvm
    from tvm import relax

    from qcompile.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, spec), tvm.cpu())
    outs = []
    for f in feeds:
        o = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(f[n])) for n in input_names])
        if not hasattr(o, "numpy"):
            o = o[0]
        outs.append(o.numpy())
    return np.concatenate(outs)


class _Reader:
    def __init__(self, feeds):
        self.items = iter(feeds)

    def get_next(self):
        return next(self.items, None)


def ort_quantize_static(src, dst, calib_feeds, op_types=None):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib_feeds)
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=False, op_types_to_quantize=op_types)


def ort_quantize_dynamic(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


# --------------------------------------------------------------------------- metrics
def image_metrics(ref, out):
    ref = ref.reshape(len(ref), -1).astype(np.float64)
    out = out.reshape(len(out), -1).astype(np.float64)
    err = out - ref
    sqnr = 10 * np.log10((ref ** 2).sum() / max((err ** 2).sum(), 1e-300))
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    t5r = np.argsort(-ref, 1)[:, :5]
    t5o = np.argsort(-out, 1)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5r, t5o)])
    agree = ref.argmax(1) == out.argmax(1)
    return {"top1_agree": int(agree.sum()), "n": int(len(ref)),
            "top5_overlap": float(overlap), "sqnr_db": float(sqnr),
            "cosine": float(cos.mean()), "float_top1": ref.argmax(1).tolist(),
            "int8_top1": out.argmax(1).tolist(),
            # float softmax probability of its top-1 and top-2 class (how close a call it is)
            "float_p12": [[round(float(a), 3), round(float(b), 3)] for a, b in
                          np.sort(_softmax(ref), 1)[:, ::-1][:, :2]]}


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def embed(hidden, mask):
    m = mask[..., None].astype(np.float64)
    e = (hidden.astype(np.float64) * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def text_metrics(ref, out, mask):
    er, eo = embed(ref, mask), embed(out, mask)
    cos = (er * eo).sum(1)

    def ranking(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, 1)[:, :-1]

    rr, ro = ranking(er), ranking(eo)
    err = (out - ref).astype(np.float64)
    keep = mask.astype(bool)
    sqnr = 10 * np.log10((ref[keep].astype(np.float64) ** 2).sum() / max((err[keep] ** 2).sum(),
                                                                           1e-300))
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agree": int((rr[:, 0] == ro[:, 0]).sum()),
            "rank_identical": int((rr == ro).all(1).sum()),
            "top3_identical": int((rr[:, :3] == ro[:, :3]).all(1).sum()),
            "n": int(len(ref)), "sqnr_db": float(sqnr)}


def metrics(kind, ref, out, extra):
    return image_metrics(ref, out) if kind == "image" else text_metrics(ref, out, extra["mask"])


def passes(kind, m):
    if m is None:
        return False
    if kind == "image":
        return m["top1_agree"] == m["n"] and m["sqnr_db"] >= TARGETS["image"]["sqnr_db"]
    return m["mean_cosine"] >= TARGETS["text"]["mean_cosine"] and m["nn_agree"] == m["n"]


# --------------------------------------------------------------------------- qcompile int8
def parse_config(text):
    """'LABEL:key=value,key=value' -> (label, kwargs) for QuantConfig."""
    label, _, body = text.partition(":")
    kwargs = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key == "skip":
            kwargs[key] = tuple(v for v in value.split("|") if v)
        elif key == "ops":
            kwargs[key] = tuple(value.split("|"))
        elif value in ("True", "False", "None"):
            kwargs[key] = {"True": True, "False": False, "None": None}[value]
        else:
            try:
                kwargs[key] = float(value) if "." in value else int(value)
            except ValueError:
                kwargs[key] = value
    return label, kwargs


def qcompile_int8(imported, spec, calib_feeds, eval_feeds, kwargs, calib_batch=4, extra=None):
    from qcompile.quantize import QuantConfig, quantize_model

    kwargs = dict(kwargs)
    if kwargs.get("eval_data") == "eval":
        # the accuracy fallback measured on the evaluation photos/sentences themselves
        # (what the done-when target is judged on: an in-sample choice, stated as such)
        kwargs["eval_data"] = batched(eval_feeds, calib_batch)
    elif kwargs.get("eval_data") == "other_scenes":
        # held out in the strict sense: only the calibration crops of scenes that are not
        # evaluation photos (eval_data unset = all calibration crops)
        kwargs["eval_data"] = batched(other_scene_crops(
            calib_feeds, extra["calib_names"], extra["names"]), calib_batch)
    config = QuantConfig(progress=False, **kwargs)
    t0 = time.perf_counter()
    result = quantize_model(imported, batched(calib_feeds, calib_batch), config, spec)
    qtime = time.perf_counter() - t0
    out = tvm_run(result.mod, spec, eval_feeds, [i.name for i in imported.inputs])
    s = result.summary
    layers = [l for l in s["layers"]]
    worst = sorted((l for l in layers if isinstance(l.get("sqnr_db"), (int, float))),
                   key=lambda l: l["sqnr_db"])[:5]
    info = {"quantize_s": qtime, "int8_layers": len(s["int8_layers"]),
            "layers": len(layers), "bits": s["weights"]["bits"],
            "reduce_range": s["weights"]["reduce_range"],
            "float_layers": [(l["name"], l.get("op"), l.get("reason")) for l in layers
                             if not l["int8"]],
            "worst_layers": [(l["name"], round(l["sqnr_db"], 1)) for l in worst],
            "layer_sqnr": {l["name"]: l.get("sqnr_db") for l in layers if l["int8"]},
            "calib_output_sqnr_db": s.get("output_sqnr_db")}
    macs = mac_counts(imported.onnx_model) if getattr(imported, "onnx_model", None) else None
    if macs:
        int8 = sum(macs.get(l["name"], 0) for l in layers if l["int8"])
        info["int8_mac_share"] = int8 / max(sum(macs.get(l["name"], 0) for l in layers), 1)
    fb = s.get("fallback")
    if fb and "steps" in fb:
        info["fallback"] = {k: fb[k] for k in (
            "metric", "search", "sensitivity_measure", "float_metric", "all_int8_metric",
            "all_int8_output_sqnr_db",
            "final_metric", "final_output_sqnr_db", "within_budget", "float_layers", "steps",
            "latency")}
        info["fallback"]["builds"] = len(fb["steps"]) + (
            len(fb["sensitivity"]) if fb.get("sensitivity_measure") != "local" else 0)
    return out, info


# --------------------------------------------------------------------------- check (tests)
# The QuantConfig each model is held to in tests/test_real_models.py (the variant measured
# in benchmarks/results/real_models.md, "Held-out fallback").
# Float layers chosen by the accuracy fallback itself (not by hand) on data the done-when is
# NOT judged on, 2026-11-22 13:27 UTC: the search's evaluation data are the 44 calibration
# crops (eval_data unset = the calibration data; no crop tensor equals an evaluation photo,
# though 28 of them are other crops of the same 14 scenes), target on the crops: top-1
# agreement with float on all 44 and logit SQNR >= 26 dB (1 dB above the done-when's 25 dB,
# chosen before measuring, as a margin for the move to other images); layers ranked by their
# own output SQNR on calibration inputs (sensitivity=local), shortest passing prefix of that
# ranking found by bisection. Then measured once on the 14 evaluation photos. Listed in the
# order the search moved them (most sensitive first). The earlier in-sample choice (target
# measured on the 14 evaluation photos themselves, 25 dB) was the first 19 (MobileNetV2) /
# 32 (EfficientNet-Lite0) layers of the same ranking.
MNV2_FALLBACK_FLOAT = (
    "/features/features.16/conv/conv.0/conv.0.0/Conv",
    "/features/features.15/conv/conv.0/conv.0.0/Conv",
    "/features/features.13/conv/conv.2/Conv",
    "/features/features.16/conv/conv.2/Conv",
    "/features/features.10/conv/conv.2/Conv",
    "/features/features.15/conv/conv.2/Conv",
    "/features/features.17/conv/conv.0/conv.0.0/Conv",
    "/features/features.2/conv/conv.0/conv.0.0/Conv",
    "/features/features.12/conv/conv.2/Conv",
    "/features/features.12/conv/conv.0/conv.0.0/Conv",
    "/features/features.14/conv/conv.0/conv.0.0/Conv",
    "/features/features.3/conv/conv.0/conv.0.0/Conv",
    "/features/features.13/conv/conv.0/conv.0.0/Conv",
    "/features/features.14/conv/conv.2/Conv",
    "/features/features.4/conv/conv.0/conv.0.0/Conv",
    "/features/features.7/conv/conv.0/conv.0.0/Conv",
    "/features/features.5/conv/conv.0/conv.0.0/Conv",
    "/features/features.6/conv/conv.0/conv.0.0/Conv",
    "/features/features.6/conv/conv.2/Conv",
    "/features/features.18/features.18.0/Conv",
    "/features/features.3/conv/conv.2/Conv",
    "/features/features.11/conv/conv.0/conv.0.0/Conv",
    "/features/features.8/conv/conv.0/conv.0.0/Conv",
    "/features/features.10/conv/conv.0/conv.0.0/Conv",
    "/features/features.9/conv/conv.0/conv.0.0/Conv",
    "/features/features.1/conv/conv.0/conv.0.0/Conv",
)
LITE_FALLBACK_FLOAT = (
    "/_blocks.3/_expand_conv/Conv",
    "/_blocks.12/_expand_conv/Conv",
    "/_blocks.2/_expand_conv/Conv",
    "/_blocks.0/_depthwise_conv/Conv",
    "/_blocks.13/_expand_conv/Conv",
    "/_blocks.4/_expand_conv/Conv",
    "/_blocks.14/_expand_conv/Conv",
    "/_blocks.9/_expand_conv/Conv",
    "/_blocks.5/_expand_conv/Conv",
    "/_blocks.1/_expand_conv/Conv",
    "/_blocks.15/_expand_conv/Conv",
    "/_blocks.11/_expand_conv/Conv",
    "/_blocks.6/_expand_conv/Conv",
    "/_blocks.10/_expand_conv/Conv",
    "/_blocks.7/_expand_conv/Conv",
    "/_blocks.8/_expand_conv/Conv",
    "/_conv_head/Conv",
    "/_blocks.1/_depthwise_conv/Conv",
    "/_fc/Gemm",
    "/_blocks.7/_project_conv/Conv",
    "/_blocks.6/_project_conv/Conv",
    "/_blocks.13/_project_conv/Conv",
    "/_blocks.4/_project_conv/Conv",
    "/_blocks.7/_depthwise_conv/Conv",
    "/_blocks.6/_depthwise_conv/Conv",
    "/_blocks.4/_depthwise_conv/Conv",
    "/_blocks.12/_project_conv/Conv",
    "/_blocks.9/_project_conv/Conv",
    "/_blocks.14/_project_conv/Conv",
    "/_blocks.2/_depthwise_conv/Conv",
    "/_blocks.10/_depthwise_conv/Conv",
    "/_blocks.1/_project_conv/Conv",
    "/_blocks.9/_depthwise_conv/Conv",
    "/_blocks.2/_project_conv/Conv",
    "/_blocks.10/_project_conv/Conv",
    "/_blocks.8/_depthwise_conv/Conv",
    "/_blocks.13/_depthwise_conv/Conv",
    "/_blocks.14/_depthwise_conv/Conv",
    "/_blocks.12/_depthwise_conv/Conv",
    "/_blocks.11/_project_conv/Conv",
    "/_blocks.5/_project_conv/Conv",
)

# The fallback search that found them, as QuantConfig keywords (with BEST_CONFIG's method /
# equalize; no eval_data: the search measures on the calibration crops).
FALLBACK_SEARCH = {"sqnr": False, "max_accuracy_drop": 0.0, "min_output_sqnr": 26.0,
                   "fallback_search": "bisect", "sensitivity": "local"}
BEST_CONFIG = {
    # On the 14 evaluation photos: 14/14 top-1, 26.8 dB with 27 of 53 layers int8 (28.5 % of
    # the MACs). The 26 float layers: all 16 expansion 1x1 convs, 8 of the 17 projection 1x1
    # convs, the last 1x1 conv (features.18) and the first block's depthwise conv; the other
    # 16 depthwise convs, the first conv and the classifier stay int8. On the crops: all
    # int8 93.2 % / 21.0 dB, 25 float 97.7 % (one crop flips), 26 float 100 % / 28.1 dB.
    # All 53 int8 on the photos: 14/14, 21.4 dB.
    "mobilenet_v2": {"method": "percentile", "sqnr": False, "equalize": "activations",
                     "skip": MNV2_FALLBACK_FLOAT},
    # On the 14 evaluation photos: 14/14 top-1, 33.6 dB with only 9 of 50 layers int8 (14 % of
    # the MACs: the stem conv, 4 depthwise and 4 1x1 convs). SQNR is met early (all 50
    # int8: 23.2 dB on the crops, 24.3 dB on the photos; 25 float: 31.9 dB on the crops),
    # but near-tie crops and photos keep flipping top-1 until most layers are float.
    "efficientnet_lite0": {"method": "mse", "sqnr": False, "skip": LITE_FALLBACK_FLOAT},
    # the default (minmax): mean cosine 0.9937, 24/24 nearest neighbours
    "minilm": {},
}

FALLBACK_METHOD = {name: {k: v for k, v in cfg.items() if k != "skip"}
                   for name, cfg in BEST_CONFIG.items() if "skip" in cfg}


def check(name, kwargs=None, target="host", models_dir=MODELS_DIR):
    """qcompile int8 (``kwargs`` for QuantConfig; default BEST_CONFIG) vs the fp32
    model in ONNX Runtime: (metrics, meets-the-done-when-target, quantize info)."""
    from qcompile.frontend import import_onnx
    from qcompile.target import get_target

    os.environ.setdefault("QCOMPILE_NO_PROGRESS", "1")
    info = MODELS[name]
    path = models_dir / info["onnx"]
    eval_feeds, calib_feeds, extra = load_data(name, models_dir)
    ref = ort_run(path, eval_feeds)
    spec = get_target(target)
    imported = import_onnx(str(path))
    kw = BEST_CONFIG[name] if kwargs is None else kwargs
    out, meta = qcompile_int8(imported, spec, calib_feeds, eval_feeds, kw, extra=extra)
    m = metrics(info["kind"], ref, out, extra)
    return m, passes(info["kind"], m), meta


# --------------------------------------------------------------------------- main
def evaluate_model(name, spec, methods, configs, tmp, log=print, models_dir=MODELS_DIR,
                   ort_rows=True):
    from qcompile.frontend import import_onnx

    info = MODELS[name]
    kind = info["kind"]
    path = models_dir / info["onnx"]
    eval_feeds, calib_feeds, extra = load_data(name, models_dir)
    rows = []

    def add(label, fn, note=""):
        t0 = time.perf_counter()
        try:
            out, meta = fn()
            m = metrics(kind, ref, out, extra)
            err = None
        except Exception as exc:  # report the failure, keep going
            m, meta = None, {}
            err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            log(f"  {label}: FAILED {err}")
            log(traceback.format_exc(limit=6))
        rows.append({"label": label, "metrics": m, "meta": meta, "error": err, "note": note,
                     "seconds": time.perf_counter() - t0, "passes": passes(kind, m)})
        if m is not None:
            log(f"  {label}: {format_metrics(kind, m)}  ({rows[-1]['seconds']:.0f} s)")

    log(f"\n== {name} ({len(eval_feeds)} eval, {len(calib_feeds)} calibration samples)")
    ref = ort_run(path, eval_feeds)
    try:
        imported = import_onnx(str(path))
        names = [i.name for i in imported.inputs]
    except Exception as exc:  # the qcompile rows all fail with the import error
        log(f"  import failed: {exc}")
        imported = names = None
        import_error = exc

    def float_run():
        if imported is None:
            raise import_error
        return tvm_run(imported.mod, spec, eval_feeds, names), {}

    def int8_run(kw):
        if imported is None:
            raise import_error
        return qcompile_int8(imported, spec, calib_feeds, eval_feeds, kw, extra=extra)

    add("qcompile float", float_run)
    variants = [(f"qcompile int8, {m}", {"method": m}, False) for m in methods] + \
        [(label, kw, True) for label, kw in configs]
    for label, kwargs, show in variants:
        add(label, lambda kw=kwargs: int8_run(kw),
            note=", ".join(f"{k}={v}" for k, v in kwargs.items()) if show else "")
    if ort_rows:
        qpath = Path(tmp) / f"{name}_ort_static.onnx"

        def ort_static():
            t0 = time.perf_counter()
            ort_quantize_static(path, qpath, calib_feeds)
            return ort_run(qpath, eval_feeds), {"quantize_s": time.perf_counter() - t0}

        add("ORT int8 static (QDQ, per-channel, MinMax)", ort_static)
        if kind == "text":
            mpath = Path(tmp) / f"{name}_ort_static_matmul.onnx"

            def ort_static_matmul():
                t0 = time.perf_counter()
                ort_quantize_static(path, mpath, calib_feeds, op_types=["MatMul"])
                return ort_run(mpath, eval_feeds), {"quantize_s": time.perf_counter() - t0}

            add("ORT int8 static, MatMul only (QDQ, per-channel, MinMax)", ort_static_matmul)
            dpath = Path(tmp) / f"{name}_ort_dynamic.onnx"

            def ort_dynamic():
                t0 = time.perf_counter()
                ort_quantize_dynamic(path, dpath)
                return ort_run(dpath, eval_feeds), {"quantize_s": time.perf_counter() - t0}

            add("ORT int8 dynamic (per-channel)", ort_dynamic)
    return {"model": name, "kind": kind, "rows": rows,
            "n_eval": len(eval_feeds), "n_calib": len(calib_feeds), **(
                {"photos": extra["names"]} if kind == "image" else {})}


def format_metrics(kind, m):
    if kind == "image":
        return (f"top-1 {m['top1_agree']}/{m['n']}, top-5 overlap {100 * m['top5_overlap']:.0f}%, "
                f"SQNR {m['sqnr_db']:.1f} dB, cosine {m['cosine']:.4f}")
    return (f"mean cos {m['mean_cosine']:.4f} (min {m['min_cosine']:.4f}), NN {m['nn_agree']}/"
            f"{m['n']}, top-3 {m['top3_identical']}/{m['n']}, SQNR {m['sqnr_db']:.1f} dB")


def markdown(results, command, spec_name, started):
    lines = [f"# Real models: float vs qcompile int8 vs ONNX Runtime int8", "",
             f"Command: `{command}`  ",
             f"Date: {started:%Y-%m-%d %H:%M} UTC, target `{spec_name}`, 1 thread, "
             f"models and data from `benchmarks/prepare_models.py`.", "",
             "Reference = the exported fp32 ONNX model run by ONNX Runtime. Done-when targets: "
             "CNNs top-1 agreement on every photo and logit SQNR ≥ 25 dB; MiniLM mean "
             "embedding cosine ≥ 0.99 and the same nearest neighbours.", ""]
    for r in results:
        if r["kind"] == "image":
            lines += [f"## {r['model']} ({r['n_eval']} photos, {r['n_calib']} calibration crops)",
                      "", "| variant | top-1 agree | top-5 overlap | logit SQNR (dB) | cosine | "
                      "int8 layers | quantize (s) | meets target |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        else:
            lines += [f"## {r['model']} ({r['n_eval']} eval sentences, {r['n_calib']} "
                      "calibration sentences, [1, 32] tokens)", "",
                      "| variant | mean cosine | min cosine | same NN | same top-3 neighbours | "
                      "hidden SQNR (dB) | int8 layers | quantize (s) | meets target |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["rows"]:
            m, meta = row["metrics"], row["meta"]
            layers = f"{meta['int8_layers']}/{meta['layers']}" if "int8_layers" in meta else ""
            if "int8_mac_share" in meta:
                layers += f" ({100 * meta['int8_mac_share']:.0f} % of MACs)"
            qs = f"{meta['quantize_s']:.0f}" if "quantize_s" in meta else ""
            ok = "yes" if row["passes"] else "no"
            label = row["label"] + (f" ({row['note']})" if row["note"] else "")
            if m is None:
                cols = 5 if r["kind"] == "image" else 6
                lines.append(f"| {label} | FAILED: {row['error']} |" + " |" * (cols - 1)
                             + f" {layers} | {qs} | no |")
            elif r["kind"] == "image":
                lines.append(f"| {label} | {m['top1_agree']}/{m['n']} | "
                             f"{100 * m['top5_overlap']:.0f}% | {m['sqnr_db']:.1f} | "
                             f"{m['cosine']:.4f} | {layers} | {qs} | {ok} |")
            else:
                lines.append(f"| {label} | {m['mean_cosine']:.4f} | {m['min_cosine']:.4f} | "
                             f"{m['nn_agree']}/{m['n']} | {m['top3_identical']}/{m['n']} | "
                             f"{m['sqnr_db']:.1f} | {layers} | {qs} | {ok} |")
        lines.append("")
        for row in r["rows"]:
            meta = row["meta"]
            if meta.get("worst_layers"):
                lines.append(f"- {row['label']}: lowest per-layer SQNR (calibration data): "
                             + ", ".join(f"`{n}` {v} dB" for n, v in meta["worst_layers"][:3]))
            if meta.get("fallback"):
                fb = meta["fallback"]
                lat = fb.get("latency", {})
                lines.append(
                    f"- {row['label']}: fallback ({fb['search']}, {fb['builds']} builds, "
                    f"measured on {fb['metric']}): all-int8 top-1 {fb['all_int8_metric']:.1f}% "
                    f"/ {fb['all_int8_output_sqnr_db']:.1f} dB -> {fb['final_metric']:.1f}% / "
                    f"{fb['final_output_sqnr_db']:.1f} dB with {len(fb['float_layers'])} "
                    f"layer(s) float, target met: {fb['within_budget']}; probes (float layers: "
                    f"top-1 %, dB): " + ", ".join(
                        f"{st['float_layers']}: {st['metric']:.0f}, {st['output_sqnr_db']:.1f}"
                        for st in fb["steps"])
                    + (f"; latency all-int8 {lat['all_int8_ms']:.2f} ms -> {lat['final_ms']:.2f}"
                       " ms (fallback's own timing, 1 thread, busy machine)"
                       if "final_ms" in lat else ""))
            if meta.get("float_layers"):
                fl = meta["float_layers"]
                lines.append(f"- {row['label']}: {len(fl)} layer(s) left float: "
                             + ", ".join(f"`{n}` ({op}: {why})" for n, op, why in fl[:6])
                             + (" …" if len(fl) > 6 else ""))
        if r["kind"] == "image":
            float_row = r["rows"][0]["metrics"]
            if float_row:
                lines.append(f"- float top-1 classes per photo ({', '.join(r['photos'])}): "
                             f"{float_row['float_top1']}")
            for row in r["rows"][1:]:
                m = row["metrics"]
                if m and m["top1_agree"] < m["n"]:
                    diff = [f"{p} {a}→{b} (float p {q[0]} vs {q[1]})" for p, a, b, q in
                            zip(r["photos"], m["float_top1"], m["int8_top1"],
                                m.get("float_p12", [[None, None]] * m["n"])) if a != b]
                    lines.append(f"- {row['label']}: top-1 changed on " + "; ".join(diff))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["minmax", "percentile", "entropy", "mse"])
    parser.add_argument("--config", action="append", default=[],
                        help="extra variant LABEL:key=value,... (QuantConfig fields)")
    parser.add_argument("--target", default="host")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "real_models.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("QCOMPILE_NO_PROGRESS", "1")
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    started = datetime.datetime.now(datetime.timezone.utc)
    command = ".venv/bin/python benchmarks/real_models.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from qcompile.target import get_target

    missing = [MODELS[m]["onnx"] for m in args.models if not (MODELS_DIR / MODELS[m]["onnx"]).exists()]
    if missing:
        print(f"missing {missing} in {MODELS_DIR}: run /work/torchenv/bin/python "
              "benchmarks/prepare_models.py first", file=sys.stderr)
        return 2
    spec = get_target(args.target)
    configs = [parse_config(c) for c in args.config]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results.append(evaluate_model(name, spec, args.methods, configs, tmp,
                                          log=lambda s: print(s, flush=True),
                                          ort_rows=not args.no_ort))
    text = markdown(results, command, spec.name, started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "date": started.isoformat(), "target": spec.name,
         "results": results}, indent=1, default=str))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
