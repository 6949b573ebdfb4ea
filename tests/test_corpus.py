"""Every bad input of the corpus (tests/bad_inputs.py) through the real CLI entry points.

The items run in a worker subprocess (``python tests/test_corpus.py --worker``)
that loops over them, calling ``qcompile.cli.main(argv)`` in-process and
reporting one JSON line per item. A segfault or abort kills only the worker:
the parent records a crash for the item it was running and starts a new
worker; an item that runs past ``ITEM_TIMEOUT_S`` is a hang (the worker is
killed and restarted). The worker runs with HOME, TMPDIR and its working
directory inside the test's tmp tree, and the tree is compared before and
after, so a file written anywhere but the item's own output directory is seen.

For each item it asserts: exit code 2 with exactly one ``qcompile: error:``
line, last in stderr, that names the bad file (or, for ``expect == "any"``
items such as a bit flip that lands in a weight, exit 0); no Python traceback;
no crash signal; no hang; nothing written outside the output directory and no
``.partial-*`` staging directory left behind. At the end it prints the figure
"N bad inputs tried, 0 crashes, 0 hangs, 0 files outside the output dir".

Environment: ``QCOMPILE_CORPUS_SEED`` (default 0) picks another corpus;
``QCOMPILE_CORPUS_REPORT=path.json`` writes the per-item results.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ITEM_TIMEOUT_S = 60.0
WORKER_START_TIMEOUT_S = 120.0
MEMORY_LIMIT_BYTES = 8 << 30  # a runaway allocation fails instead of swapping the machine
MARK = "@@qcompile-corpus@@ "


# --------------------------------------------------------------------------- worker side
def _worker() -> None:  # pragma: no cover - runs in the subprocess
    import contextlib
    import io
    import resource
    import traceback

    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):
        pass
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray C++ prints to stdout must not corrupt the result channel
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.path.insert(0, str(REPO))
    from qcompile.cli import main

    caps = {"tune": False, "quantize": False}
    try:
        import importlib.util

        caps["tune"] = importlib.util.find_spec("qcompile.tune") is not None
    except Exception:  # noqa: BLE001
        pass
    try:
        from qcompile.quantize import load_calibration  # noqa: F401

        caps["quantize"] = True
    except Exception:  # noqa: BLE001
        pass
    import tvm  # noqa: F401 - pay the import once, before the first item's clock
    from tvm.relax.frontend.onnx import from_onnx  # noqa: F401

    _warm_caches()

    channel.write(MARK + json.dumps({"ready": True, **caps}) + "\n")
    import gc

    gc.freeze()  # the imports' objects: the per-item collection below skips them
    for line in sys.stdin:
        request = json.loads(line)
        out = io.StringIO()
        status, rc, trace = "returned", None, ""
        started = time.monotonic()
        sys.stderr.flush()
        # stderr stays on fd 2 (a file the parent reads), so Python's and TVM's C++
        # messages keep their order, as a user's terminal shows them
        selftest = request.get("selftest")  # the harness's own test: crash or hang here
        if selftest == "segfault":
            import ctypes

            ctypes.string_at(0)
        elif selftest == "hang":
            time.sleep(3600)
        with contextlib.redirect_stdout(out):
            try:
                rc = main(request["argv"])
            except SystemExit as exc:
                status, rc = "exit", exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported, not hidden
                status, trace = "exception", traceback.format_exc()
        gc.collect()  # what a process exit would free (and print from C++ destructors)
        sys.stderr.flush()
        channel.write(MARK + json.dumps({"id": request["id"], "status": status, "rc": rc,
                                         "stdout": out.getvalue(), "traceback": trace,
                                         "seconds": time.monotonic() - started}) + "\n")


def _warm_caches() -> None:  # pragma: no cover - runs in the subprocess
    """A user's machine has warm tool caches: matplotlib's font list (MPLCONFIGDIR) and
    onnxruntime's device id (~/.cache/Microsoft). Make them before the "before"
    snapshot, so that the check sees qcompile's writes, not those of a first import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        pass
    try:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as qcompile.measure does
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except ImportError:
        pass


