"""x86 int8 tile implementations: AVX-512 VNNI (vpdpbusd) and AVX2 (vpmaddubsw + vpmaddwd).

Tile semantics: ``qcompile.schedules.intrin`` (C[i] += A[k] * B[i, k], k < 4).
"""

from __future__ import annotations


def vnni_16x4_impl(scope: str = "local"):
    """16x4 u8*s8 -> s32 with one ``vpdpbusd`` (operands i8x64, as LLVM 22 declares it)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_i8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="int8x64")
            B_i8x64 = B.vload([0, 0], dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                A_i8x64,
                B_i8x64,
                dtype="int32x16",
            )

    return impl


def avx2_8x4_impl(scope: str = "local"):
    """8x4 u8*s8 -> s32: ``vpmaddubsw`` (u8*s8 pairs -> s16) then ``vpmaddwd`` by ones."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_u8x32 = T.reinterpret(T.broadcast(A_i32, 8), dtype="uint8x32")
            B_i8x32 = B.vload([0, 0], dtype="int8x32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                A_u8x32,
                B_i8x32,
                dtype="int16x16",
            )
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    return impl
