"""Which kernels run in parallel (``schedules.cpu``: conv/matmul kernels, float and 8-bit,
from 64K loop iterations), and that the threshold check itself never knocks a kernel off
its tiled schedule (a failure inside a schedule rule falls back to the generic rule
silently: a 14x14 1x1 conv once ran 100x slower that way)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_depthwise_int8 import _dw_module  # noqa: E402
from test_schedule_x86_pixels import _scheduled_tir  # noqa: E402
from test_schedules import conv_module  # noqa: E402

import qcompile.schedules.cpu as cpu  # noqa: E402

RNG = np.random.default_rng(0)


def _dw_case(x_dtype):
    """Depthwise 96 channels, 56x56, stride 2: 96*28*28*9 = 677K iterations."""
    if x_dtype == "float32":
        w = RNG.standard_normal((96, 1, 3, 3)).astype("float32")
        return conv_module((1, 96, 56, 56), w, 2, 1, groups=96,
                           bias=RNG.standard_normal((1, 96, 1, 1)).astype("float32"))
    w = RNG.integers(-127, 128, (96, 1, 3, 3)).astype("int8")
    return _dw_module((1, 96, 56, 56), w, 2, 1, 1, x_dtype, None)


def test_threshold_splits_mobilenet_sized_kernels():
    assert 96 * 7 * 7 * 9 < cpu.MIN_PARALLEL_WORK < 96 * 28 * 28 * 9


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
@pytest.mark.parametrize("x_dtype", ["float32", "uint8"])
def test_stride2_depthwise_runs_parallel(target, x_dtype):
    tir = _scheduled_tir(_dw_case(x_dtype), target)
    assert "qcompile_tile" in tir, "the depthwise kernel fell off its tiled schedule"
    assert "T.parallel(" in tir


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
def test_int8_stride1_depthwise_runs_parallel(target):
    w = RNG.integers(-127, 128, (96, 1, 3, 3)).astype("int8")
    tir = _scheduled_tir(_dw_module((1, 96, 28, 28), w, 1, 1, 1, "uint8", None), target)
    assert "dw_pixels" in tir and "T.parallel(" in tir


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
def test_small_int8_depthwise_stays_single_threaded(target):
    """96 ch at 7x7 (42K iterations): a parallel launch would cost more than it saves."""
    w = RNG.integers(-127, 128, (96, 1, 3, 3)).astype("int8")
    tir = _scheduled_tir(_dw_module((1, 96, 7, 7), w, 1, 1, 1, "uint8", None), target)
    assert "conv2d_dw_packed" in tir and "T.parallel(" not in tir


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
def test_small_float_pointwise_keeps_tiled_schedule_and_parallel(target):
    """MobileNetV2's 576 -> 96 1x1 conv at 14x14 (10.8M iterations)."""
    w = RNG.standard_normal((96, 576, 1, 1)).astype("float32")
    bias = RNG.standard_normal((1, 96, 1, 1)).astype("float32")
    tir = _scheduled_tir(conv_module((1, 576, 14, 14), w, 1, 0, bias=bias), target)
    assert "qcompile_tile" in tir, "the 1x1 conv fell off its tiled schedule"
    assert "T.parallel(" in tir


def test_a_failing_default_schedule_is_reported_not_silent(monkeypatch):
    """A packed kernel whose default schedule raises still compiles (generic schedule), but
    with a ScheduleFallbackWarning naming the error."""
    def broken(*_args, **_kwargs):
        raise RuntimeError("tile does not divide")

    monkeypatch.setattr(cpu, "schedule_conv2d_packed", broken)
    monkeypatch.delenv("QCOMPILE_SCHEDULE_DEBUG", raising=False)
    w = RNG.standard_normal((32, 16, 1, 1)).astype("float32")
    bias = RNG.standard_normal((1, 32, 1, 1)).astype("float32")
    with pytest.warns(cpu.ScheduleFallbackWarning, match="tile does not divide"):
        tir = _scheduled_tir(conv_module((1, 16, 14, 14), w, 1, 0, bias=bias), "x86_64-avx2")
    assert "qcompile_tile" not in tir
