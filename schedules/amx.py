"""Intel AMX int8 conv2d: ``tdpbsud`` on tile registers (Sapphire Rapids and newer).

One AMX tile multiply, ``tdpbsud C, A, B``, is a 16 x 64 (s8) by 64 x 16 (u8, as 16 rows
of 4-byte groups) product into a 16 x 16 int32 tile: 16 K MACs per instruction, 16x one
``vpdpbusd`` (measured on this Xeon: 2610 int8 GMAC/s on one core vs a VNNI peak of 327).

How a conv maps onto it (``qcompile.layout.conv2d_packed_amx``):

* A (16 rows x 64 bytes) = 16 output channels x 64 input channels of one kernel tap, from
  weights packed ``[O/(16 TO), KH, KW, C/64, TO, 16, 16, 4]`` (a 1 KiB contiguous tile);
* B (16 rows x 4N bytes) = 16 channel groups of 4, N output pixels each: read in place
  from the int8 conv's existing ``[N, C/4, H', W', 4]`` activation repack (row stride
  H' W' 4 bytes), so no im2col; for stride 2 across, the repack orders each row's
  columns by phase (even, then odd), so the N pixels of a tap stay contiguous;
* C (16 rows x N int32) = 16 output channels x N pixels, i.e. NCHW rows.

The register tile is TO x TP C tiles (TO <= 2 channel tiles, TP <= 2 pixel tiles: tmm0-3
accumulate, tmm4-5 hold A, tmm6-7 hold B) kept in tile registers over the whole
reduction (input-channel blocks x taps), then stored once and handed to the fused
epilogue while still in cache. Three tensor intrinsics do it: ``init`` (ldtilecfg +
tilezero), ``update`` (TO + TP tile loads, TO x TP ``tdpbsud``) and ``store``
(tilestored). Each also has a portable twin (its description as plain TIR), which runs
the same schedule bit-exact on machines without AMX.

Linux hands out AMX tile state only on request: every AMX PrimFunc starts with
``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` (a cheap syscall, idempotent,
process-wide), so a library exported for an AMX target needs nothing from its host.
"""

from __future__ import annotations

import functools

