"""Default CPU schedules (no tuning): a small rule set in the spirit of ``tvm.s_tir.dlight``.

``ApplyCPUSchedules(target)`` is a module pass over the fused TIR kernels:

1. Kernels built by ``qcompile.layout`` (reduction block annotated ``qcompile_kernel``):
   packed conv2d / matmul, float and int8, with their fused epilogue.  Register-tiled
   micro-kernel: ``lanes`` output channels (the packed axis, one vector) x ``tw`` output
   pixels (unrolled) of accumulators in a local buffer; reduction loops outside; the
   epilogue (bias, requantize, ReLU/Clip, residual add, channel slice) is inlined into
   the write-back of each tile; the outer spatial loops are fused and parallelized.
   int8 tiles are tensorized with the target's dot-product intrinsic (``schedules.intrin``).
   Activations are NCHW between kernels, so a channel-vector tile needs a transposing
   write-back; where the output row fits, the *pixel-vector* kernels are used instead
   (accumulators = output rows, epilogue vectorized along the row, contiguous stores):
   int8 conv stride 1 on x86 (``x86.get_pixel_intrin``: 16 or 8 pixels x 4 channels,
   broadcast weights), float 1x1 conv, and depthwise as rows of one channel read from a
   per-channel padded plane (de-interleaved even/odd columns for stride 2).
2. dlight's CPU GEMV / Reduction rules.
3. Anything else: outer data-parallel loops parallelized, innermost loop vectorized.

Traps handled here (each measured): a bounds test (padding) on vector lanes makes TVM's
vectorizer scalarize the loop, so padding stages are split into a zero fill and an
unpredicated copy (``decompose_padding``); TVM 0.27 does not mark ``nearbyint`` (the
requantize rounding) vectorizable, so ``allow_vector_nearbyint`` registers it; odd vector
lengths (<28 x float>) compile lane by lane, so pixel tiles are whole vectors only.

Each rule works on a copy of the function; if it raises, the next rule is tried and
finally the kernel is left as it was: a rule that does not match never fails a build.
"""

from __future__ import annotations

import os
import warnings

from tvm import s_tir, tirx

from qcompile.layout import INTRIN_ATTR, KERNEL_ATTR, LANES_ATTR, PACK_NCHW4C

# Scope of the per-tile accumulators. "global": a small constant-size global allocation
# inside the parallel loop is lowered to a stack alloca (registers after LLVM's SROA);
# "local" would go through TVMBackendAllocWorkspace on every parallel iteration.
ACC_SCOPE = "global"
# Write-back of a conv tile [pixels x channels] to NCHW: vectorized along "w" (pixels,
# contiguous stores) or "o" (channels, strided stores).
WB_VECTOR = "w"
# Pixels per conv register tile (accumulators = pixels x 1 vector): None = by ISA
# (16 with AVX-512's 32 vector registers, 8 with AVX2's / NEON's 16).
TILE_W_MAX: int | None = None
# float conv on AVX-512: output-channel vectors per register tile (1 or 2; 2 is used
# for output widths <= 28, where it measured faster: 512ch@7x7 7.9 -> 3.7 ms).
FLOAT_OC_VECS = 2
# float conv on AVX2 (16 ymm registers): channel vectors per tile, and the tile's pixels
# with two vectors (2 x 4 accumulators; measured 128ch 28x28 3.75 -> 3.22 ms, 512ch 7x7
# 5.27 -> 4.74 ms; 6 pixels was slower at 7 wide: a ragged tile).
FLOAT_OC_VECS_AVX2 = 2
AVX2_TW_2VEC = 4


# A nest with less work than this (iterations of its loops, all levels) runs on one thread:
# a parallel launch costs microseconds, and on a loaded machine waiting for a descheduled
# worker costs milliseconds. conv/matmul kernels split from 64K iterations: MobileNetV2
# fp32 at 2 threads 11.15 -> 9.14 ms (its depthwise and 7x7/14x14 1x1 convs were
# single-threaded at 4M). 8-bit kernels kept 4M while their parallel form ran much slower
# even at 1 thread: LLVM compiled the predicated stride-2 depthwise padding copy worse
# inside the outlined parallel body (1.39 vs 0.80 ms for 96 ch 112x112; fixed in
# ``_schedule_pad_copy``). Since then, in-process A/B of 4M vs 64K for 8-bit kernels:
# MobileNetV2 int8 5.80 -> 5.35 ms at 2 threads, 9.16 -> 9.27 at 1; ResNet-18 int8
# 8.54 -> 8.09 at 2, 12.32 -> 13.08 at 1 (2 threads is the deployment default here).
MIN_PARALLEL_WORK = 1 << 16
# elementwise nests (padding, leftover epilogues): one iteration is one element
SPATIAL_MIN_PARALLEL_WORK = 1 << 19


def _work(sch, block) -> int:
    total = 1
    for lp in sch.get_loops(block):
        e = _extent(sch, lp)
        total *= e if e is not None else 1 << 20
    return total


def _big_enough(sch, block) -> bool:
    return _work(sch, block) >= MIN_PARALLEL_WORK


def _parallel(sch, block, loops):
    """Fuse ``loops`` and run them in parallel when ``block``'s nest is big enough."""
    if not _OVERRIDES.get("parallel", _big_enough(sch, block)):
        return
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def _tile_w_max(vec_width: int) -> int:
    if TILE_W_MAX is not None:
        return TILE_W_MAX
    return 16 if vec_width >= 16 else 8



# --------------------------------------------------------------------------- tunable decisions
# Default compile: each choice below is the heuristic's value as a plain int (no sampling
# instruction in the trace). Inside ``tunable()`` (the design space ``qcompile tune``
# searches) each becomes a sampling instruction whose decision is the heuristic's value:
# tile splits are ``sample_perfect_tile`` (exact tiles only, as tensorize needs; mutated by
# MetaSchedule's MutateTileSize), other counts ``sample_categorical`` (re-drawn for the
# initial population, the heuristic's value drawn with probability HEURISTIC_PROB).
_TUNABLE = False
_OVERRIDES: dict = {}
HEURISTIC_PROB = 0.5


