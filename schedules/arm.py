"""ARM int8 tile implementation: NEON ``sdot`` (+dotprod), 4x4 s8*s8 -> s32.

Tile semantics: ``qcompile.schedules.intrin``. Boards without dotprod (Cortex-A72)
use the generic vectorized int8 schedule (LLVM emits smull/sadalp-style code).
"""

from __future__ import annotations

import functools


def sdot_4x4_impl(scope: str = "local"):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4, 4), "int8", offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            A_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            A_i8x16 = T.reinterpret(T.broadcast(A_i32, 4), dtype="int8x16")
            B_i8x16 = B.vload([0, 0], dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"),
                A_i8x16,
                B_i8x16,
                dtype="int32x4",
            )

    return impl


# --------------------------------------------------------------------------- i8mm (smmla)
# Tile semantics (qcompile.layout's i8mm packing), one ``smmla``:
#     C[i, j] += int32(P[i, k]) * int32(Q[j, k])      i, j < 2, k < 8
# P, Q: 2x8 s8 blocks (16 contiguous bytes each), C: the 2x2 s32 accumulator, row-major.
# A matmul tile reads rows of the activation as P and two output channels of the weight as
# Q. A conv tile iterates (channel, pixel) -- NCHW puts channels first -- so there the
# weight is P and the activation Q, and the kernel body reads the activation first: the
# ``swap`` form of the description matches that body (TVM's tensorize compares the
# expression as written).
def i8mm_desc(scope: str = "global", swap: bool = False):
    """The smmla tile as plain TIR loops (also the portable implementation).

    ``swap=False``: ``C[i, j] += A[i, k] * B[j, k]`` (A = P, B = Q);
    ``swap=True``:  ``C[i, j] += A[j, k] * B[i, k]`` (A = Q, B = P)."""
    from tvm.script import tirx as T

    two, eight = T.int64(2), T.int64(8)  # int64: Relax-made kernels index in int64
    if swap:
        @T.prim_func(s_tir=True)
        def desc(
            A: T.Buffer((2, 8), "int8", offset_factor=1),
            B: T.Buffer((2, 8), "int8", offset_factor=1),
            C: T.Buffer((2, 2), "int32", offset_factor=1, scope=scope),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
                T.writes(C[0:2, 0:2])
                for i, j, k in T.grid(two, two, eight):
                    with T.sblock("update"):
                        vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                        C[vi, vj] = C[vi, vj] + T.cast(A[vj, vk], "int32") * T.cast(B[vi, vk],
                                                                                    "int32")
        return desc

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for i, j, k in T.grid(two, two, eight):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk],
                                                                                "int32")
    return desc


