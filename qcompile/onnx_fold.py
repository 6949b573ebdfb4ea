"""Fold an ONNX model's constant subgraphs before TVM imports it.

Exporters leave shape arithmetic in the graph that TVM 0.27's ONNX importer
cannot take, although every value in it is known once the input shapes are
fixed (qcompile always imports with static shapes):

* EfficientNet (torch ``nn.ZeroPad2d`` "same" padding): ``Pad`` whose ``pads``
  come from ``ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Cast``;
  the importer stops with "Dynamic pads are not supported yet".
* BERT from transformers 5: the attention mask is built from ``Shape -> Gather``
  (rank-0) ``-> Unsqueeze/Concat -> ConstantOfShape -> Expand``; the importer's
  ``ConstantOfShape`` fails on it ("broadcast_to expects the input shape to have
  the number of ndim at least as the input tensor's").

:func:`fold_constants` evaluates, in graph order, every node whose inputs are
all known -- initializers, ``Constant`` outputs, already folded values, and
``Shape``/``Size`` of a tensor whose static shape ONNX shape inference finds --
with onnx's own reference implementation of each op (``onnx.reference``: numpy,
part of the ``onnx`` package qcompile already needs), and replaces it by an
initializer. Shape inference runs again after each round, since a folded
``Reshape`` shape makes the next tensor's shape static. Values larger than
:data:`MAX_FOLD_ELEMENTS` are left to TVM (folding exists for shape-sized data,
not to materialize weights), and so are quantize/dequantize nodes (the QDQ
structure is what the quantizer reads) and random or control-flow ops.
"""

from __future__ import annotations

import numpy as np

# Far above any shape, pad or mask tensor of a real model; bounds the memory a folded
# value may take (a constant expression this large is left to TVM's FoldConstant).
MAX_FOLD_ELEMENTS = 1 << 22
MAX_ROUNDS = 8
# constants up to this size go into the shape-inference probe with their values
# (Reshape shapes, Slice bounds); larger ones as shapes only
PROBE_CONST_ELEMENTS = 4096
# never evaluated here: the quantizer reads QDQ pairs; random ops differ per run;
# control flow has subgraphs; Identity and Dropout are harmless to keep
NO_FOLD_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
               "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli", "If", "Loop", "Scan", "SequenceMap"}