def _split_tile(sch, loop, inner: int, max_inner: int):
    """``sch.split(loop, [None, inner])``; tunable: the inner factor is a sampled tile."""
    ext = _extent(sch, loop)
    if not _TUNABLE or ext is None or ext < 2 or ext % inner:
        return sch.split(loop, [None, inner])
    factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max(max_inner, inner),
                                      decision=[ext // inner, inner])
    return sch.split(loop, factors)


def _choice(sch, candidates, default: int):
    """``default``; tunable: a categorical sample over ``candidates`` deciding ``default``."""
    cands = sorted(set(candidates) | {default})
    if not _TUNABLE or len(cands) < 2:
        return default
    idx = cands.index(default)
    rest = (1.0 - HEURISTIC_PROB) / (len(cands) - 1)
    probs = [HEURISTIC_PROB if k == idx else rest for k in range(len(cands))]
    return sch.sample_categorical(cands, probs, decision=idx)


class tunable:  # noqa: N801 - used as a context manager, like a function
    """Context: the schedule rules emit their choices as sampling instructions;
    ``overrides`` forces structural choices (``rows_outer``, ``int8_pixels``)."""

    def __init__(self, overrides: dict | None = None):
        self.overrides = dict(overrides or {})

    def __enter__(self):
        global _TUNABLE, _OVERRIDES
        self._saved = (_TUNABLE, _OVERRIDES)
        _TUNABLE, _OVERRIDES = True, self.overrides
        return self

    def __exit__(self, *exc):
        global _TUNABLE, _OVERRIDES
        _TUNABLE, _OVERRIDES = self._saved
        return False


# Structural variants of a packed kernel, each its own design space (a Python branch is
# not replayable from a trace, so it cannot be a sampled decision).
STRUCTURAL_VARIANTS = tuple(
    dict(base, **extra)
    for base in ({}, {"rows_outer": True}, {"rows_outer": False}, {"int8_pixels": False},
                 {"int8_oc_vecs": True}, {"taps_outer": True},
                 {"int8_oc_vecs": True, "taps_outer": True})
    for extra in ({}, {"parallel": True}, {"parallel": False}))


def tunable_spaces(sch, target) -> list:
    """MetaSchedule design spaces for a qcompile packed kernel (``ScheduleFn``): the
    default schedule with its choices as sampling instructions (decisions = the
    heuristic's), plus its structural variants; [] when ``sch`` is no packed kernel."""
    from tvm_ffi import structural_equal

    out = []
    for overrides in STRUCTURAL_VARIANTS:
        work = sch.copy()
        try:
            with tunable(overrides):
                res = _apply_packed(work, target)
        except Exception:  # noqa: BLE001 - a variant that does not fit this kernel
            if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                raise
            continue
        if res is None:
            continue
        if any(structural_equal(res.mod, o.mod) for o in out):
            continue
        out.append(res)
    return out


# --------------------------------------------------------------------------- helpers
def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _annotation(sch, block, key, default=None):
    ann = sch.get(block).annotations
    return ann[key] if key in ann else default


def _root_blocks(sch):
    root = sch.get_sblock("root") if _has_root(sch) else None
    if root is None:
        return []
    return list(sch.get_child_blocks(root))


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _is_spatial(sch, block) -> bool:
    return all(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)


def _pick_tile(extent: int, lo: int = 4, hi: int = 8) -> int:
    """The largest divisor of ``extent`` in [lo, hi], else ``hi`` (or extent if small)."""
    if extent <= hi:
        return extent
    for t in range(hi, lo - 1, -1):
        if extent % t == 0:
            return t
    return hi


def _find_annotated(sch):
    for block in _all_blocks(sch):
        kind = _annotation(sch, block, KERNEL_ATTR)
        if kind is not None:
            return block, str(kind)
    return None, None


def _all_blocks(sch):
    return _root_blocks(sch)


def _tile_writeback(sch, block, tile_loop):
    """Accumulate ``block`` in registers (ACC_SCOPE) and write it back, with its fused
    elementwise epilogue, once per register tile under ``tile_loop``; returns the
    write-back block."""
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, tile_loop, preserve_unit_loops=True)
    return wb


# Elementwise side inputs of an epilogue (the residual add's dequantize: cast, subtract,
# multiply) computed inside it, so that the epilogue can join the register tile. Without
# it the residual add and everything after it ran as seven passes over memory with
# 14-lane vectors (MobileNetV2's 144->24 1x1 conv + add: 0.41 ms in the model, 0.28 alone,
# against 0.10 for the 96->24 conv without a residual). MobileNetV2 int8 5.04 -> 4.66 ms at
# 2 threads, 7.83 -> 7.63 at 1; ResNet-18 int8 8.16 -> 7.98 at 2 (in-process, same bytes).
INLINE_SIDE_INPUTS = True


def _inline_side_inputs(sch, cons, block) -> bool:
    """Compute-inline every producer of ``cons`` other than ``block`` (the elementwise
    chain of a second input, such as the residual branch of an add), so that ``block``
    is its only producer, which reverse_compute_inline requires. False if one stays."""
    while True:
        others = [p for p in sch.get_producers(cons) if not sch.get_sref(p).same_as(
            sch.get_sref(block))]
        if not others:
            return True
        try:
            sch.compute_inline(others[0])
        except Exception:  # noqa: BLE001 - not inlinable: the epilogue stays a nest of its own
            return False


def _inline_epilogue(sch, block):
    """Reverse-inline the chain of elementwise consumers into ``block``."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        cons = consumers[0]
        if not _is_spatial(sch, cons):
            return
        # Only a consumer over exactly the producer's domain: reverse_compute_inline of a
        # slice (channel padding) keeps the producer's larger loop and writes out of bounds.
        if not _same_write_shape(sch, block, cons):
            return
        if INLINE_SIDE_INPUTS and not _inline_side_inputs(sch, cons, block):
            return
        try:
            sch.reverse_compute_inline(cons)
        except Exception:  # noqa: BLE001 - not inlinable: leave it as its own loop nest
            return


def _region_buffer(region):
    return region.buffer if hasattr(region, "buffer") else region.source


def _same_write_shape(sch, a, b) -> bool:
    wa, wb = sch.get(a).writes, sch.get(b).writes
    if len(wa) != 1 or len(wb) != 1:
        return False
    sa = [int(x) for x in _region_buffer(wa[0]).shape]
    sb = [int(x) for x in _region_buffer(wb[0]).shape]
    if sa != sb:
        return False
    def dom(blk):
        return [int(iv.dom.extent) if isinstance(iv.dom.extent, tirx.IntImm) else -1
                for iv in sch.get(blk).iter_vars]

    return dom(a) == dom(b)


def _vec_factor(extent: int, width: int, pow2: bool = False) -> int:
    """Lanes for a loop of ``extent``: all of it when short, else a divisor <= width.
    ``pow2``: only a power of two (>= 4) dividing the extent, else 0 (leave the loop to
    LLVM): a TVM vector of an odd lane count (14 for a 56-wide row) compiles element by
    element; for the depthwise padding copies that measured MobileNetV2 int8 8.13 -> 7.65
    ms at 2 threads, 9.96 -> 9.75 ms at 1 (in-process A/B)."""
    if pow2:
        lanes = width
        while lanes >= 4 and extent % lanes:
            lanes //= 2
        return lanes if lanes >= 4 else 0
    if extent <= width:
        return extent
    for d in range(width, max(2, width // 4) - 1, -1):
        if extent % d == 0:
            return d
    return 0


def _vector_split(sch, loop, width: int, pow2: bool = False):
    ext = _extent(sch, loop)
    if ext is None or ext <= 1:
        return None
    f = _vec_factor(ext, width, pow2)
    if f == 0:
        return None
    if f == ext:
        sch.vectorize(loop)
        return loop
    _, inner = sch.split(loop, [None, f])
    sch.vectorize(inner)
    return inner


def _schedule_spatial(sch, block, width: int, min_parallel: int = 2048):
    """Parallelize outer loops and vectorize the innermost of one data-parallel nest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return
    total = 1
    for e in exts:
        total *= e
    inner = loops[-1]
    _vector_split(sch, inner, width)
    outer = loops[:-1]
    if outer and total >= max(min_parallel, SPATIAL_MIN_PARALLEL_WORK):
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


