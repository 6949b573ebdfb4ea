"""Weight packing and kernel layout, done once at compile time on constant weights.

``layout_passes(target)`` returns the Relax passes that run before LegalizeOps
(hooked into ``qcompile.pipeline.fuse_passes``). They rewrite every
``relax.nn.conv2d`` (NCHW/OIHW) and ``relax.matmul`` whose weight is a constant
into qcompile's own TE computes, with the weight packed in numpy at compile time:

* float conv2d   ``W[O, C, KH, KW]``  -> ``Wp[O/L, C, KH, KW, L]`` (L = vector lanes);
  the output-channel axis becomes the vector axis of the kernel.
* int8 conv2d    ``W[O, C, KH, KW]``  -> ``Wp[O/L, C/4, KH, KW, L, 4]``, the tile an
  int8 dot-product instruction consumes (VNNI 16x4, AVX2 8x4, ARM sdot 4x4); the
  kernel's padding stage writes the activation as ``[N, C/4, H, W, 4]`` (+128 or
  -128 shift when its signedness differs from the instruction's, compensated by a
  per-channel constant), so the intrinsic's 4-byte activation read is contiguous.
* int8 conv2d on AMX targets (O % 16 == 0, stride 1 or 2 across, C % 64 == 0 or zero-padded
  to it, ``_amx_channel_padded``):
  ``conv2d_packed_amx``, weights ``[O/(16 TO), KH, KW, C/64, TO, 16, 16, 4]`` (one 16x64
  AMX tile per 1 KiB), the same [N, C/4, H, W, 4] activation repack (by stride phase for
  stride 2; the flattened padded plane for small planes); see ``qcompile.schedules.amx``.
* depthwise conv2d: ``conv2d_depthwise_packed``, ``W[C, 1, KH, KW]`` -> ``[C/L, KH, KW, L]``,
  input repacked to ``[N, C/L, H, W, L]`` by the kernel's padding stage (vector over channels).
* grouped conv2d: ``conv2d_spatial``, vectorized over output width.
* matmul ``A[M, K] x B[K, N]`` (B constant) -> ``Bp[N/L, K, L]`` float,
  ``Bp[N/L, K/4, L, 4]`` int8.

Every result equals the op it replaces exactly on integers (channel padding uses
zero weights; the shift compensation is exact integer arithmetic). The
reduction block of each compute carries the block annotation ``qcompile_kernel``
(and ``qcompile_intrin`` / ``qcompile_lanes``), which the rules in
``qcompile.schedules.cpu`` key on. A conv/matmul this pass does not take
(dynamic shapes, non-constant weights, other layouts) is left to LegalizeOps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

KERNEL_ATTR = "qcompile_kernel"
# ARM i8mm ``smmla`` tile: a 2x8 activation block (two output pixels / rows) times the
# transpose of a 2x8 weight block (two output channels) -> 2x2 int32.
I8MM_LANES = 2
I8MM_K = 8
# CUDA s8 tensor cores (wmma m16n16k16): every GEMM dimension padded to 16.
MMA_TILE = 16
INTRIN_ATTR = "qcompile_intrin"
LANES_ATTR = "qcompile_lanes"


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class LayoutPlan:
    """What the packing pass does for one target."""

    float_lanes: int  # output channels per float vector tile (0: do not rewrite floats)
    int8_intrin: str  # "avx512-vnni", "avx2-vpmaddubsw", "arm-sdot", "generic" or ""
    int8_lanes: int  # output channels per int8 tile
    act_dtype: str  # activation dtype the int8 intrinsic takes ("uint8" or "int8")
    # "amx-int8" / "portable-amx-int8": int8 convs that fit AMX tiles use them
    # (``conv2d_packed_amx``), the rest int8_intrin; "": no AMX
    amx: str = ""


def plan_for_target(target, force_intrin: str | None = None) -> LayoutPlan | None:
    """The packing plan for a TVM target (None: leave conv/matmul to LegalizeOps)."""
    from tvm.target import codegen

    if target is not None and target.kind.name == "cuda":
        # int8 conv2d/matmul only (s8 tensor cores from sm_72, dp4a before); float kernels
        # stay with LegalizeOps + dlight
        intrin = force_intrin or ("cuda-mma" if _cuda_sm(target) >= 72 else "cuda-dp4a")
        return LayoutPlan(0, intrin, MMA_TILE if intrin == "cuda-mma" else 4, "int8")
    if target is None or target.kind.name != "llvm":
        return None

    def has(feature: str) -> bool:
        try:
            return bool(codegen.target_has_features(feature, target))
        except Exception:  # noqa: BLE001 - unknown feature on this arch
            return False

    mtriple = str(target.attrs.get("mtriple", ""))
    if has("avx512f"):
        vnni = has("avx512vnni")
        plan = LayoutPlan(16, "avx512-vnni" if vnni else "avx2-vpmaddubsw",
                          16 if vnni else 8, "uint8",
                          "amx-int8" if vnni and has("amx-int8") else "")
    elif has("avx2"):
        plan = LayoutPlan(8, "avx2-vpmaddubsw", 8, "uint8")
    elif mtriple.startswith("aarch64") or has("neon"):
        if has("i8mm"):
            plan = LayoutPlan(8, "arm-i8mm", I8MM_LANES, "int8")
        elif has("dotprod"):
            plan = LayoutPlan(8, "arm-sdot", 4, "int8")
        else:
            plan = LayoutPlan(8, "generic", 8, "int8")
    else:
        plan = LayoutPlan(8, "generic", 8, "int8")
    if force_intrin is not None:
        # "<family>" or "portable-<family>": the family's packed layout, with the tile run
        # as plain TIR when portable (bit-exact on any machine); "generic": no intrinsic.
        base = force_intrin.removeprefix("portable-")
        if base == "amx-int8":  # AMX convs; the rest on the (same-portability) VNNI tile
            vnni = force_intrin.replace("amx-int8", "avx512-vnni")
            return LayoutPlan(plan.float_lanes, vnni, 16, "uint8", force_intrin)
        lanes = {"avx512-vnni": 16, "avx2-vpmaddubsw": 8, "arm-sdot": 4,
                 "arm-i8mm": I8MM_LANES, "cuda-mma": MMA_TILE}.get(base, 8)
        act = "int8" if base in ("arm-sdot", "arm-i8mm", "cuda-mma", "generic") else "uint8"
        plan = LayoutPlan(plan.float_lanes, force_intrin, lanes, act)
    return plan


def _cuda_sm(target) -> int:
    """The compute capability of a CUDA target as an int (``sm_80`` -> 80; 0 if unknown)."""
    arch = str(target.attrs.get("arch", ""))
    return int(arch[3:]) if arch.startswith("sm_") and arch[3:].isdigit() else 0


def _ceil(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------- numpy packing
def pack_conv_weight_float(w: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW -> [O/L, I, KH, KW, L] (O zero-padded to a multiple of L)."""
    o, i, kh, kw = w.shape
    op = _ceil(o, lanes) * lanes
    wpad = np.zeros((op, i, kh, kw), w.dtype)
    wpad[:o] = w
    return np.ascontiguousarray(wpad.reshape(op // lanes, lanes, i, kh, kw).transpose(0, 2, 3, 4, 1))


def pack_conv_weight_int8(w: np.ndarray, lanes: int) -> np.ndarray:
    """OIHW -> [O/L, I/4, KH, KW, L, 4] (O and I zero-padded)."""
    o, i, kh, kw = w.shape
    op, ip = _ceil(o, lanes) * lanes, _ceil(i, 4) * 4
    wpad = np.zeros((op, ip, kh, kw), w.dtype)
    wpad[:o, :i] = w
    return np.ascontiguousarray(
        wpad.reshape(op // lanes, lanes, ip // 4, 4, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def pack_matmul_weight_float(b: np.ndarray, lanes: int) -> np.ndarray:
    """[K, N] -> [N/L, K, L]."""
    k, n = b.shape
    npad = _ceil(n, lanes) * lanes
    bp = np.zeros((k, npad), b.dtype)
    bp[:, :n] = b
    return np.ascontiguousarray(bp.reshape(k, npad // lanes, lanes).transpose(1, 0, 2))


def pack_matmul_weight_int8(b: np.ndarray, lanes: int) -> np.ndarray:
    """[K, N] -> [N/L, K/4, L, 4]."""
    k, n = b.shape
    npad, kp = _ceil(n, lanes) * lanes, _ceil(k, 4) * 4
    bp = np.zeros((kp, npad), b.dtype)
    bp[:k, :n] = b
    return np.ascontiguousarray(bp.reshape(kp // 4, 4, npad // lanes, lanes).transpose(2, 0, 3, 1))


def vpmaddubsw_exact(w_packed: np.ndarray) -> bool:
    """True when vpmaddubsw's int16 pair sums cannot saturate for these weights.

    vpmaddubsw adds two u8*s8 products into int16 with saturation; with
    |w0| + |w1| <= 128 the sum is at most 255 * 128 = 32640 < 32767.
    """
    w = np.abs(w_packed.astype(np.int32))
    pairs = w[..., 0::2] + w[..., 1::2]
    return bool(pairs.max(initial=0) <= 128)


# --------------------------------------------------------------------------- TE computes
def _pad_nchw(x, pad, name="pad"):
    from tvm import te, tirx

    pt, pl, pb, pr = pad
    if not any(pad):
        return x
    n, c, h, w = x.shape
    return te.compute(
        (n, c, h + pt + pb, w + pl + pr),
        lambda a, b, i, j: tirx.if_then_else(
            tirx.all(i >= pt, i < h + pt, j >= pl, j < w + pl),
            x[a, b, i - pt, j - pl], tirx.const(0, x.dtype)),
        name=name)


def _out_hw(h, w, kh, kw, stride, pad, dil):
    oh = (h + pad[0] + pad[2] - (kh - 1) * dil[0] - 1) // stride[0] + 1
    ow = (w + pad[1] + pad[3] - (kw - 1) * dil[1] - 1) // stride[1] + 1
    return oh, ow


def conv2d_packed_float(x, wp, out_channels, stride, pad, dil, lanes, out_dtype):
    """NCHW float conv2d with weights packed as [O/L, C, KH, KW, L]."""
    from tvm import te

    n, c, h, w = (int(v) for v in x.shape)
    _, _, kh, kw, _ = (int(v) for v in wp.shape)
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    op = int(wp.shape[0]) * lanes
    xp = _pad_nchw(x, pad)
    rc = te.reduce_axis((0, c), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    conv = te.compute(
        (n, op, oh, ow),
        lambda b, o, i, j: te.sum(
            (xp[b, rc, i * stride[0] + rh * dil[0], j * stride[1] + rw * dil[1]]
             * wp[o // lanes, rc, rh, rw, o % lanes]).astype(out_dtype),
            axis=[rc, rh, rw]),
        name="conv2d_packed",
        attrs={KERNEL_ATTR: "conv2d_packed", INTRIN_ATTR: "float", LANES_ATTR: lanes})
    if op == out_channels:
        return conv
    return te.compute((n, out_channels, oh, ow), lambda b, o, i, j: conv[b, o, i, j],
                      name="conv2d_slice")


def conv2d_packed_int8(x, wp, comp, out_channels, stride, pad, dil, lanes, shift, act_dtype,
                       intrin):
    """NCHW int8 conv2d: activation repacked to [N, C/4, H, W, 4] in-kernel, weights
    [O/L, C/4, KH, KW, L, 4]; int32 result minus ``comp[o]`` when ``shift`` != 0.

    Computed over the weight's padded output channels, except where the schedule will use
    the pixel-vector kernel (channels are not its vector axis): there over the exact ones."""
    from tvm import te

    from qcompile.schedules.cpu import flat_pixel_rows, int8_pixel_tile_fits

    n, c, h, w = (int(v) for v in x.shape)
    _, cb, kh, kw, _, _ = (int(v) for v in wp.shape)
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    op = int(wp.shape[0]) * lanes
    if (int8_pixel_tile_fits(intrin, ow, (kh, kw), stride[1])
            or flat_pixel_rows(intrin, oh, ow, (kh, kw), stride, pad)):
        op = out_channels
    pt, pl, pb, pr = pad

    xp = te.compute((n, cb, h + pt + pb, w + pl + pr, 4),
                    _nchw4c_value(x, pad, shift, act_dtype), name=PACK_NCHW4C)
    rc = te.reduce_axis((0, cb), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    r4 = te.reduce_axis((0, 4), "r4")
    conv = te.compute(
        (n, op, oh, ow),
        lambda b, o, i, j: te.sum(
            xp[b, rc, i * stride[0] + rh * dil[0], j * stride[1] + rw * dil[1], r4].astype("int32")
            * wp[o // lanes, rc, rh, rw, o % lanes, r4].astype("int32"),
            axis=[rc, rh, rw, r4]),
        name="conv2d_packed_int8",
        attrs={KERNEL_ATTR: "conv2d_packed_int8", INTRIN_ATTR: intrin, LANES_ATTR: lanes})
    if comp is None and op == out_channels:
        return conv
    return _conv_output(conv, comp, (n, out_channels, oh, ow))



def pack_conv_weight_amx(w: np.ndarray, channel_tiles: int) -> np.ndarray:
    """OIHW -> [O/(16 TO), KH, KW, C/64, TO, 16, 16, 4]: one AMX A tile (16 output
    channels x 64 input channels of one tap, as 16 rows of 16 x 4 bytes) is 1 KiB
    contiguous, the TO tiles a register tile loads side by side. O % 16 == C % 64 == 0."""
    o, c, kh, kw = w.shape
    rows = 16 * channel_tiles
    return np.ascontiguousarray(
        w.reshape(o // rows, channel_tiles, 16, c // 64, 16, 4, kh, kw)
        .transpose(0, 6, 7, 3, 1, 2, 4, 5))


# Input channels not a multiple of 64 (MobileNetV2's 96, 144, 160, 320): zero-padded to
# one for AMX where at least 3/4 of the padded channels are real and the padded reduction
# (C' KH KW) is at least 128 deep; measured standalone, 2 threads, AMX vs VNNI: 1x1 convs
# 96->32 at 28x28 0.017 vs 0.020 ms, 144->32 0.021 vs 0.026, 160->960 at 7x7 0.030 vs
# 0.045, 320->1280 0.046 vs 0.095, 3x3 96->64 0.078 vs 0.140; 32->192 (half padding, a
# 64-deep reduction) 0.054 vs 0.024, so it stays on VNNI.
AMX_PAD_CHANNELS = True
AMX_PAD_MIN_FILL = 0.75
AMX_PAD_MIN_DEPTH = 128


def _amx_channel_padded(w: np.ndarray) -> np.ndarray:
    """``w`` with its input channels zero-padded to a multiple of 64 where that pays
    (above), else ``w`` itself (the AMX planner then decides on the real channels)."""
    o, c, kh, kw = w.shape
    cp = _ceil(c, 64) * 64
    if (not AMX_PAD_CHANNELS or cp == c or c % 4 or c / cp < AMX_PAD_MIN_FILL
            or cp * kh * kw < AMX_PAD_MIN_DEPTH):
        return w
    padded = np.zeros((o, cp, kh, kw), w.dtype)
    padded[:, :c] = w
    return padded


def conv2d_packed_amx(x, wp, comp, out_channels, stride, pad, shift, act_dtype, intrin, tiles,
                      flat_columns=None):
    """NCHW int8 conv2d for AMX (``qcompile.schedules.amx``), weights
    ``pack_conv_weight_amx``; exact tiles only (``amx_conv_plan`` decides).

    The activation is repacked to [N, C/4, H', W', 4] as for VNNI; for stride 2 across,
    the padded columns are laid out by phase (even columns, then odd ones, in the same
    width axis), so an AMX B tile -- N output pixels of one tap, 4 bytes each -- is one
    contiguous 4N-byte row for every tap. A strided 1x1 conv repacks only the pixels it
    reads and runs as stride 1. ``flat_columns`` (``amx_conv_plan``): the conv computed
    over the flattened padded plane, ``[N, O, 1, flat_columns]``, then sliced."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    _, kh, kw, cblocks, _, _, k4, _ = (int(v) for v in wp.shape)
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, (1, 1))
    sh, sw = stride
    pt, pl, pb, pr = pad
    wpad = w + pl + pr
    padded = _nchw4c_value(x, pad, shift, act_dtype)
    groups = cblocks * k4  # channel groups of 4, C padded to 64 (zero weights past C)
    if groups > c // 4:
        real = padded

        def padded(b, cc, i, j, c4):
            return real(b, tirx.min(cc, c // 4 - 1), i, j, c4)  # any value: weight 0
    if flat_columns is not None:
        return _conv2d_flat_amx(xp_value=padded, wp=wp, comp=comp, shape=(n, c, h, w),
                                out_channels=out_channels, pad=pad, shift=shift,
                                act_dtype=act_dtype, intrin=intrin, tiles=tiles,
                                columns=flat_columns)
    if kh == kw == 1 and not any(pad) and (sh, sw) != (1, 1):
        # strided 1x1 (a ResNet downsample): repack only the pixels read, then stride 1
        xp = te.compute((n, groups, oh, ow, 4),
                        lambda b, cc, i, j, c4: padded(b, cc, i * sh, j * sw, c4),
                        name="pack_amx_subsample")
        sh = sw = 1

        def column(j, rw):
            return j + rw
    elif sw == 1:
        xp = te.compute((n, groups, h + pt + pb, wpad, 4), padded, name=PACK_NCHW4C)

        def column(j, rw):
            return j + rw
    else:
        phase_w = _ceil(wpad, sw)

        def phased(b, cc, i, col, c4):
            # padded column q * sw + phase sits at phase * phase_w + q; past the padded
            # width (the last phase's tail, never read) repeat the last column
            src = (col % phase_w) * sw + col // phase_w
            return padded(b, cc, i, tirx.min(src, wpad - 1), c4)

        xp = te.compute((n, groups, h + pt + pb, sw * phase_w, 4), phased,
                        name="pack_amx_phases")

        def column(j, rw):
            return (rw % sw) * phase_w + j + rw // sw
    conv = _amx_reduction(xp, wp, (n, out_channels, oh, ow), intrin, tiles,
                          lambda i, j, rh, rw: (i * sh + rh, column(j, rw)))
    if comp is None:
        return conv
    return _conv_output(conv, comp, (n, out_channels, oh, ow))


def _amx_reduction(xp, wp, shape, intrin, tiles, position):
    """The AMX conv's reduction over input-channel blocks x taps x 64 channels: output
    (b, o, i, j) sums ``xp[b, group, *position(i, j, rh, rw), 4]`` (the activation row and
    column a tap reads) times the packed weight."""
    from tvm import te

    from qcompile.schedules.amx import AMX_KIND, AMX_TILES_ATTR

    _, kh, kw, cblocks, to, _, k4, _ = (int(v) for v in wp.shape)
    rows = 16 * to
    rcb = te.reduce_axis((0, cblocks), "rcb")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    rci = te.reduce_axis((0, k4), "rci")
    r4 = te.reduce_axis((0, 4), "r4")

    def weight(o):
        # one channel tile: a literal 0 (the AMX tile description indexes it so too)
        tile = (o % rows) // 16 if to > 1 else 0
        return wp[o // rows, rh, rw, rcb, tile, o % 16, rci, r4]

    return te.compute(
        shape,
        lambda b, o, i, j: te.sum(
            xp[(b, rcb * k4 + rci, *position(i, j, rh, rw), r4)].astype("int32")
            * weight(o).astype("int32"),
            axis=[rcb, rh, rw, rci, r4]),
        name="conv2d_packed_amx",
        attrs={KERNEL_ATTR: AMX_KIND, INTRIN_ATTR: intrin, AMX_TILES_ATTR: list(tiles)})


def _conv2d_flat_amx(xp_value, wp, comp, shape, out_channels, pad, shift, act_dtype, intrin,
                     tiles, columns):
    """The stride-1 AMX conv over the flattened padded plane: the repack is
    ``[N, C/4, 1, L, 4]`` (padded pixel (r, q) at r W' + q; L covers the last tile's reads),
    output column p = i W' + j reads input column p + rh W' + rw for every tap, so every
    B tile row is contiguous whatever the row width."""
    from tvm import te, tirx

    n, c, h, w = shape
    _, kh, kw, cblocks, _, _, k4, _ = (int(v) for v in wp.shape)
    pt, pl, pb, pr = pad
    hp, wpw = h + pt + pb, w + pl + pr
    oh, ow = hp - kh + 1, wpw - kw + 1
    length = max(hp * wpw, columns + (kh - 1) * wpw + kw - 1)

    def flat(b, cc, _u, q, c4):
        inside = q < hp * wpw  # the tail past the plane feeds only dropped columns
        qq = tirx.min(q, hp * wpw - 1)
        return tirx.if_then_else(inside, xp_value(b, cc, qq // wpw, qq % wpw, c4),
                                 tirx.const(shift, act_dtype))

    xp = te.compute((n, cblocks * k4, 1, length, 4), flat, name="pack_amx_flat")
    conv = _amx_reduction(xp, wp, (n, out_channels, 1, columns), intrin, tiles,
                          lambda u, p, rh, rw: (u, p + rh * wpw + rw))
    return _conv_output(conv, comp, (n, out_channels, oh, ow),
                        at=lambda b, o, i, j: (b, o, 0, i * wpw + j))


# Name of the int8 conv's activation repack stage ([N, C, H, W] -> [N, C/4, H', W', 4]).
PACK_NCHW4C = "pack_nchw4c"


def _nchw4c_value(x, pad, shift: int, act_dtype: str):
    """The repack's element (b, cc, i, j, c4): input channel 4*cc + c4 at the padded pixel
    (i, j), plus ``shift``. Written as the plain padding pattern -- if_then_else(bounds,
    value, constant), no bounds test where nothing is padded -- so the schedule can split it
    into a zero fill and an unpredicated interleaving copy (``schedules.cpu``), which LLVM
    vectorizes: with a bounds test on every element it ran at 1-3 GB/s."""
    from tvm import tirx

    _n, c, h, w = (int(v) for v in x.shape)
    pt, pl, _pb, _pr = pad

    def value(b, cc, i, j, c4):
        ch = cc * 4 + c4
        bounds = []
        if any(pad):
            bounds += [i >= pt, i < h + pt, j >= pl, j < w + pl]
        if c % 4:
            bounds.append(ch < c)
            ch = tirx.min(ch, c - 1)
        v = x[b, ch, i - pt, j - pl]
        v = (v.astype("int32") + shift).astype(act_dtype) if shift else v.astype(act_dtype)
        if not bounds:
            return v
        return tirx.if_then_else(tirx.all(*bounds), v, tirx.const(shift, act_dtype))

    return value


def _conv_output(conv, comp, shape, at=lambda b, o, i, j: (b, o, i, j)):
    """The packed conv's [N, O, OH, OW] result: padded channels/columns cut off and, for
    uint8 activations fed to s8 x s8 instructions, the zero-point compensation
    ``comp[o]`` subtracted. ``at``: where output (b, o, i, j) sits in ``conv``."""
    from tvm import te

    if comp is None:
        return te.compute(shape, lambda b, o, i, j: conv[at(b, o, i, j)], name="conv2d_slice")
    return te.compute(shape, lambda b, o, i, j: conv[at(b, o, i, j)] - comp[o],
                      name="conv2d_shift_comp")

def conv2d_spatial(x, wt, stride, pad, dil, groups, out_dtype):
    """NCHW grouped / depthwise conv2d with OIHW weights, vectorized over width."""
    from tvm import te

    n, c, h, w = (int(v) for v in x.shape)
    o, cpg, kh, kw = (int(v) for v in wt.shape)
    opg = o // groups
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    xp = _pad_nchw(x, pad)
    rc = te.reduce_axis((0, cpg), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    return te.compute(
        (n, o, oh, ow),
        lambda b, oc, i, j: te.sum(
            xp[b, (oc // opg) * cpg + rc, i * stride[0] + rh * dil[0],
               j * stride[1] + rw * dil[1]].astype(out_dtype)
            * wt[oc, rc, rh, rw].astype(out_dtype),
            axis=[rc, rh, rw]),
        name="conv2d_spatial",
        attrs={KERNEL_ATTR: "conv2d_spatial", INTRIN_ATTR: "none", LANES_ATTR: 0})


def pack_depthwise_weight(w: np.ndarray, lanes: int) -> np.ndarray:
    """[C, 1, KH, KW] -> [C/L, KH, KW, L] (C zero-padded)."""
    c, _, kh, kw = w.shape
    cp = _ceil(c, lanes) * lanes
    wpad = np.zeros((cp, kh, kw), w.dtype)
    wpad[:c] = w[:, 0]
    return np.ascontiguousarray(wpad.reshape(cp // lanes, lanes, kh, kw).transpose(0, 2, 3, 1))


def conv2d_depthwise_packed(x, wp, stride, pad, dil, lanes, out_dtype):
    """Depthwise conv2d (multiplier 1) vectorized over channels: the kernel's padding
    stage writes the input as [N, C/L, H, W, L], weights are [C/L, KH, KW, L]; every
    load of the inner loop is a contiguous vector, also for stride 2."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    _, kh, kw, _ = (int(v) for v in wp.shape)
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    cb = int(wp.shape[0])
    pt, pl, pb, pr = pad

    # int8 -> int32 in float32 arithmetic: every product and partial sum is an integer of
    # magnitude < kh*kw*255*128 < 2**24 (checked by the caller), so float32 is exact and
    # the kernel runs on FMA lanes instead of 32-bit integer multiplies.
    acc = "float32" if out_dtype == "int32" else out_dtype

    def _xval(b, cc, i, j, ci):
        ch = cc * lanes + ci
        valid = tirx.all(i >= pt, i < h + pt, j >= pl, j < w + pl, ch < c)
        # the cast inside the select: the plain padding pattern, which the schedule splits
        # into a zero fill and an unpredicated (vectorizable) copy
        return tirx.if_then_else(valid, x[b, tirx.min(ch, c - 1), i - pt, j - pl].astype(acc),
                                 tirx.const(0, acc))

    xp = te.compute((n, cb, h + pt + pb, w + pl + pr, lanes), _xval, name="pack_nchwc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    conv = te.compute(
        (n, cb * lanes, oh, ow),
        lambda b, o, i, j: te.sum(
            xp[b, o // lanes, i * stride[0] + rh * dil[0], j * stride[1] + rw * dil[1],
               o % lanes]
            * wp[o // lanes, rh, rw, o % lanes].astype(acc),
            axis=[rh, rw]),
        name="conv2d_dw_packed",
        attrs={KERNEL_ATTR: "conv2d_dw_packed", INTRIN_ATTR: "none", LANES_ATTR: lanes})
    if cb * lanes == c and acc == out_dtype:
        return conv
    return te.compute((n, c, oh, ow), lambda b, o, i, j: conv[b, o, i, j].astype(out_dtype),
                      name="conv2d_slice")


def matmul_packed_float(a, bp, n_out, lanes, out_dtype):
    """[M, K] x packed [N/L, K, L] -> [M, N]."""
    from tvm import te

    m, k = (int(v) for v in a.shape)
    npad = int(bp.shape[0]) * lanes
    rk = te.reduce_axis((0, k), "rk")
    mm = te.compute(
        (m, npad),
        lambda i, j: te.sum((a[i, rk] * bp[j // lanes, rk, j % lanes]).astype(out_dtype), axis=rk),
        name="matmul_packed",
        attrs={KERNEL_ATTR: "matmul_packed", INTRIN_ATTR: "float", LANES_ATTR: lanes})
    if npad == n_out:
        return mm
    return te.compute((m, n_out), lambda i, j: mm[i, j], name="matmul_slice")


def matmul_packed_int8(a, bp, comp, n_out, lanes, shift, act_dtype, intrin):
    """[M, K] int8 x packed [N/L, K/4, L, 4] int8 -> [M, N] int32."""
    from tvm import te, tirx

    m, k = (int(v) for v in a.shape)
    kb = int(bp.shape[1])
    npad = int(bp.shape[0]) * lanes

    def _aval(i, kk, k4):
        ch = kk * 4 + k4
        v = tirx.if_then_else(ch < k, a[i, tirx.min(ch, k - 1)].astype("int32"),
                              tirx.const(0, "int32"))
        if shift:
            v = v + shift
        return v.astype(act_dtype)

    ap = te.compute((m, kb, 4), _aval, name="pack_k4")
    rk = te.reduce_axis((0, kb), "rk")
    r4 = te.reduce_axis((0, 4), "r4")
    mm = te.compute(
        (m, npad),
        lambda i, j: te.sum(ap[i, rk, r4].astype("int32")
                            * bp[j // lanes, rk, j % lanes, r4].astype("int32"), axis=[rk, r4]),
        name="matmul_packed_int8",
        attrs={KERNEL_ATTR: "matmul_packed_int8", INTRIN_ATTR: intrin, LANES_ATTR: lanes})
    if comp is None and npad == n_out:
        return mm
    if comp is None:
        return te.compute((m, n_out), lambda i, j: mm[i, j], name="matmul_slice")
    return te.compute((m, n_out), lambda i, j: mm[i, j] - comp[j], name="matmul_shift_comp")


# --------------------------------------------------------------------------- ARM i8mm (smmla)
# smmla multiplies a 2x8 s8 block by the transpose of another 2x8 s8 block into a 2x2 s32
# tile. Both operands must be 16 contiguous bytes: weights are packed two output channels
# at a time, and the activation is laid out so that the two rows (two output pixels of a
# conv, two rows of a matmul) sit next to each other in memory -- also for stride 2.


def pack_conv_weight_i8mm(w: np.ndarray) -> np.ndarray:
    """OIHW -> [O/2, C/8, KH, KW, 2, 8] (O and C zero-padded)."""
    o, i, kh, kw = w.shape
    op, ip = _ceil(o, I8MM_LANES) * I8MM_LANES, _ceil(i, I8MM_K) * I8MM_K
    wpad = np.zeros((op, ip, kh, kw), w.dtype)
    wpad[:o, :i] = w
    return np.ascontiguousarray(
        wpad.reshape(op // I8MM_LANES, I8MM_LANES, ip // I8MM_K, I8MM_K, kh, kw)
        .transpose(0, 2, 4, 5, 1, 3))


def pack_matmul_weight_i8mm(b: np.ndarray) -> np.ndarray:
    """[K, N] -> [N/2, K/8, 2, 8] (N and K zero-padded)."""
    k, n = b.shape
    npad, kp = _ceil(n, I8MM_LANES) * I8MM_LANES, _ceil(k, I8MM_K) * I8MM_K
    bp = np.zeros((kp, npad), b.dtype)
    bp[:k, :n] = b
    return np.ascontiguousarray(
        bp.reshape(kp // I8MM_K, I8MM_K, npad // I8MM_LANES, I8MM_LANES).transpose(2, 0, 3, 1))


I8MM_MAX_PAIRS = 4  # output-pixel pairs per register tile (4 pairs x 4 channel pairs = 16 acc)


def i8mm_padded_width(ow: int) -> int:
    """Output width rounded up to whole register tiles of pixel pairs. A tile of ``t``
    pairs loads ``t`` activation blocks for ``4 t`` smmla, so small tiles cost loads: the
    width is chosen by padded columns x (1 + 1 / (2 t)), the load overhead of the tile."""
    def padded(pairs):
        return _ceil(ow, 2 * pairs) * 2 * pairs

    # ties: the fewer padded columns, then the larger tile
    best = min(range(I8MM_MAX_PAIRS, 0, -1),
               key=lambda t: (round(padded(t) * (1 + 0.5 / t), 6), padded(t)))
    return padded(best)


def conv2d_packed_i8mm(x, wp, comp, out_channels, stride, pad, dil, shift, act_dtype, intrin):
    """NCHW int8 conv2d for smmla: weights [O/2, C/8, KH, KW, 2, 8]; the kernel's padding
    stage writes the activation polyphase, ``[N, C/8, H, SW, W/SW, 8]`` (column ``q*SW + p``
    at ``[.., p, q, :]``), so output pixels ``j`` and ``j+1`` read adjacent 8-byte groups
    for every stride. The output width is padded to whole pixel-pair tiles, then sliced."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    ob, cb, kh, kw, _, _ = (int(v) for v in wp.shape)
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    owp = i8mm_padded_width(ow)
    sh, sw = stride
    dh, dw = dil
    pt, pl, pb, pr = pad
    wq = owp + ((kw - 1) * dw) // sw  # phase-columns read for owp output columns

    def _xval(b, cc, row, ph, q, c8):
        ch = cc * I8MM_K + c8
        col = q * sw + ph
        valid = tirx.all(row >= pt, row < h + pt, col >= pl, col < w + pl, ch < c)
        v = tirx.if_then_else(valid, x[b, tirx.min(ch, c - 1), row - pt, col - pl].astype("int32"),
                              tirx.const(0, "int32"))
        if shift:
            v = v + shift
        return v.astype(act_dtype)

    xp = te.compute((n, cb, h + pt + pb, sw, wq, I8MM_K), _xval, name="pack_i8mm")
    rc = te.reduce_axis((0, cb), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    r8 = te.reduce_axis((0, I8MM_K), "r8")
    conv = te.compute(
        (n, ob * I8MM_LANES, oh, owp),
        lambda b, o, i, j: te.sum(
            xp[b, rc, i * sh + rh * dh, (rw * dw) % sw, j + (rw * dw) // sw, r8].astype("int32")
            * wp[o // I8MM_LANES, rc, rh, rw, o % I8MM_LANES, r8].astype("int32"),
            axis=[rc, rh, rw, r8]),
        name="conv2d_packed_i8mm",
        attrs={KERNEL_ATTR: "conv2d_packed_i8mm", INTRIN_ATTR: intrin, LANES_ATTR: I8MM_LANES})
    if comp is None and ob * I8MM_LANES == out_channels and owp == ow:
        return conv
    return _conv_output(conv, comp, (n, out_channels, oh, ow))


def matmul_packed_i8mm(a, bp, comp, n_out, shift, act_dtype, intrin):
    """[M, K] int8 x packed [N/2, K/8, 2, 8] -> [M, N] int32; the activation is repacked in
    the kernel to ``[M/2, K/8, 2, 8]`` (rows paired, M zero-padded to even)."""
    from tvm import te, tirx

    m, k = (int(v) for v in a.shape)
    nb, kb = int(bp.shape[0]), int(bp.shape[1])
    mb = _ceil(m, I8MM_LANES)

    def _aval(ib, kk, i2, k8):
        row, ch = ib * I8MM_LANES + i2, kk * I8MM_K + k8
        v = tirx.if_then_else(tirx.all(row < m, ch < k),
                              a[tirx.min(row, m - 1), tirx.min(ch, k - 1)].astype("int32"),
                              tirx.const(0, "int32"))
        if shift:
            v = v + shift
        return v.astype(act_dtype)

    ap = te.compute((mb, kb, I8MM_LANES, I8MM_K), _aval, name="pack_i8mm")
    rk = te.reduce_axis((0, kb), "rk")
    r8 = te.reduce_axis((0, I8MM_K), "r8")
    mm = te.compute(
        (mb * I8MM_LANES, nb * I8MM_LANES),
        lambda i, j: te.sum(
            ap[i // I8MM_LANES, rk, i % I8MM_LANES, r8].astype("int32")
            * bp[j // I8MM_LANES, rk, j % I8MM_LANES, r8].astype("int32"), axis=[rk, r8]),
        name="matmul_packed_i8mm",
        attrs={KERNEL_ATTR: "matmul_packed_i8mm", INTRIN_ATTR: intrin, LANES_ATTR: I8MM_LANES})
    if comp is None and nb * I8MM_LANES == n_out and mb * I8MM_LANES == m:
        return mm
    if comp is None:
        return te.compute((m, n_out), lambda i, j: mm[i, j], name="matmul_slice")
    return te.compute((m, n_out), lambda i, j: mm[i, j] - comp[j], name="matmul_shift_comp")


# --------------------------------------------------------------------------- CUDA s8 tensor cores
# wmma multiplies 16x16 s8 tiles into 16x16 s32 (mma.sync ... s32.s8.s8.s32 in the PTX). The
# kernels are plain GEMMs over zero-padded, row-major operands: ``A[Mp, Kp]`` (a matmul's
# activation, or a conv's im2col matrix with rows = output pixels ``(n, oh, ow)`` and
# columns = ``(c, kh, kw)``) times ``W[Np, Kp]`` (weights transposed, k contiguous, which is
# wmma's col-major B). The conv result is read back to NCHW by the epilogue.


def pack_matmul_weight_mma(b: np.ndarray) -> np.ndarray:
    """[K, N] -> [Np, Kp] (transposed, N and K zero-padded to multiples of 16)."""
    k, n = b.shape
    out = np.zeros((_ceil(n, MMA_TILE) * MMA_TILE, _ceil(k, MMA_TILE) * MMA_TILE), b.dtype)
    out[:n, :k] = b.T
    return out


def pack_conv_weight_mma(w: np.ndarray) -> np.ndarray:
    """OIHW -> [Op, Kp], K = C*KH*KW in (c, kh, kw) order, zero-padded to multiples of 16."""
    o = w.shape[0]
    return pack_matmul_weight_mma(w.reshape(o, -1).T)


def _shifted(v, shift, act_dtype):
    from tvm import tirx

    v = tirx.if_then_else(v[0], v[1].astype("int32"), tirx.const(0, "int32"))
    return (v + shift if shift else v).astype(act_dtype)


def conv2d_mma_int8(x, wp, comp, out_channels, kernel, stride, pad, dil, shift, act_dtype,
                    intrin):
    """NCHW int8 conv2d as an s8 tensor-core GEMM: in-kernel im2col ``[Mp, Kp]`` times the
    packed weights ``[Op, Kp]``; the epilogue reads the ``[pixel, channel]`` result as NCHW."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in x.shape)
    kh, kw = kernel
    oh, ow = _out_hw(h, w, kh, kw, stride, pad, dil)
    op, kp = (int(v) for v in wp.shape)
    m, k = n * oh * ow, c * kh * kw
    mp = _ceil(m, MMA_TILE) * MMA_TILE
    pt, pl = pad[0], pad[1]

    def _col(r, q):
        r, q = tirx.min(r, m - 1), tirx.min(q, k - 1)
        b, pix = r // (oh * ow), r % (oh * ow)
        ch, tap = q // (kh * kw), q % (kh * kw)
        row = pix // ow * stride[0] + tap // kw * dil[0] - pt
        col = pix % ow * stride[1] + tap % kw * dil[1] - pl
        valid = tirx.all(row >= 0, row < h, col >= 0, col < w)
        return b, ch, row, col, valid

    def _aval(r, q):
        b, ch, row, col, valid = _col(r, q)
        ok = tirx.all(r < m, q < k, valid)
        return _shifted((ok, x[b, ch, tirx.max(tirx.min(row, h - 1), 0),
                               tirx.max(tirx.min(col, w - 1), 0)]), shift, act_dtype)

    xa = te.compute((mp, kp), _aval, name="pack_im2col")
    rk = te.reduce_axis((0, kp), "rk")
    gemm = te.compute(
        (mp, op),
        lambda r, o: te.sum(xa[r, rk].astype("int32") * wp[o, rk].astype("int32"), axis=rk),
        name="conv2d_mma_int8",
        attrs={KERNEL_ATTR: "conv2d_mma_int8", INTRIN_ATTR: intrin, LANES_ATTR: MMA_TILE})

    def _out(b, o, i, j):
        v = gemm[(b * oh + i) * ow + j, o]
        return v - comp[o] if comp is not None else v

    return te.compute((n, out_channels, oh, ow), _out, name="conv2d_mma_nchw")


def matmul_mma_int8(a, bp, comp, n_out, shift, act_dtype, intrin):
    """[M, K] int8 x packed [Np, Kp] -> [M, N] int32 on s8 tensor cores."""
    from tvm import te, tirx

    m, k = (int(v) for v in a.shape)
    npad, kp = (int(v) for v in bp.shape)
    mp = _ceil(m, MMA_TILE) * MMA_TILE
    ap = te.compute(
        (mp, kp),
        lambda i, q: _shifted((tirx.all(i < m, q < k), a[tirx.min(i, m - 1), tirx.min(q, k - 1)]),
                              shift, act_dtype),
        name="pack_rows")
    rk = te.reduce_axis((0, kp), "rk")
    mm = te.compute(
        (mp, npad),
        lambda i, j: te.sum(ap[i, rk].astype("int32") * bp[j, rk].astype("int32"), axis=rk),
        name="matmul_mma_int8",
        attrs={KERNEL_ATTR: "matmul_mma_int8", INTRIN_ATTR: intrin, LANES_ATTR: MMA_TILE})
    if comp is None:
        return te.compute((m, n_out), lambda i, j: mm[i, j], name="matmul_slice")
    return te.compute((m, n_out), lambda i, j: mm[i, j] - comp[j], name="matmul_shift_comp")


# --------------------------------------------------------------------------- Relax rewrite
def _static_shape(expr):
    try:
        shape = expr.ty.shape
        vals = shape.values if hasattr(shape, "values") else shape
        return tuple(int(v) for v in vals)
    except Exception:  # noqa: BLE001 - symbolic or unknown shape
        return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _const_numpy(expr):
    from tvm import relax

    if isinstance(expr, type(relax.const(0))):
        return expr.value.numpy()
    return None


def _int8_parts(plan: LayoutPlan, x_dtype: str):
    """(intrinsic, activation dtype, shift) for an int8 kernel with ``x_dtype`` input."""
    act = plan.act_dtype if plan.int8_intrin != "generic" else x_dtype
    if x_dtype == act:
        return act, 0
    return act, (128 if act == "uint8" else -128)


def _zero_point_comp(shift: int, weight: np.ndarray, reduce_axes):
    """The int32 constant a shifted-activation int8 kernel subtracts per output channel:
    ``shift * sum(weight over reduce_axes)`` (the activation was moved by ``shift`` to
    fit the instruction's operand type); ``None`` when nothing was shifted."""
    from tvm import relax

    if not shift:
        return None
    return relax.const((shift * weight.astype(np.int64).sum(axis=reduce_axes))
                       .astype(np.int32))


def _float_lanes(lanes: int, channels: int) -> int:
    """``lanes``, or half of it when that avoids padding the output channels."""
    if channels % lanes and lanes > 4 and channels % (lanes // 2) == 0:
        return lanes // 2
    return lanes


def _make_mutator(plan: LayoutPlan):
    from tvm import relax
    from tvm.relax import expr_functor

    @expr_functor.mutator
    class _Packer(relax.PyExprMutator):
        def visit_call_(self, orig):
            call = super().visit_call_(orig)
            try:
                name = call.op.name
            except AttributeError:
                return call
            try:
                if name == "relax.nn.conv2d":
                    new = self._conv2d(call, orig)
                elif name == "relax.matmul":
                    new = self._matmul(call, orig)
                else:
                    new = None
            except Exception:  # noqa: BLE001 - never fail a build: leave the op as it was
                if os.environ.get("QCOMPILE_SCHEDULE_DEBUG"):
                    raise
                new = None
            return call if new is None else new

        # ---- conv2d
        def _conv2d(self, call, orig):
            attrs = call.attrs
            if (str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                    or str(attrs.out_layout) != "NCHW"):
                return None
            x, wexpr = call.args
            w = _const_numpy(wexpr)
            xshape = _static_shape(x)
            if w is None or xshape is None or len(xshape) != 4 or w.ndim != 4:
                return None
            out_dtype = _dtype(orig)
            x_dtype, w_dtype = _dtype(x), str(w.dtype)
            stride = tuple(int(v) for v in attrs.strides)
            pad = tuple(int(v) for v in attrs.padding)
            dil = tuple(int(v) for v in attrs.dilation)
            groups = int(attrs.groups)
            is_float = x_dtype == "float32" and w_dtype == "float32" and out_dtype == "float32"
            is_int8 = (x_dtype in ("uint8", "int8") and w_dtype == "int8"
                       and out_dtype == "int32")
            if not (is_float or is_int8):
                return None
            o = w.shape[0]
            bb = self.builder_
            if plan.float_lanes == 0 and (is_float or groups != 1):
                return None  # GPU: only the packed int8 kernels are ours
            exact_f32 = is_float or w.shape[2] * w.shape[3] * 255 * 128 < 2 ** 24
            if groups == xshape[1] == o and w.shape[1] == 1 and plan.float_lanes and exact_f32:
                lanes = _float_lanes(plan.float_lanes, o) if is_float else plan.float_lanes
                wdw = pack_depthwise_weight(w, lanes)
                if not is_float:
                    wdw = wdw.astype(np.float32)  # exact: int8 values
                return bb.call_te(conv2d_depthwise_packed, x, relax.const(wdw), stride, pad,
                                  dil, lanes, out_dtype, primfunc_name_hint="conv2d_dw_packed")
            if groups != 1:
                return bb.call_te(conv2d_spatial, x, relax.const(w), stride, pad, dil, groups,
                                  out_dtype, primfunc_name_hint="conv2d_spatial")
            if is_float:
                lanes = _float_lanes(plan.float_lanes, o)
                wp = pack_conv_weight_float(w, lanes)
                return bb.call_te(conv2d_packed_float, x, relax.const(wp), o, stride, pad, dil,
                                  lanes, out_dtype, primfunc_name_hint="conv2d_packed")
            lanes = plan.int8_lanes
            intrin = plan.int8_intrin
            w_amx = _amx_channel_padded(w) if plan.amx else w
            amx = self._amx_plan(w_amx, xshape, stride, dil, groups, pad) if plan.amx else None
            if amx is not None:
                tiles, flat_columns = amx
                act, shift = _int8_parts(plan, x_dtype)
                comp = _zero_point_comp(shift, w, (1, 2, 3))
                wp = pack_conv_weight_amx(w_amx, tiles[0])
                return bb.call_te(conv2d_packed_amx, x, relax.const(wp), comp, o, stride, pad,
                                  shift, act, plan.amx, tiles, flat_columns,
                                  primfunc_name_hint="conv2d_packed_amx")
            if intrin.removeprefix("portable-") == "arm-i8mm":
                act, shift = _int8_parts(plan, x_dtype)
                comp = _zero_point_comp(shift, w, (1, 2, 3))
                return bb.call_te(conv2d_packed_i8mm, x, relax.const(pack_conv_weight_i8mm(w)),
                                  comp, o, stride, pad, dil, shift, act, intrin,
                                  primfunc_name_hint="conv2d_packed_i8mm")
            if intrin.removeprefix("portable-") == "cuda-mma":
                act, shift = _int8_parts(plan, x_dtype)
                comp = _zero_point_comp(shift, w, (1, 2, 3))
                return bb.call_te(conv2d_mma_int8, x, relax.const(pack_conv_weight_mma(w)),
                                  comp, o, tuple(w.shape[2:]), stride, pad, dil, shift, act,
                                  intrin, primfunc_name_hint="conv2d_mma_int8")
            wp = pack_conv_weight_int8(w, lanes)
            if intrin.endswith("avx2-vpmaddubsw") and not vpmaddubsw_exact(wp):
                intrin = "generic"  # saturating int16 pairs would change results
            act, shift = _int8_parts(LayoutPlan(0, intrin, lanes, plan.act_dtype), x_dtype)
            comp = _zero_point_comp(shift, w, (1, 2, 3))
            return bb.call_te(conv2d_packed_int8, x, relax.const(wp), comp, o, stride, pad, dil,
                              lanes, shift, act, intrin, primfunc_name_hint="conv2d_packed_int8")

        @staticmethod
        def _amx_plan(w, xshape, stride, dil, groups, pad):
            from qcompile.schedules.amx import amx_conv_plan

            o, c, kh, kw = w.shape
            out_hw = _out_hw(xshape[2], xshape[3], kh, kw, stride, pad, dil)
            return amx_conv_plan(c, o, out_hw, (kh, kw), stride, dil, groups)

        # ---- matmul
        def _matmul(self, call, orig):
            a, bexpr = call.args
            b = _const_numpy(bexpr)
            ashape = _static_shape(a)
            if b is None or ashape is None or b.ndim != 2 or len(ashape) != 2:
                return None
            out_dtype = _dtype(orig)
            a_dtype, b_dtype = _dtype(a), str(b.dtype)
            k, n = b.shape
            bb = self.builder_
            if plan.float_lanes and a_dtype == "float32" and b_dtype == "float32" \
                    and out_dtype == "float32":
                lanes = _float_lanes(plan.float_lanes, n)
                return bb.call_te(matmul_packed_float, a,
                                  relax.const(pack_matmul_weight_float(b, lanes)), n, lanes,
                                  out_dtype, primfunc_name_hint="matmul_packed")
            if a_dtype in ("uint8", "int8") and b_dtype == "int8" and out_dtype == "int32":
                lanes, intrin = plan.int8_lanes, plan.int8_intrin
                if intrin.removeprefix("portable-") == "arm-i8mm":
                    act, shift = _int8_parts(plan, a_dtype)
                    comp = _zero_point_comp(shift, b, 0)
                    return bb.call_te(matmul_packed_i8mm, a,
                                      relax.const(pack_matmul_weight_i8mm(b)), comp, n, shift,
                                      act, intrin, primfunc_name_hint="matmul_packed_i8mm")
                if intrin.removeprefix("portable-") == "cuda-mma":
                    act, shift = _int8_parts(plan, a_dtype)
                    comp = _zero_point_comp(shift, b, 0)
                    return bb.call_te(matmul_mma_int8, a, relax.const(pack_matmul_weight_mma(b)),
                                      comp, n, shift, act, intrin,
                                      primfunc_name_hint="matmul_mma_int8")
                bp = pack_matmul_weight_int8(b, lanes)
                if intrin.endswith("avx2-vpmaddubsw") and not vpmaddubsw_exact(bp):
                    intrin = "generic"
                act, shift = _int8_parts(LayoutPlan(0, intrin, lanes, plan.act_dtype), a_dtype)
                comp = _zero_point_comp(shift, b, 0)
                return bb.call_te(matmul_packed_int8, a, relax.const(bp), comp, n, lanes, shift,
                                  act, intrin, primfunc_name_hint="matmul_packed_int8")
            return None

    return _Packer


def pack_weights_pass(target, force_intrin: str | None = None):
    """The Relax module pass that packs constant conv2d/matmul weights for ``target``."""
    import tvm
    from tvm import relax

    plan = plan_for_target(target, force_intrin)

    @tvm.transform.module_pass(opt_level=0, name="qcompile.PackWeights")
    def _pass(mod, _ctx):
        if plan is None:
            return mod
        mod = relax.transform.FoldConstant()(mod)
        packer = _make_mutator(plan)(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                func = packer.visit_expr(func)
                packer.builder_.update_func(gv, func)
        return packer.builder_.get()

    return _pass


def layout_passes(target) -> list:
    """Passes run before LegalizeOps (see ``qcompile.pipeline.fuse_passes``)."""
    return [pack_weights_pass(target)]
