"""Realize: rewrite the planned layers into integer kernels.

For every quantized layer (see :mod:`.plan`)::

    q_x   = the layer input in uint8 (asymmetric) or int8 (symmetric): either
            carried in int8 from the producing layer, or quantized from float
            at its root (clip(round(x / s) + zp))
    [q_x  = pad(q_x, value=zp_x)]          # only when zp_x != 0 and the conv pads:
                                            # the padding must be "float zero"
    acc   = conv2d(q_x, q_W, out_dtype="int32")   # NCHW, OIHW int8, groups kept
          | matmul(q_x, q_W[K, N], out_dtype="int32")
    acc   = acc + bias_q                   # int32: round(b / (s_x s_w)) - zp_x * sum(q_W)
    then one of two elementwise epilogues (FuseOps puts them in the conv/matmul
    kernel):
      requantize -> the next layer's input:  clip(round(acc * M) + zp_y, lo, hi) -> u8/i8
                    M = s_x s_w / s_y per channel; ReLU/Clip become lo/hi
      dequantize -> float consumers:         acc * (s_x s_w), then ReLU/Clip in float

The zero-point term ``zp_x * sum(q_W)`` is folded into the int32 bias, which
is exact because the explicit pad makes every window see ``zp_x`` where the
float model sees 0. Weights are symmetric per output channel (or per tensor),
7-bit ([-63, 63]) with ``reduce_range`` (AVX2's vpmaddubsw sums two u8 x s8
products in saturating int16: 2 * 255 * 127 overflows, 2 * 255 * 63 does not).

Requantization uses a float32 multiply + round-half-to-even by default, not a
fixed-point multiplier + shift (``requant="fixed"``: int64 ``acc * m0`` plus
rounding, arithmetic right shift). Measured on the bundled Fashion-MNIST CNN,
x86_64-avx2 target, whole-model time from ``vm.time_evaluator`` (min of 5x20
runs, shared 2-core machine; ``benchmarks/quant_accuracy.py --requant-timing``):
two runs: batch 1: float 0.105 / 0.107 ms vs fixed 0.149 / 0.108 ms; batch 50:
float 4.46 / 8.98 ms vs fixed 8.41 / 11.85 ms; the same top-1 on the images run.
AVX2 has no vectorized 64-bit multiply, so the int64 epilogue costs more than
the float one; float32 holds
int32 accumulators up to 2^24 exactly, and beyond that its relative error
(2^-24) is far below one output step. The fixed-point form stays available
for targets where bit-exact agreement across platforms matters more.

Residual adds (ResNet, MobileNetV2): a layer without an activation of its own
whose output only feeds ``add(out, r)`` (same shape, ``r`` another tensor),
optionally followed by ReLU/Clip, takes the add into its epilogue::

    y = round(acc * M + (q_r - zp_r) * M_r) + zp_y,  clipped   M_r = s_r / s_y
        (or, when the sum feeds float consumers: act(acc * s_x s_w + s_r (q_r - zp_r)))

``q_r`` is the residual in int8 when it is carried quantized (a root: the
block input); a residual that only exists in float (a projection shortcut's
conv output) is added in float. FuseOps then puts conv + bias + requantize +
residual + ReLU into the conv kernel, which reads the residual in int8 and
writes int8: no float tensor is stored between blocks.

Ops on the path between two quantized layers that commute with a monotone
per-tensor quantization (max-pool, reshape, permute, squeeze, expand_dims)
run on the int8 tensor. Everything else stays float, with dequantize /
quantize at the borders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from . import _ir

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
# Smallest scale used: far above float32's denormals, so x / scale never overflows for
# finite activations of ordinary size, and data below it quantizes to zero.
MIN_SCALE = 1e-30


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int
    dtype: str   # "uint8" | "int8"
    qmin: int
    qmax: int

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype}


def act_qparams(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Activation parameters for the float range [lo, hi] (0 always representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "uint8":
        scale = (hi - lo) / 255.0
        if scale <= 0 or not np.isfinite(scale):
            return QParams(1.0, 0, "uint8", 0, 255)
        if scale < MIN_SCALE:  # denormal-sized data: quantizes to zero, never to inf
            scale = MIN_SCALE
            lo = max(lo, -255 * MIN_SCALE)
        zp = int(np.clip(np.round(-lo / scale), 0, 255))
        return QParams(float(np.float32(scale)), zp, "uint8", 0, 255)
    if dtype == "int8":
        amax = max(-lo, hi)
        scale = amax / 127.0
        if scale <= 0 or not np.isfinite(scale):
            scale = 1.0
        scale = max(scale, MIN_SCALE)
        return QParams(float(np.float32(scale)), 0, "int8", -128, 127)
    raise ValueError(f"activation dtype must be uint8 or int8, got {dtype}")


WEIGHT_SCALES = ("minmax", "mse")
# clip ratios (fractions of max|w|) tried per channel by weight_scale="mse"; 1.0 is
# among them, so the chosen scale never has a larger weight MSE than min-max
MSE_CLIP_RATIOS = np.linspace(0.5, 1.0, 101)


def _mse_clip_ratio(rows: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Per row of ``rows`` [C, K]: the clip ratio r (scale = r * amax / qmax) that
    minimizes sum((clip(round(w / scale)) * scale - w)^2). Vectorized over channels;
    a loop over the candidate ratios keeps memory at one [C, K] array (MiniLM's
    matmuls are 1536 x 384)."""
    best_err = np.full(len(rows), np.inf)
    best = np.ones(len(rows))
    safe = np.where(amax > 0, amax, 1.0)
    for ratio in MSE_CLIP_RATIOS[::-1]:  # from 1.0 down: ties keep the larger (no-clip) ratio
        scale = (np.maximum(ratio * safe / qmax, MIN_SCALE)
                 .astype(np.float32).astype(np.float64))[:, None]
        err = np.square(np.clip(np.round(rows / scale), -qmax, qmax) * scale - rows).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, ratio, best)
    return best


