"""ONNX -> Relax: read, check and import a model with its weights bound.

The model is checked before TVM sees it (protobuf parse, ONNX checker, external
data confined to the model's directory, op support, input shapes), so a user
mistake ends in a :class:`~qcompile.errors.QCompileError` that names the file,
the node and the op, never in a traceback from deep inside TVM's importer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError, UnsupportedOpError
from .onnx_fold import fold_constants

# QOperator-format quantized ops: TVM's importer cannot take them. QDQ can.
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "QLinearAdd",
                 "QLinearMul", "QLinearConcat", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
                 "QLinearSoftmax"}
QOPERATOR_HINT = ("QOperator-format models are not supported: re-export the model in QDQ "
                  "format (onnxruntime.quantization.quantize_static(..., "
                  "quant_format=QuantFormat.QDQ)) or give qcompile the float model")
# ONNX dtype enum -> numpy dtype name, for the graph inputs we accept.
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                9: "bool", 10: "float16", 11: "float64"}
MAX_MODEL_BYTES = 2 << 30  # protobuf's own limit for one message
MIN_OPSET = 7  # older opsets differ in op semantics (broadcast attrs, consumed_inputs)
# TVM indexes tensors with int32 unless told otherwise: larger inputs cannot build right.
MAX_INPUT_ELEMENTS = (1 << 31) - 1
# Smallest QuantizeLinear/DequantizeLinear scale taken: float32's smallest normal number.
_MIN_SCALE = float(np.finfo(np.float32).tiny)
# Largest: scale * (q - zero_point) must stay finite in float32 for 16-bit q.
_MAX_SCALE = float(np.finfo(np.float32).max) / 65536
# Ops whose initializer inputs are weights: Inf there is a broken model, not a mask.
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
               "InstanceNormalization", "LayerNormalization"}


@dataclass(frozen=True)
class TensorInfo:
    """Name, static shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ImportedModel:
    """A float ONNX model imported into Relax, with what later stages need to know."""

    mod: object  # tvm.IRModule, weights bound as constants
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    onnx_model: object  # onnx.ModelProto (kept for the onnxruntime reference)
    path: str
    sha256: str
    opset: int
    notices: list[str] = field(default_factory=list)
    folded_nodes: int = 0  # constant nodes evaluated before import (qcompile.onnx_fold)

    @property
    def name(self) -> str:
        return Path(self.path).stem


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_shape_overrides(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["input:1x3x224x224", ...]`` -> ``{"input": (1, 3, 224, 224)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(f"--input-shape '{item}': expected NAME:DxDxD with positive "
                             "integers, e.g. input:1x3x224x224") from None
        shapes[name] = shape
    return shapes


def read_onnx(path: str | os.PathLike):
    """Parse and check an ONNX file; external data only from the model's own directory."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    if size >= MAX_MODEL_BYTES:
        raise ModelError(f"{path}: {size} bytes is over protobuf's 2 GiB limit; "
                         "save the weights as ONNX external data")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
    except Exception as exc:  # DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'parse error'})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{path}: the file parses but holds no ONNX graph (no nodes)")
    if len(model.graph.output) == 0:
        raise ModelError(f"{path}: the graph declares no outputs")
    _check_text(model, path)
    _check_opset(model, path)
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: fails the ONNX checker: {first}") from None
    return model


def _check_text(model, path: Path) -> None:
    """Names, op types and domains must be text: protobuf hands back invalid UTF-8 in
    a string field as bytes, which the checker lets through for custom domains."""
    graph = model.graph
    texts = [(e.domain, "an opset domain") for e in model.opset_import]
    for index, node in enumerate(graph.node):
        where = f"node #{index}"
        texts += [(node.name, where), (node.op_type, where), (node.domain, where)]
        texts += [(name, where) for name in (*node.input, *node.output)]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        texts.append((value.name, "a graph tensor name"))
    for value, where in texts:
        if not isinstance(value, str):
            raise ModelError(f"{path}: {where} holds {bytes(value)[:40]!r}, which is not "
                             "valid UTF-8 text; the file is corrupt")


def _check_opset(model, path: Path) -> None:
    """The default-domain opset must be one ONNX defines and TVM's importer takes."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    opset = model_opset(model)
    if opset == 0:
        raise ModelError(f"{path}: the model imports no default ONNX opset (opset_import "
                         "lacks domain ''); re-export it with an opset")
    if not MIN_OPSET <= opset <= newest:
        raise ModelError(f"{path}: opset {opset} is outside what qcompile takes "
                         f"({MIN_OPSET}-{newest}); convert it with "
                         f"onnx.version_converter.convert_version(model, {min(17, newest)})")


def _load_external_data(model, path: Path) -> None:
    """Load external tensors, refusing any location outside the model's directory."""
    from onnx import external_data_helper

    base = path.resolve().parent
    tensors = [t for t in external_data_helper._get_all_tensors(model)
               if external_data_helper.uses_external_data(t)]
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if "\x00" in location:
            raise ModelError(f"{path}: tensor '{tensor.name}' has an external data location "
                             "with a NUL byte; refused")
        try:
            target = (base / location).resolve()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: tensor '{tensor.name}': external data location "
                             f"'{location}' cannot be resolved ({exc})") from None
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(f"{path}: tensor '{tensor.name}' points to external data "
                             f"'{location}' outside the model's directory; refused")
        if not target.is_file():
            raise ModelError(f"{path}: tensor '{tensor.name}' needs external data file "
                             f"'{location}', which is missing")
    if tensors:
        try:
            external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise ModelError(f"{path}: cannot load external data: {exc}") from None


def model_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def check_ops(model, path: str) -> None:
    """Reject, by node, any op TVM's importer has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = set(_get_convert_map()) | {"Constant", "If"}
    opset = model_opset(model)
    for index, node in enumerate(model.graph.node):
        node_name = node.name or f"#{index}"
        if node.op_type in QOPERATOR_OPS:
            raise UnsupportedOpError(node_name, node.op_type, opset, path, QOPERATOR_HINT)
        if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in supported:
            domain = f" in domain '{node.domain}'" if node.domain not in ("", "ai.onnx") else ""
            raise UnsupportedOpError(node_name, node.op_type + domain, opset, path,
                                     "replace it, or export the model without it")


def check_weights(model, path: str) -> None:
    """Refuse NaN in any float constant, and Inf in a weight (an initializer feeding
    Conv, Gemm, MatMul or a normalization); also tensors whose data does not fit their
    dims. Inf elsewhere (a -inf attention mask) is left alone."""
    from onnx import TensorProto, numpy_helper

    float_types = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                   TensorProto.BFLOAT16}
    weights = {name for node in model.graph.node if node.op_type in _WEIGHT_OPS
               for name in node.input[1:]}
    tensors = [(t, "initializer") for t in model.graph.initializer]
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append((attr.t, f"node '{node.name or node.op_type}'"))
    _check_qdq_types(model, path)
    scales = {node.input[1] for node in model.graph.node
              if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1}
    for tensor, where in tensors:
        if tensor.data_type not in float_types:
            continue
        name = tensor.name or where
        try:
            array = numpy_helper.to_array(tensor)
        except Exception as exc:  # data length does not match dims, unknown layout
            raise ModelError(f"{path}: {where} '{name}' cannot be read: "
                             f"{_first_line(exc)}") from None
        values = np.asarray(array, dtype=np.float64) if array.dtype.kind == "V" else array
        if np.isnan(values).any():
            raise ModelError(f"{path}: {where} '{name}' holds NaN values; the model is "
                             "broken (re-export it from a healthy checkpoint)")
        if tensor.name in weights and np.isinf(values).any():
            raise ModelError(f"{path}: weight '{name}' holds Inf values; the model is "
                             "broken (re-export it from a healthy checkpoint)")
        if tensor.name in scales:
            as_f32 = np.asarray(values, dtype=np.float64)
            ok = np.isfinite(as_f32) & (as_f32 >= _MIN_SCALE) & (as_f32 <= _MAX_SCALE)
            if not ok.all():
                raise ModelError(f"{path}: quantization scale '{name}' holds "
                                 f"{as_f32[~ok].flat[0]}; scales must be positive, finite "
                                 f"and at most {_MAX_SCALE:.3g} (re-quantize the model)")


def _check_qdq_types(model, path: str) -> None:
    """DequantizeLinear must take integers and QuantizeLinear floats, where the type is
    known (graph inputs, initializers, QuantizeLinear outputs): the ONNX checker does not
    type-check, and TVM's importer takes a float into DequantizeLinear silently."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
              TensorProto.BFLOAT16}
    known = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    known.update({t.name: t.data_type for t in model.graph.initializer})
    for index, node in enumerate(model.graph.node):
        if node.op_type == "QuantizeLinear" and node.output:
            known[node.output[0]] = TensorProto.UINT8  # some integer type
        elif node.op_type == "DequantizeLinear" and node.output:
            known[node.output[0]] = TensorProto.FLOAT
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or not node.input:
            continue
        elem = known.get(node.input[0])
        if elem is None or elem == 0:
            continue
        wants_float = node.op_type == "QuantizeLinear"
        if (elem in floats) != wants_float:
            raise ModelError(f"{path}: node '{node.name or f'#{index}'}' ({node.op_type}) "
                             f"takes '{node.input[0]}' of type "
                             f"{TensorProto.DataType.Name(elem).lower()}, but needs "
                             f"{'a float' if wants_float else 'an integer'} tensor")


