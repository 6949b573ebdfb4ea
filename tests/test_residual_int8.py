"""Residual adds in int8: the add (and the ReLU after it) runs in the producing conv's
epilogue, reading the residual in int8 -- one kernel, no float tensor between blocks."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from conftest import save_model
from onnx_builders import run_onnxruntime

from qcompile.frontend import import_onnx
from qcompile.pipeline import compile_relax, fuse
from qcompile.quantize import QuantConfig, quantize_model
from qcompile.quantize.realize import find_residual_adds, fixed_point, quantize_weight
from qcompile.target import get_target

# the realize module (the package re-exports a function under the same name)
R = sys.modules["qcompile.quantize.realize"]
SPEC = get_target("x86_64-avx2")
C, H = 8, 6


def _model(kind: str):
    """input -> conv+relu (x1) -> conv+relu -> conv -> add(., shortcut) [-> relu] -> [conv].

    kind: "basic"      ResNet basic block, identity shortcut, relu after the add, then a conv
          "inverted"   MobileNetV2: no relu after the add, then a conv
          "projection" ResNet downsample: the shortcut is a 1x1 conv of x1
          "last"       the block output is the model output (float epilogue)
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng({"basic": 0, "inverted": 1, "projection": 2, "last": 3}[kind])
    inits = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def conv(name, x, k, relu):
        w = rng.normal(size=(C, C, k, k)) * np.sqrt(2.0 / (C * k * k))
        nodes = [helper.make_node("Conv", [x, const(f"{name}_w", w),
                                           const(f"{name}_b", 0.1 * rng.normal(size=C))],
                                  [name], name=name, pads=[k // 2] * 4)]
        if relu:
            nodes.append(helper.make_node("Relu", [name], [name + "_r"], name=name + "_relu"))
        return nodes, name + "_r" if relu else name

    nodes, x1 = conv("conv1", "input", 3, relu=True)
    more, a = conv("conva", x1, 1 if kind == "inverted" else 3, relu=True)
    nodes += more
    more, y = conv("conv2", a, 3, relu=False)
    nodes += more
    shortcut = x1
    if kind == "projection":
        more, shortcut = conv("down", x1, 1, relu=False)
        nodes += more
    nodes.append(helper.make_node("Add", [y, shortcut], ["sum"], name="add"))
    block = "sum"
    if kind in ("basic", "projection", "last"):
        nodes.append(helper.make_node("Relu", ["sum"], ["block"], name="add_relu"))
        block = "block"
    if kind == "last":
        nodes.append(helper.make_node("Identity", [block], ["output"], name="out"))
    else:  # MobileNetV2's next block starts with a 1x1 conv
        more, out = conv("conv3", block, 1 if kind == "inverted" else 3, relu=False)
        nodes += more
        nodes.append(helper.make_node("Identity", [out], ["output"], name="out"))
    graph = helper.make_graph(
        nodes, f"residual_{kind}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, H, H])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, C, H, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _feeds(seed):
    return {"input": np.random.default_rng(seed).normal(size=(1, C, H, H)).astype(np.float32)}


def _quantize(tmp_path, kind, **config):
    model = _model(kind)
    imported = import_onnx(save_model(model, tmp_path, kind))
    calib = [_feeds(s) for s in range(8)]
    result = quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False, **config),
                            SPEC)
    return model, imported, result


def _run(mod, x, tuple_out=False):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(compile_relax(mod, SPEC), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    return [o.numpy() for o in out] if tuple_out else out.numpy()


def _sqnr(ref, got):
    ref = np.asarray(ref, np.float64)
    return 10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - got) ** 2), 1e-30))


def _kernels(result):
    fused = fuse(result.mod, SPEC.tvm_target())
    calls = fused["main"].script().count("call_tir")
    return fused, {gv.name_hint: f for gv, f in fused.functions.items()
                   if gv.name_hint != "main"}, calls


_PARAM = re.compile(r"\w+: T\.Buffer\(\(((?:T\.int64\(\d+\),? ?)+)\), \"(\w+)\"\)")


def _buffers(func):
    """(shape, dtype) of each buffer parameter of a fused PrimFunc (from its script)."""
    header = func.script().split("):\n", 1)[0]  # the def line with the parameters
    return [(tuple(int(d) for d in re.findall(r"\d+", dims.replace("int64", ""))), dtype)
            for dims, dtype in _PARAM.findall(header)]


