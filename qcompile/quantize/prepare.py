"""Prepare a float Relax module for quantization.

``prepare(mod)`` returns a numerically equivalent module in the canonical form
the quantizer matches:

* constants folded (BatchNorm statistics, ``permute_dims`` of Gemm weights,
  reshapes/expand_dims of constants), tuple plumbing and dead code removed;
* every per-channel affine chain after a conv2d or matmul with a constant
  weight -- the decomposed inference BatchNorm (``add``/``subtract``/
  ``divide``/``multiply`` by per-channel constants), Gemm's alpha/beta --
  folded into the weight and one bias, so the quantizer sees only::

      y = conv2d(x, W)            [+ add(y, b[1, C, 1, 1])]
      y = matmul(x, W[K, N])      [+ add(y, b[N])]

  optionally followed by ``relu`` / ``clip`` (ONNX Clip, which imports as a pair
  of ``call_tir`` max/min kernels, is turned back into ``relax.clip``).

Each step is an ``IRModule -> IRModule`` function; ``prepare`` runs them all.
"""

from __future__ import annotations

import numpy as np

from . import _ir

AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


_NUMPY_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract,
                 "relax.multiply": np.multiply, "relax.divide": np.divide}


def _numpy_eval(call, args):
    """Value of a simple op on numpy constants, or None when not handled here."""
    name = _ir.op_name(call)
    if name in _NUMPY_BINARY:
        a, b = args
        if a.dtype != b.dtype or a.dtype.kind != "f":
            return None
        return _NUMPY_BINARY[name](a, b)
    if name == "relax.where":
        cond, a, b = args
        return np.where(cond, a, b).astype(a.dtype) if a.dtype == b.dtype else None
    (x,) = args[:1]
    if name == "relax.isnan":
        return np.isnan(x)
    if name == "relax.sqrt" and x.dtype.kind == "f":
        return np.sqrt(x)
    if name == "relax.rsqrt" and x.dtype.kind == "f":
        return (1 / np.sqrt(x)).astype(x.dtype)
    if name == "relax.expand_dims":
        out = x
        for axis in sorted(int(a) % (x.ndim + len(call.attrs.axis)) for a in call.attrs.axis):
            out = np.expand_dims(out, axis)
        return out
    if name == "relax.reshape":
        shape = getattr(call.args[1], "values", None)
        return None if shape is None else x.reshape([int(d) for d in shape])
    if name == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(x, None if axes is None else [int(a) for a in axes])
    if name == "relax.astype":
        return x.astype(str(call.attrs.dtype))
    return None


def fold_constants_numpy(mod):
    """Fold bindings of simple ops whose operands are all constants, in numpy.

    TVM's FoldConstant compiles every foldable op through LLVM (about 50 ms
    each): the decomposed BatchNorm statistics of a MobileNetV2 are ~190 such
    ops, 20 s. Element-wise arithmetic, sqrt, expand_dims, reshape, permute
    and astype on constants are done here instead (same float32 IEEE
    arithmetic); FoldConstant still handles anything else.
    """
    from tvm import relax

    folded = {}

    def visit(bb, binding, remap):
        call = binding.value
        if _ir.op_name(call) is not None and call.args:
            tensors = [a for a in call.args if not isinstance(a, relax.ShapeExpr)]
            values = []
            for arg in tensors:
                arg = remap.get(arg, arg) if isinstance(arg, relax.Var) else arg
                values.append(_ir.const_value(arg))
            if values and all(v is not None for v in values):
                try:
                    out = _numpy_eval(call, values)
                except Exception:  # noqa: BLE001 - leave it to FoldConstant
                    out = None
                want = _ir.tensor_shape(binding.var)
                dtype = _ir.tensor_dtype(binding.var)
                if out is not None and want is not None and tuple(out.shape) == want \
                        and str(out.dtype) == dtype:
                    remap[binding.var] = _ir.const(out)
                    folded[binding.var] = True
                    return
        _ir.copy_binding(bb, binding, remap)

    return _ir.rewrite_main(mod, visit)


