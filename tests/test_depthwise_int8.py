"""Depthwise conv2d, row kernel (``schedules.cpu.schedule_conv2d_dw_pixels``): exact results.

int8 depthwise runs in float32 lanes (exact: every sum is an integer below 2**24) as rows
of one channel; its padding stage writes one padded plane per channel (zero fill + copy),
de-interleaved into even/odd columns for stride 2 when the padded width is even. Checked
bit-exact against numpy for channel counts that are not multiples of the vector, stride 1
and 2, odd and even padded widths, 3x3 and 5x5, dilation, uint8/int8 input, the fused
requantize epilogue and the raw int32 accumulator; float depthwise against float64.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_schedule_x86_pixels import _scheduled_tir  # noqa: E402
from test_schedules import _compile, _run, conv_module, np_conv2d  # noqa: E402

from qcompile.target import host_cpu_features  # noqa: E402

TARGETS = ["x86_64-avx2", "x86_64-avx512-vnni"]

# (n, c, h, w, k, stride, pad, dilation)
DW_CASES = [
    (1, 12, 9, 9, 3, 1, 1, 1),       # 12 channels: less than one vector
    (1, 33, 10, 16, 3, 1, 1, 1),     # 33: padded to 48
    (2, 20, 11, 12, 3, 2, 1, 1),     # stride 2, padded width 14 (even): de-interleaved
    (1, 16, 9, 13, 3, 2, 1, 1),      # stride 2, padded width 15 (odd): strided taps
    (1, 24, 12, 20, 5, 1, 2, 1),     # 5x5
    (1, 16, 12, 12, 3, 1, 2, 2),     # dilation 2
    (1, 32, 7, 7, 3, 1, 1, 1),       # 7 wide: channel-vector kernel
    (1, 16, 6, 24, 3, 1, 1, 1),      # 24 wide: three 8-lane vectors per row
    (1, 8, 8, 64, 3, 2, 1, 1),       # stride 2, 32 wide: 16-lane (AVX-512) / 8-lane vectors
]


def _row_lanes(ow: int, target: str) -> int:
    """The vector lanes of a depthwise row of ``ow`` pixels: the largest power of two
    (at most the vector width) dividing it if that is at least 8, else the whole row
    (an odd lane count such as 56 compiles to awkward, partly scalar code)."""
    lanes = 16 if "avx512" in target else 8
    while ow % lanes:
        lanes //= 2
    return lanes if lanes >= 8 else ow


def _dilate(w, d):
    if d == 1:
        return w
    o, c, kh, kw = w.shape
    out = np.zeros((o, c, (kh - 1) * d + 1, (kw - 1) * d + 1), w.dtype)
    out[:, :, ::d, ::d] = w
    return out


def _dw_module(xshape, w, s, p, d, x_dtype, epilogue, bias=None, scale=None):
    from tvm import relax

    x = relax.Var("x", relax.TensorType(xshape, x_dtype))
    bb = relax.BlockBuilder()
    c = xshape[1]
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=s, padding=p, dilation=d,
                                           groups=c, out_dtype="int32"))
            if epilogue == "requant":
                y = bb.emit(relax.op.add(y, relax.const(bias)))
                f = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(scale)))
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(f), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _target_ok(target):
    if target == "x86_64-avx512-vnni" and not {"avx512f", "avx512bw"} <= host_cpu_features():
        pytest.skip("no AVX-512 on this CPU (the AVX2 parametrization runs the same rule)")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_int8_depthwise_bit_exact(target, case, x_dtype):
    _target_ok(target)
    n, c, h, w_, k, s, p, d = case
    rng = np.random.default_rng(21)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, c, h, w_)).astype(x_dtype)
    w = rng.integers(-128, 128, (c, 1, k, k)).astype(np.int8)
    bias = rng.integers(-2000, 2000, (1, c, 1, 1)).astype(np.int32)
    scale = (rng.random((1, c, 1, 1)) * 0.01).astype(np.float32)
    acc = np_conv2d(x, _dilate(w, d), s, p, c, acc=np.int64)
    mod = _dw_module(x.shape, w, s, p, d, x_dtype, "requant", bias, scale)
    tir = _scheduled_tir(mod, target)
    ow = acc.shape[3]
    assert ("dw_pixels" in tir) == (ow >= 8), "row kernel chosen iff the row is >= 8 wide"
    if s == 2 and ow >= 8:
        assert ("dw_pixels_deinterleaved" in tir) == ((w_ + 2 * p) % 2 == 0)
    if ow >= 8:  # two output rows per register tile where the height allows
        assert ("_2rows" in tir) == (acc.shape[2] % 2 == 0)
        lanes = _row_lanes(ow, target)
        assert f"T.vectorized(T.int64({lanes}))" in tir
        assert lanes == ow or f"T.vectorized(T.int64({ow}))" not in tir
    got = _run(_compile(mod, target), x)
    ref = np.clip(np.round((acc + bias).astype(np.float32) * scale), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    got = _run(_compile(_dw_module(x.shape, w, s, p, d, x_dtype, None), target), x)
    np.testing.assert_array_equal(got, acc.astype(np.int32))


def test_int8_depthwise_extreme_sums_exact():
    """The largest |sum| (255 * 128 * 25 for 5x5) is still exact in float32 lanes."""
    x = np.full((1, 16, 10, 16), 255, np.uint8)
    w = np.full((16, 1, 5, 5), -128, np.int8)
    w[::2] = 127
    mod = _dw_module(x.shape, w, 1, 2, 1, "uint8", None)
    got = _run(_compile(mod, "x86_64-avx2"), x)
    np.testing.assert_array_equal(got, np_conv2d(x, w, 1, 2, 16, acc=np.int64).astype(np.int32))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", [(1, 12, 9, 16, 3, 1, 1, 1), (1, 20, 12, 16, 3, 2, 1, 1),
                                  (1, 16, 9, 17, 3, 2, 1, 1)],
                         ids=lambda c: "x".join(map(str, c)))
def test_float_depthwise_rows(target, case):
    _target_ok(target)
    n, c, h, w_, k, s, p, _ = case
    rng = np.random.default_rng(22)
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    bias = rng.standard_normal((1, c, 1, 1)).astype(np.float32)
    mod = conv_module(x.shape, w, s, p, c, bias=bias)
    assert "dw_pixels" in _scheduled_tir(mod, target)
    got = _run(_compile(mod, target), x)
    ref = np.maximum(np_conv2d(x, w, s, p, c) + bias, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