def smmla_2x2_impl(scope: str = "global", swap: bool = False):
    """One ``smmla`` (v8.6-A +i8mm): C(2x2 s32) += P(2x8 s8) . Q(2x8 s8)^T."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((2, 8), "int8", offset_factor=1),
        B: T.Buffer((2, 8), "int8", offset_factor=1),
        C: T.Buffer((2, 2), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            C.vstore([0, 0], T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                C.vload([0, 0], dtype="int32x4"),
                (B if swap else A).vload([0, 0], dtype="int8x16"),
                (A if swap else B).vload([0, 0], dtype="int8x16"),
                dtype="int32x4",
            ))

    return impl


@functools.lru_cache(maxsize=None)
def get_i8mm_intrin(portable: bool = False, scope: str = "global", swap: bool = False) -> str:
    """Register (once) and return the smmla TensorIntrin (or its portable twin)."""
    from tvm.s_tir import TensorIntrin

    impl = i8mm_desc(scope, swap) if portable else smmla_2x2_impl(scope, swap)
    name = (f"qcompile_{'portable_' if portable else ''}arm_i8mm{'_swap' if swap else ''}"
            f"_{scope}")
    TensorIntrin.register(name, i8mm_desc(scope, swap), impl, override=True)
    return name


# --------------------------------------------------------------------------- i8mm schedules
I8MM_KINDS = ("conv2d_packed_i8mm", "matmul_packed_i8mm")


def _divisor_at_most(extent: int, cap: int) -> int:
    return max(d for d in range(1, min(cap, extent) + 1) if extent % d == 0)


def _i8mm_tile(sch, rows, cols, reg_rows: int, reg_cols: int):
    """Shared micro-kernel: split ``rows``/``cols`` into smmla pairs, group ``reg_rows`` x
    ``reg_cols`` pairs into one register tile (accumulators in a 2x2-blocked buffer, so
    every smmla reads/writes 4 contiguous int32), reduction outside the tile."""
    from .cpu import _extent

    ro, ri = sch.split(rows, [None, 2])
    co, ci = sch.split(cols, [None, 2])
    t_r = _divisor_at_most(_extent(sch, ro), reg_rows)
    t_c = _divisor_at_most(_extent(sch, co), reg_cols)
    roo, roi = sch.split(ro, [None, t_r])
    coo, coi = sch.split(co, [None, t_c])
    return roo, roi, ri, coo, coi, ci


def schedule_conv2d_i8mm(sch, block, intrin: str, vec_width: int):
    from .cpu import ACC_SCOPE, _inline_epilogue, _parallel, _schedule_producers

    b, o, i, j, rc, rh, rw, r8 = sch.get_loops(block)
    joo, joi, ji, ooo, ooi, oi = _i8mm_tile(sch, j, o, 4, 4)
    sch.reorder(b, ooo, i, joo, rc, rh, rw, joi, ooi, oi, ji, r8)
    _schedule_producers(sch, block, vec_width)
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    sch.transform_layout(block, ("write", 0),
                         lambda n, c, h, w: (n, h, w // 2, c // 2, c % 2, w % 2))
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, joo, preserve_unit_loops=True)
    wl = sch.get_loops(wb)[4:]
    if len(wl) == 4:
        sch.vectorize(wl[3])
    _tile_slice_epilogue(sch, wb, joo)
    _parallel(sch, block, [b, ooo, i])
    _tensorize_i8mm(sch, block, rc, oi, (joi, ooi), intrin, swap=True)


def schedule_matmul_i8mm(sch, block, intrin: str, vec_width: int):
    from .cpu import ACC_SCOPE, _extent, _inline_epilogue, _parallel, _schedule_producers

    i, j, rk, r8 = sch.get_loops(block)
    single_pair = _extent(sch, i) <= 2  # batch-1 dense: a wider tile over output channels
    ioo, ioi, ii, joo, joi, ji = _i8mm_tile(sch, i, j, 2,
                                            8 if single_pair else 4)
    sch.reorder(ioo, joo, rk, ioi, joi, ii, ji, r8)
    _schedule_producers(sch, block, vec_width)
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    sch.transform_layout(block, ("write", 0), lambda m, n: (m // 2, n // 2, m % 2, n % 2))
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, joo, preserve_unit_loops=True)
    wl = sch.get_loops(wb)[2:]
    if len(wl) == 2:
        sch.vectorize(wl[1])
    _tile_slice_epilogue(sch, wb, joo)
    _parallel(sch, block, [ioo, joo])
    _tensorize_i8mm(sch, block, rk, ii, (ioi, joi), intrin)


def _tile_slice_epilogue(sch, wb, tile_loop):
    """When the kernel computes a padded result (output width / channels / rows rounded up
    to whole smmla tiles), its consumer is a slice that ``_inline_epilogue`` cannot fold
    into the tile write-back. Fold the elementwise chain into the slice instead and run
    that per tile, right after the write-back, so the int32 result never makes a round
    trip through a full-size buffer."""
    from .cpu import _inline_epilogue, _is_spatial

    consumers = sch.get_consumers(wb)
    if len(consumers) != 1 or not _is_spatial(sch, consumers[0]):
        return
    sl = consumers[0]
    try:
        _inline_epilogue(sch, sl)
        sch.reverse_compute_at(sl, tile_loop, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001 - leave it as its own loop nest
        return


def _tensorize_i8mm(sch, block, red_loop, tile_loop, unroll, intrin: str, swap: bool = False):
    from .cpu import ACC_SCOPE

    init = sch.decompose_reduction(block, red_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(tile_loop, get_i8mm_intrin(portable=intrin.startswith("portable-"),
                                             scope=ACC_SCOPE, swap=swap))
    for lp in unroll:
        sch.unroll(lp)


def apply_i8mm_rule(func, target):
    """Schedule a packed i8mm conv2d/matmul kernel; None when ``func`` holds none."""
    from tvm import s_tir

    from qcompile.layout import INTRIN_ATTR, KERNEL_ATTR

    from .cpu import _annotation, _root_blocks, _schedule_rest, _vector_width

    sch = s_tir.Schedule(func)
    for block in _root_blocks(sch):
        kind = _annotation(sch, block, KERNEL_ATTR)
        if kind is not None and str(kind) in I8MM_KINDS:
            break
    else:
        return None
    intrin = str(_annotation(sch, block, INTRIN_ATTR, "arm-i8mm"))
    vec = _vector_width(target)
    if str(kind) == "conv2d_packed_i8mm":
        schedule_conv2d_i8mm(sch, block, intrin, vec)
    else:
        schedule_matmul_i8mm(sch, block, intrin, vec)
    _schedule_rest(sch, vec)
    return sch


def apply_arm_i8mm_schedules(target):
    """Module pass: smmla schedules for the i8mm-packed kernels; everything else is left
    to the CPU rules that run after it."""
    from .intrin import rule_module_pass

    return rule_module_pass("qcompile.ApplyARMI8MMSchedules", apply_i8mm_rule, target)
