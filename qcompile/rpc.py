"""TVM RPC for measuring on a board: connect, local servers and trackers, upload.

``qcompile measure`` and ``qcompile tune`` reach a board through TVM's own RPC
(``python -m tvm.exec.rpc_server`` on the board, optionally behind
``python -m tvm.exec.rpc_tracker``). This module adds what TVM leaves out:

* ``connect`` parses ``HOST:PORT`` strings with clear errors and enforces a
  bounded time: a dead, unreachable or busy server, tracker or key raises
  :class:`~qcompile.errors.DeviceError` naming the address and what to check,
  instead of TVM's minute-long retries or an endless wait in the tracker queue.
* ``start_server`` / ``start_tracker`` start TVM's server / tracker as
  subprocesses on a free port (the bound port is read back from their log),
  wait until they answer, and return a handle that stops the whole process
  group.
* ``upload_and_load`` uploads a library under a content-unique name (the remote
  ``dlopen`` would otherwise hand back an earlier library uploaded under the
  same file name) and wraps failures in DeviceError.

Security: a TVM RPC server runs whatever code is uploaded to it and has no
authentication. Everything here binds to loopback unless the caller passes a
host; expose a server only on a trusted network.

Nothing heavier than the standard library is imported at module import time;
``tvm`` is imported inside the functions that need it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import ArtifactError, DeviceError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from tvm.rpc import RPCSession

__all__ = [
    "parse_address",
    "connect",
    "tracker_summary",
    "start_server",
    "start_tracker",
    "RPCProcess",
    "upload_and_load",
    "remote_device",
    "board_info",
    "remote_errors",
]

# TVM RPC wire constants (tvm/rpc/base.py); duplicated so that probing a
# server or tracker needs no tvm import.
_RPC_MAGIC = 0xFF271
_RPC_TRACKER_MAGIC = 0x2F271
_RPC_CODE_SUCCESS = _RPC_MAGIC + 0
_RPC_CODE_DUPLICATE = _RPC_MAGIC + 1
_RPC_CODE_MISMATCH = _RPC_MAGIC + 2
_TRACKER_SUCCESS = 0
_TRACKER_SUMMARY = 6

_PROBE_KEY = "client:__qcompile_probe__"
_BIND_RE = re.compile(r"bind to (\S+):(\d+)")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")

_SERVER_HINT = ("check that the board is up (`tools/arm-board status`, or "
                "`python -m tvm.exec.rpc_server --host ... --port ...` on a real board), "
                "that the port is right and that no firewall is in the way")
_TRACKER_HINT = ("check that `python -m tvm.exec.rpc_tracker` is running at that address "
                 "and that the port is right")


# --------------------------------------------------------------------------
# addresses
# --------------------------------------------------------------------------

def parse_address(text: Any, what: str = "--rpc") -> tuple[str, int]:
    """Parse ``"HOST:PORT"`` (IPv6 as ``"[::1]:9090"``) into ``(host, port)``.

    Raises :class:`InputError` naming the option (``what``) and the problem.
    """
    example = f"{what} expects HOST:PORT, e.g. 127.0.0.1:9090"
    if not isinstance(text, str):
        raise InputError(f"{example}; got {text!r}")
    s = text.strip()
    if not s:
        raise InputError(f"{example}; got an empty string")
    if any(c.isspace() for c in s):
        raise InputError(f"{example}; got {text!r}, which contains whitespace")
    if "://" in s:
        raise InputError(f"{example} without a scheme; got {text!r}")
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or not s[end + 1:].startswith(":"):
            raise InputError(f"{example} (IPv6 as [::1]:9090); got {text!r}")
        host, port_s = s[1:end], s[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InputError(f"{example}; {host!r} in {text!r} is not an IPv6 address") from None
    else:
        if ":" not in s:
            raise InputError(f"{example}; got {text!r}, which has no ':PORT'")
        host, port_s = s.rsplit(":", 1)
        if ":" in host:
            raise InputError(f"{example}; got {text!r} (write IPv6 hosts as [::1]:9090)")
        if not host:
            raise InputError(f"{example}; got {text!r}, which has no host before ':'")
        if not _HOSTNAME_RE.match(host):
            raise InputError(f"{example}; {host!r} in {text!r} is not a valid host name")
    if not port_s:
        raise InputError(f"{example}; got {text!r}, which has no port after ':'")
    if not port_s.isdigit():
        raise InputError(f"{example}; port {port_s!r} in {text!r} is not a number")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise InputError(f"{example}; port {port} in {text!r} is outside 1-65535")
    return host, port


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _free_port(host: str) -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# probes (stdlib only, bounded by socket timeouts)
# --------------------------------------------------------------------------

def _open(host: str, port: int, timeout: float, what: str, hint: str) -> socket.socket:
    addr = _fmt(host, port)
    try:
        return socket.create_connection((host, port), timeout=max(timeout, 0.05))
    except socket.gaierror as err:
        raise DeviceError(f"cannot resolve the {what} host in {addr}: {err}; "
                          f"check the host name") from None
    except ConnectionRefusedError:
        raise DeviceError(f"{what} at {addr} refused the connection (nothing is listening "
                          f"on that port); {hint}") from None
    except socket.timeout:
        raise DeviceError(f"{what} at {addr} did not accept a connection within "
                          f"{timeout:.1f} s (host down or unreachable); {hint}") from None
    except OSError as err:
        raise DeviceError(f"cannot connect to the {what} at {addr}: {err.strerror or err}; "
                          f"{hint}") from None


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("connection closed by peer")
        buf += chunk
    return buf


def _probe_server(host: str, port: int, timeout: float) -> None:
    """Check that an RPC server answers its handshake within ``timeout``.

    Sends a key that never matches, so the server answers MISMATCH, closes and
    goes on listening: the probe never opens a session.
    """
    addr = _fmt(host, port)
    t0 = time.monotonic()
    sock = _open(host, port, timeout, "RPC server", _SERVER_HINT)
    try:
        sock.settimeout(max(timeout - (time.monotonic() - t0), 0.05))
        key = _PROBE_KEY.encode()
        sock.sendall(struct.pack("<ii", _RPC_MAGIC, len(key)) + key)
        code = struct.unpack("<i", _recvall(sock, 4))[0]
    except socket.timeout:
        raise DeviceError(
            f"RPC server at {addr} accepted the TCP connection but did not answer the "
            f"RPC handshake within {timeout:.1f} s: it is busy serving another client "
            f"(a TVM server serves one session at a time) or hung; wait, or restart it "
            f"(`tools/arm-board stop && tools/arm-board start`)") from None
    except OSError as err:
        raise DeviceError(f"RPC server at {addr} closed the connection during the handshake "
                          f"({err}); is it a TVM RPC server? {_SERVER_HINT}") from None
    finally:
        sock.close()
    if code not in (_RPC_CODE_SUCCESS, _RPC_CODE_MISMATCH, _RPC_CODE_DUPLICATE):
        raise DeviceError(f"{addr} answered, but not as a TVM RPC server (handshake code "
                          f"{code:#x}); check the port")


def _tracker_request(host: str, port: int, timeout: float, message: list) -> Any:
    addr = _fmt(host, port)
    t0 = time.monotonic()
    sock = _open(host, port, timeout, "RPC tracker", _TRACKER_HINT)
    try:
        sock.settimeout(max(timeout - (time.monotonic() - t0), 0.05))
        sock.sendall(struct.pack("<i", _RPC_TRACKER_MAGIC))
        try:
            magic = struct.unpack("<i", _recvall(sock, 4))[0]
        except ConnectionError:
            magic = None
        if magic != _RPC_TRACKER_MAGIC:
            raise DeviceError(f"{addr} answered, but not as a TVM RPC tracker; check the port "
                              f"(is it an RPC server's port instead of the tracker's?)")
        data = json.dumps(message).encode()
        sock.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", _recvall(sock, 4))[0]
        return json.loads(_recvall(sock, size).decode())
    except socket.timeout:
        raise DeviceError(f"RPC tracker at {addr} did not answer within {timeout:.1f} s; "
                          f"{_TRACKER_HINT}") from None
    except (OSError, ValueError, struct.error) as err:
        raise DeviceError(f"RPC tracker at {addr} broke the exchange ({err}); "
                          f"{_TRACKER_HINT}") from None
    finally:
        sock.close()


def tracker_summary(tracker: str, timeout_s: float = 10) -> dict:
    """The tracker's summary: ``{"server_info": [...], "queue_info": {key: {...}}}``."""
    host, port = parse_address(tracker, "--rpc-tracker")
    value = _tracker_request(host, port, timeout_s, [_TRACKER_SUMMARY])
    if not (isinstance(value, list) and value and value[0] == _TRACKER_SUCCESS):
        raise DeviceError(f"RPC tracker at {_fmt(host, port)} returned {value!r} for a summary")
    return value[1]


