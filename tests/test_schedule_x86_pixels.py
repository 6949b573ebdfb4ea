"""Pixel-vector conv kernels (``schedules.cpu.schedule_conv2d_int8_pixels`` / ``_float_pixels``):
bit-exact against numpy, and the rule really picks them.

The pixel tile accumulates L consecutive output pixels of one output channel (the
``x86.get_pixel_intrin`` tile: vpdpbusd on zmm/ymm, AVX2 vpmaddubsw + vpmaddwd), so these
tests use output widths that are multiples of 8 or 16, with channel counts that are not
multiples of 4 or of the channel tile, batch 2, 3x3 with padding and dilation, int8 and
uint8 activations (the +128 shift), and fused epilogues: requantize and an int8 residual
add (an extra elementwise input in the write-back). The AVX-512 VNNI instruction runs
where this CPU has it; elsewhere the same schedule runs with the portable tile.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from test_schedules import _compile, _run, _runnable, _target_for, np_conv2d  # noqa: E402

from qcompile.target import get_target  # noqa: E402


def _conv_int8_module(xshape, w, stride, pad, dil, x_dtype, bias, scale, residual=None):
    """conv (int32) + bias -> float requantize -> [+ int8 residual] -> clip -> uint8."""
    x = relax.Var("x", relax.TensorType(xshape, x_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=pad,
                                           dilation=dil, out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            f = bb.emit(relax.op.round(relax.op.multiply(relax.op.astype(y, "float32"),
                                                         relax.const(scale))))
            if residual is not None:
                f = bb.emit(relax.op.add(f, relax.op.astype(relax.const(residual), "float32")))
            r = bb.emit(relax.op.clip(f, 0, 255))
            out = bb.emit_output(bb.emit(relax.op.astype(r, "uint8")))
        bb.emit_func_output(out)
    return bb.get()


def _np_int8(x, w, stride, pad, dil, bias, scale, residual=None):
    kh = w.shape[2]
    wd = np.zeros((w.shape[0], w.shape[1], (kh - 1) * dil + 1, (kh - 1) * dil + 1), np.int64)
    wd[:, :, ::dil, ::dil] = w
    acc = np_conv2d(x, wd, stride, pad, acc=np.int64) + bias
    f = np.round(acc.astype(np.float32) * scale)
    if residual is not None:
        f = f + residual.astype(np.float32)
    return np.clip(f, 0, 255).astype(np.uint8)


def _scheduled_tir(mod, target_name, force=None) -> str:
    """The scheduled (not yet lowered) kernels, as TVMScript."""
    from qcompile import pipeline
    from qcompile.layout import pack_weights_pass

    spec = get_target(target_name)
    target = spec.tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        m = tvm.transform.Sequential([pack_weights_pass(target, force),
                                      *pipeline.fuse_passes(target)])(mod)
        m = tvm.transform.Sequential(pipeline.schedule_passes(spec, target, False))(m)
    return "\n".join(f.script() for _, f in m.functions_items()
                     if isinstance(f, tvm.tirx.PrimFunc))


# (n, c, h, w, o, k, pad, dilation)
INT8_PIXEL_CASES = [
    (1, 5, 6, 16, 13, 1, 0, 1),     # 1x1, C and O not multiples of 4 / 16, zmm row
    (2, 16, 5, 24, 40, 1, 0, 1),    # batch 2, 24 wide: ymm tiles (VNNI) / AVX2 tiles
    (1, 7, 9, 16, 20, 3, 1, 1),     # 3x3 pad 1, odd channels
    (1, 8, 9, 16, 16, 3, 2, 2),     # 3x3 dilation 2
    (1, 12, 4, 112, 24, 1, 0, 1),   # a 112-wide row: 7 pixel vectors per tile
    (1, 13, 8, 28, 24, 1, 0, 1),    # 28 wide 1x1: flat plane, 4 (zmm) / 2 (ymm) rows a tile
    (1, 8, 6, 56, 20, 1, 0, 1),     # 56 wide 1x1: flat plane on zmm, plain rows on AVX2
]


def _flat_expected(family, case) -> bool:
    """Whether ``case`` takes the flat-plane pixel kernel (1x1, unpadded, a row that is no
    whole number of full pixel vectors but a few rows are)."""
    from qcompile.schedules.cpu import flat_pixel_rows

    n, c, h, w_, o, k, p, d = case
    return bool(flat_pixel_rows(family, h, w_, (k, k), (1, 1), (p,) * 4))
FAMILIES = ["avx512-vnni", "avx2-vpmaddubsw"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", INT8_PIXEL_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_int8_pixel_conv_bit_exact(family, case, x_dtype):
    n, c, h, w_, o, k, p, d = case
    rng = np.random.default_rng(11)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, c, h, w_)).astype(x_dtype)
    w = rng.integers(-64, 64, (o, c, k, k)).astype(np.int8)  # 7-bit: AVX2 tile is exact
    bias = rng.integers(-3000, 3000, (1, o, 1, 1)).astype(np.int32)
    scale = (rng.random((1, o, 1, 1)) * 0.02).astype(np.float32)
    oh = h + 2 * p - (k - 1) * d
    residual = rng.integers(-128, 128, (n, o, oh, w_)).astype(np.int8)
    force = _runnable(family)
    target = _target_for(force)
    mod = _conv_int8_module(x.shape, w, 1, p, d, x_dtype, bias, scale, residual)
    tir = _scheduled_tir(mod, target, force)
    assert "int8_pixels" in tir, "pixel tile not chosen"
    assert ("int8_pixels_flat" in tir) == _flat_expected(family, case)
    got = _run(_compile(mod, target, force), x)
    np.testing.assert_array_equal(got, _np_int8(x, w, 1, p, d, bias, scale, residual))


def test_int8_pixel_tile_not_used_where_it_cannot_be_exact():
    """Stride 2 and widths that no pixel tile divides keep the channel kernel (and stay
    exact): tensorize takes no predicate, so a partial pixel tile must never be emitted."""
    rng = np.random.default_rng(12)
    for stride, width in ((2, 16), (1, 14)):
        x = rng.integers(0, 256, (1, 8, 6, width)).astype(np.uint8)
        w = rng.integers(-64, 64, (16, 8, 1, 1)).astype(np.int8)
        bias = np.zeros((1, 16, 1, 1), np.int32)
        scale = np.full((1, 16, 1, 1), 0.05, np.float32)
        mod = _conv_int8_module(x.shape, w, stride, 0, 1, "uint8", bias, scale)
        force = _runnable("avx512-vnni")
        target = _target_for(force)
        assert "int8_pixels" not in _scheduled_tir(mod, target, force)
        got = _run(_compile(mod, target, force), x)
        np.testing.assert_array_equal(got, _np_int8(x, w, stride, 0, 1, bias, scale))


def _block(tir: str, name: str) -> str:
    """The TVMScript of block ``name`` (from its ``with`` line to the next block)."""
    start = tir.index(f'T.sblock("{name}")')
    end = tir.find("T.sblock(", start + 1)
    return tir[start:end if end > 0 else len(tir)]


def test_int8_pixel_conv_computes_exact_output_channels():
    """24 output channels (not a multiple of the 16-lane weight tile): the pixel kernel
    computes exactly 24, with no slice stage, so the requantize epilogue is fused into the
    tile's write-back instead of running as separate passes over the output (measured
    144->24 ch at 56x56, 1 thread: about 2x faster). The channel kernel (stride 2) still
    pads."""
    rng = np.random.default_rng(14)
    w = rng.integers(-64, 64, (24, 16, 1, 1)).astype(np.int8)
    bias = rng.integers(-500, 500, (1, 24, 1, 1)).astype(np.int32)
    scale = np.full((1, 24, 1, 1), 0.03, np.float32)
    force = _runnable("avx512-vnni")
    target = _target_for(force)
    pixel = _scheduled_tir(_conv_int8_module((1, 16, 3, 32), w, 1, 0, 1, "uint8", bias, scale),
                           target, force)
    assert "int8_pixels" in pixel
    assert "conv2d_slice" not in pixel
    assert 'T.sblock("T_add")' not in pixel, "epilogue left unfused"
    channel = _scheduled_tir(_conv_int8_module((1, 16, 6, 32), w, 2, 0, 1, "uint8", bias, scale),
                             target, force)
    assert "int8_pixels" not in channel and "conv2d_slice" in channel
    # the flat-plane kernel (28-wide 1x1) also runs over the exact channels, its epilogue
    # fused into the write-back of whole rows
    flat = _scheduled_tir(_conv_int8_module((1, 16, 8, 28), w, 1, 0, 1, "uint8", bias, scale),
                          target, force)
    assert "int8_pixels_flat" in flat and "conv2d_slice" not in flat
    assert 'T.sblock("T_add")' not in flat, "epilogue left unfused"


def test_int8_activation_repack_is_a_plain_interleave():
    """The int8 conv's [N, C, H, W] -> [N, C/4, H, W, 4] repack: no bounds test where
    nothing is padded, the 4 channels unrolled (LLVM vectorizes the pixel loop into
    interleaving shuffles; TVM's 4-lane vectorize gathered byte by byte, ~6x slower); with
    padding, a separate zero fill and an unpredicated copy."""
    rng = np.random.default_rng(15)
    bias = np.zeros((1, 16, 1, 1), np.int32)
    scale = np.full((1, 16, 1, 1), 0.05, np.float32)
    force = _runnable("avx512-vnni")
    target = _target_for(force)
    for k, pad in ((1, 0), (3, 1)):
        w = rng.integers(-64, 64, (16, 8, k, k)).astype(np.int8)
        mod = _conv_int8_module((1, 8, 6, 32), w, 1, pad, 1, "uint8", bias, scale)
        tir = _scheduled_tir(mod, target, force)
        copy = _block(tir, "pack_nchw4c")
        assert "if_then_else" not in copy
        c4_loop = tir[:tir.index('T.sblock("pack_nchw4c")')].rsplit("for ", 1)[1]
        assert "T.unroll(" in c4_loop and "T.vectorized(" not in c4_loop, c4_loop
        assert ('T.sblock("pack_nchw4c_pad_const")' in tir) == bool(pad)
        x = rng.integers(0, 256, (1, 8, 6, 32)).astype(np.uint8)
        got = _run(_compile(mod, target, force), x)
        np.testing.assert_array_equal(got, _np_int8(x, w, 1, pad, 1, bias, scale))


def test_pixel_intrinsic_instructions():
    """The pixel tiles carry the intended instruction: vpdpbusd (zmm and ymm forms) for
    VNNI, vpmaddubsw for AVX2 (compile only)."""
    rng = np.random.default_rng(13)
    w = rng.integers(-64, 64, (16, 8, 1, 1)).astype(np.int8)
    bias = np.zeros((1, 16, 1, 1), np.int32)
    scale = np.full((1, 16, 1, 1), 0.05, np.float32)
    # 5 rows of 24: no whole number of rows is a whole number of zmm vectors, so the
    # VNNI tile stays on ymm (4 rows of 24 would take the flat-plane zmm kernel)
    for target, width, instr, reg in (("x86_64-avx512-vnni", 32, "vpdpbusd", "zmm"),
                                      ("x86_64-avx512-vnni", 24, "vpdpbusd", "ymm"),
                                      ("x86_64-avx2", 24, "vpmaddubsw", "ymm"),
                                      ("x86_64-avx512-vnni", 28, "vpdpbusd", "zmm")):
        mod = _conv_int8_module((1, 8, 5 if width == 24 else 4, width), w, 1, 0, 1, "uint8",
                                bias, scale)
        assert "int8_pixels" in _scheduled_tir(mod, target)
        ex = _compile(mod, target)
        asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
        lines = [ln for ln in asm.splitlines() if instr in ln]
        assert lines and any(reg in ln for ln in lines), f"{instr} on {reg} missing ({target})"


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
@pytest.mark.parametrize("case", [(1, 5, 3, 16, 13), (2, 24, 4, 32, 40),
                                  (1, 8, 4, 28, 24),    # 28 wide: flat plane (C <= O)
                                  (1, 40, 4, 28, 24),   # 28 wide, C > O: channel kernel
                                  (1, 12, 4, 56, 20)],  # 56 wide: flat plane on zmm
                         ids=lambda c: "x".join(map(str, c)))
def test_float_pixel_conv_1x1(target, case):
    from qcompile.target import host_cpu_features

    if target == "x86_64-avx512-vnni" and not {"avx512f", "avx512bw"} <= host_cpu_features():
        pytest.skip("no AVX-512 on this CPU (the AVX2 parametrization runs the same rule)")
    from test_schedules import conv_module

    n, c, h, w_, o = case
    rng = np.random.default_rng(14)
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((o, c, 1, 1)).astype(np.float32)
    bias = rng.standard_normal((1, o, 1, 1)).astype(np.float32)
    mod = conv_module(x.shape, w, 1, 0, 1, bias=bias)
    tir = _scheduled_tir(mod, target)
    vec = 16 if "avx512" in target else 8
    flat = w_ % vec != 0 and (w_ >= 56 or c <= o)
    assert ("float_pixels_flat" in tir) == flat
    assert ("float_pixels" in tir) == (flat or w_ % vec == 0)
    got = _run(_compile(mod, target), x)
    ref = np.maximum(np_conv2d(x, w, 1, 0) + bias, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
