"""Find what to quantize in a prepared module.

A *layer* is one quantizable pattern in the prepared float module::

    y = conv2d(x, W) | matmul(x, W)     # W constant, x float32
    [y = add(y, bias)]                  # per-channel constant bias
    [y = relu(y) | clip(y, lo, hi)]     # activation, fused into the epilogue

(each intermediate var used only by the next step). ``x`` is the layer's
activation input. Walking back from ``x`` through ops that commute with a
monotone per-tensor quantization (max-pool, reshape, permute, squeeze,
expand_dims) gives its *root*: the tensor whose range is calibrated and
whose quantized form flows, in int8, through those ops to the layer. When a
root is itself another layer's output, that layer requantizes straight to the
root's scale in its epilogue -- no float tensor in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _ir
from .prepare import anchor_kind

# Ops computed directly on the quantized tensor (same scale and zero point in and out).
TRANSPARENT_OPS = {"relax.nn.max_pool2d", "relax.reshape", "relax.permute_dims",
                   "relax.squeeze", "relax.expand_dims", "relax.flatten"}
ACTIVATIONS = {"relax.nn.relu", "relax.clip"}
ONNX_ANCHOR_OPS = {"Conv", "Gemm", "MatMul"}


@dataclass
class Layer:
    name: str                 # the ONNX node name where known, else conv2d_3 / matmul_5
    onnx_op: str              # Conv / Gemm / MatMul (or conv2d / matmul when unknown)
    kind: str                 # "conv2d" | "matmul"
    anchor: object            # relax Var bound to the conv2d/matmul call
    call: object              # the call
    weight: np.ndarray        # float32 weight (OIHW or [K, N])
    bias: np.ndarray | None   # [C] float bias or None
    bias_var: object | None
    activation: tuple | None  # None | ("relu",) | ("clip", lo, hi)
    act_var: object | None
    out_var: object           # last var of the pattern
    input_var: object         # the activation input x
    root: object = None       # where x's quantization starts
    chain: list = field(default_factory=list)  # transparent vars root -> x (excluding root)
    quantize: bool = True
    reason: str = ""          # why it stays float

    @property
    def vars(self):
        return [v for v in (self.anchor, self.bias_var, self.act_var) if v is not None]


@dataclass
class Plan:
    layers: list[Layer]
    roots: list           # unique root vars, in order
    int8_vars: set        # roots and transparent vars carried in int8
    producer: dict        # var -> binding
    # int8 concat: concat root var -> its input vars, each quantized (or requantized
    # by its producing layer) straight to the concat's parameters
    concats: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # concat input var -> concat root var

    def params_root(self, var):
        """The root whose quantization parameters ``var`` uses."""
        return self.shared.get(var, var)

    def quantized(self) -> list[Layer]:
        return [l for l in self.layers if l.quantize]


def _scalar(expr) -> float | None:
    value = _ir.const_value(expr)
    if value is not None and value.size == 1:
        return float(value.reshape(-1)[0])
    inner = getattr(expr, "value", None)  # PrimValue -> float, or FloatImm / IntImm
    if isinstance(inner, (int, float)):
        return float(inner)
    if inner is not None and hasattr(inner, "value"):
        return float(inner.value)
    return None


def _activation(binding, current):
    name = _ir.op_name(binding.value)
    if name not in ACTIVATIONS or not binding.value.args[0].same_as(current):
        return None
    if name == "relax.nn.relu":
        return ("relu",)
    lo, hi = _scalar(binding.value.args[1]), _scalar(binding.value.args[2])
    if lo is None or hi is None:
        return None
    return ("clip", lo, hi)


def _onnx_names(model, count: int) -> list[tuple[str, str]] | None:
    """(node name, op type) of the ONNX Conv/Gemm/MatMul nodes, if ``count`` of them."""
    if model is None:
        return None
    nodes = [(n.name or f"{n.op_type}_{i}", n.op_type) for i, n in enumerate(model.graph.node)
             if n.op_type in ONNX_ANCHOR_OPS]
    return nodes if len(nodes) == count else None


def _matches(layer: Layer, skip: list[str]) -> bool:
    keys = {layer.name.lower(), layer.onnx_op.lower(), layer.kind.lower()}
    return any(s.lower() in keys for s in skip)


def build_plan(mod, onnx_model=None, skip=(), ops=("conv2d", "matmul"),
               given=None) -> Plan:
    """The layers of a prepared module, their roots and the int8 vars.

    ``given`` ({var: QParams}, QDQ models) are the tensors whose quantization the
    model itself defines: a layer whose input root has none stays float, and
    every given tensor is kept quantized (float consumers dequantize it).
    """
    from tvm import relax

    func = mod["main"]
    bindings = _ir.main_bindings(func)
    uses = _ir.use_map(func)
    producer = {b.var: b for b in bindings}
    all_anchors = [b for b in bindings
                   if _ir.op_name(b.value) in ("relax.nn.conv2d", "relax.matmul")]
    names = _onnx_names(onnx_model, len(all_anchors))
    layers = []
    counters = {"conv2d": 0, "matmul": 0}
    for index, binding in enumerate(all_anchors):
        kind = anchor_kind(binding.value)
        short = "conv2d" if binding.value.op.name.endswith("conv2d") else "matmul"
        if names is not None:
            name, onnx_op = names[index]
        else:
            name, onnx_op = f"{short}_{counters[short]}", short
        counters[short] += 1
        if kind is None:
            continue  # activation x activation matmul, non-NCHW conv: stays float
        current = binding.var
        bias = bias_var = activation = act_var = None
        shape = _ir.tensor_shape(binding.var)
        # a tensor the (QDQ) model quantizes ends the pattern: its rounding is kept
        stop = given is not None and current in given
        users = uses.get(current, [])
        if not stop and len(users) == 1 and users[0] != "return" \
                and _ir.op_name(users[0].value) == "relax.add":
            add = users[0].value
            other = add.args[1] if add.args[0].same_as(current) else add.args[0]
            axis = 1 if kind == "conv2d" else len(shape) - 1
            vec = _ir.const_value(other)
            vec = None if vec is None else _ir.per_channel_vector(vec, shape[axis], axis, len(shape))
            if vec is not None and _ir.tensor_shape(users[0].var) == shape:
                bias, bias_var, current = vec, users[0].var, users[0].var
        stop = given is not None and current in given
        users = uses.get(current, [])
        if not stop and len(users) == 1 and users[0] != "return":
            act = _activation(users[0], current)
            if act is not None:
                activation, act_var, current = act, users[0].var, users[0].var
        layer = Layer(name=name, onnx_op=onnx_op, kind=kind, anchor=binding.var,
                      call=binding.value, weight=_ir.const_value(binding.value.args[1]),
                      bias=bias, bias_var=bias_var, activation=activation, act_var=act_var,
                      out_var=current, input_var=binding.value.args[0])
        if kind not in ops:
            layer.quantize, layer.reason = False, f"op {kind} not selected for quantization"
        elif _matches(layer, list(skip)):
            layer.quantize, layer.reason = False, "skipped by --skip"
        layers.append(layer)

    roots, int8_vars = [], set()
    for layer in layers:
        if not layer.quantize:
            continue
        _trace_root(layer, producer)
        if given is not None and layer.root not in given:
            layer.quantize, layer.reason = False, "input not quantized in the QDQ model"
            continue
        if layer.root not in roots:
            roots.append(layer.root)
        int8_vars.add(layer.root)
        int8_vars.update(layer.chain)
    concats, shared = {}, {}
    if given is not None:
        inside = {v for l in layers if l.quantize for v in l.vars if not v.same_as(l.out_var)}
        for var in given:
            if var not in int8_vars and var not in inside:
                roots.append(var)
                int8_vars.add(var)
    else:
        _int8_concats(roots, int8_vars, producer, _ir.use_map(func), concats, shared)
    return Plan(layers=layers, roots=roots, int8_vars=int8_vars, producer=producer,
                concats=concats, shared=shared)


def _int8_concats(roots, int8_vars, producer, uses, concats, shared) -> None:
    """Roots that are a concat of float tensors used nowhere else in int8: run the
    concat itself on int8, with every input quantized to the concat's parameters
    (a producing layer requantizes to them in its epilogue)."""
    from tvm import relax

    for root in list(roots):
        binding = producer.get(root)
        if binding is None or _ir.op_name(binding.value) != "relax.concat":
            continue
        fields = getattr(binding.value.args[0], "fields", None)
        if not fields or not all(isinstance(f, relax.Var) and _ir.tensor_dtype(f) == "float32"
                                 for f in fields):
            continue
        if len({f for f in fields}) != len(fields):
            continue  # the same tensor twice
        if any(f in int8_vars or f in shared for f in fields):
            continue  # already quantized with parameters of its own
        concats[root] = list(fields)
        for f in fields:
            shared[f] = root
            int8_vars.add(f)


def tensor_names(plan: Plan, func) -> dict:
    """Readable names for the tensors the summary talks about.

    Model inputs keep their ONNX names; a layer's output (after its fused bias
    and activation) is ``"<layer name>:output"``; anything else is the Relax
    var name with the op that produces it, e.g. ``"lv9 (add)"``.
    """
    names = {p: p.name for p in func.params}
    for layer in plan.layers:
        names[layer.out_var] = f"{layer.name}:output"
    for var, binding in plan.producer.items():
        if var not in names:
            op = _ir.op_name(binding.value) or "value"
            names[var] = f"{var.name} ({op.split('.')[-1]})"
    return names


def _trace_root(layer: Layer, producer) -> None:
    """Walk back from the layer input through transparent ops to its root."""
    from tvm import relax

    var, chain = layer.input_var, []
    while var in producer and _ir.op_name(producer[var].value) in TRANSPARENT_OPS:
        source = producer[var].value.args[0]
        if not isinstance(source, relax.Var) or _ir.tensor_dtype(source) != "float32":
            break
        chain.append(var)
        var = source
    layer.root, layer.chain = var, chain[::-1]