def _tracker_keys(summary: dict) -> dict[str, dict]:
    """Per key: ``{"servers": n, "free": n, "pending": n}``."""
    keys: dict[str, dict] = {}
    for item in summary.get("server_info", []):
        k = str(item.get("key", ""))
        if k.startswith("server:"):
            k = k[len("server:"):]
            keys.setdefault(k, {"servers": 0, "free": 0, "pending": 0})["servers"] += 1
    for k, q in summary.get("queue_info", {}).items():
        e = keys.setdefault(k, {"servers": 0, "free": 0, "pending": 0})
        e["free"] = int(q.get("free", 0))
        e["pending"] = int(q.get("pending", 0))
    return keys


# --------------------------------------------------------------------------
# connect
# --------------------------------------------------------------------------

def _run_with_deadline(fn, timeout: float, on_timeout, on_abandoned_result=None):
    """Run ``fn()`` in a daemon thread; wait at most ``timeout`` seconds.

    TVM's C++ connect cannot be interrupted; when the deadline passes the thread
    is left to finish on its own and whatever it returns late is handed to
    ``on_abandoned_result`` (to close a session nobody will use).
    """
    box: dict = {}
    lock = threading.Lock()

    def work():
        try:
            res = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            with lock:
                box["error"] = err
            return
        with lock:
            if box.get("abandoned"):
                if on_abandoned_result is not None:
                    try:
                        on_abandoned_result(res)
                    except Exception:  # noqa: BLE001
                        pass
                return
            box["result"] = res

    th = threading.Thread(target=work, name="qcompile-rpc-connect", daemon=True)
    th.start()
    th.join(max(timeout, 0.0))
    with lock:
        if "result" in box:
            return box["result"]
        if "error" in box:
            raise box["error"]
        box["abandoned"] = True
    on_timeout()
    raise AssertionError("on_timeout must raise")  # pragma: no cover


