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
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                              dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
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
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                                  dtype="uint8x32"),
                    B.vload([0, 0], dtype="int8x32"),
                    dtype="int16x16",
                ),
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    return impl


# --------------------------------------------------------------------------- pixel tiles
# The "pixel" tile is the transpose of the tile above: L output *pixels* of one output
# channel, so that the accumulator vector is L consecutive pixels of an NCHW output row
# (contiguous stores, no transpose in the epilogue)::
#
#     C[i] += int32(A[i, k]) * int32(B[k])      for i < L, k < 4
#
# ``A`` is L consecutive pixels x 4 input channels of the packed ``[N, C/4, H, W, 4]``
# activation (4*L contiguous bytes for stride 1), ``B`` the 4 weight bytes of the output
# channel (broadcast to every lane). Same products and sums as the channel tile, so the
# AVX2 saturation rule on the packed weights (``qcompile.layout.vpmaddubsw_exact``) holds.
PIXEL_FAMILIES = ("avx512-vnni", "avx2-vpmaddubsw")


def pixel_desc(lanes: int, scope: str = "global"):
    """The pixel-tile semantics as TIR (also the portable implementation)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((lanes, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    return desc


def vnni_pixel_impl(lanes: int, scope: str = "global"):
    """L pixels (16: zmm, 8: ymm) x 4 u8*s8 -> s32 with one ``vpdpbusd``."""
    from tvm.script import tirx as T

    nbytes = 4 * lanes
    name = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((lanes, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(A.vload([0, 0], f"uint8x{nbytes}"), dtype=f"int8x{nbytes}"),
                T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"),
                                          lanes), dtype=f"int8x{nbytes}"),
                dtype=f"int32x{lanes}",
            )

    return impl


def avx2_pixel_impl(scope: str = "global"):
    """8 pixels x 4 u8*s8 -> s32: ``vpmaddubsw`` (pairs -> s16) then ``vpmaddwd`` by ones."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((8, 4), "uint8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:8, 0:4], B[0:4])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    A.vload([0, 0], "uint8x32"),
                    T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 8),
                                  dtype="int8x32"),
                    dtype="int16x16",
                ),
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    return impl


def pixel_lanes(family: str, width: int) -> int:
    """Pixels per tile for an output row of ``width`` (0: the pixel tile does not fit).

    The tile must divide the row exactly (tensorize takes no predicate): 16 (zmm) or 8
    (ymm) for VNNI, 8 for AVX2.
    """
    base = family.removeprefix("portable-")
    options = (16, 8) if base == "avx512-vnni" else (8,) if base == "avx2-vpmaddubsw" else ()
    for lanes in options:
        if width % lanes == 0:
            return lanes
    return 0


_REGISTERED: dict = {}


def get_pixel_intrin(family: str, lanes: int, scope: str = "global") -> str:
    """Register (once) and return the pixel-tile TensorIntrin for ``family``
    (``portable-<family>``: the same tile as plain TIR loops)."""
    key = (family, lanes, scope)
    if key in _REGISTERED:
        return _REGISTERED[key]
    from tvm.s_tir import TensorIntrin

    base = family.removeprefix("portable-")
    if base not in PIXEL_FAMILIES:
        raise KeyError(family)
    if family.startswith("portable-"):
        impl = pixel_desc(lanes, scope)
    elif base == "avx512-vnni":
        impl = vnni_pixel_impl(lanes, scope)
    else:
        if lanes != 8:
            raise KeyError(f"{family} pixel tile has 8 lanes, not {lanes}")
        impl = avx2_pixel_impl(scope)
    name = f"qcompile_pixel_{family.replace('-', '_')}_{lanes}_{scope}"
    TensorIntrin.register(name, pixel_desc(lanes, scope), impl, override=True)
    _REGISTERED[key] = name
    return name
