"""Autotuning with MetaSchedule (``tvm.s_tir.meta_schedule``) and its XGBoost cost model.

``tune`` extracts the tasks of exactly the fused-TIR module ``compile`` builds
(:func:`qcompile.pipeline.fuse`), tunes them with MetaSchedule's gradient task
scheduler, evolutionary search and XGB cost model, and appends every measured
schedule to a MetaSchedule ``JSONDatabase`` in ``log_dir``
(``database_workload.json`` + ``database_tuning_record.json``, one JSON value
per line). Nothing here is a tuner, tracker, runner or cost model of its own:
it wires TVM's together and adds what a user needs around them:

* **Kill safety.** The database is append-only: MetaSchedule appends one line
  per workload/record as soon as it is measured. A SIGKILL can at worst leave a
  torn *last* line; :func:`load_database` drops it and reports it, and
  :func:`tune` moves it aside (``*.torn``) before appending again, so no record
  written before the kill is lost.
* **Resume.** ``trials`` is the total for the model: a second run counts the
  records already in the database for these workloads and tunes the rest,
  seeded from those records.
* **Budget / Ctrl-C.** A measure callback stops the scheduler after the batch
  in flight once ``budget_minutes`` is spent or on the first Ctrl-C (a second
  Ctrl-C aborts at once). Records measured so far are kept either way.
* **Boards.** ``rpc_tracker="host:port"`` measures through MetaSchedule's
  ``RPCRunner`` on every board registered under ``rpc_key``; a trial whose
  board died is re-submitted (through the same RPC runner, so the tracker
  hands it to a live board). Targets that cannot run here and have no tracker
  get a builder-only run that says so.
* **Builder workers** pre-import TVM's tensor intrinsics, with the import made
  cheap (about 18 s -> 3 s here, 47-70 s elsewhere): TVMScript's parser calls
  ``inspect.stack()`` for every ``@T.prim_func``, and ``inspect`` resolves the
  module of every frame through ``sys.modules`` each time. While importing, a
  frame walker that reads the same file/line information straight from the
  frames stands in for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from . import threads as threads_mod
from .errors import TuningError
from .tune_verify import kernel_wins

DB_WORKLOAD = "database_workload.json"
DB_RECORD = "database_tuning_record.json"
META_FILE = "qcompile_tune.json"
# MetaSchedule stores a failed build/run as a record with this run time.
_FAILED_SECS = 1e9
SHIPPED_LOG_DIR = Path(__file__).resolve().parent.parent / "tuning_logs"

_log = logging.getLogger("qcompile.tune")


class TuningLogWarning(UserWarning):
    """A tuning database was loaded with lines dropped or records ignored."""


# --------------------------------------------------------------------------------------
# Cheap import of tvm.s_tir.tensor_intrin (main process and builder workers)
# --------------------------------------------------------------------------------------


def _frame_infos(frame, context: int = 1) -> list:
    import inspect
    import linecache

    infos = []
    while frame is not None:
        code = frame.f_code
        filename, lineno = code.co_filename, frame.f_lineno
        lines, index = None, None
        if context > 0:
            line = linecache.getline(filename, lineno)
            if line:
                lines, index = [line], 0
        infos.append(inspect.FrameInfo(frame, filename, lineno, code.co_name, lines, index))
        frame = frame.f_back
    return infos


def _fast_stack(context: int = 1) -> list:
    return _frame_infos(sys._getframe(1), context)  # pylint: disable=protected-access


@contextlib.contextmanager
def fast_inspect():
    """Make ``inspect.stack``/``getouterframes`` cheap while TVMScript parses at import.

    Same frames, file names, line numbers and (one-line) code context; only the
    per-frame module lookup through ``sys.modules`` (and the source-file search
    it feeds) is skipped.
    """
    import inspect

    saved = inspect.stack, inspect.getouterframes
    inspect.stack, inspect.getouterframes = _fast_stack, _frame_infos
    try:
        yield
    finally:
        inspect.stack, inspect.getouterframes = saved


def import_tensor_intrinsics() -> float:
    """Import ``tvm.s_tir.tensor_intrin`` (registers TVM's tensor intrinsics); seconds taken."""
    start = time.perf_counter()
    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        with fast_inspect():
            import tvm.s_tir.tensor_intrin  # noqa: F401  pylint: disable=unused-import
    return time.perf_counter() - start


def _builder_worker_init(cuda_nvcc: bool = False) -> None:
    """LocalBuilder worker initializer: ignore Ctrl-C, pre-import what builds need."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cuda_nvcc:
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    import tvm  # noqa: F401  pylint: disable=unused-import
    from tvm.s_tir.meta_schedule.builder import local_builder  # noqa: F401

    import_tensor_intrinsics()


def _runner_worker_init() -> None:
    """Runner worker initializer: the parent handles Ctrl-C, workers finish their trial."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _export_cross(cross_compiler: str, mod) -> str:
    """Builder export for cross targets: a shared library linked by the target's compiler."""
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


# --------------------------------------------------------------------------------------
# Target identity of records
# --------------------------------------------------------------------------------------

_ISA_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "amx-int8", "neon", "dotprod",
                 "i8mm", "sve")


def target_fingerprint(target) -> tuple:
    """What makes a record for ``target`` valid on another target.

    Kind, architecture and the int8-relevant ISA features LLVM derives from
    mcpu/mattr; not the CPU name or core count (a record tuned for ``haswell``
    is valid AVX2 code on ``znver3``, but not a ``cascadelake`` VNNI record).
    """
    from tvm.target import Target, codegen

    if not isinstance(target, Target):
        target = Target(target)
    kind = target.kind.name
    if kind == "cuda":
        return ("cuda", str(target.attrs.get("arch", "")))
    if kind != "llvm":
        return (kind,)
    triple = str(target.attrs.get("mtriple", "") or "")
    arch = triple.split("-")[0] if triple else os.uname().machine
    if arch in ("x86_64", "amd64"):
        arch = "x86_64"
    feats = []
    for feat in _ISA_FEATURES:
        try:
            if codegen.target_has_features(feat, target):
                feats.append(feat)
        except Exception:  # noqa: BLE001 - feature unknown to this arch
            pass
    return ("llvm", arch, tuple(feats))


# --------------------------------------------------------------------------------------
# Database files: scan, repair, load
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatabaseReport:
    """What :func:`load_database` found in one log directory."""

    log_dir: str
    workloads: int = 0
    records: int = 0  # usable records kept (measured, for the requested target)
    failed_records: int = 0  # failed builds/runs MetaSchedule logged (never applied)
    other_target_records: int = 0
    other_targets: list = dataclasses.field(default_factory=list)
    torn_lines: list = dataclasses.field(default_factory=list)  # "file:line"
    orphan_records: int = 0  # records whose workload line was torn
    slower_than_default: int = 0  # kernels whose best record lost to the default schedule
    messages: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split_lines(path: Path) -> tuple[list[tuple[int, str]], bytes | None, int]:
    """Complete lines of ``path`` as (lineno, text), the torn tail (or None), good length."""
    data = path.read_bytes()
    lines: list[tuple[int, str]] = []
    good_end = 0
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # no newline: written partly when the process died
            return lines, data[pos:], good_end
        raw = data[pos:nl]
        pos = nl + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or (text.strip() and not _is_json(text)):
            if pos >= len(data) or not data[pos:].strip():
                # The last line, newline and all, but not JSON: treat as torn.
                return lines, data[good_end:], good_end
            raise TuningError(f"{path}:{lineno}: tuning database line is not valid JSON "
                              f"(file corrupt; move it away or delete it to start over)")
        if text.strip():
            lines.append((lineno, text))
        good_end = pos
    return lines, None, good_end


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _scan(log_dir: Path):
    """Parse both files of a JSONDatabase, tolerating a torn last line in each."""
    report = DatabaseReport(log_dir=str(log_dir))
    tails = {}
    workloads = [obj for _, obj in _scan_file(
        log_dir / DB_WORKLOAD, report, tails, "workload entry",
        lambda obj: isinstance(obj, list) and len(obj) == 2)]
    records = [(obj[0], obj[1], lineno) for lineno, obj in _scan_file(
        log_dir / DB_RECORD, report, tails, "tuning record",
        lambda obj: (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
                     and isinstance(obj[1], list) and len(obj[1]) >= 3))]
    return workloads, records, report, tails


