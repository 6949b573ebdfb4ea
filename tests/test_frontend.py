"""Import: float ONNX models covering the common ops compile, run and match
onnxruntime; bad inputs end in QCompileError naming the file and the node."""

import numpy as np
import pytest
from conftest import save_model
from onnx_builders import (all_models, dynamic_batch_model, random_inputs, run_onnxruntime,
                           unsupported_op_model)

from qcompile.errors import InputError, ModelError, UnsupportedOpError
from qcompile.frontend import import_onnx, parse_shape_overrides
from qcompile.pipeline import compile_relax
from qcompile.target import get_target

COVERED_OPS = {"Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "Clip", "MaxPool",
               "AveragePool", "GlobalAveragePool", "Add", "Concat", "Reshape", "Flatten",
               "Softmax"}


def _run(mod, feeds, inputs):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(compile_relax(mod, get_target("host")), tvm.cpu())
    result = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in inputs])
    return result.numpy() if hasattr(result, "numpy") else result[0].numpy()


def test_builders_cover_the_ops_the_importer_must_take():
    ops = {node.op_type for m in all_models().values() for node in m.graph.node}
    assert COVERED_OPS <= ops


@pytest.mark.parametrize("name", sorted(all_models()))
def test_import_compile_run_matches_onnxruntime(tmp_path, name):
    model = all_models()[name]
    path = save_model(model, tmp_path, name)
    imported = import_onnx(path)
    feeds = random_inputs(model, seed=1, batch=imported.inputs[0].shape[0])
    expected = run_onnxruntime(model, feeds)[0]
    got = _run(imported.mod, feeds, imported.inputs)
    assert got.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    assert float(np.abs(got - expected).max()) / scale < 1e-4, name
    assert imported.outputs[0].shape == expected.shape
    assert len(imported.sha256) == 64


def test_dynamic_batch_defaults_to_one_and_can_be_set(tmp_path):
    path = save_model(dynamic_batch_model(), tmp_path, "dyn")
    imported = import_onnx(path)
    assert imported.inputs[0].shape[0] == 1 and imported.notices
    name = imported.inputs[0].name
    rest = "x".join(str(d) for d in imported.inputs[0].shape[1:])
    imported4 = import_onnx(path, parse_shape_overrides([f"{name}:4x{rest}"]))
    assert imported4.inputs[0].shape[0] == 4 and not imported4.notices
    assert imported4.outputs[0].shape[0] == 4


def test_unsupported_op_names_node_op_and_opset(tmp_path):
    path = save_model(unsupported_op_model(), tmp_path, "fancy")
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(path)
    message = str(info.value)
    assert "fancy_node" in message and "FancyOp" in message and "opset 17" in message
    assert str(path) in message


def test_qoperator_op_says_export_qdq(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"],
                            ["y"], name="qmm")
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [0.1]) for n in ("as", "bs", "ys")]
    inits += [helper.make_tensor(n, TensorProto.UINT8, [], [0]) for n in ("az", "bz", "yz")]
    inits.append(helper.make_tensor("b", TensorProto.UINT8, [4, 4], [1] * 16))
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [4, 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(path)
    assert "qmm" in str(info.value) and "QDQ" in str(info.value)


def test_not_onnx_bytes(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xffthis is not a protobuf\x13\x37" * 10)
    with pytest.raises(ModelError) as info:
        import_onnx(path)
    assert str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        import_onnx(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        import_onnx(tmp_path / "empty.onnx")


def test_wrong_input_shape_names_the_input(tmp_path):
    model = all_models()["small_cnn"]
    path = save_model(model, tmp_path, "cnn")
    name = model.graph.input[0].name
    with pytest.raises(InputError) as info:
        import_onnx(path, {name: (1, 2, 3)})
    assert name in str(info.value) and "rank" in str(info.value)
    with pytest.raises(InputError) as info:
        import_onnx(path, {"nope": (1, 1, 28, 28)})
    assert "nope" in str(info.value)


def test_external_data_outside_model_dir_is_refused(tmp_path):
    import onnx
    from onnx import external_data_helper

    model = all_models()["gemm"]
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\x00" * 4096)
    inner = tmp_path / "models"
    inner.mkdir()
    for tensor in model.graph.initializer:
        external_data_helper.set_external_data(tensor, location="../secret.bin")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    path = inner / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError) as info:
        import_onnx(path)
    assert "outside the model's directory" in str(info.value)


@pytest.mark.parametrize("spec", ["input:1x3", "input:0x3", ":1x2", "input:axb", "input"])
def test_bad_shape_overrides(spec):
    with pytest.raises(InputError) if spec != "input:1x3" else _no_error():
        parse_shape_overrides([spec])


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
