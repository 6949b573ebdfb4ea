"""Default schedule of pooling kernels (``schedules.cpu._schedule_pool_planes``): one
parallel task per channel plane with its padding copied inside it; exact results."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from test_schedule_x86_pixels import _scheduled_tir  # noqa: E402
from test_schedules import _compile, _run  # noqa: E402


def _pool_module(shape, dtype, kernel, stride, pad):
    x = relax.Var("x", relax.TensorType(shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, kernel, stride, pad)))
        bb.emit_func_output(out)
    return bb.get()


def _np_max_pool(x, k, s, p):
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=low)
    oh, ow = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
    out = np.full(x.shape[:2] + (oh, ow), low, x.dtype)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, :, i:i + s * oh:s, j:j + s * ow:s])
    return out


@pytest.mark.parametrize("case", [
    ((1, 16, 56, 56), "uint8", 3, 2, 1),  # ResNet's stem pool, smaller: parallel planes
    ((2, 5, 9, 11), "float32", 3, 2, 1),  # float, batch 2, odd sizes
    ((1, 4, 12, 12), "int8", 2, 2, 0),    # no padding stage
], ids=lambda c: f"{c[1]}-k{c[2]}s{c[3]}p{c[4]}")
def test_max_pool_per_plane(case):
    shape, dtype, k, s, p = case
    mod = _pool_module(shape, dtype, (k, k), (s, s), (p, p, p, p))
    tir = _scheduled_tir(mod, "x86_64-avx2")
    # one parallel task per plane, only with enough work (a launch costs microseconds)
    planes = f"T.parallel(T.int64({shape[0] * shape[1]})):"
    big = shape[2] * shape[3] >= 56 * 56
    assert (planes in tir) == big and (big or "T.parallel(" not in tir)
    if p and big:  # the padding copy runs inside the plane's task
        assert tir.index('T.sblock("pad_temp")') > tir.index(planes)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 50).astype(dtype) if dtype == "float32" else \
        rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, shape).astype(dtype)
    np.testing.assert_array_equal(_run(_compile(mod, "x86_64-avx2"), x), _np_max_pool(x, k, s, p))
