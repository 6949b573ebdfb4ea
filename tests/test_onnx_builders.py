"""The in-memory ONNX builders produce valid models that onnxruntime can run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_builders as ob  # tests/ is on sys.path (pytest's default prepend import mode)

ort = pytest.importorskip("onnxruntime")

RUNNABLE = {**ob.BUILDERS, "dynamic_batch": ob.dynamic_batch_model}


def _declared_shape(value_info: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else batch
                 for d in value_info.type.tensor_type.shape.dim)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_builder_checks_and_runs(name):
    model = RUNNABLE[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}
    assert all(node.name for node in model.graph.node)

    feeds = ob.random_inputs(model, seed=1)
    outputs = ob.run_onnxruntime(model, feeds)
    assert len(outputs) == len(model.graph.output)
    for out, info in zip(outputs, model.graph.output):
        assert out.dtype == np.float32
        assert out.shape == _declared_shape(info, batch=2)
        assert np.all(np.isfinite(out))
        assert np.abs(out).max() > 0  # not degenerate


def test_all_models_is_static_and_covers_the_ops():
    models = ob.all_models()
    assert set(models) == set(ob.BUILDERS)
    ops = set()
    for model in models.values():
        for vi in list(model.graph.input) + list(model.graph.output):
            assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
        ops |= {node.op_type for node in model.graph.node}
    assert ops >= {"Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "MaxPool",
                   "AveragePool", "GlobalAveragePool", "Add", "Concat", "Reshape", "Flatten",
                   "Softmax"}
    convs = [n for m in models.values() for n in m.graph.node if n.op_type == "Conv"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in convs]
    assert any(a["strides"] == [2, 2] for a in attrs)
    assert any(a["group"] > 1 for a in attrs)
    assert any(len(n.input) == 3 for n in convs) and any(len(n.input) == 2 for n in convs)


def test_builders_are_deterministic_per_seed():
    a, b, c = ob.small_cnn_model(0), ob.small_cnn_model(0), ob.small_cnn_model(1)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()
    fa, fb = ob.random_inputs(a, seed=3), ob.random_inputs(b, seed=3)
    assert fa.keys() == {"input"}
    np.testing.assert_array_equal(fa["input"], fb["input"])


def test_dynamic_batch_model_runs_at_several_batch_sizes():
    model = ob.dynamic_batch_model()
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    for batch in (1, 3):
        (out,) = ob.run_onnxruntime(model, ob.random_inputs(model, seed=0, batch=batch))
        assert out.shape == (batch, 4)


def test_unsupported_op_model_checks_but_does_not_run():
    model = ob.unsupported_op_model()
    onnx.checker.check_model(model)
    fancy = [n for n in model.graph.node if n.op_type == "FancyOp"]
    assert len(fancy) == 1
    assert fancy[0].name == "fancy_node" and fancy[0].domain == "com.example"
    with pytest.raises(Exception, match="FancyOp"):
        ob.run_onnxruntime(model, ob.random_inputs(model))