def _schedule_reduction_generic(sch, block, width: int):
    """Parallelize the leading data-parallel loops of a reduction nest; for short
    reductions (pooling windows) also vectorize the innermost data-parallel loop,
    moved inside the reduction loops."""
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    if len(loops) != len(ivs):
        return
    lead, red = [], []
    for lp, iv in zip(loops, ivs):
        if int(iv.iter_type) == 0 and not red:
            lead.append(lp)
        elif int(iv.iter_type) == 2:
            red.append(lp)
        else:
            return
    if not lead or not red:
        return
    exts = [_extent(sch, lp) for lp in loops]
    if None in exts:
        return
    red_ext = 1
    for lp in red:
        red_ext *= _extent(sch, lp)
    inner_ext = _extent(sch, lead[-1])
    f = _vec_factor(inner_ext, width) if red_ext <= 64 and len(lead) >= 2 else 0
    if f >= 2:
        if f == inner_ext:
            outer_sp, vec = lead[:-1], lead[-1]
            sch.reorder(*red, vec)
        else:
            o, vec = sch.split(lead[-1], [None, f])
            outer_sp = lead[:-1] + [o]
            sch.reorder(o, *red, vec)
        par = outer_sp[:-1] if len(outer_sp) > 1 and f != inner_ext else outer_sp
        _parallel(sch, block, par)
        sch.vectorize(vec)
        for lp in red:
            sch.unroll(lp)
        init = sch.decompose_reduction(block, red[0])
        sch.vectorize(sch.get_loops(init)[-1])
        return
    _parallel(sch, block, lead)


# --------------------------------------------------------------------------- packed kernels
def _writes_8bit(sch, block) -> bool:
    wr = sch.get(block).writes
    return len(wr) == 1 and str(_region_buffer(wr[0]).dtype) in ("uint8", "int8")


def _decompose_padding(sch, block):
    """Split a padding block into a zero fill and an unpredicated copy (the fill block, or
    None when ``block`` is not the plain padding pattern): a bounds test on vector lanes
    makes TVM's vectorizer scalarize the whole loop."""
    loops = sch.get_loops(block)
    if not loops:
        return None
    return _try_decompose_padding(sch, block, loops[0])


# Split padding stages into a zero fill and an unpredicated copy (int8 3x3 convs 2-9 %
# faster than with the predicated repack). Never inside ``tunable()``: TVM 0.27's
# DecomposePadding instruction breaks ``Trace.as_python``, which MetaSchedule calls on
# every design space, so tuning spaces keep the predicated copy.
DECOMPOSE_PADDING = True


def _try_decompose_padding(sch, block, loop):
    """``sch.decompose_padding`` or None (not the plain padding pattern, or not wanted)."""
    if _TUNABLE or not DECOMPOSE_PADDING:
        return None
    try:
        return sch.decompose_padding(block, loop)
    except Exception:  # noqa: BLE001 - not the plain padding pattern
        return None


def _schedule_producers(sch, block, width: int):
    for prod in sch.get_producers(block):
        if not _is_spatial(sch, prod):
            continue
        fill = _decompose_padding(sch, prod)
        if fill is not None:
            _schedule_spatial(sch, fill, width, min_parallel=0)
        if _is_channel_interleave(sch, prod):
            _schedule_interleave(sch, prod)
        else:
            _schedule_spatial(sch, prod, width, min_parallel=0)


def _is_channel_interleave(sch, block) -> bool:
    """The int8 conv's repack [N, C, H, W] -> [N, C/4, H, W, 4] (``layout.PACK_NCHW4C``)."""
    return sch.get(block).name_hint == PACK_NCHW4C