def _scan_file(path: Path, report, tails: dict, what: str, is_valid) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of each complete line; a torn last line is noted."""
    if not path.exists():
        return []
    lines, tail, good = _split_lines(path)
    if tail is not None:
        tails[path] = good
        report.torn_lines.append(f"{path}:{len(lines) + 1}")
    entries = []
    for lineno, text in lines:
        obj = json.loads(text)
        if not is_valid(obj):
            raise TuningError(f"{path}:{lineno}: not a MetaSchedule {what}")
        entries.append((lineno, obj))
    return entries


def repair_log_dir(log_dir: str | os.PathLike) -> DatabaseReport:
    """Cut a torn last line off each database file (kept aside as ``<file>.torn``).

    MetaSchedule appends to these files; appending after a line without its
    newline would merge two records into one corrupt line, so :func:`tune`
    calls this before opening the database. Complete lines are never touched.
    """
    log_dir = Path(log_dir)
    _, _, report, tails = _scan(log_dir)
    for path, good_end in tails.items():
        data = path.read_bytes()
        with open(f"{path}.torn", "ab") as aside:
            aside.write(data[good_end:] + b"\n")
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
        msg = (f"{path}: dropped a torn last line ({len(data) - good_end} bytes, from a run "
               f"killed mid-write); kept aside in {path.name}.torn")
        report.messages.append(msg)
    return report


def _run_secs_mean(run_secs) -> float:
    vals = [float(v) for v in (run_secs or [])]
    return sum(vals) / len(vals) if vals else float("inf")


def _meta(log_dir: Path) -> dict:
    try:
        return json.loads((log_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def inspect_database(log_dir, spec=None, *, keep_slower: bool = False):
    """Load one log directory into a MemoryDatabase; returns (database, DatabaseReport).

    Unless ``keep_slower``, only each workload's best record is loaded, and only where it
    beat the default schedule (what compile applies). Records of another target (see
    :func:`target_fingerprint`) and failed trials are left out; a torn last line is dropped
    and reported; any other unreadable line raises :class:`TuningError` naming the file and
    line.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import Target

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise TuningError(f"{log_dir}: tuning log directory does not exist")
    if not (log_dir / DB_WORKLOAD).exists():
        raise TuningError(f"{log_dir}: no {DB_WORKLOAD} here; not a tuning log directory")
    workloads, records, report, _ = _scan(log_dir)
    for torn in report.torn_lines:
        report.messages.append(f"{torn}: dropped a torn last line (a run was killed mid-write)")
    want = None
    if spec is None:
        name = _meta(log_dir).get("target")
        if name:
            from .target import get_target

            try:
                spec = get_target(name)
            except Exception:  # noqa: BLE001 - descriptor gone: keep all records
                spec = None
    if spec is not None:
        want = target_fingerprint(spec.tvm_target())
    db = ms.database.MemoryDatabase(module_equality="structural")
    committed: dict[int, Any] = {}
    fp_cache: dict[str, tuple] = {}
    others: dict[str, int] = {}
    usable = []  # (index, record JSON, line): this target's measured trials
    for index, rec_json, lineno in records:
        if index < 0 or index >= len(workloads):
            report.orphan_records += 1
            continue
        if _run_secs_mean(rec_json[1]) >= _FAILED_SECS:
            report.failed_records += 1
            continue
        tkey = json.dumps(rec_json[2], sort_keys=True)
        if tkey not in fp_cache:
            try:
                fp_cache[tkey] = target_fingerprint(Target(rec_json[2]))
            except Exception as exc:  # noqa: BLE001
                raise TuningError(f"{log_dir / DB_RECORD}:{lineno}: record has a target TVM "
                                  f"cannot read: {exc}") from None
        if want is not None and fp_cache[tkey] != want:
            report.other_target_records += 1
            others[tkey] = others.get(tkey, 0) + 1
            continue
        usable.append((index, rec_json, lineno))
    if not keep_slower:
        # compile applies each workload's best record only; parsing a trace costs ~6 ms,
        # so a 700-trial log would add seconds to every compile for this target
        best: dict[int, tuple] = {}
        for entry in usable:
            if entry[0] not in best or \
                    _run_secs_mean(entry[1][1]) < _run_secs_mean(best[entry[0]][1][1]):
                best[entry[0]] = entry
        usable = sorted(best.values(), key=lambda e: e[2])
    for index, rec_json, lineno in usable:
        try:
            if index not in committed:
                workload = ms.database.Workload.from_json(workloads[index])
                committed[index] = db.commit_workload(workload.mod)
            record = ms.database.TuningRecord.from_json(rec_json, committed[index])
        except Exception as exc:  # noqa: BLE001
            raise TuningError(f"{log_dir / DB_RECORD}:{lineno}: MetaSchedule cannot read this "
                              f"record: {str(exc).splitlines()[-1] if str(exc) else exc}") from None
        db.commit_tuning_record(record)
        report.records += 1
    if not keep_slower:
        meta = _meta(log_dir)
        db = _drop_slower_than_default(db, meta.get("baseline_us", {}), report,
                                       meta.get("verified", {}))
    report.workloads = len(committed)
    report.other_targets = sorted(others)
    if report.orphan_records:
        report.messages.append(f"{log_dir}: ignored {report.orphan_records} record(s) whose "
                               "workload line was torn")
    if report.other_target_records:
        report.messages.append(
            f"{log_dir}: ignored {report.other_target_records} record(s) tuned for another "
            f"target ({'; '.join(report.other_targets)}); compiling for "
            f"{spec.name if spec else '?'}")
    return db, report


