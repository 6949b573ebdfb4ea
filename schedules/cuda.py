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
                sch = apply_mma_rule(func, target) or apply_dp4a_rule(func, target)
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


# --------------------------------------------------------------------------- s8 tensor cores
# The layout pass turns int8 conv2d/matmul on sm_72+ into GEMMs over zero-padded row-major
# operands (``qcompile.layout``: ``A[Mp, Kp] x W[Np, Kp]^T``). Each warp owns one 16x16 int32
# accumulator fragment; per 16-wide step of K, the block's warps stage their A rows and W rows
# in shared memory (all 32 lanes copy, so every warp is full for wmma), load them into
# fragments and issue one ``wmma::mma_sync`` (PTX ``wmma.mma.sync ... s32.s8.s8.s32``).
# The five warp-level operations are TensorIntrins written here (TVM's own module is not
# imported: it costs about a minute here). Their descriptions are the plain-TIR semantics;
# the same GEMM with those semantics runs on the CPU in the tests (``portable-cuda-mma``).
MMA_KINDS = ("conv2d_mma_int8", "matmul_mma_int8")
WMMA = 16  # m16n16k16


def _frag_index(buf, row_stride):
    """Which 16x16 fragment of a fragment-scope buffer ``buf`` starts at its elem_offset."""
    per_row = row_stride // WMMA
    return buf.elem_offset // row_stride // WMMA * per_row + buf.elem_offset % row_stride // WMMA


def _wmma_intrins():
    """(name, desc, impl) of the five s8 wmma operations, 16x16 tiles, int64 loops."""
    from tvm.script import tirx as T

    n16 = T.int64(WMMA)

    def copy_desc(src_scope, dst_scope, dtype):
        @T.prim_func(s_tir=True)
        def desc(a: T.handle, c: T.handle) -> None:
            A = T.match_buffer(a, (WMMA, WMMA), dtype, offset_factor=WMMA, scope=src_scope)
            C = T.match_buffer(c, (WMMA, WMMA), dtype, offset_factor=WMMA, scope=dst_scope)
            with T.sblock("root"):
                T.reads(A[0:WMMA, 0:WMMA])
                T.writes(C[0:WMMA, 0:WMMA])
                for i, j in T.grid(n16, n16):
                    with T.sblock("copy"):
                        vi, vj = T.axis.remap("SS", [i, j])
                        C[vi, vj] = A[vi, vj]
        return desc

    def load_impl(frag_scope, layout):
        @T.prim_func(s_tir=True)
        def impl(a: T.handle, c: T.handle) -> None:
            s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
            A = T.match_buffer(a, (WMMA, WMMA), "int8", offset_factor=WMMA, scope="shared",
                               strides=[s1, s0])
            C = T.match_buffer(c, (WMMA, WMMA), "int8", offset_factor=WMMA, scope=frag_scope,
                               strides=[d1, d0])
            with T.sblock("root"):
                T.reads(A[0:WMMA, 0:WMMA])
                T.writes(C[0:WMMA, 0:WMMA])
                T.evaluate(T.tvm_load_matrix_sync(C.data, WMMA, WMMA, WMMA, _frag_index(C, d1),
                                                  A.access_ptr("r", ptr_type="int8"), s1,
                                                  layout, dtype="void"))
        return impl

    @T.prim_func(s_tir=True)
    def fill_desc(c: T.handle) -> None:
        C = T.match_buffer(c, (WMMA, WMMA), "int32", offset_factor=WMMA,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WMMA, 0:WMMA])
            for i, j in T.grid(n16, n16):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.int32(0)

    @T.prim_func(s_tir=True)
    def fill_impl(c: T.handle) -> None:
        d1, d0 = T.int32(), T.int32()
        C = T.match_buffer(c, (WMMA, WMMA), "int32", offset_factor=WMMA,
                           scope="wmma.accumulator", strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WMMA, 0:WMMA])
            T.evaluate(T.tvm_fill_fragment(C.data, WMMA, WMMA, WMMA, _frag_index(C, d1),
                                           T.int32(0), dtype="void"))

    @T.prim_func(s_tir=True)
    def store_impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (WMMA, WMMA), "int32", offset_factor=WMMA,
                           scope="wmma.accumulator", strides=[d1, d0])
        C = T.match_buffer(c, (WMMA, WMMA), "int32", offset_factor=WMMA, scope="global",
                           strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:WMMA, 0:WMMA])
            T.writes(C[0:WMMA, 0:WMMA])
            T.evaluate(T.tvm_store_matrix_sync(A.data, WMMA, WMMA, WMMA, _frag_index(A, d1),
                                               C.access_ptr("w", ptr_type="int32"), s1,
                                               "row_major", dtype="void"))

    # C[i, j] += A[i, k] * W[j, k]: W's fragment is [n, k], i.e. wmma's col-major B.
    @T.prim_func(s_tir=True)
    def sync_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WMMA, WMMA), "int8", offset_factor=WMMA, scope="wmma.matrix_a")
        B = T.match_buffer(b, (WMMA, WMMA), "int8", offset_factor=WMMA, scope="wmma.matrix_b")
        C = T.match_buffer(c, (WMMA, WMMA), "int32", offset_factor=WMMA,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:WMMA, 0:WMMA], A[0:WMMA, 0:WMMA], B[0:WMMA, 0:WMMA])
            T.writes(C[0:WMMA, 0:WMMA])
            for i, j, k in T.grid(n16, n16, n16):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk],
                                                                                "int32")

    @T.prim_func(s_tir=True)
    def sync_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1, a0, b1, b0, c1, c0 = (T.int32(), T.int32(), T.int32(), T.int32(), T.int32(),
                                  T.int32())
        A = T.match_buffer(a, (WMMA, WMMA), "int8", offset_factor=WMMA, scope="wmma.matrix_a",
                           strides=[a1, a0])
        B = T.match_buffer(b, (WMMA, WMMA), "int8", offset_factor=WMMA, scope="wmma.matrix_b",
                           strides=[b1, b0])
        C = T.match_buffer(c, (WMMA, WMMA), "int32", offset_factor=WMMA,
                           scope="wmma.accumulator", strides=[c1, c0])
        with T.sblock("root"):
            T.reads(C[0:WMMA, 0:WMMA], A[0:WMMA, 0:WMMA], B[0:WMMA, 0:WMMA])
            T.writes(C[0:WMMA, 0:WMMA])
            T.evaluate(T.tvm_mma_sync(C.data, _frag_index(C, c1), A.data, _frag_index(A, a1),
                                      B.data, _frag_index(B, b1), C.data, _frag_index(C, c1),
                                      dtype="void"))

    return {
        "load_a": (copy_desc("shared", "wmma.matrix_a", "int8"),
                   load_impl("wmma.matrix_a", "row_major")),
        "load_b": (copy_desc("shared", "wmma.matrix_b", "int8"),
                   load_impl("wmma.matrix_b", "col_major")),
        "fill": (fill_desc, fill_impl),
        "store": (copy_desc("wmma.accumulator", "global", "int32"), store_impl),
        "sync": (sync_desc, sync_impl),
    }


