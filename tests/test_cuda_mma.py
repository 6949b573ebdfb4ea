"""CUDA s8 tensor cores (wmma m16n16k16, sm_72+): layout bit-exact here, mma in the PTX.

No GPU here. What is checked:
* the GEMM form the layout pass gives int8 conv2d/matmul on sm_80 (in-kernel im2col /
  row padding to 16, weights transposed and padded, u8 -> s8 shift with its per-channel
  compensation, the [pixel, channel] -> NCHW read-back, fused epilogues) runs on the CPU
  (``portable-cuda-mma``) bit-exact against numpy, across odd shapes;
* the sm_80 build tensorizes that GEMM with qcompile's wmma intrinsics (their descriptions
  are the same plain-TIR semantics: tensorize refuses a kernel that differs), and nvcc's
  PTX of every int8 conv/dense kernel carries ``wmma.mma.sync ... s32.s8.s8.s32``.
Running the kernels on a GPU is left to a machine that has one.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import test_schedules as ts  # noqa: E402

from qcompile.layout import pack_conv_weight_mma, pack_matmul_weight_mma, plan_for_target  # noqa: E402,E501
from qcompile.target import get_target  # noqa: E402

PORTABLE = "portable-cuda-mma"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc"
                                if shutil.os.path.exists("/usr/local/bin/nvcc") else None)
MMA_PTX = re.compile(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.s32\.s8\.s8\.s32")

CONV_CASES = [
    # (n, c, h, w, o, k, stride, pad)
    (1, 8, 10, 10, 16, 3, 1, 1),      # M = 100 (not a multiple of 16), K = 72
    (1, 5, 9, 11, 13, 3, 2, 1),       # odd C and O, stride 2
    (2, 16, 7, 7, 24, 1, 1, 0),       # 1x1, batch 2 (rows span both images)
    (1, 3, 15, 13, 10, 7, 2, 3),      # 7x7 stride 2 stem
    (1, 32, 4, 4, 64, 3, 1, 1),       # K = 288, several warps per block
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_mma_conv2d_layout_bit_exact(case, x_dtype):
    n, c, h, w_, o, k, s, p = case
    rng = np.random.default_rng(21)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, c, h, w_)).astype(x_dtype)
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, (1, o, 1, 1)).astype(np.int32)
    scale = (rng.random((1, o, 1, 1)) * 0.002).astype(np.float32)
    acc = ts.np_conv2d(x, w, s, p, 1, acc=np.int64)
    mod = ts.conv_module(x.shape, w, s, p, 1, x_dtype=x_dtype, epilogue="requant", bias=bias,
                         scale=scale, out_dtype="int32")
    got = ts._run(ts._compile(mod, ts.HOST, PORTABLE), x)
    ref = np.clip(np.round(((acc + bias).astype(np.float32) * scale)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    mod = ts.conv_module(x.shape, w, s, p, 1, x_dtype=x_dtype, epilogue=None, out_dtype="int32")
    np.testing.assert_array_equal(ts._run(ts._compile(mod, ts.HOST, PORTABLE), x),
                                  acc.astype(np.int32))


@pytest.mark.parametrize("m,k,n", [(1, 37, 100), (6, 64, 24), (3, 5, 7), (33, 16, 16)])
@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
def test_mma_matmul_layout_bit_exact(m, k, n, a_dtype):
    rng = np.random.default_rng(22)
    lo, hi = (0, 256) if a_dtype == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (m, k)).astype(a_dtype)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    got = ts._run(ts._compile(ts.matmul_module(a.shape, b, a_dtype, out_dtype="int32"),
                              ts.HOST, PORTABLE), a)
    np.testing.assert_array_equal(got, (a.astype(np.int64) @ b).astype(np.int32))


def test_mma_packing_and_plan():
    rng = np.random.default_rng(23)
    w = rng.integers(-128, 128, (5, 3, 3, 3)).astype(np.int8)
    p = pack_conv_weight_mma(w)
    assert p.shape == (16, 32)
    assert p[4, 2 * 9 + 1 * 3 + 2] == w[4, 2, 1, 2]  # K order (c, kh, kw)
    assert not p[5:].any() and not p[:, 27:].any()
    b = rng.integers(-128, 128, (20, 3)).astype(np.int8)
    bp = pack_matmul_weight_mma(b)
    assert bp.shape == (16, 32) and bp[2, 19] == b[19, 2]
    assert plan_for_target(get_target("cuda-sm80").tvm_target()).int8_intrin == "cuda-mma"
    # Pascal has no tensor cores: dp4a
    assert plan_for_target(get_target("cuda-sm61").tvm_target()).int8_intrin == "cuda-dp4a"


def _ptx(source: str, tmp_path) -> str:
    cu = tmp_path / "k.cu"
    cu.write_text(source)
    out = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-ptx", "-arch=sm_80", str(cu), "-o", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    return out.read_text()


def _kernels(text: str, start: str) -> dict[str, str]:
    """Kernel name -> body, split at each ``start`` line (``extern "C" __global__`` in CUDA,
    ``.entry`` in PTX)."""
    parts = re.split(rf"(?m)^.*{re.escape(start)}\s+", text)[1:]
    out = {}
    for part in parts:
        m = re.match(r"(?:void\s+)?(?:__launch_bounds__\(\d+\)\s+)?(\w+)", part)
        if m:
            out[m.group(1)] = part
    return out


def test_sm80_int8_kernels_use_s8_tensor_cores(tmp_path):
    rng = np.random.default_rng(24)
    w = rng.integers(-128, 128, (16, 8, 3, 3)).astype(np.int8)
    conv = ts.conv_module((1, 8, 10, 10), w, 1, 1, 1, x_dtype="uint8", epilogue=None,
                          out_dtype="int32")
    b = rng.integers(-128, 128, (48, 40)).astype(np.int8)
    mm = ts.matmul_module((4, 48), b, "uint8", out_dtype="int32")
    for mod in (conv, mm):
        src = ts._cuda_source(ts._compile(mod, "cuda-sm80"))
        assert "wmma::mma_sync(" in src and "signed char" in src
        assert "__shared__" in src  # operands staged in shared memory
        assert not [ln for ln in src.splitlines() if "__dp4a(" in ln and "INTRINSICS" not in ln]
        if NVCC:
            assert MMA_PTX.search(_ptx(src, tmp_path))


def test_bundled_model_int8_kernels_on_tensor_cores(bundled_model, bundled_calib_data,
                                                    tmp_path):
    """Every int8 conv/dense kernel of the bundled CNN built for cuda-sm80 issues s8 mma
    (counted per kernel in nvcc's PTX when nvcc is here, else in the CUDA source)."""
    from qcompile.build import compile_model

    art = compile_model(bundled_model, "cuda-sm80", tmp_path / "art", quantize="int8",
                        calib=bundled_calib_data)
    src = (art.directory / "kernels.cu").read_text()
    gemms = {k: v for k, v in _kernels(src, 'extern "C" __global__').items()
             if "mma_sync" in v}
    assert len(gemms) == 4, sorted(gemms)  # 2 convs + 2 dense layers, all int8
    names = {re.sub(r"_kernel(_\d+)?$", "", k) for k in gemms}
    assert all(re.search(r"conv2d_mma_int8|matmul_mma_int8", k) for k in names), names
    if NVCC:
        entries = _kernels(_ptx(src, tmp_path), ".entry")
        for name in gemms:
            assert MMA_PTX.search(entries[name]), f"no s8 mma in the PTX of {name}"