def _schedule_interleave(sch, block):
    """Channel interleave: outer loops parallel when big enough, the 4 channels unrolled
    and the pixel loop left to LLVM's loop vectorizer, which turns four contiguous input
    rows into one interleaved store (vector shuffles). Vectorizing the 4 channels (TVM's
    vectorize) gathers byte by byte: 144 ch at 56x56 0.12 -> 0.018 ms, 24 ch 0.030 ->
    0.004 ms (one thread)."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    sch.unroll(loops[-1])
    outer = loops[:-2]
    if outer and _work(sch, block) >= SPATIAL_MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _width_stride(sch, block, buffer_rank: int) -> int | None:
    """Stride along the output width ``j`` of the block's read of its (padded) input:
    the coefficient of ``j`` in the width index of the ``buffer_rank``-D read."""
    from tvm.sym.analyzer import Analyzer

    blk = sch.get(block)
    ivars = [(iv.var, str(iv.dom.extent.ty)) for iv in blk.iter_vars]
    vj = ivars[3][0]

    def at(idx, j_value):  # the index with every block var 0 but j
        ana = Analyzer()
        for v, dt in ivars:
            ana.bind(v, tirx.const(j_value if v.same_as(vj) else 0, dt))
        return ana.simplify(idx)

    for region in blk.reads:
        buf = _region_buffer(region)
        if len(buf.shape) != buffer_rank:
            continue
        idx = region.region[3].min
        diff = Analyzer().simplify(at(idx, 1) - at(idx, 0))
        if isinstance(diff, tirx.IntImm):
            return int(diff)
    return None


# Output rows outside the output-channel blocks when the weights are smaller than the
# input: one input row (all channels) then stays in cache for every channel block,
# instead of the whole input streaming through once per block.
ROWS_OUTER = True
# ... and only for inputs that do not fit half of a typical L2: float 1x1 24->144 ch at
# 56x56 (301 KB input) measured 0.50 -> 0.74 ms with rows outside, 16->96 ch at 112x112
# (803 KB) 0.81 -> 0.68 ms, 144->24 ch at 56x56 (1.8 MB) 0.88 -> 0.78 ms.
ROWS_OUTER_MIN_INPUT = 512 * 1024


def _rows_outer(sch, block, in_rank: int, w_rank: int) -> bool:
    """1x1 convs with a large input only: a 3x3 got slower (2.0 -> 2.75 ms, 64 ch at
    56x56: its weights no longer stay in L1)."""
    if "rows_outer" in _OVERRIDES:  # a structural variant of the tuning space
        return bool(_OVERRIDES["rows_outer"])
    if not ROWS_OUTER:
        return False
    ivs = sch.get(block).iter_vars
    if int(ivs[5].dom.extent) * int(ivs[6].dom.extent) != 1:
        return False
    sizes = {}
    for region in sch.get(block).reads:
        buf = _region_buffer(region)
        sizes.setdefault(len(buf.shape), _nbytes(buf))
    return (in_rank in sizes and w_rank in sizes and sizes[w_rank] < sizes[in_rank]
            and sizes[in_rank] >= ROWS_OUTER_MIN_INPUT)


def _nbytes(buf) -> int:
    n = 1
    for d in buf.shape:
        n *= int(d)
    bits = {"float32": 32, "int32": 32, "uint8": 8, "int8": 8, "float16": 16}.get(str(buf.dtype), 32)
    return n * bits // 8


def _outer(b, oo, i, rows_outer: bool):
    return [b, i, oo] if rows_outer else [b, oo, i]


# Loop annotation naming the register tile a kernel got (tests read it from the TIR).
TILE_ATTR = "qcompile_tile"
# Accumulator vectors per register tile of the pixel-vector kernels: AVX-512 has 32
# vector registers, AVX2 16 (the vpmaddubsw tile also needs temporaries).
PIXEL_ACC_BUDGET = {16: 16, 8: 8}
# Use the pixel-vector int8 conv kernel where it fits (stride 1, width a multiple of the
# tile); False: always the channel-vector kernel.
INT8_PIXEL_TILES = True


def int8_pixel_tile_fits(intrin: str, ow: int, kernel: tuple, width_stride) -> bool:
    """Whether an int8 conv gets the pixel-vector kernel (``schedule_conv2d_int8_pixels``):
    stride 1 along the row, the row a whole number of pixel tiles, and a 1x1 kernel or the
    ISA's full vector. The layout pass asks too: such a conv is computed over its exact
    output channels (the pixel tile does not vectorize channels, so padding them to the
    vector width would only add work and a slice stage that keeps the epilogue unfused)."""
    if not INT8_PIXEL_TILES:
        return False
    from .x86 import pixel_lanes

    px = pixel_lanes(intrin, ow)
    full = px == pixel_lanes(intrin, 16)  # the ISA's full vector (zmm / AVX2 ymm)
    # measured: 1x1 wins at any tile (the write-back dominates); a 3x3 at 56 wide on
    # ymm loses to the zmm channel kernel (0.76 -> 1.11 ms), at 16 wide (zmm) it wins
    return bool(px) and (tuple(kernel) == (1, 1) or full) and width_stride == 1


# 1x1 stride-1 int8 convs whose row is no whole number of full pixel vectors (28 or 56
# wide on zmm): the pixel vectors run over the flattened plane, a register tile being
# whole rows. 28-wide rows went to the channel kernel, whose write-back to NCHW gathers
# every accumulator lane by lane; 56-wide rows to ymm tiles. Per kernel (1 thread,
# in-process, same bytes): 32->192 at 28x28 0.112 -> 0.046 ms, 24->144 at 56x56 0.170 ->
# 0.094, 144->24 at 56x56 0.101 -> 0.074; MobileNetV2 int8 5.38 -> 4.79 ms at 2 threads,
# 7.24 -> 6.60 at 1.
INT8_FLAT_PIXELS = True


def flat_pixel_rows(intrin: str, oh: int, ow: int, kernel: tuple, stride: tuple,
                    pad: tuple) -> int:
    """Rows per register tile of the flat-plane pixel kernel (0: it does not apply): a 1x1,
    stride-1, unpadded conv whose row is no whole number of the ISA's full pixel vectors,
    but a few rows (dividing the height) are."""
    if not (INT8_PIXEL_TILES and INT8_FLAT_PIXELS) or tuple(kernel) != (1, 1):
        return 0
    if tuple(stride) != (1, 1) or any(pad):
        return 0
    from .x86 import pixel_lanes

    full = pixel_lanes(intrin, 16)
    if not full or pixel_lanes(intrin, ow) == full:
        return 0
    return _whole_vector_rows(oh, ow, full)


def _whole_vector_rows(oh: int, ow: int, lanes: int) -> int:
    """The fewest rows (2..8, dividing ``oh``) that are a whole number of at most 8 vectors
    of ``lanes`` pixels; 0 if none."""
    for rows in range(2, 9):
        if oh % rows == 0 and (rows * ow) % lanes == 0 and rows * ow // lanes <= 8:
            return rows
    return 0


def _pixel_tile(n_vec: int, budget: int, max_ch: int = 16,
                channels: int | None = None) -> tuple[int, int]:
    """(pixel vectors, output channels) per register tile: as many pixel vectors as
    divide the row (<= 4, or the whole row when it is <= budget/2 vectors), then as many
    channels (a power of two dividing ``channels``) as the accumulator budget leaves."""
    if n_vec <= budget // 2 and n_vec > 4:
        nv = n_vec
    else:
        nv = max(d for d in range(1, min(4, n_vec) + 1) if n_vec % d == 0)
    ch = 1
    while (ch * 2 * nv <= budget and ch * 2 <= max_ch
           and (channels is None or channels % (ch * 2) == 0)):
        ch *= 2
    return nv, ch


def _vectorize_writeback(sch, wb, lanes: int):
    """The tile write-back (n, o, h, w inside the tile): vectorize the row, unroll the rest,
    so that every accumulator access has a constant index (registers, not stack memory)."""
    wl = sch.get_loops(wb)[4:]
    if len(wl) != 4:
        return
    _vector_split(sch, wl[3], lanes)
    for lp in sch.get_loops(wb)[4:]:
        if sch.get(lp).kind == tirx.ForKind.SERIAL and (_extent(sch, lp) or 0) > 1:
            sch.unroll(lp)


def schedule_conv2d_int8_pixels(sch, block, px_lanes: int, intrin: str, vec_width: int):
    """int8 conv2d, stride 1: register tile = ``ch`` output channels x ``nv`` vectors of
    ``px_lanes`` consecutive output pixels; each step is one pixel tile (x86.get_pixel_intrin:
    4*L contiguous activation bytes x 4 broadcast weight bytes). The accumulators are NCHW
    rows, so the fused epilogue (bias, requantize, clip, residual add) is vectorized along
    the row and stored contiguously."""
    from .x86 import get_pixel_intrin

    b, o, i, j, rc, rh, rw, r4 = sch.get_loops(block)
    ow = _extent(sch, j)
    budget = PIXEL_ACC_BUDGET[16 if vec_width >= 16 else 8]
    n_vec = ow // px_lanes
    nv, ch = _pixel_tile(n_vec, budget, channels=_extent(sch, o))
    oo, oc = _split_tile(sch, o, ch, 16)
    nv_choice = _choice(sch, [d for d in range(1, min(n_vec, budget) + 1) if n_vec % d == 0], nv)
    jo, jn, jv = sch.split(j, [None, nv_choice, px_lanes])
    outer = _outer(b, oo, i, _rows_outer(sch, block, 5, 6))
    sch.reorder(*outer, jo, rc, rh, rw, oc, jn, jv, r4)
    sch.annotate(jo, TILE_ATTR, "int8_pixels")
    _schedule_producers(sch, block, vec_width)
    wb = _tile_writeback(sch, block, jo)
    _vectorize_writeback(sch, wb, px_lanes)
    _parallel(sch, block, outer)
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(jv, get_pixel_intrin(intrin, px_lanes, ACC_SCOPE))
    sch.unroll(jn)
    sch.unroll(oc)


def _flat_rows(sch, block, intrin: str) -> int:
    """flat_pixel_rows for a conv2d_packed_int8 block (its repack unpadded: Hp, Wp = H, W)."""
    pack = _producer_writing(sch, block, 5)
    if pack is None:
        return 0
    _, _, oh, ow = (int(v) for v in _region_buffer(sch.get(block).writes[0]).shape)
    _, _, hp, wp, _ = (int(v) for v in _region_buffer(sch.get(pack).writes[0]).shape)
    loops = sch.get_loops(block)
    kernel = (_extent(sch, loops[5]), _extent(sch, loops[6]))
    pad = (hp - oh, wp - ow)
    stride = (1, _width_stride(sch, block, 5))
    return flat_pixel_rows(intrin, oh, ow, kernel, stride, pad)


def _flat_tile(sch, block, o, p, ow: int, nv: int, lanes: int, budget: int, name: str,
               reduction: tuple, inner: tuple):
    """The register tile of a flat-plane conv (``block`` iterates (b, o, p, reduction...,
    inner...) with p the flattened pixel of rows ``ow`` wide): ``nv`` vectors of ``lanes``
    pixels (whole rows) x as many channels as ``budget`` accumulators allow; accumulators
    flat, the fused epilogue written back per tile as contiguous rows. Returns
    (oo, po, oc, pn, pv)."""
    ch = 1
    while ch * 2 * nv <= budget and _extent(sch, o) % (ch * 2) == 0:
        ch *= 2
    oo, oc = sch.split(o, [None, ch])
    po, pt, pn, pv = sch.split(p, [None, 1, nv, lanes])  # pt: the tile loop (annotated)
    sch.reorder(sch.get_loops(block)[0], oo, po, pt, *reduction, oc, pn, pv, *inner)
    sch.annotate(pt, TILE_ATTR, name)
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, c, h * ow + w))
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, pt, preserve_unit_loops=True)
    wl = sch.get_loops(wb)[4:]
    if len(wl) == 4:  # (n, o, h, w) of the tile: rows x width contiguous in NCHW
        qo, qi = sch.split(sch.fuse(wl[2], wl[3]), [None, lanes])
        sch.vectorize(qi)
        sch.unroll(qo)
        sch.unroll(wl[1])
    return oo, po, oc, pn, pv


def schedule_conv2d_int8_flat_pixels(sch, block, rows: int, intrin: str, vec_width: int):
    """int8 1x1 conv, stride 1, no padding, over the flattened plane: the repacked input
    is [N, C/4, H*W, 4] and the conv block iterates one pixel index, so ``rows`` output
    rows (a whole number of full pixel vectors) form the register tile's pixels; the
    write-back covers whole rows, so it stays a plain contiguous NCHW store."""
    from .x86 import get_pixel_intrin, pixel_lanes

    px = pixel_lanes(intrin, 16)
    ow = int(_region_buffer(sch.get(block).writes[0]).shape[3])
    pack = _producer_writing(sch, block, 5)
    sch.transform_layout(pack, ("write", 0), lambda n, c, h, w, l: (n, c, h * ow + w, l))
    sch.transform_block_layout(
        block, lambda b, o, i, j, rc, rh, rw, r4: (b, o, i * ow + j, rc, rh, rw, r4))
    b, o, p, rc, rh, rw, r4 = sch.get_loops(block)
    budget = PIXEL_ACC_BUDGET[16 if vec_width >= 16 else 8]
    oo, po, oc, pn, pv = _flat_tile(sch, block, o, p, ow, rows * ow // px, px, budget,
                                    "int8_pixels_flat", (rc, rh, rw), (r4,))
    _schedule_producers(sch, block, vec_width)
    _parallel(sch, block, [b, oo, po])
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(pv, get_pixel_intrin(intrin, px, ACC_SCOPE))
    sch.unroll(pn)
    sch.unroll(oc)


# float conv: use the pixel-vector kernel where the output row fits it (stride 1).
FLOAT_PIXEL_TILES = True


def _float_pixel_lanes(ow: int, vec_width: int) -> int:
    """Pixels per vector for a float row of ``ow``: a full vector dividing the row; 0: no
    fit. Measured: odd-length vectors (<28 x float>) compile to lane-by-lane inserts and
    extracts (20x slower), half vectors (ymm on AVX-512) lose to the zmm channel kernel."""
    return vec_width if ow % vec_width == 0 else 0


def schedule_conv2d_float_pixels(sch, block, px_lanes: int, vec_width: int):
    """float conv2d, stride 1: register tile = ``ch`` output channels x ``nv`` vectors of
    output pixels; each step broadcasts one weight per channel and loads ``nv`` input
    vectors (contiguous in the padded NCHW input). Accumulators are NCHW rows: the fused
    epilogue is vectorized along the row and stored contiguously."""
    b, o, i, j, rc, rh, rw = sch.get_loops(block)
    ow = _extent(sch, j)
    budget = PIXEL_ACC_BUDGET[16 if vec_width >= 16 else 8] - (2 if vec_width >= 16 else 0)
    nv, ch = _pixel_tile(ow // px_lanes, budget // max(1, -(-px_lanes // vec_width)))
    oo, oc = sch.split(o, [None, ch])
    jo, jn, jv = sch.split(j, [None, nv, px_lanes])
    outer = _outer(b, oo, i, _rows_outer(sch, block, 4, 5))
    sch.reorder(*outer, jo, rc, rh, rw, oc, jn, jv)
    sch.annotate(jo, TILE_ATTR, "float_pixels")
    _schedule_producers(sch, block, vec_width)
    wb = _tile_writeback(sch, block, jo)
    _vectorize_writeback(sch, wb, px_lanes)
    _parallel(sch, block, outer)
    sch.vectorize(jv)
    sch.unroll(jn)
    sch.unroll(oc)
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])


# float 1x1 stride-1 convs whose row is no whole number of vectors: the flat-plane kernel
# too (as INT8_FLAT_PIXELS). Per kernel (1 thread, in-process, same values): 56 wide
# 24->144 0.51 -> 0.37 ms, 144->24 0.79 -> 0.62, 96->24 0.49 -> 0.34; 28 wide 32->192
# 0.22 -> 0.16, but 144->32 0.100 -> 0.110 and 192->32 0.14 -> 0.15 (reduction-heavy
# short rows keep the channel kernel).
FLOAT_FLAT_PIXELS = True
FLOAT_FLAT_MIN_WIDTH = 56


def _float_flat_rows(sch, block, vec_width: int) -> int:
    """Rows per tile of the flat-plane float kernel for a 1x1 conv reading its input
    unpadded at stride 1 (0: not applicable): a row that is no whole number of vectors."""
    if not FLOAT_FLAT_PIXELS:
        return 0
    out = _region_buffer(sch.get(block).writes[0])
    _, _, oh, ow = (int(v) for v in out.shape)
    ins = [_region_buffer(r) for r in sch.get(block).reads if len(_region_buffer(r).shape) == 4]
    if len(ins) != 1 or [int(v) for v in ins[0].shape[2:]] != [oh, ow] or ow % vec_width == 0:
        return 0
    if _width_stride(sch, block, 4) != 1:
        return 0
    loops = sch.get_loops(block)
    if ow < FLOAT_FLAT_MIN_WIDTH and _extent(sch, loops[4]) > _extent(sch, loops[1]):
        return 0  # more input than output channels on a short row: the channel kernel wins
    return _whole_vector_rows(oh, ow, vec_width)


def schedule_conv2d_float_flat_pixels(sch, block, rows: int, vec_width: int):
    """float 1x1 conv over the flattened plane (see schedule_conv2d_int8_flat_pixels)."""
    ow = int(_region_buffer(sch.get(block).writes[0]).shape[3])
    sch.transform_block_layout(
        block, lambda b, o, i, j, rc, rh, rw: (b, o, i * ow + j, rc, rh, rw))
    b, o, p, rc, rh, rw = sch.get_loops(block)
    budget = PIXEL_ACC_BUDGET[16 if vec_width >= 16 else 8] - (2 if vec_width >= 16 else 0)
    oo, po, oc, pn, pv = _flat_tile(sch, block, o, p, ow, rows * ow // vec_width,
                                    vec_width, budget, "float_pixels_flat", (rc, rh, rw), ())
    _schedule_producers(sch, block, vec_width)
    _parallel(sch, block, [b, oo, po])
    sch.vectorize(pv)
    sch.unroll(pn)
    sch.unroll(oc)
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_conv2d_packed(sch, block, lanes: int, intrin: str, vec_width: int):
    """conv2d_packed (float) and conv2d_packed_int8: see the module docstring."""
    is_int8 = intrin != "float"
    if not is_int8 and FLOAT_PIXEL_TILES:
        loops = sch.get_loops(block)
        ow = _extent(sch, loops[3])
        px = _float_pixel_lanes(ow, vec_width)
        one_by_one = _extent(sch, loops[5]) == 1 and _extent(sch, loops[6]) == 1
        # 1x1 only: there the transposing write-back dominates; 3x3 measured slower
        if px and one_by_one and _width_stride(sch, block, 4) == 1:
            return schedule_conv2d_float_pixels(sch, block, px, vec_width)
        rows = _float_flat_rows(sch, block, vec_width) if one_by_one else 0
        if rows:
            return schedule_conv2d_float_flat_pixels(sch, block, rows, vec_width)
    if is_int8 and _OVERRIDES.get("int8_pixels", INT8_PIXEL_TILES):
        from .x86 import pixel_lanes

        loops = sch.get_loops(block)
        ow = _extent(sch, loops[3])
        kernel = (_extent(sch, loops[5]), _extent(sch, loops[6]))
        rows = _flat_rows(sch, block, intrin)
        if rows:
            return schedule_conv2d_int8_flat_pixels(sch, block, rows, intrin, vec_width)
        if int8_pixel_tile_fits(intrin, ow, kernel, _width_stride(sch, block, 5)):
            return schedule_conv2d_int8_pixels(sch, block, pixel_lanes(intrin, ow), intrin,
                                               vec_width)
    loops = sch.get_loops(block)
    if is_int8:
        b, o, i, j, rc, rh, rw, r4 = loops
    else:
        b, o, i, j, rc, rh, rw = loops
    ow = _extent(sch, j)
    tw = _pick_tile(ow, 4, _tile_w_max(vec_width))
    if is_int8 and ow % tw:
        # tensorize needs an exact tile (no predicate): the largest divisor instead
        tw = max(d for d in range(1, tw + 1) if ow % d == 0)
    n_oc = _extent(sch, o)
    oo, oi = sch.split(o, [None, lanes])
    if is_int8:
        n_vec = 2 if _OVERRIDES.get("int8_oc_vecs") else 1
    elif vec_width >= 16:
        n_vec = FLOAT_OC_VECS if ow <= 28 else 1
    else:
        n_vec = FLOAT_OC_VECS_AVX2
    if n_vec > 1 and (n_oc // lanes) % n_vec == 0:
        # two channel vectors per tile: each input broadcast feeds two FMAs
        if is_int8:  # exact tiles (tensorize), half the pixels for twice the channels
            tw = max(d for d in range(1, max(1, tw // 2) + 1) if ow % d == 0)
            oo, ov = _split_tile(sch, oo, n_vec, 4)
        else:
            tw = _pick_tile(ow, 4, 12 if vec_width >= 16 else AVX2_TW_2VEC)
            oo, ov = sch.split(oo, [None, n_vec])
    else:
        ov = None
    # int8: tw divides the row, so the tuning space may pick any other exact tile
    jo, ji = _split_tile(sch, j, tw, 16) if is_int8 else sch.split(j, [None, tw])
    outer = _outer(b, oo, i, _rows_outer(sch, block, 5, 6) if is_int8
                   else _rows_outer(sch, block, 4, 5))
    red = [rh, rw, rc] if _OVERRIDES.get("taps_outer") else [rc, rh, rw]
    if is_int8 and ov is not None:
        sch.reorder(*outer, jo, *red, ji, ov, oi, r4)
        sch.unroll(ov)
    elif is_int8:
        sch.reorder(*outer, jo, *red, ji, oi, r4)
    elif ov is not None:
        sch.reorder(*outer, jo, rc, rh, rw, ji, ov, oi)
        sch.unroll(ov)
    else:
        sch.reorder(*outer, jo, rc, rh, rw, ji, oi)
    sch.annotate(jo, TILE_ATTR, "channels")
    _schedule_producers(sch, block, vec_width)
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, jo, preserve_unit_loops=True)
    wl = sch.get_loops(wb)[4:]
    # wl: (n, o, h, w) iters of the write-back inside the tile -> (w, o), vectorize o
    if len(wl) == 4:
        if WB_VECTOR == "w":  # contiguous NCHW stores along the tile's pixels
            sch.vectorize(wl[3])
        else:  # vector over channels: scattered stores
            sch.reorder(wl[3], wl[1])
            sch.vectorize(wl[1])
    _parallel(sch, block, outer)
    _finish_inner(sch, block, ji, oi, r4 if is_int8 else None, intrin, lanes, red[0])


# Depthwise: vector over output pixels (a row of one channel) for outputs at least this
# wide; narrower outputs keep the channel-vector kernel (a 7-wide row fills half a vector).
DW_PIXEL_MIN_WIDTH = 8
DW_PIXEL_TILES = True
# output rows per register tile: two rows share the loads of two of their three input rows
# and give the FMA chains room to overlap. Per kernel (int8, 1 thread, in-process):
# 144 ch 56x56 0.48 -> 0.40 ms, 192 ch 28x28 0.22 -> 0.17, 576 ch 14x14 0.17 -> 0.14;
# MobileNetV2 int8 6.77 -> 6.54 ms at 2 threads, 8.64 -> 8.19 at 1 (fp32 -3 / -2 %).
# Four rows measured no better.
DW_ROWS_PER_TILE = 2
# stride 2: de-interleave the padded plane into even/odd columns (contiguous taps)
DW_DEINTERLEAVE = True
# Row vectors of a power of two lanes (>= 8), unrolled along the row, instead of one
# vector as wide as the row: a 56- or 112-lane TVM vector made LLVM build every broadcast
# weight, bias and scale lane by lane (vinsertps chains) and spill. Per kernel (int8, 1
# thread, in-process): 144 ch 56x56 0.27-0.31 -> 0.23-0.26 ms, 32 ch 112x112 0.24 -> 0.17,
# 96 ch 112x112 stride 2 0.52 -> 0.49; MobileNetV2 int8 4.69 -> 4.49 ms at 2 threads, 7.87
# -> 7.60 at 1. A 28-wide row would get 4 lanes, which measured slower: it stays whole.
DW_POW2_VECTORS = True


def _producer_writing(sch, block, rank: int):
    for prod in sch.get_producers(block):
        wr = sch.get(prod).writes
        if len(wr) == 1 and len(_region_buffer(wr[0]).shape) == rank:
            return prod
    return None


def _read_index(sch, block, buf) -> int:
    for k, region in enumerate(sch.get(block).reads):
        if _region_buffer(region).same_as(buf):
            return k
    raise ValueError("buffer not read by block")


def _schedule_pad_copy(sch, pack, loop, vec_width: int, deinterleaved: bool):
    """A padding copy under ``loop``: the zero fill and the in-bounds copy as two nests
    (no per-element bounds test, so both vectorize), innermost loops vectorized."""
    fill = _try_decompose_padding(sch, pack, loop)  # None: one predicated nest
    if fill is None and deinterleaved:
        # the stride-2 plane split into even/odd columns ([..., H, 2, W/2]): with the
        # parity innermost and unrolled, each step reads two adjacent input columns
        lps = sch.get_loops(pack)
        sch.reorder(lps[-1], lps[-2])
        sch.unroll(lps[-2])
        return
    for blk in ([fill] if fill is not None else []) + [pack]:
        lps = sch.get_loops(blk)
        if lps:
            _vector_split(sch, lps[-1], vec_width, pow2=True)


def _dw_row_lanes(tw: int, vec_width: int) -> int:
    """Vector lanes for a depthwise row tile of ``tw`` pixels: the whole row, or a
    power of two of at least 8 lanes dividing it."""
    lanes = _vec_factor(tw, vec_width, pow2=True)
    return lanes if DW_POW2_VECTORS and lanes >= 8 else tw


def schedule_conv2d_dw_pixels(sch, block, vec_width: int) -> bool:
    """Depthwise, vector over output pixels: the padding stage writes each channel as a
    padded plane (its buffer re-laid out from ``[N, C/L, H, W, L]`` to ``[N, C/L, L, H, W]``,
    or ``[..., H, 2, W/2]`` de-interleaved for stride 2 so that every tap is a contiguous
    load) right before the channel is used; the register tile is a row of one channel,
    its epilogue stored contiguously into the NCHW output. False when it does not apply."""
    b, o, i, j, rh, rw = sch.get_loops(block)
    ow = _extent(sch, j)
    stride = _width_stride(sch, block, 5)
    pack = _producer_writing(sch, block, 5)
    if ow < DW_PIXEL_MIN_WIDTH or stride is None or pack is None:
        return False
    buf = _region_buffer(sch.get(pack).writes[0])
    wp = int(buf.shape[3])
    buf_rank = 5
    if stride == 2 and wp % 2 == 0 and DW_DEINTERLEAVE:
        buf_rank = 6

        def index_map(n, cb, h, w, lane):
            return (n, cb, lane, h, w % 2, w // 2)
    else:
        def index_map(n, cb, h, w, lane):
            return (n, cb, lane, h, w)
    sch.transform_layout(block, ("read", _read_index(sch, block, buf)), index_map)
    # iterate the padding stage in the new layout's order: its writes are contiguous
    # (measured 0.63 ms vs 1.67 ms for the input-order loop at 96ch 112x112 stride 2)
    sch.transform_block_layout(pack, index_map)
    tw = ow
    if ow > 8 * vec_width:
        tw = max(d for d in range(1, 8 * vec_width + 1) if ow % d == 0)
    jo, ji = sch.split(j, [None, tw])
    rows = DW_ROWS_PER_TILE if (_extent(sch, i) or 1) % DW_ROWS_PER_TILE == 0 else 1
    if rows > 1:
        i, ii = sch.split(i, [None, rows])
        sch.reorder(b, o, i, jo, rh, rw, ii, ji)
        sch.unroll(ii)
    else:
        sch.reorder(b, o, i, jo, rh, rw, ji)
    sch.annotate(jo, TILE_ATTR, "dw_pixels" + ("_deinterleaved" if buf_rank == 6 else "")
                 + (f"_{rows}rows" if rows > 1 else ""))
    sch.compute_at(pack, o, preserve_unit_loops=True)
    wb = _tile_writeback(sch, block, jo)
    lanes = _dw_row_lanes(tw, vec_width)
    _vector_split(sch, sch.get_loops(wb)[-1], lanes)
    pl = sch.get_loops(pack)
    _schedule_pad_copy(sch, pack, pl[2], vec_width, deinterleaved=buf_rank == 6)
    if _big_enough(sch, block):
        sch.parallel(sch.fuse(b, o))
    if lanes < tw:
        jv, ji = sch.split(ji, [None, lanes])
        sch.unroll(jv)
    sch.vectorize(ji)
    sch.unroll(rw)
    sch.unroll(rh)
    init = sch.decompose_reduction(block, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    return True


def schedule_conv2d_dw_packed(sch, block, lanes: int, vec_width: int):
    """Depthwise, channels packed: tile [tw pixels x lanes channels], vector over channels."""
    b, o, i, j, rh, rw = sch.get_loops(block)
    tw = _pick_tile(_extent(sch, j), 4, _tile_w_max(vec_width))
    oo, oi = sch.split(o, [None, lanes])
    jo, ji = sch.split(j, [None, tw])
    sch.reorder(b, oo, i, jo, rh, rw, ji, oi)
    _schedule_producers(sch, block, vec_width)
    wb = sch.cache_write(block, 0, ACC_SCOPE)
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, h, w, c))
    _inline_epilogue(sch, wb)
    sch.reverse_compute_at(wb, jo, preserve_unit_loops=True)
    wl = sch.get_loops(wb)[4:]
    if len(wl) == 4:
        sch.vectorize(wl[3])
    _parallel(sch, block, [b, oo, i])
    sch.vectorize(oi)
    sch.unroll(ji)
    sch.unroll(rw)
    sch.unroll(rh)
    init = sch.decompose_reduction(block, rh)
    sch.vectorize(sch.get_loops(init)[-1])


def _finish_inner(sch, block, tile_loop, lane_loop, r4_loop, intrin: str, lanes: int,
                  red_loop):
    """Vectorize / tensorize the micro-kernel; split off the accumulator init."""
    base = intrin.removeprefix("portable-")
    if base in ("avx512-vnni", "avx2-vpmaddubsw", "arm-sdot"):
        from .intrin import get_intrin

        name = get_intrin(base, portable=intrin.startswith("portable-"), scope=ACC_SCOPE)
        init = sch.decompose_reduction(block, red_loop)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(lane_loop, name)
        sch.unroll(tile_loop)
        return
    if intrin != "float":  # generic int8: widen and multiply in int32 lanes
        sch.reorder(r4_loop, lane_loop)
        sch.unroll(r4_loop)
    sch.vectorize(lane_loop)
    sch.unroll(tile_loop)
    init = sch.decompose_reduction(block, red_loop)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_matmul_packed(sch, block, lanes: int, intrin: str, vec_width: int):
    is_int8 = intrin != "float"
    loops = sch.get_loops(block)
    if is_int8:
        i, j, rk, r4 = loops
    else:
        i, j, rk = loops
    m = _extent(sch, i)
    tm = _pick_tile(m, 2, 6) if m > 1 else 1
    if is_int8 and m % tm:
        tm = max(d for d in range(1, tm + 1) if m % d == 0)  # exact tile for tensorize
    io, ii = _split_tile(sch, i, tm, 8) if is_int8 else sch.split(i, [None, tm])
    jo, ji = sch.split(j, [None, lanes])
    if is_int8:
        sch.reorder(io, jo, rk, ii, ji, r4)
    else:
        sch.reorder(io, jo, rk, ii, ji)
    _schedule_producers(sch, block, vec_width)
    wb = _tile_writeback(sch, block, jo)
    wl = sch.get_loops(wb)[2:]
    if len(wl) == 2:
        sch.vectorize(wl[1])
    _parallel(sch, block, [io, jo])
    _finish_inner(sch, block, ii, ji, r4 if is_int8 else None, intrin, lanes, rk)


def schedule_conv2d_spatial(sch, block, vec_width: int, acc_width: int):
    b, o, i, j, rc, rh, rw = sch.get_loops(block)
    ow = _extent(sch, j)
    tw = ow if ow <= acc_width else (acc_width if ow % acc_width == 0 else _pick_tile(ow, 4, acc_width))
    jo, ji = sch.split(j, [None, tw])
    sch.reorder(b, o, i, jo, rc, rh, rw, ji)
    _schedule_producers(sch, block, vec_width)
    wb = _tile_writeback(sch, block, jo)
    sch.vectorize(sch.get_loops(wb)[-1])
    sch.vectorize(ji)
    sch.unroll(rw)
    sch.unroll(rh)
    _parallel(sch, block, [b, o, i])
    init = sch.decompose_reduction(block, rc)
    sch.vectorize(sch.get_loops(init)[-1])


def apply_packed_rule(func, target):
    """Schedule a qcompile packed kernel; None when ``func`` holds none."""
    return _apply_packed(s_tir.Schedule(func), target)


def _apply_packed(sch, target):
    """The packed rule on ``sch`` (in place, recorded in its trace); None: not a packed kernel."""
    block, kind = _find_annotated(sch)
    if block is None:
        return None
    intrin = str(_annotation(sch, block, INTRIN_ATTR, "float"))
    lanes = int(_annotation(sch, block, LANES_ATTR, 8))
    vec = _vector_width(target)
    if kind in ("conv2d_packed", "conv2d_packed_int8"):
        schedule_conv2d_packed(sch, block, lanes, intrin if kind.endswith("int8") else "float", vec)
    elif kind in ("matmul_packed", "matmul_packed_int8"):
        schedule_matmul_packed(sch, block, lanes, intrin if kind.endswith("int8") else "float", vec)
    elif kind == "conv2d_dw_packed":
        ok = False
        if DW_PIXEL_TILES:
            fresh = sch.copy()
            try:
                ok = schedule_conv2d_dw_pixels(sch, block, vec)
            except Exception:  # noqa: BLE001 - start over with the channel-vector kernel
                if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                    raise
                sch = fresh
                block, _ = _find_annotated(sch)
        if not ok:
            schedule_conv2d_dw_packed(sch, block, lanes, vec)
    elif kind == "conv2d_spatial":
        schedule_conv2d_spatial(sch, block, vec, 2 * vec)
    else:
        return None
    _schedule_rest(sch, vec)
    return sch


def _schedule_rest(sch, vec):
    """Leftover root-level spatial nests (epilogues that did not inline)."""
    for blk in _root_blocks(sch):
        try:
            loops = sch.get_loops(blk)
            if loops and not any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
                if _is_spatial(sch, blk):
                    _schedule_spatial(sch, blk, vec)
        except Exception:  # noqa: BLE001
            continue


def _vector_width(target) -> int:
    """float32 lanes of the target's widest vector unit."""
    from tvm.target import codegen

    try:
        if codegen.target_has_features("avx512f", target):
            return 16
        if codegen.target_has_features("avx2", target):
            return 8
    except Exception:  # noqa: BLE001
        pass
    return 4


