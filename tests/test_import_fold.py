"""Constant subgraphs folded before import (qcompile.onnx_fold): graphs TVM 0.27's ONNX
importer rejects as exported, reproduced small, import and match onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_model
from onnx_builders import run_onnxruntime

import qcompile.frontend as frontend
from qcompile.errors import ModelError
from qcompile.frontend import import_onnx
from qcompile.onnx_fold import fold_constants


def _model(nodes, inputs, outputs, inits=(), name="fold"):
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _const(name, value):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=name,
                            value=numpy_helper.from_array(np.asarray(value), name + "_v"))


def _run_imported(imported, feeds):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(imported.mod, "llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in imported.inputs])
    return out.numpy()


def _import_without_folding(path, monkeypatch):
    monkeypatch.setattr(frontend, "fold_constants", lambda model, shapes: (model, 0))
    return import_onnx(path)


# ---------------------------------------------------------------- ConstantOfShape, rank 0
def _rank0_mask_model():
    """transformers 5's BERT mask: ConstantOfShape of an empty shape (a rank-0 bool) And
    a per-token mask, then Where -- TVM's ConstantOfShape cannot make a rank-0 tensor."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        _const("empty_shape", np.zeros(0, np.int64)),
        helper.make_node("ConstantOfShape", ["empty_shape"], ["true"], name="cos",
                         value=numpy_helper.from_array(np.array([1], np.bool_), "one")),
        _const("zero", np.float32(0.0)),
        helper.make_node("Greater", ["mask", "zero"], ["keep"], name="gt"),
        helper.make_node("And", ["true", "keep"], ["both"], name="and"),
        _const("neg", np.float32(-1e4)),
        helper.make_node("Where", ["both", "x", "neg"], ["output"], name="where"),
    ]
    return _model(nodes,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6]),
                   helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 6])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6])],
                  name="rank0_mask")


def test_rank0_constant_of_shape_imports_and_matches_onnxruntime(tmp_path, monkeypatch):
    model = _rank0_mask_model()
    path = save_model(model, tmp_path, "rank0_mask")
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(1, 6) - 2,
             "mask": np.array([[1, 1, 0, 1, 0, 0]], np.float32)}
    imported = import_onnx(path)
    assert imported.folded_nodes >= 2  # the empty shape and the ConstantOfShape
    got = _run_imported(imported, feeds)
    np.testing.assert_array_equal(got, run_onnxruntime(model, feeds)[0])
    # the graph really is one TVM's importer rejects as exported
    with pytest.raises(ModelError, match="importer failed"):
        _import_without_folding(path, monkeypatch)


# ---------------------------------------------------------------- Pad with computed pads
def _computed_pad_model():
    """Two Pads whose pads input is computed, as exporters write "same" padding:

    * torch ``nn.ZeroPad2d``: Concat(Constant, ConstantOfShape) -> Reshape -> Slice ->
      Transpose -> Reshape -> Cast (EfficientNet-Lite0 from timm / efficientnet-lite)
    * from the input's own size: Shape -> Gather -> Mod/Sub arithmetic -> Unsqueeze ->
      Concat (a stride-2 "same" padding that depends on H)
    """
    from onnx import TensorProto, helper, numpy_helper

    i64 = np.int64
    nodes = [
        _const("lr", np.array([0, 1, 0, 1], i64)),
        _const("four", np.array([4], i64)),
        helper.make_node("ConstantOfShape", ["four"], ["zeros4"], name="cos",
                         value=numpy_helper.from_array(np.array([0], i64), "z")),
        helper.make_node("Concat", ["lr", "zeros4"], ["cat"], name="cat", axis=0),
        _const("pairs", np.array([-1, 2], i64)),
        helper.make_node("Reshape", ["cat", "pairs"], ["cat2"], name="r1"),
        _const("s_start", np.array([-1], i64)),
        _const("s_end", np.array([-9223372036854775807], i64)),
        _const("s_axes", np.array([0], i64)),
        _const("s_step", np.array([-1], i64)),
        helper.make_node("Slice", ["cat2", "s_start", "s_end", "s_axes", "s_step"], ["rev"],
                         name="slice"),
        helper.make_node("Transpose", ["rev"], ["tr"], name="tr", perm=[1, 0]),
        _const("flat", np.array([-1], i64)),
        helper.make_node("Reshape", ["tr", "flat"], ["pads_i"], name="r2"),
        helper.make_node("Cast", ["pads_i"], ["pads1"], name="cast", to=TensorProto.INT64),
        _const("pad_value", np.float32(0.0)),
        helper.make_node("Pad", ["x", "pads1", "pad_value"], ["p1"], name="pad1"),
        # pads from the input's height: (2 - H % 2) total, split before/after
        helper.make_node("Shape", ["p1"], ["shape"], name="shape"),
        _const("axis_h", np.array(2, i64)),
        helper.make_node("Gather", ["shape", "axis_h"], ["h"], name="gather", axis=0),
        _const("two", np.array(2, i64)),
        helper.make_node("Mod", ["h", "two"], ["odd"], name="mod"),
        helper.make_node("Sub", ["two", "odd"], ["total"], name="sub"),
        helper.make_node("Div", ["total", "two"], ["before"], name="div"),
        helper.make_node("Sub", ["total", "before"], ["after"], name="sub2"),
        _const("ax0", np.array([0], i64)),
        helper.make_node("Unsqueeze", ["before", "ax0"], ["b1"], name="u1"),
        helper.make_node("Unsqueeze", ["after", "ax0"], ["a1"], name="u2"),
        _const("zero2", np.array([0, 0], i64)),
        helper.make_node("Concat", ["zero2", "b1", "b1", "zero2", "a1", "a1"], ["pads2"],
                         name="cat_pads", axis=0),
        helper.make_node("Pad", ["p1", "pads2"], ["p2"], name="pad2", mode="constant"),
        helper.make_node("Conv", ["p2", "w"], ["output"], name="conv", strides=[2, 2]),
    ]
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3))
                                .astype(np.float32), "w")
    return _model(nodes,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 5, 5])],
                  [w], name="computed_pads")


