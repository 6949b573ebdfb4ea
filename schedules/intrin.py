"""int8 dot-product tensor intrinsics: one tile semantics, several implementations.

Every intrinsic here computes the same ``L x 4`` tile::

    C[i] += int32(A[k]) * int32(B[i, k])      for i < L, k < 4

with ``A`` the 4 activation bytes of one output pixel (contiguous in the
packed ``[N, C/4, H, W, 4]`` activation), ``B`` the packed ``[L, 4]`` weight tile
and ``C`` L int32 accumulators. Implementations:

* ``avx512-vnni``     L=16, u8 x s8, ``vpdpbusd`` (zmm), operands i8x64 as LLVM 22 wants.
* ``avx2-vpmaddubsw`` L=8, u8 x s8, ``vpmaddubsw`` + ``vpmaddwd`` (ymm); exact only when
  int16 pair sums cannot saturate (checked on the packed weights by ``qcompile.layout``).
* ``arm-sdot``        L=4, s8 x s8, NEON ``sdot`` (+dotprod).
* ``portable-<name>`` the same tile as plain TIR loops, for running the packed schedule
  bit-exact on a machine without the instruction.

Each family lives in its own module (``x86``, ``arm``, ``cuda``); they are defined and
registered lazily, on first use, so importing ``qcompile.schedules`` stays cheap (TVMScript
parsing costs ~50 ms per function here; TVM's own ``tvm.s_tir.tensor_intrin`` is never
imported).
"""

from __future__ import annotations

import functools

LANES = {"avx512-vnni": 16, "avx2-vpmaddubsw": 8, "arm-sdot": 4}
ACT_DTYPE = {"avx512-vnni": "uint8", "avx2-vpmaddubsw": "uint8", "arm-sdot": "int8"}


def make_desc(lanes: int, act_dtype: str, scope: str = "global"):
    """The tile semantics as a TIR PrimFunc (also the portable implementation)."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), act_dtype, offset_factor=1),
        B: T.Buffer((lanes, 4), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _impl(name: str, scope: str):
    if name == "avx512-vnni":
        from .x86 import vnni_16x4_impl

        return vnni_16x4_impl(scope)
    if name == "avx2-vpmaddubsw":
        from .x86 import avx2_8x4_impl

        return avx2_8x4_impl(scope)
    if name == "arm-sdot":
        from .arm import sdot_4x4_impl

        return sdot_4x4_impl(scope)
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def get_intrin(name: str, portable: bool = False, scope: str = "local") -> str:
    """Register (once) and return the TensorIntrin name for family ``name``."""
    from tvm.s_tir import TensorIntrin

    lanes, act = LANES[name], ACT_DTYPE[name]
    desc = make_desc(lanes, act, scope)
    impl = make_desc(lanes, act, scope) if portable else _impl(name, scope)
    reg = f"qcompile_{'portable_' if portable else ''}{name.replace('-', '_')}_{scope}"
    TensorIntrin.register(reg, desc, impl, override=True)
    return reg


def rule_module_pass(name: str, rule, target):
    """A module pass that schedules every not-yet-scheduled PrimFunc with
    ``rule(func, target) -> Schedule | None``; a rule that raises leaves the kernel to
    the passes after it (``QCOMPILE_SCHEDULE_DEBUG=1`` re-raises, to debug a rule)."""
    import os

    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            try:
                sch = rule(func, target)
            except Exception:  # noqa: BLE001 - the next passes schedule it generically
                if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                    raise
                sch = None
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
