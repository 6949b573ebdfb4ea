"""Target descriptors: the six bundled ones load, resolve and build TVM targets."""

import platform

import pytest

from qcompile.errors import TargetError
from qcompile.target import get_target, host_target_name, list_targets, load_spec

BUNDLED = {"x86_64-avx2", "x86_64-avx512-vnni", "x86_64-amx", "aarch64-neon-dotprod",
           "aarch64-neon", "cuda-sm80", "cuda-sm61"}


def test_all_six_bundled_targets_load_and_build_tvm_targets():
    specs = {s.name: s for s in list_targets()}
    assert BUNDLED <= set(specs)
    for spec in specs.values():
        target = spec.tvm_target()
        assert target.kind.name == spec.tvm["kind"]
        assert spec.rpc_key and spec.int8_intrinsic


def test_target_details_match_the_isa():
    arm = get_target("aarch64-neon-dotprod").tvm_target()
    assert "+dotprod" in list(arm.attrs["mattr"]) and arm.attrs["mtriple"].startswith("aarch64")
    assert "+dotprod" not in list(get_target("aarch64-neon").tvm_target().attrs["mattr"])
    assert get_target("x86_64-avx512-vnni").tvm_target().attrs["mcpu"] == "cascadelake"
    assert get_target("cuda-sm61").tvm_target().attrs["arch"] == "sm_61"
    cuda = get_target("cuda-sm80").tvm_target()
    assert cuda.attrs["arch"] == "sm_80" and cuda.host.kind.name == "llvm"
    assert get_target("aarch64-neon").cross_compiler == "aarch64-linux-gnu-g++"


def test_avx2_target_never_emits_avx512_even_on_an_avx512_host():
    mcpu = get_target("x86_64-avx2").tvm_target().attrs["mcpu"]
    assert mcpu not in ("cascadelake", "skylake-avx512", "icelake-server", "sapphirerapids",
                        "emeraldrapids", "znver4", "znver5")


def test_host_target_runs_here():
    if platform.machine() != "x86_64":
        pytest.skip("bundled host targets cover x86_64 in this suite")
    spec = get_target("host")
    assert spec.name == host_target_name()
    assert spec.runs_here()
    assert not get_target("cuda-sm80").runs_here()
    assert not get_target("aarch64-neon").runs_here()


def test_user_descriptor_file(tmp_path):
    board = tmp_path / "my-board.toml"
    board.write_text('name = "my-board"\narch = "aarch64"\nint8_intrinsic = "arm-sdot"\n'
                     'cross_compiler = "aarch64-linux-gnu-g++"\n[tvm]\nkind = "llvm"\n'
                     'mtriple = "aarch64-linux-gnu"\nmattr = ["+neon", "+dotprod"]\n')
    spec = get_target(str(board))
    assert spec.name == "my-board" and spec.rpc_key == "my-board"
    assert spec.tvm_target().attrs["mtriple"] == "aarch64-linux-gnu"


@pytest.mark.parametrize("text, fragment", [
    ("name = 'x'\n", "lacks"),
    ("name = \n", "not valid TOML"),
    ("name='x'\narch='x86_64'\nint8_intrinsic='a'\ntvm='llvm'\n", "[tvm] must be a table"),
])
def test_bad_descriptor_files_name_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TargetError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError) as info:
        get_target("pdp11")
    assert "x86_64-avx2" in str(info.value)
