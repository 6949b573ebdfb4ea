"""Real ImageNet / sentence models (issue 3 done-when): qcompile int8 vs float.

Runs only with ``-m slow`` and only when ``benchmarks/prepare_models.py`` has
written the models (``benchmarks/models/*.onnx``, made from packages that ship
weights; never committed). Thresholds: MobileNetV2 and EfficientNet-Lite0 agree
with float on the top-1 class of every photo with logit SQNR >= 25 dB; MiniLM mean
sentence-embedding cosine >= 0.99 with the same nearest neighbour for every
sentence. The QuantConfig used is ``benchmarks/real_models.py:BEST_CONFIG``.
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


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "minilm"])
def test_real_model_int8_matches_float(name):
    pytest.importorskip("onnxruntime")
    bench = _bench()
    info = bench.MODELS[name]
    needed = [info["onnx"]] + [info[k] for k in ("eval", "calib", "data") if k in info]
    missing = [f for f in needed if not (MODELS_DIR / f).exists()]
    if missing:
        pytest.skip(f"{missing} not in benchmarks/models: run "
                    "`/work/torchenv/bin/python benchmarks/prepare_models.py` (torch venv)")
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
