"""A seeded, reproducible corpus of bad inputs for qcompile's entry points.

``generate(root, seed=0)`` writes every item under ``root`` and returns a list of
:class:`Item`: the bad file (or directory), the CLI arguments that feed it to
qcompile (``{out}`` stands for the item's own output directory) and what must
happen. Same seed, same bytes.

Categories (``Item.category``):

* ``onnx``: truncated and bit-flipped protobufs, not-ONNX bytes, wrong/missing
  opset and IR version, unknown and QOperator ops, inconsistent shapes, zero,
  negative and huge dims, NaN/Inf weights, external data (``../`` traversal,
  absolute paths, symlinks out, missing file, bad offset/length), cyclic
  graphs, duplicate names, empty graphs, broken attributes. Fed to
  ``qcompile compile MODEL -o {out} --quantize none`` (import + build).
* ``eval-npz``: bad evaluation data, fed to ``qcompile measure ARTIFACT --data``
  (against a well-formed artifact whose library is never loaded).
* ``calib-npz``: the same kinds of bad data as calibration data (``compile
  --calib``); only meaningful where ``qcompile.quantize.load_calibration`` exists.
* ``tuning``: corrupt tuning databases (``compile --tuning-log``); only
  meaningful where ``qcompile.tune`` exists.
* ``artifact``: tampered artifact directories, fed to ``qcompile measure DIR``.
* ``target``: bad target descriptor TOML files (``compile --target FILE``).
* ``options``: bad option values (``--repeat 0``, ``--rpc nonsense``, ``--input-shape
  input:4x0`` ...); the error must name the option or the value.
* ``report``: bad ``report.json`` files (``qcompile report DIR``, which re-renders).
* ``qdq``: already-quantized QDQ models (made with onnxruntime's quantize_static) with
  zero, negative, NaN, Inf, denormal or huge scales, mismatched zero points and axes
  (``compile --quantize int8``).

``Item.expect`` is ``"error"`` (must end in exit 2 and a one-line
``qcompile: error:`` naming ``Item.names``), or ``"any"`` for mutations that
may happen to produce a valid input (a bit flip inside a weight): those must
still never crash, hang, print a traceback or write outside their output
directory, and if they fail, fail with the same one-line error.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_builders as ob

# The artifact format the fake artifacts imitate (kept in sync with qcompile.build).
ARTIFACT_FORMAT = "qcompile-artifact/1"
GOOD_TARGET = "x86_64-avx2"


@dataclass
class Item:
    id: str
    category: str
    kind: str
    path: str  # the bad file or directory
    argv: list[str]  # qcompile CLI arguments; "{out}" = this item's output directory
    names: str  # a string the error message must contain (the bad file's path)
    expect: str = "error"  # "error" or "any"
    needs: str = ""  # "", "quantize" (load_calibration) or "tune" (qcompile.tune)
    note: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Corpus:
    root: Path
    rng: random.Random
    items: list[Item] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    def new_id(self, category: str, kind: str) -> str:
        key = f"{category}-{kind}"
        self.counts[key] = self.counts.get(key, 0) + 1
        return f"{key}-{self.counts[key]:03d}"

    def dir_for(self, item_id: str) -> Path:
        path = self.root / "corpus" / item_id
        path.mkdir(parents=True, exist_ok=True)
        return path


# --------------------------------------------------------------------------- onnx helpers
def _seed_models(seed: int) -> dict[str, onnx.ModelProto]:
    models = ob.all_models(seed)
    models["dynamic_batch"] = ob.dynamic_batch_model(seed)
    return models


def _simple(nodes, inputs, outputs, inits=(), opset=ob.OPSET, ir=ob.IR_VERSION,
            value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "bad", list(inputs), list(outputs),
                              initializer=list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _f32(shape, rng, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _gemm_with(weight: np.ndarray, bias: np.ndarray | None = None, k=8, n=4):
    inits = [numpy_helper.from_array(weight, "w")]
    ins = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        ins.append("b")
    node = helper.make_node("Gemm", ins, ["y"], name="fc", transB=1)
    return _simple([node], [_vi("x", [1, k])], [_vi("y", [1, n])], inits)


def _conv_with(attrs: dict, wshape=(4, 3, 3, 3), xshape=(1, 3, 8, 8), yshape=None, rng=None):
    rng = rng or np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    return _simple([node], [_vi("x", list(xshape))], [_vi("y", yshape)],
                   [numpy_helper.from_array(_f32(wshape, rng), "w")])


# --------------------------------------------------------------------------- onnx items
def _add_model(c: _Corpus, kind: str, payload, expect="error", note="", name="model.onnx"):
    """Write one model (ModelProto or raw bytes) as its own item."""
    item_id = c.new_id("onnx", kind)
    d = c.dir_for(item_id)
    path = d / name
    if isinstance(payload, onnx.ModelProto):
        data = payload.SerializeToString()
    else:
        data = bytes(payload)
    path.write_bytes(data)
    c.items.append(Item(item_id, "onnx", kind, str(path),
                        ["compile", str(path), "-o", "{out}/artifact", "--quantize", "none"],
                        str(path), expect, note=note))
    return d, path


def _onnx_bytes_items(c: _Corpus, seeds: dict[str, onnx.ModelProto]):
    rng = c.rng
    blobs = {name: m.SerializeToString() for name, m in seeds.items()}
    names = sorted(blobs)
    # truncated protobufs: cut anywhere, including inside the header
    for i in range(30):
        name = names[i % len(names)]
        blob = blobs[name]
        cut = rng.choice([1, 2, 7, 16, rng.randrange(1, len(blob))]) if i < 10 else \
            rng.randrange(1, len(blob))
        _add_model(c, "truncated", blob[:cut], "any" if cut > len(blob) * 0.98 else "error",
                   note=f"{name} cut at {cut}/{len(blob)}")
    # bit flips: 1-16 random bits; some land in weights and give a valid model
    for i in range(40):
        name = names[i % len(names)]
        data = bytearray(blobs[name])
        flips = rng.choice([1, 1, 2, 4, 16])
        for _ in range(flips):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        _add_model(c, "bitflip", data, "any", note=f"{name} with {flips} flipped bits")
    # header-area flips: the first 64 bytes hold ir_version, opset, producer, graph start
    for i in range(10):
        name = names[i % len(names)]
        data = bytearray(blobs[name])
        for _ in range(3):
            pos = rng.randrange(min(64, len(data)))
            data[pos] = rng.randrange(256)
        _add_model(c, "header-garbage", data, "any", note=f"{name}: bytes in the header")
    # invalid UTF-8 in string fields: protobuf hands such fields back as bytes
    fancy = ob.unsupported_op_model(0).SerializeToString()
    _add_model(c, "invalid-utf8-op-type", fancy.replace(b"FancyOp", b"\x80ancyOp"))
    _add_model(c, "invalid-utf8-domain", fancy.replace(b"com.example", b"com.\xffxample"))
    _add_model(c, "invalid-utf8-node-name", blobs["gemm"].replace(b"fc1", b"f\xc31"))
    _add_model(c, "invalid-utf8-tensor-name", blobs["gemm"].replace(b"input", b"inpu\xfe"))
    # not ONNX at all
    not_onnx = {
        "empty": b"",
        "zeros": bytes(1024),
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        "text": b"this is not an onnx model\n" * 10,
        "json": json.dumps({"graph": {"node": []}}).encode(),
        "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "elf": b"\x7fELF\x02\x01\x01" + bytes(100),
        "zip": b"PK\x03\x04" + bytes(100),
        "varint-overflow": b"\x08" + b"\xff" * 20,
        "huge-length-field": b"\x3a\xff\xff\xff\xff\x0f" + bytes(16),
        "nested-deep": b"\x3a\x02" * 2000,
    }
    for kind, data in not_onnx.items():
        _add_model(c, f"not-onnx-{kind}", data)
    # paths that are not model files
    item_id = c.new_id("onnx", "directory")
    d = c.dir_for(item_id) / "model.onnx"
    d.mkdir()
    c.items.append(Item(item_id, "onnx", "directory", str(d),
                        ["compile", str(d), "-o", "{out}/artifact", "--quantize", "none"],
                        str(d)))
    item_id = c.new_id("onnx", "missing-file")
    d = c.dir_for(item_id) / "nothing-here.onnx"
    c.items.append(Item(item_id, "onnx", "missing-file", str(d),
                        ["compile", str(d), "-o", "{out}/artifact", "--quantize", "none"],
                        str(d)))
    item_id = c.new_id("onnx", "npz-as-onnx")
    d = c.dir_for(item_id) / "model.onnx"
    d.write_bytes(_npz_bytes(x=np.zeros(3)))
    c.items.append(Item(item_id, "onnx", "npz-as-onnx", str(d),
                        ["compile", str(d), "-o", "{out}/artifact", "--quantize", "none"],
                        str(d)))


def _onnx_structural_items(c: _Corpus, seeds: dict[str, onnx.ModelProto], seed: int):
    nprng = np.random.default_rng(seed)
    names = sorted(seeds)
    # ---- opset / IR version
    for name in names[:4]:
        m = copy.deepcopy(seeds[name])
        del m.opset_import[:]
        _add_model(c, "no-opset", m)
        for version in (1, 99):
            m = copy.deepcopy(seeds[name])
            m.opset_import[0].version = version
            _add_model(c, f"opset-{version}", m)
        m = copy.deepcopy(seeds[name])
        m.opset_import[0].domain = "com.nobody"
        _add_model(c, "opset-other-domain", m)
        for ir in (0, 99):
            m = copy.deepcopy(seeds[name])
            m.ir_version = ir
            _add_model(c, f"ir-version-{ir}", m)
    # ---- unknown and unsupported ops
    for name in names[:4]:
        m = copy.deepcopy(seeds[name])
        m.graph.node[len(m.graph.node) // 2].op_type = "FrobnicateV2"
        _add_model(c, "unknown-op", m)
        m = copy.deepcopy(seeds[name])
        m.graph.node[0].domain = "com.example"
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        _add_model(c, "custom-domain-op", m)
    _add_model(c, "unsupported-fancyop", ob.unsupported_op_model(seed))
    m = copy.deepcopy(seeds["conv_bn_relu"])
    m.graph.node[0].op_type = "QLinearConv"
    _add_model(c, "qoperator-op", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.node[0].op_type = "ConvInteger"
    _add_model(c, "qoperator-op", m)
    # an unknown op hidden in an If branch
    then_g = helper.make_graph([helper.make_node("Mystery", ["x"], ["t"], name="mystery")],
                               "then", [], [_vi("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Relu", ["x"], ["e"], name="relu")],
                               "else", [], [_vi("e", [1, 4])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                            else_branch=else_g)
    _add_model(c, "unknown-op-in-subgraph",
               _simple([node], [_vi("x", [1, 4])], [_vi("y", [1, 4])], [cond]))
    # ---- inconsistent shapes
    _add_model(c, "shape-gemm-mismatch", _gemm_with(_f32((4, 9), nprng)))
    _add_model(c, "shape-gemm-bias", _gemm_with(_f32((4, 8), nprng), _f32((7,), nprng)))
    _add_model(c, "shape-conv-channels", _conv_with({}, wshape=(4, 5, 3, 3)))
    _add_model(c, "shape-conv-rank", _conv_with({}, wshape=(4, 3, 3)))
    _add_model(c, "shape-conv-input-rank", _conv_with({}, xshape=(1, 3, 8)))
    add = helper.make_node("Add", ["x", "b"], ["y"], name="add")
    _add_model(c, "shape-broadcast", _simple([add], [_vi("x", [2, 3])], [_vi("y", [2, 3])],
                                             [numpy_helper.from_array(_f32((4,), nprng), "b")]))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    _add_model(c, "shape-matmul", _simple([mm], [_vi("x", [2, 8])], [_vi("y", [2, 4])],
                                          [numpy_helper.from_array(_f32((5, 4), nprng), "w")]))
    rs = helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")
    _add_model(c, "shape-reshape-count", _simple(
        [rs], [_vi("x", [2, 3])], [_vi("y", [7])],
        [numpy_helper.from_array(np.array([7], np.int64), "s")]))
    _add_model(c, "shape-reshape-two-minus-one", _simple(
        [rs], [_vi("x", [2, 3])], [_vi("y", None)],
        [numpy_helper.from_array(np.array([-1, -1], np.int64), "s")]))
    cat = helper.make_node("Concat", ["x", "z"], ["y"], name="concat", axis=1)
    _add_model(c, "shape-concat", _simple([cat], [_vi("x", [2, 3]), _vi("z", [4, 3])],
                                          [_vi("y", [2, 6])]))
    # declared output shape disagreeing with the graph, value_info lying
    m = copy.deepcopy(seeds["gemm"])
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11
    _add_model(c, "shape-output-declared-wrong", m, "any")
    m = copy.deepcopy(seeds["conv_bn_relu"])
    m.graph.value_info.append(_vi(m.graph.node[0].output[0], [1, 99, 2, 2]))
    _add_model(c, "shape-value-info-wrong", m, "any")
    # weight whose raw bytes do not match its dims
    for kind, nbytes in (("short", 12), ("long", 4 * 32 * 5)):
        m = _gemm_with(_f32((4, 8), nprng))
        m.graph.initializer[0].raw_data = bytes(nbytes)
        _add_model(c, f"weight-bytes-{kind}", m)
    m = _gemm_with(_f32((4, 8), nprng))
    m.graph.initializer[0].ClearField("raw_data")
    _add_model(c, "weight-no-data", m)
    m = _gemm_with(_f32((4, 8), nprng))
    init = m.graph.initializer[0]
    init.ClearField("raw_data")
    init.float_data.extend([1.0] * 5)
    _add_model(c, "weight-float-data-short", m)
    m = _gemm_with(_f32((4, 8), nprng))
    m.graph.initializer[0].data_type = TensorProto.STRING
    _add_model(c, "weight-string-type", m)
    m = _gemm_with(_f32((4, 8), nprng))
    m.graph.initializer[0].data_type = 999
    _add_model(c, "weight-unknown-type", m)
    # ---- zero, negative and huge dims
    for dims, kind in (([1, 0], "input-dim-zero"), ([1, -3], "input-dim-negative"),
                       ([1, 1 << 40], "input-dim-huge"), ([1 << 20, 1 << 20], "input-dims-huge")):
        node = helper.make_node("Relu", ["x"], ["y"], name="relu")
        _add_model(c, kind, _simple([node], [_vi("x", dims)], [_vi("y", dims)]))
    m = copy.deepcopy(seeds["conv_bn_relu"])
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 1 << 31
    _add_model(c, "conv-input-huge", m)
    m = copy.deepcopy(seeds["conv_bn_relu"])
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 0
    _add_model(c, "conv-input-zero-channels", m)
    m = copy.deepcopy(seeds["gemm"])
    del m.graph.input[0].type.tensor_type.shape.dim[:]
    _add_model(c, "input-rank-zero", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].type.tensor_type.ClearField("shape")
    _add_model(c, "input-no-shape", m)
    empty_w = numpy_helper.from_array(np.zeros((0, 8), np.float32), "w")
    _add_model(c, "weight-dim-zero", _simple(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
        [_vi("x", [1, 8])], [_vi("y", [1, 0])], [empty_w]), "any",
        note="a zero-size output is degenerate but well defined (Resize's empty roi is real)")
    huge_w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    _add_model(c, "weight-dims-huge-no-data", _simple(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
        [_vi("x", [1, 1 << 20])], [_vi("y", [1, 1 << 20])], [huge_w]))
    cos = helper.make_node("ConstantOfShape", ["s"], ["c"], name="big_const")
    add2 = helper.make_node("Add", ["x", "c"], ["y"], name="add")
    _add_model(c, "constant-of-shape-huge", _simple(
        [cos, add2], [_vi("x", [1])], [_vi("y", None)],
        [numpy_helper.from_array(np.array([1 << 16, 1 << 16, 1 << 8], np.int64), "s")]))
    exp = helper.make_node("Expand", ["x", "s"], ["y"], name="expand")
    _add_model(c, "expand-huge", _simple(
        [exp], [_vi("x", [1, 1])], [_vi("y", None)],
        [numpy_helper.from_array(np.array([1 << 30, 1 << 30], np.int64), "s")]))
    _add_model(c, "reshape-negative", _simple(
        [rs], [_vi("x", [2, 3])], [_vi("y", None)],
        [numpy_helper.from_array(np.array([-5, 2], np.int64), "s")]))
    # ---- NaN / Inf weights
    for name in ("conv_bn_relu", "gemm", "matmul", "small_cnn", "depthwise"):
        for value, label in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "neg-inf")):
            m = copy.deepcopy(seeds[name])
            inits = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT
                     and len(t.dims) >= 2]
            target = inits[int(nprng.integers(len(inits)))]
            arr = numpy_helper.to_array(target).copy()
            arr.flat[int(nprng.integers(arr.size))] = value
            target.CopyFrom(numpy_helper.from_array(arr, target.name))
            _add_model(c, f"weight-{label}", m)
    m = copy.deepcopy(seeds["conv_bn_relu"])
    bn_var = next(t for t in m.graph.initializer if t.name == "bn.var")
    bn_var.CopyFrom(numpy_helper.from_array(np.full(8, np.nan, np.float32), "bn.var"))
    _add_model(c, "batchnorm-var-nan", m)
    # ---- attributes that make no sense
    for attrs, kind in (({"group": 0}, "conv-group-zero"), ({"group": 5}, "conv-group-bad"),
                        ({"strides": [0, 0]}, "conv-stride-zero"),
                        ({"strides": [-1, -1]}, "conv-stride-negative"),
                        ({"dilations": [0, 0]}, "conv-dilation-zero"),
                        ({"kernel_shape": [5, 5]}, "conv-kernel-shape-wrong"),
                        ({"kernel_shape": [0, 0]}, "conv-kernel-zero"),
                        ({"pads": [-4, -4, -4, -4]}, "conv-pads-negative"),
                        ({"pads": [1 << 30] * 4}, "conv-pads-huge"),
                        ({"pads": [1, 1]}, "conv-pads-short"),
                        ({"auto_pad": "SAME_SIDEWAYS"}, "conv-auto-pad-bad")):
        _add_model(c, kind, _conv_with(attrs))
    for op, attrs, kind in (("Softmax", {"axis": 99}, "softmax-axis"),
                            ("Flatten", {"axis": -99}, "flatten-axis"),
                            ("Transpose", {"perm": [0, 0]}, "transpose-perm-dup"),
                            ("Transpose", {"perm": [5, 1]}, "transpose-perm-range"),
                            ("MaxPool", {"kernel_shape": [0, 0]}, "maxpool-kernel-zero"),
                            ("MaxPool", {"kernel_shape": [9, 9]}, "maxpool-kernel-big"),
                            ("LeakyRelu", {"alpha": float("nan")}, "leakyrelu-alpha-nan")):
        shape = [1, 2, 4, 4] if op == "MaxPool" else [2, 3]
        node = helper.make_node(op, ["x"], ["y"], name=f"{op.lower()}_node", **attrs)
        _add_model(c, kind, _simple([node], [_vi("x", shape)], [_vi("y", None)]))
    gather = helper.make_node("Gather", ["d", "x"], ["y"], name="gather", axis=0)
    _add_model(c, "gather-indices-out-of-range", _simple(
        [gather], [_vi("x", [3], TensorProto.INT64)], [_vi("y", None)],
        [numpy_helper.from_array(_f32((4, 2), nprng), "d")]), "any",
        note="indices are runtime data: compiling is fine")
    gather_c = helper.make_node("Gather", ["d", "i"], ["y"], name="gather", axis=0)
    _add_model(c, "gather-const-indices-out-of-range", _simple(
        [gather_c], [_vi("x", [1])], [_vi("y", None)],
        [numpy_helper.from_array(_f32((4, 2), nprng), "d"),
         numpy_helper.from_array(np.array([1 << 40], np.int64), "i")]))
    # ---- graph structure: cycles, duplicates, dangling references, empty graphs
    r1 = helper.make_node("Relu", ["b"], ["a"], name="n1")
    r2 = helper.make_node("Relu", ["a"], ["b"], name="n2")
    _add_model(c, "cycle-two-nodes", _simple([r1, r2], [_vi("x", [1, 4])], [_vi("b", [1, 4])]))
    self_loop = helper.make_node("Add", ["x", "y"], ["y"], name="self_loop")
    _add_model(c, "cycle-self", _simple([self_loop], [_vi("x", [1, 4])], [_vi("y", [1, 4])]))
    m = copy.deepcopy(seeds["residual_block"])
    nodes = list(m.graph.node)
    nodes.reverse()
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _add_model(c, "nodes-reversed", m)
    m = copy.deepcopy(seeds["small_cnn"])
    m.graph.node[1].input[0] = m.graph.node[-1].output[0]
    _add_model(c, "cycle-back-edge", m)
    d1 = helper.make_node("Relu", ["x"], ["y"], name="d1")
    d2 = helper.make_node("Neg", ["x"], ["y"], name="d2")
    _add_model(c, "duplicate-output-name", _simple([d1, d2], [_vi("x", [1, 4])],
                                                   [_vi("y", [1, 4])]))
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input.append(copy.deepcopy(m.graph.input[0]))
    _add_model(c, "duplicate-input-name", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.initializer.append(copy.deepcopy(m.graph.initializer[0]))
    _add_model(c, "duplicate-initializer", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.initializer.append(numpy_helper.from_array(_f32((4, 32), nprng), "input"))
    _add_model(c, "initializer-shadows-input", m, "any")
    m = copy.deepcopy(seeds["gemm"])
    m.graph.node[0].input[0] = "no_such_tensor"
    _add_model(c, "dangling-input", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.output[0].name = "no_such_output"
    _add_model(c, "dangling-output", m)
    m = copy.deepcopy(seeds["gemm"])
    del m.graph.node[:]
    _add_model(c, "empty-graph", m)
    m = copy.deepcopy(seeds["gemm"])
    del m.graph.output[:]
    _add_model(c, "no-outputs", m)
    m = copy.deepcopy(seeds["gemm"])
    m.ClearField("graph")
    _add_model(c, "no-graph", m)
    c_node = helper.make_node("Constant", [], ["y"], name="const",
                              value=numpy_helper.from_array(_f32((2, 2), nprng)))
    _add_model(c, "no-inputs", _simple([c_node], [], [_vi("y", [2, 2])]))
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING
    _add_model(c, "input-string-type", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].type.tensor_type.elem_type = 0
    _add_model(c, "input-undefined-type", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].ClearField("type")
    _add_model(c, "input-no-type", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].name = ""
    _add_model(c, "input-empty-name", m)
    m = copy.deepcopy(seeds["gemm"])
    m.graph.input[0].name = "in\x00put"
    for node in m.graph.node:
        node.input[:] = ["in\x00put" if i == "input" else i for i in node.input]
    _add_model(c, "input-nul-name", m, "any", note="odd, but a name is only a key")
    m = copy.deepcopy(seeds["gemm"])
    m.graph.node[0].ClearField("input")
    _add_model(c, "node-no-inputs", m)
    m = copy.deepcopy(seeds["conv_bn_relu"])
    m.graph.node[0].input.extend(["x1", "x2", "x3"])
    _add_model(c, "node-too-many-inputs", m)


def _external_items(c: _Corpus, seeds: dict[str, onnx.ModelProto]):
    base = seeds["gemm"]
    weight_name = "fc1.weight"
    weight = next(t for t in base.graph.initializer if t.name == weight_name)
    nbytes = len(numpy_helper.to_array(weight).tobytes())

    def with_location(location, offset=None, length=None, write_file=None):
        m = copy.deepcopy(base)
        t = next(t for t in m.graph.initializer if t.name == weight_name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": location}
        if offset is not None:
            entries["offset"] = str(offset)
        if length is not None:
            entries["length"] = str(length)
        for key, value in entries.items():
            e = t.external_data.add()
            e.key, e.value = key, value
        return m

    def add(kind, model, setup=None):
        d, path = _add_model(c, f"external-{kind}", model)
        if setup:
            setup(d)

    secret = c.root / "corpus" / "outside-secret.bin"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(numpy_helper.to_array(weight).tobytes())
    add("dotdot", with_location("../outside-secret.bin"))
    add("dotdot-deep", with_location("sub/../../outside-secret.bin"))
    add("absolute", with_location(str(secret)))
    add("absolute-etc", with_location("/etc/passwd"))
    add("proc", with_location("/proc/self/environ"))
    add("missing", with_location("weights.bin"))
    add("empty-location", with_location(""))
    add("nul-in-location", with_location("weights\x00.bin"))
    add("dot", with_location("."))
    add("location-is-dir", with_location("subdir"), lambda d: (d / "subdir").mkdir())
    add("symlink-out", with_location("link.bin"),
        lambda d: os.symlink(secret, d / "link.bin"))
    add("symlink-dir-out", with_location("linkdir/outside-secret.bin"),
        lambda d: os.symlink(secret.parent, d / "linkdir"))
    data = numpy_helper.to_array(weight).tobytes()
    add("offset-past-end", with_location("w.bin", offset=1 << 20),
        lambda d: (d / "w.bin").write_bytes(data))
    add("length-too-long", with_location("w.bin", length=nbytes * 4),
        lambda d: (d / "w.bin").write_bytes(data))
    add("length-short", with_location("w.bin", length=8),
        lambda d: (d / "w.bin").write_bytes(data))
    add("file-short", with_location("w.bin"),
        lambda d: (d / "w.bin").write_bytes(data[:10]))
    add("negative-offset", with_location("w.bin", offset=-16),
        lambda d: (d / "w.bin").write_bytes(data))
    add("offset-not-number", with_location("w.bin", offset="abc"),
        lambda d: (d / "w.bin").write_bytes(data))
    add("fifo", with_location("w.fifo"), lambda d: os.mkfifo(d / "w.fifo"))


# --------------------------------------------------------------------------- npz items
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member dates: same seed, same bytes


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data)
    return buf.getvalue()


def _npz_bytes(allow_pickle=False, **arrays) -> bytes:
    """What np.savez writes, with fixed member dates."""
    members = {}
    for name, array in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=allow_pickle)
        members[f"{name}.npy"] = buf.getvalue()
    return _zip_bytes(members)


def _bad_npz_payloads(rng: np.random.Generator, shape=(4, 32)) -> dict[str, bytes]:
    """Bad data for a model with one float32 input 'input' of shape [4, 32]."""
    n = shape[0]
    good = rng.standard_normal((8, *shape[1:])).astype(np.float32)
    nan = good.copy()
    nan[3, 5] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"a": 1}, [1, 2]
    pickled = _npz_bytes(allow_pickle=True, input=obj)
    zip_garbage = _zip_bytes({"input.npy": b"not an npy header at all"})
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 32)})
    zip_huge = _zip_bytes({"input.npy": header.getvalue() + bytes(64)})
    good_bytes = _npz_bytes(input=good)
    return {
        "wrong-shape": _npz_bytes(input=rng.standard_normal((8, 31)).astype(np.float32)),
        "wrong-rank": _npz_bytes(input=rng.standard_normal((8, 32, 1)).astype(np.float32)),
        "wrong-dtype-f64": _npz_bytes(input=good.astype(np.float64)),
        "wrong-dtype-int": _npz_bytes(input=good.astype(np.int32)),
        "wrong-dtype-str": _npz_bytes(input=np.array(["a"] * 8)),
        "no-arrays": _npz_bytes(),
        "zero-samples": _npz_bytes(input=np.zeros((0, 32), np.float32)),
        "too-few-samples": _npz_bytes(input=good[: max(n - 1, 1)]),
        "scalar": _npz_bytes(input=np.float32(1.0)),
        "nan": _npz_bytes(input=nan),
        "inf": _npz_bytes(input=inf),
        "pickled-object": pickled,
        "wrong-name-two-arrays": _npz_bytes(a=good, b=good),
        "labels-count": _npz_bytes(input=good, labels=np.arange(3)),
        "labels-scalar": _npz_bytes(input=good, labels=np.int64(3)),
        "labels-2d": _npz_bytes(input=good, labels=np.zeros((8, 10), np.int64)),
        "labels-float-nan": _npz_bytes(input=good, labels=np.full(8, np.nan)),
        "labels-only": _npz_bytes(labels=np.arange(8)),
        "not-npz-text": b"input,1,2,3\n",
        "not-npz-random": bytes(rng.integers(0, 256, 2048, dtype=np.uint8)),
        "empty-file": b"",
        "truncated-zip": good_bytes[: len(good_bytes) // 2],
        "zip-member-garbage": zip_garbage,
        "zip-member-huge-shape": zip_huge,
        "npy-not-npz": _npy_bytes(good),
        "pickle-file": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    }


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _fake_artifact(directory: Path, lib_bytes: bytes | None = None, **overrides) -> Path:
    """A well-formed artifact directory (manifest + a lib.so that is never a real
    library). ``overrides`` replace top-level manifest keys."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    lib = lib_bytes if lib_bytes is not None else b"\x7fELF not really a library\n" * 8
    (directory / "lib.so").write_bytes(lib)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "qcompile_version": "0.1.0",
        "tvm_version": "0.27.0",
        "model": {"name": "gemm", "path": str(directory / "no-such-source.onnx"),
                  "sha256": "0" * 64, "opset": 17},
        "target": {"name": GOOD_TARGET, "arch": "x86_64", "tvm": {"kind": "llvm"}},
        "inputs": [{"name": "input", "shape": [4, 32], "dtype": "float32"}],
        "outputs": [{"name": "output", "shape": [4, 10], "dtype": "float32"}],
        "library": {"file": "lib.so", "sha256": hashlib.sha256(lib).hexdigest(),
                    "bytes": len(lib)},
        "quantization": {"mode": "none"},
        "tuning": {"log": None},
        "build_seconds": 0.1,
    }
    manifest.update(overrides)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _npz_items(c: _Corpus, seed: int):
    rng = np.random.default_rng(seed + 1)
    art_id = c.new_id("eval", "base-artifact")
    artifact = _fake_artifact(c.dir_for(art_id) / "artifact")
    for kind, payload in _bad_npz_payloads(rng).items():
        item_id = c.new_id("eval-npz", kind)
        path = c.dir_for(item_id) / "data.npz"
        path.write_bytes(payload)
        c.items.append(Item(item_id, "eval-npz", kind, str(path),
                            ["measure", str(artifact), "--data", str(path),
                             "--out", "{out}/report"], str(path)))
    for kind in ("missing", "directory"):
        item_id = c.new_id("eval-npz", kind)
        path = c.dir_for(item_id) / "data.npz"
        if kind == "directory":
            path.mkdir()
        c.items.append(Item(item_id, "eval-npz", kind, str(path),
                            ["measure", str(artifact), "--data", str(path),
                             "--out", "{out}/report"], str(path)))
    # calibration data: the same payloads through `compile --calib` (int8)
    model_id = c.new_id("calib", "base-model")
    model_path = c.dir_for(model_id) / "gemm.onnx"
    model_path.write_bytes(ob.gemm_model(seed).SerializeToString())
    calib_only = {  # data that is well formed but breaks calibration
        "overflow": _npz_bytes(input=np.full((8, 32), 3e38, np.float32)),
        "constant": _npz_bytes(input=np.zeros((8, 32), np.float32)),
        "denormal": _npz_bytes(input=np.full((8, 32), 1e-42, np.float32)),
    }
    for kind, payload in {**_bad_npz_payloads(rng), **calib_only}.items():
        if kind.startswith("labels"):
            continue
        item_id = c.new_id("calib-npz", kind)
        path = c.dir_for(item_id) / "calib.npz"
        path.write_bytes(payload)
        c.items.append(Item(item_id, "calib-npz", kind, str(path),
                            ["compile", str(model_path), "-o", "{out}/artifact",
                             "--quantize", "int8", "--calib", str(path)],
                            str(path), "any" if kind in ("too-few-samples", "constant",
                                                         "denormal") else "error",
                            needs="quantize",
                            note="calibration may use a partial batch, and a zero range is "
                                 "well defined" if kind in ("too-few-samples", "constant",
                                                            "denormal") else ""))