def graph_inputs(model, overrides: dict[str, tuple[int, ...]], path: str,
                 notices: list[str]) -> list[TensorInfo]:
    """Static shapes for the graph inputs: the model's own, or the user's overrides."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise ModelError(f"{path}: input '{value.name}' has ONNX element type "
                             f"{ttype.elem_type}, which qcompile does not take")
        dims = list(ttype.shape.dim)
        if value.name in overrides:
            shape = overrides[value.name]
            if len(shape) != len(dims):
                raise InputError(f"{path}: input '{value.name}' has rank {len(dims)}, "
                                 f"but --input-shape gives {len(shape)} dims {shape}")
            for axis, (dim, given) in enumerate(zip(dims, shape)):
                if dim.HasField("dim_value") and dim.dim_value != given:
                    raise InputError(f"{path}: input '{value.name}' has fixed size "
                                     f"{dim.dim_value} on axis {axis}, --input-shape gives "
                                     f"{given}")
        else:
            shape = []
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    raise ModelError(f"{path}: input '{value.name}' has size "
                                     f"{dim.dim_value} on axis {axis}; sizes must be "
                                     "positive")
                if dim.HasField("dim_value"):
                    shape.append(int(dim.dim_value))
                else:
                    label = dim.dim_param or "?"
                    notices.append(f"input '{value.name}' axis {axis} is dynamic ('{label}'): "
                                   f"using 1 (set it with --input-shape "
                                   f"{value.name}:...)")
                    shape.append(1)
            shape = tuple(shape)
        if int(np.prod(shape, dtype=object)) > MAX_INPUT_ELEMENTS:
            raise ModelError(f"{path}: input '{value.name}' has shape {tuple(shape)}, more "
                             f"than {MAX_INPUT_ELEMENTS} elements; qcompile cannot build it")
        inputs.append(TensorInfo(value.name, tuple(shape), dtype))
    unknown = set(overrides) - {i.name for i in inputs}
    if unknown:
        raise InputError(f"{path}: --input-shape names {sorted(unknown)}, but the model's "
                         f"inputs are {[i.name for i in inputs]}")
    if not inputs:
        raise ModelError(f"{path}: the graph has no inputs")
    return inputs


def import_onnx(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None
                ) -> ImportedModel:
    """Read, check and import an ONNX model into a Relax IRModule with weights bound."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    path = str(path)
    model = read_onnx(path)
    check_ops(model, path)
    check_weights(model, path)
    notices: list[str] = []
    inputs = graph_inputs(model, dict(input_shapes or {}), path, notices)
    shape_dict = {i.name: list(i.shape) for i in inputs}
    dtype_dict = {i.name: i.dtype for i in inputs}
    # shape arithmetic (computed Pad pads, ConstantOfShape masks) that TVM's importer
    # rejects becomes constants for these static input shapes
    try:
        foldable, folded_nodes = fold_constants(model, {i.name: i.shape for i in inputs})
    except Exception:  # noqa: BLE001 - folding is an aid: TVM then sees the graph as given
        foldable, folded_nodes = model, 0
    failure = None
    try:
        # the importer prints every failing node with its inputs (pages of IR) to stdout
        with contextlib.redirect_stdout(io.StringIO()):
            mod = from_onnx(foldable, shape_dict=shape_dict, dtype_dict=dtype_dict,
                            keep_params_in_input=False)
        # Inference-mode BatchNorm and friends become plain arithmetic.
        mod = relax.transform.DecomposeOpsForInference()(mod)
    except Exception as exc:
        failure = f"{path}: TVM's ONNX importer failed: {_first_line(exc)}"
    if failure is not None:
        _discard_failed_import()
        raise ModelError(failure)
    outputs = _relax_outputs(mod, model, path)
    return ImportedModel(mod=mod, inputs=inputs, outputs=outputs, onnx_model=model,
                         path=path, sha256=sha256_file(path), opset=model_opset(model),
                         notices=notices, folded_nodes=folded_nodes)


