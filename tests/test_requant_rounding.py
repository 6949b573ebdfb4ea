"""``schedules.rounding``: the requantize chain ``astype(clip(round(v)))`` as ``llvm.lrint``
(one ``vcvtps2dq`` on x86) gives the same bytes as numpy's round-half-to-even + clip,
including ties, values far out of range and the int8 bounds, and is applied only where
that holds."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from test_schedules import _compile, _run  # noqa: E402

from qcompile.schedules.rounding import RequantRoundingPass, rounding_passes  # noqa: E402
from qcompile.target import get_target, host_cpu_features  # noqa: E402


def _requant_module(shape, scale, lo, hi, dtype):
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.multiply(x, relax.const(np.float32(scale))))
            r = bb.emit(relax.op.clip(relax.op.round(y), lo, hi))
            out = bb.emit_output(bb.emit(relax.op.astype(r, dtype)))
        bb.emit_func_output(out)
    return bb.get()


def _requant_zp_module(shape, zp, lo, hi, dtype, zp_shape=(1,)):
    """``astype(clip(round(x) + zp, lo, hi))``: an epilogue with an output zero point."""
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            r = bb.emit(relax.op.add(relax.op.round(x),
                                     relax.const(np.full(zp_shape, zp, np.float32))))
            c = bb.emit(relax.op.clip(r, lo, hi))
            out = bb.emit_output(bb.emit(relax.op.astype(c, dtype)))
        bb.emit_func_output(out)
    return bb.get()


def _inputs():
    ties = np.arange(-300, 300, dtype=np.float32) + 0.5  # every .5 tie in and around range
    rng = np.random.default_rng(3)
    wide = rng.standard_normal(1000).astype(np.float32) * 400
    huge = np.array([1e10, -1e10, 3e9, -3e9, 2.1e9, np.float32(2 ** 31), 127.5, -128.5,
                     254.5, 255.5, -0.5, 0.5, 1.5, 2.5], np.float32)
    x = np.concatenate([ties, wide, huge])
    return np.resize(x, (1, 2, 40, 24)).astype(np.float32)  # 1920 values, rows of 24


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
@pytest.mark.parametrize("dtype,lo,hi", [("uint8", 0, 255), ("int8", -128, 127),
                                         ("uint8", 0, 6), ("int8", -127, 127)])
def test_lrint_requantize_matches_round_half_to_even(target, dtype, lo, hi):
    x = _inputs()
    mod = _requant_module(x.shape, 1.0, lo, hi, dtype)
    assert "llvm.lrint" in RequantRoundingPass()(mod).script()
    ex = _compile(mod, target)
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
    assert "vcvtps2dq" in asm and "vroundps" not in asm and "vrndscaleps" not in asm
    if target == "x86_64-avx512-vnni" and not {"avx512f", "avx512bw"} <= host_cpu_features():
        return  # compiled and inspected; the AVX2 parametrization runs the same code path
    got = _run(ex, x)
    want = np.clip(np.rint(x), lo, hi).astype(dtype)
    np.testing.assert_array_equal(got, want)


def test_left_alone_where_the_rewrite_would_not_be_exact():
    """Clip bounds outside the cast's range or not integers, and non-x86 targets."""
    shape = (1, 4, 2, 16)
    for lo, hi, dtype in ((-1000, 1000, "int8"), (0, 255.5, "uint8"), (0, 300, "uint8")):
        mod = _requant_module(shape, 0.5, lo, hi, dtype)
        assert "llvm.lrint" not in RequantRoundingPass()(mod).script(), (lo, hi, dtype)
    assert rounding_passes(get_target("aarch64-neon-dotprod").tvm_target()) == []
    assert rounding_passes(get_target("x86_64-avx2").tvm_target())


@pytest.mark.parametrize("dtype,zp,lo,hi", [("uint8", 128, 0, 255), ("uint8", 3, 0, 255),
                                            ("int8", -5, -128, 127), ("uint8", 200, 0, 255)])
def test_zero_point_epilogue_matches_round_add_clip(dtype, zp, lo, hi):
    """round(v) + zp, clipped: the zero point moves into the clip bounds and onto the
    integer; same bytes as the float chain, ties and far out-of-range values included."""
    x = _inputs()
    mod = _requant_zp_module(x.shape, zp, lo, hi, dtype)
    assert "llvm.lrint" in RequantRoundingPass()(mod).script()
    ex = _compile(mod, "x86_64-avx2")
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
    assert "vcvtps2dq" in asm and "vroundps" not in asm
    want = np.clip(np.rint(x) + np.float32(zp), lo, hi).astype(dtype)
    np.testing.assert_array_equal(_run(ex, x), want)


def test_zero_point_left_alone_unless_one_integer_value():
    """A fractional offset, a per-channel offset tensor, or an add that broadcasts the
    rounded tensor to a larger shape keep the float chain."""
    shape = (1, 4, 2, 16)
    for zp, zp_shape in ((2.5, (1,)), (3.0, (1, 4, 1, 1)), (3.0, (2, 1, 4, 2, 16))):
        mod = _requant_zp_module(shape, zp, 0, 255, "uint8", zp_shape)
        assert "llvm.lrint" not in RequantRoundingPass()(mod).script(), (zp, zp_shape)