def _close_session(sess) -> None:
    try:
        sess._sess = None  # drop the last reference to the C++ session: closes it
    except Exception:  # noqa: BLE001
        pass


def _tvm_error_text(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    # TVM errors end with the most specific line
    return lines[-1] if lines else type(err).__name__


def connect(rpc: Optional[str] = None, tracker: Optional[str] = None,
            key: Optional[str] = None, timeout_s: float = 30,
            session_timeout: float = 0) -> "RPCSession":
    """Open a TVM RPC session, directly (``rpc="HOST:PORT"``) or through a tracker.

    ``tracker="HOST:PORT"`` with ``key`` asks the tracker for a free server
    registered under ``key``. With ``rpc``, ``key`` is optional (the key a
    stand-alone server was started with). Every failure to get a session within
    ``timeout_s`` seconds raises :class:`DeviceError` naming the address;
    malformed addresses raise :class:`InputError`. ``session_timeout`` (seconds,
    0 = none) asks the server to kill the session after that long.
    """
    if timeout_s is None or timeout_s <= 0:
        raise InputError(f"connect timeout must be a positive number of seconds, got {timeout_s!r}")
    if rpc is not None and tracker is not None:
        raise InputError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT --rpc-key KEY, "
                         "not both")
    if rpc is None and tracker is None:
        raise InputError("no board given: pass --rpc HOST:PORT, or --rpc-tracker HOST:PORT "
                         "with --rpc-key KEY")
    if key is not None and (not isinstance(key, str) or any(c.isspace() for c in key)):
        raise InputError(f"RPC key must be a string without whitespace, got {key!r}")
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        return deadline - time.monotonic()

    if rpc is not None:
        host, port = parse_address(rpc, "--rpc")
        return _connect_server(host, port, key or "", timeout_s, left, session_timeout)
    if not key:
        raise InputError(f"--rpc-tracker {tracker} needs --rpc-key KEY: the key the board's "
                         f"server registered under")
    host, port = parse_address(tracker, "--rpc-tracker")
    return _connect_tracker(host, port, key, timeout_s, left, session_timeout)


