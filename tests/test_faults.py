"""Faults: SIGKILL during compile, a full disk under the artifact directory, and a
board that dies in the middle of ``measure``.

* SIGKILL: a subprocess compiles into an output directory that already holds a
  complete artifact and is killed at each step of writing the new one (after
  the library is exported, after the manifest is written, in the middle of the
  swap) and at random moments. Afterwards the output directory is either the
  previous complete artifact or the new complete one (never missing, never
  half-written), every ``.partial-*``/``.old-*`` leftover is refused by
  ``read_artifact``, and the next compile succeeds.
* Disk full: the artifact directory on a 16 KiB tmpfs (when this runs as root
  and may mount) and, everywhere, ``write_text`` patched to raise ENOSPC: a
  one-line BuildError, no staging directory left, the previous artifact intact.
* Board dies: ``qcompile.rpc.start_server`` on loopback, SIGKILLed when
  ``measure`` moves from float to int8 (and, separately, while float runs):
  ``measure`` raises DeviceError within a bounded time and report.json holds
  what was measured before.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import onnx_builders as ob
from qcompile.errors import ArtifactError, BuildError, DeviceError, QCompileError

REPO = Path(__file__).resolve().parent.parent

# The child: compile MODEL into OUT; pause (print PAUSED, sleep) at PHASE so the parent
# can SIGKILL it there. PHASE "none" never pauses (random-moment kills).
CHILD = r"""
import os, sys, time
import qcompile.build as b
model, out, phase = sys.argv[1:4]

def pause(name):
    if name == phase:
        print("PAUSED", name, flush=True)
        time.sleep(600)

orig_export = b._export
def _export(*args, **kwargs):
    orig_export(*args, **kwargs)
    pause("export")
b._export = _export

orig_replace = b._replace_dir
def _replace_dir(staging, final):
    pause("manifest")
    orig_replace(staging, final)
b._replace_dir = _replace_dir

orig_exchange = b._exchange
def _exchange(a, c):
    if phase == "swap":  # the two-rename fallback, killed between its renames
        return False
    return orig_exchange(a, c)
b._exchange = _exchange
orig_rename = os.rename
def rename(src, dst):
    orig_rename(src, dst)
    if ".old-" in str(dst):
        pause("swap")
b.os.rename = rename

print("READY", flush=True)
b.compile_model(model, "host", out, quantize="none")
print("DONE", flush=True)
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    path = directory / "gemm.onnx"
    path.write_bytes(ob.gemm_model(0).SerializeToString())
    return path


@pytest.fixture(scope="module")
def previous(tmp_path_factory, model_path) -> Path:
    """A complete artifact, as an earlier compile left it."""
    from qcompile.build import compile_model

    out = tmp_path_factory.mktemp("previous") / "artifact"
    compile_model(model_path, "host", out, quantize="none")
    return out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start_child(model_path, out, phase):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(model_path), str(out), phase],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)


def _wait_for(proc, word, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited before {word}: {proc.stderr.read()[-2000:]}")
        if line.startswith(word):
            return
    raise AssertionError(f"child did not reach {word} in {timeout} s")


def _check_after_kill(out: Path, previous_manifest: dict, allow_new: bool) -> str:
    """The output dir is the previous or a new complete artifact; leftovers never load."""
    from qcompile.artifact import read_artifact

    assert out.is_dir(), f"{out} vanished: the previous artifact was lost"
    artifact = read_artifact(out)  # raises if half-written or tampered
    state = "previous" if artifact.manifest == previous_manifest else "new"
    if not allow_new:
        assert state == "previous", "a half-finished compile replaced the artifact"
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    for left in leftovers:
        with pytest.raises(ArtifactError, match="interrupted compile"):
            read_artifact(left)
    return state


@pytest.mark.parametrize("phase", ["export", "manifest", "swap"])
def test_sigkill_during_compile_at_each_step(tmp_path, model_path, previous, phase):
    from qcompile.artifact import read_artifact
    from qcompile.build import compile_model

    out = tmp_path / "artifact"
    shutil.copytree(previous, out)
    before = json.loads((out / "manifest.json").read_text())
    proc = _start_child(model_path, out, phase)
    try:
        _wait_for(proc, "PAUSED")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".artifact.")]
    if phase == "swap":
        # the fallback's window: the old artifact renamed aside, the new one not yet in
        # place. Linux compiles swap atomically (renameat2), which the next test checks.
        assert any(".old-" in p.name for p in leftovers)
        assert not out.exists() or read_artifact(out)
        for left in leftovers:
            with pytest.raises(ArtifactError, match="interrupted compile"):
                read_artifact(left)
    else:
        assert leftovers, "the kill should have left the staging directory behind"
        _check_after_kill(out, before, allow_new=False)
    # the next compile recovers: a complete, loadable artifact
    compile_model(model_path, "host", out, quantize="none")
    assert read_artifact(out).manifest["created_unix"] >= before["created_unix"]


