"""CUDA int8: ``__dp4a`` (sm_61+) for qcompile's packed int8 conv2d / matmul kernels.

The layout pass packs int8 weights as ``[O/4, C/4, KH, KW, 4, 4]`` and the activation as
``[N, C/4, H, W, 4]`` (s8; u8 inputs are shifted by -128 and compensated), so each group of
4 reduction elements is one 32-bit word on both sides: the inner ``r4`` loop is tensorized
to one ``__dp4a``. Each thread computes a register tile of 4 output channels x up to 4
output pixels (``apply_dp4a_rule``); the fused epilogue runs as its own thread-bound loop
nest. Every other kernel keeps dlight's GPU rules. Portable reference: the same schedule
with the 4-element loop left as plain TIR. sm_72+ targets use the s8 tensor-core GEMMs
below instead (``apply_mma_rule``).
"""

from __future__ import annotations

import functools

from tvm import s_tir

from qcompile.layout import INTRIN_ATTR, KERNEL_ATTR, LANES_ATTR


def dp4a_desc_impl(scope: str = "global"):
    """The dp4a tile (C[0] += A[0:4] . B[0:4]); ``scope``: the accumulator's storage."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "int8", offset_factor=1),
        B: T.Buffer((4,), "int8", offset_factor=1),
        C: T.Buffer((1,), "int32", offset_factor=1, scope=scope),
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
        C: T.Buffer((1,), "int32", offset_factor=1, scope=scope),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"),
                                       T.int32(0), dtype="int32")

    return desc, impl


@functools.lru_cache(maxsize=None)
def get_dp4a_intrin(portable: bool = False, scope: str = "global") -> str:
    from tvm.s_tir import TensorIntrin

    desc, impl = dp4a_desc_impl(scope)
    name = f"qcompile_{'portable_' if portable else ''}dp4a_{scope}"
    TensorIntrin.register(name, desc, desc if portable else impl, override=True)
    return name


def _bind_spatial(sch, block, threads: int = 256):
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


DP4A_TILE = 4  # output pixels (conv) / rows (matmul) per thread, x 4 packed channels


def _divisor_at_most(extent: int, cap: int) -> int:
    return max(d for d in range(1, min(cap, extent) + 1) if extent % d == 0)


def _bind_unfused(sch, spatial):
    """Bind the last spatial loop to threadIdx.x and, for a conv's (b, oc, oh, ow-tile)
    nest, the output rows to threadIdx.y (up to 256 threads a block), the rest to the grid."""
    *outer, last = spatial
    ext = int(sch.get(last).extent)
    if ext > 256:
        lo, last = sch.split(last, [None, _divisor_at_most(ext, 256)])
        outer.append(lo)
    sch.bind(last, "threadIdx.x")
    tx = int(sch.get(last).extent)
    if len(outer) >= 3 and tx < 256:  # conv: rows of the output next to threadIdx.x
        rows = outer.pop()
        ty = _divisor_at_most(int(sch.get(rows).extent), max(1, 256 // tx))
        ro, ri = sch.split(rows, [None, ty])
        sch.bind(ri, "threadIdx.y")
        outer.append(ro)
    outer = [lp for lp in outer if int(sch.get(lp).extent) > 1]
    for lp, axis in zip(reversed(outer), ("blockIdx.x", "blockIdx.y", "blockIdx.z")):
        sch.bind(lp, axis)


def apply_dp4a_rule(func, target):
    """Schedule a packed int8 conv2d/matmul for CUDA; None when ``func`` holds none.

    Each thread owns a register tile: the 4 output channels of one packed weight group x up
    to ``DP4A_TILE`` output pixels (conv) or rows (matmul). Per 4-deep reduction step it
    loads one 16-byte weight group and one word per pixel and issues up to 16 ``__dp4a``,
    so a weight word feeds several pixels and an activation word 4 channels (a thread per
    output element loaded two words per dp4a). Accumulators live in registers; the tile is
    written back once, the fused epilogue runs as its own thread-bound loop nest."""
    from .cpu import _annotation, _inline_epilogue, _is_spatial, _root_blocks

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
    lanes = int(_annotation(sch, block, LANES_ATTR, 4))
    producers = [p for p in sch.get_producers(block) if _is_spatial(sch, p)]
    loops = sch.get_loops(block)
    if len(loops) == 8:  # conv: b, o, i, j, rc, rh, rw, r4
        b, o, i, j, rc, _, _, r4 = loops
        oo, oi = sch.split(o, [None, lanes])
        jo, ji = sch.split(j, [None, _divisor_at_most(int(sch.get(j).extent), DP4A_TILE)])
        sch.reorder(b, oo, i, jo, *loops[4:7], ji, oi, r4)
        spatial, red0, tile = [b, oo, i, jo], rc, (ji, oi)
    else:  # matmul: i, j, rk, r4
        i, j, rk, r4 = loops
        jo, ji = sch.split(j, [None, lanes])
        io, ii = sch.split(i, [None, _divisor_at_most(int(sch.get(i).extent), DP4A_TILE)])
        sch.reorder(io, jo, rk, ii, ji, r4)
        spatial, red0, tile = [io, jo], rk, (ii, ji)
    acc = sch.cache_write(block, 0, "local")
    _inline_epilogue(sch, acc)  # bias/requant/ReLU applied to the registers on write-back
    sch.reverse_compute_at(acc, spatial[-1])
    # Each spatial loop on its own grid/thread axis, unfused: blockize (inside tensorize)
    # fails on fused thread bindings here (int32 extent on an int64 iter var, TVM 0.27).
    _bind_unfused(sch, spatial)
    sch.decompose_reduction(block, red0)
    sch.tensorize(r4, get_dp4a_intrin(portable=intrin.startswith("portable-"), scope="local"))
    for lp in tile:
        sch.unroll(lp)
    for prod in producers:
        _bind_spatial(sch, prod)
    _bind_rest(sch)
    return sch


def _bind_rest(sch):
    """Thread-bind every root nest left unbound (slices, epilogues), each elementwise chain
    folded into one nest first: one kernel launch per chain instead of one per op."""
    from .cpu import _inline_epilogue, _is_spatial, _root_blocks

    def unbound(blk):
        loops = sch.get_loops(blk)
        return bool(loops) and _is_spatial(sch, blk) \
            and all(sch.get(lp).thread_binding is None for lp in loops)

    folded = True
    while folded:  # inlining removes blocks: rescan after each fold
        folded = False
        roots = _root_blocks(sch)
        for blk in roots:
            if unbound(blk):
                _inline_epilogue(sch, blk)
                if len(_root_blocks(sch)) < len(roots):
                    folded = True
                    break
    for blk in _root_blocks(sch):
        loops = sch.get_loops(blk)
        if loops and all(sch.get(lp).thread_binding is None for lp in loops) \
                and _is_spatial(sch, blk):
            _bind_spatial(sch, blk)


def apply_cuda_int8_schedules(target):
    """Module pass: tensor-core (sm_72+) or dp4a schedules for the packed int8 kernels
    (others left to dlight)."""
    from .intrin import rule_module_pass

    def rule(func, tgt):
        return apply_mma_rule(func, tgt) or apply_dp4a_rule(func, tgt)

    return rule_module_pass("qcompile.ApplyCUDAInt8Schedules", rule, target)


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
    _bind_rest(sch)
    return sch
