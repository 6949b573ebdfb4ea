"""Real ImageNet / sentence models (issue 3 done-when): qcompile int8 vs float.

Runs only with ``-m slow`` and only when ``benchmarks/prepare_models.py`` has
written the models (``benchmarks/models/*.onnx``, made from packages that ship
weights; never committed). Thresholds: MobileNetV2 and EfficientNet-Lite0 agree
with float on the top-1 class of every photo with logit SQNR >= 25 dB; MiniLM mean
sentence-embedding cosine >= 0.99 with the same nearest neighbour for every
sentence. The QuantConfig used is ``benchmarks/real_models.py:BEST_CONFIG``; for the CNNs
its float layers were chosen by the accuracy fallback on the calibration crops, never on
the evaluation photos, and a test re-runs that search and checks it picks them again.
Each model takes minutes on 2 cores (compile + calibrate + quantize + run).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "benchmarks" / "models"

pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("real_models",
                                                  REPO / "benchmarks" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _needs_files(bench, name):
    info = bench.MODELS[name]
    needed = [info["onnx"]] + [info[k] for k in ("eval", "calib", "data") if k in info]
    missing = [f for f in needed if not (MODELS_DIR / f).exists()]
    if missing:
        pytest.skip(f"{missing} not in benchmarks/models: run "
                    "`/work/torchenv/bin/python benchmarks/prepare_models.py` (torch venv)")
    return info


def _float_layers(bench, name):
    return {"mobilenet_v2": bench.MNV2_FALLBACK_FLOAT,
            "efficientnet_lite0": bench.LITE_FALLBACK_FLOAT}[name]


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_fallback_data_is_disjoint_from_the_evaluation_photos(name):
    """The fallback search may not see the photos the done-when is judged on: it runs on
    the calibration crops (no eval_data), none of which is an evaluation photo."""
    import numpy as np

    bench = _bench()
    _needs_files(bench, name)
    assert "eval_data" not in bench.FALLBACK_SEARCH
    assert "eval_data" not in bench.BEST_CONFIG[name]
    assert bench.BEST_CONFIG[name]["skip"] == _float_layers(bench, name)
    eval_feeds, calib_feeds, extra = bench.load_data(name, MODELS_DIR)
    photos = np.concatenate([f["input"] for f in eval_feeds]).reshape(len(eval_feeds), -1)
    crops = np.concatenate([f["input"] for f in calib_feeds]).reshape(len(calib_feeds), -1)
    closest = min(float(np.abs(photos - c).max(axis=1).min()) for c in crops)
    assert closest > 0.5, f"a calibration crop is (nearly) an evaluation photo: {closest}"
    others = bench.other_scene_crops(calib_feeds, extra["calib_names"], extra["names"])
    assert len(others) == 16 and len(calib_feeds) == 44


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_fallback_search_on_crops_picks_best_config_and_holds_on_photos(name):
    """Re-run the held-out search (FALLBACK_SEARCH on the calibration crops): it must move
    exactly the layers BEST_CONFIG keeps float, and the result must meet the done-when on
    the 14 evaluation photos it never saw."""
    pytest.importorskip("onnxruntime")
    bench = _bench()
    _needs_files(bench, name)
    m, ok, meta = bench.check(name, {**bench.FALLBACK_METHOD[name], **bench.FALLBACK_SEARCH})
    fb = meta["fallback"]
    print(name, bench.format_metrics("image", m), len(fb["float_layers"]), "float")
    assert "calibration data" in fb["metric"]
    assert fb["within_budget"]
    assert tuple(fb["float_layers"]) == _float_layers(bench, name)
    assert m["top1_agree"] == m["n"] and m["sqnr_db"] >= 25.0
    assert ok


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "minilm"])
def test_real_model_int8_matches_float(name):
    pytest.importorskip("onnxruntime")
    bench = _bench()
    info = _needs_files(bench, name)
    m, ok, meta = bench.check(name)
    print(name, bench.format_metrics(info["kind"], m), meta.get("worst_layers"))
    if info["kind"] == "image":
        photos = bench.load_data(name, MODELS_DIR)[2]["names"]
        changed = [f"{p}: float {a} (p={q[0]}, runner-up p={q[1]}) -> int8 {b}"
                   for p, a, b, q in zip(photos, m["float_top1"], m["int8_top1"], m["float_p12"])
                   if a != b]
        assert m["top1_agree"] == m["n"], f"top-1 differs from float on photos {changed}"
        assert m["sqnr_db"] >= 25.0, f"logit SQNR {m['sqnr_db']:.1f} dB < 25 dB"
    else:
        assert m["mean_cosine"] >= 0.99, f"mean embedding cosine {m['mean_cosine']:.4f} < 0.99"
        assert m["nn_agree"] == m["n"], (f"nearest neighbour differs from float for "
                                         f"{m['n'] - m['nn_agree']} of {m['n']} sentences")
    assert ok