def _drop_slower_than_default(db, baselines: dict, report: "DatabaseReport",
                              verified: dict | None = None):
    """A copy of ``db`` without the workloads whose best record is not faster than the
    default schedule measured at tuning time (compile then keeps the default).

    Where the best record was re-timed next to the default (``verified``), that
    side-by-side decides; otherwise the best trial against the baseline."""
    verified = verified or {}
    if not baselines and not verified:
        return db
    from tvm.s_tir import meta_schedule as ms

    out = ms.database.MemoryDatabase(module_equality="structural")
    by_wl: dict[str, list] = {}
    for rec in db.get_all_tuning_records():
        by_wl.setdefault(str(rec.workload.as_json()[0]), []).append(rec)
    for key, recs in by_wl.items():
        best = min(_run_secs_mean(r.run_secs) for r in recs) * 1e6
        base = baselines.get(key)
        v = verified.get(key) or {}
        if v.get("in_model") and v.get("best_us") is not None and \
                v.get("default_us") is not None and best >= v.get("best_trial_us", 0) * 0.999:
            # Timed inside the compiled model (qcompile.tune_verify), the way compile runs
            # it; the record timed is still the one the database applies (no faster
            # trial since): that side-by-side alone decides. Standalone baselines are
            # not mixed in, they were measured another way.
            best, base = v["best_us"], v["default_us"]
            if not kernel_wins(v):  # lost, won by noise only, or slowed the whole model
                best = base
        elif v.get("best_us") is not None and v.get("default_us") is not None \
                and not v.get("in_model"):
            # Conservative on a noisy machine: the re-timed best record against the
            # fastest the default schedule was ever measured.
            best = v["best_us"]
            base = v["default_us"] if base is None else min(base, v["default_us"])
        if base is not None and best >= base:
            report.slower_than_default += 1
            report.records -= len(recs)
            continue
        wl = out.commit_workload(recs[0].workload.mod)
        for r in recs:
            out.commit_tuning_record(ms.database.TuningRecord(r.trace, wl, r.run_secs,
                                                              r.target, r.args_info))
    if report.slower_than_default:
        report.messages.append(
            f"{report.log_dir}: {report.slower_than_default} kernel(s) have no record faster "
            "than the default schedule measured when tuning; compile keeps the default there")
    return out


