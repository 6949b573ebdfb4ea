"""ARM i8mm (``smmla``): packing, bit-exact packed schedules, and the instruction in the code.

The smmla tile is 2x8 by (2x8)^T -> 2x2 int32 (``schedules.arm``). The packed schedule runs
here with the portable implementation of the tile (plain TIR), so layout, padding, the
polyphase activation for strided convs and the fused epilogues are checked bit-exact
against numpy on this x86 machine. The real instruction is checked by counting it in the
aarch64 assembly, and run for real on the emulated board (tests/test_arm_board.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import test_schedules as ts  # noqa: E402

from qcompile.layout import (  # noqa: E402
    i8mm_padded_width,
    pack_conv_weight_i8mm,
    pack_matmul_weight_i8mm,
    plan_for_target,
)
from qcompile.target import get_target  # noqa: E402

PORTABLE = "portable-arm-i8mm"
TARGET = "aarch64-i8mm"

CONV_CASES = [
    # (n, c, h, w, o, k, stride, pad, groups)
    (1, 8, 10, 10, 16, 3, 1, 1, 1),     # one whole tile per row
    (1, 5, 9, 11, 13, 3, 2, 1, 1),      # C, O not multiples of 8 / 2, stride 2, odd width
    (2, 16, 7, 7, 24, 1, 1, 0, 1),      # 1x1, batch 2, width 7 -> padded to 8
    (1, 3, 15, 13, 10, 7, 2, 3, 1),     # stem-like 7x7 stride 2 (polyphase, 2 phases)
    (1, 4, 19, 19, 8, 3, 1, 1, 1),      # prime width
    (1, 16, 3, 3, 6, 3, 2, 1, 1),       # output width 2, stride 2, pad 1
    (1, 9, 5, 5, 18, 3, 3, 0, 1),       # stride 3 (three phases), width 1
    (1, 12, 9, 9, 12, 3, 2, 1, 12),     # depthwise: falls back to the depthwise kernel
    (1, 8, 6, 6, 12, 3, 1, 1, 4),       # grouped: falls back to the spatial kernel
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_i8mm_conv2d_bit_exact(case, x_dtype):
    n, c, h, w_, o, k, s, p, g = case
    rng = np.random.default_rng(11)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, c, h, w_)).astype(x_dtype)
    w = rng.integers(-128, 128, (o, c // g, k, k)).astype(np.int8)  # full 8-bit weights
    x.flat[0], w.flat[0] = (255 if x_dtype == "uint8" else -128), -128  # the extremes
    bias = rng.integers(-5000, 5000, (1, o, 1, 1)).astype(np.int32)
    scale = (rng.random((1, o, 1, 1)) * 0.002).astype(np.float32)
    acc = ts.np_conv2d(x, w, s, p, g, acc=np.int64)
    mod = ts.conv_module(x.shape, w, s, p, g, x_dtype=x_dtype, epilogue="requant", bias=bias,
                         scale=scale, out_dtype="int32")
    got = ts._run(ts._compile(mod, ts.HOST, PORTABLE), x)
    ref = np.clip(np.round(((acc + bias).astype(np.float32) * scale)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    mod = ts.conv_module(x.shape, w, s, p, g, x_dtype=x_dtype, epilogue=None, out_dtype="int32")
    np.testing.assert_array_equal(ts._run(ts._compile(mod, ts.HOST, PORTABLE), x),
                                  acc.astype(np.int32))


@pytest.mark.parametrize("m,k,n", [(1, 37, 100), (6, 64, 24), (3, 5, 7), (13, 16, 16),
                                   (2, 8, 2), (1, 512, 10)])
@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
def test_i8mm_matmul_bit_exact(m, k, n, a_dtype):
    rng = np.random.default_rng(12)
    lo, hi = (0, 256) if a_dtype == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (m, k)).astype(a_dtype)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    mod = ts.matmul_module(a.shape, b, a_dtype, out_dtype="int32")
    got = ts._run(ts._compile(mod, ts.HOST, PORTABLE), a)
    np.testing.assert_array_equal(got, (a.astype(np.int64) @ b).astype(np.int32))
    bias = rng.integers(-3000, 3000, n).astype(np.int32)
    mod = ts.matmul_module(a.shape, b, a_dtype, bias=bias, out_dtype="int32")
    got = ts._run(ts._compile(mod, ts.HOST, PORTABLE), a)
    np.testing.assert_array_equal(got, np.maximum(a.astype(np.int64) @ b + bias, 0))


def test_i8mm_packing_layouts():
    rng = np.random.default_rng(13)
    w = rng.integers(-128, 128, (5, 11, 3, 2)).astype(np.int8)
    p = pack_conv_weight_i8mm(w)
    assert p.shape == (3, 2, 3, 2, 2, 8)
    for o in range(5):
        for c in range(11):
            assert p[o // 2, c // 8, 2, 1, o % 2, c % 8] == w[o, c, 2, 1]
    assert not p[2, :, :, :, 1].any() and not p[:, 1, :, :, :, 3:].any()  # zero padding
    b = rng.integers(-128, 128, (10, 3)).astype(np.int8)
    bp = pack_matmul_weight_i8mm(b)
    assert bp.shape == (2, 2, 2, 8)
    assert bp[1, 1, 0, 1] == b[9, 2] and not bp[1, :, 1].any() and not bp[:, 1, :, 2:].any()
    # pixel-pair tiles: a little padding buys a 4-pair register tile (14 -> 16)
    for ow, padded in [(1, 2), (2, 2), (3, 4), (7, 8), (14, 16), (28, 28), (56, 56), (13, 16)]:
        assert i8mm_padded_width(ow) == padded


def test_i8mm_target_plans_smmla():
    spec = get_target(TARGET)
    assert "i8mm" in spec.isa_features and spec.int8_intrinsic == "arm-i8mm"
    plan = plan_for_target(spec.tvm_target())
    assert (plan.int8_intrin, plan.int8_lanes, plan.act_dtype) == ("arm-i8mm", 2, "int8")
    # a dotprod-only board keeps sdot
    assert plan_for_target(get_target("aarch64-neon-dotprod").tvm_target()).int8_intrin \
        == "arm-sdot"


def test_i8mm_kernels_carry_smmla():
    rng = np.random.default_rng(14)
    w = rng.integers(-128, 128, (32, 16, 3, 3)).astype(np.int8)
    conv = ts.conv_module((1, 16, 8, 8), w, 1, 1, 1, x_dtype="uint8", epilogue=None,
                          out_dtype="int32")
    conv_s2 = ts.conv_module((1, 16, 9, 9), w, 2, 1, 1, x_dtype="int8", epilogue=None,
                             out_dtype="int32")
    b = rng.integers(-128, 128, (48, 40)).astype(np.int8)
    for mod in (conv, conv_s2, ts.matmul_module((4, 48), b, "uint8", out_dtype="int32"),
                ts.matmul_module((1, 48), b, "int8", out_dtype="int32")):
        asm = ts._asm(ts._compile(mod, TARGET))
        assert len(re.findall(r"\bsmmla\b", asm)) >= 4


def _functions(objdump_text: str) -> dict[str, str]:
    """Function name -> disassembly, with TVM's parallel-lambda and FFI wrapper symbols
    folded into the kernel they belong to."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in objdump_text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            cur = m.group(1).removeprefix("__tvm_ffi_")
            cur = re.sub(r"_compute_(\d+)?$", "", cur)
            out.setdefault(cur, [])
        elif cur is not None:
            out[cur].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_bundled_model_int8_kernels_all_use_smmla(bundled_model, bundled_calib_data, tmp_path):
    """Every int8 conv/dense kernel of the bundled CNN, compiled for aarch64-i8mm and linked
    with the cross compiler, executes smmla (counted in the disassembled library)."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "binutils-aarch64-linux-gnu (comes with g++-aarch64-linux-gnu) is missing"
    from qcompile.build import compile_model

    art = compile_model(bundled_model, TARGET, tmp_path / "art", quantize="int8",
                        calib=bundled_calib_data)
    asm = subprocess.run([objdump, "-d", str(art.library)], capture_output=True, text=True,
                         check=True).stdout
    funcs = _functions(asm)
    kernels = {k: v for k, v in funcs.items() if re.search(r"conv2d|matmul|dense", k)}
    assert kernels, sorted(funcs)
    counts = {k: len(re.findall(r"\tsmmla\t", v)) for k, v in kernels.items()}
    # the CNN has 2 convs and 2 dense layers, all int8
    assert len(counts) == 4 and all("i8mm" in k for k in counts), counts
    assert all(c >= 8 for c in counts.values()), counts
