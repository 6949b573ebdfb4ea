"""Small float ONNX models built in memory, for tests of the importer and the quantizer.

Every builder returns an ``onnx.ModelProto`` with seeded random weights, opset 17,
``ir_version = 8`` (onnxruntime 1.31 refuses newer IR) and static shapes (except
``dynamic_batch_model``). Each passes ``onnx.checker.check_model(full_check=True)``
and runs in onnxruntime, except ``unsupported_op_model``, which is meant to be
rejected. Nodes carry readable names so that error messages can be checked.

Typical use::

    from onnx_builders import all_models, random_inputs, run_onnxruntime

    for name, model in all_models().items():
        feeds = random_inputs(model, seed=0)
        expected = run_onnxruntime(model, feeds)

Weights use He-style scaling so activations stay O(1) through the graph; that
keeps int8 quantization error meaningful rather than dominated by blow-ups.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
FLOAT = TensorProto.FLOAT


# --------------------------------------------------------------------------- helpers
class _Graph:
    """Collects nodes and initializers; hands out unique tensor names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        return self.const(name, w.astype(np.float32))

    def bias(self, name: str, n: int) -> str:
        return self.const(name, (0.1 * self.rng.standard_normal(n)).astype(np.float32))

    # ---- layers
    def conv(self, x: str, name: str, cin: int, cout: int, k: int, *, stride: int = 1,
             pads: list[int] | None = None, group: int = 1, bias: bool = True) -> str:
        """Conv with weight [cout, cin/group, k, k]; default padding keeps 'same' size at stride 1."""
        if pads is None:
            pads = [k // 2] * 4
        inputs = [x, self.weight(f"{name}.weight", (cout, cin // group, k, k), cin // group * k * k)]
        if bias:
            inputs.append(self.bias(f"{name}.bias", cout))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=pads, group=group, dilations=[1, 1])

    def batchnorm(self, x: str, name: str, c: int) -> str:
        r = self.rng
        inputs = [
            x,
            self.const(f"{name}.scale", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.const(f"{name}.bias", (0.1 * r.standard_normal(c)).astype(np.float32)),
            self.const(f"{name}.mean", (0.1 * r.standard_normal(c)).astype(np.float32)),
            self.const(f"{name}.var", r.uniform(0.5, 1.5, c).astype(np.float32)),
        ]
        return self.node("BatchNormalization", inputs, name, epsilon=1e-5)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        """Clip(min=0, max=6); opset >= 11 takes min/max as (scalar) inputs."""
        lo = self.const(f"{name}.min", np.array(0.0, np.float32))
        hi = self.const(f"{name}.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, lo, hi], name)

    def gemm(self, x: str, name: str, k: int, n: int) -> str:
        """Gemm with transB=1: weight stored [n, k] like torch.nn.Linear."""
        w = self.weight(f"{name}.weight", (n, k), k)
        return self.node("Gemm", [x, w, self.bias(f"{name}.bias", n)], name,
                         alpha=1.0, beta=1.0, transB=1)


def _model(g: _Graph, name: str, inputs: list[tuple[str, list]], outputs: list[tuple[str, str, list]],
           opsets: list[tuple[str, int]] | None = None, check: bool = True) -> onnx.ModelProto:
    """Wrap a _Graph. inputs: (name, shape); outputs: (graph output name, producing tensor, shape)."""
    nodes = list(g.nodes)
    out_infos = []
    for out_name, tensor, shape in outputs:
        # Rename the producing node's output (and any later uses) to the graph output name.
        for node in nodes:
            node.output[:] = [out_name if o == tensor else o for o in node.output]
            node.input[:] = [out_name if i == tensor else i for i in node.input]
        out_infos.append(helper.make_tensor_value_info(out_name, FLOAT, shape))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
        out_infos,
        initializer=g.inits,
    )
    opset_imports = [helper.make_opsetid("", OPSET)]
    opset_imports += [helper.make_opsetid(d, v) for d, v in (opsets or [])]
    model = helper.make_model(graph, opset_imports=opset_imports,
                              producer_name="qcompile tests/onnx_builders.py")
    model.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


# -------------------------------------------------------------------------- builders
def conv_bn_relu_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, 3x3, pad 1, bias) -> BatchNormalization -> Relu. [1,3,16,16] -> [1,8,16,16]."""
    g = _Graph(seed)
    y = g.conv("input", "conv", 3, 8, 3)
    y = g.batchnorm(y, "bn", 8)
    y = g.relu(y, "relu")
    return _model(g, "conv_bn_relu", [("input", [1, 3, 16, 16])], [("output", y, [1, 8, 16, 16])])


def residual_block_model(seed: int = 0) -> onnx.ModelProto:
    """ResNet basic block: (Conv+BN+Relu, Conv+BN) + identity, Add, Relu. [1,8,16,16] -> same."""
    g = _Graph(seed)
    y = g.relu(g.batchnorm(g.conv("input", "conv1", 8, 8, 3, bias=False), "bn1", 8), "relu1")
    y = g.batchnorm(g.conv(y, "conv2", 8, 8, 3, bias=False), "bn2", 8)
    y = g.node("Add", [y, "input"], "add")
    y = g.relu(y, "relu2")
    return _model(g, "residual_block", [("input", [1, 8, 16, 16])], [("output", y, [1, 8, 16, 16])])


def depthwise_model(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style: 1x1 expand (8->16) + Clip(0,6), depthwise 3x3 stride 2 (group 16)
    + Clip(0,6), 1x1 project (16->8). [1,8,16,16] -> [1,8,8,8]."""
    g = _Graph(seed)
    y = g.relu6(g.conv("input", "expand", 8, 16, 1), "expand_relu6")
    y = g.relu6(g.conv(y, "depthwise", 16, 16, 3, stride=2, group=16), "depthwise_relu6")
    y = g.conv(y, "project", 16, 8, 1)
    return _model(g, "depthwise", [("input", [1, 8, 16, 16])], [("output", y, [1, 8, 8, 8])])


def grouped_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Grouped conv (8->16, group 2, 3x3, stride 2, asymmetric pads [0,0,1,1]) + Relu.
    [1,8,15,15] -> [1,16,7,7]."""
    g = _Graph(seed)
    y = g.conv("input", "grouped", 8, 16, 3, stride=2, pads=[0, 0, 1, 1], group=2)
    y = g.relu(y, "relu")
    return _model(g, "grouped_conv", [("input", [1, 8, 15, 15])], [("output", y, [1, 16, 7, 7])])


def gemm_model(seed: int = 0) -> onnx.ModelProto:
    """Two Gemm layers (transB=1, with bias), Relu between. [4,32] -> [4,10]."""
    g = _Graph(seed)
    y = g.relu(g.gemm("input", "fc1", 32, 16), "relu")
    y = g.gemm(y, "fc2", 16, 10)
    return _model(g, "gemm", [("input", [4, 32])], [("output", y, [4, 10])])


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    """Transformer-style linear layers on a 3-D input: MatMul [32->16] + Add bias + Relu,
    MatMul [16->8]. [2,8,32] -> [2,8,8]."""
    g = _Graph(seed)
    y = g.node("MatMul", ["input", g.weight("mm1.weight", (32, 16), 32)], "mm1")
    y = g.node("Add", [y, g.bias("mm1.bias", 16)], "mm1_bias")
    y = g.relu(y, "relu")
    y = g.node("MatMul", [y, g.weight("mm2.weight", (16, 8), 16)], "mm2")
    return _model(g, "matmul", [("input", [2, 8, 32])], [("output", y, [2, 8, 8])])


def concat_pool_model(seed: int = 0) -> onnx.ModelProto:
    """Two conv branches (1x1 and 3x3, 4->8 each, Relu) -> Concat(axis 1) -> MaxPool 2x2/2
    -> AveragePool 3x3/1 pad 1 (count_include_pad=1) -> GlobalAveragePool -> Flatten.
    [1,4,16,16] -> [1,16]."""
    g = _Graph(seed)
    a = g.relu(g.conv("input", "branch_a", 4, 8, 1), "relu_a")
    b = g.relu(g.conv("input", "branch_b", 4, 8, 3), "relu_b")
    y = g.node("Concat", [a, b], "concat", axis=1)
    y = g.node("MaxPool", [y], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    y = g.node("AveragePool", [y], "avgpool", kernel_shape=[3, 3], strides=[1, 1],
               pads=[1, 1, 1, 1], count_include_pad=1)
    y = g.node("GlobalAveragePool", [y], "gap")
    y = g.node("Flatten", [y], "flatten", axis=1)
    return _model(g, "concat_pool", [("input", [1, 4, 16, 16])], [("output", y, [1, 16])])


def small_cnn_model(seed: int = 0) -> onnx.ModelProto:
    """A small image classifier using most ops above. [1,3,32,32] -> probabilities [1,10].

    Conv 3x3/2 + BN + Relu (3->16), depthwise 3x3 + Clip(0,6), 1x1 conv + residual Add
    + Relu, MaxPool 2, Conv 3x3 (16->32) + Relu, AveragePool 2, Reshape [1,512],
    Gemm (transB=1) -> Softmax."""
    g = _Graph(seed)
    y = g.relu(g.batchnorm(g.conv("input", "stem", 3, 16, 3, stride=2), "stem_bn", 16), "stem_relu")
    r = g.relu6(g.conv(y, "dw", 16, 16, 3, group=16), "dw_relu6")
    r = g.conv(r, "pw", 16, 16, 1)
    y = g.relu(g.node("Add", [y, r], "residual_add"), "residual_relu")
    y = g.node("MaxPool", [y], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    y = g.relu(g.conv(y, "conv2", 16, 32, 3), "conv2_relu")
    y = g.node("AveragePool", [y], "avgpool", kernel_shape=[2, 2], strides=[2, 2])
    y = g.node("Reshape", [y, g.const("reshape.shape", np.array([1, 512], np.int64))], "reshape")
    y = g.gemm(y, "fc", 512, 10)
    y = g.node("Softmax", [y], "softmax", axis=1)
    return _model(g, "small_cnn", [("input", [1, 3, 32, 32])], [("output", y, [1, 10])])


def dynamic_batch_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(3->8, 3x3, pad 1) + Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4).
    Input [batch,3,8,8] with a dim_param 'batch'; output [batch,4]."""
    g = _Graph(seed)
    y = g.relu(g.conv("input", "conv", 3, 8, 3), "relu")
    y = g.node("GlobalAveragePool", [y], "gap")
    y = g.node("Flatten", [y], "flatten", axis=1)
    y = g.gemm(y, "fc", 8, 4)
    return _model(g, "dynamic_batch", [("input", ["batch", 3, 8, 8])], [("output", y, ["batch", 4])])


def unsupported_op_model(seed: int = 0) -> onnx.ModelProto:
    """Relu -> a made-up op 'FancyOp' in domain 'com.example' (node name 'fancy_node') -> Relu.
    [1,4] -> [1,4]. Passes onnx.checker (unknown domains are not schema-checked) but
    no runtime can execute it: importers should fail naming 'fancy_node' and 'FancyOp'."""
    g = _Graph(seed)
    y = g.relu("input", "relu_in")
    y = g.node("FancyOp", [y], "fancy_node", domain="com.example", alpha=0.5)
    y = g.relu(y, "relu_out")
    model = _model(g, "unsupported_op", [("input", [1, 4])], [("output", y, [1, 4])],
                   opsets=[("com.example", 1)], check=False)
    onnx.checker.check_model(model)  # full_check's shape inference cannot type FancyOp
    return model


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "conv_bn_relu": conv_bn_relu_model,
    "residual_block": residual_block_model,
    "depthwise": depthwise_model,
    "grouped_conv": grouped_conv_model,
    "gemm": gemm_model,
    "matmul": matmul_model,
    "concat_pool": concat_pool_model,
    "small_cnn": small_cnn_model,
}


def all_models(seed: int = 0) -> dict[str, onnx.ModelProto]:
    """The static-shape float models above, name -> model. Excludes dynamic_batch_model
    and unsupported_op_model, which test specific importer paths."""
    return {name: build(seed) for name, build in BUILDERS.items()}


# --------------------------------------------------------------------------- running
def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for every graph input that is not an initializer.
    Symbolic dims (dim_param) are set to ``batch``."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        ttype = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in ttype.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model in onnxruntime (CPU, one thread); returns the outputs in graph order."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