@functools.lru_cache(maxsize=None)
def get_wmma_s8_intrins() -> dict[str, str]:
    """Register (once) qcompile's s8 wmma TensorIntrins; returns role -> registered name."""
    from tvm.s_tir import TensorIntrin

    names = {}
    for role, (desc, impl) in _wmma_intrins().items():
        names[role] = f"qcompile_wmma_s8_{role}"
        TensorIntrin.register(names[role], desc, impl, override=True)
    return names


def _divisor_at_most(extent: int, cap: int) -> int:
    return max(d for d in range(1, min(cap, extent) + 1) if extent % d == 0)


WARPS_M, WARPS_N = 2, 4  # warps per block (at most; divisors of the tile counts are used)


def apply_mma_rule(func, target):
    """Schedule an s8 tensor-core GEMM kernel (``conv2d_mma_int8`` / ``matmul_mma_int8``);
    None when ``func`` holds none."""
    from .cpu import _annotation, _is_spatial, _root_blocks

    sch = s_tir.Schedule(func)
    block = next((b for b in _root_blocks(sch)
                  if str(_annotation(sch, b, KERNEL_ATTR, "")) in MMA_KINDS), None)
    if block is None:
        return None
    if str(_annotation(sch, block, INTRIN_ATTR, "")) != "cuda-mma":
        return None  # the portable form is for CPU builds
    names = get_wmma_s8_intrins()
    i, j, k = sch.get_loops(block)
    i0, i1 = sch.split(i, [None, WMMA])
    j0, j1 = sch.split(j, [None, WMMA])
    k0, k1 = sch.split(k, [None, WMMA])
    wm = _divisor_at_most(int(sch.get(i0).extent), WARPS_M)
    wn = _divisor_at_most(int(sch.get(j0).extent), WARPS_N)
    bi, wi = sch.split(i0, [None, wm])
    bj, wj = sch.split(j0, [None, wn])
    sch.reorder(bi, bj, wi, wj, k0, i1, j1, k1)
    producers = [p for p in sch.get_producers(block) if _is_spatial(sch, p)]
    acc = sch.cache_write(block, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, wj)
    a_sh = sch.cache_read(block, 0, "shared")
    b_sh = sch.cache_read(block, 1, "shared")
    a_fr = sch.cache_read(block, 0, "wmma.matrix_a")
    b_fr = sch.cache_read(block, 1, "wmma.matrix_b")
    for stage in (a_fr, b_fr, a_sh, b_sh):  # consumers first
        sch.compute_at(stage, k0)
    sch.bind(bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    sch.bind(sch.fuse(wi, wj), "threadIdx.y")
    for stage in (a_sh, b_sh):  # this warp's 16x16 slice, copied by its 32 lanes, 4 bytes each
        loops = sch.get_loops(stage)[-2:]
        fused = sch.fuse(*loops)
        _, tx, vec = sch.split(fused, [None, 32, 4])
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
    init = sch.decompose_reduction(block, k0)
    sch.tensorize(sch.get_loops(init)[-2], names["fill"])
    sch.tensorize(sch.get_loops(a_fr)[-2], names["load_a"])
    sch.tensorize(sch.get_loops(b_fr)[-2], names["load_b"])
    sch.tensorize(i1, names["sync"])
    sch.tensorize(sch.get_loops(acc)[-2], names["store"])
    for prod in producers:
        _bind_spatial(sch, prod)
    for blk in _root_blocks(sch):
        loops = sch.get_loops(blk)
        if loops and all(sch.get(lp).thread_binding is None for lp in loops) \
                and _is_spatial(sch, blk):
            _bind_spatial(sch, blk)
    return sch
