"""A bounded hypothesis fuzz of the ONNX read + validation path.

Mutated model bytes (bit flips, byte overwrites, truncation, insertions, splices
of two models) and mutated protobuf fields (dims, op types, attributes, names,
opsets, initializer data) go through ``read_onnx``, ``check_ops``,
``check_weights`` and ``graph_inputs``. Only ``QCompileError`` may escape, and its
message must be one line naming the file.

CI runs a small, derandomized campaign (about 30 s). Longer campaigns: see
tests/FUZZING.md (``QCOMPILE_FUZZ_EXAMPLES=20000 QCOMPILE_FUZZ_RANDOM=1``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import onnx_builders as ob
from qcompile.errors import QCompileError
from qcompile.frontend import check_ops, check_weights, graph_inputs, read_onnx

EXAMPLES = int(os.environ.get("QCOMPILE_FUZZ_EXAMPLES", "600"))
RANDOM = bool(os.environ.get("QCOMPILE_FUZZ_RANDOM"))

_SEEDS = {name: model for name, model in ob.all_models(0).items()}
_SEEDS["dynamic_batch"] = ob.dynamic_batch_model(0)
_SEEDS["unsupported_op"] = ob.unsupported_op_model(0)
try:  # already-quantized seeds reach the QDQ scale and type checks
    import bad_inputs

    with tempfile.TemporaryDirectory() as _tmp:
        for _name in ("conv_bn_relu", "gemm"):
            _SEEDS[f"{_name}_qdq"] = bad_inputs.qdq_model(_name, 0, Path(_tmp))
except ImportError:  # onnxruntime is a test dependency; without it, float seeds only
    pass
_BLOBS = {name: m.SerializeToString() for name, m in _SEEDS.items()}
_NAMES = sorted(_BLOBS)

FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=5000, derandomize=not RANDOM,
                         database=None, print_blob=True,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


def _validate(data: bytes) -> None:
    """The path under test: read, check ops and weights, resolve input shapes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.onnx"
        path.write_bytes(data)
        try:
            model = read_onnx(path)
            check_ops(model, str(path))
            check_weights(model, str(path))
            graph_inputs(model, {}, str(path), [])
        except QCompileError as exc:
            message = str(exc)
            assert "\n" not in message, f"multi-line error: {message!r}"
            assert str(path) in message, f"error does not name the file: {message!r}"


# --------------------------------------------------------------------------- byte level
@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(_BLOBS[draw(st.sampled_from(_NAMES))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete",
                                     "splice"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 32))]
        else:  # splice: the head of one model onto the tail of another
            other = _BLOBS[draw(st.sampled_from(_NAMES))]
            cut = draw(st.integers(0, len(other) - 1))
            data = data[:pos] + bytearray(other[cut:])
    return bytes(data)


# found by a random campaign: an op type that is not valid UTF-8 came back from
# protobuf as bytes and check_ops raised TypeError
_INVALID_UTF8_OP = ob.unsupported_op_model(0).SerializeToString().replace(b"FancyOp",
                                                                         b"\x80ancyOp")


@FUZZ_SETTINGS
@example(_INVALID_UTF8_OP)
@given(mutated_bytes())
def test_fuzz_model_bytes(data):
    _validate(data)


# --------------------------------------------------------------------------- proto level
_INTS = st.one_of(st.integers(-3, 3), st.sampled_from([0, 1 << 31, 1 << 62, -(1 << 62)]))


@st.composite
def mutated_model(draw) -> bytes:
    model = onnx.ModelProto()
    model.CopyFrom(_SEEDS[draw(st.sampled_from(_NAMES))])
    graph = model.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["input_dim", "op_type", "attr_int", "attr_ints",
                                     "node_input", "drop_node", "opset", "init_dims",
                                     "init_type", "elem_type", "output_name", "domain",
                                     "init_value"]))
        if kind == "input_dim" and graph.input and graph.input[0].type.tensor_type.shape.dim:
            dims = graph.input[0].type.tensor_type.shape.dim
            dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(_INTS)
        elif kind == "op_type" and graph.node:
            node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
            node.op_type = draw(st.sampled_from(["Conv", "Relu", "Gemm", "If", "Loop", "Scan",
                                                 "QLinearConv", "Mystery", "", "Softmax",
                                                 "Reshape", "Concat", "Gather", "Split"]))
        elif kind in ("attr_int", "attr_ints") and graph.node:
            node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
            if node.attribute:
                attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
                if kind == "attr_int":
                    attr.i = draw(_INTS)
                else:
                    del attr.ints[:]
                    attr.ints.extend(draw(st.lists(_INTS, max_size=5)))
        elif kind == "node_input" and graph.node:
            node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
            names = [n for x in graph.node for n in x.output] + ["", "nowhere"]
            if node.input:
                node.input[draw(st.integers(0, len(node.input) - 1))] = \
                    draw(st.sampled_from(names))
        elif kind == "drop_node" and graph.node:
            del graph.node[draw(st.integers(0, len(graph.node) - 1))]
        elif kind == "opset" and model.opset_import:
            model.opset_import[0].version = draw(st.integers(-1, 40))
        elif kind == "init_dims" and graph.initializer:
            init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            del init.dims[:]
            init.dims.extend(draw(st.lists(_INTS, max_size=4)))
        elif kind == "init_type" and graph.initializer:
            init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            init.data_type = draw(st.integers(0, 25))
        elif kind == "elem_type" and graph.input:
            graph.input[0].type.tensor_type.elem_type = draw(st.integers(0, 25))
        elif kind == "output_name" and graph.output:
            graph.output[0].name = draw(st.sampled_from(["", "input", "nowhere"]))
        elif kind == "init_value" and graph.initializer:
            init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            try:  # an earlier mutation may have made the tensor unreadable
                array = onnx.numpy_helper.to_array(init).copy() \
                    if init.data_type == onnx.TensorProto.FLOAT else None
            except Exception:  # noqa: BLE001
                array = None
            if array is not None:
                if array.size:
                    array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(
                        [0.0, -1.0, float("nan"), float("inf"), 1e-45, 3e38]))
                    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
        elif kind == "domain" and graph.node:
            graph.node[draw(st.integers(0, len(graph.node) - 1))].domain = \
                draw(st.sampled_from(["", "ai.onnx", "com.microsoft", "com.example", "x" * 300]))
    return model.SerializeToString()


@FUZZ_SETTINGS
@given(mutated_model())
def test_fuzz_model_fields(data):
    _validate(data)


@pytest.mark.parametrize("name", _NAMES)
def test_seeds_pass_validation(name, tmp_path):
    """The seeds themselves validate (unsupported_op fails on its op): the fuzz starts
    from models that reach every check, not from files rejected at the first byte."""
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(_BLOBS[name])
    model = read_onnx(path)
    if name == "unsupported_op":
        with pytest.raises(QCompileError, match="FancyOp"):
            check_ops(model, str(path))
        return
    check_ops(model, str(path))
    check_weights(model, str(path))
    assert graph_inputs(model, {}, str(path), [])