def load_database(log_dir, spec=None, *, with_report: bool = False):
    """The tuning records in ``log_dir`` (a directory or a list of them) as a Database.

    ``spec``: only records valid for this target are kept (default: the target
    the directory was tuned for, from its ``qcompile_tune.json``). Problems that
    do not stop loading (torn last line, records of another target) are reported
    with a :class:`TuningLogWarning`; ``with_report=True`` also returns the
    :class:`DatabaseReport` list.
    """
    dirs = [log_dir] if isinstance(log_dir, (str, os.PathLike)) else list(log_dir)
    from .target import get_target

    if spec is not None:
        spec = get_target(spec)
    # records from qcompile's design space tensorize with these
    for target_name in ({spec.name} if spec is not None else
                        {_meta(Path(d)).get("target") for d in dirs} - {None}):
        try:
            register_schedule_intrinsics(get_target(target_name).int8_intrinsic)
        except Exception as exc:  # noqa: BLE001 - an unknown target: records of it drop out
            _log.info("no schedule intrinsics for %s: %s", target_name, exc)
    reports = []
    merged = None
    for d in dirs:
        db, report = inspect_database(d, spec)
        reports.append(report)
        for msg in report.messages:
            warnings.warn(msg, TuningLogWarning, stacklevel=2)
        if merged is None:
            merged = db
        else:
            for rec in db.get_all_tuning_records():
                wl = merged.commit_workload(rec.workload.mod)
                from tvm.s_tir import meta_schedule as ms

                merged.commit_tuning_record(ms.database.TuningRecord(
                    rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
    if merged is None:
        raise TuningError("load_database: no log directory given")
    return (merged, reports) if with_report else merged


def shipped_log_dirs(spec) -> list[Path]:
    """The shipped ``tuning_logs/*`` directories tuned for ``spec``'s target."""
    from .target import get_target

    spec = get_target(spec)
    out = []
    if SHIPPED_LOG_DIR.is_dir():
        for d in sorted(SHIPPED_LOG_DIR.iterdir()):
            if (d / DB_WORKLOAD).exists() and _meta(d).get("target") == spec.name:
                out.append(d)
    return out


# --------------------------------------------------------------------------------------
# Tasks and coverage
# --------------------------------------------------------------------------------------


def extract_tasks(mod, spec):
    """MetaSchedule tasks of the fused module ``compile`` builds for ``spec``."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.schedules.amx import holds_amx_kernel

    from .pipeline import fuse

    target = spec.tvm_target()
    fused = fuse(mod, target)
    tasks, fixed = [], []
    for t in ms.relax_integration.extract_tasks(fused, target):
        if t.mod.attrs and t.mod.attrs.get("tirx.is_scheduled", False):
            continue
        # AMX convs: the tile shapes fix the whole schedule, nothing to search
        (fixed if holds_amx_kernel(t.dispatched[0]) else tasks).append(t)
    if fixed:
        _log.info("%d AMX conv kernel(s) keep their fixed schedule (not tuned): %s",
                  len(fixed), ", ".join(t.task_name for t in fixed))
    return tasks


def coverage_detail(mod, spec, db) -> tuple[list[str], list[str]]:
    """(kernels a record in ``db`` schedules, kernels left to the default schedules).

    Runs the very pass ``compile`` runs (``MetaScheduleApplyDatabase``) on the
    fused module, so "covered" means "compile will use the tuned record".
    """
    import tvm
    from tvm import relax, tirx

    from .pipeline import fuse
    from .target import get_target

    spec = get_target(spec)
    target = spec.tvm_target()
    fused = fuse(mod, target)

    def scheduled(m):
        return {gv.name_hint for gv, f in m.functions.items()
                if isinstance(f, tirx.PrimFunc) and f.attrs is not None
                and bool(f.attrs.get("tirx.is_scheduled", False))}

    kernels = sorted(gv.name_hint for gv, f in fused.functions.items()
                     if isinstance(f, tirx.PrimFunc))
    before = scheduled(fused)
    with target, db, tvm.transform.PassContext(opt_level=3):
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
    tuned = sorted(scheduled(applied) - before)
    untuned = [k for k in kernels if k not in before and k not in tuned]
    return tuned, untuned


def database_coverage(mod, spec, db) -> tuple[int, int]:
    """(fused kernels of ``mod`` that compile will take from ``db``, all fused kernels)."""
    tuned, untuned = coverage_detail(mod, spec, db)
    return len(tuned), len(tuned) + len(untuned)


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001
        return 0.0


def default_log_dir(model_name: str, spec) -> str:
    from .target import get_target

    return os.path.join(".", "tuning_logs", f"{model_name}-{get_target(spec).name}") + os.sep


# --------------------------------------------------------------------------------------
# Progress, budget and Ctrl-C
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskSummary:
    name: str
    weight: int
    trials: int = 0  # trials in the database for this task (this run + earlier runs)
    trials_this_run: int = 0
    build_errors: int = 0
    run_errors: int = 0
    best_us: float | None = None
    default_us: float | None = None  # the same kernel with qcompile's default schedules
    workload: str = ""  # MetaSchedule's structural hash of the kernel (database key)
    verified_best_us: float | None = None  # best record re-timed next to the default
    in_model_default_us: float | None = None  # default timed in the model next to it

    @property
    def effective_us(self) -> float | None:
        """What compile will get: the tuned record only where it beats the default."""
        if self.verified_best_us is not None and self.in_model_default_us and self.default_us:
            # In-model times carry the instrument's overhead: scale the standalone
            # default by the in-model ratio rather than mixing the two clocks.
            return self.default_us * min(1.0, self.verified_best_us / self.in_model_default_us)
        best = self.verified_best_us if self.verified_best_us is not None else self.best_us
        vals = [v for v in (best, self.default_us) if v is not None]
        return min(vals) if vals else None


@dataclasses.dataclass
class TuneSummary:
    """What a :func:`tune` run did; ``to_dict()`` for JSON."""

    model: str
    target: str
    log_dir: str
    tasks: list  # TaskSummary
    trials_requested: int
    trials_run: int
    trials_before: int
    resumed: bool
    measured: bool  # False: builder-only run (no board for this target)
    stopped: str  # "done", "budget", "interrupted", "nothing-to-do", "builder-only"
    seconds: float
    estimated_latency_us: float | None  # sum of weight x effective latency, all tasks measured
    runner: str
    message: str = ""
    database_messages: list = dataclasses.field(default_factory=list)
    estimated_default_us: float | None = None  # the same sum with the default schedules

    @property
    def per_task_best_us(self) -> dict:
        return {t.name: t.best_us for t in self.tasks}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["per_task_best_us"] = self.per_task_best_us
        return out


class _Stop(Exception):
    """Raised from the measure callback to end the scheduler's loop."""


class _State:
    def __init__(self, tasks: list[TaskSummary], total: int, budget_s: float | None,
                 progress: bool, stream=None):
        self.tasks = tasks
        self.total = total
        self.budget_s = budget_s
        self.progress = progress
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.run_trials = 0
        self.stop_reason: str | None = None
        self.interrupts = 0
        self.pending = 0  # measured batches not yet handed to the measure callbacks
        self.index: list[int] = list(range(len(tasks)))  # scheduler task id -> tasks[i]
        self.retried = 0

    def check_stop(self, at_build: bool = False) -> None:
        """Raise _Stop when a stop is due and nothing measured is waiting to be recorded."""
        if self.stop_reason is None and self.over_budget():
            self.stop_reason = "budget"
            self.emit("[tune] time budget reached: stopping (records so far are kept)")
        if self.stop_reason is None or self.pending > 0:
            return
        if at_build and self.stop_reason == "budget" and self.run_trials == 0:
            return  # a run always measures (and records) at least its first batch
        raise _Stop(self.stop_reason)

    def estimated_us(self) -> tuple[float | None, int]:
        total, missing = 0.0, 0
        for t in self.tasks:
            if t.effective_us is None:
                missing += 1
            else:
                total += t.weight * t.effective_us
        return (total if missing < len(self.tasks) else None), missing

    def default_total(self) -> float | None:
        if any(t.default_us is None for t in self.tasks):
            return None
        return sum(t.weight * t.default_us for t in self.tasks)

    def line(self, task_id: int | None = None) -> str:
        est, missing = self.estimated_us()
        measured = sum(1 for t in self.tasks if t.best_us is not None)
        parts = [f"[tune {time.monotonic() - self.start:6.0f}s]",
                 f"tasks {measured}/{len(self.tasks)} measured",
                 f"trials {self.run_trials}/{self.total}"]
        if est is not None:
            parts.append(f"est. end-to-end {est:.1f} us" + (f" (+{missing} unmeasured)"
                                                          if missing else ""))
            default = self.default_total()
            if default is not None and not missing:
                parts.append(f"default {default:.1f} us")
        if task_id is not None:
            t = self.tasks[task_id]
            best = f"{t.best_us:.1f} us" if t.best_us is not None else "n/a"
            dflt = f", default {t.default_us:.1f} us" if t.default_us is not None else ""
            parts.append(f"#{task_id} {t.name}: best {best}{dflt} ({t.trials} trials)")
        return " | ".join(parts)

    def table(self) -> str:
        rows = [f"  {'#':>2} {'task':<48} {'w':>2} {'trials':>6} {'best (us)':>11} "
                f"{'default (us)':>12}"]
        for i, t in enumerate(self.tasks):
            best = f"{t.best_us:.1f}" if t.best_us is not None else "-"
            dflt = f"{t.default_us:.1f}" if t.default_us is not None else "-"
            rows.append(f"  {i:>2} {t.name[:48]:<48} {t.weight:>2} {t.trials:>6} {best:>11} "
                        f"{dflt:>12}")
        return "\n".join(rows)

    def emit(self, text: str) -> None:
        if self.progress:
            print(text, file=self.stream, flush=True)

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.start >= self.budget_s


def _make_callback(state: _State):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class QCompileProgress(PyMeasureCallback):
        """Updates per-task bests, prints progress, stops on budget or Ctrl-C."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            task_id = state.index[task_id]
            t = state.tasks[task_id]
            for b, r in zip(builder_results, runner_results):
                state.run_trials += 1
                t.trials += 1
                t.trials_this_run += 1
                if b.error_msg is not None:
                    t.build_errors += 1
                elif r.error_msg is not None or r.run_secs is None:
                    t.run_errors += 1
                else:
                    us = _run_secs_mean(r.run_secs) * 1e6
                    if us < _FAILED_SECS and (t.best_us is None or us < t.best_us):
                        t.best_us = us
            state.pending -= 1
            state.emit(state.line(task_id))
            state.check_stop()

    return QCompileProgress()


@contextlib.contextmanager
def _sigint_stops(state: _State):
    """First Ctrl-C: stop after the batch in flight. Second: abort now."""
    if not hasattr(signal, "SIGINT") or \
            __import__("threading").current_thread() is not __import__("threading").main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        state.interrupts += 1
        if state.interrupts == 1:
            state.stop_reason = "interrupted"
            print("\n[tune] Ctrl-C: stopping after the batch in flight (records are kept; "
                  "Ctrl-C again to abort now)", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# --------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------


def _median_result(res):
    """The runner result with its samples reduced to their median (see the evaluator
    config in :func:`tune`): the record MetaSchedule stores and ranks by."""
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    if res.error_msg is not None or res.run_secs is None or len(res.run_secs) < 2:
        return res
    vals = sorted(float(v) for v in res.run_secs)
    from tvm import tirx

    return RunnerResult([tirx.FloatImm("float64", vals[len(vals) // 2])], None)


def _wrap_runner(inner, retries: int, state: "_State"):
    """Wrap a MetaSchedule runner: count batches in flight; re-submit failed trials.

    A trial that failed to run is re-submitted to the same runner (up to
    ``retries`` times); with the RPC runner each submission asks the tracker
    for a board, so a trial lost with a dead board is measured on a live one.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture

    @derived_object
    class RetryFuture(PyRunnerFuture):
        def __init__(self, runner_input, future):
            super().__init__()
            self.runner_input = runner_input
            self.future = future
            self.left = retries

        def done(self) -> bool:
            return self.future.done()

        def result(self):
            while True:
                res = self.future.result()
                if res.error_msg is None or self.left <= 0:
                    return _median_result(res)
                self.left -= 1
                state.retried += 1
                last = str(res.error_msg).strip().splitlines() or ["?"]
                state.emit(f"[tune] a trial failed to run ({last[-1][:160]}); re-submitting")
                self.future = inner.run([self.runner_input])[0]

    @derived_object
    class QCompileRunner(PyRunner):
        def run(self, runner_inputs):
            state.pending += 1
            runner_inputs = list(runner_inputs)
            if not runner_inputs:
                return []
            futures = inner.run(runner_inputs)
            return [RetryFuture(i, f) for i, f in zip(runner_inputs, futures)]

    return QCompileRunner()


def _wrap_builder(inner, state: "_State"):
    """Stop (before building) once the budget is spent or Ctrl-C was pressed, if no
    measured batch is waiting to be recorded."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import PyBuilder

    @derived_object
    class QCompileBuilder(PyBuilder):
        def build(self, build_inputs):
            state.check_stop(at_build=True)
            return inner.build(list(build_inputs))

    return QCompileBuilder()


def _unmeasured_runner(message: str):
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult
    from tvm.ir.utils import derived_object

    @derived_object
    class NotMeasured(PyRunnerFuture):
        def done(self) -> bool:
            return True

        def result(self):
            return RunnerResult(None, message)

    @derived_object
    class BuilderOnlyRunner(PyRunner):
        def run(self, runner_inputs):
            return [NotMeasured() for _ in runner_inputs]

    return BuilderOnlyRunner()


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TuningError(f"--rpc-tracker must be HOST:PORT, got {text!r}")
    return host, int(port)


# --------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------


def _configure_ms_logging(log_dir: Path, task_names: list[str]) -> list:
    """MetaSchedule's per-task log files under ``log_dir/logs``; nothing on the console."""
    from tvm.s_tir.meta_schedule import logging as ms_logging

    logs = log_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    width = len(str(max(len(task_names) - 1, 0)))
    names = [f"tvm.s_tir.meta_schedule.task_{i:0{width}d}_{n[:100]}"
             for i, n in enumerate(task_names)]
    config = {"loggers": {"tvm.s_tir.meta_schedule": {
        "level": "DEBUG", "propagate": False,
        "handlers": ["tvm.s_tir.meta_schedule.console", "tvm.s_tir.meta_schedule.file"]}},
        "handlers": {"tvm.s_tir.meta_schedule.console": {
        "class": "logging.StreamHandler", "stream": "ext://sys.stderr",
        "formatter": "tvm.s_tir.meta_schedule.standard_formatter", "level": "WARNING"}}}
    ms_logging.create_loggers(log_dir=str(logs),
                              params=[{"log_dir": str(logs), "logger_name": n} for n in names],
                              logger_config=config)
    return [ms_logging.get_logger(n) for n in names]


def _write_meta(log_dir: Path, update: dict) -> None:
    meta = _meta(log_dir)
    runs = meta.get("runs", [])
    if "run" in update:
        runs.append(update.pop("run"))
    meta.update(update)
    meta["runs"] = runs[-50:]
    tmp = log_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, log_dir / META_FILE)


def tune(mod, spec, log_dir=None, trials: int = 64, budget_minutes: float | None = None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, progress: bool = True,
         model_name: str = "model", *, trials_per_iter: int | None = None,
         builder_workers: int | None = None, builder_timeout_s: float = 120.0,
         run_timeout_s: float = 30.0, session_timeout_s: int = 60, run_retries: int = 2,
         population: int = 256, baseline: bool = True, min_share: float = 0.03,
         seed: int | None = None, space: str = "qcompile",
         stream=None) -> TuneSummary:
    """Tune ``mod`` (a Relax IRModule) for ``spec`` into the MetaSchedule database ``log_dir``.

    ``trials`` is the total for the model: records already in ``log_dir`` for
    these kernels count towards it (resume). ``budget_minutes`` stops cleanly
    after the batch in flight (a run always records its first batch; the
    scheduler's first round gives every task one batch). ``rpc_tracker="host:port"``
    measures on the boards registered under ``rpc_key`` (default: the target's key).

    ``baseline``: first build and time each kernel with qcompile's default
    schedules (once per log directory, kept in ``qcompile_tune.json``);
    :func:`load_database` then skips records that do not beat it, and kernels
    taking under ``min_share`` of the default end-to-end time are not tuned.
    ``population``: the evolutionary search's population (smaller is faster
    per batch, searches less). ``trials_per_iter``: candidates per batch.
    ``space``: the design space of qcompile's packed kernels (:func:`design_space`):
    ``"qcompile"`` (the default schedules with their choices as sampled decisions),
    ``"generic"`` (MetaSchedule's own), ``"union"`` (both); other kernels always get
    MetaSchedule's own.
    """
    from tvm.s_tir import meta_schedule as ms

    from .target import get_target

    t_start = time.monotonic()
    spec = get_target(spec)
    # the trials' thread count, inherited by the runner's processes (see threads.py)
    n_threads, _ = threads_mod.configure()
    target = spec.tvm_target()
    log_dir = Path(log_dir or default_log_dir(model_name, spec))
    log_dir.mkdir(parents=True, exist_ok=True)
    say = functools.partial(print, file=stream or sys.stderr, flush=True) if progress \
        else (lambda *a, **k: None)

    # 1. The database: cut torn tails, then see what is already there for these tasks.
    report = repair_log_dir(log_dir)
    for msg in report.messages:
        say(f"[tune] {msg}")
    tasks = extract_tasks(mod, spec)
    if not tasks:
        raise TuningError(f"{model_name}: no tunable kernels found for {spec.name}")
    # Heaviest kernels first: the scheduler's first round visits tasks in this order,
    # so a small budget goes to the convolutions and matmuls, not to a reshape.
    tasks = sorted(tasks, key=lambda t: -_flops(t.dispatched[0]) * max(1, int(t.weight)))
    existing_db = None
    db_messages = list(report.messages)
    if (log_dir / DB_WORKLOAD).exists():
        existing_db, rep = inspect_database(log_dir, spec, keep_slower=True)
        db_messages += [m for m in rep.messages if "torn" not in m]
        for m in rep.messages:
            if "torn" not in m:
                say(f"[tune] {m}")
    summaries = []
    baselines = _meta(log_dir).get("baseline_us", {})
    for task in tasks:
        ts = TaskSummary(name=task.task_name, weight=int(task.weight),
                         workload=str(ms.database.Workload(task.dispatched[0]).as_json()[0]))
        ts.default_us = baselines.get(ts.workload)
        if existing_db is not None and existing_db.has_workload(task.dispatched[0]):
            wl = existing_db.commit_workload(task.dispatched[0])
            recs = existing_db.get_top_k(wl, 1 << 30)
            ts.trials = len(recs)
            if recs:
                ts.best_us = _run_secs_mean(recs[0].run_secs) * 1e6
        summaries.append(ts)
    trials_before = _count_trials(log_dir, spec, tasks)
    for ts, n in zip(summaries, trials_before[1]):
        ts.trials = n
    trials_before = trials_before[0]
    remaining = max(0, int(trials) - trials_before)
    resumed = trials_before > 0

    # 2. Where measurements happen.
    measured = True
    if rpc_tracker:
        host, port = _parse_hostport(rpc_tracker)
        key = rpc_key or spec.rpc_key
        rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                         session_timeout_sec=int(session_timeout_s))
        try:
            boards = rpc_config.count_num_servers(allow_missing=True)
        except Exception as exc:  # noqa: BLE001
            raise TuningError(f"cannot reach the RPC tracker at {host}:{port}: "
                              f"{str(exc).strip().splitlines()[0]}") from None
        if boards == 0:
            raise TuningError(f"no board is registered under key '{key}' at the tracker "
                              f"{host}:{port} (start one with: python -m tvm.exec.rpc_server "
                              f"--tracker {host}:{port} --key {key})")
        runner_desc = f"RPC tracker {host}:{port}, key '{key}', {boards} board(s)"
    elif spec.runs_here():
        runner_desc = "this machine (LocalRunner)"
    else:
        measured = False
        what = ("a CUDA GPU" if spec.is_cuda else
                f"a {spec.arch} CPU with {', '.join(spec.isa_features) or 'this ISA'}")
        runner_desc = (f"none: {spec.name} code cannot run on this machine. Measurements need "
                       f"an RPC board of that kind ({what}) registered with a tracker under "
                       f"key '{rpc_key or spec.rpc_key}': `python -m tvm.exec.rpc_server "
                       f"--tracker HOST:PORT --key {rpc_key or spec.rpc_key}` on the board, "
                       f"then `--rpc-tracker HOST:PORT`. Builder-only run: candidates are built "
                       f"to check they compile; no records are written")

    task_names = [t.task_name for t in tasks]
    say(f"[tune] {model_name} on {spec.name}: {len(tasks)} tasks, measuring on {runner_desc}")
    need_baseline = baseline and any(t.default_us is None for t in summaries)
    if measured and remaining == 0 and not need_baseline:
        say(f"[tune] {log_dir} already holds {trials_before} trials for these kernels "
            f"(>= --trials {trials}); nothing to do. Raise --trials to tune further.")
        return _finish(log_dir, spec, model_name, summaries, trials, 0, trials_before, resumed,
                       True, "nothing-to-do", t_start, runner_desc, db_messages, say, None)
    if resumed and measured:
        say(f"[tune] resuming: {trials_before} trials already in {log_dir}; "
            f"{remaining} more to reach {trials}")
    if not measured:
        remaining = int(trials)
        say(f"[tune] NOTE: {runner_desc}")

    # 3. MetaSchedule pieces.
    t0 = time.monotonic()
    intrin_s = import_tensor_intrinsics()
    _log.info("tensor intrinsics imported in %.1fs", intrin_s)
    loggers = _configure_ms_logging(log_dir, task_names)
    seeds = ms.utils.fork_seed(seed, n=len(tasks))
    contexts = []
    spaces = [design_space(task, target, space) for task in tasks]
    n_ours = sum(1 for sp in spaces if not isinstance(sp, str))
    if n_ours:
        say(f"[tune] {n_ours} kernel(s) searched from qcompile's default schedules "
            f"(space '{space}'), {len(tasks) - n_ours} in MetaSchedule's generic space")
    for task, logger, rs, sp in zip(tasks, loggers, seeds, spaces):
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=task.target, space_generator=sp,
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=population, init_min_unmeasured=min(50, population // 2)),
            task_name=task.task_name, logger=logger,
            rand_state=rs, num_threads="physical").clone())
    weights = [float(t.weight) for t in tasks]
    workers = builder_workers or max(1, min(os.cpu_count() or 1, 4))
    builder = ms.builder.LocalBuilder(
        max_workers=workers, timeout_sec=builder_timeout_s,
        initializer=functools.partial(_builder_worker_init, spec.is_cuda),
        f_export=functools.partial(_export_cross, spec.cross_compiler) if spec.is_cross
        and not spec.is_cuda else None)
    state = _State(summaries, remaining, budget_minutes * 60 if budget_minutes else None,
                   progress, stream)
    state.start = t_start
    # Many short samples, not one long window: on a machine busier than its core count
    # a 40 ms window absorbs the time slices other processes take (a 15 us kernel then
    # measured 35-44 us), while most single calls run between preemptions, as the same
    # kernel does inside the model. The runner wrapper keeps the median sample.
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=11, min_repeat_ms=0,
                                          enable_cpu_cache_flush=False)
    if not measured:
        runner = _wrap_runner(_unmeasured_runner(f"not measured: {spec.name} needs an RPC "
                                                 "board"), 0, state)
        database = ms.database.MemoryDatabase()
    else:
        if rpc_tracker:
            inner = ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator,
                                        max_workers=boards, initializer=_runner_worker_init)
        else:
            inner = ms.runner.LocalRunner(timeout_sec=run_timeout_s, evaluator_config=evaluator,
                                          initializer=_runner_worker_init)
        runner = _wrap_runner(inner, run_retries, state)
        database = ms.database.JSONDatabase(work_dir=str(log_dir), module_equality="structural")
        # Measure the default schedules where unknown, and again on every run that tunes:
        # the kept value is the minimum over runs, as a record's latency is the minimum
        # over its trials, so load spikes on a busy machine favour neither side.
        missing = [i for i, t in enumerate(summaries) if t.default_us is None or remaining > 0]
        if baseline and missing:
            t1 = time.monotonic()
            got = _measure_defaults([tasks[i] for i in missing], spec, target, builder, inner)
            for i, us in zip(missing, got):
                old = summaries[i].default_us
                if us is not None:
                    summaries[i].default_us = us if old is None else min(old, us)
            _write_meta(log_dir, {"baseline_us": {
                **_meta(log_dir).get("baseline_us", {}),
                **{summaries[i].workload: summaries[i].default_us for i in missing
                   if summaries[i].default_us is not None}}})
            say(f"[tune] default schedules measured for {len(missing)} kernel(s) in "
                f"{time.monotonic() - t1:.0f}s: "
                + ", ".join(f"{summaries[i].name[:40]} {us:.1f} us" if us is not None else
                            f"{summaries[i].name[:40]} n/a" for i, us in zip(missing, got)))
    if remaining > 0 and min_share > 0 and all(t.default_us is not None for t in summaries):
        total = sum(t.weight * t.default_us for t in summaries)
        keep = [i for i, t in enumerate(summaries) if t.weight * t.default_us >= min_share * total]
        if keep and len(keep) < len(summaries):
            small = [summaries[i].name for i in range(len(summaries)) if i not in keep]
            say(f"[tune] not tuning {len(small)} kernel(s) that take under "
                f"{min_share:.0%} of the default end-to-end time: {', '.join(small)}")
            state.index = keep
            contexts = [contexts[i] for i in keep]
            weights = [weights[i] for i in keep]
    if remaining == 0:
        say(f"[tune] {log_dir} already holds {trials_before} trials for these kernels "
            f"(>= --trials {trials}); nothing to do. Raise --trials to tune further.")
        return _finish(log_dir, spec, model_name, summaries, trials, 0, trials_before, resumed,
                       True, "nothing-to-do", t_start, runner_desc, db_messages, say, None)
    cost_model = ms.cost_model.XGBModel(
        extractor=ms.feature_extractor.PerStoreFeature(),
        adaptive_training=True, num_tuning_cores=os.cpu_count() or 1)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_make_callback(state)]
    per_iter = trials_per_iter or max(4, min(16, remaining // max(1, len(tasks))))
    _write_meta(log_dir, {"model": model_name, "target": spec.name,
                          "tvm_target": json.loads(json.dumps(dict(target.export()),
                                                              default=list)),
                          "fingerprint": json.loads(json.dumps(target_fingerprint(target))),
                          "format": "MetaSchedule JSONDatabase (tvm 0.27)",
                          "threads": None if rpc_tracker else n_threads}) if measured else None
    say(f"[tune] setup {time.monotonic() - t0:.1f}s; {remaining} trials, {per_iter} per batch"
        + (f", budget {budget_minutes:g} min" if budget_minutes else ""))
    stopped = "done"
    with _sigint_stops(state):
        try:
            ms.task_scheduler.TaskScheduler.create("gradient").tune(
                tasks=contexts, task_weights=weights, max_trials_global=remaining,
                max_trials_per_task=remaining, num_trials_per_iter=per_iter,
                builder=_wrap_builder(builder, state), runner=runner, measure_callbacks=callbacks, database=database,
                cost_model=cost_model)
        except KeyboardInterrupt:
            stopped = "interrupted"
            say("[tune] aborted by Ctrl-C; records measured so far are kept")
        except Exception as exc:  # noqa: BLE001 - our _Stop comes back through the FFI
            if state.stop_reason is None:
                if state.interrupts:
                    stopped = "interrupted"
                else:
                    raise TuningError(f"tuning {model_name} for {spec.name} failed: "
                                      f"{str(exc).strip()[-2000:]}") from exc
            else:
                stopped = state.stop_reason
    if not measured:
        stopped = "builder-only"
    elif baseline and state.run_trials and stopped in ("done", "budget"):
        _verify(mod, spec, target, tasks, summaries, log_dir, database, builder, inner,
                in_model=not rpc_tracker, say=say)
    return _finish(log_dir, spec, model_name, summaries, trials, state.run_trials, trials_before,
                   resumed, measured, stopped, t_start, runner_desc, db_messages, say, state)


def _verify(mod, spec, target, tasks, summaries, log_dir: Path, database, builder, runner,
            *, in_model: bool, say) -> None:
    """Re-time each kernel's best record next to its default schedule; store the result
    (``verified`` in ``qcompile_tune.json``), which decides what :func:`load_database`
    applies.

    ``in_model`` (the target runs here): both are timed inside the compiled model, the
    way compile runs them (:mod:`qcompile.tune_verify`). Otherwise (RPC boards): each
    kernel standalone through the runner, best record and default interleaved."""
    t1 = time.monotonic()
    e2e = None
    try:
        if in_model:
            from .tune_verify import verify_in_model

            db, _ = inspect_database(log_dir, spec, keep_slower=True)
            res = verify_in_model(mod, spec, db, say=say)
            verified, e2e = res["kernels"], res["end_to_end"]
        else:
            verified = _verify_best(tasks, database, spec, target, builder, runner)
    except Exception as exc:  # noqa: BLE001 - the records are safe; report and go on
        say(f"[tune] could not re-time the best records: {str(exc).strip()[:300]}")
        return
    if not verified:
        return
    for t in summaries:
        v = verified.get(t.workload)
        if v and v["best_us"] is not None and v["default_us"] is not None:
            t.verified_best_us = v["best_us"]
            if in_model:
                t.in_model_default_us = v["default_us"]
            else:
                t.default_us = min(t.default_us or v["default_us"], v["default_us"])
    meta = _meta(log_dir)
    update = {"verified": {**meta.get("verified", {}), **verified},
              "baseline_us": {**meta.get("baseline_us", {}),
                              **{t.workload: t.default_us for t in summaries
                                 if t.default_us is not None}}}
    if e2e:
        update["in_model_us"] = {**e2e, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())}
    _write_meta(log_dir, update)
    wins = sorted((v["default_us"] / v["best_us"], k) for k, v in verified.items()
                  if (kernel_wins(v) if in_model else
                      v["best_us"] is not None and v["default_us"] is not None
                      and v["best_us"] < v["default_us"]))
    how = "inside the compiled model" if in_model else "standalone"
    say(f"[tune] best records re-timed next to the default schedules ({how}) in "
        f"{time.monotonic() - t1:.0f}s: {len(wins)} of {len(verified)} beat the default "
        "(compile applies only those)")


def verify(mod, spec, log_dir, *, progress: bool = True, stream=None) -> dict:
    """Re-time the best records in ``log_dir`` against the default schedules inside the
    compiled model, without tuning; updates ``qcompile_tune.json`` (what
    :func:`load_database` applies). Run it after the default schedules change."""
    from .target import get_target
    from .tune_verify import verify_in_model

    spec = get_target(spec)
    log_dir = Path(log_dir)
    n_threads, _ = threads_mod.configure()  # before the model first runs
    if not spec.runs_here():
        raise TuningError(f"verify times the model on this machine; {spec.name} code cannot "
                          "run here")
    say = functools.partial(print, file=stream or sys.stderr, flush=True) if progress \
        else (lambda *a, **k: None)
    repair_log_dir(log_dir)
    db, _ = inspect_database(log_dir, spec, keep_slower=True)
    res = verify_in_model(mod, spec, db, say=say)
    meta = _meta(log_dir)
    update = {"verified": {**meta.get("verified", {}), **res["kernels"]},
              "verified_threads": n_threads}
    if res["end_to_end"]:
        update["in_model_us"] = {**res["end_to_end"],
                                 "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_meta(log_dir, update)
    wins = [k for k, v in res["kernels"].items() if kernel_wins(v)]
    say(f"[tune] {len(wins)} of {len(res['kernels'])} kernel(s) faster with their best record "
        "than with the default schedule, timed in the model; compile applies only those")
    return res


SPACES = ("qcompile", "generic", "union")


def design_space(task, target, space: str = "qcompile"):
    """The MetaSchedule space generator for ``task``.

    A qcompile packed kernel (the default rule ``schedules.cpu`` applies) gets
    ``ScheduleFn(schedules.cpu.tunable_spaces)``: the default schedule replayed with its
    tile sizes as ``sample_perfect_tile`` decisions (the heuristic's value decided) plus
    its structural variants (loop order, two channel vectors, parallel or not), so the
    initial population re-draws those tiles and MutateTileSize mutates them; no schedule
    rules or postprocessors on top (the rule already tensorizes, vectorizes, unrolls).
    ``"union"`` adds MetaSchedule's generic space; anything else is ``"post-order-apply"``.
    """
    from tvm.s_tir import meta_schedule as ms

    from qcompile.schedules import cpu

    if space not in SPACES:
        raise TuningError(f"unknown design space {space!r}: one of {', '.join(SPACES)}")
    if space == "generic" or "cuda" in str(target.kind.name):
        return "post-order-apply"
    cpu.allow_vector_nearbyint()
    try:
        with target:
            ours = cpu.tunable_spaces(__import__("tvm").s_tir.Schedule(task.dispatched[0]),
                                      target)
    except Exception as exc:  # noqa: BLE001 - not ours: MetaSchedule's space
        _log.info("no qcompile space for %s: %s", task.task_name, exc)
        ours = []
    if not any(inst.kind.name.startswith("Sample") for sch in ours for inst in sch.trace.insts):
        # nothing to vary but the structural variants (a batch-1 matmul): a handful of
        # candidates would end the task after one batch; MetaSchedule's space searches on
        return "post-order-apply"
    fn = ms.space_generator.ScheduleFn(
        functools.partial(_qcompile_space_fn, target=target), sch_rules=[], postprocs=[],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0})
    if space == "union":
        return ms.space_generator.SpaceGeneratorUnion(
            [fn, ms.space_generator.PostOrderApply()])
    return fn


def _qcompile_space_fn(sch, target):
    from qcompile.schedules import cpu

    with target:
        return cpu.tunable_spaces(sch, target)


def register_schedule_intrinsics(family: str) -> None:
    """Register the tensor intrinsics qcompile's CPU schedules tensorize with for the
    int8 ``family`` (a target's ``int8_intrinsic``), so that a tuning record whose trace
    names one replays in compile (MetaScheduleApplyDatabase) before any default schedule
    has registered it. Only the target's own: each costs a TVMScript parse."""
    from qcompile.schedules import cpu, intrin, x86

    base = family.removeprefix("portable-")
    if base == "amx-int8":  # convs that do not fit AMX tiles run on VNNI
        base, family = "avx512-vnni", family.replace("amx-int8", "avx512-vnni")
    if base in intrin.LANES:
        intrin.get_intrin(base, portable=family.startswith("portable-"), scope=cpu.ACC_SCOPE)
    if base in x86.PIXEL_FAMILIES:
        for lanes in ((16, 8) if base == "avx512-vnni" else (8,)):
            x86.get_pixel_intrin(family, lanes, cpu.ACC_SCOPE)


def _default_scheduled(task, spec, target):
    import tvm

    from qcompile import schedules

    # A deep copy: the default-schedule passes may rewrite the functions they are
    # handed in place, and the tuning contexts hold this very module.
    mod = tvm.ir.load_json(tvm.ir.save_json(task.dispatched[0]))
    try:
        with target:
            mod = tvm.transform.Sequential(schedules.default_schedule_passes(spec, target))(mod)
    except Exception as exc:  # noqa: BLE001 - measure the unscheduled kernel instead
        _log.info("default schedule failed for %s: %s", task.task_name, exc)
    return mod


def _time_modules(pairs, target, builder, runner, repeats: int = 1) -> list[float | None]:
    """Build each (task, scheduled module) once, run it ``repeats`` times interleaved
    with the others (one runner batch), return the fastest run per module (us)."""
    import shutil

    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    built = builder.build([BuilderInput(mod, target) for _, mod in pairs])
    dev = "cuda" if target.kind.name == "cuda" else "cpu"
    run_inputs, index = [], []
    for i, ((task, _), res) in enumerate(zip(pairs, built)):
        if res.error_msg is not None:
            _log.warning("%s did not build: %s", task.task_name, str(res.error_msg)[-300:])
            continue
        info = ArgInfo.from_prim_func(task.dispatched[0]["main"])
        run_inputs.append(RunnerInput(res.artifact_path, dev, info))
        index.append(i)
    out: list[float | None] = [None] * len(pairs)
    if run_inputs:
        for _ in range(repeats):
            for i, fut in zip(index, runner.run(run_inputs)):
                res = _median_result(fut.result())
                if res.error_msg is None and res.run_secs is not None:
                    us = _run_secs_mean(res.run_secs) * 1e6
                    if us < _FAILED_SECS and (out[i] is None or us < out[i]):
                        out[i] = us
                else:
                    _log.warning("%s did not run: %s", pairs[i][0].task_name,
                                 str(res.error_msg).strip()[-300:])
    for res in built:
        if res.artifact_path:
            shutil.rmtree(os.path.dirname(str(res.artifact_path)), ignore_errors=True)
    return out


def _verify_best(tasks, database, spec, target, builder, runner, repeats: int = 3) -> dict:
    """Re-time each task's best record next to its default schedule, interleaved.

    Trial latencies are taken while the next batch builds on the same cores; on a
    busy machine they are noisy, so the keep-or-skip decision for a kernel rests on
    this side-by-side instead. Returns {workload key: {"best_us", "default_us"}}.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    pairs, keys = [], []
    for task in tasks:
        mod = task.dispatched[0]
        if not database.has_workload(mod):
            continue
        recs = database.get_top_k(database.commit_workload(mod), 1)
        if not recs:
            continue
        try:
            sch = Schedule(mod)
            recs[0].trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as exc:  # noqa: BLE001
            _log.warning("best record of %s does not replay: %s", task.task_name, exc)
            continue
        pairs += [(task, _default_scheduled(task, spec, target)), (task, sch.mod)]
        keys.append(str(ms.database.Workload(mod).as_json()[0]))
    if not pairs:
        return {}
    times = _time_modules(pairs, target, builder, runner, repeats)
    return {key: {"default_us": times[2 * j], "best_us": times[2 * j + 1]}
            for j, key in enumerate(keys)}


def _measure_defaults(tasks, spec, target, builder, runner) -> list[float | None]:
    """Each task's kernel with qcompile's default schedules, built and run like a trial.

    The result (``baseline_us`` in ``qcompile_tune.json``) lets :func:`load_database`
    skip records that are not faster than what compile would do without them.
    """
    return _time_modules([(t, _default_scheduled(t, spec, target)) for t in tasks], target,
                         builder, runner)


def _count_trials(log_dir: Path, spec, tasks) -> tuple[int, list[int]]:
    """Trials (successful or failed) already logged for each task's workload and target."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import Target

    per_task = [0] * len(tasks)
    if not (log_dir / DB_WORKLOAD).exists():
        return 0, per_task
    workloads, records, _, _ = _scan(log_dir)
    want = target_fingerprint(spec.tvm_target())
    # Workload hash -> task index, by structural equality of the workload module.
    index_of: dict[int, int] = {}
    probe = ms.database.MemoryDatabase()
    task_wls = [probe.commit_workload(t.dispatched[0]) for t in tasks]
    for i, wl_json in enumerate(workloads):
        try:
            mod = ms.database.Workload.from_json(wl_json).mod
        except Exception:  # noqa: BLE001
            continue
        if probe.has_workload(mod):
            wl = probe.commit_workload(mod)
            for j, twl in enumerate(task_wls):
                if twl.same_as(wl):
                    index_of[i] = j
    fps: dict[str, tuple] = {}
    for idx, rec_json, _ in records:
        if idx in index_of:
            key = json.dumps(rec_json[2], sort_keys=True)
            if key not in fps:
                fps[key] = target_fingerprint(Target(rec_json[2]))
            if fps[key] == want:
                per_task[index_of[idx]] += 1
    return sum(per_task), per_task


def _finish(log_dir, spec, model_name, summaries, trials, run, before, resumed, measured,
            stopped, t_start, runner_desc, db_messages, say, state) -> TuneSummary:
    est = default = None
    if all(t.effective_us is not None for t in summaries):
        est = sum(t.weight * t.effective_us for t in summaries)
    if all(t.default_us is not None for t in summaries):
        default = sum(t.weight * t.default_us for t in summaries)
    if measured:
        msg = f"{run} trials this run, {before + run} in {log_dir}"
        if est is not None:
            msg += f"; estimated end-to-end kernel time {est:.1f} us"
            if default:
                msg += f" (default schedules {default:.1f} us, {default / est:.2f}x)"
        def best(t):
            return t.verified_best_us if t.verified_best_us is not None else t.best_us

        def base(t):
            return t.in_model_default_us if t.in_model_default_us is not None else t.default_us

        slower = [t.name for t in summaries if best(t) is not None and
                  base(t) is not None and best(t) >= base(t)]
        if slower:
            msg += (f"; {len(slower)} kernel(s) not yet faster than their default schedule "
                    "(compile keeps the default for those)")
    else:
        built = sum(t.trials_this_run - t.build_errors for t in summaries)
        errs = sum(t.build_errors for t in summaries)
        msg = (f"builder-only: {built} candidates built, {errs} build errors, nothing measured. "
               f"Measurements for {spec.name} need an RPC board of that kind "
               f"(--rpc-tracker HOST:PORT --rpc-key {spec.rpc_key})")
    if stopped == "budget":
        msg += " (stopped: time budget reached)"
    elif stopped == "interrupted":
        msg += " (stopped: interrupted; run the same command again to continue)"
    summary = TuneSummary(
        model=model_name, target=spec.name, log_dir=str(log_dir), tasks=summaries,
        trials_requested=int(trials), trials_run=run, trials_before=before, resumed=resumed,
        measured=measured, stopped=stopped, seconds=round(time.monotonic() - t_start, 1),
        estimated_latency_us=est, runner=runner_desc, message=msg,
        database_messages=db_messages, estimated_default_us=default)
    if state is not None:
        say("[tune] per-task best:\n" + state.table())
    say(f"[tune] {msg}")
    if measured and run:
        _write_meta(Path(log_dir), {"run": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "trials": run,
            "stopped": stopped, "seconds": summary.seconds, "runner": runner_desc,
            "estimated_latency_us": est, "estimated_default_us": default}})
    return summary