def _connect_server(host, port, key, timeout_s, left, session_timeout):
    addr = _fmt(host, port)
    _probe_server(host, port, min(left(), 10.0))

    def work():
        from tvm import rpc as _rpc
        return _rpc.connect(host, port, key=key, session_timeout=session_timeout)

    def timed_out():
        raise DeviceError(
            f"RPC server at {addr} did not open a session within {timeout_s:g} s: it is busy "
            f"with another client (a TVM server serves one session at a time) or hung; "
            f"{_SERVER_HINT}")

    try:
        return _run_with_deadline(work, left(), timed_out, _close_session)
    except DeviceError:
        raise
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds
        text = _tvm_error_text(err)
        hint = _SERVER_HINT
        if "mismatch" in str(err).lower() or "key" in text.lower():
            hint = (f"the server expects a different key: pass the key it was started with "
                    f"(--key), or none")
        raise DeviceError(f"RPC session to {addr} failed: {text}; {hint}") from None


def _connect_tracker(host, port, key, timeout_s, left, session_timeout):
    addr = _fmt(host, port)
    summary = tracker_summary(addr, timeout_s=min(left(), 10.0))
    keys = _tracker_keys(summary)
    info = keys.get(key)
    if not info or (info["servers"] == 0 and info["free"] == 0):
        known = ", ".join(sorted(k for k, v in keys.items() if v["servers"] or v["free"]))
        raise DeviceError(
            f"RPC tracker at {addr} has no server registered under key '{key}' "
            f"(registered keys: {known or 'none'}); start one with "
            f"`tools/arm-board start --tracker {addr} --key {key}` or, on a board, "
            f"`python -m tvm.exec.rpc_server --tracker {addr} --key {key}`")

    holder: dict = {}

    def work():
        from tvm import rpc as _rpc
        tsess = _rpc.connect_tracker(host, port)
        holder["tracker"] = tsess
        try:
            # max_retry=1: a retry would re-queue the request after a timeout closed it
            return tsess.request(key, priority=1, session_timeout=session_timeout, max_retry=1)
        finally:
            tsess.close()

    def timed_out():
        tsess = holder.get("tracker")
        if tsess is not None:
            try:  # closing the socket ends the queued request in the worker thread
                tsess.close()
            except Exception:  # noqa: BLE001
                pass
        raise DeviceError(
            f"RPC tracker at {addr} has {info['servers']} server(s) under key '{key}' but "
            f"none became free within {timeout_s:g} s (all busy, or a registered server "
            f"died); check `python -m tvm.exec.query_rpc_tracker --host {host} --port {port}`")

    try:
        return _run_with_deadline(work, left(), timed_out, _close_session)
    except DeviceError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DeviceError(f"getting a '{key}' session from the RPC tracker at {addr} failed: "
                          f"{_tvm_error_text(err)}; {_TRACKER_HINT}") from None


# --------------------------------------------------------------------------
# local server / tracker processes
# --------------------------------------------------------------------------

class RPCProcess:
    """A TVM RPC server or tracker running as a subprocess (its own process group).

    ``.address`` is ``"host:port"``; ``.stop()`` ends the whole process group
    (TVM forks a worker and a process per session); usable as a context manager.
    """

    def __init__(self, kind: str, proc: subprocess.Popen, host: str, port: int,
                 log_path: Path, workdir: Optional[tempfile.TemporaryDirectory]):
        self.kind = kind
        self.host = host
        self.port = port
        self.log_path = log_path
        self._proc = proc
        self._workdir = workdir
        self._stopped = False
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def address(self) -> str:
        return _fmt(self.host, self.port)

    def alive(self) -> bool:
        return not self._stopped and self._proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001
            pass
        _kill_group(self._proc, timeout)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "RPCProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<RPCProcess {self.kind} {self.address} pid={self.pid} {state}>"


