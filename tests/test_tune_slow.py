"""qcompile.tune under fire: SIGKILL mid-run and resume, Ctrl-C, a board dying mid-run.

Each test runs real tuning (a tiny one-kernel model, 2-candidate batches) for
a minute or more on 2 shared cores, so all are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from test_tune import FAST, TARGET, record_lines, tiny_mod

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_tune import FAST, tiny_mod
    from qcompile.tune import tune
    mod, _ = tiny_mod()
    s = tune(mod, "x86_64-avx2", sys.argv[1], trials=int(sys.argv[2]), model_name="tiny",
             **FAST)
    print("SUMMARY " + json.dumps({{"stopped": s.stopped, "trials_run": s.trials_run}}))
""")


def _start_tuning(tmp_path: Path, log_dir: Path, trials: int) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "tune_tiny.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(script), str(log_dir), str(trials)],
                                stdout=subprocess.PIPE, stderr=fh, start_new_session=True,
                                cwd=str(tmp_path))
    return proc, err


def _wait_for_records(log_dir: Path, n: int, proc=None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(record_lines(log_dir)) < n:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"tuning exited early ({proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {n} records in {timeout} s")
        time.sleep(0.2)


def _complete_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    return data[:data.rfind(b"\n") + 1].decode().splitlines()


def test_sigkill_mid_run_loses_nothing_and_resumes(tmp_path):
    from qcompile.tune import load_database, tune

    log_dir = tmp_path / "log"
    proc, err = _start_tuning(tmp_path, log_dir, trials=60)
    try:
        _wait_for_records(log_dir, 3, proc)
        time.sleep(1.0)  # somewhere inside the next batch
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its build/run workers
        proc.wait(30)
    rec_path = log_dir / "database_tuning_record.json"
    wl_path = log_dir / "database_workload.json"
    before = _complete_lines(rec_path)
    workloads_before = _complete_lines(wl_path)
    assert len(before) >= 3
    # The worst moment to die: half-way through appending a line.
    with open(rec_path, "a") as fh:
        fh.write(before[-1][: len(before[-1]) // 3])

    with pytest.warns(Warning, match="torn"):
        db = load_database(log_dir)
    assert len(db.get_all_tuning_records()) == len(before)

    mod, _ = tiny_mod()
    summary = tune(mod, TARGET, log_dir, trials=len(before) + 4, model_name="tiny", **FAST)
    assert summary.resumed and summary.trials_before == len(before)
    assert summary.stopped == "done" and summary.trials_run >= 4
    after = record_lines(log_dir)
    assert after[:len(before)] == before  # every record written before the kill is kept
    assert len(after) == len(before) + summary.trials_run
    assert _complete_lines(wl_path)[:len(workloads_before)] == workloads_before
    assert (log_dir / "database_tuning_record.json.torn").exists()
    assert len(load_database(log_dir).get_all_tuning_records()) == len(after)


def test_ctrl_c_stops_cleanly_and_keeps_records(tmp_path):
    log_dir = tmp_path / "log"
    proc, err = _start_tuning(tmp_path, log_dir, trials=60)
    try:
        _wait_for_records(log_dir, 2, proc)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Ctrl-C" in stderr
    summary = json.loads(out.decode().split("SUMMARY ", 1)[1])
    assert summary["stopped"] == "interrupted" and summary["trials_run"] < 60
    assert len(record_lines(log_dir)) == summary["trials_run"]


def test_rpc_tracker_two_boards_one_dies_mid_run(tmp_path):
    from qcompile import rpc
    from qcompile.tune import _FAILED_SECS, tune

    key = "qcompile-tune-test"
    tracker = rpc.start_tracker("127.0.0.1", 0)
    boards = []
    try:
        boards = [rpc.start_server("127.0.0.1", 0, tracker=tracker.address, key=key)
                  for _ in range(2)]
        assert tracker.port > 0 and all(b.port > 0 for b in boards)
        assert len({tracker.port, *(b.port for b in boards)}) == 3
        log_dir = tmp_path / "log"
        killed_at: list[int] = []

        def kill_one_board():
            try:
                _wait_for_records(log_dir, 2, timeout=400)
            except AssertionError:
                return
            killed_at.append(len(record_lines(log_dir)))
            boards[0].stop()

        watcher = threading.Thread(target=kill_one_board, daemon=True)
        watcher.start()
        mod, _ = tiny_mod()
        summary = tune(mod, TARGET, log_dir, trials=10, rpc_tracker=tracker.address,
                       rpc_key=key, model_name="tiny", session_timeout_s=30, **FAST)
        watcher.join(5)
        assert killed_at, "the run ended before a board could be killed"
        assert not boards[0].alive() and boards[1].alive()
        assert summary.measured and summary.stopped == "done" and summary.trials_run >= 10
        assert "2 board(s)" in summary.runner
        lines = record_lines(log_dir)
        after_kill = [json.loads(line) for line in lines[killed_at[0]:]]
        measured = [r for r in after_kill
                    if sum(r[1][1]) / len(r[1][1]) < _FAILED_SECS]
        assert measured, "no record was measured on the surviving board"
        assert summary.tasks[0].best_us is not None
    finally:
        for b in boards:
            b.stop()
        tracker.stop()


def test_fast_tensor_intrinsic_import_registers_the_same_intrinsics(tmp_path):
    """The cheap import (fast_inspect) and the plain one register identical intrinsics."""
    code = textwrap.dedent("""
        import sys, time, hashlib
        import tvm
        t = time.perf_counter()
        if sys.argv[1] == "fast":
            from qcompile.tune import import_tensor_intrinsics
            import_tensor_intrinsics()
        else:
            import tvm.s_tir.tensor_intrin
        took = time.perf_counter() - t
        from tvm.s_tir import TensorIntrin
        names = ["dot_16x4_vnni", "dot_4x4_i8i8s32_sdot", "dp4a_s8s8s32"]
        h = [hashlib.sha1(TensorIntrin.get(n).desc.script().encode()).hexdigest() +
             hashlib.sha1(TensorIntrin.get(n).impl.script().encode()).hexdigest()
             for n in names]
        print(took, " ".join(h))
    """)
    out = {}
    for mode in ("fast", "plain"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             timeout=400)
        assert res.returncode == 0, res.stderr[-2000:]
        took, hashes = res.stdout.strip().splitlines()[-1].split(" ", 1)
        out[mode] = (float(took), hashes)
    assert out["fast"][1] == out["plain"][1]
    assert out["fast"][0] < out["plain"][0]
