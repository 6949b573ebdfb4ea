"""ARM int8 tile implementation: NEON ``sdot`` (+dotprod), 4x4 s8*s8 -> s32.

Tile semantics: ``qcompile.schedules.intrin``. Boards without dotprod (Cortex-A72)
use the generic vectorized int8 schedule (LLVM emits smull/sadalp-style code).
"""

from __future__ import annotations


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