def _kill_group(proc: subprocess.Popen, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the leader may be gone while forked children linger in the group
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, n: int = 15) -> str:
    lines = text.strip().splitlines()[-n:]
    return "\n".join("    " + ln for ln in lines)


def _spawn(kind: str, module: str, host: str, port: int, extra: list[str],
           startup_timeout: float, python: Optional[str]) -> RPCProcess:
    if port < 0 or port > 65535:
        raise InputError(f"port must be 0 (any free port) or 1-65535, got {port}")
    if port == 0:
        # TVM's servers cannot bind port 0 (they treat the bound port 0 as a
        # failure), so pick a free port and let them search a range from it.
        first = _free_port(host)
        last = min(first + 64, 65536)
    else:
        first, last = port, port + 1
    workdir = tempfile.TemporaryDirectory(prefix=f"qcompile-rpc-{kind}-")
    log_path = Path(workdir.name) / f"{kind}.log"
    cmd = [python or sys.executable, "-m", module, "--host", host,
           "--port", str(first), "--port-end", str(last), *extra]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=workdir.name, env=env, start_new_session=True)
    handle = RPCProcess(kind, proc, host, 0, log_path, workdir)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            m = _BIND_RE.search(handle.log())
            if m:
                handle.port = int(m.group(2))
                break
            if proc.poll() is not None:
                raise DeviceError(f"RPC {kind} ({' '.join(cmd)}) exited with code "
                                  f"{proc.returncode} before binding a port; its log:\n"
                                  f"{_tail(handle.log())}")
            if time.monotonic() > deadline:
                raise DeviceError(f"RPC {kind} did not bind a port within {startup_timeout:g} s; "
                                  f"its log:\n{_tail(handle.log())}")
            time.sleep(0.05)
        while True:
            try:
                left = max(min(deadline - time.monotonic(), 2.0), 0.2)
                if kind == "tracker":
                    _tracker_request(host, handle.port, left, [_TRACKER_SUMMARY])
                else:
                    _probe_server(host, handle.port, left)
                break
            except DeviceError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise DeviceError(f"RPC {kind} on {handle.address} does not answer ({err}); "
                                      f"its log:\n{_tail(handle.log())}") from None
                time.sleep(0.1)
    except BaseException:
        handle.stop()
        raise
    return handle


def start_tracker(host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60,
                  python: Optional[str] = None) -> RPCProcess:
    """Start ``python -m tvm.exec.rpc_tracker`` on a free port (or ``port``).

    Returns once the tracker answers; ``.address`` is ``"host:port"``.
    """
    return _spawn("tracker", "tvm.exec.rpc_tracker", host, port, [], startup_timeout, python)


def start_server(host: str = "127.0.0.1", port: int = 0, tracker: Optional[str] = None,
                 key: Optional[str] = None, startup_timeout: float = 60,
                 python: Optional[str] = None) -> RPCProcess:
    """Start ``python -m tvm.exec.rpc_server`` on a free port (or ``port``).

    With ``tracker="HOST:PORT"`` and ``key`` it registers under ``key``, and this
    returns only once the tracker lists it. Binds ``host`` (loopback by default):
    the server runs any code uploaded to it.
    """
    extra: list[str] = []
    if tracker is not None:
        if not key:
            raise InputError("start_server(tracker=...) needs key=: the key to register under")
        thost, tport = parse_address(tracker, "tracker")
        extra += ["--tracker", _fmt(thost, tport), "--key", key]
    elif key:
        extra += ["--key", key]
    t0 = time.monotonic()
    handle = _spawn("server", "tvm.exec.rpc_server", host, port, extra, startup_timeout, python)
    if tracker is None:
        return handle
    try:
        while True:
            keys = _tracker_keys(tracker_summary(tracker, timeout_s=5))
            if keys.get(key, {}).get("free", 0) > 0:
                return handle
            if not handle.alive():
                raise DeviceError(f"RPC server {handle.address} exited before registering with "
                                  f"the tracker {tracker}; its log:\n{_tail(handle.log())}")
            if time.monotonic() - t0 > startup_timeout:
                raise DeviceError(f"RPC server {handle.address} did not register with the tracker "
                                  f"{tracker} under key '{key}' within {startup_timeout:g} s; "
                                  f"its log:\n{_tail(handle.log())}")
            time.sleep(0.1)
    except BaseException:
        handle.stop()
        raise


