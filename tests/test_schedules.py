"""Default CPU schedules and packed int8 kernels: numerics against numpy references.

Every kernel kind the layout pass + schedule rules produce (packed conv2d / matmul,
float and int8, depthwise / grouped conv) is built through qcompile's pipeline and
compared with a numpy reference: float within 1e-5 relative, int8 bit-exact, across
odd shapes (channels not a multiple of the tile, stride 2, padding, depthwise, fused
bias/requantize/ReLU epilogues).

int8 intrinsics: the instruction runs for real where this CPU has it (AVX2, AVX-512
VNNI); otherwise the same packed schedule runs with the portable tile implementation,
so the layout and schedule are still checked bit-exact (never skipped). ARM sdot always
runs portable here.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcompile.target import get_target, host_cpu_features  # noqa: E402

HOST = "x86_64-avx2"  # runs on every x86-64 CI machine here (AVX2 + FMA)


def _compile(mod, spec_name=HOST, force=None):
    """qcompile's pipeline, with the layout pass optionally forced to one int8 family."""
    from qcompile import pipeline
    from qcompile.layout import pack_weights_pass

    spec = get_target(spec_name)
    target = spec.tvm_target()

    @tvm.transform.module_pass(opt_level=3, name="test.pipeline")
    def _pipe(m, _ctx):
        with target:
            seq = [pack_weights_pass(target, force), *pipeline.fuse_passes(target)]
            m = tvm.transform.Sequential(seq)(m)
            m = tvm.transform.Sequential(pipeline.schedule_passes(spec, target, False))(m)
            return tvm.transform.Sequential(pipeline.lower_passes(target))(m)

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=_pipe)


def _run(ex, *arrays):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _runnable(family: str) -> str:
    """``family`` when this CPU executes it, else its portable implementation."""
    flags = host_cpu_features()
    need = {"avx512-vnni": {"avx512_vnni", "avx512bw"}, "avx2-vpmaddubsw": {"avx2"},
            "arm-sdot": {"asimddp"}}[family]
    import platform

    arch_ok = platform.machine() == ("aarch64" if family == "arm-sdot" else "x86_64")
    return family if arch_ok and need <= flags else f"portable-{family}"


def _target_for(family: str) -> str:
    if family.endswith("avx512-vnni") and not family.startswith("portable-"):
        return "x86_64-avx512-vnni"
    return HOST


# --------------------------------------------------------------------------- numpy references
def np_conv2d(x, w, stride, pad, groups=1, acc=np.float64):
    n, c, h, wd = x.shape
    o, cpg, kh, kw = w.shape
    xp = np.pad(x.astype(acc), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, oh, ow), acc)
    opg = o // groups
    for g in range(groups):
        xs = xp[:, g * cpg:(g + 1) * cpg]
        ws = w[g * opg:(g + 1) * opg].astype(acc)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * opg:(g + 1) * opg] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


