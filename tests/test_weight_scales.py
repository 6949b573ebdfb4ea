"""Per-channel weight scales: min-max vs MSE-searched clip ratios (realize.quantize_weight)."""

import numpy as np
import pytest

from qcompile.errors import InputError
from qcompile.quantize import QuantConfig
from qcompile.quantize.realize import quantize_weight


def _mse(weight, q, scale, axis=0):
    shape = [1] * weight.ndim
    shape[axis] = len(scale)
    return float(np.mean((q.astype(np.float64) * scale.reshape(shape) - weight) ** 2))


def _per_channel_mse(weight, q, scale):
    return ((q.astype(np.float64) * scale[:, None] - weight) ** 2).mean(axis=1)


def test_mse_scales_beat_minmax_on_heavy_tails():
    rng = np.random.default_rng(0)
    # Laplace: a long continuous tail, where a clip below max|w| pays off. At 8 bits the
    # gain is small (rounding error is already tiny): measured about 2.5 % lower MSE
    w = rng.laplace(size=(32, 4096)).astype(np.float32)
    q0, s0 = quantize_weight(w, 0, weight_scale="minmax")
    q1, s1 = quantize_weight(w, 0, weight_scale="mse")
    per0, per1 = _per_channel_mse(w, q0, s0), _per_channel_mse(w, q1, s1)
    assert np.all(per1 <= per0 + 1e-18)          # never worse on any channel
    assert _mse(w, q1, s1) < 0.99 * _mse(w, q0, s0)  # better overall
    assert np.all(s1 <= s0) and np.any(s1 < 0.99 * s0)  # by clipping the tail
    assert np.all(np.isfinite(s1)) and np.all(s1 > 0)


def test_mse_scales_do_not_clip_a_uniform_tensor_needlessly():
    rng = np.random.default_rng(1)
    w = rng.uniform(-1.0, 1.0, size=(16, 4096))
    _q0, s0 = quantize_weight(w, 0, weight_scale="minmax")
    q1, s1 = quantize_weight(w, 0, weight_scale="mse")
    # uniform weights have no tail worth clipping: the search stays near max|w|
    assert np.all(s1 >= 0.97 * s0)
    clipped = np.abs(w) > (np.abs(q1).max(axis=1, keepdims=True) + 0.5) * s1[:, None]
    assert clipped.mean() < 0.02


def test_mse_scales_handle_zero_and_tiny_channels():
    w = np.zeros((4, 3, 3, 3), np.float32)
    w[1] = 0.5
    w[2, 0, 0, 0] = -2.0
    w[3] = 1e-42  # float32 denormal
    q, s = quantize_weight(w, 0, weight_scale="mse")
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert s[0] == 1.0 and not q[0].any()        # zero channel: scale 1, all zeros
    assert np.all(q[1] == q[1].flat[0])          # constant channel stays constant
    assert abs(q[2, 0, 0, 0] * s[2] + 2.0) < 1e-6  # a lone weight is kept exactly
    assert q.dtype == np.int8 and np.abs(q).max() <= 127


def test_mse_scales_per_tensor_and_reduce_range_and_axis():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(64, 24)).astype(np.float32)  # matmul [K, N]: channel axis 1
    q, s = quantize_weight(w, 1, per_channel=True, reduce_range=True, weight_scale="mse")
    assert s.shape == (24,) and np.abs(q).max() <= 63
    q0, s0 = quantize_weight(w, 1, per_channel=True, reduce_range=True)
    assert _mse(w, q, s, axis=1) <= _mse(w, q0, s0, axis=1)
    qt, st = quantize_weight(w, 1, per_channel=False, weight_scale="mse")
    assert len(set(st.tolist())) == 1
    qt0, st0 = quantize_weight(w, 1, per_channel=False)
    assert _mse(w, qt, st, axis=1) <= _mse(w, qt0, st0, axis=1)


def test_minmax_is_unchanged_default():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 50))
    q, s = quantize_weight(w, 0)
    np.testing.assert_allclose(s, (np.abs(w).max(axis=1) / 127).astype(np.float32))
    assert np.abs(q).max() == 127