# --------------------------------------------------------------------------- parent side
class Worker:
    """One worker subprocess; ``run(item)`` returns its result or a crash/hang record."""

    def __init__(self, root: Path):
        self.root = root
        self.stderr_path = root / "worker-stderr.log"
        env = dict(os.environ)
        env.update({"HOME": str(root / "home"), "TMPDIR": str(root / "tmp"),
                    "MPLCONFIGDIR": str(root / "home" / ".mpl"),
                    "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
                    "PYTHONFAULTHANDLER": "1"})  # a crash prints where it happened
        self.stderr_file = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "test_corpus.py"), "--worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr_file,
            cwd=root / "cwd", env=env, start_new_session=True)
        self.buffer = b""
        ready = self._read(WORKER_START_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            self.kill()
            raise RuntimeError(f"corpus worker did not start: {ready}; see {self.stderr_path}")
        self.caps = ready

    def _read(self, timeout: float):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(MARK):
                    return json.loads(text[len(MARK):])
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return None  # EOF: the worker died
                self.buffer += chunk

    def stderr_tail(self, start: int) -> str:
        self.stderr_file.flush()
        with open(self.stderr_path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")

    def run(self, item_id: str, argv: list[str], timeout: float, selftest: str = "") -> dict:
        start = self.stderr_path.stat().st_size
        self.proc.stdin.write((json.dumps({"id": item_id, "argv": argv,
                                           "selftest": selftest}) + "\n").encode())
        self.proc.stdin.flush()
        result = self._read(timeout)
        if result == "timeout":
            self.kill()
            return {"id": item_id, "status": "hang", "stderr": self.stderr_tail(start)}
        if result is None:
            code = self.proc.wait(10)
            return {"id": item_id, "status": "crash", "signal": -code if code < 0 else None,
                    "exit_code": code, "stderr": self.stderr_tail(start)}
        result["stderr"] = self.stderr_tail(start)
        return result

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr_file.close()


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple]:
    """Every path under ``root`` (not under ``skip``) with its type, size and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        filenames = [f for f in filenames if here / f not in skip]
        for name in dirnames + filenames:
            path = here / name
            st = path.lstat()
            state[str(path.relative_to(root))] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns)
    return state


def run_corpus(root: Path, items, timeout: float = ITEM_TIMEOUT_S):
    """Run the items; returns (results by id, capabilities, files outside output dirs)."""
    for sub in ("out", "tmp", "home", "cwd"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    watched_skip = {root / "out", root / "worker-stderr.log"}
    worker = Worker(root)  # warms the tools' caches in HOME first (see _warm_caches)
    before = snapshot(root, watched_skip)
    caps = dict(worker.caps)
    results = {}
    outside: list[str] = []
    try:
        for item in items:
            if item.needs and not caps.get(item.needs):
                results[item.id] = {"id": item.id, "status": "not-run",
                                    "why": f"qcompile.{item.needs} not available"}
                continue
            out = root / "out" / item.id
            out.mkdir(parents=True, exist_ok=True)
            argv = [a.replace("{out}", str(out)) for a in item.argv]
            if not worker.alive():
                worker = Worker(root)
            result = worker.run(item.id, argv, timeout)
            if result["status"] in ("hang", "crash"):
                worker.kill()
                worker = Worker(root)
            results[item.id] = result
            # the output directory may hold only the named outputs, never staging dirs
            for path in out.rglob("*"):
                rel = path.relative_to(out)
                if rel.parts[0] not in ("artifact", "report") or \
                        any(p.startswith(".") for p in rel.parts):
                    outside.append(f"{item.id}: {path}")
            for left in (root / "tmp").iterdir():
                outside.append(f"{item.id}: {left}")
                shutil.rmtree(left, ignore_errors=True) if left.is_dir() else left.unlink()
    finally:
        worker.close()
    after = snapshot(root, watched_skip)
    for path in sorted(set(after) - set(before)):
        outside.append(f"new: {root / path}")
    for path in sorted(set(before) & set(after)):
        if before[path] != after[path] and before[path][0] != 4:  # ignore dir mtimes
            outside.append(f"modified: {root / path}")
    return results, caps, outside


def check_result(item, result) -> list[str]:
    """What is wrong with one item's outcome (empty: fine)."""
    status = result["status"]
    if status == "not-run":
        return []
    if status in ("crash", "hang"):
        detail = result.get("signal") or result.get("exit_code") or ""
        return [f"{status} {detail} {result.get('stderr', '')[-800:]}"]
    problems = []
    stderr = result.get("stderr", "")
    if status == "exception" or "Traceback (most recent call last)" in stderr:
        problems.append("Python traceback: " + (result.get("traceback") or stderr)[-1500:])
        return problems
    rc = result.get("rc")
    if rc == 0 and item.expect == "any":
        return []
    if rc != 2:
        problems.append(f"exit code {rc} (expected 2); stderr: {stderr[-600:]}")
        return problems
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    # qcompile's own errors, or argparse's ("qcompile measure: error: argument ...")
    errors = [ln for ln in lines if re.match(r"qcompile( [a-z]+)?: error: ", ln)]
    if len(errors) != 1 or lines[-1] != errors[0]:
        problems.append(f"not one final 'qcompile: error:' line: {stderr[-800:]!r}")
    elif item.names not in errors[0]:
        problems.append(f"error does not name {item.names}: {errors[0]}")
    return problems


# --------------------------------------------------------------------------- the test
def test_corpus(tmp_path, capsys):
    sys.path.insert(0, str(HERE))
    import bad_inputs

    seed = int(os.environ.get("QCOMPILE_CORPUS_SEED", "0"))
    started = time.monotonic()
    items = bad_inputs.generate(tmp_path / "gen", seed)
    again = bad_inputs.generate(tmp_path / "gen2", seed)
    assert [i.kind for i in items] == [i.kind for i in again], "generator is not reproducible"
    for a, b in zip(items, again):  # same seed, same bytes (paths embedded aside)
        if a.category in ("onnx", "eval-npz", "qdq") and "absolute" not in a.kind and \
                Path(a.path).is_file():
            assert Path(a.path).read_bytes() == Path(b.path).read_bytes(), a.id
    results, caps, outside = run_corpus(tmp_path, items)
    failures = {}
    for item in items:
        problems = check_result(item, results[item.id])
        if problems:
            failures[item.id] = problems
    tried = [r for r in results.values() if r["status"] != "not-run"]
    crashes = sum(r["status"] == "crash" for r in tried)
    hangs = sum(r["status"] == "hang" for r in tried)
    accepted = sorted(i.id for i in items if results[i.id].get("rc") == 0)
    not_run = sorted({i.needs for i in items if results[i.id]["status"] == "not-run"})
    figure = (f"{len(tried)} bad inputs tried, {crashes} crashes, {hangs} hangs, "
              f"{len(outside)} files outside the output dir")
    report_path = os.environ.get("QCOMPILE_CORPUS_REPORT")
    if report_path:
        Path(report_path).write_text(json.dumps(
            {"figure": figure, "seed": seed, "capabilities": caps, "failures": failures,
             "outside": outside, "accepted": accepted,
             "items": [{**i.to_dict(), "result": results[i.id]} for i in items]}, indent=1))
    with capsys.disabled():
        print(f"\n[corpus seed {seed}] {figure}; {len(failures)} items with other problems; "
              f"{len(accepted)} mutated inputs accepted as valid; "
              f"not run (module absent): {not_run or 'none'}; "
              f"{time.monotonic() - started:.0f} s")
    assert len(tried) >= 200, f"only {len(tried)} items ran"
    assert not outside, "files written outside the output dir:\n" + "\n".join(outside[:30])
    assert not failures, "\n".join(f"{k}: {v}" for k, v in list(failures.items())[:40]) + \
        f"\n({len(failures)} failing items)"


def test_harness_counts_crashes_and_hangs(tmp_path):
    """The figure is only worth something if a crash and a hang are seen: a worker that
    segfaults or stops answering is recorded as such (and the corpus loop replaces it)."""
    from types import SimpleNamespace

    for sub in ("out", "tmp", "home", "cwd"):
        (tmp_path / sub).mkdir()
    worker = Worker(tmp_path)
    try:
        fine = worker.run("before", ["compile", str(tmp_path / "none.onnx"), "-o",
                                     str(tmp_path / "out" / "a")], 60)
        crashed = worker.run("crash", ["targets"], 60, selftest="segfault")
        assert crashed["status"] == "crash" and crashed["signal"] == signal.SIGSEGV
        # faulthandler (or TVM's own handler, which takes over SIGSEGV) says where
        assert "Fatal Python error" in crashed["stderr"] or \
            "Segfault encountered" in crashed["stderr"], crashed["stderr"][-500:]
        assert not worker.alive()
        worker = Worker(tmp_path)
        hung = worker.run("hang", ["targets"], 2, selftest="hang")
        assert hung["status"] == "hang" and not worker.alive()
    finally:
        worker.close()
    item = SimpleNamespace(expect="error", names=str(tmp_path / "none.onnx"))
    assert check_result(item, fine) == [], fine
    assert check_result(item, crashed) and check_result(item, hung)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
