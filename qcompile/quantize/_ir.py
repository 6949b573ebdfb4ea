"""Small helpers over Relax IR shared by the quantization passes.

The passes work on the ``main`` function of an imported model: one dataflow
block of ``var = call(...)`` bindings (the shape every ONNX import has). These
helpers read that form: which op a binding calls, its constant operands, who
uses each var.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def op_name(expr) -> str | None:
    """``"relax.nn.conv2d"`` for a call to a Relax op, else None."""
    from tvm import relax

    if isinstance(expr, relax.Call) and isinstance(expr.op, __import__("tvm").ir.Op):
        return expr.op.name
    return None


def const_value(expr) -> np.ndarray | None:
    """The numpy value of a ``relax.Constant``, else None."""
    from tvm import relax

    if isinstance(expr, __import__("tvm").ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    return None


def const(array: np.ndarray, dtype: str | None = None):
    """A ``relax.Constant`` holding ``array`` (cast to ``dtype`` when given)."""
    import tvm
    from tvm import relax

    array = np.ascontiguousarray(array if dtype is None else np.asarray(array).astype(dtype))
    return relax.const(tvm.runtime.tensor(array))


def tensor_shape(expr) -> tuple[int, ...] | None:
    """The static shape of a tensor-typed expression, or None."""
    from tvm import relax

    sinfo = expr.ty
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(d) for d in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None


def tensor_dtype(expr) -> str | None:
    from tvm import relax

    sinfo = expr.ty
    if isinstance(sinfo, relax.TensorType):
        return str(sinfo.dtype)
    return None


def main_bindings(func):
    """All ``VarBinding``s of ``func``'s body, in order (across binding blocks)."""
    from tvm import relax

    out = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if not isinstance(binding, relax.VarBinding):
                raise NotImplementedError(
                    f"quantizer: unsupported binding kind {type(binding).__name__}")
            out.append(binding)
    return out


def free_vars_of(expr) -> list:
    """The relax Vars an expression reads (calls, tuples, tuple-get-item, shapes)."""
    from tvm import relax

    return list(relax.analysis.free_vars(expr))


def use_map(func) -> dict:
    """var -> list of bindings (or the string "return") that read it."""
    uses: dict = defaultdict(list)
    for binding in main_bindings(func):
        for var in free_vars_of(binding.value):
            uses[var].append(binding)
    for var in free_vars_of(func.body.body):
        uses[var].append("return")
    return uses


def per_channel_vector(value: np.ndarray, channels: int, axis: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along a single channel axis -> its [C] vector.

    ``value`` is an elementwise operand of a tensor of rank ``rank`` whose channel
    axis is ``axis`` (negative allowed) with ``channels`` channels. Returns None if
    it varies along any other axis or does not broadcast.
    """
    value = np.asarray(value)
    if value.ndim > rank:
        return None
    axis = axis % rank
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    for ax, size in enumerate(full.shape):
        if ax != axis and size != 1:
            return None
    if full.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)


def substitute(expr, remap: dict):
    """``expr`` with every Var in ``remap`` replaced (calls, tuples, get-item, consts)."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, remap) for a in expr.args], expr.attrs,
                          expr.ty_args)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, remap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, remap), expr.index)
    return expr  # Constant, ShapeExpr, PrimValue, StringImm, DataTypeImm, ...


def rewrite_main(mod, visit, finish=None, start=None):
    """Rebuild ``main`` binding by binding in one dataflow block.

    ``visit(bb, binding, remap)`` emits whatever replaces ``binding`` and records
    ``remap[binding.var] = new expr``; ``finish(bb, ret_expr, remap)`` turns the
    original return expression into the new one (default: substitute). Returns
    a new IRModule; the other functions are kept as they are. ``start(bb, remap)``
    runs first, inside the dataflow block, with ``remap`` holding the new params.
    """
    import tvm
    from tvm import relax

    func = mod["main"]
    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, p.ty) for p in func.params]
    remap = dict(zip(func.params, params))
    attrs = dict(func.attrs) if func.attrs is not None else None
    with bb.function("main", params, attrs=attrs):
        with bb.dataflow():
            if start is not None:
                start(bb, remap)
            for binding in main_bindings(func):
                visit(bb, binding, remap)
            if finish is None:
                ret = substitute(func.body.body, remap)
            else:
                ret = finish(bb, func.body.body, remap)
            out = bb.emit_output(ret)
        bb.emit_func_output(out)
    new_main = bb.get()["main"]
    funcs = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    new_mod = tvm.IRModule(funcs)
    new_mod["main"] = new_main
    return new_mod


def copy_binding(bb, binding, remap) -> None:
    """Re-emit a binding unchanged (vars remapped), keeping its name."""
    remap[binding.var] = bb.emit(substitute(binding.value, remap), name_hint=binding.var.name)