def test_bad_weight_scale_is_a_clear_error():
    with pytest.raises(InputError, match="weight scale"):
        quantize_weight(np.ones((2, 2)), 0, weight_scale="kl")
    with pytest.raises(InputError, match="weight scale"):
        QuantConfig(weight_scale="kl").validate()


def test_cli_flag_reaches_the_config():
    import argparse

    from qcompile.quantize.cli_options import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--weight-scale", "mse"])).weight_scale == "mse"
    assert config_from_args(parser.parse_args([])).weight_scale == QuantConfig().weight_scale
    args = parser.parse_args(["--weight-rounding", "nearest"])
    assert config_from_args(args).weight_rounding == "nearest"
    assert config_from_args(parser.parse_args([])).weight_rounding == \
        QuantConfig().weight_rounding


def test_mse_weight_scales_stay_bit_exact(tmp_path):
    """The realized int8 conv with weight_scale="mse" equals the numpy integer model
    built from the same quantize_weight(..., "mse") weights; the manifest records them."""
    from conftest import save_model
    from onnx_builders import BUILDERS, random_inputs, run_onnxruntime
    from test_quantize_realize import SPEC, _conv_ref, _sqnr, run_vm, vm_for

    from qcompile.frontend import import_onnx
    from qcompile.quantize import quantize_model

    model = BUILDERS["conv_bn_relu"](0)
    imported = import_onnx(save_model(model, tmp_path, "conv_bn_relu"))
    calib = [random_inputs(model, seed=s) for s in range(4)]
    result = quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False,
                                                         weight_scale="mse",
                                                         weight_rounding="nearest"), SPEC)
    layer = result.summary["layers"][0]
    assert layer["weight"]["scale_method"] == "mse"
    assert result.summary["weights"]["scale"] == "mse"
    plan_layer = result.plan.layers[0]
    q_w, s_w = quantize_weight(plan_layer.weight, 0, True, SPEC.reduce_range, "mse")
    np.testing.assert_array_equal(np.asarray(layer["weight"]["scale"]), s_w)

    feeds = random_inputs(model, seed=11)
    got = run_vm(vm_for(result.mod), feeds["input"])
    s_in, zp = np.float32(layer["input"]["scale"]), layer["input"]["zero_point"]
    q_x = np.clip(np.round(feeds["input"] / s_in) + zp, 0, 255).astype(np.int64)
    q_xp = np.pad(q_x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zp)
    acc = _conv_ref(q_xp, q_w, 1, [0, 0, 0, 0], 1)
    acc_scale = s_in * s_w
    bias_q = np.round(plan_layer.bias / acc_scale).astype(np.int64) \
        - zp * q_w.astype(np.int64).reshape(len(s_w), -1).sum(1)
    acc = acc + bias_q.reshape(1, -1, 1, 1)
    want = np.maximum(acc.astype(np.float32) * acc_scale.astype(np.float32).reshape(1, -1, 1, 1),
                      0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=float(acc_scale.max()) * 1e-3)
    assert _sqnr(run_onnxruntime(model, feeds)[0], got) > 30


# ------------------------------------------------------- data-aware (gptq) rounding
def test_gptq_rounding_lowers_output_error_on_correlated_inputs():
    from qcompile.quantize.gptq import gptq_weight, matmul_gram

    rng = np.random.default_rng(4)
    mix = rng.normal(size=(32, 32))
    x_cal = rng.normal(size=(2000, 32)) @ mix     # correlated inputs
    x_test = rng.normal(size=(500, 32)) @ mix
    w = rng.normal(size=(32, 16))                  # matmul [K, N]
    q0, s = quantize_weight(w, 1)
    q1 = gptq_weight(w, s, matmul_gram([x_cal]), "matmul", 127)
    assert q1.dtype == np.int8 and np.abs(q1.astype(int)).max() <= 127
    err0 = np.sum((x_test @ (q0 * s) - x_test @ w) ** 2)
    err1 = np.sum((x_test @ (q1 * s) - x_test @ w) ** 2)
    assert err1 < 0.7 * err0
    assert np.abs(q1.astype(int) - q0).max() <= 3  # still a rounding, not a new weight


