"""realize: real integer kernels, bit-exact integer arithmetic, every builder model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import EXAMPLES, save_model
from onnx_builders import BUILDERS, random_inputs, run_onnxruntime

from qcompile.frontend import import_onnx
from qcompile.pipeline import compile_relax, fuse
from qcompile.quantize import QuantConfig, quantize_model
from qcompile.quantize.realize import QParams, act_qparams, quantize_weight
from qcompile.target import get_target

# AVX2 is what CI machines have; never rely on VNNI being present.
SPEC = get_target("x86_64-avx2")


def vm_for(mod):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(compile_relax(mod, SPEC), tvm.cpu())


def run_vm(vm, *arrays):
    import tvm

    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


# ------------------------------------------------------------------- IR inspection
_PARAM = re.compile(r"(\w+): T\.Buffer\(\(.*?\), \"(\w+)\"\)")
_ALLOC = re.compile(r"(\w+) = T\.(?:sblock_)?alloc_buffer\(\((?:[^()]|\([^()]*\))*\)(?:, \"(\w+)\")?")
_ACCUM = re.compile(r"^\s*(\w+)\[[^\]]*\] = \1\[[^\]]*\] \+ (.*)$", re.M)
_LOAD = re.compile(r"(\w+)\[")


def accumulations(func_text: str):
    """(written buffer dtype, {dtypes of buffers read}) for each ``X[..] = X[..] + ...``."""
    dtypes = {name: dtype for name, dtype in _PARAM.findall(func_text)}
    dtypes.update({name: (dtype or "float32") for name, dtype in _ALLOC.findall(func_text)})
    out = []
    for target, expr in _ACCUM.findall(func_text):
        reads = {dtypes[b] for b in _LOAD.findall(expr) if b in dtypes}
        out.append((dtypes.get(target), reads))
    return out


@pytest.fixture(scope="module")
def bundled_int8(bundled_model, bundled_calib_data):
    imported = import_onnx(bundled_model)
    calib = [{"input": np.load(bundled_calib_data)["input"][:32]}]
    return imported, quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False),
                                    SPEC)


def test_fused_kernels_read_int8_accumulate_int32(bundled_int8):
    _imported, result = bundled_int8
    fused = fuse(result.mod, SPEC.tvm_target())
    kinds = {"conv2d": 0, "matmul": 0}
    for gv, func in fused.functions.items():
        name = gv.name_hint
        kind = "conv2d" if "conv2d" in name else "matmul" if "matmul" in name else None
        if kind is None:
            continue
        accs = accumulations(func.script())
        assert accs, f"{name}: no accumulation found"
        for written, reads in accs:
            assert written == "int32", f"{name} accumulates in {written}"
            assert reads and reads <= {"int8", "uint8"}, f"{name} reads {reads}"
        kinds[kind] += 1
    assert kinds == {"conv2d": 2, "matmul": 2}


def test_int8_between_layers_no_float_round_trip(bundled_int8):
    """conv -> relu -> maxpool -> conv and maxpool -> reshape -> gemm stay in int8."""
    _imported, result = bundled_int8
    text = result.mod.script(show_meta=False)
    assert re.search(r'R\.nn\.max_pool2d\(\w+_q,', text)
    assert text.count('R.nn.max_pool2d') == 2
    for line in text.splitlines():
        if "R.nn.max_pool2d" in line or "R.reshape(" in line:
            assert re.search(r'dtype="uint8"\) = R\.(nn\.max_pool2d|reshape)\(', line), line
    assert text.count("R.divide(") == 1  # the only float->int quantize is at the model input
    summary = result.summary
    assert [l["output"]["requantized"] for l in summary["layers"]] == [True, True, True, False]


# ------------------------------------------------------------- bit-exact kernels
def _conv_ref(x, w, stride, pad, groups):
    """int64 NCHW/OIHW grouped convolution, zero padding (pad = top, left, bottom, right)."""
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        ws = w[g * og:(g + 1) * og].astype(np.int64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def _int_conv_module(x_shape, x_dtype, w, stride, pad, groups):
    from tvm import relax

    from qcompile.quantize import _ir

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, x_dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, _ir.const(w, "int8"), strides=[stride, stride],
                                           padding=pad, groups=groups, out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("x_dtype, cin, cout, groups, stride, pad", [
    ("uint8", 16, 32, 1, 1, [1, 1, 1, 1]),
    ("uint8", 8, 16, 2, 2, [0, 0, 1, 1]),       # grouped, asymmetric pads
    ("uint8", 16, 16, 16, 1, [1, 1, 1, 1]),     # depthwise
    ("int8", 8, 8, 1, 1, [1, 1, 1, 1]),         # symmetric int8 activations
])
def test_integer_conv_bit_exact(x_dtype, cin, cout, groups, stride, pad):
    rng = np.random.default_rng(7)
    lo, hi = (0, 255) if x_dtype == "uint8" else (-128, 127)
    x = rng.integers(lo, hi + 1, size=(2, cin, 9, 9)).astype(x_dtype)
    x[0, :, 0, :] = hi  # saturating corners: the int16 pair-sum trap on AVX2
    qmax = 63 if SPEC.reduce_range else 127  # what realize produces for this target
    w = rng.integers(-qmax, qmax + 1, size=(cout, cin // groups, 3, 3)).astype(np.int8)
    w[0] = qmax
    vm = vm_for(_int_conv_module(x.shape, x_dtype, w, stride, pad, groups))
    got = run_vm(vm, x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, _conv_ref(x, w, stride, pad, groups))


@pytest.mark.parametrize("shape_x", [(5, 70), (2, 3, 64)])
def test_integer_matmul_bit_exact(shape_x):
    from tvm import relax

    from qcompile.quantize import _ir

    rng = np.random.default_rng(8)
    qmax = 63 if SPEC.reduce_range else 127
    x = rng.integers(0, 256, size=shape_x).astype(np.uint8)
    x.reshape(-1, shape_x[-1])[0] = 255
    w = rng.integers(-qmax, qmax + 1, size=(shape_x[-1], 24)).astype(np.int8)
    w[:, 0] = qmax
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(shape_x, "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(xv, _ir.const(w, "int8"), out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    got = run_vm(vm_for(bb.get()), x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))


# ------------------------------------------- one quantized layer vs numpy integer model
def test_quantized_conv_layer_matches_integer_reference(tmp_path):
    """conv+BN+relu with zp != 0 input (padding must be 'float zero'): the int8 module
    equals a numpy model of the same integer arithmetic (to one step where float32
    rounding of the requantize multiply lands on a .5 tie)."""
    model = BUILDERS["conv_bn_relu"](0)
    imported = import_onnx(save_model(model, tmp_path, "conv_bn_relu"))
    calib = [random_inputs(model, seed=s) for s in range(4)]
    # nearest rounding, so quantize_weight below gives the same codes
    result = quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False,
                                                         weight_rounding="nearest"), SPEC)
    layer = result.summary["layers"][0]
    p_in = layer["input"]
    assert p_in["zero_point"] not in (0, 255)  # really asymmetric
    feeds = random_inputs(model, seed=11)
    got = run_vm(vm_for(result.mod), feeds["input"])

    plan_layer = result.plan.layers[0]
    s_in, zp = np.float32(p_in["scale"]), p_in["zero_point"]
    q_x = np.clip(np.round(feeds["input"] / s_in) + zp, 0, 255).astype(np.int64)
    q_w, s_w = quantize_weight(plan_layer.weight, 0, True, SPEC.reduce_range)
    q_xp = np.pad(q_x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zp)
    acc = _conv_ref(q_xp, q_w, 1, [0, 0, 0, 0], 1)
    acc_scale = s_in * s_w
    bias_q = np.round(plan_layer.bias / acc_scale).astype(np.int64) \
        - zp * q_w.astype(np.int64).reshape(len(s_w), -1).sum(1)
    acc = acc + bias_q.reshape(1, -1, 1, 1)
    want = np.maximum(acc.astype(np.float32) * acc_scale.astype(np.float32).reshape(1, -1, 1, 1),
                      0)
    step = float(acc_scale.max())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=step * 1e-3)
    # and it is close to the float model
    ref = run_onnxruntime(model, feeds)[0]
    assert _sqnr(ref, got) > 30


def _sqnr(ref, got):
    ref = np.asarray(ref, np.float64)
    noise = np.sum((ref - np.asarray(got, np.float64)) ** 2)
    return 10 * np.log10(np.sum(ref ** 2) / max(noise, 1e-30))


def test_qparams_zero_exact_and_ranges():
    p = act_qparams(-0.81, 2.02, "uint8")
    assert 0 < p.zero_point < 255
    assert p.scale * (0 - p.zero_point) <= -0.81 + p.scale
    assert act_qparams(0.0, 5.0).zero_point == 0
    s = act_qparams(-1.0, 3.0, "int8")
    assert s.zero_point == 0 and s.scale == pytest.approx(3.0 / 127)
    assert act_qparams(0.0, 0.0) == QParams(1.0, 0, "uint8", 0, 255)
    tiny = act_qparams(-1e-40, 1e-39)  # denormal-sized data: a normal, finite scale
    assert np.isfinite(tiny.scale) and tiny.scale >= 1e-30 and 0 <= tiny.zero_point <= 255
    q, s = quantize_weight(np.full((2, 3), 1e-42, np.float32), 0)
    assert np.all(np.isfinite(s)) and np.all(s >= 1e-30)


def test_weight_quantization_per_channel_and_reduce_range():
    w = np.array([[1.0, -0.5], [0.01, 0.04]], np.float32)  # 2 output channels (axis 0)
    q, s = quantize_weight(w, 0, per_channel=True, reduce_range=False)
    assert q.tolist() == [[127, -64], [32, 127]]
    assert s.tolist() == pytest.approx([1.0 / 127, 0.04 / 127])
    q7, s7 = quantize_weight(w, 0, per_channel=True, reduce_range=True)
    assert np.abs(q7).max() == 63
    qt, st = quantize_weight(w, 0, per_channel=False)
    assert st[0] == st[1] and qt[1].tolist() == [1, 5]


# -------------------------------------------------------- every builder model, int8
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builder_models_int8_close_to_float(tmp_path, name):
    model = BUILDERS[name](0)
    imported = import_onnx(save_model(model, tmp_path, name))
    calib = [random_inputs(model, seed=s, batch=1) for s in range(8)]
    result = quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False), SPEC)
    assert result.summary["int8_layers"], "nothing was quantized"
    feeds = random_inputs(model, seed=99, batch=1)
    ref = run_onnxruntime(model, feeds)[0]
    vm = vm_for(result.mod)
    got = run_vm(vm, *[feeds[i.name] for i in imported.inputs])
    assert _sqnr(ref, got) > 22, f"{name}: SQNR {_sqnr(ref, got):.1f} dB"


def test_int8_activation_option(tmp_path):
    model = BUILDERS["small_cnn"](0)
    imported = import_onnx(save_model(model, tmp_path, "small_cnn"))
    calib = [random_inputs(model, seed=s, batch=1) for s in range(8)]
    result = quantize_model(imported, calib,
                            QuantConfig(act_dtype="int8", sqnr=False, progress=False), SPEC)
    assert all(l["input"]["dtype"] == "int8" and l["input"]["zero_point"] == 0
               for l in result.summary["layers"] if l["int8"])
    feeds = random_inputs(model, seed=99, batch=1)
    got = run_vm(vm_for(result.mod), feeds["input"])
    assert _sqnr(run_onnxruntime(model, feeds)[0], got) > 22


def test_fixed_point_requantize_matches_float_epilogue(tmp_path):
    from qcompile.quantize.realize import fixed_point

    m0, shift = fixed_point(np.array([0.3, 1e-4, 0.999]))
    assert np.all((m0 >= 2 ** 30) & (m0 < 2 ** 31))
    np.testing.assert_allclose(m0 * np.exp2(-shift.astype(float)), [0.3, 1e-4, 0.999], rtol=1e-9)
    model = BUILDERS["small_cnn"](0)
    imported = import_onnx(save_model(model, tmp_path, "small_cnn"))
    calib = [random_inputs(model, seed=s, batch=1) for s in range(4)]
    outs = {}
    for mode in ("float", "fixed"):
        result = quantize_model(imported, calib, QuantConfig(requant=mode, sqnr=False,
                                                             progress=False), SPEC)
        if mode == "fixed":
            assert "R.right_shift(" in result.mod.script(show_meta=False)
        outs[mode] = run_vm(vm_for(result.mod), random_inputs(model, seed=5, batch=1)["input"])
    # rounding differs only on exact .5 ties (half-up vs half-even): outputs agree closely
    np.testing.assert_allclose(outs["fixed"], outs["float"], atol=0.02, rtol=0)


def test_bias_correction_removes_mean_output_shift(tmp_path):
    """small_cnn's 3x3 depthwise weights (9 per channel) round coarsely: the mean
    output shift that causes is removed by bias correction."""
    import tvm
    from tvm import relax

    model = BUILDERS["small_cnn"](0)
    imported = import_onnx(save_model(model, tmp_path, "small_cnn"))
    calib = [random_inputs(model, seed=s, batch=1) for s in range(16)]
    tests = [random_inputs(model, seed=100 + s, batch=1) for s in range(16)]
    ref = np.concatenate([run_onnxruntime(model, f)[0] for f in tests])
    sqnr = {}
    for bc in (False, True):
        # nearest rounding: gptq (the default) already removes most of the shift
        result = quantize_model(imported, calib, QuantConfig(
            bias_correction=bc, sqnr=False, progress=False, weight_rounding="nearest"), SPEC)
        assert result.summary["bias_correction"] is bc
        vm = relax.VirtualMachine(compile_relax(result.mod, SPEC), tvm.cpu())
        got = np.concatenate([vm["main"](tvm.runtime.tensor(f["input"])).numpy()
                              for f in tests])
        sqnr[bc] = _sqnr(ref, got)
    assert sqnr[True] > sqnr[False] + 3, sqnr


def _concat_conv_model():
    """Two conv+relu branches -> Concat -> MaxPool -> Conv: the concat can run on int8."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, shape):
        fan_in = int(np.prod(shape[1:]))
        return numpy_helper.from_array((rng.normal(size=shape) * np.sqrt(2 / fan_in))
                                       .astype(np.float32), name)

    inits = [w("wa", (8, 4, 1, 1)), w("wb", (8, 4, 3, 3)), w("wc", (8, 16, 3, 3)),
             numpy_helper.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "ba")]
    nodes = [
        helper.make_node("Conv", ["input", "wa", "ba"], ["a"], name="branch_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["input", "wb"], ["b"], name="branch_b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Concat", ["ra", "rb"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["pool"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["pool", "wc"], ["output"], name="head", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "concat_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_concat_of_quantized_branches_runs_on_int8(tmp_path):
    model = _concat_conv_model()
    imported = import_onnx(save_model(model, tmp_path, "concat_conv"))
    calib = [random_inputs(model, seed=s) for s in range(8)]
    result = quantize_model(imported, calib, QuantConfig(sqnr=False, progress=False), SPEC)
    text = result.mod.script(show_meta=False)
    assert re.search(r'dtype="uint8"\) = R\.concat\(', text), text
    assert re.search(r'dtype="uint8"\) = R\.nn\.max_pool2d\(', text)
    # both branches requantize straight to the concat's scale
    outs = [l["output"] for l in result.summary["layers"][:2]]
    assert outs[0]["scale"] == outs[1]["scale"] and all(o["requantized"] for o in outs)
    feeds = random_inputs(model, seed=50)
    got = run_vm(vm_for(result.mod), feeds["input"])
    assert _sqnr(run_onnxruntime(model, feeds)[0], got) > 25


@pytest.mark.parametrize("field", ["fallback_search", "sensitivity", "weight_scale",
                                   "weight_rounding", "act_range", "requant"])
def test_quant_config_rejects_an_unknown_choice(field):
    from qcompile.errors import InputError

    with pytest.raises(InputError, match=rf"must be one of .*got 'no-such-choice'"):
        QuantConfig(**{field: "no-such-choice"}).validate()
