"""End to end on the emulated aarch64 board: cross-compile, upload over RPC, run, compare.

Needs the board image (`tools/arm-board build`, about half a minute; cached in
$QCOMPILE_BOARD_DIR or ~/.cache/qcompile/arm-board). Skips only when the image
is absent; anything else that is wrong (qemu, binfmt, cross-compiler, server)
fails. Run just these: `pytest -m board tests/test_arm_board.py`.
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.board

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "arm-board"
BOARD_DIR = Path(os.environ.get("QCOMPILE_BOARD_DIR")
                 or Path.home() / ".cache" / "qcompile" / "arm-board").expanduser()
_IMAGE_PRESENT = ((BOARD_DIR / "board.json").is_file()
                  and (BOARD_DIR / "rootfs" / "opt" / "tvm-venv" / "bin" / "python").exists())
if not _IMAGE_PRESENT and os.environ.get("QCOMPILE_REQUIRE_BOARD"):
    # CI builds the image first (.ci/run) and sets this: there, absence is a failure.
    raise RuntimeError(f"QCOMPILE_REQUIRE_BOARD is set but the board image in {BOARD_DIR} "
                       "is absent: `tools/arm-board build` failed or was not run")
if not _IMAGE_PRESENT:
    pytest.skip(f"emulated ARM board image absent in {BOARD_DIR}: build it with "
                f"`tools/arm-board build` (about half a minute) to run these tests",
                allow_module_level=True)

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.support import cc  # noqa: E402

from qcompile import rpc  # noqa: E402
from qcompile.errors import DeviceError  # noqa: E402

TARGETS = {
    "neon-dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                     "mattr": ["+neon", "+dotprod"]},
    "neon": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
}


def _tool(*args, timeout=300):
    return subprocess.run([str(TOOL), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def board():
    """HOST:PORT of a board instance of this test run's own (other runs may share the
    image and run their own instances at the same time); stopped at the end."""
    name = f"pytest-{os.getpid()}"
    res = _tool("start", "--name", name)
    assert res.returncode == 0, f"tools/arm-board start failed:\n{res.stderr}"
    addr = res.stdout.strip().splitlines()[-1]
    try:
        yield addr
    finally:
        stop = _tool("stop", "--name", name, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert _tool("status", "--name", name, timeout=60).returncode == 3
        for leftover in (BOARD_DIR / "run").glob(f"{name}.*"):
            leftover.unlink(missing_ok=True)


@pytest.fixture()
def session(board):
    return rpc.connect(board, timeout_s=60)


def _cross_build(mod, target, tmp_path, name):
    ex = tvm.compile(mod, tvm.target.Target(TARGETS[target]))
    path = tmp_path / f"{name}.so"
    ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    return path, ex


def _asm(ex):
    def walk(m):
        yield m
        for i in m.imports:
            yield from walk(i)
    return "".join(m.inspect_source("asm") for m in walk(ex.mod) if m.kind == "llvm")


@tvm.script.ir_module
class FloatMLP:
    @R.function
    def main(x: R.Tensor((4, 32), "float32"), w: R.Tensor((32, 16), "float32"),
             b: R.Tensor((16,), "float32")):
        with R.dataflow():
            y = R.nn.relu(R.add(R.matmul(x, w), b))
            R.output(y)
        return y


@tvm.script.ir_module
class Int8Matmul:
    @R.function
    def main(a: R.Tensor((16, 64), "int8"), b: R.Tensor((64, 32), "int8")):
        with R.dataflow():
            y = R.matmul(a, b, out_dtype="int32")
            R.output(y)
        return y


def test_board_says_it_is_emulated(session):
    info = rpc.board_info(session)
    assert info.get("emulated") is True and info.get("arch") == "aarch64"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_float_module_on_board(session, tmp_path, target):
    path, _ = _cross_build(FloatMLP, target, tmp_path, f"mlp-{target}")
    dev = rpc.remote_device(session)
    vm = relax.VirtualMachine(rpc.upload_and_load(session, path), dev)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32), dtype=np.float32)
    w = rng.standard_normal((32, 16), dtype=np.float32)
    b = rng.standard_normal((16,), dtype=np.float32)
    out = vm["main"](*(tvm.runtime.tensor(v, dev) for v in (x, w, b))).numpy()
    np.testing.assert_allclose(out, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)
    # measure times on the board with the remote time evaluator (runtime-only board)
    args = [tvm.runtime.tensor(v, dev) for v in (x, w, b)]
    res = vm.time_evaluator("main", dev, number=2, repeat=2)(*args)
    assert len(res.results) == 2 and res.mean > 0


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_int8_matmul_bit_exact_on_board(session, tmp_path, target):
    path, ex = _cross_build(Int8Matmul, target, tmp_path, f"qmm-{target}")
    # with +dotprod LLVM vectorizes the i8 x i8 -> i32 reduction into sdot: this
    # test is what proves sdot correct under emulation
    assert ("sdot" in _asm(ex)) == (target == "neon-dotprod")
    dev = rpc.remote_device(session)
    vm = relax.VirtualMachine(rpc.upload_and_load(session, path), dev)
    rng = np.random.default_rng(2)
    a = rng.integers(-128, 128, (16, 64), dtype=np.int8)
    b = rng.integers(-128, 128, (64, 32), dtype=np.int8)
    a[0, :] = -128          # the extremes: -128 * -128 summed 64 times
    b[:, 0] = -128
    out = vm["main"](tvm.runtime.tensor(a, dev), tvm.runtime.tensor(b, dev)).numpy()
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, a.astype(np.int32) @ b.astype(np.int32))


def test_x86_library_is_refused_clearly(session, tmp_path):
    ex = tvm.compile(Int8Matmul, tvm.target.Target({"kind": "llvm"}))
    path = tmp_path / "host.so"
    ex.export_library(str(path))
    with pytest.raises(DeviceError, match="architecture"):
        rpc.upload_and_load(session, path)


# ---------------------------------------------------------------- qcompile measure on the board
@pytest.mark.parametrize("target, dot_instructions", [("aarch64-neon-dotprod", True),
                                                      ("aarch64-neon", False)])
def test_measure_bundled_model_float_and_int8_on_the_board(board, tmp_path, target,
                                                           dot_instructions, bundled_model,
                                                           bundled_test_data,
                                                           bundled_calib_data):
    """The whole deploy path: compile float and int8 for the board's ISA, upload over RPC,
    run both there on real test images, compare with the host's float reference."""
    import json
    import shutil

    from qcompile.cli import main

    out = tmp_path / target
    assert main(["measure", str(bundled_model), "--target", target, "--rpc", board,
                 "--data", str(bundled_test_data), "--limit", "100",
                 "--calib", str(bundled_calib_data), "--repeat", "3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["emulated"] is True and "EMULATED" in (out / "report.md").read_text()
    fp, q8 = report["float"], report["int8"]
    assert fp["agreement"]["samples"] == q8["agreement"]["samples"] == 100
    assert fp["agreement"]["top1"] == 1.0 and fp["agreement"]["sqnr_db"] > 80
    assert q8["agreement"]["top1"] >= 0.97 and q8["agreement"]["sqnr_db"] >= 25
    assert abs(q8["accuracy"] - fp["accuracy"]) <= 0.03
    assert q8["weight_bytes"] * 3 < fp["weight_bytes"]
    # The int8 kernels that just ran correctly on ARM use the dot-product instructions
    # exactly when the target has them.
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump, "binutils-aarch64-linux-gnu (comes with g++-aarch64-linux-gnu) is missing"
    asm = subprocess.run([objdump, "-d", str(out / "artifact-int8" / "lib.so")],
                         capture_output=True, text=True, check=True).stdout
    sdot = sum(1 for line in asm.splitlines() if "\tsdot\t" in line or "\tudot\t" in line)
    assert (sdot > 0) == dot_instructions, f"{sdot} sdot/udot instructions for {target}"


# ---------------------------------------------------------------- i8mm (smmla) on the board
def test_i8mm_bundled_model_on_board_matches_x86(session, tmp_path, bundled_model,
                                                 bundled_test_data, bundled_calib_data):
    """The int8 CNN built for aarch64-i8mm (every conv/dense on smmla) runs on the board
    (qemu's default CPU model implements FEAT_I8MM; a CPU without it traps SIGILL) and gives
    bit-identical logits to the same quantization built for x86 and run here."""
    import shutil

    from qcompile import artifact
    from qcompile.build import compile_model
    from qcompile.target import load_spec

    arm = compile_model(bundled_model, "aarch64-i8mm", tmp_path / "arm", quantize="int8",
                        calib=bundled_calib_data)
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    assert objdump
    asm = subprocess.run([objdump, "-d", str(arm.library)], capture_output=True, text=True,
                         check=True).stdout
    assert sum("\tsmmla\t" in ln for ln in asm.splitlines()) >= 32
    # The x86 reference quantizes exactly as aarch64-i8mm does (full 8-bit weights, no
    # reduce_range), so both libraries hold the same int8 model.
    ref_toml = tmp_path / "x86-full-range.toml"
    ref_toml.write_text('name = "x86-full-range"\narch = "x86_64"\nisa_features = ["avx2"]\n'
                        'int8_intrinsic = "avx2-vpmaddubsw"\nreduce_range = false\n'
                        '[tvm]\nkind = "llvm"\nmcpu = "haswell"\n')
    host = compile_model(bundled_model, load_spec(ref_toml), tmp_path / "x86",
                         quantize="int8", calib=bundled_calib_data)
    remote = artifact.load(arm.directory, session=session)
    local = artifact.load(host.directory)
    data = np.load(bundled_test_data)
    name = remote.inputs[0].name
    got, ref = [], []
    for k in range(64):
        feed = {name: data["input"][k:k + 1]}
        got.append(remote.run(feed)[0])
        ref.append(local.run(feed)[0])
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(ref))
