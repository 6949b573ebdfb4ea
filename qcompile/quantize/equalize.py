"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

Two consecutive layers ``y = W2 * act(W1 * x + b1)`` compute the same function
when output channel ``c`` of layer 1 is divided by ``s_c > 0`` and input
channel ``c`` of layer 2 is multiplied by it, as long as ``act`` commutes with a
positive per-channel scale. Choosing ``s_c = sqrt(r1_c * r2_c) / r2_c`` (``r1_c``:
largest |weight| of layer 1's output channel c; ``r2_c``: of layer 2's input
channel c) makes both ranges ``sqrt(r1_c * r2_c)``: the channels of the tensor
between them get similar ranges, so one per-tensor activation scale fits them
all better, and a depthwise conv's wildly different BatchNorm-folded channels
are evened out. Pairs that share a layer (expand -> depthwise -> project) are
equalized in turns until the scales stop changing.

What may sit between the two layers (each var used only by the next step):

* the bias add, scaled with the weights;
* ``relu`` (``relu(x / s) = relu(x) / s``);
* ``clip(x, 0, hi)`` (ReLU6): not scale-equivariant with one scalar bound, so
  it becomes ``relu`` followed by ``minimum(x, hi / s)`` with a per-channel
  bound -- the function is unchanged, but the layer's output then leaves the
  int8 epilogue (its integer clip has one bound per tensor) for one float
  ``minimum`` before the next layer quantizes it again;
* ``max_pool2d`` / ``avg_pool2d`` (per-channel, commute with positive scales);
* for a conv -> matmul pair, the ``reshape``/``flatten`` to ``[N, C*H*W]``
  (matmul rows are grouped by channel).

Layer 1 and 2 are conv2d (any groups) or matmul with constant weights, as
:func:`~qcompile.quantize.plan.build_plan` finds them in a prepared module.
Anything else (GELU, a residual add, a var with two users) ends a pair.

Two ways to pick ``s`` (see :func:`_scales`): data-free from weight ranges (the
paper), or -- given each channel's measured range of the tensor between
(:func:`channel_ranges`, one float pass) -- from activation ranges. The second
also rescales residual streams (:func:`find_groups`): every conv writing a stream
of adds divides its output channel c by ``s_c``, every conv reading it multiplies
its input channel c. With per-channel weight scales the data-free choice mostly
moves error from weights (already per-channel) into activations; measured in
benchmarks/results/real_models.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _ir

POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")
FLATTEN = ("relax.reshape", "relax.flatten")
TINY = 1e-12


@dataclass
class Pair:
    first: object          # Layer (plan.Layer) whose output channels are divided by s
    second: object         # Layer whose input channels are multiplied by s
    channels: int
    rows_per_channel: int  # matmul second layer: rows of W2 per channel (H*W after flatten)
    clip_hi: np.ndarray | None  # [C] upper bound of a ReLU6-style clip between them
    min_var: object = None  # an existing relu -> minimum(x, [C] bound) pair (equalized before)
    scale: np.ndarray = None  # accumulated s per channel
    between: object = None    # the var after the activation (its channel ranges are measured)
    act_range: np.ndarray | None = None  # measured max |x| per channel of ``between``


def _single_user(uses, var):
    users = uses.get(var, [])
    return users[0] if len(users) == 1 and users[0] != "return" else None


def _out_axis(layer) -> int:
    return 0 if layer.kind == "conv2d" else 1


@dataclass
class Group:
    """A residual stream: tensors joined by adds (``t2 = t1 + proj2(...)``), written by
    ``producers`` (layers without activation, output channels divided by s) and read by
    ``consumers`` (input channels multiplied by s). Equalized with measured ranges only."""
    producers: list
    consumers: list
    members: list          # the stream tensors (producer outputs and add outputs)
    channels: int
    scale: np.ndarray = None
    act_range: np.ndarray | None = None


