"""End to end on the bundled Fashion-MNIST CNN, calibration data handling and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import save_model
from onnx_builders import BUILDERS, random_inputs

from qcompile.errors import InputError
from qcompile.frontend import import_onnx
from qcompile.pipeline import compile_relax
from qcompile.quantize import QuantConfig, load_calibration, quantize_model
from qcompile.target import get_target

SPEC = get_target("x86_64-avx2")


def predict(mod, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(compile_relax(mod, SPEC), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i:i + 1])).numpy()
                           for i in range(len(x))])


def ort_predict(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def bundled(bundled_model):
    return import_onnx(bundled_model)


@pytest.fixture(scope="module")
def bundled_result(bundled, bundled_calib_data):
    calib = load_calibration(bundled_calib_data, bundled.inputs)
    return quantize_model(bundled, calib, QuantConfig(progress=False), SPEC)


def test_bundled_int8_accuracy_within_0_2_points(bundled, bundled_result, bundled_test_data):
    data = np.load(bundled_test_data)
    x, labels = data["input"], data["labels"]
    float_acc = 100 * np.mean(ort_predict(bundled.onnx_model, x).argmax(1) == labels)
    int8_logits = predict(bundled_result.mod, x)
    int8_acc = 100 * np.mean(int8_logits.argmax(1) == labels)
    print(f"float {float_acc:.2f}%  qcompile int8 {int8_acc:.2f}%  (2000-image slice)")
    assert float_acc == pytest.approx(89.60, abs=0.01)
    assert int8_acc >= float_acc - 0.2


def test_bundled_summary(bundled_result):
    summary = bundled_result.summary
    json.dumps(summary)  # JSON-serializable as is
    assert summary["method"] == "mse" and summary["percentile"] is None
    assert summary["int8_layers"] == ["/0/Conv", "/4/Conv", "/9/Gemm", "/11/Gemm"]
    assert summary["float_layers"] == []
    assert summary["weights"]["bits"] == 7  # x86_64-avx2 reduces range
    assert summary["weights"]["per_channel"] is True
    first = summary["layers"][0]
    assert first["input"]["dtype"] == "uint8" and 0 < first["input"]["zero_point"] < 255
    assert len(first["weight"]["scale"]) == 16
    assert all(isinstance(l["sqnr_db"], float) and l["sqnr_db"] > 20 for l in summary["layers"])
    assert summary["output_sqnr_db"] > 25
    sizes = summary["weight_bytes"]
    assert sizes["fp32"] > 3.5 * sizes["int8"]
    assert summary["calibration"]["samples"] == 256
    assert summary["time_s"] < 30


def test_skip_keeps_layer_float(tmp_path):
    model = BUILDERS["small_cnn"](0)
    imported = import_onnx(save_model(model, tmp_path, "small_cnn"))
    calib = [random_inputs(model, seed=s, batch=1) for s in range(4)]
    result = quantize_model(imported, calib,
                            QuantConfig(skip=("dw", "Gemm"), sqnr=False, progress=False), SPEC)
    assert result.summary["float_layers"] == ["dw", "fc"]
    text = result.mod.script(show_meta=False)
    assert text.count('out_dtype="int32"') == 3


# ------------------------------------------------------------- calibration inputs
def test_load_calibration_npz_batches(bundled, bundled_calib_data):
    calib = load_calibration(bundled_calib_data, bundled.inputs, batch_size=100)
    sizes = [len(b["input"]) for b in calib]
    assert sizes == [100, 100, 56]


def test_load_calibration_npy_and_images(bundled, tmp_path):
    pil = pytest.importorskip("PIL.Image")
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    assert load_calibration(tmp_path / "calib.npy", bundled.inputs) is not None
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        pil.fromarray((np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)).save(
            images / f"{i}.png")
    calib = load_calibration(images, bundled.inputs, mean=0.2860, std=0.3530)
    batch = next(iter(calib))["input"]
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32


def test_calibration_python_iterable(bundled, bundled_calib_data):
    x = np.load(bundled_calib_data)["input"][:8]
    gen = ({"input": x[i:i + 4]} for i in range(0, 8, 4))  # one-shot generator is fine
    result = quantize_model(bundled, gen, QuantConfig(sqnr=False, progress=False), SPEC)
    assert result.summary["calibration"]["samples"] == 8


@pytest.mark.parametrize("bad, match", [
    ({"input": np.zeros((4, 3, 28, 28), np.float32)}, r"input 'input' has shape \(4, 3, 28, 28\)"),
    ({"input": np.zeros((4, 1, 28, 28), np.float64)}, "input 'input' has dtype float64"),
    ({"input": np.zeros((0, 1, 28, 28), np.float32)}, "input 'input' is empty"),
    ({"input": np.full((2, 1, 28, 28), np.nan, np.float32)}, "input 'input' contains NaN"),
    ({"image": np.zeros((2, 1, 28, 28), np.float32)}, "no array for model input 'input'"),
])
def test_bad_calibration_data_names_input(bundled, bad, match):
    with pytest.raises(InputError, match=match):
        quantize_model(bundled, [bad], QuantConfig(progress=False), SPEC)


def test_bad_calibration_file_names_file_and_input(bundled, tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, input=np.zeros((4, 28, 28), np.float32))
    with pytest.raises(InputError, match=r"wrong\.npz.*input 'input'.*\[N, 1, 28, 28\]"):
        load_calibration(path, bundled.inputs)
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "missing.npz", bundled.inputs)


def test_no_calibration_data_says_pass_calib(bundled):
    with pytest.raises(InputError, match="--calib"):
        quantize_model(bundled, None, QuantConfig(), SPEC)
    with pytest.raises(InputError, match="empty"):
        quantize_model(bundled, [], QuantConfig(), SPEC)


def test_bad_config_rejected(bundled, bundled_calib_data):
    with pytest.raises(InputError, match="calibration method"):
        quantize_model(bundled, bundled_calib_data, QuantConfig(method="magic"), SPEC)


def test_cli_options_round_trip():
    import argparse

    from qcompile.quantize.cli_options import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--calib-method", "percentile", "--percentile", "99.9",
                              "--skip", "/0/Conv", "--skip", "Gemm", "--per-tensor",
                              "--act-dtype", "int8"])
    config = config_from_args(args, SPEC)
    assert (config.method, config.percentile, config.skip, config.per_channel,
            config.act_dtype, config.reduce_range) == \
        ("percentile", 99.9, ("/0/Conv", "Gemm"), False, "int8", True)
    assert config.bias_correction is True
    config = config_from_args(parser.parse_args(["--no-reduce-range", "--no-bias-correction"]),
                              SPEC)
    assert config.reduce_range is False and config.bias_correction is False
    assert config_from_args(parser.parse_args([]), get_target("x86_64-avx512-vnni")) \
        .reduce_range is False


def test_max_accuracy_drop_falls_back_most_sensitive_layers(bundled, bundled_calib_data):
    # a deliberately bad calibration (90th percentile clips hard) forces a fallback
    config = QuantConfig(method="percentile", percentile=90.0, max_accuracy_drop=1.0,
                         calib_limit=64, sqnr=False, progress=False)
    result = quantize_model(bundled, bundled_calib_data, config, SPEC)
    fb = result.summary["fallback"]
    assert fb["all_int8_metric"] < fb["float_metric"] - 1.0  # it really was over budget
    assert fb["within_budget"] and fb["final_drop"] <= 1.0
    assert fb["float_layers"] and fb["float_layers"] == [s["float_layer"] for s in fb["steps"]]
    assert result.summary["float_layers"] == sorted(fb["float_layers"],
                                                    key=result.summary["float_layers"].index)
    assert set(result.summary["float_layers"]) == set(fb["float_layers"])
    sens = [s["isolated_output_sqnr_db"] for s in fb["sensitivity"]]
    assert sens == sorted(sens)
    assert "all_int8_ms" in fb["latency"] and "final_ms" in fb["latency"]
    int8_ops = result.mod.script(show_meta=False).count('out_dtype="int32"')
    assert int8_ops == 4 - len(fb["float_layers"])


def test_calibration_rechunked_to_static_batch(tmp_path):
    """gemm_model has a static batch of 4: 6 samples run as 4 + (2 padded to 4)."""
    model = BUILDERS["gemm"](0)
    imported = import_onnx(save_model(model, tmp_path, "gemm"))
    x = np.random.default_rng(3).normal(size=(6, 32)).astype(np.float32)
    x[5, 0] = 9.0  # the maximum sits in the padded chunk
    result = quantize_model(imported, [{"input": x}],
                            QuantConfig(method="minmax", sqnr=False, progress=False), SPEC)
    assert result.summary["calibration"]["samples"] == 6
    assert result.summary["tensors"]["input"]["range"] == pytest.approx([x.min(), 9.0])


def test_calibration_overflowing_the_float_model_is_an_input_error(tmp_path):
    model = BUILDERS["gemm"](0)
    imported = import_onnx(save_model(model, tmp_path, "gemm"))
    huge = [{"input": np.full((4, 32), 3e38, np.float32)}]  # finite, but the model overflows
    with pytest.raises(InputError, match=r"Inf or NaN at tensor .*preprocessing"):
        quantize_model(imported, huge, QuantConfig(progress=False), SPEC)