AMX_KIND = "conv2d_packed_amx"
AMX_TILES_ATTR = "qcompile_amx_tiles"  # block annotation: [TO, TP, N] of the kernel
TILE_ROWS = 16  # rows of every tile; also output channels per A tile
K_BYTES = 64  # bytes of one A row: input channels per tile multiply
MAX_PIXELS = 16  # int32 columns of a C tile (64 bytes)
MIN_PIXELS = 4  # below this a tile multiply does too little work to pay for its loads
SYS_ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def amx_conv_tiles(in_channels: int, out_channels: int, out_width: int, kernel: tuple,
                   stride: tuple, dilation: tuple, groups: int):
    """``(TO, TP, N)`` for an AMX conv (channel tiles, pixel tiles, pixels per tile), or
    None when the conv does not fit the tiles exactly (tensorize takes no predicate): the
    VNNI kernel takes it instead."""
    if groups != 1 or tuple(dilation) != (1, 1) or stride[1] not in (1, 2):
        return None
    if in_channels % K_BYTES or out_channels % TILE_ROWS:
        return None
    divisors = [d for d in range(MAX_PIXELS, MIN_PIXELS - 1, -1) if out_width % d == 0]
    if not divisors:
        return None
    n = divisors[0]
    tp = 2 if (out_width // n) % 2 == 0 else 1
    return _channel_tiles(out_channels), tp, n


def _channel_tiles(out_channels: int) -> int:
    """C tiles per register tile along output channels (16 channels each): 2 where they
    divide the channels, else 1."""
    return 2 if out_channels % (2 * TILE_ROWS) == 0 else 1


def amx_flat_plane(in_channels: int, out_channels: int, out_hw: tuple, kernel: tuple,
                   stride: tuple, dilation: tuple, groups: int):
    """``((TO, 2, 16), columns)`` when a stride-1 conv should run over its flattened padded
    plane (output pixel (i, j) at column i W' + j, W' the padded width, the W' - OW columns
    per row past the edge computed and dropped), or None. Taken where that fills the
    16-column C tiles better than whole-row tiles by 15 %: a 7-wide row fills 7 of 16
    columns, a 7x7 plane 49 of 64."""
    if tuple(stride) != (1, 1) or groups != 1 or tuple(dilation) != (1, 1):
        return None
    if in_channels % K_BYTES or out_channels % TILE_ROWS:
        return None
    oh, ow = out_hw
    row = amx_conv_tiles(in_channels, out_channels, ow, kernel, stride, dilation, groups)
    row_fill = row[2] / MAX_PIXELS if row else 0.0
    step = 2 * MAX_PIXELS
    columns = -(-oh * (ow + kernel[1] - 1) // step) * step
    if oh * ow / columns <= 1.15 * row_fill:
        return None
    return (_channel_tiles(out_channels), 2, MAX_PIXELS), columns


def amx_conv_plan(in_channels: int, out_channels: int, out_hw: tuple, kernel: tuple,
                  stride: tuple, dilation: tuple, groups: int):
    """``(tiles, flat_columns)`` for an AMX conv -- the flat plane where ``amx_flat_plane``
    takes it, else whole-row tiles (``flat_columns`` None) -- or None: not an AMX conv."""
    flat = amx_flat_plane(in_channels, out_channels, out_hw, kernel, stride, dilation, groups)
    if flat is not None:
        return flat
    tiles = amx_conv_tiles(in_channels, out_channels, out_hw[1], kernel, stride, dilation,
                           groups)
    return None if tiles is None else (tiles, None)


def _tile_config(to: int, tp: int, n: int) -> list[int]:
    """The 64-byte ldtilecfg operand as eight int64 words: palette 1, C tiles 0..3 (16 x 4N
    bytes), A tiles 4-5 (16 x 64), B tiles 6-7 (16 x 4N); unused tiles stay 0 x 0."""
    cfg = bytearray(64)
    cfg[0] = 1
    cols = {}
    for t in range(to * tp):
        cols[t] = 4 * n
    for a in range(to):
        cols[4 + a] = K_BYTES
    for b in range(tp):
        cols[6 + b] = 4 * n
    for t, c in cols.items():
        cfg[16 + 2 * t] = c & 0xFF
        cfg[17 + 2 * t] = c >> 8
        cfg[48 + t] = TILE_ROWS
    return [int.from_bytes(cfg[8 * i:8 * i + 8], "little", signed=True) for i in range(8)]


def _shapes(to: int, tp: int, n: int):
    rows, cols = TILE_ROWS * to, n * tp
    return rows, cols, (to, TILE_ROWS, K_BYTES // 4, 4), (K_BYTES // 4, 1, cols, 4), (rows, 1, cols)


def _init_desc(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, _, _, c_shape = _shapes(to, tp, n)

    @T.prim_func(s_tir=True)
    def desc(C: T.Buffer(c_shape, "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0, 0:cols])
            for m, p in T.grid(T.int64(rows), T.int64(cols)):
                with T.sblock("init"):
                    vm, vp = T.axis.remap("SS", [m, p])
                    C[vm, 0, vp] = 0

    return desc


def _init_impl(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, _, _, c_shape = _shapes(to, tp, n)
    words = _tile_config(to, tp, n)
    tiles = to * tp

    @T.prim_func(s_tir=True)
    def impl(C: T.Buffer(c_shape, "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0, 0:cols])
            cfg = T.decl_buffer((8,), "int64", scope="global")
            cfg[0] = T.int64(words[0])
            cfg[1] = T.int64(words[1])
            cfg[2] = T.int64(words[2])
            cfg[3] = T.int64(words[3])
            cfg[4] = T.int64(words[4])
            cfg[5] = T.int64(words[5])
            cfg[6] = T.int64(words[6])
            cfg[7] = T.int64(words[7])
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))
            for t in T.unroll(tiles):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero",
                                              T.Cast("uint8", t)))

    return impl


def _update_desc(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, a_shape, b_shape, c_shape = _shapes(to, tp, n)
    k4 = K_BYTES // 4

    def weight_tile_row(vm):
        # one channel tile: a literal 0 and the plain row, as in the compute (no m // 16)
        return (0, vm) if to == 1 else (vm // 16, vm % 16)

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer(a_shape, "int8", offset_factor=1),
             B: T.Buffer(b_shape, "uint8", offset_factor=1),
             C: T.Buffer(c_shape, "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:cols], B[0:k4, 0, 0:cols, 0:4], A[0:to, 0:16, 0:k4, 0:4])
            T.writes(C[0:rows, 0, 0:cols])
            for m, p, k, r in T.grid(T.int64(rows), T.int64(cols), T.int64(k4), T.int64(4)):
                with T.sblock("update"):
                    vm, vp, vk, vr = T.axis.remap("SSRR", [m, p, k, r])
                    tile, row = T.meta_var(weight_tile_row(vm))
                    C[vm, 0, vp] = C[vm, 0, vp] + T.cast(B[vk, 0, vp, vr], "int32") * T.cast(
                        A[tile, row, vk, vr], "int32")
    return desc


def _update_impl(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, a_shape, b_shape, c_shape = _shapes(to, tp, n)
    k4 = K_BYTES // 4

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int64()
        A = T.match_buffer(a, a_shape, "int8", offset_factor=1)
        B = T.match_buffer(b, b_shape, "uint8", offset_factor=1,
                           strides=[sb, T.int64(), 4, 1])
        C = T.match_buffer(c, c_shape, "int32", offset_factor=1,
                           strides=[T.int64(), T.int64(), 1])
        with T.sblock("root"):
            T.reads(C[0:rows, 0, 0:cols], B[0:k4, 0, 0:cols, 0:4], A[0:to, 0:16, 0:k4, 0:4])
            T.writes(C[0:rows, 0, 0:cols])
            # tile numbers must be immediates: the unrolled loops make them so. Addresses
            # as address_of(buffer[...]), not access_ptr: StorageRewrite may fold a dead
            # buffer of another dtype into the same storage, which access_ptr's dtype
            # check then rejects (a 5x5 flat-plane 1x1 conv did)
            for p in T.unroll(tp):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64",
                                              T.Cast("uint8", 6 + p),
                                              T.address_of(B[0, 0, p * n, 0]),
                                              T.Cast("int64", sb)))
            for t in T.unroll(to):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64",
                                              T.Cast("uint8", 4 + t),
                                              T.address_of(A[t, 0, 0, 0]),
                                              T.int64(K_BYTES)))
                for p in T.unroll(tp):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbsud",
                                                  T.Cast("uint8", t * tp + p),
                                                  T.Cast("uint8", 4 + t),
                                                  T.Cast("uint8", 6 + p)))

    return impl


def _store_desc(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, _, _, c_shape = _shapes(to, tp, n)

    @T.prim_func(s_tir=True)
    def desc(S: T.Buffer(c_shape, "int32", offset_factor=1),
             D: T.Buffer(c_shape, "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(S[0:rows, 0, 0:cols])
            T.writes(D[0:rows, 0, 0:cols])
            for m, p in T.grid(T.int64(rows), T.int64(cols)):
                with T.sblock("store"):
                    vm, vp = T.axis.remap("SS", [m, p])
                    D[vm, 0, vp] = S[vm, 0, vp]

    return desc


def _store_impl(to: int, tp: int, n: int):
    from tvm.script import tirx as T

    rows, cols, _, _, c_shape = _shapes(to, tp, n)

    @T.prim_func(s_tir=True)
    def impl(s: T.handle, d: T.handle) -> None:
        sd = T.int64()
        S = T.match_buffer(s, c_shape, "int32", offset_factor=1,
                           strides=[T.int64(), T.int64(), 1])
        D = T.match_buffer(d, c_shape, "int32", offset_factor=1,
                           strides=[sd, T.int64(), 1])
        with T.sblock("root"):
            T.reads(S[0:rows, 0, 0:cols])
            T.writes(D[0:rows, 0, 0:cols])
            for t in T.unroll(to):
                for p in T.unroll(tp):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.x86.tilestored64", T.Cast("uint8", t * tp + p),
                        T.address_of(D[t * TILE_ROWS, 0, p * n]),
                        T.Cast("int64", sd * 4)))

    return impl


@functools.lru_cache(maxsize=None)
def get_amx_intrins(to: int, tp: int, n: int, portable: bool = False) -> tuple[str, str, str]:
    """Register (once) and return the (init, update, store) TensorIntrin names."""
    from tvm.s_tir import TensorIntrin

    tag = f"qcompile_{'portable_' if portable else ''}amx_{to}x{tp}x{n}"
    names = []
    for part, desc, impl in (("init", _init_desc, _init_impl),
                             ("update", _update_desc, _update_impl),
                             ("store", _store_desc, _store_impl)):
        name = f"{tag}_{part}"
        TensorIntrin.register(name, desc(to, tp, n), (desc if portable else impl)(to, tp, n),
                              override=True)
        names.append(name)
    return tuple(names)


# --------------------------------------------------------------------------- schedule
def schedule_conv2d_amx(sch, block, intrin: str, tiles: tuple, vec_width: int):
    """The AMX register tile (see the module docstring) on the packed conv ``block``:
    loops (b, o/(16 TO), oh, ow/(N TP) | ic/64, kh, kw | 16 TO, N TP, 16, 4), the last four
    tensorized; the int32 tile stored to a per-tile buffer and the fused epilogue run on
    it under the same pixel-tile loop."""
    from .cpu import (_inline_epilogue, _is_spatial, _parallel, _schedule_producers,
                      _vector_split)

    to, tp, n = tiles
    init_i, update_i, store_i = get_amx_intrins(to, tp, n, intrin.startswith("portable-"))
    b, o, i, j, rcb, rh, rw, rci, r4 = sch.get_loops(block)
    oo, om = sch.split(o, [None, TILE_ROWS * to])
    jo, jm = sch.split(j, [None, n * tp])
    sch.reorder(b, oo, i, jo, rcb, rh, rw, om, jm, rci, r4)
    _schedule_producers(sch, block, vec_width)
    # block -> tmm (the tile registers; never materialized by the real intrinsics)
    #       -> wb (the stored tile, with the fused epilogue) -> the kernel's output
    wb = sch.cache_write(block, 0, "global")
    tmm = sch.cache_write(block, 0, "global")
    _inline_epilogue(sch, wb)
    slices = sch.get_consumers(wb)
    if len(slices) == 1 and _is_spatial(sch, slices[0]):
        # a flat-plane kernel's result is sliced to NCHW: the elementwise epilogue joins
        # that slice (one pass over the small output plane)
        _inline_epilogue(sch, slices[0])
    sch.reverse_compute_at(tmm, jo)  # no unit loops: the store loops match its intrinsic
    sch.reverse_compute_at(wb, jo)
    wl = sch.get_loops(wb)
    _vector_split(sch, wl[-1], vec_width)
    _parallel(sch, block, [b, oo, i])
    init = sch.decompose_reduction(block, rcb)
    sch.tensorize(sch.get_loops(init)[-2], init_i)
    sch.tensorize(om, update_i)
    sch.tensorize(sch.get_loops(tmm)[-2], store_i)


def _request_tile_permission(func):
    """``func`` with the AMX permission syscall as the first statement of its root block."""
    from tvm import s_tir, tirx

    call = tirx.Evaluate(tirx.call_extern("int64", "syscall", SYS_ARCH_PRCTL,
                                          ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))
    realize = func.body
    root = realize.block
    new_root = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint,
                           tirx.SeqStmt([call, root.body]), root.init, root.alloc_buffers,
                           root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, new_root))


def holds_amx_kernel(func) -> bool:
    """Whether ``func`` (a PrimFunc, or a module of one) computes an AMX-packed conv. Its
    schedule is fixed by the tile shapes (there is nothing for ``qcompile tune`` to vary),
    so tuning skips it."""
    from tvm import s_tir

    from qcompile.layout import KERNEL_ATTR

    from .cpu import _annotation, _root_blocks

    sch = s_tir.Schedule(func)
    return any(str(_annotation(sch, b, KERNEL_ATTR, "")) == AMX_KIND for b in _root_blocks(sch))


def apply_amx_rule(func, target):
    """Schedule an AMX-packed conv2d kernel; None when ``func`` holds none."""
    from tvm import s_tir

    from qcompile.layout import INTRIN_ATTR, KERNEL_ATTR

    from .cpu import _annotation, _root_blocks, _schedule_rest, _vector_width

    sch = s_tir.Schedule(func)
    for block in _root_blocks(sch):
        if str(_annotation(sch, block, KERNEL_ATTR, "")) == AMX_KIND:
            break
    else:
        return None
    intrin = str(_annotation(sch, block, INTRIN_ATTR, "amx-int8"))
    tiles = tuple(int(v) for v in _annotation(sch, block, AMX_TILES_ATTR))
    vec = _vector_width(target)
    try:
        schedule_conv2d_amx(sch, block, intrin, tiles, vec)
    except Exception as exc:  # a bug in this rule: say so, the generic schedule takes it
        import warnings

        from .cpu import ScheduleFallbackWarning

        name = func.attrs.get("global_symbol", "?") if func.attrs else "?"
        warnings.warn(f"AMX schedule of {name} failed ({type(exc).__name__}: "
                      f"{str(exc).strip()[:200]}); using the generic schedule (slow). Set "
                      "QCOMPILE_SCHEDULE_DEBUG=1 for the traceback.", ScheduleFallbackWarning,
                      stacklevel=2)
        raise
    _schedule_rest(sch, vec)
    if intrin.startswith("portable-"):
        return sch
    return _Scheduled(_request_tile_permission(sch.mod["main"]))


class _Scheduled:
    """What ``rule_module_pass`` takes from a rule (``.mod["main"]``), for a function
    changed after scheduling."""

    def __init__(self, func):
        import tvm

        self.mod = tvm.IRModule({"main": func})


def apply_amx_schedules(target):
    """Module pass: AMX schedules for the AMX-packed conv kernels; everything else is left
    to the CPU rules that run after it."""
    from .intrin import rule_module_pass

    return rule_module_pass("qcompile.ApplyAMXSchedules", apply_amx_rule, target)