# ------------------------------------------------------------------ one fused kernel
@pytest.mark.parametrize("kind, relu", [("basic", True), ("inverted", False)])
def test_residual_add_fuses_into_conv_kernel(tmp_path, kind, relu):
    _model_, _imp, result = _quantize(tmp_path, kind)
    residuals = find_residual_adds(result.float_mod["main"], result.plan)
    assert len(residuals) == 1
    _fused, kernels, calls = _kernels(result)
    # input quantize + conv1 + conva + conv2(+add) + conv3: no kernel of its own for the
    # add, the relu or a requantize
    assert calls == 5, sorted(kernels)
    res_kernels = [n for n in kernels if "conv2d" in n and "add" in n.split("multiply", 1)[-1]]
    assert len(res_kernels) == 1, sorted(kernels)
    name = res_kernels[0]
    assert "relu" not in name  # ReLU is the requantize clip's lower bound (zero point)
    assert name.endswith("cast") or "_cast" in name.rsplit("clip", 1)[-1]
    assert not [n for n in kernels if "conv2d" not in n and "add" in n and "pad" not in n]
    # the kernel reads the residual as uint8 [1, C, H, H] and writes uint8
    bufs = _buffers(kernels[name])
    assert bufs.count(((1, C, H, H), "uint8")) == 3, bufs  # conv input, residual, output
    assert all(dt != "float32" or shape != (1, C, H, H) for shape, dt in bufs), bufs
    record = next(l for l in result.summary["layers"] if "residual" in l)
    assert record["residual"]["int8"] is True and record["output"]["requantized"] is True
    assert record["activation"] == ("relu" if relu else None)


@pytest.mark.parametrize("kind", ["basic", "inverted"])
def test_residual_epilogue_runs_in_the_register_tile(tmp_path, kind):
    """The default schedule computes the whole residual epilogue (dequantize of the
    residual, add, requantize) in the conv's tile write-back: the kernel is the packing
    stage, the conv and its write-back, not one pass over memory per epilogue op."""
    import tvm

    from qcompile.pipeline import schedule_passes

    _m, _i, result = _quantize(tmp_path, kind)
    target = SPEC.tvm_target()
    fused, kernels, _calls = _kernels(result)
    (name,) = [n for n in kernels if "conv2d" in n and "add" in n.split("multiply", 1)[-1]]
    with target:
        sched = tvm.transform.Sequential(schedule_passes(SPEC, target, False))(fused)
    tir = sched[name].script()
    blocks = re.findall(r'T\.sblock\("(\w+)"\)', tir)
    assert not [b for b in blocks if re.match(r"(T_add|T_subtract|T_multiply|compute)", b)], \
        blocks
    assert blocks[-1].endswith("_global"), blocks  # the tile write-back is the last block


def test_no_float_add_of_dequantized_tensors(tmp_path):
    _m, _i, result = _quantize(tmp_path, "basic")
    text = result.mod.script(show_meta=False)
    # one float->int quantize (the model input); the add's operands are the int32
    # accumulator's scaled value and the int8 residual cast to float inside the epilogue
    assert text.count("R.divide(") == 1
    assert text.count("R.nn.relu(") == 0


# --------------------------------------------------------- integer arithmetic, numpy
def _conv_int(q, w, pad_value, k):
    """int64 NCHW conv, stride 1, 'same' padding with ``pad_value``."""
    p = k // 2
    q = np.pad(q.astype(np.int64), ((0, 0), (0, 0), (p, p), (p, p)), constant_values=pad_value)
    out = np.zeros((q.shape[0], w.shape[0], H, H), np.int64)
    for i in range(k):
        for j in range(k):
            out += np.einsum("nchw,oc->nohw", q[:, :, i:i + H, j:j + H],
                             w[:, :, i, j].astype(np.int64))
    return out


def _residual_case(tmp_path, requant):
    """(expected-output function, got int8 block output, inputs) for the basic block."""
    import tvm  # noqa: F401 - compile below

    _model_, _imp, result = _quantize(tmp_path, "basic", requant=requant)
    plan = result.plan
    (res,) = find_residual_adds(result.float_mod["main"], plan).values()
    layer = res.layer
    x1_var = res.other
    pa, p1, p2 = (result.qparams[v] for v in (layer.root, x1_var, res.final))
    mod, _ = R.realize(result.float_mod, plan, result.qparams, True, SPEC.reduce_range,
                       extra_outputs=[layer.root, x1_var, res.final], requant=requant)
    _out, *dqs = _run(mod, _feeds(21)["input"], tuple_out=True)
    # the dequantized int8 tensors give back their integers exactly
    qa, q1, q2 = (np.round(v / np.float32(p.scale)).astype(np.int64) + p.zero_point
                  for v, p in zip(dqs, (pa, p1, p2)))
    assert q1.min() >= 0 and q1.max() <= 255 and q2.min() >= p2.zero_point
    q_w, s_w = quantize_weight(layer.weight, 0, True, SPEC.reduce_range)
    acc_scale = pa.scale * s_w
    bias_q = np.round(layer.bias / acc_scale).astype(np.int64) \
        - pa.zero_point * q_w.astype(np.int64).reshape(C, -1).sum(1)
    acc = _conv_int(qa, q_w, pa.zero_point, 3) + bias_q.reshape(1, C, 1, 1)
    return acc, acc_scale, q1, p1, p2, q2


