"""Dynamic quantization: matmul layers with activation scales computed at run time."""

from __future__ import annotations

import json

import numpy as np

from conftest import save_model
from onnx_builders import BUILDERS, random_inputs, run_onnxruntime

from qcompile.frontend import import_onnx
from qcompile.pipeline import compile_relax
from qcompile.quantize import QuantConfig, quantize_model
from qcompile.target import get_target

SPEC = get_target("x86_64-avx2")


def test_dynamic_matmul_no_calibration(tmp_path):
    import tvm
    from tvm import relax

    model = BUILDERS["matmul"](0)
    imported = import_onnx(save_model(model, tmp_path, "matmul"))
    calib = [random_inputs(model, seed=s) for s in range(2)]  # only for the SQNR report
    result = quantize_model(imported, calib, QuantConfig(dynamic=True, progress=False), SPEC)
    summary = result.summary
    json.dumps(summary)
    assert summary["method"] == "dynamic" and summary["int8_layers"] == ["mm1", "mm2"]
    assert summary["output_sqnr_db"] > 25
    text = result.mod.script(show_meta=False)
    assert text.count('out_dtype="int32"') == 2 and "R.max(" in text and "R.min(" in text
    vm = relax.VirtualMachine(compile_relax(result.mod, SPEC), tvm.cpu())
    for seed, scale in ((4, 1.0), (5, 30.0)):  # scales follow each input's own range
        feeds = {"input": (random_inputs(model, seed=seed)["input"] * scale).astype(np.float32)}
        ref = run_onnxruntime(model, feeds)[0]
        got = vm["main"](tvm.runtime.tensor(feeds["input"])).numpy()
        sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
        assert sqnr > 25, f"scale {scale}: {sqnr:.1f} dB"


def test_dynamic_leaves_convolutions_float(tmp_path):
    model = BUILDERS["small_cnn"](0)
    imported = import_onnx(save_model(model, tmp_path, "small_cnn"))
    result = quantize_model(imported, None, QuantConfig(dynamic=True, progress=False), SPEC)
    assert result.summary["int8_layers"] == ["fc"]
    assert result.summary["float_layers"] == ["stem", "dw", "pw", "conv2"]