def quantize_weight(weight: np.ndarray, axis: int, per_channel: bool = True,
                    reduce_range: bool = False, weight_scale: str = "minmax",
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: (q int8 array, scales [C] float64), channel ``axis``.

    ``weight_scale``: "minmax" (scale = max|w| / qmax, nothing clipped) or "mse"
    (per channel, the clip ratio in [0.5, 1] of max|w| with the least weight
    rounding + clipping MSE: heavy-tailed channels give up their outliers for a
    finer step on the bulk of the weights).
    """
    if weight_scale not in WEIGHT_SCALES:
        raise InputError(f"weight scale must be one of {', '.join(WEIGHT_SCALES)}, "
                         f"got '{weight_scale}'")
    qmax = 63 if reduce_range else 127
    weight = weight.astype(np.float64)
    moved = np.moveaxis(weight, axis, 0)
    channels = moved.shape[0]
    rows = moved.reshape(channels, -1) if per_channel else weight.reshape(1, -1)
    amax = np.abs(rows).max(axis=1)
    if weight_scale == "mse":
        amax = amax * _mse_clip_ratio(rows, amax, qmax)
    if not per_channel:
        amax = np.full(channels, amax[0])
    scale = np.where(amax > 0, np.maximum(amax / qmax, MIN_SCALE), 1.0)
    scale = scale.astype(np.float32).astype(np.float64)
    shape = [1] * weight.ndim
    shape[axis] = channels
    q = np.clip(np.round(weight / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantized_weight(layer, weights=None, per_channel: bool = True,
                       reduce_range: bool = False, weight_scale: str = "minmax") -> np.ndarray:
    """The float64 weight ``layer`` computes with once int8: the codes and scales of
    ``weights(layer, axis)`` (gptq, a QDQ model's own) or of :func:`quantize_weight`."""
    axis = 0 if layer.kind == "conv2d" else 1
    given = weights(layer, axis) if weights is not None else None
    q, scale = given if given is not None else quantize_weight(
        layer.weight, axis, per_channel, reduce_range, weight_scale)
    shape = [1] * layer.weight.ndim
    shape[axis] = len(scale)
    return q.astype(np.float64) * np.asarray(scale).reshape(shape)


def _float_activation(bb, y, activation):
    """``y`` with a layer's fused activation applied in float (``("relu",)`` or
    ``("clip", lo, hi)``; ``None``: as is)."""
    from tvm import relax

    if activation is None:
        return y
    if activation[0] == "relu":
        return bb.emit(relax.op.nn.relu(y))
    return bb.emit(relax.op.clip(y, _prim(activation[1]), _prim(activation[2])))


def _prim(value: float, dtype: str = "float32"):
    from tvm import relax

    if dtype.startswith("int"):
        return relax.prim_value(int(value), dtype)
    return relax.prim_value(float(value), dtype)


def emit_quantize(bb, x, p: QParams, name: str = ""):
    """clip(round(x / s) + zp, qmin, qmax) as ``p.dtype``."""
    from tvm import relax

    y = bb.emit(relax.op.round(relax.op.divide(x, _ir.const(np.float32(p.scale)))))
    if p.zero_point:
        y = bb.emit(relax.op.add(y, _ir.const(np.float32(p.zero_point))))
    y = bb.emit(relax.op.clip(y, _prim(p.qmin), _prim(p.qmax)))
    return bb.emit(relax.op.astype(y, p.dtype), name_hint=name)


def emit_dequantize(bb, q, p: QParams, name: str = ""):
    """s * (q - zp) in float32."""
    from tvm import relax

    y = bb.emit(relax.op.astype(q, "float32"))
    if p.zero_point:
        y = bb.emit(relax.op.subtract(y, _ir.const(np.float32(p.zero_point))))
    return bb.emit(relax.op.multiply(y, _ir.const(np.float32(p.scale))), name_hint=name)


def fixed_point(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``multiplier ~= m0 * 2**-shift`` with int64 ``m0`` in [2^30, 2^31) per channel."""
    multiplier = np.asarray(multiplier, np.float64)
    exp = np.floor(np.log2(multiplier)).astype(np.int64)
    m0 = np.round(multiplier * np.exp2(30 - exp)).astype(np.int64)
    over = m0 >= (1 << 31)
    m0 = np.where(over, m0 // 2, m0)
    exp = np.where(over, exp + 1, exp)
    shift = 30 - exp
    if np.any(shift < 1) or np.any(shift > 62):
        raise ValueError("requantize multiplier out of the fixed-point range")
    return m0, shift


def emit_requant_fixed(bb, acc, multiplier, bshape, zero_point, lo, hi):
    """(acc * m0 + 2^(shift-1)) >> shift + zp, clipped -- int64 fixed point, per channel."""
    from tvm import relax

    m0, shift = fixed_point(multiplier)
    y = bb.emit(relax.op.astype(acc, "int64"))
    y = bb.emit(relax.op.multiply(y, _ir.const(m0.reshape(bshape), "int64")))
    y = bb.emit(relax.op.add(y, _ir.const((np.int64(1) << (shift - 1)).reshape(bshape), "int64")))
    y = bb.emit(relax.op.right_shift(y, _ir.const(shift.reshape(bshape), "int64")))
    if zero_point:
        y = bb.emit(relax.op.add(y, _ir.const(np.int64(zero_point), "int64")))
    return bb.emit(relax.op.clip(y, _prim(lo, "int64"), _prim(hi, "int64")))


def _residual_fixed_point(multiplier: np.ndarray, residual_multiplier: float):
    """``(m0, m_r, shift)`` per channel with ``acc * m0 + r * m_r`` scaled by ``2**-shift``,
    or None when the residual term could overflow int64 (then the float epilogue is used)."""
    m0, shift = fixed_point(multiplier)
    m_r = np.round(residual_multiplier * np.exp2(shift.astype(np.float64))).astype(np.int64)
    # |acc * m0| < 2^62; |q_r - zp_r| <= 255: keep the sum below 2^63
    if np.any(np.abs(m_r) >= (1 << 53)):
        return None
    return m0, m_r, shift


def _residual_term(bb, r_q, p_r: QParams, multiplier, dtype: str):
    """``(r_q - zp_r) * multiplier`` computed in ``dtype`` (float32 or int64)."""
    from tvm import relax

    r = bb.emit(relax.op.astype(r_q, dtype))
    if p_r.zero_point:
        r = bb.emit(relax.op.subtract(r, _ir.const(np.asarray(p_r.zero_point, dtype))))
    return bb.emit(relax.op.multiply(r, _ir.const(np.asarray(multiplier, dtype))))


def emit_residual_requant(bb, acc, acc_scale, bshape, residual, p_out: QParams, clip, requant):
    """``clip(round(acc * s_acc / s_y + r / s_y) + zp_y)`` (not yet cast) for a residual
    ``(r_q int8, QParams)`` or ``(r float32 expr, None)``; int64 fixed point when
    ``requant == "fixed"`` and the residual is int8 (float otherwise)."""
    from tvm import relax

    r, p_r = residual
    lo, hi = clip
    fixed = None
    if requant == "fixed" and p_r is not None:
        fixed = _residual_fixed_point(acc_scale / p_out.scale, p_r.scale / p_out.scale)
    if fixed is not None:
        m0, m_r, shift = fixed
        y = bb.emit(relax.op.multiply(relax.op.astype(acc, "int64"),
                                      _ir.const(m0.reshape(bshape), "int64")))
        y = bb.emit(relax.op.add(y, _residual_term(bb, r, p_r, m_r.reshape(bshape), "int64")))
        y = bb.emit(relax.op.add(y, _ir.const((np.int64(1) << (shift - 1)).reshape(bshape),
                                              "int64")))
        y = bb.emit(relax.op.right_shift(y, _ir.const(shift.reshape(bshape), "int64")))
        if p_out.zero_point:
            y = bb.emit(relax.op.add(y, _ir.const(np.int64(p_out.zero_point), "int64")))
        return bb.emit(relax.op.clip(y, _prim(lo, "int64"), _prim(hi, "int64")))
    mult = (acc_scale / p_out.scale).astype(np.float32)
    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), _ir.const(mult.reshape(bshape))))
    if p_r is not None:
        term = _residual_term(bb, r, p_r, np.float32(p_r.scale / p_out.scale), "float32")
    else:
        term = bb.emit(relax.op.multiply(r, _ir.const(np.float32(1.0 / p_out.scale))))
    y = bb.emit(relax.op.round(relax.op.add(y, term)))
    if p_out.zero_point:
        y = bb.emit(relax.op.add(y, _ir.const(np.float32(p_out.zero_point))))
    return bb.emit(relax.op.clip(y, _prim(lo), _prim(hi)))


def output_clip(p: QParams, activation) -> tuple[int, int]:
    """The integer clip range implementing ``activation`` on the quantized output."""
    lo, hi = p.qmin, p.qmax
    if activation is None:
        return lo, hi
    if activation[0] == "relu":
        return max(lo, p.zero_point), hi
    a, b = activation[1], activation[2]
    return (max(lo, p.zero_point + int(np.round(a / p.scale))),
            min(hi, p.zero_point + int(np.round(b / p.scale))))


@dataclass(frozen=True)
class ResidualAdd:
    """``final = [act](add(layer.out_var, other))``, taken into ``layer``'s epilogue."""

    layer: object       # the plan Layer whose output feeds the add
    add_var: object     # the add binding's var
    other: object       # the residual operand (a relax Var)
    activation: tuple | None  # None | ("relu",) | ("clip", lo, hi) after the add
    act_var: object | None
    final: object       # act_var or add_var: the tensor the epilogue produces


def _scalar_of(expr) -> float | None:
    value = _ir.const_value(expr)
    if value is not None and value.size == 1:
        return float(value.reshape(-1)[0])
    inner = getattr(expr, "value", None)  # PrimValue -> IntImm / FloatImm
    if isinstance(inner, (int, float)):
        return float(inner)
    if inner is not None and hasattr(inner, "value"):
        return float(inner.value)
    return None


def _activation_of(binding, source) -> tuple | None:
    """``("relu",)`` / ``("clip", lo, hi)`` if ``binding`` is that activation of ``source``."""
    name = _ir.op_name(binding.value)
    if name not in ("relax.nn.relu", "relax.clip") or not binding.value.args[0].same_as(source):
        return None
    if name == "relax.nn.relu":
        return ("relu",)
    lo, hi = _scalar_of(binding.value.args[1]), _scalar_of(binding.value.args[2])
    return None if lo is None or hi is None else ("clip", lo, hi)


def find_residual_adds(func, plan) -> dict:
    """{add var: ResidualAdd} for the quantized layers whose epilogue can take an add.

    A layer qualifies when it has no activation of its own, its output is not
    itself quantized for a consumer (then it is requantized, not added), and
    its only user is an ``add`` with another float tensor of the same shape.
    When both operands of an add are such layers, the one whose other operand
    is carried in int8 takes it (else the first operand's layer).
    """
    from tvm import relax

    uses = _ir.use_map(func)
    quantized_out = set(plan.roots) | set(plan.shared)
    candidates: dict = {}
    for layer in plan.quantized():
        out = layer.out_var
        if layer.activation is not None or out in quantized_out:
            continue
        users = uses.get(out, [])
        if len(users) != 1 or users[0] == "return" or _ir.op_name(users[0].value) != "relax.add":
            continue
        add = users[0]
        a, b = add.value.args
        other = b if a.same_as(out) else a
        shape = _ir.tensor_shape(out)
        if (not isinstance(other, relax.Var) or other.same_as(out) or shape is None
                or _ir.tensor_dtype(other) != "float32" or _ir.tensor_shape(other) != shape
                or _ir.tensor_shape(add.var) != shape):
            continue
        activation = act_var = None
        add_users = uses.get(add.var, [])
        if len(add_users) == 1 and add_users[0] != "return":
            activation = _activation_of(add_users[0], add.var)
            if activation is not None:
                act_var = add_users[0].var
        candidates.setdefault(add.var, []).append(
            ResidualAdd(layer, add.var, other, activation, act_var,
                        add.var if act_var is None else act_var))
    chosen = {}
    for add_var, options in candidates.items():
        int8_other = [o for o in options if o.other in plan.int8_vars]
        chosen[add_var] = (int8_other or options)[0]
    return chosen


def realize(mod, plan, qparams: dict, per_channel: bool = True, reduce_range: bool = False,
            extra_outputs=(), weight_override=None, fake_quant: bool = False,
            requant: str = "float", names=None, int8_residual: bool = True,
            weight_scale: str = "minmax"):
    """The integer module for ``plan`` with activation ``qparams`` ({root var: QParams}).

    Returns ``(module, records)``: one summary dict per quantized layer.
    ``extra_outputs`` (original float vars) are appended to main's return as a
    tuple ``(original return, *extra)`` -- used to measure per-layer error.
    ``weight_override(layer, axis)`` may return ``(q int8, scales [C])`` to use
    instead of quantizing the float weight (QDQ models bring their own).
    ``fake_quant``: float consumers of a quantized tensor read its dequantized
    value rather than the exact float one (what a QDQ model means). ``names``
    ({var: str}) names tensors in the records (default: Relax var names).
    ``weight_scale``: how each weight channel's scale is chosen (quantize_weight).
    ``int8_residual=False`` keeps residual streams in float: the add still runs in
    the conv's epilogue, but on the exact float block input, and the block output
    is stored in float and quantized by a kernel of its own for the next conv.
    Measured (real MobileNetV2, 14 photos, mse): int8 residual 17.3 dB logit SQNR,
    12/14 top-1; float residual 17.7 dB, 13/14 (minmax: 16.1 vs 16.2 dB, 12/14 both).
    """
    from tvm import relax

    layers = {l.anchor: l for l in plan.quantized()}
    absorbed = {v for l in plan.quantized() for v in (l.bias_var, l.act_var) if v is not None}
    residuals = find_residual_adds(mod["main"], plan) if int8_residual else {}
    by_layer = {r.layer.anchor: r for r in residuals.values()}
    absorbed |= {r.act_var for r in residuals.values() if r.act_var is not None}
    roots = set(plan.roots)
    names = names or {}
    fl: dict = {}   # original var -> new float expr
    qt: dict = {}   # original var -> (new int expr, QParams)
    pending: dict = {}  # layer out var -> (int32 acc, acc scale, bshape, record): add not seen yet
    records = []

    def get_float(bb, var):
        if var not in fl and var in pending:  # a fused layer's own output, asked for by SQNR
            acc, acc_scale, bshape, _record = pending[var]
            fl[var] = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")),
                                                _ir.const(acc_scale.astype(np.float32)
                                                          .reshape(bshape))))
        if var not in fl:
            q, p = qt[var]
            fl[var] = emit_dequantize(bb, q, p, name=f"{var.name}_dq")
        return fl[var]

    def float_expr(bb, expr):
        remap = {v: get_float(bb, v) for v in _ir.free_vars_of(expr)}
        return _ir.substitute(expr, remap)

    def quantize_root(bb, var):
        if (var in roots or var in plan.shared) and var not in qt:
            p = qparams[plan.params_root(var)]
            qt[var] = (emit_quantize(bb, fl[var], p, name=f"{var.name}_q"), p)
            if fake_quant:
                del fl[var]

    def start(bb, remap):
        for old, new in remap.items():
            fl[old] = new
            quantize_root(bb, old)

    def visit(bb, binding, _remap):
        var = binding.var
        if var in residuals:
            emit_residual(bb, residuals[var])
            return
        if var in absorbed:
            return
        if var in layers:
            emit_layer(bb, layers[var])
            return
        if var in plan.concats:
            call = binding.value
            parts = [qt[f][0] for f in plan.concats[var]]
            qt[var] = (bb.emit(relax.Call(call.op, [relax.Tuple(parts)], call.attrs,
                                          call.ty_args), name_hint=f"{var.name}_q"),
                       qparams[var])
            return
        if var in plan.int8_vars and var not in roots and var not in plan.shared:
            call = binding.value
            q, p = qt[call.args[0]]
            rest = [float_expr(bb, a) for a in call.args[1:]]
            qt[var] = (bb.emit(relax.Call(call.op, [q, *rest], call.attrs, call.ty_args),
                               name_hint=f"{var.name}_q"), p)
            return
        fl[var] = bb.emit(float_expr(bb, binding.value), name_hint=var.name)
        quantize_root(bb, var)

    def emit_layer(bb, layer):
        p_in = qparams[layer.root]
        q_in = qt[layer.input_var][0]
        axis = 0 if layer.kind == "conv2d" else 1
        given_w = weight_override(layer, axis) if weight_override is not None else None
        if given_w is not None:
            q_w, s_w = given_w
        else:
            q_w, s_w = quantize_weight(layer.weight, axis, per_channel, reduce_range,
                                       weight_scale)
        channels = len(s_w)
        acc_scale = p_in.scale * s_w
        if layer.kind == "conv2d":
            attrs = layer.call.attrs
            padding = [int(v) for v in attrs.padding]  # top, left, bottom, right
            data = q_in
            if p_in.zero_point != 0 and any(padding):
                top, left, bottom, right = padding
                data = bb.emit(relax.op.nn.pad(q_in, [0, 0, 0, 0, top, bottom, left, right],
                                               pad_value=float(p_in.zero_point)))
                padding = [0, 0, 0, 0]
            acc = bb.emit(relax.op.nn.conv2d(
                data, _ir.const(q_w, "int8"), strides=[int(v) for v in attrs.strides],
                padding=padding, dilation=[int(v) for v in attrs.dilation],
                groups=int(attrs.groups), data_layout="NCHW", kernel_layout="OIHW",
                out_dtype="int32"), name_hint=f"{layer.anchor.name}_acc")
            w_sum = q_w.astype(np.int64).reshape(channels, -1).sum(axis=1)
            bshape = (1, channels, 1, 1)
        else:
            acc = bb.emit(relax.op.matmul(q_in, _ir.const(q_w, "int8"), out_dtype="int32"),
                          name_hint=f"{layer.anchor.name}_acc")
            w_sum = q_w.astype(np.int64).sum(axis=0)
            bshape = (channels,)
        bias = layer.bias if layer.bias is not None else np.zeros(channels)
        bias_q = np.round(bias / acc_scale).astype(np.int64) - p_in.zero_point * w_sum
        bias_q = np.clip(bias_q, INT32_MIN, INT32_MAX)
        if np.any(bias_q != 0):
            acc = bb.emit(relax.op.add(acc, _ir.const(bias_q.reshape(bshape), "int32")))
        out = layer.out_var
        record = {"name": layer.name, "op": layer.onnx_op, "kind": layer.kind, "int8": True,
                  "input": {"tensor": names.get(layer.root, layer.root.name),
                            **p_in.to_dict()},
                  "weight": {"bits": int(np.abs(q_w).max()).bit_length() + 1,
                             "from_model": given_w is not None,
                             "scale_method": "model" if given_w is not None else weight_scale,
                             "per_channel": bool(len(set(s_w.tolist())) > 1 or per_channel),
                             "scale": [float(s) for s in s_w]},
                  "activation": layer.activation[0] if layer.activation else None,
                  "groups": int(layer.call.attrs.groups) if layer.kind == "conv2d" else 1}
        if layer.anchor in by_layer:  # the epilogue is emitted at the residual add
            pending[out] = (acc, acc_scale, bshape, record)
            return
        accf = None if ((out in roots or out in plan.shared) and requant == "fixed") else \
            bb.emit(relax.op.astype(acc, "float32"))
        if out in roots or out in plan.shared:
            p_out = qparams[plan.params_root(out)]
            lo, hi = output_clip(p_out, layer.activation)
            if requant == "fixed":
                y = emit_requant_fixed(bb, acc, acc_scale / p_out.scale, bshape,
                                       p_out.zero_point, lo, hi)
            else:
                mult = (acc_scale / p_out.scale).astype(np.float32)
                y = bb.emit(relax.op.round(relax.op.multiply(accf,
                                                             _ir.const(mult.reshape(bshape)))))
                if p_out.zero_point:
                    y = bb.emit(relax.op.add(y, _ir.const(np.float32(p_out.zero_point))))
                y = bb.emit(relax.op.clip(y, _prim(lo), _prim(hi)))
            qt[out] = (bb.emit(relax.op.astype(y, p_out.dtype), name_hint=f"{out.name}_q"), p_out)
            record["output"] = {"tensor": names.get(out, out.name), **p_out.to_dict(),
                                "requantized": True}
        else:
            y = bb.emit(relax.op.multiply(accf, _ir.const(acc_scale.astype(np.float32)
                                                          .reshape(bshape))))
            fl[out] = _float_activation(bb, y, layer.activation)
            record["output"] = {"tensor": names.get(out, out.name), "dtype": "float32",
                                "requantized": False}
        records.append(record)

    def emit_residual(bb, res: ResidualAdd):
        """The pending layer's epilogue with the residual add (and activation) in it."""
        layer, final = res.layer, res.final
        acc, acc_scale, bshape, record = pending[layer.out_var]
        int8_res = res.other in qt
        residual = qt[res.other] if int8_res else (float_expr(bb, res.other), None)
        p_r = residual[1]
        record["activation"] = res.activation[0] if res.activation else None
        record["residual"] = {"tensor": names.get(res.other, res.other.name), "int8": int8_res,
                              **(p_r.to_dict() if int8_res else {"dtype": "float32"})}
        if final in roots or final in plan.shared:
            p_out = qparams[plan.params_root(final)]
            y = emit_residual_requant(bb, acc, acc_scale, bshape, residual, p_out,
                                      output_clip(p_out, res.activation), requant)
            qt[final] = (bb.emit(relax.op.astype(y, p_out.dtype), name_hint=f"{final.name}_q"),
                         p_out)
            record["output"] = {"tensor": names.get(final, final.name), **p_out.to_dict(),
                                "requantized": True}
        else:
            y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"),
                                          _ir.const(acc_scale.astype(np.float32).reshape(bshape))))
            term = residual[0] if not int8_res else \
                _residual_term(bb, residual[0], p_r, np.float32(p_r.scale), "float32")
            y = bb.emit(relax.op.add(y, term))
            fl[final] = _float_activation(bb, y, res.activation)
            record["output"] = {"tensor": names.get(final, final.name), "dtype": "float32",
                                "requantized": False}
        records.append(record)

    def finish(bb, ret, _remap):
        new_ret = float_expr(bb, ret)
        if not extra_outputs:
            return new_ret
        return relax.Tuple([new_ret] + [get_float(bb, v) for v in extra_outputs])

    return _ir.rewrite_main(mod, visit, finish, start), records