def test_sigkill_at_random_moments(tmp_path, model_path, previous):
    """Kills spread over the whole compile (imports, build, export, swap)."""
    out = tmp_path / "artifact"
    shutil.copytree(previous, out)
    before = json.loads((out / "manifest.json").read_text())
    started = time.monotonic()
    proc = _start_child(model_path, out, "none")
    _wait_for(proc, "DONE")
    proc.wait(30)
    duration = time.monotonic() - started
    shutil.rmtree(out)
    shutil.copytree(previous, out)
    rng = np.random.default_rng(7)
    states = []
    for fraction in sorted(rng.uniform(0.3, 1.0, 3)):
        proc = _start_child(model_path, out, "none")
        time.sleep(duration * fraction)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        states.append(_check_after_kill(out, before, allow_new=True))
        if states[-1] == "new":
            before = json.loads((out / "manifest.json").read_text())
    print(f"random kills over a {duration:.1f} s compile left: {states}")


def test_swap_is_atomic_on_linux(tmp_path):
    from qcompile.build import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only; elsewhere the two-rename fallback is used")
    assert _exchange(a, b)
    assert (a / "which").read_text() == "b" and (b / "which").read_text() == "a"


# --------------------------------------------------------------------------- disk full
def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_disk_full_patched(tmp_path, model_path, previous, monkeypatch, capsys):
    """ENOSPC while writing the manifest: BuildError, no staging dir, previous intact."""
    from qcompile.artifact import read_artifact
    from qcompile.cli import main

    out = tmp_path / "artifact"
    shutil.copytree(previous, out)
    before = (out / "manifest.json").read_bytes()
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    rc = main(["compile", str(model_path), "-o", str(out), "--quantize", "none"])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("qcompile: error: ") and "No space left on device" in last
    assert str(out) in last
    assert not _leftovers(tmp_path, "artifact")
    assert (out / "manifest.json").read_bytes() == before
    read_artifact(out)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (test_disk_full_patched covers ENOSPC)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_tmpfs(tiny_tmpfs, model_path):
    """A real full file system (16 KiB tmpfs): the library does not fit."""
    from qcompile.build import compile_model

    out = tiny_tmpfs / "artifact"
    with pytest.raises(BuildError) as info:
        compile_model(model_path, "host", out, quantize="none")
    message = str(info.value)
    assert "\n" not in message and str(out) in message
    assert "no space left" in message.lower(), message
    assert not out.exists()
    assert not _leftovers(tiny_tmpfs, "artifact")


def test_output_parent_not_writable(tmp_path, model_path):
    from qcompile.build import compile_model

    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(BuildError, match="cannot create the artifact directory"):
        compile_model(model_path, "host", blocker / "artifact", quantize="none")


# --------------------------------------------------------------------------- board dies
@pytest.fixture
def calib_npz(tmp_path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    return path


def _kill_board(server) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)  # a power cut: no goodbye on the socket
    except ProcessLookupError:
        pass