def _discard_failed_import() -> None:
    """Free what a failed import left behind now, with C++ stderr muted: TVM's
    BlockBuilder, abandoned mid-function, warns "destroyed with remaining blocks" from
    its destructor, which would otherwise print after qcompile's one-line error."""
    import gc

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        gc.collect()
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            gc.collect()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _relax_outputs(mod, model, path: str) -> list[TensorInfo]:
    """Output names from ONNX, static shapes and dtypes from Relax's inference."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in model.graph.output]
    outputs = []
    for index, sinfo in enumerate(fields):
        if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
            raise ModelError(f"{path}: output #{index} has no static tensor shape after import")
        try:
            shape = tuple(int(d) for d in sinfo.shape.values)
        except (TypeError, AttributeError):
            raise ModelError(f"{path}: output '{names[index] if index < len(names) else index}'"
                             " has a dynamic shape; fix the inputs with --input-shape") from None
        name = names[index] if index < len(names) else f"output{index}"
        outputs.append(TensorInfo(name, shape, str(sinfo.dtype)))
    return outputs


def check_feed(inputs: list[TensorInfo], feed: dict[str, np.ndarray], source: str,
               batch_axis_free: bool = False) -> None:
    """Check arrays against the model inputs; the error names the input and the source."""
    for info in inputs:
        if info.name not in feed:
            raise InputError(f"{source}: no array for model input '{info.name}' "
                             f"(have: {sorted(feed)})")
        array = feed[info.name]
        shape = tuple(array.shape)
        want = info.shape[1:] if batch_axis_free else info.shape
        got = shape[1:] if batch_axis_free else shape
        if got != want or (batch_axis_free and len(shape) != len(info.shape)):
            raise InputError(f"{source}: input '{info.name}' has shape {shape}, the model "
                             f"expects {info.shape}")
        if str(array.dtype) != info.dtype:
            raise InputError(f"{source}: input '{info.name}' has dtype {array.dtype}, the "
                             f"model expects {info.dtype}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("File ", "Traceback", "  ")):
            return line[:300]
    return type(exc).__name__
