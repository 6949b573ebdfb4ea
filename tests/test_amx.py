"""Intel AMX int8 conv2d (``qcompile.schedules.amx``, target ``x86_64-amx``).

Numerics: the AMX kernel (layout + schedule + tiles) is compared bit-exact with numpy.
Where this CPU has AMX and Linux grants it, the tile instructions run for real; elsewhere
the same schedule runs with the portable twin of each tile intrinsic (its plain-TIR
description), so the layout and the schedule are still checked. The generated assembly
is inspected for the tile instructions on every x86-64 machine (compile only).
"""

from __future__ import annotations

import platform

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qcompile.layout import _amx_channel_padded  # noqa: E402
from qcompile.schedules.amx import _tile_config, amx_conv_tiles, amx_flat_plane  # noqa: E402
from qcompile.target import amx_permitted, get_target, host_cpu_features  # noqa: E402
from test_schedule_x86_pixels import _conv_int8_module, _np_int8, _scheduled_tir  # noqa: E402
from test_schedules import _compile, _run  # noqa: E402

REAL_AMX = get_target("x86_64-amx").runs_here()
# Where AMX does not run, the portable AMX tiles with the portable VNNI tile for the rest,
# on the AVX2 target (every x86-64 machine here runs it).
TARGET, FORCE = ("x86_64-amx", None) if REAL_AMX else ("x86_64-avx2", "portable-amx-int8")

x86_only = pytest.mark.skipif(platform.machine() != "x86_64",
                              reason="x86-64 code generation needs an x86-64 LLVM host")


def _case_module(c, o, h, w, k, stride, pad, x_dtype, seed):
    rng = np.random.default_rng(seed)
    wt = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)
    bias = rng.integers(-20000, 20000, (1, o, 1, 1)).astype(np.int32)
    scale = rng.uniform(1e-4, 4e-3, (1, o, 1, 1)).astype(np.float32)
    lo, hi = (-128, 128) if x_dtype == "int8" else (0, 256)
    x = rng.integers(lo, hi, (1, c, h, w)).astype(x_dtype)
    mod = _conv_int8_module(x.shape, wt, stride, pad, 1, x_dtype, bias, scale)
    return mod, x, wt, bias, scale


def _reference(x, wt, stride, pad, bias, scale):
    """numpy int8 conv -> requantize; a (2, 1) stride is every other row of stride 1."""
    sh, sw = stride
    if sh == sw:
        return _np_int8(x.astype(np.int64), wt, sh, pad, 1, bias, scale)
    assert sw == 1
    return _np_int8(x.astype(np.int64), wt, 1, pad, 1, bias, scale)[:, :, ::sh]


# (c, o, h, w, kernel, stride, pad, x dtype): every tile shape the planner picks
AMX_CASES = [
    (64, 32, 6, 8, 3, (1, 1), 1, "uint8"),     # 2 channel tiles x 1 pixel tile of 8
    (64, 16, 3, 32, 1, (1, 1), 0, "uint8"),    # 1 channel tile x 2 pixel tiles of 16
    (128, 48, 5, 7, 3, (1, 1), 1, "int8"),     # int8 input (shifted, compensated), 7 wide
    (64, 32, 9, 14, 3, (2, 1), 1, "uint8"),    # row stride 2 (the tile reads every 2nd row)
    (192, 64, 4, 12, 1, (1, 1), 0, "uint8"),   # 3 input-channel blocks, 2 x 2 tiles of 6
    (64, 32, 9, 16, 3, (2, 2), 1, "uint8"),    # stride 2: columns repacked by phase
    (64, 16, 7, 13, 3, (2, 2), 1, "int8"),     # stride 2, odd padded width (15), 7 wide
    (128, 64, 8, 14, 1, (2, 2), 0, "uint8"),   # 1x1 stride 2 (ResNet's downsample)
    (64, 32, 7, 7, 3, (1, 1), 1, "uint8"),     # 7x7 plane: flattened padded plane
    (128, 16, 5, 5, 1, (1, 1), 0, "int8"),     # 1x1 on a 5x5 plane, flat, shifted input
    (96, 32, 6, 14, 3, (1, 1), 1, "uint8"),    # 96 input channels, zero-padded to 128
    (144, 32, 4, 14, 1, (1, 1), 0, "int8"),    # 144 -> 192 (MobileNetV2's), shifted input
]