GENERIC_INLINE = True


def _inline_elementwise_chain(sch) -> bool:
    """A kernel that is only a chain of elementwise blocks (the model-input quantize:
    divide, round, add, clip, cast, pad) computed as one nest instead of one pass over
    memory per op: every spatial block with consumers is inlined into them, provided
    every root block is spatial (reductions keep their producers)."""
    blocks = _root_blocks(sch)
    if len(blocks) < 2 or not all(_is_spatial(sch, b) for b in blocks):
        return False
    changed = False
    for blk in blocks:
        if not sch.get_consumers(blk):
            continue
        try:
            sch.compute_inline(blk)
            changed = True
        except Exception:  # noqa: BLE001 - not inlinable: it stays its own nest
            continue
    return changed


# Pooling (a short-window reduction over a padded plane): one task per channel plane,
# its padding copied per plane (in cache) and the window loops left to LLVM (TVM's own
# vectors read a stride-2 window lane by lane); what MetaSchedule's best record did.
# max_pool2d 64ch 112x112 3x3/2 (ResNet-18's), standalone, 2 threads: uint8 447 -> 103 us,
# float32 669 -> 233 us; without padding, uint8 384 -> 63 us.
POOL_PER_PLANE = True


def _schedule_pool_planes(sch) -> bool:
    """The per-plane pooling schedule above; False (nothing changed) when ``sch`` is not a
    padding stage feeding one short-window reduction over [N, C, H, W]."""
    blocks = _root_blocks(sch)
    if not 1 <= len(blocks) <= 2 or _is_spatial(sch, blocks[-1]):
        return False
    if len(blocks) == 2 and not _is_spatial(sch, blocks[0]):
        return False
    pad, pool = (blocks[0] if len(blocks) == 2 else None), blocks[-1]
    loops = sch.get_loops(pool)
    ivs = sch.get(pool).iter_vars
    kinds = [int(iv.iter_type) for iv in ivs]
    if len(loops) != 6 or kinds != [0, 0, 0, 0, 2, 2]:
        return False
    if not all(_extent(sch, lp) for lp in loops) or \
            _extent(sch, loops[4]) * _extent(sch, loops[5]) > 64:
        return False
    plane = sch.fuse(loops[0], loops[1])
    _parallel(sch, pool, [plane])
    if pad is not None:
        sch.compute_at(pad, plane)
    return True