def simplify(mod):
    """Numpy constant folding, FoldConstant, CanonicalizeBindings, DeadCodeElimination."""
    import tvm
    from tvm import relax

    mod = fold_constants_numpy(mod)
    seq = tvm.transform.Sequential([
        relax.transform.FoldConstant(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(["main"]),
    ])
    return seq(mod)


def anchor_kind(value) -> str | None:
    """"conv2d" / "matmul" for a float conv2d or matmul whose weight is a constant."""
    name = _ir.op_name(value)
    if name not in ("relax.nn.conv2d", "relax.matmul"):
        return None
    if _ir.tensor_dtype(value.args[0]) != "float32":
        return None
    weight = _ir.const_value(value.args[1])
    if weight is None or weight.dtype != np.float32:
        return None
    if name == "relax.nn.conv2d":
        attrs = value.attrs
        if (str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                or str(attrs.out_layout) != "NCHW" or weight.ndim != 4):
            return None
        return "conv2d"
    if weight.ndim != 2 or _ir.tensor_shape(value.args[0]) is None:
        return None
    return "matmul"


def _affine_step(binding, current, uses, channels, axis, rank):
    """If ``binding`` is ``current (op) per-channel const``, return (op, vec, const_first)."""
    value = binding.value
    name = _ir.op_name(value)
    if name not in AFFINE_OPS or len(uses.get(current, ())) != 1:
        return None
    lhs, rhs = value.args
    if lhs.same_as(current):
        operand, const_first = rhs, False
    elif rhs.same_as(current) and name in ("relax.add", "relax.multiply", "relax.subtract"):
        operand, const_first = lhs, True
    else:
        return None
    array = _ir.const_value(operand)
    if array is None or _ir.tensor_shape(binding.var) != _ir.tensor_shape(current):
        return None
    vec = _ir.per_channel_vector(array, channels, axis, rank)
    if vec is None or not np.all(np.isfinite(vec)):
        return None
    if name == "relax.divide" and np.any(vec == 0):
        return None
    return name, vec, const_first


def fold_affine(mod):
    """Fold per-channel affine chains after conv2d/matmul into weight and bias."""
    from tvm import relax

    func = mod["main"]
    bindings = _ir.main_bindings(func)
    uses = _ir.use_map(func)
    producer = {b.var: b for b in bindings}
    plans = {}       # anchor var -> (scale, bias, last var)
    absorbed = set()  # vars of folded affine bindings
    for binding in bindings:
        kind = anchor_kind(binding.value)
        if kind is None:
            continue
        shape = _ir.tensor_shape(binding.var)
        if shape is None:
            continue
        rank = len(shape)
        axis = 1 if kind == "conv2d" else rank - 1
        channels = shape[axis]
        scale = np.ones(channels)
        bias = np.zeros(channels)
        current = binding.var
        chain = []
        while True:
            users = uses.get(current, [])
            if len(users) != 1 or users[0] == "return":
                break
            step = _affine_step(users[0], current, uses, channels, axis, rank)
            if step is None:
                break
            name, vec, const_first = step
            if name == "relax.add":
                bias = bias + vec
            elif name == "relax.subtract" and not const_first:
                bias = bias - vec
            elif name == "relax.subtract":
                scale, bias = -scale, vec - bias
            elif name == "relax.multiply":
                scale, bias = scale * vec, bias * vec
            else:
                scale, bias = scale / vec, bias / vec
            current = users[0].var
            chain.append(current)
        if not chain:
            continue
        plans[binding.var] = (scale, bias, current)
        absorbed.update(chain)

    if not plans:
        return mod

    def visit(bb, binding, remap):
        var = binding.var
        if var in absorbed:
            return
        if var not in plans:
            _ir.copy_binding(bb, binding, remap)
            return
        scale, bias, last = plans[var]
        call = binding.value
        weight = _ir.const_value(call.args[1]).astype(np.float64)
        if anchor_kind(call) == "conv2d":
            weight = weight * scale[:, None, None, None]
            bias_shape = (1, len(bias), 1, 1)
        else:
            weight = weight * scale[None, :]
            bias_shape = (len(bias),)
        data = _ir.substitute(call.args[0], remap)
        new_call = relax.Call(call.op, [data, _ir.const(weight, "float32")], call.attrs,
                              call.ty_args)
        out = bb.emit(new_call, name_hint=var.name)
        if np.any(bias != 0):
            out = bb.emit(relax.op.add(out, _ir.const(bias.reshape(bias_shape), "float32")),
                          name_hint=last.name)
        remap[last] = out

    del producer
    return _ir.rewrite_main(mod, visit)


def _call_tir_minmax(mod, value):
    """("max"|"min", x, scalar) for ``call_tir(maximum|minimum, (x, scalar const))``."""
    if _ir.op_name(value) != "relax.call_tir":
        return None
    callee, args = value.args[0], value.args[1]
    name = getattr(callee, "name_hint", "")
    kind = "max" if name.startswith("maximum") else "min" if name.startswith("minimum") else None
    if kind is None or len(getattr(args, "fields", ())) != 2:
        return None
    x, bound = args.fields
    array = _ir.const_value(bound)
    if array is None or array.size != 1 or _ir.tensor_dtype(x) != "float32":
        return None
    try:
        text = mod[callee].script()
    except Exception:  # noqa: BLE001 - not a PrimFunc we can read
        return None
    if f"T.{kind}(" not in text:
        return None
    return kind, x, float(array.reshape(-1)[0])


def canonicalize_clip(mod):
    """ONNX Clip imports as ``call_tir(maximum)`` then ``call_tir(minimum)`` with scalar
    bounds; turn the pair into ``relax.clip`` (and a lone ``max(x, 0)`` into ``relu``)
    so that the quantizer can fuse it into the epilogue."""
    from tvm import relax

    func = mod["main"]
    bindings = _ir.main_bindings(func)
    uses = _ir.use_map(func)
    replace, absorbed = {}, set()
    for binding in bindings:
        found = _call_tir_minmax(mod, binding.value)
        if found is None or found[0] != "max":
            continue
        _kind, x, lo = found
        users = uses.get(binding.var, [])
        if len(users) == 1 and users[0] != "return":
            nxt = _call_tir_minmax(mod, users[0].value)
            if nxt is not None and nxt[0] == "min" and nxt[1].same_as(binding.var):
                absorbed.add(binding.var)
                replace[users[0].var] = ("clip", x, lo, nxt[2])
                continue
        if lo == 0.0:
            replace[binding.var] = ("relu", x)

    if not replace:
        return mod

    def visit(bb, binding, remap):
        var = binding.var
        if var in absorbed:
            return
        if var not in replace:
            _ir.copy_binding(bb, binding, remap)
            return
        spec = replace[var]
        x = _ir.substitute(spec[1], remap)
        if spec[0] == "relu":
            remap[var] = bb.emit(relax.op.nn.relu(x), name_hint=var.name)
        else:
            remap[var] = bb.emit(relax.op.clip(x, relax.prim_value(spec[2], "float32"),
                                               relax.prim_value(spec[3], "float32")),
                                 name_hint=var.name)

    return _ir.rewrite_main(mod, visit)


def prepare(mod):
    """The canonical float module the quantizer matches (see the module docstring)."""
    mod = canonicalize_clip(fold_constants_numpy(mod))  # before FoldConstant builds call_tirs
    mod = simplify(mod)
    mod = canonicalize_clip(mod)
    mod = fold_affine(mod)
    return simplify(mod)
