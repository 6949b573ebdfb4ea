"""compile: artifacts for all six targets, built for the right ISA; load checks
the hash; an interrupted compile leaves nothing loadable behind."""

import json
import shutil
import struct

import numpy as np
import pytest

from qcompile.artifact import load, read_artifact
from qcompile.build import compile_model
from qcompile.errors import ArtifactError, DeviceError
from qcompile.frontend import import_onnx
from qcompile.target import get_target

# ELF e_machine values
EM_X86_64, EM_AARCH64 = 62, 183


def _elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert header[4] == 2, "expected a 64-bit ELF"
    return struct.unpack("<H", header[18:20])[0]


@pytest.fixture(scope="module")
def imported(bundled_model):
    return import_onnx(bundled_model)


@pytest.fixture(scope="module")
def float_artifact(imported, tmp_path_factory):
    return compile_model(imported, "host", tmp_path_factory.mktemp("a") / "cnn")


def test_manifest_records_what_a_deployer_needs(float_artifact, bundled_model):
    manifest = json.loads((float_artifact.directory / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 1, 28, 28],
                                   "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["target"]["name"] == get_target("host").name
    assert manifest["tvm_version"].startswith("0.27")
    assert manifest["qcompile_version"]
    assert len(manifest["library"]["sha256"]) == 64
    from qcompile.frontend import sha256_file

    assert manifest["model"]["sha256"] == sha256_file(bundled_model)
    assert manifest["quantization"]["mode"] == "none"


def test_host_artifact_runs_and_matches_onnxruntime(float_artifact, bundled_model,
                                                    bundled_test_data):
    import onnxruntime as ort

    data = np.load(bundled_test_data)
    runner = load(float_artifact.directory)
    session = ort.InferenceSession(str(bundled_model), providers=["CPUExecutionProvider"])
    for index in range(8):
        x = data["input"][index:index + 1]
        got = runner.run({"input": x})[0]
        want = session.run(None, {"input": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tampered_library_is_refused_before_loading(float_artifact, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(float_artifact.directory, copy)
    lib = copy / "lib.so"
    blob = bytearray(lib.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    lib.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load(copy)


def test_missing_manifest_and_missing_dir(float_artifact, tmp_path):
    copy = tmp_path / "nomanifest"
    shutil.copytree(float_artifact.directory, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_artifact(copy)
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_artifact(tmp_path / "absent")


def test_recompile_replaces_artifact_atomically(imported, tmp_path):
    out = tmp_path / "cnn"
    first = compile_model(imported, "host", out)
    second = compile_model(imported, "host", out)
    assert second.manifest["library"]["sha256"] == read_artifact(out).manifest["library"][
        "sha256"]
    assert first.directory == second.directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left over"


def test_refuses_to_overwrite_a_non_artifact_directory(imported, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(Exception, match="not a qcompile artifact"):
        compile_model(imported, "host", out)
    assert (out / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("target", ["x86_64-avx2", "x86_64-avx512-vnni"])
def test_x86_artifacts_are_x86_64_elf(imported, tmp_path, target):
    artifact = compile_model(imported, target, tmp_path / target)
    assert _elf_machine(artifact.library) == EM_X86_64
    assert artifact.manifest["target"]["name"] == target
    if get_target(target).runs_here():
        out = load(artifact.directory).run({"input": np.zeros((1, 1, 28, 28), "float32")})
        assert out[0].shape == (1, 10)


@pytest.mark.parametrize("target", ["aarch64-neon-dotprod", "aarch64-neon"])
def test_aarch64_artifacts_are_cross_linked_aarch64_elf(imported, tmp_path, target):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.fail("aarch64-linux-gnu-g++ missing: apt-get install g++-aarch64-linux-gnu "
                    "(.ci/run installs it)")
    artifact = compile_model(imported, target, tmp_path / target)
    assert _elf_machine(artifact.library) == EM_AARCH64
    assert artifact.manifest["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(DeviceError, match="cannot run on this machine"):
        load(artifact.directory)


@pytest.mark.parametrize("target", ["cuda-sm80", "cuda-sm61"])
def test_cuda_artifacts_hold_cuda_kernels(imported, tmp_path, target):
    artifact = compile_model(imported, target, tmp_path / target)
    arch = get_target(target).tvm["arch"]
    assert artifact.manifest["target"]["tvm"]["arch"] == arch
    source = (artifact.directory / "kernels.cu").read_text()
    assert "__global__" in source and "extern \"C\"" in source
    # The host side of the library is x86-64; the CUDA source rides inside it.
    assert _elf_machine(artifact.library) == EM_X86_64
    assert b"__global__" in artifact.library.read_bytes()
    cuda = artifact.manifest["cuda"]
    if cuda["fatbin"]:
        assert (artifact.directory / cuda["fatbin"]).stat().st_size > 0
    else:  # no nvcc, or an nvcc too new for the arch (CUDA 13 dropped sm_61)
        assert "nvcc" in cuda["note"]
    if target == "cuda-sm80" and shutil.which("nvcc"):
        assert cuda["fatbin"], "nvcc is here and supports sm_80: expected a fatbin"
