"""qcompile.rpc against TVM's own RPC server and tracker on loopback (x86, no qemu)."""

import os
import socket
import threading
import time

import numpy as np
import pytest

from qcompile import rpc
from qcompile.errors import ArtifactError, DeviceError, InputError, QCompileError

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402


def _add_module(shift):
    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 3), "float32")):
            with R.dataflow():
                y = R.add(R.matmul(x, w), R.const(shift, "float32"))
                R.output(y)
            return y

    return Mod


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """Two libraries with the SAME file name (lib.so) but different behaviour."""
    out = {}
    for shift in (1.0, 2.0):
        d = tmp_path_factory.mktemp(f"lib{int(shift)}")
        ex = tvm.compile(_add_module(shift), tvm.target.Target({"kind": "llvm"}))
        path = d / "lib.so"
        ex.export_library(str(path))
        out[shift] = path
    return out


@pytest.fixture(scope="module")
def server():
    with rpc.start_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def tracker():
    with rpc.start_tracker() as trk:
        yield trk


def _run(sess, lib_path):
    rmod = rpc.upload_and_load(sess, lib_path)
    dev = rpc.remote_device(sess)
    vm = relax.VirtualMachine(rmod, dev)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((8, 3), dtype=np.float32)
    out = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()
    return out, x @ w


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- addresses

@pytest.mark.parametrize("text,expect", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)),
    (" localhost:1 ", ("localhost", 1)),
    ("board-7.lab.example:65535", ("board-7.lab.example", 65535)),
    ("[::1]:9190", ("::1", 9190)),
])
def test_parse_address_ok(text, expect):
    assert rpc.parse_address(text) == expect


@pytest.mark.parametrize("text", [
    None, "", "   ", "9090", ":9090", "host:", "host:abc", "host:0", "host:70000",
    "host:-1", "::1:9090", "[::1]9090", "[nothost]:9090", "http://host:9090",
    "ho st:9090", "host:90 90", "bad/host:9090", 9090,
])
def test_parse_address_bad(text):
    with pytest.raises(InputError) as err:
        rpc.parse_address(text, "--rpc")
    assert "--rpc expects HOST:PORT" in str(err.value)


@pytest.mark.parametrize("kwargs", [
    dict(rpc="nohostport"),
    dict(rpc="127.0.0.1:notaport"),
    dict(tracker="127.0.0.1"),
    dict(tracker="127.0.0.1:9190"),                   # no key
    dict(rpc="127.0.0.1:9090", tracker="127.0.0.1:9190", key="k"),
    dict(),
    dict(rpc="127.0.0.1:9090", timeout_s=0),
    dict(tracker="127.0.0.1:9190", key="two words"),
])
def test_connect_bad_arguments_are_input_errors(kwargs):
    t0 = time.monotonic()
    with pytest.raises(InputError):
        rpc.connect(**kwargs)
    assert time.monotonic() - t0 < 1.0
    assert issubclass(InputError, QCompileError)


# ---------------------------------------------------------------- server

def test_server_handle(server):
    assert server.host == "127.0.0.1"
    assert server.address == f"127.0.0.1:{server.port}"
    assert server.port > 0 and server.pid > 0 and server.alive()
    assert "bind to" in server.log()


def test_upload_run_remote(server, libs):
    sess = rpc.connect(server.address, timeout_s=20)
    out, ref = _run(sess, libs[1.0])
    np.testing.assert_allclose(out, ref + 1.0, rtol=1e-5, atol=1e-5)


def test_same_file_name_does_not_alias(server, libs):
    """Both libraries are called lib.so; the second must not return the first."""
    sess = rpc.connect(server.address, timeout_s=20)
    out1, ref = _run(sess, libs[1.0])
    out2, ref2 = _run(sess, libs[2.0])
    np.testing.assert_allclose(out1, ref + 1.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2, ref2 + 2.0, rtol=1e-5, atol=1e-5)


def test_time_evaluator_remote(server, libs):
    sess = rpc.connect(server.address, timeout_s=20)
    rmod = rpc.upload_and_load(sess, libs[1.0])
    dev = rpc.remote_device(sess)
    vm = relax.VirtualMachine(rmod, dev)
    x = tvm.runtime.tensor(np.ones((4, 8), "float32"), dev)
    w = tvm.runtime.tensor(np.ones((8, 3), "float32"), dev)
    res = vm.time_evaluator("main", dev, number=2, repeat=2)(x, w)
    assert len(res.results) == 2 and res.mean > 0


