"""Import of QDQ models: compile ONNX QuantizeLinear/DequantizeLinear graphs to real int8.

TVM's ONNX importer turns a QDQ model (ONNX Runtime's ``quantize_static(...,
QuantFormat.QDQ)``, QAT exports, PyTorch's quantized export) into float
conv2d/matmul between ``quantize``/``dequantize`` pairs -- fake quantization,
computed in float. Here the model's own quantization is read back and the
ordinary realize pass emits the same integer kernels as for a calibrated
float model, using the model's scales instead of calibrated ones:

* weights: every ``dequantize(int8 constant, scale, zero_point, axis)`` is
  recorded before constant folding (``weight_table``); a layer whose folded
  float weight equals ``scale * (q - zp)`` of a recorded entry (possibly
  transposed, as Gemm's ``transB`` makes it) uses exactly those int8 values;
* activations: every ``dequantize(quantize(x, s, zp), s, zp)`` pair is removed
  (``strip_pairs``) and ``x`` remembered with its (s, zp). Every such tensor
  is kept quantized in the realized module, so float consumers see
  ``dequantize(quantize(x))`` exactly as the QDQ model defines;
* TVM imports uint8 QDQ tensors as int8 with the zero point shifted by -128;
  they are mapped back to uint8 (same real values), the form the u8 x s8
  kernels take.
"""

from __future__ import annotations

import numpy as np

from . import _ir
from .realize import QParams


def has_qdq(mod) -> bool:
    names = {_ir.op_name(b.value) for b in _ir.main_bindings(mod["main"])}
    return "relax.quantize" in names or "relax.dequantize" in names


def _axis(call) -> int:
    return int(call.attrs.axis)


def weight_table(mod) -> list[dict]:
    """Every ``dequantize`` of a constant: {q, scale [C], zero_point [C], axis, float}."""
    table = []
    for binding in _ir.main_bindings(mod["main"]):
        call = binding.value
        if _ir.op_name(call) != "relax.dequantize":
            continue
        q, s, zp = (_ir.const_value(a) for a in call.args[:3])
        if q is None or s is None or zp is None or q.dtype not in (np.int8, np.uint8):
            continue
        axis = _axis(call) % max(q.ndim, 1)
        shape = [1] * q.ndim
        if s.size > 1:
            shape[axis] = s.size
        scale = s.astype(np.float32).reshape(shape if s.size > 1 else ())
        zero = zp.astype(np.int64).reshape(shape if zp.size > 1 else ())
        real = (scale * (q.astype(np.int64) - zero).astype(np.float32)).astype(np.float32)
        table.append({"q": q, "scale": s.astype(np.float64).reshape(-1),
                      "zero_point": zp.astype(np.int64).reshape(-1), "axis": axis,
                      "float": real})
    return table


def match_weight(table, weight: np.ndarray, channel_axis: int):
    """(q int8 in the layer's layout, scales [C]) if ``weight`` is a recorded DQ weight."""
    for entry in table:
        real = entry["float"]
        for transposed in (False, True):
            candidate = real.T if transposed else real
            if candidate.shape != weight.shape:
                continue
            tol = 1e-6 * max(float(np.abs(candidate).max()), 1e-30)
            if not np.allclose(candidate, weight, rtol=0, atol=tol):
                continue
            if np.any(entry["zero_point"] != 0) or entry["q"].dtype != np.int8:
                return None  # asymmetric / uint8 weights: requantize ourselves
            q = entry["q"].T if transposed else entry["q"]
            axis = (entry["q"].ndim - 1 - entry["axis"]) if transposed else entry["axis"]
            channels = weight.shape[channel_axis]
            scale = entry["scale"]
            if scale.size == 1:
                scale = np.full(channels, scale[0])
            elif axis != channel_axis % weight.ndim:
                return None  # quantized along another axis than our per-channel axis
            return np.ascontiguousarray(q), scale
    return None


def _scalar(expr):
    value = _ir.const_value(expr)
    if value is None or value.size != 1:
        return None
    return value.reshape(-1)[0]


def _qparams(scale, zero_point, dtype: str) -> QParams:
    zp = int(zero_point)
    if dtype == "int8" and zp != 0:  # TVM's shifted uint8: back to uint8
        return QParams(float(scale), zp + 128, "uint8", 0, 255)
    if dtype == "uint8":
        return QParams(float(scale), zp, "uint8", 0, 255)
    return QParams(float(scale), zp, "int8", -128, 127)


def strip_pairs(mod):
    """Remove ``dequantize(quantize(x))`` pairs; returns ``(module, {new var: QParams})``."""
    func = mod["main"]
    bindings = _ir.main_bindings(func)
    uses = _ir.use_map(func)
    producer = {b.var: b for b in bindings}
    pairs = {}      # dequantize var -> (x var, QParams)
    dropped = set()
    for binding in bindings:
        call = binding.value
        if _ir.op_name(call) != "relax.dequantize":
            continue
        q = call.args[0]
        if q not in producer or _ir.op_name(producer[q].value) != "relax.quantize":
            continue
        qcall = producer[q].value
        s_q, z_q = _scalar(qcall.args[1]), _scalar(qcall.args[2])
        s_d, z_d = _scalar(call.args[1]), _scalar(call.args[2])
        if None in (s_q, z_q, s_d, z_d) or s_q != s_d or z_q != z_d:
            continue
        x = qcall.args[0]
        if _ir.tensor_dtype(x) != "float32":
            continue
        pairs[binding.var] = (x, _qparams(s_q, z_q, str(qcall.attrs.out_dtype)))
        if all(u != "return" and u.var in pairs or u is binding for u in uses.get(q, [])):
            dropped.add(q)
    given = {}

    def visit(bb, binding, remap):
        var = binding.var
        if var in pairs:
            x, params = pairs[var]
            new_x = _ir.substitute(x, remap)
            remap[var] = new_x
            given.setdefault(new_x, params)
            return
        if var in dropped and all(u != "return" and u.var in pairs for u in uses.get(var, [])):
            return
        _ir.copy_binding(bb, binding, remap)

    new_mod = _ir.rewrite_main(mod, visit)
    # the vars in ``given`` belong to the rebuilt function: map them by name
    new_vars = {b.var.name: b.var for b in _ir.main_bindings(new_mod["main"])}
    new_vars.update({p.name: p for p in new_mod["main"].params})
    return new_mod, {new_vars[v.name]: p for v, p in given.items() if v.name in new_vars}