def test_computed_pads_import_and_match_onnxruntime(tmp_path, monkeypatch):
    model = _computed_pad_model()
    path = save_model(model, tmp_path, "computed_pads")
    feeds = {"x": np.random.default_rng(1).normal(size=(1, 3, 9, 9)).astype(np.float32)}
    imported = import_onnx(path)
    assert imported.outputs[0].shape == (1, 4, 5, 5)
    got = _run_imported(imported, feeds)
    np.testing.assert_allclose(got, run_onnxruntime(model, feeds)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="Dynamic pads"):
        _import_without_folding(path, monkeypatch)


def test_fold_result_is_static_and_leaves_the_input_model_alone():
    model = _computed_pad_model()
    before = model.SerializeToString()
    folded, count = fold_constants(model, {"x": (1, 3, 9, 9)})
    assert model.SerializeToString() == before
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Pad", "Pad", "Conv"]  # every shape computation became a constant
    inits = {t.name: t for t in folded.graph.initializer}
    from onnx import numpy_helper

    pads = [numpy_helper.to_array(inits[n.input[1]]).tolist() for n in folded.graph.node[:2]]
    assert pads == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]]  # H=10: total 2
    assert count == len(model.graph.node) - 3
    # a different input height gives different pads: the fold uses the shapes it is told
    folded9, _ = fold_constants(model, {"x": (1, 3, 8, 8)})
    inits9 = {t.name: numpy_helper.to_array(t) for t in folded9.graph.initializer}
    assert inits9[folded9.graph.node[1].input[1]].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_fold_keeps_quantize_dequantize_and_big_values():
    """QDQ weights stay DequantizeLinear (the quantizer reads them); a large constant
    expression is left to TVM; a graph output is never replaced by an initializer."""
    from onnx import TensorProto, helper, numpy_helper

    import qcompile.onnx_fold as fold

    q = numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")
    s = numpy_helper.from_array(np.float32(0.5), "ws")
    big = numpy_helper.from_array(np.array([fold.MAX_FOLD_ELEMENTS + 1], np.int64), "big")
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("ConstantOfShape", ["big"], ["huge"], name="cos_big",
                         value=numpy_helper.from_array(np.array([1.0], np.float32), "v")),
        helper.make_node("ReduceSum", ["huge"], ["total"], name="sum", keepdims=0),
        helper.make_node("Add", ["y", "total"], ["output"], name="add"),
        helper.make_node("Shape", ["x"], ["xshape"], name="shape_out"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                   [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, 4]),
                    helper.make_tensor_value_info("xshape", TensorProto.INT64, [2])],
                   [q, s, big])
    folded, count = fold_constants(model, {"x": (2, 4)})
    assert count == 0
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]


def test_models_without_shape_arithmetic_import_unchanged(bundled_model):
    imported = import_onnx(bundled_model)
    assert imported.folded_nodes == 0


def test_a_failing_fold_leaves_the_graph_to_tvm(bundled_model, monkeypatch):
    def broken(model, shapes):
        raise RuntimeError("fold bug")

    monkeypatch.setattr(frontend, "fold_constants", broken)
    imported = import_onnx(bundled_model)
    assert imported.folded_nodes == 0 and imported.outputs