def test_missing_library_is_artifact_error(server, tmp_path):
    sess = rpc.connect(server.address, timeout_s=20)
    with pytest.raises(ArtifactError, match="does not exist"):
        rpc.upload_and_load(sess, tmp_path / "nope.so")


def test_garbage_library_is_device_error(server, tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF not really a library")
    sess = rpc.connect(server.address, timeout_s=20)
    with pytest.raises(DeviceError, match="could not load"):
        rpc.upload_and_load(sess, bad)


def test_board_info_empty_on_plain_server(server):
    sess = rpc.connect(server.address, timeout_s=20)
    assert rpc.board_info(sess) == {}


# ---------------------------------------------------------------- tracker

def test_tracker_and_key(tracker, libs):
    assert tracker.address == f"127.0.0.1:{tracker.port}"
    with rpc.start_server(tracker=tracker.address, key="qc-test") as srv:
        summary = rpc.tracker_summary(tracker.address)
        assert any(s["key"] == "server:qc-test" for s in summary["server_info"])
        sess = rpc.connect(tracker=tracker.address, key="qc-test", timeout_s=20)
        out, ref = _run(sess, libs[2.0])
        np.testing.assert_allclose(out, ref + 2.0, rtol=1e-5, atol=1e-5)

        # the only server under the key is busy with `sess`: bounded wait
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="none became free"):
            rpc.connect(tracker=tracker.address, key="qc-test", timeout_s=2)
        assert time.monotonic() - t0 < 6
        del sess
        assert srv.alive()


def test_tracker_unknown_key(tracker):
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as err:
        rpc.connect(tracker=tracker.address, key="no-such-board", timeout_s=10)
    assert time.monotonic() - t0 < 3
    msg = str(err.value)
    assert "no-such-board" in msg and tracker.address in msg


def test_server_port_is_not_a_tracker(server):
    with pytest.raises(DeviceError, match="not as a TVM RPC tracker|did not answer"):
        rpc.connect(tracker=server.address, key="k", timeout_s=3)


# ---------------------------------------------------------------- dead boards

def test_nothing_listening_is_fast_device_error():
    port = _closed_port()
    for kwargs in (dict(rpc=f"127.0.0.1:{port}"), dict(tracker=f"127.0.0.1:{port}", key="k")):
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            rpc.connect(timeout_s=10, **kwargs)
        assert time.monotonic() - t0 < 3
        assert f"127.0.0.1:{port}" in str(err.value)
        assert "refused" in str(err.value)


def test_silent_listener_is_bounded_device_error():
    """A port that accepts TCP but never speaks RPC (a hung or busy board)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept_and_hold():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept_and_hold, daemon=True)
    th.start()
    try:
        for kwargs in (dict(rpc=f"127.0.0.1:{port}"), dict(tracker=f"127.0.0.1:{port}", key="k")):
            t0 = time.monotonic()
            with pytest.raises(DeviceError) as err:
                rpc.connect(timeout_s=2, **kwargs)
            assert time.monotonic() - t0 < 5
            assert f"127.0.0.1:{port}" in str(err.value)
    finally:
        stop.set()
        th.join(2)
        for c in held:
            c.close()
        lsock.close()


def test_stopped_server_is_device_error():
    srv = rpc.start_server()
    addr, pid = srv.address, srv.pid
    srv.stop()
    assert not srv.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match=addr.replace(".", r"\.")):
        rpc.connect(addr, timeout_s=5)
    assert time.monotonic() - t0 < 3


def test_fixed_port_taken_is_clear_error(server):
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="exited|did not bind|cannot bind"):
        rpc.start_server(port=server.port, startup_timeout=30)
    assert time.monotonic() - t0 < 30


def test_server_key_mismatch_is_device_error():
    with rpc.start_server(key="board-a") as srv:
        t0 = time.monotonic()
        with pytest.raises(DeviceError, match="different key"):
            rpc.connect(srv.address, timeout_s=10)
        assert time.monotonic() - t0 < 10
        sess = rpc.connect(srv.address, key="board-a", timeout_s=10)
        assert rpc.remote_device(sess) is not None


def test_board_dying_mid_session_is_device_error():
    srv = rpc.start_server()
    sess = rpc.connect(srv.address, timeout_s=20)
    dev = rpc.remote_device(sess)
    arr = tvm.runtime.tensor(np.ones(4, "float32"), dev)
    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="copying the output back.*" + srv.address + ".*died"):
        with rpc.remote_errors(srv.address, "copying the output back"):
            arr.numpy()
    assert time.monotonic() - t0 < 3