def apply_generic_rule(func, target):
    """Parallelize + vectorize every root-level nest (spatial or reduction)."""
    sch = s_tir.Schedule(func)
    vec = _vector_width(target)
    if POOL_PER_PLANE:
        work = sch.copy()
        try:
            if _schedule_pool_planes(work):
                return work
        except Exception:  # noqa: BLE001 - not this pattern after all: the rules below
            if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                raise
    changed = _inline_elementwise_chain(sch) if GENERIC_INLINE else False
    for blk in _root_blocks(sch):
        try:
            if _is_spatial(sch, blk):
                # 8-bit pads only: for float32 the extra full-size fill cost more than the
                # predicated copy (max_pool2d 64ch 112x112: 1.15 -> 1.3 ms; uint8 0.92 -> 0.79)
                fill = _decompose_padding(sch, blk) if _writes_8bit(sch, blk) else None
                if fill is not None:
                    _schedule_spatial(sch, fill, vec)
                _schedule_spatial(sch, blk, vec)
            else:
                _schedule_reduction_generic(sch, blk, vec)
            changed = True
        except Exception:  # noqa: BLE001 - leave this nest alone
            continue
    return sch if changed else None


def _dlight_rules():
    from tvm.s_tir import dlight as dl

    return [dl.cpu.GEMV(), dl.cpu.Reduction()]