def find_pairs(mod, plan=None) -> list[Pair]:
    """The equalizable layer pairs of a prepared module (see the module docstring)."""
    from .plan import build_plan

    func = mod["main"]
    plan = plan or build_plan(mod)
    uses = _ir.use_map(func)
    by_anchor = {l.anchor: l for l in plan.layers}
    by_input = {}
    for layer in plan.layers:
        by_input.setdefault(layer.input_var, []).append(layer)
    pairs = []
    for first in plan.layers:
        act = first.activation
        if act is not None and act[0] == "clip" and act[1] != 0.0:
            continue  # only clip(0, hi): a nonzero lower bound would need a per-channel max
        channels = first.weight.shape[_out_axis(first)]
        var, rows = first.out_var, 1
        second = None
        clip_hi = np.full(channels, act[2]) if act is not None and act[0] == "clip" else None
        min_var = None
        if act == ("relu",):
            found = _per_channel_minimum(uses, first, channels)
            if found is not None:
                min_var, clip_hi = found
                var = min_var
        while True:
            user = _single_user(uses, var)
            if user is None:
                break
            name = _ir.op_name(user.value)
            if name in ("relax.nn.conv2d", "relax.matmul") and user.var in by_anchor \
                    and user.value.args[0].same_as(var):
                second = by_anchor[user.var]
                break
            if name in POOLS and first.kind == "conv2d" and rows == 1 \
                    and user.value.args[0].same_as(var):
                var = user.var
                continue
            if name in FLATTEN and first.kind == "conv2d" and rows == 1:
                shape_in, shape_out = _ir.tensor_shape(var), _ir.tensor_shape(user.var)
                if shape_in and shape_out and len(shape_in) == 4 and len(shape_out) == 2 \
                        and shape_out[0] == shape_in[0] \
                        and shape_out[1] == int(np.prod(shape_in[1:])):
                    rows = shape_in[2] * shape_in[3]
                    var = user.var
                    continue
            break
        if second is None or second is first:
            continue
        if second.kind == "conv2d" and rows != 1:
            continue
        if second.kind == "matmul" and (second.weight.shape[0] != channels * rows
                                        or (first.kind == "matmul" and rows != 1)):
            continue
        if second.kind == "conv2d" and second.weight.shape[1] * int(second.call.attrs.groups) \
                != channels:
            continue
        if first.kind == "matmul" and len(_ir.tensor_shape(first.out_var) or ()) < 2:
            continue
        pairs.append(Pair(first, second, channels, rows, clip_hi, min_var, np.ones(channels),
                          between=min_var if min_var is not None else first.out_var))
    return pairs


def find_groups(mod, plan) -> list[Group]:
    """Residual streams of conv2d layers (NCHW) whose every use is an add of the stream,
    a producing layer (conv, no activation) or a consuming conv (groups 1) / matmul."""
    from tvm import relax

    func = mod["main"]
    uses = _ir.use_map(func)
    producer_of = {l.out_var: l for l in plan.layers
                   if l.kind == "conv2d" and l.activation is None}
    consumers_of = {}
    for layer in plan.layers:
        if layer.kind == "conv2d" and int(layer.call.attrs.groups) == 1:
            consumers_of.setdefault(layer.input_var, []).append(layer)
    adds = {b.var: b for b in _ir.main_bindings(func)
            if _ir.op_name(b.value) == "relax.add"
            and all(isinstance(a, relax.Var) for a in b.value.args)
            and all(_ir.tensor_shape(a) == _ir.tensor_shape(b.var) for a in b.value.args)}
    parent = {}

    def find(v):
        while True:
            up = parent.setdefault(v, v)
            if up.same_as(v):
                return v
            v = up

    for var, binding in adds.items():
        for arg in binding.value.args:
            parent[find(arg)] = find(var)
    members = {}
    for var in parent:
        members.setdefault(find(var), []).append(var)
    groups = []
    for vars_ in members.values():
        producers, consumers, ok = [], [], True
        shape = _ir.tensor_shape(vars_[0])
        if shape is None or len(shape) != 4:
            continue
        for var in vars_:
            if var not in adds and var not in producer_of:
                ok = False  # a stream tensor from somewhere else (an input, a pool, ...)
                break
            if var in producer_of:
                producers.append(producer_of[var])
            for user in uses.get(var, []):
                if user == "return":
                    ok = False
                elif user.var in adds and find(user.var).same_as(find(var)):
                    continue
                elif any(c.anchor.same_as(user.var) for c in consumers_of.get(var, [])):
                    consumers.extend(c for c in consumers_of[var] if c.anchor.same_as(user.var))
                else:
                    ok = False
        if ok and producers and consumers:
            groups.append(Group(producers, consumers, vars_, shape[1], np.ones(shape[1])))
    return groups