# --------------------------------------------------------------------------
# using a session
# --------------------------------------------------------------------------

def upload_and_load(session, lib_path, remote_name: Optional[str] = None):
    """Upload a compiled library (``export_library`` output) and load it remotely.

    The remote file name carries a hash of the content: a remote ``dlopen`` of a
    name already loaded in the session returns the old library, so two
    artifacts both called ``lib.so`` would otherwise silently alias.
    Returns the remote module (``relax.VirtualMachine(rmod, remote_device(sess))``).
    """
    path = Path(lib_path)
    if not path.is_file():
        raise ArtifactError(f"library {path} does not exist; build it first "
                            f"(qcompile compile) or check the artifact directory")
    data = path.read_bytes()
    if remote_name is None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        suffix = "".join(path.suffixes[-1:]) or ".so"
        remote_name = f"{path.stem}-{digest}{suffix}"
    try:
        session.upload(bytearray(data), target=remote_name)
    except Exception as err:  # noqa: BLE001
        raise DeviceError(f"uploading {path} ({len(data)} bytes) to the board failed: "
                          f"{_tvm_error_text(err)}; is the RPC session still open?") from None
    try:
        return session.load_module(remote_name)
    except Exception as err:  # noqa: BLE001
        raise DeviceError(
            f"the board could not load {path}: {_tvm_error_text(err)}; was it compiled and "
            f"linked for the board's architecture (an x86_64 library cannot load on an "
            f"aarch64 board: use the board's target and its cross-compiler)?") from None


def remote_device(session, dev_id: int = 0):
    """The board's CPU device, for ``relax.VirtualMachine(rmod, dev)`` and tensors."""
    try:
        return session.cpu(dev_id)
    except Exception as err:  # noqa: BLE001
        raise DeviceError(f"cannot get the board's CPU device: {_tvm_error_text(err)}") from None


BOARD_INFO_PATH = "/etc/qcompile-board.json"


def board_info(session) -> dict:
    """What the board says about itself, or ``{}``.

    The emulated board (``tools/arm-board``) ships ``/etc/qcompile-board.json``
    with ``{"emulated": true, "emulator": "qemu-user", "arch": "aarch64", ...}``
    so a report can label its timings as emulated. Real boards have no such file.
    """
    try:
        raw = session.download(BOARD_INFO_PATH)
        info = json.loads(bytes(raw).decode())
        return info if isinstance(info, dict) else {}
    except Exception:  # noqa: BLE001 - absent file, old server, closed session
        return {}


@contextlib.contextmanager
def remote_errors(address: str, action: str):
    """Turn a failure of a remote call into :class:`DeviceError` naming the board.

    A board that dies mid-run makes the next remote call raise a bare TVM error
    ("Check failed: code == RPCCode::kReturn"); wrap each step so the report can
    say which step on which board failed and keep what was already measured::

        with rpc.remote_errors(addr, "timing the int8 module"):
            res = vm.time_evaluator("main", dev, number=10, repeat=3)(*args)
    """
    try:
        yield
    except DeviceError:
        raise
    except (RuntimeError, OSError) as err:
        full = str(err).lower()
        lost = isinstance(err, OSError) or any(
            w in full for w in ("rpccode", "connection", "socket", "closed", "reset",
                                "broken pipe", "rpcsessiontimeout"))
        hint = ("the board died or dropped the session (check `tools/arm-board status` or the "
                "board's server), reconnect and retry" if lost else
                "the board reported this error while running")
        raise DeviceError(f"{action} on the board at {address} failed: "
                          f"{_tvm_error_text(err)}; {hint}") from err
