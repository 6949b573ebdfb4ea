"""QDQ models (ONNX Runtime quantize_static, QDQ format) compile to real int8 kernels."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import save_model
from onnx_builders import BUILDERS, random_inputs

from qcompile.errors import UnsupportedOpError
from qcompile.frontend import import_onnx
from qcompile.pipeline import compile_relax
from qcompile.quantize import QuantConfig, quantize_model
from qcompile.target import get_target

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

SPEC = get_target("x86_64-avx2")


def ort_quantize(src, dst, feeds, fmt="QDQ"):
    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    quantization.quantize_static(str(src), str(dst), Reader(),
                                 quant_format=getattr(quantization.QuantFormat, fmt),
                                 per_channel=True)


def ort_run(path, feeds, optimize=True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def run_int8(mod, arrays):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(compile_relax(mod, SPEC), tvm.cpu())
    return [vm["main"](*[tvm.runtime.tensor(a) for a in arr]).numpy() for arr in arrays]


def assert_all_int8(mod, layers):
    text = mod.script(show_meta=False)
    convs = re.findall(r"R\.nn\.conv2d\(.*", text)
    mms = re.findall(r"R\.matmul\(.*", text)
    assert len(convs) + len(mms) == layers
    assert all('out_dtype="int32"' in line for line in convs + mms)
    assert "R.quantize(" not in text and "R.dequantize(" not in text


@pytest.fixture(scope="module")
def bundled_qdq(tmp_path_factory, bundled_model, bundled_calib_data):
    path = tmp_path_factory.mktemp("qdq") / "fashion_qdq.onnx"
    x = np.load(bundled_calib_data)["input"]
    ort_quantize(bundled_model, path, [{"input": x[i:i + 32]} for i in range(0, 128, 32)])
    return path


def test_ort_qdq_model_runs_as_real_int8(bundled_qdq, bundled_test_data):
    imported = import_onnx(bundled_qdq)
    result = quantize_model(imported, None, QuantConfig(progress=False), SPEC)  # no calibration
    summary = result.summary
    assert summary["method"] == "qdq"
    assert summary["int8_layers"] == ["/0/Conv", "/4/Conv", "/9/Gemm", "/11/Gemm"]
    assert all(l["weight"]["from_model"] and l["weight"]["bits"] == 8 for l in summary["layers"])
    assert_all_int8(result.mod, 4)

    x = np.load(bundled_test_data)["input"][:300]
    expected = ort_run(bundled_qdq, {"input": x})
    got = np.concatenate(run_int8(result.mod, [[x[i:i + 1]] for i in range(len(x))]))
    # one quantization step of the logits (the model quantizes its output)
    step = summary["layers"][-1]["output"]["scale"]
    within = np.abs(got - expected) <= step * 1.001
    assert within.mean() >= 0.99, f"only {within.mean():.4f} within one step"
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.995


@pytest.mark.parametrize("name", ["residual_block", "depthwise", "matmul"])
def test_qdq_builder_models_equal_their_fake_quant_semantics(tmp_path, name):
    model = BUILDERS[name](0)
    src = save_model(model, tmp_path, name)
    dst = tmp_path / f"{name}_qdq.onnx"
    ort_quantize(src, dst, [random_inputs(model, seed=s, batch=1) for s in range(8)])
    imported = import_onnx(dst)
    result = quantize_model(imported, None, QuantConfig(progress=False), SPEC)
    assert result.summary["float_layers"] == []
    feeds = random_inputs(model, seed=42, batch=1)
    expected = ort_run(dst, feeds, optimize=False)  # the QDQ graph as ONNX defines it
    got = run_int8(result.mod, [[feeds[i.name] for i in imported.inputs]])[0]
    out_scale = [t["scale"] for t in result.summary["tensors"].values()]
    step = max(out_scale)
    assert np.mean(np.abs(got - expected) <= 1e-6 + 1e-3 * step) >= 0.99


def test_qoperator_model_rejected_with_qdq_hint(tmp_path):
    model = BUILDERS["conv_bn_relu"](0)
    src = save_model(model, tmp_path, "conv_bn_relu")
    dst = tmp_path / "qop.onnx"
    ort_quantize(src, dst, [random_inputs(model, seed=s) for s in range(2)], fmt="QOperator")
    with pytest.raises(UnsupportedOpError, match=r"QLinearConv.*QDQ"):
        import_onnx(dst)