def test_residual_epilogue_matches_numpy_float_requantize(tmp_path):
    acc, acc_scale, q1, p1, p2, got = _residual_case(tmp_path, "float")
    m1 = (acc_scale / p2.scale).astype(np.float32).reshape(1, C, 1, 1)
    m2 = np.float32(p1.scale / p2.scale)
    accf = acc.astype(np.float32)
    r = (q1.astype(np.float32) - np.float32(p1.zero_point)) * m2
    plain = accf * m1 + r                                    # two float32 roundings
    fused = (accf.astype(np.float64) * m1.astype(np.float64) + r).astype(np.float32)  # FMA
    want = [np.clip(np.round(s) + p2.zero_point, p2.zero_point, 255).astype(np.int64)
            for s in (plain, fused)]
    ok = (got == want[0]) | (got == want[1])
    assert ok.all(), f"{np.sum(~ok)} elements differ from both roundings"
    assert np.mean(want[0] == want[1]) > 0.99  # the two roundings differ only on rare ties
    assert len(np.unique(got)) > 20  # a real range of values, not all clipped


def test_residual_epilogue_fixed_point_bit_exact(tmp_path):
    acc, acc_scale, q1, p1, p2, got = _residual_case(tmp_path, "fixed")
    m0, shift = fixed_point(acc_scale / p2.scale)
    m_r = np.round((p1.scale / p2.scale) * np.exp2(shift.astype(np.float64))).astype(np.int64)
    shape = (1, C, 1, 1)
    y = acc * m0.reshape(shape) + (q1 - p1.zero_point) * m_r.reshape(shape) \
        + (np.int64(1) << (shift - 1)).reshape(shape)
    want = np.clip((y >> shift.reshape(shape)) + p2.zero_point, p2.zero_point, 255)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------- other shapes of residual blocks
def test_projection_shortcut_adds_float_in_the_epilogue(tmp_path):
    model, _imp, result = _quantize(tmp_path, "projection")
    (res,) = find_residual_adds(result.float_mod["main"], result.plan).values()
    record = next(l for l in result.summary["layers"] if "residual" in l)
    assert record["residual"]["int8"] is False  # the 1x1 conv's output exists only in float
    _fused, kernels, calls = _kernels(result)
    assert calls == 6, sorted(kernels)  # quantize, conv1, conva, down, conv2(+add), conv3
    feeds = _feeds(5)
    got = _run(result.mod, feeds["input"])
    assert _sqnr(run_onnxruntime(model, feeds)[0], got) > 25


def test_block_output_to_float_consumer(tmp_path):
    model, _imp, result = _quantize(tmp_path, "last")
    _fused, kernels, calls = _kernels(result)
    assert calls == 4, sorted(kernels)  # quantize, conv1, conva, conv2(+add+relu, float out)
    record = next(l for l in result.summary["layers"] if "residual" in l)
    assert record["output"]["requantized"] is False and record["residual"]["int8"] is True
    feeds = _feeds(6)
    got = _run(result.mod, feeds["input"])
    assert got.min() >= 0  # the relu after the add
    assert _sqnr(run_onnxruntime(model, feeds)[0], got) > 25


@pytest.mark.parametrize("kind", ["basic", "inverted", "projection"])
def test_residual_models_close_to_float(tmp_path, kind):
    model, _imp, result = _quantize(tmp_path, kind)
    feeds = _feeds(7)
    assert _sqnr(run_onnxruntime(model, feeds)[0], _run(result.mod, feeds["input"])) > 25


def test_sqnr_report_reads_the_fused_layers_own_output(tmp_path):
    """The per-layer SQNR asks for conv2's output before the add, which the fused
    kernel never stores: realize computes it for the measuring module only."""
    model = _model("basic")
    imported = import_onnx(save_model(model, tmp_path, "basic"))
    result = quantize_model(imported, [_feeds(s) for s in range(8)],
                            QuantConfig(sqnr=True, progress=False), SPEC)
    sqnr = {l["name"]: l["sqnr_db"] for l in result.summary["layers"]}
    assert set(sqnr) == {"conv1", "conva", "conv2", "conv3"}
    assert all(isinstance(v, float) and v > 20 for v in sqnr.values()), sqnr


def test_float_residual_option_keeps_the_stream_in_float(tmp_path):
    model, _imp, result = _quantize(tmp_path, "basic")
    mod, records = R.realize(result.float_mod, result.plan, result.qparams, True,
                             SPEC.reduce_range, int8_residual=False)
    assert not any("residual" in r for r in records)
    text = mod.script(show_meta=False)
    # the add and its ReLU in float, then a float -> uint8 quantize of the block output
    assert text.count("R.nn.relu(") == 1 and text.count("R.divide(") == 2
    feeds = _feeds(8)
    assert _sqnr(run_onnxruntime(model, feeds)[0], _run(mod, feeds["input"])) > 25