class ScheduleFallbackWarning(UserWarning):
    """A packed conv/matmul kernel's default schedule failed; it got the generic one."""


def schedule_func(func, target):
    """The scheduled PrimFunc for ``func`` (or ``func`` itself when no rule applies).

    A packed kernel (annotated by the layout pass) whose default schedule raises falls
    back to the generic rule, which runs but can be 10-100x slower: that is a bug in a
    schedule, so it is reported (``ScheduleFallbackWarning``, the kernel and the error)
    instead of passing silently; ``QCOMPILE_SCHEDULE_DEBUG=1`` raises it instead."""
    for rule in (apply_packed_rule, _apply_dlight, apply_generic_rule):
        try:
            sch = rule(func, target)
        except Exception as exc:  # noqa: BLE001 - a rule that does not fit: try the next
            if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                raise
            if rule is apply_packed_rule:
                name = func.attrs.get("global_symbol", "?") if func.attrs else "?"
                warnings.warn(f"default schedule of packed kernel {name} failed "
                              f"({type(exc).__name__}: {str(exc).strip()[:200]}); using the "
                              "generic schedule (slow). Set QCOMPILE_SCHEDULE_DEBUG=1 for "
                              "the traceback.", ScheduleFallbackWarning, stacklevel=2)
            sch = None
        if sch is not None:
            return sch.mod["main"]
    return None