def _group_scales(g, per_channel: bool) -> np.ndarray:
    """Balance the stream's measured channel range with the consumers' input ranges."""
    r2 = np.max([_in_ranges(c, g.channels, 1) for c in g.consumers], axis=0)
    r1 = g.act_range / g.scale
    ok = (r1 > TINY * max(r1.max(), TINY)) & (r2 > TINY * max(r2.max(), TINY))
    s = np.ones(g.channels)
    s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    return s


def _channel_axis(layer) -> int:
    return 1 if layer.kind == "conv2d" else -1


def _per_channel_minimum(uses, layer, channels):
    """``(var, [C] bound)`` of ``minimum(relu output, per-channel constant)`` right
    after ``layer`` (what an earlier equalization made of a ReLU6), else None."""
    user = _single_user(uses, layer.out_var)
    if user is None or _ir.op_name(user.value) != "relax.minimum" \
            or not user.value.args[0].same_as(layer.out_var):
        return None
    bound = _ir.const_value(user.value.args[1])
    shape = _ir.tensor_shape(layer.out_var)
    if bound is None or shape is None or _ir.tensor_shape(user.var) != shape:
        return None
    vec = _ir.per_channel_vector(bound, channels, _channel_axis(layer), len(shape))
    return (user.var, vec) if vec is not None and np.all(vec > 0) else None


