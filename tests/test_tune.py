"""qcompile.tune: MetaSchedule tuning into an append-only JSON database, and reading it back.

One tiny model (a 32x64 @ 64x64 matmul + relu: one fused kernel) is tuned once for a
few trials per module; the database tests work on copies of that log directory.
Kill-safety, RPC boards and Ctrl-C are in test_tune_slow.py (marked slow).
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from qcompile.errors import TuningError

TARGET = "x86_64-avx2"
# Small everything: 2 shared cores. No default-schedule baseline: with 4 trials the
# records rarely beat the default schedules, and these tests check that records are used
# (test_resume_with_budget... measures the baseline).
FAST = dict(trials_per_iter=2, population=16, builder_workers=2, baseline=False)


def tiny_mod(n: int = 32, k: int = 64, m: int = 64, seed: int = 0):
    from tvm import relax

    w = np.random.RandomState(seed).randn(k, m).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    return bb.get(), w


def record_lines(log_dir: Path) -> list[str]:
    path = Path(log_dir) / "database_tuning_record.json"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(log_dir, summary, module, weight): the tiny model tuned for 4 trials."""
    from qcompile.tune import tune

    mod, w = tiny_mod()
    log_dir = tmp_path_factory.mktemp("tune") / "tiny-x86_64-avx2"
    summary = tune(mod, TARGET, log_dir, trials=4, model_name="tiny",
                   **{**FAST, "trials_per_iter": 4})  # one batch
    return log_dir, summary, mod, w


@pytest.fixture
def log_copy(tuned, tmp_path):
    dst = tmp_path / "log"
    shutil.copytree(tuned[0], dst, ignore=shutil.ignore_patterns("logs"))
    return dst


# ----------------------------------------------------------------------------- tuning


