"""CUDA dp4a (sm_61): register-tiled packed int8 kernels (compile only; no GPU here).

Each thread owns 4 output channels x up to 4 output pixels (conv) / rows (matmul) of int32
accumulators in registers, so one 16-byte weight group feeds several pixels. The layout
is the 4x4 packing the ARM sdot tile uses (bit-exact on CPU in tests/test_schedules.py);
the tile arithmetic is the dp4a TensorIntrin's description, which tensorize enforces.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import test_schedules as ts  # noqa: E402

NVCC = shutil.which("nvcc")


def _kernel_bodies(src: str) -> list[str]:
    return re.split(r'extern "C" __global__', src)[1:]


@pytest.mark.parametrize("kind", ["conv", "conv_s2", "matmul"])
def test_dp4a_kernels_are_register_tiled(kind, tmp_path):
    rng = np.random.default_rng(31)
    if kind.startswith("conv"):
        stride = 2 if kind == "conv_s2" else 1
        w = rng.integers(-64, 64, (32, 16, 3, 3)).astype(np.int8)
        mod = ts.conv_module((1, 16, 16, 16), w, stride, 1, 1, x_dtype="uint8",
                             epilogue=None, out_dtype="int32")
    else:
        b = rng.integers(-64, 64, (64, 48)).astype(np.int8)
        mod = ts.matmul_module((8, 64), b, "uint8", out_dtype="int32")
    src = ts._cuda_source(ts._compile(mod, "cuda-sm61"))
    gemm = [k for k in _kernel_bodies(src) if "__dp4a(" in k]
    assert len(gemm) == 1, "one packed int8 kernel expected"
    body = gemm[0]
    # 4 channels x 4 pixels/rows of accumulators, unrolled: 16 dp4a per reduction step
    assert re.search(r"int \w+_local_ptr\[16\]", body), body[:400]
    assert body.count("__dp4a(") >= 16
    if NVCC:  # CUDA 13 has no sm_61 back end: check the source compiles for sm_75
        cu = tmp_path / "k.cu"
        cu.write_text(src)
        out = tmp_path / "k.ptx"
        subprocess.run([NVCC, "-ptx", "-arch=sm_75", str(cu), "-o", str(out)], check=True,
                       capture_output=True, text=True, timeout=300)
        assert "dp4a.s32.s32" in out.read_text()


@pytest.mark.parametrize("target,most", [("cuda-sm61", 2), ("cuda-sm80", 3)])
def test_int8_conv_epilogue_is_one_kernel(target, most):
    """bias + requantize (add, cast, multiply, round, clip, cast) run in one nest: on
    sm_61 inside the dp4a tile's write-back (activation pack + conv = 2 launches), on sm_80
    after the tensor-core GEMM (pack + GEMM + NCHW epilogue = 3), not one launch per op."""
    rng = np.random.default_rng(32)
    w = rng.integers(-64, 64, (64, 32, 3, 3)).astype(np.int8)
    mod = ts.conv_module((1, 32, 14, 14), w, 1, 1, 1, x_dtype="uint8", epilogue="requant",
                         bias=rng.integers(-99, 99, (1, 64, 1, 1)).astype(np.int32),
                         scale=np.full((1, 64, 1, 1), 0.01, np.float32), out_dtype="int32")
    src = ts._cuda_source(ts._compile(mod, target))
    kernels = re.findall(r'extern "C" __global__ void [^;]*\{', src)
    assert 1 < len(kernels) <= most, len(kernels)