def test_gptq_conv_gram_matches_direct_im2col_for_depthwise():
    from types import SimpleNamespace

    from qcompile.quantize.gptq import conv_gram

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    attrs = SimpleNamespace(groups=3, strides=[2, 2], dilation=[1, 1], padding=[1, 1, 1, 1])
    gram = conv_gram([x], (3, 1, 3, 3), attrs)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))).astype(np.float64)
    for c in range(3):
        rows = np.array([xp[n, c, i:i + 3, j:j + 3].ravel()
                         for n in range(2) for i in range(0, 5, 2) for j in range(0, 5, 2)])
        np.testing.assert_allclose(gram[c], rows.T @ rows, rtol=1e-9)


def test_gptq_option_end_to_end(tmp_path):
    """weight_rounding="gptq" through quantize_model: recorded in the summary, changes
    the module's output, which stays close to float."""
    from conftest import save_model
    from onnx_builders import BUILDERS, random_inputs, run_onnxruntime
    from test_quantize_realize import SPEC, _sqnr, run_vm, vm_for

    from qcompile.frontend import import_onnx
    from qcompile.quantize import quantize_model

    model = BUILDERS["depthwise"](0)
    imported = import_onnx(save_model(model, tmp_path, "depthwise"))
    calib = [random_inputs(model, seed=s) for s in range(8)]
    feeds = random_inputs(model, seed=21)
    ref = run_onnxruntime(model, feeds)[0]
    got = {}
    for rounding in ("nearest", "gptq"):
        result = quantize_model(imported, calib, QuantConfig(
            sqnr=False, progress=False, weight_rounding=rounding), SPEC)
        assert result.summary["weights"]["rounding"] == rounding
        got[rounding] = run_vm(vm_for(result.mod), feeds["input"])
        if rounding == "gptq":
            assert all(r["weight"].get("rounding") == "gptq" and not r["weight"]["from_model"]
                       and r["weight"]["scale_method"] == "minmax"
                       for r in result.summary["layers"] if r["int8"])
    assert _sqnr(ref, got["gptq"]) > 25
    assert not np.array_equal(got["gptq"], got["nearest"])  # the option really acts


def test_gptq_lazy_batches_give_the_column_by_column_codes():
    """The blocked update (BLOCK columns at a time) is the same arithmetic as updating every
    later column after each column; K spans three blocks and a ragged tail."""
    from qcompile.quantize import gptq

    rng = np.random.default_rng(0)
    k = 2 * gptq.BLOCK + 45
    x = rng.standard_normal((3 * k, k))
    x[:, 5] = 0.9 * x[:, 6]  # correlated inputs, so the compensation matters
    w = rng.standard_normal((24, k))
    scale = np.abs(w).max(1) / 127
    gram = x.T @ x

    h = gram + gptq.DAMP * np.mean(np.diag(gram)) * np.eye(k)
    inv_chol = np.linalg.cholesky(np.linalg.inv(h)).T
    work, want = w.copy(), np.zeros_like(w)
    for i in range(k):
        want[:, i] = np.clip(np.round(work[:, i] / scale), -127, 127)
        err = (work[:, i] - want[:, i] * scale) / inv_chol[i, i]
        work[:, i + 1:] -= np.outer(err, inv_chol[i, i + 1:])

    got = gptq.round_with_compensation(w, scale, gram, 127)
    np.testing.assert_array_equal(got, want)
    assert (got != np.clip(np.round(w / scale[:, None]), -127, 127)).any()  # not just nearest


def test_upper_cholesky_of_inverse_matches_the_explicit_inverse():
    """GPTQ's factor of inv(H) without forming inv(H): the same U as cholesky(inv(H)).T."""
    from qcompile.quantize.gptq import upper_cholesky_of_inverse

    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 64))
    h = x.T @ x + 0.1 * np.eye(64)
    u = upper_cholesky_of_inverse(h)
    np.testing.assert_allclose(u, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-9, atol=1e-12)
    assert np.allclose(np.tril(u, -1), 0)
    with pytest.raises(np.linalg.LinAlgError):
        upper_cholesky_of_inverse(-np.eye(4))