# --------------------------------------------------------------------------- tuning items
def _tuning_items(c: _Corpus, seed: int):
    model_id = c.new_id("tuning", "base-model")
    model_path = c.dir_for(model_id) / "gemm.onnx"
    model_path.write_bytes(ob.gemm_model(seed).SerializeToString())
    workload = json.dumps(["0x1234", ["tirx.PrimFunc", {}]])
    record = json.dumps([0, [[["SampleCategorical", [], [], []]], []], [0.001], None, None])
    other_target = json.dumps([0, [[], []], [0.001],
                               {"kind": "cuda", "arch": "sm_80", "keys": ["cuda", "gpu"]},
                               None])
    cases = {
        "torn-line": (workload + "\n", record + "\n" + record[: len(record) // 2]),
        "torn-workload": (workload[:10], ""),
        "wrong-json": (workload + "\n", "{not json}\n" + record + "\n"),
        "wrong-json-workload": ("[[[\n" + workload + "\n", record + "\n"),
        "json-object": ('{"a": 1}\n', '{"b": 2}\n'),
        "binary": (workload + "\n", "\x00\x01\x02\xff" * 8 + "\n" + record + "\n"),
        "single-garbage-line": ("\x00\x01\x02\xff" * 8, "\x00" * 32),
        "record-bad-workload-index": (workload + "\n", json.dumps([99, [[], []], [0.001],
                                                                   None, None]) + "\n"),
        "records-other-target": (workload + "\n", other_target + "\n"),
        "empty-files": ("", ""),
        "only-records": (None, record + "\n"),
        "only-workloads": (workload + "\n", None),
        "negative-latency": (workload + "\n", json.dumps([0, [[], []], [-1.0], None, None])
                             + "\n"),
        "nan-latency": (workload + "\n", '[0, [[], []], [NaN], null, null]\n'),
    }
    for kind, (wl, rec) in cases.items():
        item_id = c.new_id("tuning", kind)
        d = c.dir_for(item_id) / "tuning_log"
        d.mkdir()
        if wl is not None:
            (d / "database_workload.json").write_bytes(wl.encode("utf-8", "surrogatepass"))
        if rec is not None:
            (d / "database_tuning_record.json").write_bytes(rec.encode("utf-8",
                                                                       "surrogatepass"))
        # a torn *last* line is what a killed run leaves: dropped with a warning (the
        # documented fallback); so are foreign records and empty or one-sided databases
        expect = "any" if kind in ("records-other-target", "empty-files", "torn-line",
                                   "torn-workload", "single-garbage-line", "only-workloads",
                                   "only-records") else "error"
        c.items.append(Item(item_id, "tuning", kind, str(d),
                            ["compile", str(model_path), "-o", "{out}/artifact",
                             "--quantize", "none", "--tuning-log", str(d)],
                            str(d), expect, needs="tune",
                            note="a torn last line / foreign records may be skipped "
                                 "(documented fallback)" if expect == "any" else ""))
    for kind in ("missing-dir", "file-not-dir"):
        item_id = c.new_id("tuning", kind)
        d = c.dir_for(item_id) / "tuning_log"
        if kind == "file-not-dir":
            d.write_text("not a directory")
        c.items.append(Item(item_id, "tuning", kind, str(d),
                            ["compile", str(model_path), "-o", "{out}/artifact",
                             "--quantize", "none", "--tuning-log", str(d)],
                            str(d), needs="tune"))


# --------------------------------------------------------------------------- artifact items
def _artifact_items(c: _Corpus):
    import hashlib

    def add(kind, build, expect="error"):
        item_id = c.new_id("artifact", kind)
        d = c.dir_for(item_id) / "artifact"
        build(d)
        c.items.append(Item(item_id, "artifact", kind, str(d),
                            ["measure", str(d), "--out", "{out}/report"], str(d), expect))

    def tampered_lib(d):
        _fake_artifact(d)
        with open(d / "lib.so", "ab") as f:
            f.write(b"\x90")

    def swapped_lib(d):
        _fake_artifact(d)
        (d / "lib.so").write_bytes(b"\x7fELF a different library")

    def no_manifest(d):
        _fake_artifact(d)
        (d / "manifest.json").unlink()

    def no_lib(d):
        _fake_artifact(d)
        (d / "lib.so").unlink()

    def manifest_text(text):
        def build(d):
            _fake_artifact(d)
            (d / "manifest.json").write_bytes(text)
        return build

    def manifest_with(**overrides):
        def build(d):
            _fake_artifact(d, **overrides)
        return build

    def without(key):
        def build(d):
            _fake_artifact(d)
            m = json.loads((d / "manifest.json").read_text())
            del m[key]
            (d / "manifest.json").write_text(json.dumps(m))
        return build

    def library_entry(**entry):
        def build(d):
            _fake_artifact(d)
            m = json.loads((d / "manifest.json").read_text())
            m["library"].update(entry)
            (d / "manifest.json").write_text(json.dumps(m))
        return build

    def lib_outside(d):
        # ../x.so exists and its hash is in the manifest: it must still be refused
        _fake_artifact(d)
        outside = d.parent / "x.so"
        outside.write_bytes(b"\x7fELF outside")
        m = json.loads((d / "manifest.json").read_text())
        m["library"] = {"file": "../x.so", "sha256": hashlib.sha256(outside.read_bytes())
                        .hexdigest(), "bytes": outside.stat().st_size}
        (d / "manifest.json").write_text(json.dumps(m))

    def lib_symlink_out(d):
        _fake_artifact(d)
        outside = d.parent / "x.so"
        outside.write_bytes(b"\x7fELF outside")
        (d / "lib.so").unlink()
        os.symlink(outside, d / "lib.so")
        m = json.loads((d / "manifest.json").read_text())
        m["library"]["sha256"] = hashlib.sha256(outside.read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(m))

    def lib_is_dir(d):
        _fake_artifact(d)
        (d / "lib.so").unlink()
        (d / "lib.so").mkdir()

    def manifest_is_dir(d):
        _fake_artifact(d)
        (d / "manifest.json").unlink()
        (d / "manifest.json").mkdir()

    def garbage_lib_good_hash(d):
        _fake_artifact(d, lib_bytes=b"definitely not an ELF shared object\n" * 4)

    def partial_dir(d):
        # what an interrupted compile leaves: a .partial-* staging dir with only lib.so
        d.mkdir(parents=True)
        (d / "lib.so").write_bytes(b"\x7fELF half")

    add("lib-hash-mismatch", tampered_lib)
    add("lib-swapped", swapped_lib)
    add("missing-manifest", no_manifest)
    add("missing-lib", no_lib)
    add("manifest-garbage", manifest_text(bytes(range(256))))
    add("manifest-empty", manifest_text(b""))
    add("manifest-truncated", manifest_text(b'{"format": "qcompile-artifact/1", "libr'))
    add("manifest-list", manifest_text(b"[1, 2, 3]"))
    add("manifest-null", manifest_text(b"null"))
    add("manifest-deep-nesting", manifest_text(b"[" * 100000 + b"]" * 100000))
    add("manifest-wrong-format", manifest_with(format="qcompile-artifact/999"))
    for key in ("target", "inputs", "outputs", "library", "model"):
        add(f"manifest-no-{key}", without(key))
    add("library-dotdot", lib_outside)
    add("library-absolute", library_entry(file="/bin/ls"))
    add("library-subdir", library_entry(file="sub/lib.so"))
    add("library-not-string", library_entry(file=["lib.so"]))
    add("library-no-sha", library_entry(sha256=None))
    add("library-sha-int", library_entry(sha256=12345))
    add("library-symlink-out", lib_symlink_out)
    add("library-is-dir", lib_is_dir)
    add("manifest-is-dir", manifest_is_dir)
    add("library-entry-string", manifest_with(library="lib.so"))
    add("target-not-dict", manifest_with(target="x86_64-avx2"))
    add("target-name-path", manifest_with(target={"name": "/etc/passwd", "arch": "x86_64"}))
    add("target-name-dotdot", manifest_with(target={"name": "../../x.toml",
                                                    "arch": "x86_64"}))
    add("target-unknown", manifest_with(target={"name": "no-such-board", "arch": "x86_64"}))
    add("inputs-not-list", manifest_with(inputs="input"))
    add("inputs-entry-missing-keys", manifest_with(inputs=[{"name": "input"}]))
    add("inputs-shape-strings", manifest_with(inputs=[{"name": "input", "shape": "4x32",
                                                       "dtype": "float32"}]))
    add("inputs-shape-negative", manifest_with(inputs=[{"name": "input", "shape": [-4, 32],
                                                        "dtype": "float32"}]))
    add("inputs-dtype-bogus", manifest_with(inputs=[{"name": "input", "shape": [4, 32],
                                                     "dtype": "complex512"}]))
    add("inputs-empty", manifest_with(inputs=[]))
    add("outputs-not-list", manifest_with(outputs={"a": 1}))
    add("model-path-etc", manifest_with(model={"name": "x", "path": "/etc/passwd"}))
    add("model-not-dict", manifest_with(model="gemm.onnx"))
    add("quantization-not-dict", manifest_with(quantization="int8"))
    add("garbage-lib-good-hash", garbage_lib_good_hash)
    add("not-a-directory", lambda d: (d.parent.mkdir(parents=True, exist_ok=True),
                                      d.write_text("x")))
    add("missing-directory", lambda d: None)
    add("partial-staging-dir", partial_dir)


# --------------------------------------------------------------------------- target items
def _target_items(c: _Corpus, seed: int):
    model_id = c.new_id("target", "base-model")
    model_path = c.dir_for(model_id) / "gemm.onnx"
    model_path.write_bytes(ob.gemm_model(seed).SerializeToString())
    good = ('name = "bad-board"\narch = "x86_64"\nint8_intrinsic = "none"\n'
            'isa_features = []\n[tvm]\nkind = "llvm"\n')
    cases: dict[str, bytes | None] = {
        "not-toml": b"name = \n[[[",
        "binary": bytes(range(256)),
        "utf16": good.encode("utf-16"),
        "empty": b"",
        "missing-keys": b'name = "x"\n',
        "tvm-not-table": good.replace("[tvm]\nkind = \"llvm\"\n", 'tvm = "llvm"\n').encode(),
        "tvm-no-kind": good.replace('kind = "llvm"', 'mcpu = "znver3"').encode(),
        "tvm-kind-bogus": good.replace('kind = "llvm"', 'kind = "warp-drive"').encode(),
        "tvm-mcpu-int": (good + "mcpu = 5\n").encode(),
        "tvm-mattr-garbage": (good + 'mattr = ["+notafeature", 7]\n').encode(),
        "tvm-num-cores-negative": (good + "num-cores = -4\n").encode(),
        "num-cores-string": good.replace('isa_features = []',
                                         'isa_features = []\nnum_cores = "many"').encode(),
        "num-cores-zero": good.replace('isa_features = []',
                                       'isa_features = []\nnum_cores = 0').encode(),
        "num-cores-table": good.replace('isa_features = []',
                                        'isa_features = []\nnum_cores = {a = 1}').encode(),
        "isa-features-string": good.replace('isa_features = []',
                                            'isa_features = "avx2"').encode(),
        "isa-features-ints": good.replace('isa_features = []',
                                          'isa_features = [1, 2]').encode(),
        "host-not-table": good.replace('isa_features = []',
                                       'isa_features = []\nhost = "llvm"').encode(),
        "host-bogus-kind": (good + '[host]\nkind = "abacus"\n').encode(),
        "name-path": good.replace('"bad-board"', '"../../etc/passwd"').encode(),
        "name-empty": good.replace('"bad-board"', '""').encode(),
        "name-table": good.replace('name = "bad-board"', 'name = {a = 1}').encode(),
        "arch-bogus": good.replace('"x86_64"', '"z80"').encode(),
        "cross-compiler-missing": good.replace(
            'isa_features = []', 'isa_features = []\ncross_compiler = "no-such-g++-xyz"'
        ).encode(),
        "cross-compiler-false": good.replace(
            'isa_features = []', 'isa_features = []\ncross_compiler = "false"').encode(),
        "huge-int": good.replace('isa_features = []',
                                 'isa_features = []\nnum_cores = 99999999999999999999'
                                 ).encode(),
        "deep-nesting": b"a = " + b"[" * 50000 + b"]" * 50000 + b"\n",
        "missing": None,
        "directory": None,
    }
    for kind, payload in cases.items():
        item_id = c.new_id("target", kind)
        path = c.dir_for(item_id) / "board.toml"
        if kind == "directory":
            path.mkdir()
        elif payload is not None:
            path.write_bytes(payload)
        c.items.append(Item(item_id, "target", kind, str(path),
                            ["compile", str(model_path), "--target", str(path),
                             "-o", "{out}/artifact", "--quantize", "none"], str(path)))


# --------------------------------------------------------------------------- qdq items
def qdq_model(name: str, seed: int, work: Path) -> onnx.ModelProto:
    """A builder model quantized to QDQ by onnxruntime's quantize_static (per channel),
    calibrated on 4 seeded random inputs; needs onnxruntime."""
    import logging

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from onnxruntime import quantization

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing hints
    work.mkdir(parents=True, exist_ok=True)
    model = ob.BUILDERS[name](seed)
    src, dst = work / f"{name}.onnx", work / f"{name}_qdq.onnx"
    src.write_bytes(model.SerializeToString())
    feeds = [ob.random_inputs(model, seed=seed + i) for i in range(4)]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantization.quantize_static(str(src), str(dst), Reader(), per_channel=True,
                                 quant_format=quantization.QuantFormat.QDQ)
    return onnx.load(str(dst))


def _qdq_items(c: _Corpus, seed: int):
    """Already-quantized (QDQ) models with broken quantization parameters, through
    ``compile --quantize int8`` (the model's own scales: no calibration)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        from onnxruntime import quantization
    except ImportError:  # onnxruntime is a test dependency; without it, no QDQ items
        return
    work = c.root / "corpus" / "qdq-seeds"
    bases = {name: qdq_model(name, seed, work) for name in ("conv_bn_relu", "gemm")}

    def add(kind, model, expect="error"):
        item_id = c.new_id("qdq", kind)
        path = c.dir_for(item_id) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        c.items.append(Item(item_id, "qdq", kind, str(path),
                            ["compile", str(path), "-o", "{out}/artifact", "--quantize",
                             "int8"], str(path), expect))

    def with_inits(base, pick, change):
        m = copy.deepcopy(base)
        for t in m.graph.initializer:
            if pick(t.name):
                t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t).copy()),
                                                   t.name))
        return m

    for name, base in bases.items():
        for label, value in (("zero", 0.0), ("negative", -0.5), ("nan", np.nan),
                             ("inf", np.inf), ("denormal", 1e-45), ("huge", 3e38)):
            add(f"{name}-act-scale-{label}", with_inits(
                base, lambda n: n == "input_scale", lambda a, v=value: np.full_like(a, v)))
            add(f"{name}-weight-scale-{label}", with_inits(
                base, lambda n: n.endswith("weight_scale"),
                lambda a, v=value: np.full_like(a, v)))
        add(f"{name}-zero-point-int32", with_inits(
            base, lambda n: n == "input_zero_point", lambda a: a.astype(np.int32)))
        add(f"{name}-weight-zero-point-short", with_inits(
            base, lambda n: n.endswith("weight_zero_point"), lambda a: a[:-1]))
        add(f"{name}-weight-scale-short", with_inits(
            base, lambda n: n.endswith("weight_scale"), lambda a: a[:-1]))
        m = copy.deepcopy(base)
        for node in m.graph.node:
            for attr in node.attribute:
                if node.op_type == "DequantizeLinear" and attr.name == "axis":
                    attr.i = 7
        add(f"{name}-axis-out-of-range", m)
        m = copy.deepcopy(base)
        for node in m.graph.node:
            if node.op_type == "QuantizeLinear":
                node.op_type = "DequantizeLinear"
                break
        add(f"{name}-quantize-swapped", m)
        add(f"{name}-weights-wrapped", with_inits(
            base, lambda n: n.endswith("weight_quantized"), lambda a: (a.astype(np.int16) + 128).astype(a.dtype)),
            "any")


# --------------------------------------------------------------------------- option items
def _option_items(c: _Corpus, seed: int):
    """Bad option values on the command line (argparse or qcompile must say which)."""
    art_id = c.new_id("options", "base-artifact")
    artifact = _fake_artifact(c.dir_for(art_id) / "artifact")
    model_id = c.new_id("options", "base-model")
    model = c.dir_for(model_id) / "gemm.onnx"
    model.write_bytes(ob.gemm_model(seed).SerializeToString())
    measure = ["measure", str(artifact), "--out", "{out}/report"]
    compile_ = ["compile", str(model), "-o", "{out}/artifact", "--quantize", "none"]
    cases = [
        ("repeat-zero", measure + ["--repeat", "0"], "--repeat"),
        ("repeat-negative", measure + ["--repeat", "-3"], "--repeat"),
        ("repeat-text", measure + ["--repeat", "many"], "--repeat"),
        ("limit-zero", measure + ["--limit", "0"], "--limit"),
        ("limit-negative", measure + ["--limit", "-2"], "--limit"),
        ("threads-zero", measure + ["--threads", "0"], "--threads"),
        ("rpc-no-port", measure + ["--rpc", "nonsense"], "nonsense"),
        ("rpc-port-zero", measure + ["--rpc", "127.0.0.1:0"], "127.0.0.1:0"),
        ("rpc-port-huge", measure + ["--rpc", "127.0.0.1:99999"], "127.0.0.1:99999"),
        ("rpc-scheme", measure + ["--rpc", "http://127.0.0.1:9090"], "http://127.0.0.1:9090"),
        ("rpc-and-tracker", measure + ["--rpc", "127.0.0.1:9", "--rpc-tracker",
                                       "127.0.0.1:9", "--rpc-key", "k"], "--rpc"),
        ("tracker-nothing-there", measure + ["--rpc-tracker", "127.0.0.1:9"],
         "127.0.0.1:9"),
        ("input-shape-zero", compile_ + ["--input-shape", "input:4x0"], "input:4x0"),
        ("input-shape-no-name", compile_ + ["--input-shape", ":4x32"], ":4x32"),
        ("input-shape-text", compile_ + ["--input-shape", "input:axb"], "input:axb"),
        ("input-shape-unknown-input", compile_ + ["--input-shape", "nope:4x32"], "nope"),
        ("input-shape-wrong-rank", compile_ + ["--input-shape", "input:4x32x1"], "input"),
        ("input-shape-fixed-dim", compile_ + ["--input-shape", "input:5x32"], "input"),
        ("target-unknown", compile_ + ["--target", "no-such-target"], "no-such-target"),
        ("quantize-bogus", compile_[:-2] + ["--quantize", "int4"], "--quantize"),
    ]
    for kind, argv, names in cases:
        item_id = c.new_id("options", kind)
        c.items.append(Item(item_id, "options", kind, names, argv, names))


# --------------------------------------------------------------------------- report items
def _report_items(c: _Corpus):
    """Bad report.json files for ``qcompile report DIR`` (re-render)."""
    good = {"model": "m", "target": GOOD_TARGET, "device": "local", "emulated": False,
            "float": {"latency_ms": {"median": 1.0, "p90": 1.2, "count": 5, "threads": 2}},
            "int8": None, "reference": None, "quantization": None, "notes": [],
            "environment": {}}
    cases = {
        "garbage": bytes(range(256)),
        "empty": b"",
        "truncated": json.dumps(good).encode()[:40],
        "list": b"[1, 2, 3]",
        "null": b"null",
        "deep-nesting": b"[" * 100000 + b"]" * 100000,
        "missing-model": json.dumps({k: v for k, v in good.items() if k != "model"}).encode(),
        "float-section-string": json.dumps({**good, "float": "fast"}).encode(),
        "latency-string": json.dumps({**good, "float": {"latency_ms": "1 ms"}}).encode(),
        "latency-median-string": json.dumps(
            {**good, "float": {"latency_ms": {"median": "x", "count": 1}}}).encode(),
        "notes-not-list": json.dumps({**good, "notes": 5}).encode(),
        "environment-list": json.dumps({**good, "environment": [1, 2]}).encode(),
        "quantization-layers-garbage": json.dumps(
            {**good, "quantization": {"layers": [1, "x", {"sqnr_db": "loud"}]}}).encode(),
        "reference-latency-garbage": json.dumps(
            {**good, "reference": {"kind": "ort", "latency_ms": {"ort": "slow"}}}).encode(),
        "agreement-garbage": json.dumps(
            {**good, "int8": {"agreement": {"top1": "all", "cosine": [1]}}}).encode(),
        "accuracy-string": json.dumps({**good, "int8": {"accuracy": "high"}}).encode(),
        "nan-latency": json.dumps({**good, "float": {"latency_ms": {"median": float("nan"),
                                                                   "count": 1}}}).encode(),
    }
    for kind, payload in cases.items():
        item_id = c.new_id("report", kind)
        d = c.dir_for(item_id) / "report"
        d.mkdir()
        (d / "report.json").write_bytes(payload)
        c.items.append(Item(item_id, "report", kind, str(d / "report.json"),
                            ["report", str(d)], str(d)))
    for kind in ("no-report-json", "missing-dir"):
        item_id = c.new_id("report", kind)
        d = c.dir_for(item_id) / "report"
        if kind == "no-report-json":
            d.mkdir()
        c.items.append(Item(item_id, "report", kind, str(d), ["report", str(d)], str(d)))


# --------------------------------------------------------------------------- entry point
def generate(root: str | os.PathLike, seed: int = 0) -> list[Item]:
    """Write the whole corpus under ``root``; returns its items (same seed, same files)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    c = _Corpus(root, random.Random(seed))
    seeds = _seed_models(seed)
    _onnx_bytes_items(c, seeds)
    _onnx_structural_items(c, seeds, seed)
    _external_items(c, seeds)
    _npz_items(c, seed)
    _tuning_items(c, seed)
    _artifact_items(c)
    _target_items(c, seed)
    _report_items(c)
    _qdq_items(c, seed)
    _option_items(c, seed)
    (root / "corpus" / "index.json").write_text(json.dumps([i.to_dict() for i in c.items],
                                                           indent=1))
    return c.items


if __name__ == "__main__":  # python tests/bad_inputs.py DIR [SEED]
    import sys

    items = generate(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    by_cat: dict[str, int] = {}
    for it in items:
        by_cat[it.category] = by_cat.get(it.category, 0) + 1
    print(f"{len(items)} items in {sys.argv[1]}: {by_cat}")