# --------------------------------------------------------------------------- module builders
def conv_module(xshape, w, stride, pad, groups=1, x_dtype="float32", epilogue="bias_relu",
                bias=None, scale=None, out_dtype=None):
    x = relax.Var("x", relax.TensorType(xshape, x_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=pad,
                                           groups=groups, out_dtype=out_dtype))
            if epilogue in ("bias_relu", "requant"):
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            if epilogue == "bias_relu":
                y = bb.emit(relax.op.nn.relu(y))
            if epilogue == "requant":
                f = bb.emit(relax.op.multiply(relax.op.astype(y, "float32"), relax.const(scale)))
                r = bb.emit(relax.op.clip(relax.op.round(f), 0, 255))
                y = bb.emit(relax.op.astype(r, "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def matmul_module(ashape, b, a_dtype="float32", bias=None, out_dtype=None):
    a = relax.Var("a", relax.TensorType(ashape, a_dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [a]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(a, relax.const(b), out_dtype=out_dtype))
            if bias is not None:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _kernel_kinds(ex_or_mod):
    return None


# --------------------------------------------------------------------------- float
CONV_CASES = [
    # (n, c, h, w, o, k, stride, pad, groups)
    (1, 8, 10, 10, 16, 3, 1, 1, 1),     # regular 3x3
    (1, 5, 9, 11, 13, 3, 2, 1, 1),      # odd channels, stride 2
    (2, 16, 7, 7, 24, 1, 1, 0, 1),      # 1x1, batch 2
    (1, 3, 15, 13, 10, 7, 2, 3, 1),     # stem-like 7x7 stride 2
    (1, 12, 9, 9, 12, 3, 1, 1, 12),     # depthwise
    (1, 12, 10, 10, 12, 3, 2, 1, 12),   # depthwise stride 2
    (1, 8, 6, 6, 12, 3, 1, 1, 4),       # grouped
    (1, 16, 9, 11, 64, 3, 1, 1, 1),     # two channel vectors per tile (AVX-512)
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("target", [HOST, "x86_64-avx512-vnni"])
def test_float_conv2d_matches_numpy(case, target):
    if target != HOST and not {"avx512f", "avx512bw"} <= host_cpu_features():
        target = HOST  # still checked, with the AVX2 schedule
    n, c, h, w_, o, k, s, p, g = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
    w = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    bias = rng.standard_normal((1, o, 1, 1)).astype(np.float32)
    got = _run(_compile(conv_module(x.shape, w, s, p, g, bias=bias), target), x)
    ref = np.maximum(np_conv2d(x, w, s, p, g) + bias, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m,k,n", [(1, 37, 1000), (5, 64, 24), (7, 19, 13)])
def test_float_matmul_matches_numpy(m, k, n):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    got = _run(_compile(matmul_module(a.shape, b, bias=bias)), a)
    ref = np.maximum(a.astype(np.float64) @ b + bias, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# --------------------------------------------------------------------------- int8
INT8_FAMILIES = ["avx512-vnni", "avx2-vpmaddubsw", "arm-sdot", "generic"]
INT8_CONV_CASES = [
    (1, 8, 10, 10, 16, 3, 1, 1, 1),
    (1, 5, 9, 11, 13, 3, 2, 1, 1),      # C and O not multiples of 4 / the tile
    (2, 16, 7, 7, 24, 1, 1, 0, 1),
    (1, 12, 9, 9, 12, 3, 2, 1, 12),     # depthwise stride 2
    (1, 4, 19, 19, 8, 3, 1, 1, 1),      # prime width: exact tile for tensorize
]


def _force(family):
    return "generic" if family == "generic" else _runnable(family)


@pytest.mark.parametrize("family", INT8_FAMILIES)
@pytest.mark.parametrize("case", INT8_CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("x_dtype", ["uint8", "int8"])
def test_int8_conv2d_bit_exact(family, case, x_dtype):
    n, c, h, w_, o, k, s, p, g = case
    rng = np.random.default_rng(2)
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (n, c, h, w_)).astype(x_dtype)
    # 7-bit weights (reduce_range), so the AVX2 tile is exact and used
    w = rng.integers(-64, 64, (o, c // g, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, (1, o, 1, 1)).astype(np.int32)
    scale = (rng.random((1, o, 1, 1)) * 0.01).astype(np.float32)
    mod = conv_module(x.shape, w, s, p, g, x_dtype=x_dtype, epilogue="requant", bias=bias,
                      scale=scale, out_dtype="int32")
    force = _force(family)
    got = _run(_compile(mod, _target_for(force), force), x)
    acc = np_conv2d(x, w, s, p, g, acc=np.int64) + bias
    ref = np.clip(np.round((acc.astype(np.float32) * scale)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, ref)
    # the raw int32 accumulator too (no epilogue)
    mod = conv_module(x.shape, w, s, p, g, x_dtype=x_dtype, epilogue=None, out_dtype="int32")
    got = _run(_compile(mod, _target_for(force), force), x)
    np.testing.assert_array_equal(got, np_conv2d(x, w, s, p, g, acc=np.int64).astype(np.int32))


@pytest.mark.parametrize("family", INT8_FAMILIES)
@pytest.mark.parametrize("m,k,n", [(1, 37, 100), (6, 64, 24), (3, 5, 7), (13, 16, 16)])
@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
def test_int8_matmul_bit_exact(family, m, k, n, a_dtype):
    rng = np.random.default_rng(3)
    lo, hi = (0, 256) if a_dtype == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (m, k)).astype(a_dtype)
    b = rng.integers(-64, 64, (k, n)).astype(np.int8)
    force = _force(family)
    got = _run(_compile(matmul_module(a.shape, b, a_dtype, out_dtype="int32"),
                        _target_for(force), force), a)
    np.testing.assert_array_equal(got, (a.astype(np.int64) @ b).astype(np.int32))


def test_avx2_full_range_weights_stay_exact():
    """Full 8-bit weights can saturate vpmaddubsw: the pass must fall back, not be wrong."""
    rng = np.random.default_rng(4)
    x = np.full((1, 8, 6, 6), 255, np.uint8)
    w = np.full((16, 8, 3, 3), -128, np.int8)
    w[1::2] = 127
    mod = conv_module(x.shape, w, 1, 1, 1, x_dtype="uint8", epilogue=None, out_dtype="int32")
    force = _force("avx2-vpmaddubsw")
    got = _run(_compile(mod, HOST, force), x)
    np.testing.assert_array_equal(got, np_conv2d(x, w, 1, 1, acc=np.int64).astype(np.int32))
    del rng


# --------------------------------------------------------------------------- packing helpers
def test_packing_layouts_round_trip():
    from qcompile.layout import pack_conv_weight_int8, pack_matmul_weight_int8

    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (20, 7, 3, 3)).astype(np.int8)
    p = pack_conv_weight_int8(w, 16)
    assert p.shape == (2, 2, 3, 3, 16, 4)
    for o in (0, 5, 19):
        for c in (0, 3, 6):
            assert p[o // 16, c // 4, 1, 2, o % 16, c % 4] == w[o, c, 1, 2]
    assert not p[1, :, :, :, 4:].any() and not p[:, 1, :, :, :, 3].any()
    b = rng.integers(-128, 128, (10, 9)).astype(np.int8)
    bp = pack_matmul_weight_int8(b, 4)
    assert bp.shape == (3, 3, 4, 4)
    assert bp[2, 2, 0, 1] == b[9, 8]


# --------------------------------------------------------------------------- generated code
def _asm(ex) -> str:
    return "\n".join(m.inspect_source("asm") for m in ex.mod.imports)


@pytest.mark.parametrize("target,instr", [("x86_64-avx2", "vpmaddubsw"),
                                          ("x86_64-avx512-vnni", "vpdpbusd"),
                                          ("aarch64-neon-dotprod", "sdot"),
                                          ("aarch64-neon", "smlal")])
def test_int8_kernels_carry_the_dot_instruction(target, instr):
    """Every int8 conv/matmul kernel of the target uses its dot-product instruction
    (compile only: cross-compiled targets are not run here). Cortex-A72-class boards
    (no dotprod) get the generic int8 schedule: widening multiply-accumulate (smlal)."""
    rng = np.random.default_rng(6)
    w = rng.integers(-64, 64, (32, 16, 3, 3)).astype(np.int8)
    conv = conv_module((1, 16, 8, 8), w, 1, 1, 1, x_dtype="uint8", epilogue=None,
                       out_dtype="int32")
    b = rng.integers(-64, 64, (48, 40)).astype(np.int8)
    mm = matmul_module((4, 48), b, "uint8", out_dtype="int32")
    for mod in (conv, mm):
        asm = _asm(_compile(mod, target))
        assert asm.count(instr) >= 1, f"{instr} missing for {target}"


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", ["small_cnn", "concat_pool", "residual_block", "depthwise",
                                  "grouped_conv", "gemm", "matmul"])
def test_builder_models_match_onnxruntime(name, tmp_path):
    """Every kernel of the builder models (pools, softmax, concat, reshape, ... through the
    generic rules; conv/matmul through the packed ones) against onnxruntime."""
    import onnx
    from onnx_builders import all_models, random_inputs, run_onnxruntime

    from qcompile.frontend import import_onnx

    models = all_models()
    key = next((k for k in models if k.startswith(name)), None)
    if key is None:
        pytest.skip(f"no builder model {name}")
    model = models[key]
    feeds = random_inputs(model, seed=0, batch=1)
    expected = run_onnxruntime(model, feeds)
    path = tmp_path / f"{key}.onnx"
    onnx.save(model, str(path))
    imported = import_onnx(str(path), {k: v.shape for k, v in feeds.items()})
    ex = _compile(imported.mod)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[i.name]) for i in imported.inputs])
    outs = [o.numpy() for o in out] if isinstance(out, (list, tuple)) or hasattr(out, "__len__") \
        and not hasattr(out, "numpy") else [out.numpy()]
    for got, ref in zip(outs, expected):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


def _cuda_source(ex) -> str:
    out = []

    def walk(m):
        for i in m.imports:
            try:
                out.append(i.inspect_source("cuda"))
            except Exception:  # noqa: BLE001 - host module
                pass
            walk(i)

    walk(ex.mod)
    return "\n".join(out)


@pytest.mark.parametrize("target", ["cuda-sm61"])
def test_cuda_int8_kernels_use_dp4a(target):
    """int8 conv/matmul kernels call __dp4a in the generated CUDA (compile only: no GPU
    here); float kernels still build through dlight. (sm_72+ targets use s8 tensor cores
    instead: tests/test_cuda_mma.py.)"""
    rng = np.random.default_rng(7)
    w = rng.integers(-64, 64, (16, 8, 3, 3)).astype(np.int8)
    conv = conv_module((1, 8, 10, 10), w, 1, 1, 1, x_dtype="uint8", epilogue=None,
                       out_dtype="int32")
    b = rng.integers(-64, 64, (48, 40)).astype(np.int8)
    mm = matmul_module((4, 48), b, "uint8", out_dtype="int32")
    for mod in (conv, mm):
        src = _cuda_source(_compile(mod, target))
        calls = [ln for ln in src.splitlines()
                 if "__dp4a(" in ln and "INTRINSICS_DECL" not in ln]
        assert calls, f"no __dp4a call in the {target} kernels"
    wf = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    fconv = conv_module((1, 8, 10, 10), wf, 1, 1, 1,
                        bias=rng.standard_normal((1, 16, 1, 1)).astype(np.float32))
    assert "__global__" in _cuda_source(_compile(fconv, target))


def test_int8_depthwise_extreme_values_exact():
    """int8 depthwise runs in float32 lanes: exact for the largest possible sums."""
    x = np.full((1, 16, 9, 9), 255, np.uint8)
    w = np.full((16, 1, 3, 3), -128, np.int8)
    w[::2] = 127
    mod = conv_module(x.shape, w, 1, 1, 16, x_dtype="uint8", epilogue=None, out_dtype="int32")
    got = _run(_compile(mod), x)
    np.testing.assert_array_equal(got, np_conv2d(x, w, 1, 1, 16, acc=np.int64).astype(np.int32))


def test_intrinsics_are_lazy_and_avoid_tvm_tensor_intrin():
    """Building int8 kernels registers only qcompile's own tiles, lazily: TVM's
    ``tvm.s_tir.tensor_intrin`` (47-70 s to import here) is never imported."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, %r)
        import numpy as np
        t0 = time.perf_counter()
        import qcompile.schedules, qcompile.layout, qcompile.schedules.cpu
        t_import = time.perf_counter() - t0
        assert "qcompile.schedules.x86" not in sys.modules
        import test_schedules as ts
        w = np.ones((16, 8, 1, 1), np.int8)
        m = ts.conv_module((1, 8, 4, 4), w, 1, 0, 1, x_dtype="uint8", epilogue=None,
                           out_dtype="int32")
        t0 = time.perf_counter()
        ts._compile(m, "x86_64-avx512-vnni")
        print("IMPORT", t_import, "tensor_intrin", "tvm.s_tir.tensor_intrin" in sys.modules)
    """ % str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("IMPORT")), None)
    assert line is not None, out.stderr[-2000:]
    _, t_import, _, imported = line.split()
    assert imported == "False"
    assert float(t_import) < 10.0


def test_elementwise_chain_runs_as_one_nest():
    """The model-input quantize (divide, round, add, clip, cast, then the first conv's
    pad) is one fill plus one vectorized copy nest, not one pass over memory per op, and
    computes the same bytes as numpy."""
    from test_schedule_x86_pixels import _scheduled_tir

    x = relax.Var("x", relax.TensorType((1, 3, 20, 32), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.round(relax.op.divide(x, relax.const(np.float32(0.05)))))
            q = bb.emit(relax.op.clip(relax.op.add(q, relax.const(np.float32(124))), 0, 255))
            q = bb.emit(relax.op.astype(q, "uint8"))
            out = bb.emit_output(bb.emit(relax.op.nn.pad(q, [0, 0, 0, 0, 1, 1, 1, 1],
                                                         pad_value=124.0)))
        bb.emit_func_output(out)
    mod = bb.get()
    tir = _scheduled_tir(mod, HOST)
    assert tir.count("T.sblock(") - tir.count('T.sblock("root")') == 2, tir
    xv = np.random.default_rng(5).standard_normal((1, 3, 20, 32)).astype(np.float32) * 4
    ref = np.clip(np.round(xv / np.float32(0.05)) + 124, 0, 255).astype(np.uint8)
    ref = np.pad(ref, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=124)
    np.testing.assert_array_equal(_run(_compile(mod), xv), ref)
