"""prepare: constants and BatchNorm folded, Gemm canonicalized, numerics unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLES, save_model
from onnx_builders import BUILDERS, random_inputs

from qcompile.frontend import import_onnx
from qcompile.quantize import _ir
from qcompile.quantize.plan import build_plan
from qcompile.quantize.prepare import prepare


def run(mod, feeds, inputs):
    """TVM's own default pipeline: these tests check prepare, not qcompile's schedules."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in inputs])
    return out.numpy()


def ops_of(mod):
    return [_ir.op_name(b.value) for b in _ir.main_bindings(mod["main"])]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prepare_models")
    return {name: (build(0), import_onnx(save_model(build(0), directory, name)))
            for name, build in BUILDERS.items()}


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual_block", "small_cnn", "depthwise",
                                  "gemm", "grouped_conv"])
def test_prepare_keeps_numerics(imported, name):
    model, m = imported[name]
    feeds = random_inputs(model, seed=3, batch=1)
    before = run(m.mod, feeds, m.inputs)
    after = run(prepare(m.mod), feeds, m.inputs)
    scale = max(1.0, float(np.abs(before).max()))
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * scale)


def test_onnx_clip_becomes_relax_clip(imported):
    _model, m = imported["depthwise"]
    ops = ops_of(prepare(m.mod))
    assert ops.count("relax.clip") == 2 and "relax.call_tir" not in ops


def test_batchnorm_folded_into_conv(imported):
    _model, m = imported["conv_bn_relu"]
    raw = ops_of(m.mod)
    assert "relax.divide" in raw or "relax.multiply" in raw  # the decomposed BatchNorm
    assert ops_of(prepare(m.mod)) == ["relax.nn.conv2d", "relax.add", "relax.nn.relu"]


def test_residual_block_both_bns_folded(imported):
    _model, m = imported["residual_block"]
    ops = ops_of(prepare(m.mod))
    assert ops.count("relax.nn.conv2d") == 2
    assert not {"relax.multiply", "relax.divide", "relax.subtract", "relax.sqrt"} & set(ops)


def test_gemm_canonical_matmul_with_constant_weight(imported):
    _model, m = imported["gemm"]
    prepared = prepare(m.mod)
    ops = ops_of(prepared)
    assert "relax.permute_dims" not in ops  # folded into the constant weight
    plan = build_plan(prepared, m.onnx_model)
    assert [(l.name, l.kind, l.weight.shape) for l in plan.layers] == \
        [("fc1", "matmul", (32, 16)), ("fc2", "matmul", (16, 10))]
    assert plan.layers[0].bias is not None and plan.layers[0].activation == ("relu",)


def test_plan_names_and_patterns(imported):
    _model, m = imported["small_cnn"]
    plan = build_plan(prepare(m.mod), m.onnx_model)
    assert [l.name for l in plan.layers] == ["stem", "dw", "pw", "conv2", "fc"]
    by = {l.name: l for l in plan.layers}
    assert by["dw"].activation == ("clip", 0.0, 6.0)
    assert by["dw"].call.attrs.groups == 16
    assert by["stem"].activation == ("relu",)
    # conv2's input comes through a max-pool: carried in int8 from its root
    assert [_ir.op_name(plan.producer[v].value) for v in by["conv2"].chain] == \
        ["relax.nn.max_pool2d"]


def test_plan_skip_by_name_and_op(imported):
    _model, m = imported["small_cnn"]
    prepared = prepare(m.mod)
    plan = build_plan(prepared, m.onnx_model, skip=("dw", "Gemm"))
    state = {l.name: l.quantize for l in plan.layers}
    assert state == {"stem": True, "dw": False, "pw": True, "conv2": True, "fc": False}


def test_bundled_model_prepare(bundled_model):
    m = import_onnx(bundled_model)
    prepared = prepare(m.mod)
    ops = ops_of(prepared)
    assert ops.count("relax.nn.conv2d") == 2 and ops.count("relax.matmul") == 2
    assert not {"relax.divide", "relax.sqrt", "relax.subtract"} & set(ops)
    x = np.load(EXAMPLES / "fashion_mnist_calib.npz")["input"][:1]
    feeds = {"input": x}
    before = run(m.mod, feeds, m.inputs)
    after = run(prepared, feeds, m.inputs)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * max(1, np.abs(before).max()))