def fold_constants(model, input_shapes: dict[str, tuple[int, ...]]):
    """``(folded model, number of nodes folded)``; ``model`` is left unchanged.

    ``input_shapes`` are the static shapes the model will be imported with; the
    folded model is only valid for them.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opsets = list(out.opset_import)
    known = {t.name: _array(t) for t in graph.initializer}
    inputs = {v.name for v in graph.input}
    known = {k: v for k, v in known.items() if v is not None and k not in inputs}
    protected = {o.name for o in graph.output}  # graph outputs stay node outputs
    folded: dict[str, np.ndarray] = {}
    removed: set[int] = set()
    for _ in range(MAX_ROUNDS):
        shapes = _static_shapes(out, input_shapes, folded, removed)
        progress = False
        for index, node in enumerate(graph.node):
            if index in removed or any(o in protected for o in node.output):
                continue
            values = _evaluate(node, known, shapes, opsets, out.ir_version)
            if values is None:
                continue
            for name, value in zip(node.output, values):
                if name:
                    known[name] = folded[name] = value
            removed.add(index)
            progress = True
        if not progress:
            break
    if not removed:
        return out, 0
    _rebuild(graph, removed, folded)
    return out, len(removed)


def _array(tensor):
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except Exception:  # noqa: BLE001 - unreadable or unusual data: not foldable, not our error
        return None


def _static_shapes(model, input_shapes, folded, removed) -> dict[str, tuple[int, ...]]:
    """Static shapes ONNX shape inference finds with the inputs fixed; {} if it fails.

    The probe model holds only the live nodes; constants larger than
    :data:`PROBE_CONST_ELEMENTS` enter it as typed graph inputs (inference needs
    their shapes, not their bytes, and serializing the weights dominated its time).
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inputs = []
    for value in graph.input:
        fixed = onnx.ValueInfoProto()
        fixed.CopyFrom(value)
        if value.name in input_shapes:
            for dim, size in zip(fixed.type.tensor_type.shape.dim, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
        inputs.append(fixed)
    declared = {v.name for v in graph.input}
    small = []
    consts = [(t.name, t.data_type, tuple(t.dims), t) for t in graph.initializer
              if t.name not in declared]
    consts += [(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v), v)
               for k, v in folded.items()]
    for name, dtype, dims, value in consts:
        if int(np.prod(dims, dtype=np.int64)) <= PROBE_CONST_ELEMENTS:
            small.append(value if not isinstance(value, (np.ndarray, np.generic))
                         else numpy_helper.from_array(np.asarray(value), name))
        else:
            inputs.append(helper.make_tensor_value_info(name, dtype, list(dims)))
    nodes = [n for i, n in enumerate(graph.node) if i not in removed]
    probe = helper.make_graph(nodes, "probe", inputs, list(graph.output), small)
    probe_model = helper.make_model(probe, opset_imports=list(model.opset_import))
    probe_model.ir_version = model.ir_version
    try:
        inferred = onnx.shape_inference.infer_shapes(probe_model, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement
        return {}
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = ttype.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _evaluate(node, known, shapes, opsets, ir_version):
    """The node's output values if it can be folded, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NO_FOLD_OPS:
        return None
    if any(attr.HasField("g") or len(attr.graphs) for attr in node.attribute):
        return None
    if node.op_type in ("Shape", "Size") and node.input and node.input[0] not in known:
        shape = shapes.get(node.input[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            return [np.array(int(np.prod(shape, dtype=np.int64)), np.int64)]
        return [_shape_slice(node, shape)]
    if not all(name == "" or name in known for name in node.input):
        return None
    if node.op_type == "ConstantOfShape" and node.input and node.input[0] \
            and np.prod(known[node.input[0]], dtype=np.float64) > MAX_FOLD_ELEMENTS:
        return None  # do not allocate what would be refused anyway
    attrs = node.attribute
    if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
        value = _array(attrs[0].t)  # the common form, read without an evaluator
        return None if value is None or value.size > MAX_FOLD_ELEMENTS else [value]
    try:
        values = _run_node(node, [known[n] if n else None for n in node.input], opsets,
                           ir_version)
    except Exception:  # noqa: BLE001 - anything the reference cannot do is left to TVM
        return None
    if any(not isinstance(v, np.ndarray) or v.size > MAX_FOLD_ELEMENTS or v.dtype == object
           for v in values):
        return None
    return values


def _shape_slice(node, shape) -> np.ndarray:
    """``Shape`` with its opset-15 ``start``/``end`` attributes (Python slice rules)."""
    start, end = 0, None
    for attr in node.attribute:
        if attr.name == "start":
            start = int(attr.i)
        elif attr.name == "end":
            end = int(attr.i)
    return np.array(shape[start:end], np.int64)


def _run_node(node, values, opsets, ir_version) -> list[np.ndarray]:
    """One node through ``onnx.reference``, under the model's own opsets."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    feeds, graph_inputs = {}, []
    for name, value in zip(node.input, values):
        if not name or name in feeds:
            continue
        value = np.asarray(value)
        feeds[name] = value
        graph_inputs.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    graph_outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "fold", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version or onnx.IR_VERSION
    results = ReferenceEvaluator(model).run(None, feeds)
    return [np.asarray(r) if isinstance(r, (np.ndarray, np.generic)) else r for r in results]


def _rebuild(graph, removed, folded) -> None:
    """Drop folded nodes, add the folded values that live nodes still read, prune the rest."""
    from onnx import numpy_helper

    nodes = [n for i, n in enumerate(graph.node) if i not in removed]
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):  # dead-node elimination, outputs back to inputs
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    declared = {i.name for i in graph.input}  # old-style models list initializers as inputs
    kept = [t for t in graph.initializer if t.name in needed or t.name in declared]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    present = {t.name for t in kept}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k)
                             for k, v in folded.items() if k in needed and k not in present)
    names = needed | {i.name for i in graph.input}
    value_info = [v for v in graph.value_info if v.name in names and v.name not in folded]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