def realize_dynamic(mod, plan, per_channel: bool = True, reduce_range: bool = False,
                    weight_scale: str = "minmax"):
    """Dynamic quantization of the planned matmul layers: no calibration.

    Each quantized matmul's input gets its uint8 scale and zero point at run
    time from its own min and max (0 always included)::

        lo, hi = min(min(x), 0), max(max(x), 0);  s = (hi - lo) / 255
        zp = clip(round(-lo / s), 0, 255);        q = clip(round(x / s) + zp, 0, 255)
        acc = matmul(q, q_W, out_dtype="int32") - zp * colsum(q_W)
        y = acc * (s * s_w) + bias   [relu / clip]      (float output)

    Convolutions and everything else stay float. Returns ``(module, records)``.
    """
    from tvm import relax

    layers = {l.anchor: l for l in plan.quantized() if l.kind == "matmul"}
    absorbed = {v for l in layers.values() for v in (l.bias_var, l.act_var) if v is not None}
    records = []

    def scalar(value):
        return _ir.const(np.float32(value))

    def visit(bb, binding, remap):
        var = binding.var
        if var in absorbed:
            return
        layer = layers.get(var)
        if layer is None:
            _ir.copy_binding(bb, binding, remap)
            return
        x = _ir.substitute(layer.input_var, remap)
        lo = bb.emit(relax.op.minimum(relax.op.min(x), scalar(0.0)))
        hi = bb.emit(relax.op.maximum(relax.op.max(x), scalar(0.0)))
        s = bb.emit(relax.op.maximum(relax.op.divide(relax.op.subtract(hi, lo), scalar(255.0)),
                                     scalar(1e-12)))
        zp = bb.emit(relax.op.clip(relax.op.round(relax.op.divide(relax.op.negative(lo), s)),
                                   _prim(0), _prim(255)))
        q = bb.emit(relax.op.round(relax.op.divide(x, s)))
        q = bb.emit(relax.op.clip(relax.op.add(q, zp), _prim(0), _prim(255)))
        q = bb.emit(relax.op.astype(q, "uint8"), name_hint=f"{var.name}_dynq")
        q_w, s_w = quantize_weight(layer.weight, 1, per_channel, reduce_range, weight_scale)
        acc = bb.emit(relax.op.matmul(q, _ir.const(q_w, "int8"), out_dtype="int32"),
                      name_hint=f"{var.name}_acc")
        colsum = q_w.astype(np.int64).sum(axis=0).astype(np.int32)
        acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(relax.op.astype(zp, "int32"),
                                                               _ir.const(colsum, "int32"))))
        y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"),
                                      relax.op.multiply(s, _ir.const(s_w.astype(np.float32)))))
        if layer.bias is not None:
            y = bb.emit(relax.op.add(y, _ir.const(layer.bias.astype(np.float32))))
        if layer.activation is not None and layer.activation[0] == "relu":
            y = bb.emit(relax.op.nn.relu(y))
        elif layer.activation is not None:
            y = bb.emit(relax.op.clip(y, _prim(layer.activation[1]), _prim(layer.activation[2])))
        remap[layer.out_var] = y
        records.append({"name": layer.name, "op": layer.onnx_op, "kind": "matmul", "int8": True,
                        "dynamic": True,
                        "input": {"tensor": layer.input_var.name, "dtype": "uint8",
                                  "scale": "run time", "zero_point": "run time"},
                        "weight": {"bits": int(np.abs(q_w).max()).bit_length() + 1,
                                   "from_model": False, "per_channel": per_channel,
                                   "scale": [float(v) for v in s_w]},
                        "activation": layer.activation[0] if layer.activation else None,
                        "output": {"tensor": layer.out_var.name, "dtype": "float32",
                                   "requantized": False}})

    return _ir.rewrite_main(mod, visit), records
