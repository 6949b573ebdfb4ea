"""CUDA int8: ``__dp4a`` (sm_61+) for qcompile's packed int8 conv2d / matmul kernels.

The layout pass packs int8 weights as ``[O/4, C/4, KH, KW, 4, 4]`` and the activation as
``[N, C/4, H, W, 4]`` (s8; u8 inputs are shifted by -128 and compensated), so each group of
4 reduction elements is one 32-bit word on both sides: the inner ``r4`` loop is tensorized
to one ``__dp4a``. One thread computes one output element (accumulating in the kernel's
int32 intermediate); the fused epilogue runs as its own thread-bound loop nest. Every other kernel keeps dlight's GPU
rules. Portable reference: the same schedule with the 4-element loop left as plain TIR.
"""

from __future__ import annotations

import functools
import os

from tvm import s_tir

from qcompile.layout import INTRIN_ATTR, KERNEL_ATTR


def dp4a_desc_impl():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((1,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for k in range(T.int64(0), T.int64(4)):  # int64: Relax-made kernels index in int64
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((1,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"),
                                       T.int32(0), dtype="int32")

    return desc, impl


@functools.lru_cache(maxsize=None)
def get_dp4a_intrin(portable: bool = False) -> str:
    from tvm.s_tir import TensorIntrin

    desc, impl = dp4a_desc_impl()
    name = "qcompile_portable_dp4a" if portable else "qcompile_dp4a"
    TensorIntrin.register(name, desc, desc if portable else impl, override=True)
    return name


def _bind_spatial(sch, block, threads: int = 256):
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def apply_dp4a_rule(func, target):
    """Schedule a packed int8 conv2d/matmul for CUDA; None when ``func`` holds none."""
    from .cpu import _annotation, _is_spatial, _root_blocks

    sch = s_tir.Schedule(func)
    block = None
    for blk in _root_blocks(sch):
        kind = _annotation(sch, blk, KERNEL_ATTR)
        if kind is not None and str(kind) in ("conv2d_packed_int8", "matmul_packed_int8"):
            block = blk
            break
    if block is None:
        return None
    intrin = str(_annotation(sch, block, INTRIN_ATTR, ""))
    loops = sch.get_loops(block)
    spatial = loops[:-4] if len(loops) == 8 else loops[:-2]
    red = loops[len(spatial):]
    producers = [p for p in sch.get_producers(block) if _is_spatial(sch, p)]
    # Bind each spatial loop to its own grid axis, unfused: blockize (for tensorize) cannot
    # divide fused thread bindings here. The accumulator is the kernel's global int32
    # intermediate; the epilogue runs as its own thread-bound loop nest.
    *outer, last = spatial
    ext = int(sch.get(last).extent)
    if ext > 256:
        lo, last = sch.split(last, [None, next(t for t in range(256, 0, -1) if ext % t == 0)])
        outer.append(lo)
    outer = [lp for lp in outer if int(sch.get(lp).extent) > 1] or outer[-1:]
    for lp, axis in zip(reversed(outer), ("blockIdx.x", "blockIdx.y", "blockIdx.z")):
        sch.bind(lp, axis)
    sch.bind(last, "threadIdx.x")
    sch.decompose_reduction(block, red[0])
    sch.tensorize(red[-1], get_dp4a_intrin(portable=intrin.startswith("portable-")))
    for prod in producers:
        _bind_spatial(sch, prod)
    for blk in _root_blocks(sch):
        loops = sch.get_loops(blk)
        if loops and all(sch.get(lp).thread_binding is None for lp in loops) \
                and _is_spatial(sch, blk):
            _bind_spatial(sch, blk)
    return sch


def apply_cuda_int8_schedules(target):
    """Module pass: dp4a schedules for the packed int8 kernels (others left to dlight)."""
    import os

    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="qcompile.ApplyCUDAInt8Schedules")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            try:
                sch = apply_dp4a_rule(func, target)
            except Exception:  # noqa: BLE001 - leave it to dlight
                if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                    raise
                sch = None
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