def _apply_dlight(func, target):
    for rule in _dlight_rules():
        space = rule.apply(func, target, False)
        if space is None:
            continue
        return space[0] if isinstance(space, list) else space
    return None


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs
                and int(func.attrs["tirx.is_scheduled"]) == 1)


_NEARBYINT_VECTORIZABLE = False


def allow_vector_nearbyint():
    """Let TVM's vectorizer keep ``nearbyint`` (the requantize rounding: half to even) as
    a vector op. TVM 0.27 does not mark it vectorizable, so every vectorized loop holding
    it (every int8 requantize epilogue) was scalarized lane by lane; LLVM lowers the
    vector form to ``vrndscaleps``/``vroundps`` with the same half-to-even result."""
    global _NEARBYINT_VECTORIZABLE
    if _NEARBYINT_VECTORIZABLE:
        return
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if op.get_attr("TVectorizable") is None:
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)
    _NEARBYINT_VECTORIZABLE = True


def apply_cpu_schedules(target):
    """Module pass: schedule every unscheduled PrimFunc with the rules above."""
    import tvm

    allow_vector_nearbyint()

    @tvm.transform.module_pass(opt_level=0, name="qcompile.ApplyCPUSchedules")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            tgt = func.attrs.get("target") if func.attrs is not None else None
            new = schedule_func(func, tgt or target)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