def test_board_dies_between_float_and_int8(tmp_path, model_path, calib_npz):
    from qcompile import rpc
    from qcompile.measure import MeasureOptions, measure

    out = tmp_path / "report"
    with rpc.start_server() as server:
        def log(msg):
            if msg.startswith("measuring int8"):
                _kill_board(server)

        started = time.monotonic()
        with pytest.raises(DeviceError) as info:
            measure(model_path, "host", out=out, rpc=server.address, quantize="both",
                    calib=str(calib_npz), log=log,
                    options=MeasureOptions(repeat=3, min_repeat_ms=1, limit=4,
                                           progress=False))
        elapsed = time.monotonic() - started
    assert elapsed < 120, f"measure took {elapsed:.0f} s after the board died"
    assert "report.json" in str(info.value) and "\n" not in str(info.value)
    report = json.loads((out / "report.json").read_text())
    assert report["float"] and report["float"]["latency_ms"]["count"] == 3
    assert report["int8"] is None
    assert any(n.startswith("int8: not measured") for n in report["notes"])


def test_board_dies_while_running(tmp_path, model_path):
    """Killed while float inferences run over RPC: bounded DeviceError, report written."""
    from qcompile import rpc
    from qcompile.measure import MeasureOptions, measure

    out = tmp_path / "report"
    with rpc.start_server() as server:
        def log(msg):
            if msg.startswith("measuring float"):
                threading.Timer(0.3, _kill_board, args=(server,)).start()

        started = time.monotonic()
        with pytest.raises(DeviceError):
            measure(model_path, "host", out=out, rpc=server.address, quantize="none",
                    log=log, options=MeasureOptions(repeat=100000, min_repeat_ms=50,
                                                    limit=2, progress=False))
        elapsed = time.monotonic() - started
    assert elapsed < 120, f"measure took {elapsed:.0f} s after the board died"
    report = json.loads((out / "report.json").read_text())
    assert report["float"] is None
    assert any(n.startswith("float: not measured") for n in report["notes"])


def test_measure_cli_reports_dead_board(tmp_path, model_path, capsys):
    """The CLI: exit 2 and one line naming the board address when it is gone."""
    from qcompile import rpc
    from qcompile.cli import main

    with rpc.start_server() as server:
        address = server.address
    rc = main(["measure", str(model_path), "--quantize", "none", "--rpc", address,
               "--out", str(tmp_path / "report"), "--repeat", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("qcompile: error:") and address in err[-1]
    assert isinstance(DeviceError("x"), QCompileError)


@pytest.mark.parametrize("when", ["upload", "timing"])
def test_board_hangs(tmp_path, model_path, monkeypatch, when):
    """A board that stops answering without closing the connection (SIGSTOP: what a
    power cut or a pulled cable looks like to TCP): TVM's client would wait forever;
    qcompile's per-call deadline turns it into a DeviceError and report.json."""
    from qcompile import rpc
    from qcompile.measure import MeasureOptions, measure

    monkeypatch.setenv("QCOMPILE_RPC_TIMEOUT_S", "3")
    out = tmp_path / "report"
    server = rpc.start_server()
    try:
        def log(msg):
            if msg.startswith("measuring float"):
                delay = 0.0 if when == "upload" else 1.0
                threading.Timer(delay, os.killpg, args=(server.pid, signal.SIGSTOP)).start()

        started = time.monotonic()
        with pytest.raises(DeviceError, match="did not answer within"):
            measure(model_path, "host", out=out, rpc=server.address, quantize="none",
                    log=log, options=MeasureOptions(repeat=40, min_repeat_ms=50, limit=2,
                                                    progress=False))
        elapsed = time.monotonic() - started
    finally:
        _kill_board(server)
        server.stop()
    assert elapsed < 60, f"measure took {elapsed:.0f} s on a hung board"
    report = json.loads((out / "report.json").read_text())
    assert any(n.startswith("float: not measured") and "did not answer" in n
               for n in report["notes"])


# --------------------------------------------------------------------------- exposure
def _listening(pid: int) -> list[tuple[str, int]]:
    import psutil

    proc = psutil.Process(pid)
    found = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found += [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def test_rpc_server_and_tracker_listen_on_loopback_only():
    """What the kernel says the processes listen on, not what was asked for."""
    from qcompile import rpc

    with rpc.start_tracker() as tracker, rpc.start_server() as server:
        for handle in (tracker, server):
            sockets = _listening(handle.pid)
            assert (("127.0.0.1", handle.port) in sockets), sockets
            assert all(ip == "127.0.0.1" for ip, _ in sockets), \
                f"{handle.kind} listens beyond loopback: {sockets}"