def _in_view(layer, channels: int, rows: int) -> np.ndarray:
    """A view of layer 2's weight with the input channel on axis 1 of a 3-D array
    ``[outer, C, inner]`` (grouped convs: one view per group, stacked on axis 0)."""
    w = layer.weight
    if layer.kind == "matmul":           # [C * rows, N]
        return w.reshape(1, channels, rows * w.shape[1])
    groups = int(layer.call.attrs.groups)
    out_c, per_group = w.shape[:2]
    # [O, Cg, kh, kw] -> [g, O/g, Cg, k] -> channel c = gi * Cg + l
    v = w.reshape(groups, out_c // groups, per_group, -1).transpose(1, 0, 2, 3)
    return v.reshape(out_c // groups, groups * per_group, -1)


def _set_in_scaled(layer, channels: int, rows: int, s: np.ndarray) -> None:
    w = layer.weight
    if layer.kind == "matmul":
        layer.weight = (w.reshape(channels, rows, -1) * s[:, None, None]).reshape(w.shape)
        return
    groups = int(layer.call.attrs.groups)
    out_c, per_group = w.shape[:2]
    v = w.reshape(groups, out_c // groups, per_group, *w.shape[2:])
    v = v * s.reshape(groups, 1, per_group, *([1] * (w.ndim - 2)))
    layer.weight = v.reshape(w.shape)


def _out_ranges(layer) -> np.ndarray:
    w = np.abs(layer.weight)
    if layer.kind == "matmul":
        return w.max(axis=0)
    return w.reshape(w.shape[0], -1).max(axis=1)


def _in_ranges(layer, channels: int, rows: int) -> np.ndarray:
    v = np.abs(_in_view(layer, channels, rows))
    return v.max(axis=(0, 2))


def _is_depthwise(layer, channels: int) -> bool:
    return layer.kind == "conv2d" and int(layer.call.attrs.groups) == channels \
        and layer.weight.shape[1] == 1


def _scales(p, per_channel: bool) -> np.ndarray:
    """This sweep's ``s`` for one pair.

    Data-free (no measured ranges): Nagel's ``sqrt(r1 * r2) / r2`` on weight ranges.
    With the measured activation range ``a`` of the tensor between (current value
    ``a / scale``) and per-channel weights: layer 1's weight precision does not depend
    on ``s`` (one scale per output channel), so what matters is the per-tensor
    activation scale. Before a depthwise conv (also one scale per channel) every
    channel is scaled up to the largest one, ``s = a / max(a)``; before a dense
    layer, whose per-output-channel weight scale sees all its input channels,
    activation and weight ranges are balanced: ``s = sqrt(a * r2) / r2``.
    """
    r2 = _in_ranges(p.second, p.channels, p.rows_per_channel)
    r1 = _out_ranges(p.first) if p.act_range is None else p.act_range / p.scale
    ok = (r1 > TINY * max(r1.max(), TINY)) & (r2 > TINY * max(r2.max(), TINY))
    s = np.ones(p.channels)
    if p.act_range is not None and per_channel and _is_depthwise(p.second, p.channels):
        s[ok] = r1[ok] / r1[ok].max()
    else:
        s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
    return s


def _divide_outputs(layer, s: np.ndarray) -> None:
    shape = [1] * layer.weight.ndim
    shape[_out_axis(layer)] = len(s)
    layer.weight = layer.weight / s.reshape(shape)
    if layer.bias is not None:
        layer.bias = layer.bias / s


def equalize_pairs(pairs, iterations: int = 100, tol: float = 1e-4,
                   per_channel: bool = True, groups=()) -> int:
    """Scale the weights (float64, in the Layer objects) until no ``s`` moves by more
    than ``tol`` (relative); returns the number of sweeps done."""
    involved = [l for p in pairs for l in (p.first, p.second)]
    involved += [l for g in groups for l in g.producers + g.consumers]
    for layer in {id(l): l for l in involved}.values():
        layer.weight = layer.weight.astype(np.float64)
        if layer.bias is not None:
            layer.bias = np.asarray(layer.bias, np.float64)
    for sweep in range(1, iterations + 1):
        moved = 0.0
        for g in groups:
            s = _group_scales(g, per_channel)
            for layer in g.producers:
                _divide_outputs(layer, s)
            for layer in g.consumers:
                _set_in_scaled(layer, g.channels, 1, s)
            g.scale = g.scale * s
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
        for p in pairs:
            s = _scales(p, per_channel)
            _divide_outputs(p.first, s)
            _set_in_scaled(p.second, p.channels, p.rows_per_channel, s)
            p.scale = p.scale * s
            moved = max(moved, float(np.max(np.abs(np.log(s)))))
        if moved < tol:
            return sweep
    return iterations


def between_vars(mod) -> list:
    """The tensors between equalizable pairs (to measure with :func:`channel_ranges`)."""
    return [p.between for p in find_pairs(mod)]


def channel_ranges(mod, spec, calib, inputs, progress=None) -> dict:
    """{var: max |x| per channel} of :func:`between_vars` over the calibration data."""
    from .calibrate import run_with_outputs

    from .plan import build_plan

    plan = build_plan(mod)
    pairs = find_pairs(mod, plan)
    found = {p.between: None for p in pairs}
    axes = {p.between: _channel_axis(p.first) for p in pairs}
    for g in find_groups(mod, plan):
        for var in g.members:
            found[var], axes[var] = None, 1
    order = list(found)

    def on_batch(arrays, _valid):
        for var, array in zip(order, arrays[1:]):
            axis = axes[var] % array.ndim
            m = np.abs(np.moveaxis(array, axis, 0)).reshape(array.shape[axis], -1).max(axis=1)
            found[var] = m if found[var] is None else np.maximum(found[var], m)

    run_with_outputs(mod, order, spec, calib, inputs, on_batch, progress, "equalize ranges")
    return found


def equalize(mod, iterations: int = 100, ranges: dict | None = None, per_channel: bool = True):
    """Cross-layer equalization of a prepared module; returns ``(module, report)``.

    ``ranges`` ({var: [C]}, from :func:`channel_ranges` on the same ``mod``) switches
    to the activation-aware scales (see :func:`_scales`); without it the pass is
    data-free. ``per_channel``: how the weights will be quantized. ``report`` lists
    the equalized pairs (Relax var names of both anchors) and the spread (max/min)
    of layer 1's per-channel weight ranges before and after.
    """
    from tvm import relax

    from .plan import build_plan

    plan = build_plan(mod)
    pairs = find_pairs(mod, plan)
    groups = []
    if ranges is not None:  # residual streams: measured ranges only
        groups = [g for g in find_groups(mod, plan)
                  if all(ranges.get(v) is not None for v in g.members)]
        for g in groups:
            g.act_range = np.max([np.asarray(ranges[v], np.float64) for v in g.members], axis=0)
    if not pairs and not groups:
        return mod, {"pairs": [], "groups": [], "sweeps": 0}
    for p in pairs:
        if ranges is not None and ranges.get(p.between) is not None:
            p.act_range = np.asarray(ranges[p.between], np.float64)
    before = {id(p.first): _spread(_out_ranges(p.first)) for p in pairs}
    sweeps = equalize_pairs(pairs, iterations, per_channel=per_channel, groups=groups)
    layers = {}
    for p in pairs:
        layers[p.first.anchor] = p.first
        layers[p.second.anchor] = p.second
    for g in groups:
        for layer in g.producers + g.consumers:
            layers[layer.anchor] = layer
    bias_of = {l.bias_var: l for l in layers.values() if l.bias_var is not None}
    clip_of = {p.first.act_var: p for p in pairs if p.clip_hi is not None and p.min_var is None}
    min_of = {p.min_var: p for p in pairs if p.min_var is not None}

    def visit(bb, binding, remap):
        var = binding.var
        if var in layers:
            layer = layers[var]
            call = binding.value
            data = _ir.substitute(call.args[0], remap)
            remap[var] = bb.emit(relax.Call(call.op, [data, _ir.const(layer.weight, "float32")],
                                            call.attrs, call.ty_args), name_hint=var.name)
        elif var in bias_of:
            layer = bias_of[var]
            shape = [1] * len(_ir.tensor_shape(var))
            shape[_channel_axis(layer)] = len(layer.bias)
            x = remap[layer.anchor]
            remap[var] = bb.emit(relax.op.add(x, _ir.const(layer.bias.reshape(shape), "float32")),
                                 name_hint=var.name)
        elif var in clip_of:
            p = clip_of[var]
            x = _ir.substitute(binding.value.args[0], remap)
            y = bb.emit(relax.op.nn.relu(x), name_hint=f"{var.name}_relu")
            shape = [1] * len(_ir.tensor_shape(var))
            shape[_channel_axis(p.first)] = p.channels
            bound = (p.clip_hi / p.scale).reshape(shape)
            remap[var] = bb.emit(relax.op.minimum(y, _ir.const(bound, "float32")),
                                 name_hint=var.name)
        elif var in min_of:
            p = min_of[var]
            shape = [1] * len(_ir.tensor_shape(var))
            shape[_channel_axis(p.first)] = p.channels
            x = _ir.substitute(binding.value.args[0], remap)
            bound = (p.clip_hi / p.scale).reshape(shape)
            remap[var] = bb.emit(relax.op.minimum(x, _ir.const(bound, "float32")),
                                 name_hint=var.name)
        else:
            _ir.copy_binding(bb, binding, remap)

    out = _ir.rewrite_main(mod, visit)
    report = {"sweeps": sweeps, "groups": [
        {"producers": [l.anchor.name for l in g.producers],
         "consumers": [l.anchor.name for l in g.consumers], "channels": g.channels,
         "activation_spread_before": _spread(g.act_range),
         "activation_spread_after": _spread(g.act_range / g.scale)} for g in groups],
        "pairs": [
        {"first": p.first.anchor.name, "second": p.second.anchor.name, "channels": p.channels,
         "clip": p.clip_hi is not None,
         "range_spread_before": before[id(p.first)],
         "range_spread_after": _spread(_out_ranges(p.first)),
         **({} if p.act_range is None else
            {"activation_spread_before": _spread(p.act_range),
             "activation_spread_after": _spread(p.act_range / p.scale)})} for p in pairs]}
    return out, report


def _spread(ranges: np.ndarray) -> float:
    live = ranges[ranges > TINY]
    return float(live.max() / live.min()) if live.size else 1.0