@x86_only
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: "x".join(map(str, c[:5])) + c[7])
def test_amx_conv_bit_exact(case):
    c, o, h, w, k, stride, pad, x_dtype = case
    mod, x, wt, bias, scale = _case_module(c, o, h, w, k, stride, pad, x_dtype, seed=sum(case[:5]))
    tir = _scheduled_tir(mod, TARGET, FORCE)
    assert "conv2d_packed_amx" in tir and "amx_" in tir, "the AMX kernel was not used"
    oh, ow = ((h + 2 * pad - k) // stride[0] + 1, (w + 2 * pad - k) // stride[1] + 1)
    cp = _amx_channel_padded(wt).shape[1]  # the planner sees the zero-padded channels
    flat = amx_flat_plane(cp, o, (oh, ow), (k, k), stride, (1, 1), 1) is not None
    assert ("pack_amx_flat" in tir) == flat, "the flat plane exactly where planned"
    got = _run(_compile(mod, TARGET, FORCE), x)
    np.testing.assert_array_equal(got, _reference(x, wt, stride, pad, bias, scale))


@x86_only
def test_amx_instructions_and_permission_request():
    """The AMX kernel's assembly holds the tile instructions, and the kernel asks Linux
    for the tile state (arch_prctl via syscall) before its first tile instruction."""
    mod, *_ = _case_module(64, 32, 4, 16, 3, (1, 1), 1, "uint8", seed=3)
    ex = _compile(mod, "x86_64-amx")
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
    for instr in ("ldtilecfg", "tilezero", "tileloadd", "tdpbsud", "tilestored"):
        assert instr in asm, f"{instr} missing from the AMX kernel"
    assert "syscall" in asm
    tir = _scheduled_tir(mod, "x86_64-amx")
    assert tir.index('"syscall", 158, 4131, 18') < tir.index("llvm.x86.ldtilecfg")


@x86_only
def test_convs_that_do_not_fit_amx_tiles_take_vnni():
    """Input channels half padding at 64, or stride 3 across: the VNNI kernel, exact."""
    for c, stride in ((32, (1, 1)), (64, (3, 3))):
        mod, x, wt, bias, scale = _case_module(c, 32, 8, 16, 3, stride, 1, "uint8", seed=c)
        tir = _scheduled_tir(mod, TARGET, FORCE)
        assert "conv2d_packed_amx" not in tir and "conv2d_packed_int8" in tir
        if stride == (1, 1):
            got = _run(_compile(mod, TARGET, FORCE), x)
            np.testing.assert_array_equal(got, _reference(x, wt, stride, 1, bias, scale))


def test_tile_planner():
    assert amx_conv_tiles(64, 64, 56, (3, 3), (1, 1), (1, 1), 1) == (2, 2, 14)
    assert amx_conv_tiles(512, 512, 7, (3, 3), (1, 1), (1, 1), 1) == (2, 1, 7)
    assert amx_conv_tiles(64, 48, 16, (1, 1), (1, 1), (1, 1), 1) == (1, 1, 16)
    assert amx_conv_tiles(64, 64, 3, (3, 3), (1, 1), (1, 1), 1) is None  # too narrow
    assert amx_conv_tiles(64, 64, 17, (3, 3), (1, 1), (1, 1), 1) is None  # prime width > 16
    assert amx_conv_tiles(32, 64, 16, (1, 1), (1, 1), (1, 1), 1) is None  # C % 64
    assert amx_conv_tiles(64, 24, 16, (1, 1), (1, 1), (1, 1), 1) is None  # O % 16
    assert amx_conv_tiles(64, 64, 8, (3, 3), (2, 2), (1, 1), 1) == (2, 1, 8)
    assert amx_conv_tiles(64, 64, 16, (3, 3), (1, 3), (1, 1), 1) is None  # stride 3 across
    assert amx_conv_tiles(64, 64, 16, (3, 3), (1, 1), (2, 2), 1) is None  # dilation
    assert amx_conv_tiles(64, 64, 16, (3, 3), (1, 1), (1, 1), 2) is None  # groups


def test_flat_plane_planner():
    # 7x7 (ResNet's last stage): 49 of 64 columns flat vs 7 of 16 per row
    assert amx_flat_plane(512, 512, (7, 7), (3, 3), (1, 1), (1, 1), 1) == ((2, 2, 16), 64)
    assert amx_flat_plane(64, 48, (5, 5), (1, 1), (1, 1), (1, 1), 1) == ((1, 2, 16), 32)
    # 14- and 56-wide rows fill their tiles as well as a flat plane would: rows
    assert amx_flat_plane(256, 256, (14, 14), (3, 3), (1, 1), (1, 1), 1) is None
    assert amx_flat_plane(64, 64, (56, 56), (3, 3), (1, 1), (1, 1), 1) is None
    # a prime width with no row tile at all: flat
    assert amx_flat_plane(64, 64, (17, 17), (3, 3), (1, 1), (1, 1), 1) is not None
    assert amx_flat_plane(64, 64, (7, 7), (3, 3), (2, 2), (1, 1), 1) is None  # stride 2
    assert amx_flat_plane(48, 64, (7, 7), (3, 3), (1, 1), (1, 1), 1) is None  # C % 64


def test_channel_padding_rule():
    rng = np.random.default_rng(0)
    for (c, k), padded in {(96, 1): 128, (144, 1): 192, (160, 3): 192, (48, 3): 64,
                           (32, 1): None,   # half of 64 would be padding
                           (48, 1): None,   # a 64-deep reduction: VNNI is as fast
                           (64, 3): None,   # nothing to pad
                           (50, 3): None}.items():  # not whole 4-channel groups
        w = rng.integers(-128, 128, (16, c, k, k)).astype(np.int8)
        got = _amx_channel_padded(w)
        if padded is None:
            assert got is w
        else:
            assert got.shape == (16, padded, k, k) and not got[:, c:].any()
            np.testing.assert_array_equal(got[:, :c], w)


def test_tile_config_bytes():
    """ldtilecfg's operand: palette 1; C tiles 16 rows x 4N bytes, A 16 x 64, B 16 x 4N."""
    raw = b"".join(v.to_bytes(8, "little", signed=True) for v in _tile_config(2, 1, 7))
    assert raw[0] == 1 and raw[1:16] == bytes(15)
    colsb = [int.from_bytes(raw[16 + 2 * t:18 + 2 * t], "little") for t in range(8)]
    rows = list(raw[48:56])
    assert colsb == [28, 28, 0, 0, 64, 64, 28, 0]
    assert rows == [16, 16, 0, 0, 16, 16, 16, 0]


def test_amx_target_runs_only_where_granted():
    spec = get_target("x86_64-amx")
    assert spec.int8_intrinsic == "amx-int8"
    cpu_has_amx = platform.machine() == "x86_64" and {
        "amx_int8", "amx_tile", "avx512_vnni"} <= host_cpu_features()
    assert spec.runs_here() == (cpu_has_amx and amx_permitted())
    if spec.runs_here():
        assert get_target("host").name == "x86_64-amx"


def test_amx_plan_only_on_amx_targets():
    from qcompile.layout import plan_for_target

    assert plan_for_target(get_target("x86_64-amx").tvm_target()).amx == "amx-int8"
    assert plan_for_target(get_target("x86_64-avx512-vnni").tvm_target()).amx == ""
    forced = plan_for_target(get_target("x86_64-avx2").tvm_target(), "portable-amx-int8")
    assert (forced.amx, forced.int8_intrin) == ("portable-amx-int8", "portable-avx512-vnni")


def test_amx_kernel_in_a_relax_vm_matches_vnni_kernel():
    """Same module through the AMX and the VNNI paths: identical outputs."""
    mod, x, *_ = _case_module(64, 64, 6, 28, 3, (1, 1), 1, "uint8", seed=11)
    amx = _run(_compile(mod, TARGET, FORCE), x)
    vnni_target = "x86_64-avx512-vnni" if REAL_AMX else "x86_64-avx2"
    vnni = _run(_compile(mod, vnni_target, None if REAL_AMX else "portable-avx512-vnni"), x)
    np.testing.assert_array_equal(amx, vnni)


@x86_only
def test_tuning_leaves_amx_kernels_out():
    """An AMX conv's schedule is fixed by its tiles: ``qcompile tune`` extracts no task for
    it, while the VNNI kernel of a conv that does not fit stays a task."""
    from qcompile.schedules.amx import holds_amx_kernel
    from qcompile.tune import extract_tasks

    spec = get_target("x86_64-amx")
    amx_mod, *_ = _case_module(64, 32, 4, 16, 3, (1, 1), 1, "uint8", seed=5)
    vnni_mod, *_ = _case_module(32, 32, 4, 16, 3, (1, 1), 1, "uint8", seed=6)
    assert extract_tasks(amx_mod, spec) == []
    tasks = extract_tasks(vnni_mod, spec)
    assert tasks and not any(holds_amx_kernel(t.dispatched[0]) for t in tasks)


def test_a_failing_amx_schedule_warns_and_falls_back(monkeypatch):
    """A bug in the AMX rule must not fail the build nor pass silently: a
    ScheduleFallbackWarning, then the generic schedule computes the same result."""
    from qcompile.schedules import amx
    from qcompile.schedules.cpu import ScheduleFallbackWarning

    def broken(*_a, **_k):
        raise RuntimeError("tensorize mismatch")

    monkeypatch.delenv("QCOMPILE_SCHEDULE_DEBUG", raising=False)
    monkeypatch.setattr(amx, "schedule_conv2d_amx", broken)
    mod, x, wt, bias, scale = _case_module(64, 16, 3, 8, 3, (1, 1), 1, "uint8", seed=8)
    with pytest.warns(ScheduleFallbackWarning, match="AMX schedule of .* tensorize mismatch"):
        ex = _compile(mod, TARGET, FORCE)
    np.testing.assert_array_equal(_run(ex, x), _reference(x, wt, (1, 1), 1, bias, scale))