def test_tune_writes_records_that_compile_uses(tuned):
    import tvm
    from tvm import relax

    from qcompile.pipeline import compile_relax
    from qcompile.target import get_target
    from qcompile.tune import coverage_detail, database_coverage, load_database

    log_dir, summary, mod, w = tuned
    assert summary.measured and summary.stopped == "done"
    assert summary.trials_run >= 4 and not summary.resumed
    assert len(summary.tasks) == 1 and summary.tasks[0].best_us is not None
    assert summary.estimated_latency_us == pytest.approx(summary.tasks[0].best_us)
    assert json.loads(json.dumps(summary.to_dict(), default=str))["trials_run"] >= 4
    assert len(record_lines(log_dir)) == summary.trials_run
    meta = json.loads((log_dir / "qcompile_tune.json").read_text())
    assert meta["target"] == TARGET and meta["runs"][-1]["trials"] == summary.trials_run

    spec = get_target(TARGET)
    db = load_database(log_dir)
    assert database_coverage(mod, spec, db) == (1, 1)
    tuned_names, untuned = coverage_detail(mod, spec, db)
    assert untuned == [] and len(tuned_names) == 1

    x = np.random.RandomState(1).randn(32, 64).astype("float32")
    expect = np.maximum(x @ w, 0)
    for database in (None, db):
        ex = compile_relax(mod, spec, database=database)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_records_match_compile_for_the_bundled_model(bundled_model):
    """Tasks come from the very fused module compile builds: same kernels, by name."""
    import tvm

    from qcompile.frontend import import_onnx
    from qcompile.pipeline import fuse
    from qcompile.target import get_target
    from qcompile.tune import extract_tasks

    spec = get_target(TARGET)
    mod = import_onnx(bundled_model).mod
    fused = fuse(mod, spec.tvm_target())
    kernels = {gv.name_hint for gv, f in fused.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    tasks = extract_tasks(mod, spec)
    assert {t.task_name for t in tasks} == kernels
    assert any("conv2d" in t.task_name for t in tasks)


def test_shipped_log_records_are_found_by_compile_for_the_int8_model(bundled_model):
    """Every kernel of the bundled int8 model is in the shipped log, and compile's own
    pass (MetaScheduleApplyDatabase) finds a record for each: no "record not found"."""
    from qcompile.frontend import import_onnx
    from qcompile.quantize import QuantConfig, quantize_model
    from qcompile.quantize.calibrate import load_calibration
    from qcompile.target import get_target
    from qcompile.tune import SHIPPED_LOG_DIR, coverage_detail, extract_tasks, inspect_database

    spec = get_target(TARGET)
    imp = import_onnx(bundled_model)
    calib = load_calibration(bundled_model.parent / "fashion_mnist_calib.npz", imp.inputs)
    mod = quantize_model(imp, calib, QuantConfig(), spec).mod
    log = SHIPPED_LOG_DIR / f"fashion_mnist_cnn-{TARGET}"
    db, _ = inspect_database(log, spec, keep_slower=True)  # every record, won or lost
    tasks = extract_tasks(mod, spec)
    in_log = [t.task_name for t in tasks if db.has_workload(t.dispatched[0])]
    tuned, untuned = coverage_detail(mod, spec, db)
    # tune skips kernels under 3 % of the default end-to-end time (here the input
    # quantize, the 10-wide final matmul and a reshape); every conv is in the log
    assert len(in_log) >= len(tasks) - 3
    assert {t.task_name for t in tasks if "conv2d" in t.task_name} <= set(in_log)
    assert set(in_log) <= set(tuned), f"records not applied by compile: {untuned}"


def test_rerun_resumes_and_has_nothing_left(tuned, log_copy):
    from qcompile.tune import tune

    _, summary, mod, _ = tuned
    before = record_lines(log_copy)
    again = tune(mod, TARGET, log_copy, trials=summary.trials_run, model_name="tiny",
                 progress=False, **FAST)
    assert again.resumed and again.stopped == "nothing-to-do" and again.trials_run == 0
    assert again.trials_before == summary.trials_run
    assert again.tasks[0].best_us == pytest.approx(summary.tasks[0].best_us)
    assert record_lines(log_copy) == before


def test_resume_with_budget_continues_and_stops_cleanly(tuned, log_copy, capsys):
    from qcompile.tune import load_database, tune

    _, summary, mod, _ = tuned
    before = record_lines(log_copy)
    # A tiny budget: it is spent before the first batch is recorded, so the run stops
    # right after that batch.
    again = tune(mod, TARGET, log_copy, trials=200, budget_minutes=0.001, model_name="tiny",
                 **{**FAST, "baseline": True})
    assert again.resumed and again.trials_before == len(before)
    assert again.stopped == "budget" and 0 < again.trials_run < 200
    after = record_lines(log_copy)
    assert after[:len(before)] == before and len(after) == len(before) + again.trials_run
    err = capsys.readouterr().err
    assert "resuming" in err and "budget" in err and "est. end-to-end" in err
    assert "default schedules measured" in err
    # the default schedule's latency is kept with the log, keyed by workload
    task = again.tasks[0]
    assert task.default_us is not None and again.estimated_default_us == task.default_us
    meta = json.loads((log_copy / "qcompile_tune.json").read_text())
    assert meta["baseline_us"][task.workload] == pytest.approx(task.default_us)
    # the run ended by re-timing its best record next to the default schedule, both
    # inside the compiled model; that side-by-side alone decides what compile applies
    verified = meta["verified"][task.workload]
    assert verified["in_model"] and verified["best_us"] > 0 and verified["default_us"] > 0
    assert "inside the compiled model" in err
    db, reports = load_database(log_copy, with_report=True)
    kept = len(db.get_all_tuning_records())
    from qcompile.tune_verify import kernel_wins

    if kernel_wins(verified):  # won by the margin in the model, and with the model:
        # compile loads that workload's best record only (not every trial of it)
        assert len(again.tasks) == 1 and kept == 1
    else:  # records not faster than the default schedule are not applied
        assert kept == 0 and reports[0].slower_than_default == 1


def test_in_model_timing_covers_every_kernel_compile_runs(tuned):
    """The instrument sees each fused kernel the VM calls, keyed like the database."""
    from qcompile.pipeline import compile_relax
    from qcompile.target import get_target
    from qcompile.tune import load_database
    from qcompile.tune_verify import kernel_workloads, random_inputs, time_in_model

    _, summary, mod, _ = tuned
    spec = get_target(TARGET)
    names = kernel_workloads(mod, spec)
    assert set(names.values()) == {summary.tasks[0].workload}  # one kernel, the task's key
    exes = {"default": compile_relax(mod, spec),
            "tuned": compile_relax(mod, spec, load_database(tuned[0]))}
    kernels, e2e = time_in_model(exes, names, random_inputs(mod), rounds=2, runs_per_round=3)
    for label in exes:
        assert set(kernels[label]) == {summary.tasks[0].workload}
        # a kernel runs inside its model: its time is part of the end-to-end time
        assert 0 < kernels[label][summary.tasks[0].workload] < e2e[label] * 5


def test_verify_in_model_decides_what_compile_applies(tuned, log_copy):
    from qcompile.target import get_target
    from qcompile.tune import database_coverage, load_database, verify

    _, summary, mod, _ = tuned
    spec = get_target(TARGET)
    key = summary.tasks[0].workload
    res = verify(mod, TARGET, log_copy, progress=False)
    v = res["kernels"][key]
    assert v["in_model"] and v["best_trial_us"] == pytest.approx(summary.tasks[0].best_us)
    assert res["end_to_end"]["default_us"] > 0 and res["end_to_end"]["all_best_us"] > 0
    meta_path = log_copy / "qcompile_tune.json"
    assert json.loads(meta_path.read_text())["verified"][key] == v
    from qcompile.tune_verify import kernel_wins

    # applied only if it won its kernel by the margin and, with the other winners, the model
    expect = (1, 1) if kernel_wins(v) else (0, 1)
    if v["best_us"] < v["default_us"] * 0.97:
        assert "chosen_us" in res["end_to_end"]
        assert v.get("model_slower", False) != res["end_to_end"]["chosen_applied"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert database_coverage(mod, spec, load_database(log_copy)) == expect
    # the record lost in the model: not applied, even though no baseline says so
    meta = json.loads(meta_path.read_text())
    meta.pop("baseline_us", None)
    meta["verified"][key].update(default_us=1.0, best_us=2.0)
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(Warning, match="faster than the default"):
        assert database_coverage(mod, spec, load_database(log_copy)) == (0, 1)
    # it won its kernel but slowed the model down: not applied either
    meta["verified"][key].update(default_us=2.0, best_us=1.0, model_slower=True)
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(Warning, match="faster than the default"):
        assert database_coverage(mod, spec, load_database(log_copy)) == (0, 1)
    meta["verified"][key].pop("model_slower")
    meta_path.write_text(json.dumps(meta))
    assert database_coverage(mod, spec, load_database(log_copy)) == (1, 1)
    # a faster record was logged after that timing (stale entry): it no longer decides
    meta["verified"][key].update(default_us=1.0, best_us=2.0)
    meta["verified"][key]["best_trial_us"] = 10 * summary.tasks[0].best_us
    meta_path.write_text(json.dumps(meta))
    assert database_coverage(mod, spec, load_database(log_copy)) == (1, 1)


def test_builder_only_when_target_cannot_run_here(monkeypatch, tmp_path, capsys):
    from qcompile.target import TargetSpec
    from qcompile.tune import tune

    monkeypatch.setattr(TargetSpec, "runs_here", lambda self: False)
    mod, _ = tiny_mod()
    summary = tune(mod, "x86_64-avx512-vnni", tmp_path / "vnni", trials=2, model_name="tiny",
                   **FAST)
    assert not summary.measured and summary.stopped == "builder-only"
    assert summary.trials_run >= 2
    assert "RPC board" in summary.message and "--rpc-tracker" in summary.message
    assert record_lines(tmp_path / "vnni") == []
    assert "cannot run on this machine" in capsys.readouterr().err


def test_bad_tracker_argument(tmp_path):
    from qcompile.tune import tune

    mod, _ = tiny_mod()
    with pytest.raises(TuningError, match="HOST:PORT"):
        tune(mod, TARGET, tmp_path / "x", trials=2, rpc_tracker="nonsense", progress=False)


# ----------------------------------------------------------------------------- database files


def _mean_secs(rec):
    return sum(float(v) for v in rec.run_secs) / len(rec.run_secs)


def test_torn_last_line_is_dropped_and_reported(log_copy):
    from qcompile.tune import inspect_database, load_database, repair_log_dir

    rec = log_copy / "database_tuning_record.json"
    good = record_lines(log_copy)
    with open(rec, "a") as fh:  # what SIGKILL in the middle of a write leaves
        fh.write(good[-1][: len(good[-1]) // 2])
    with pytest.warns(Warning, match="torn last line"):
        db, reports = load_database(log_copy, with_report=True)
    assert reports[0].torn_lines
    full, full_report = inspect_database(log_copy, keep_slower=True)
    assert len(full.get_all_tuning_records()) == full_report.records == len(good)
    # compile's view: each workload's best record only (its trace is all compile applies)
    best = {}
    for rec in full.get_all_tuning_records():
        key = str(rec.workload.as_json()[0])
        secs = _mean_secs(rec)
        best[key] = min(best.get(key, secs), secs)
    loaded = db.get_all_tuning_records()
    assert loaded and len({str(r.workload.as_json()[0]) for r in loaded}) == len(loaded)
    assert all(_mean_secs(r) == best[str(r.workload.as_json()[0])] for r in loaded)

    report = repair_log_dir(log_copy)
    assert report.messages and record_lines(log_copy) == good
    assert (log_copy / "database_tuning_record.json.torn").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repaired, _ = inspect_database(log_copy, keep_slower=True)
    assert len(repaired.get_all_tuning_records()) == len(good)


def test_torn_workload_line_drops_its_records(log_copy):
    from qcompile.tune import load_database

    wl = log_copy / "database_workload.json"
    line = wl.read_text().splitlines()[0]
    wl.write_text(line[:40])  # the only workload line is torn
    with pytest.warns(Warning):
        db, reports = load_database(log_copy, with_report=True)
    assert len(db.get_all_tuning_records()) == 0
    assert reports[0].orphan_records == len(record_lines(log_copy))


@pytest.mark.parametrize("garbage", ["{not json}", "\x00\x01\x02\xff" * 8, '{"a": 1}'])
def test_corrupt_line_inside_the_file_names_file_and_line(log_copy, garbage):
    from qcompile.tune import load_database

    rec = log_copy / "database_tuning_record.json"
    lines = record_lines(log_copy)
    rec.write_text("\n".join([lines[0], garbage, *lines[1:]]) + "\n",
                   encoding="utf-8", errors="surrogateescape")
    with pytest.raises(TuningError, match=r"database_tuning_record\.json:2"):
        load_database(log_copy)


def test_totally_corrupt_files(tmp_path):
    from qcompile.tune import load_database

    d = tmp_path / "bad"
    d.mkdir()
    (d / "database_workload.json").write_bytes(b"\x00\xff garbage\n" * 3)
    (d / "database_tuning_record.json").write_text("")
    with pytest.raises(TuningError, match=r"database_workload\.json:1"):
        load_database(d)
    with pytest.raises(TuningError, match="does not exist"):
        load_database(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TuningError):
        load_database(tmp_path / "file")


def _retarget(log_dir: Path, target: dict) -> None:
    rec = log_dir / "database_tuning_record.json"
    out = []
    for line in record_lines(log_dir):
        obj = json.loads(line)
        obj[1][2] = target
        out.append(json.dumps(obj))
    rec.write_text("\n".join(out) + "\n")


def test_records_of_another_target_are_ignored(tuned, log_copy):
    from qcompile.target import get_target
    from qcompile.tune import database_coverage, load_database

    mod = tuned[2]
    n = len(record_lines(log_copy))
    _retarget(log_copy, {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})
    with pytest.warns(Warning, match="another target"):
        db, reports = load_database(log_copy, "x86_64-avx2", with_report=True)
    assert reports[0].other_target_records == n and reports[0].records == 0
    assert database_coverage(mod, get_target("x86_64-avx2"), db) == (0, 1)
    # ... and they are exactly the records a VNNI compile wants.
    db, reports = load_database(log_copy, "x86_64-avx512-vnni", with_report=True)
    # (one kernel: its best record is what compile loads)
    assert reports[0].other_target_records == 0 and len(db.get_all_tuning_records()) == 1

    from tvm.target import Target

    _retarget(log_copy, json.loads(json.dumps(dict(Target("nvidia/nvidia-a100").export()),
                                              default=list)))
    with pytest.warns(Warning, match="another target"):
        db = load_database(log_copy, "x86_64-avx2")
    assert len(db.get_all_tuning_records()) == 0


def test_records_slower_than_the_default_schedule_are_not_applied(tuned, log_copy):
    from qcompile.target import get_target
    from qcompile.tune import database_coverage, load_database

    summary, mod = tuned[1], tuned[2]
    task = summary.tasks[0]
    assert task.default_us is None and task.workload  # the fixture measured no baseline
    meta_path = log_copy / "qcompile_tune.json"
    meta = json.loads(meta_path.read_text())
    meta["baseline_us"] = {task.workload: 1e-3}  # a default schedule no record can beat
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(Warning, match="faster than the default"):
        db, reports = load_database(log_copy, with_report=True)
    assert reports[0].slower_than_default == 1 and reports[0].records == 0
    assert database_coverage(mod, get_target(TARGET), db) == (0, 1)


def test_cpu_name_and_core_count_do_not_make_another_target():
    from tvm.target import Target

    from qcompile.tune import target_fingerprint

    avx2 = target_fingerprint(Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2}))
    assert avx2 == target_fingerprint(Target({"kind": "llvm", "mcpu": "znver3",
                                              "num-cores": 16}))
    assert avx2 != target_fingerprint(Target({"kind": "llvm", "mcpu": "cascadelake"}))
    arm = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert target_fingerprint(arm) != avx2


def test_default_log_dir():
    from qcompile.tune import default_log_dir

    assert Path(default_log_dir("fashion_mnist_cnn", TARGET)) == \
        Path("tuning_logs/fashion_mnist_cnn-x86_64-avx2")


# ----------------------------------------------------------------------------- helpers


def test_fast_inspect_gives_the_same_frames():
    from qcompile.tune import fast_inspect

    def inner():
        slow = inspect.stack()
        with fast_inspect():
            fast = inspect.stack()
            outer_fast = inspect.getouterframes(inspect.currentframe())
        return slow, fast, outer_fast

    slow, fast, outer_fast = inner()
    assert inspect.stack.__module__ == "inspect"  # restored
    assert len(fast) == len(slow) == len(outer_fast)
    assert fast[0].frame is slow[0].frame and fast[0].function == "inner"
    for a, b in zip(fast[1:], slow[1:]):
        assert (a.frame, a.filename, a.lineno, a.function, a.code_context) == \
            (b.frame, b.filename, b.lineno, b.function, b.code_context)
    assert "slow = inspect.stack()" in slow[0].code_context[0]
    assert "fast = inspect.stack()" in fast[0].code_context[0]
    del slow, fast, outer_fast


def test_tune_cli_arguments(monkeypatch, tmp_path):
    import argparse

    from qcompile import tune_cli

    parser = argparse.ArgumentParser()
    tune_cli.add_arguments(parser)
    args = parser.parse_args(["--trials", "8", "--budget-minutes", "2.5", "--log", "L",
                              "--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "k"])
    assert (args.trials, args.budget_minutes, args.log, args.rpc_tracker, args.rpc_key) == \
        (8, 2.5, "L", "127.0.0.1:9190", "k")
    seen = {}

    def fake_tune(mod, spec, log_dir, **kw):
        seen.update(kw, log_dir=log_dir)
        from qcompile.tune import TuneSummary

        return TuneSummary(model="m", target="t", log_dir=str(log_dir), tasks=[],
                           trials_requested=8, trials_run=8, trials_before=0, resumed=False,
                           measured=True, stopped="done", seconds=1.0,
                           estimated_latency_us=None, runner="x", message="ok")

    monkeypatch.setattr("qcompile.tune.tune", fake_tune)
    args.summary_json = str(tmp_path / "s.json")
    assert tune_cli.run(args, None, TARGET, "m") == 0
    assert seen["trials"] == 8 and seen["rpc_tracker"] == "127.0.0.1:9190"
    assert json.loads((tmp_path / "s.json").read_text())["trials_run"] == 8
    with pytest.raises(TuningError):
        tune_cli.run(parser.parse_args(["--trials", "0"]), None, TARGET, "m")
    with pytest.raises(TuningError):
        tune_cli.run(parser.parse_args(["--rpc-key", "k"]), None, TARGET, "m")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


def test_runner_samples_are_reduced_to_their_median():
    """Trials are timed as many short samples; the record keeps the median, so a sample
    hit by another process's time slice does not decide a kernel's latency."""
    from tvm import tirx
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    from qcompile.tune import _median_result, _run_secs_mean

    samples = [2e-5, 1e-5, 9e-4, 1.1e-5, 1.2e-5]  # one preempted sample
    res = _median_result(RunnerResult([tirx.FloatImm("float64", v) for v in samples], None))
    assert res.error_msg is None and _run_secs_mean(res.run_secs) == pytest.approx(1.2e-5)
    failed = RunnerResult(None, "board died")
    assert _median_result(failed).error_msg == "board died"
