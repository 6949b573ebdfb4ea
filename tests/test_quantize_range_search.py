"""Output-aware activation ranges (quantize/range_search.py) and the SQNR-targeted
accuracy fallback (quantize/sensitivity.py: min_output_sqnr, bisect search)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qcompile.frontend import import_onnx
from qcompile.quantize import QuantConfig, load_calibration, quantize_model
from qcompile.quantize.gptq import conv_gram
from qcompile.quantize.range_search import _Consumer, _conv_rows, output_aware_ranges
from qcompile.target import get_target

SPEC = get_target("x86_64-avx512-vnni")


def _attrs(groups=1, strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1)):
    return SimpleNamespace(groups=groups, strides=strides, padding=padding, dilation=dilation)


@pytest.mark.parametrize("groups,strides,padding,dilation", [
    (1, (1, 1), (1, 1, 1, 1), (1, 1)),
    (4, (2, 2), (0, 1, 1, 0), (1, 1)),      # grouped, strided, asymmetric padding
    (8, (1, 1), (2, 2, 2, 2), (2, 2)),      # depthwise, dilated
])
def test_conv_rows_are_the_im2col_rows(groups, strides, padding, dilation):
    # every output position sampled: the rows' Gram must equal gptq's im2col Gram
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(2, 8, 9, 7)).astype(np.float32)]
    shape = (8, 8 // groups, 3, 3)
    attrs = _attrs(groups, strides, padding, dilation)
    rows = _conv_rows(samples, shape, attrs, rows=10 ** 6, rng=rng)
    gram = np.matmul(rows.transpose(1, 2, 0).astype(np.float64),
                     rows.transpose(1, 0, 2).astype(np.float64))
    np.testing.assert_allclose(gram, conv_gram(samples, shape, attrs), rtol=1e-5, atol=1e-4)


def _matmul_layer(weight, var="x"):
    return SimpleNamespace(kind="matmul", weight=weight, input_var=var, root=var,
                           name=f"mm_{var}", quantize=True)


def _plan(*layers):
    return SimpleNamespace(quantized=lambda: list(layers))


def _outlier_input(rng):
    """[4096, 16] ReLU-like activations, channel 0 with rare outliers up to ~40."""
    x = np.abs(rng.normal(size=(4096, 16))).astype(np.float32)
    x[:, 0] *= 0.5
    x[rng.choice(4096, 8, replace=False), 0] = 40.0
    return x


def test_outlier_channel_the_weights_ignore_is_clipped():
    rng = np.random.default_rng(1)
    x = _outlier_input(rng)
    weight = rng.normal(size=(16, 32)).astype(np.float32)
    weight[0] *= 1e-3  # the consuming layer barely reads the outlier channel
    bounds = {"x": (0.0, float(x.max()))}
    ranges, report = output_aware_ranges(_plan(_matmul_layer(weight)), {"x": [x]},
                                         {"x": bounds["x"]}, bounds, "uint8")
    assert ranges["x"][1] < 0.5 * x.max()   # clips the outliers: finer steps for the rest
    assert report["x"]["error"] < 0.5 * report["x"]["observer_error"]


def test_outlier_channel_the_weights_need_is_kept():
    rng = np.random.default_rng(1)
    x = _outlier_input(rng)
    weight = rng.normal(size=(16, 32)).astype(np.float32) * 0.05
    weight[0] = 5.0  # every output depends mostly on the outlier channel
    bounds = {"x": (0.0, float(x.max()))}
    ranges, _ = output_aware_ranges(_plan(_matmul_layer(weight)), {"x": [x]},
                                    {"x": bounds["x"]}, bounds, "uint8")
    assert ranges["x"][1] > 0.9 * x.max()


def test_chosen_range_is_never_worse_than_the_observers_and_others_kept():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    layer = _matmul_layer(rng.normal(size=(8, 4)).astype(np.float32))
    observer = (-1.0, 1.0)
    bounds = {"x": (float(x.min()), float(x.max())), "other": (0.0, 3.0)}
    ranges, report = output_aware_ranges(_plan(layer), {"x": [x]},
                                         {"x": observer, "other": (0.0, 2.0)}, bounds, "uint8")
    assert report["x"]["error"] <= report["x"]["observer_error"]
    assert ranges["other"] == (0.0, 2.0)  # no sampled consumer: the observer's range
    consumer = _Consumer(layer, [x], 4096, np.random.default_rng(0))
    from qcompile.quantize.realize import act_qparams

    assert consumer.error(act_qparams(*ranges["x"], "uint8")) == \
        pytest.approx(report["x"]["error"])


@pytest.fixture(scope="module")
def bundled(bundled_model):
    return import_onnx(bundled_model)


def test_act_range_output_end_to_end(bundled, bundled_calib_data):
    calib = load_calibration(bundled_calib_data, bundled.inputs, limit=64)
    results = {mode: quantize_model(bundled, calib, QuantConfig(act_range=mode, progress=False),
                                    SPEC) for mode in ("observer", "output")}
    out = results["output"].summary
    assert out["act_range"] == "output"
    searched = [t for t in out["tensors"].values() if "observer_range" in t]
    assert len(searched) == len(out["int8_layers"])  # one root per layer in this CNN
    # the ranges really changed somewhere, and the model is still accurate
    assert any(t["range"] != t["observer_range"] for t in searched)
    assert out["output_sqnr_db"] > 30.0
    assert out["output_sqnr_db"] > results["observer"].summary["output_sqnr_db"] - 3.0


def test_bad_act_range_and_fallback_search_are_input_errors():
    from qcompile.errors import InputError

    with pytest.raises(InputError, match="activation range"):
        QuantConfig(act_range="tensor").validate()
    with pytest.raises(InputError, match="fallback search"):
        QuantConfig(fallback_search="random").validate()


@pytest.mark.parametrize("search", ["greedy", "bisect"])
def test_fallback_reaches_an_output_sqnr_target(bundled, bundled_calib_data, search):
    # a deliberately bad calibration (75th percentile clips hard) misses 25 dB
    calib = load_calibration(bundled_calib_data, bundled.inputs, limit=64)
    config = QuantConfig(method="percentile", percentile=75.0, min_output_sqnr=25.0,
                         fallback_search=search, sqnr=False, progress=False)
    result = quantize_model(bundled, calib, config, SPEC)
    fb = result.summary["fallback"]
    assert fb["all_int8_output_sqnr_db"] < 25.0  # it really missed the target
    assert fb["within_budget"] and fb["final_output_sqnr_db"] >= 25.0
    assert fb["max_accuracy_drop"] is None and fb["min_output_sqnr_db"] == 25.0
    order = [s["layer"] for s in fb["sensitivity"]]
    # the float layers are the most sensitive ones, a prefix of the ranking
    assert fb["float_layers"] == order[:len(fb["float_layers"])]
    assert set(result.summary["float_layers"]) == set(fb["float_layers"])
    last = fb["steps"][-1]
    assert last["float_layers"] == len(fb["float_layers"]) and last["meets"]
    if search == "bisect" and len(fb["float_layers"]) > 1:
        # one float layer fewer misses the target (the prefix is the shortest)
        fewer = [s for s in fb["steps"] if s["float_layers"] == len(fb["float_layers"]) - 1]
        assert fewer and not fewer[0]["meets"]
    int8_ops = result.mod.script(show_meta=False).count('out_dtype="int32"')
    assert int8_ops == len(result.summary["int8_layers"])


def test_local_sensitivity_ranks_the_damaged_layer_first(bundled, bundled_calib_data):
    # the bundled CNN with bad (75th percentile) ranges: the local ranking needs no
    # builds, and the fallback driven by it still meets the SQNR target
    calib = load_calibration(bundled_calib_data, bundled.inputs, limit=64)
    config = QuantConfig(method="percentile", percentile=75.0, min_output_sqnr=25.0,
                         fallback_search="bisect", sensitivity="local", sqnr=False,
                         progress=False)
    result = quantize_model(bundled, calib, config, SPEC)
    fb = result.summary["fallback"]
    assert fb["sensitivity_measure"] == "local"
    sens = [s["isolated_output_sqnr_db"] for s in fb["sensitivity"]]
    assert len(sens) == 4 and sens == sorted(sens)
    assert all(np.isfinite(v) and v < 60 for v in sens)
    assert fb["within_budget"] and fb["final_output_sqnr_db"] >= 25.0
    # bisection over 4 layers: at most 3 probes (2 + the final check), no per-layer builds
    assert len(fb["steps"]) <= 3


def test_fallback_keeps_the_bias_correction(bundled, bundled_calib_data):
    # the fallback rebuilds plans from the float module; the int8 layers it keeps must
    # still get the corrected biases: its final module equals quantizing with the same
    # layers skipped from the start
    calib = load_calibration(bundled_calib_data, bundled.inputs, limit=64)
    base = dict(method="percentile", percentile=75.0, sqnr=False, progress=False)
    fell = quantize_model(bundled, calib, QuantConfig(min_output_sqnr=15.0,
                                                      fallback_search="bisect", **base), SPEC)
    floats = tuple(fell.summary["fallback"]["float_layers"])
    assert floats and len(floats) < 4
    direct = quantize_model(bundled, calib, QuantConfig(skip=floats, **base), SPEC)
    x = np.load(bundled_calib_data)["input"][64:96]
    np.testing.assert_array_equal(_predict(fell.mod, x), _predict(direct.mod, x))


def _predict(mod, x):
    import tvm
    from tvm import relax

    from qcompile.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, SPEC), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy()
                           for i in range(len(x))])


def test_cli_flags_reach_the_config():
    import argparse

    from qcompile.quantize.cli_options import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(
        ["--act-range", "output", "--min-output-sqnr", "25", "--fallback-search", "bisect",
         "--sensitivity", "local"]))
    assert (config.act_range, config.min_output_sqnr, config.fallback_search,
            config.sensitivity) == ("output", 25.0, "bisect", "local")
    default = config_from_args(parser.parse_args([]))
    assert (default.act_range, default.min_output_sqnr, default.fallback_search,
            default.sensitivity) == ("observer", None, "greedy", "isolated")
