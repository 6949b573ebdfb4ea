"""Cross-layer equalization: the float function is unchanged, ranges become equal."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from conftest import EXAMPLES, save_model
from onnx_builders import BUILDERS, random_inputs

from qcompile.errors import InputError
from qcompile.frontend import import_onnx
from qcompile.quantize import QuantConfig, _ir, quantize_model
from qcompile.quantize.cli_options import add_arguments, config_from_args
from qcompile.quantize.calibrate import CalibrationData
from qcompile.quantize.equalize import (_in_ranges, _out_ranges, channel_ranges, equalize,
                                        find_pairs)
from qcompile.quantize.prepare import prepare
from qcompile.target import get_target

# builder -> equalizable pairs: depthwise: expand->dw, dw->project (both through ReLU6);
# gemm / matmul: fc1 -(relu)-> fc2; residual_block: conv1 -(relu)-> conv2 (conv2 feeds
# the residual add: no further pair); small_cnn: dw -(relu6)-> pw and conv2 -(relu,
# avgpool, reshape)-> fc (the stem output has two users); grouped_conv: one layer.
PAIRS = {"depthwise": 2, "gemm": 1, "matmul": 1, "residual_block": 1, "small_cnn": 2,
         "grouped_conv": 0, "conv_bn_relu": 0}


def run(mod, feeds, inputs):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in inputs]).numpy()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    directory = tmp_path_factory.mktemp("equalize_models")
    out = {name: import_onnx(save_model(BUILDERS[name](0), directory, name)) for name in PAIRS}
    out["fashion_mnist"] = import_onnx(str(EXAMPLES / "fashion_mnist_cnn.onnx"))
    return out


def _feeds(imported, name, scale=1.0):
    if name == "fashion_mnist":
        x = np.load(EXAMPLES / "fashion_mnist_test.npz")["input"][:1]
        return {imported[name].inputs[0].name: x}
    feeds = random_inputs(BUILDERS[name](0), seed=3, batch=1)
    return {k: (v * scale).astype(np.float32) for k, v in feeds.items()}


@pytest.mark.parametrize("name", sorted(PAIRS) + ["fashion_mnist"])
def test_float_function_unchanged(imported, name):
    # scale 8: the ReLU6 bounds are hit, so a wrong per-channel clip would show
    imp = imported[name]
    feeds = _feeds(imported, name, scale=8.0)
    before = prepare(imp.mod)
    after, report = equalize(before)
    want = PAIRS.get(name, 3)  # fashion_mnist: conv1->conv2 (maxpool), conv2->fc1
    assert len(report["pairs"]) == want  # (maxpool, flatten), fc1->fc2
    ref, got = run(before, feeds, imp.inputs), run(after, feeds, imp.inputs)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("name", ["depthwise", "gemm", "matmul", "small_cnn", "fashion_mnist"])
def test_ranges_equalized(imported, name):
    mod, report = equalize(prepare(imported[name].mod))
    pairs = find_pairs(mod)  # read back from the rewritten module's constants
    assert len(pairs) == len(report["pairs"]) > 0
    for p in pairs:
        r1 = _out_ranges(p.first)
        r2 = _in_ranges(p.second, p.channels, p.rows_per_channel)
        np.testing.assert_allclose(r1, r2, rtol=2e-3)
    spread = [(e["range_spread_before"], e["range_spread_after"]) for e in report["pairs"]]
    assert all(after < before for before, after in spread), spread
    if name == "fashion_mnist":  # trained + BatchNorm-folded: ranges 5-9x apart before
        assert all(after < before / 2 for before, after in spread), spread


def test_relu6_becomes_relu_and_per_channel_minimum(imported):
    before = prepare(imported["depthwise"].mod)
    after, report = equalize(before)
    ops = [_ir.op_name(b.value) for b in _ir.main_bindings(after["main"])]
    assert "relax.clip" not in ops
    assert ops.count("relax.minimum") == 2 and ops.count("relax.nn.relu") == 2
    assert all(p["clip"] for p in report["pairs"])
    bounds = [_ir.const_value(b.value.args[1]) for b in _ir.main_bindings(after["main"])
              if _ir.op_name(b.value) == "relax.minimum"]
    for bound in bounds:
        assert bound.shape == (1, 16, 1, 1)
        assert not np.allclose(bound, 6.0)  # channels really got different bounds


def test_clip_with_nonzero_lower_bound_is_not_equalized(imported):
    from tvm import relax

    mod = prepare(imported["depthwise"].mod)

    def visit(bb, binding, remap):
        if _ir.op_name(binding.value) == "relax.clip":
            x = _ir.substitute(binding.value.args[0], remap)
            remap[binding.var] = bb.emit(relax.op.clip(x, relax.prim_value(-1.0, "float32"),
                                                       relax.prim_value(6.0, "float32")))
        else:
            _ir.copy_binding(bb, binding, remap)

    shifted = _ir.rewrite_main(mod, visit)
    assert find_pairs(shifted) == []  # clip(x, -1, 6)/s != clip(x/s, -1, 6)/... per channel


def test_quantize_with_equalize(imported):
    imp = imported["depthwise"]
    calib = [random_inputs(BUILDERS["depthwise"](0), seed=s, batch=1) for s in range(8)]
    result = quantize_model(imp, calib, QuantConfig(equalize="activations", progress=False),
                            "host")
    eq = result.summary["equalization"]
    assert eq == {"mode": "activations", "pairs": 2, "residual_groups": 0, "sweeps": eq["sweeps"],
                  "per_channel_clips": 2}
    assert len(result.summary["int8_layers"]) == 3
    assert result.summary["output_sqnr_db"] > 25
    plain = quantize_model(imp, calib, QuantConfig(equalize=None, progress=False), "host")
    assert plain.summary["equalization"] is None
    with pytest.raises(InputError, match="equalize must be"):
        QuantConfig(equalize="both").validate()


def test_activation_aware_scales(imported):
    """Measured ranges: before a depthwise conv every channel is scaled up to the largest
    (its per-channel weights do not care); before a dense conv activation and weight
    ranges meet in the middle. The function stays the same."""
    imp = imported["depthwise"]
    mod = prepare(imp.mod)
    calib = CalibrationData([random_inputs(BUILDERS["depthwise"](0), seed=s, batch=1)
                             for s in range(4)], "random")
    ranges = channel_ranges(mod, get_target("host"), calib, imp.inputs)
    assert len(ranges) == 2 and all(r.shape == (16,) and np.all(r > 0) for r in ranges.values())
    after, report = equalize(mod, ranges=ranges)
    into_dw, into_project = report["pairs"]
    assert into_dw["activation_spread_before"] > 1.5
    assert into_dw["activation_spread_after"] == pytest.approx(1.0)
    measured = channel_ranges(after, get_target("host"), calib, imp.inputs)  # measured again
    by_first = {p.first.anchor.name: p for p in find_pairs(after)}
    for p in find_pairs(after):
        a = measured[p.between]
        if p.second.weight.shape[1] == 1:   # depthwise
            np.testing.assert_allclose(a, a.max(), rtol=1e-4)
        else:
            r2 = _in_ranges(p.second, p.channels, p.rows_per_channel)
            np.testing.assert_allclose(a, r2, rtol=1e-3)
    assert set(by_first) == {into_dw["first"], into_project["first"]}
    feeds = _feeds(imported, "depthwise", scale=8.0)
    np.testing.assert_allclose(run(after, feeds, imp.inputs), run(mod, feeds, imp.inputs),
                               rtol=1e-4, atol=1e-4)


def test_cli_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--equalize"])).equalize == "activations"
    assert config_from_args(parser.parse_args(["--equalize-data-free"])).equalize == "weights"
    assert config_from_args(parser.parse_args([])).equalize == QuantConfig().equalize
    assert config_from_args(parser.parse_args(["--no-equalize"])).equalize is None
    # the flag takes no value: what follows stays a positional argument
    parser.add_argument("model")
    args = parser.parse_args(["--equalize", "model.onnx"])
    assert args.model == "model.onnx" and args.equalize == "activations"


def _residual_stream_model():
    """conv a (no activation) -> t1; t1 -> conv b + Relu -> conv c; t2 = t1 + c;
    t2 -> conv d + Relu. [1,8,8,8] -> [1,4,8,8]. One residual stream: producers a, c;
    consumers b, d."""
    from onnx_builders import _Graph, _model

    g = _Graph(5)
    t1 = g.conv("input", "a", 8, 8, 1)
    y = g.relu(g.conv(t1, "b", 8, 16, 3), "b_relu")
    y = g.conv(y, "c", 16, 8, 1)
    t2 = g.node("Add", [t1, y], "add")
    y = g.relu(g.conv(t2, "d", 8, 4, 1), "d_relu")
    return _model(g, "residual_stream", [("input", [1, 8, 8, 8])], [("output", y, [1, 4, 8, 8])])


def test_residual_stream_group(tmp_path):
    from qcompile.quantize.equalize import find_groups
    from qcompile.quantize.plan import build_plan

    model = _residual_stream_model()
    imp = import_onnx(save_model(model, tmp_path, "residual_stream"))
    mod = prepare(imp.mod)
    plan = build_plan(mod)
    (group,) = find_groups(mod, plan)
    names = {l.anchor: l.name for l in plan.layers}
    assert sorted(names[l.anchor] for l in group.producers) == ["conv2d_0", "conv2d_2"]
    assert sorted(names[l.anchor] for l in group.consumers) == ["conv2d_1", "conv2d_3"]
    rng = np.random.default_rng(0)
    # uneven channels: some input channels 10x larger, so the stream is uneven too
    gain = np.where(np.arange(8) % 3 == 0, 10.0, 1.0).reshape(1, 8, 1, 1)
    calib = CalibrationData([{"input": (rng.standard_normal((1, 8, 8, 8)) * gain)
                              .astype(np.float32)} for _ in range(4)], "random")
    spec = get_target("host")
    ranges = channel_ranges(mod, spec, calib, imp.inputs)
    after, report = equalize(mod, ranges=ranges)
    assert len(report["groups"]) == 1
    measured = channel_ranges(after, spec, calib, imp.inputs)
    (new_group,) = find_groups(after, build_plan(after))
    stream = np.max([measured[v] for v in new_group.members], axis=0)
    consumers = np.max([_in_ranges(c, 8, 1) for c in new_group.consumers], axis=0)
    np.testing.assert_allclose(stream, consumers, rtol=1e-3)  # balanced, as measured
    feeds = {"input": (rng.standard_normal((1, 8, 8, 8)) * gain).astype(np.float32)}
    np.testing.assert_allclose(run(after, feeds, imp.inputs), run(mod, feeds, imp.inputs),
                               rtol=1e-4, atol=1e-4)


def test_weights_mode_leaves_residual_streams_alone(tmp_path):
    imp = import_onnx(save_model(_residual_stream_model(), tmp_path, "residual_stream"))
    _after, report = equalize(prepare(imp.mod))
    assert report["groups"] == []  # a stream needs measured ranges
    assert len(report["pairs"]) == 1  # b -(relu)-> c; t1 and t2 have two users / an add
