"""Time tuned records and default schedules the way ``compile`` runs them: inside the model.

Why not standalone: a kernel timed alone (MetaSchedule's runner: a fresh process, random
arguments, its own warm-up, built while the next batch of candidates compiles on the
same cores) can differ a lot from the same kernel in the compiled model (real data, the
caches the previous kernel left, the VM's own thread pool). The keep-or-skip rule
(apply a record only where it beats the default schedule) was fooled that way: a
default-scheduled convolution timed 39.9 us standalone and 16.8 us in the model.

So the rule rests on this side-by-side instead: the model is compiled twice through
the one compile path (:func:`qcompile.pipeline.compile_relax`), once with the default
schedules and once with the best record of every tuned kernel; the two VMs run the
same inputs, interleaved in rounds, and a VM instrument times every kernel call
(``time.perf_counter_ns`` before/after, the same small overhead on both sides). Calls
are grouped by MetaSchedule workload key (one workload may run at several places in
the model), summed per model run, and the median over runs decides.
"""

from __future__ import annotations

import time

import numpy as np


def workload_key(func) -> str:
    """MetaSchedule's structural-hash key of one fused PrimFunc, as the database stores it."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    return str(ms.database.Workload(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")})).as_json()[0])


def kernel_workloads(mod, spec) -> dict[str, str]:
    """{fused kernel name: workload key} for the kernels ``compile`` builds from ``mod``."""
    from tvm import tirx

    from .pipeline import fuse

    fused = fuse(mod, spec.tvm_target())
    return {gv.name_hint: workload_key(f) for gv, f in fused.functions_items()
            if isinstance(f, tirx.PrimFunc)}


def random_inputs(mod, seed: int = 0) -> list:
    """One random input per parameter of ``mod["main"]`` (static shapes only)."""
    import tvm
    from tvm import relax

    from .errors import TuningError

    rng = np.random.default_rng(seed)
    out = []
    for param in mod["main"].params:
        ty, name = param.ty, param.name
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise TuningError(f"in-model timing needs tensor inputs of static shape; "
                              f"'{name}' is {ty}")
        try:
            shape = [int(d) for d in ty.shape.values]
        except (TypeError, AttributeError):
            raise TuningError(f"in-model timing needs static input shapes; "
                              f"'{name}' has shape {ty.shape}") from None
        dtype = str(ty.dtype)
        if dtype.startswith("float"):
            arr = rng.standard_normal(shape).astype(dtype)
        else:  # token ids, masks: zeros are valid for every index input
            arr = np.zeros(shape, dtype=dtype)
        out.append(tvm.runtime.tensor(arr))
    return out


class _KernelTimer:
    """VM instrument: nanoseconds per kernel call, summed per workload for each model run."""

    def __init__(self, names: dict[str, str]):
        self.names = names
        self.start: dict[str, int] = {}
        self.run: dict[str, int] = {}

    def __call__(self, func, name, before, ret, *args):  # noqa: ARG002 - VM signature
        if name in self.names:
            if before:
                self.start[name] = time.perf_counter_ns()
            else:
                key = self.names[name]
                self.run[key] = self.run.get(key, 0) + time.perf_counter_ns() - self.start[name]
        return 0  # 0: keep running, no skip

    def take(self) -> dict[str, int]:
        run, self.run = self.run, {}
        return run


def time_in_model(executables: dict, names: dict[str, str], inputs, rounds: int = 7,
                  runs_per_round: int = 5) -> tuple[dict, dict]:
    """Per-workload and end-to-end medians (us) of each executable, interleaved.

    ``executables``: {label: VM executable}. Returns ({label: {workload: us}},
    {label: end-to-end us}); end-to-end runs have no instrument attached.
    """
    import tvm
    from tvm import relax

    vms, timers = {}, {}
    for label, ex in executables.items():
        vms[label] = relax.VirtualMachine(ex, tvm.cpu())
        vms[label]["main"](*inputs)  # warm-up: thread pool, first-touch allocations
        timers[label] = _KernelTimer(names)
    per_run: dict = {label: [] for label in vms}
    e2e: dict = {label: [] for label in vms}
    for _ in range(rounds):
        for label, vm in vms.items():
            vm.set_instrument(timers[label])
            for _ in range(runs_per_round):
                vm["main"](*inputs)
                per_run[label].append(timers[label].take())
            vm.set_instrument(None)
            fn = vm["main"]
            for _ in range(runs_per_round):
                t0 = time.perf_counter_ns()
                fn(*inputs)
                e2e[label].append(time.perf_counter_ns() - t0)
    kernels = {}
    for label, runs in per_run.items():
        keys = set().union(*runs) if runs else set()
        kernels[label] = {k: float(np.median([r.get(k, 0) for r in runs])) / 1e3 for k in keys}
    return kernels, {label: float(np.median(v)) / 1e3 for label, v in e2e.items()}


def best_records_database(database, keys: set[str] | None = None):
    """A MemoryDatabase holding only the fastest record of each workload (of ``keys``)."""
    from tvm.s_tir import meta_schedule as ms

    best: dict = {}
    for rec in database.get_all_tuning_records():
        if rec.run_secs is None or not len(rec.run_secs):
            continue
        key = str(rec.workload.as_json()[0])
        if keys is not None and key not in keys:
            continue
        secs = float(np.mean([float(s) for s in rec.run_secs]))
        if secs < 1e9 and (key not in best or secs < best[key][0]):
            best[key] = (secs, rec)
    out = ms.database.MemoryDatabase(module_equality="structural")
    for _, rec in best.values():
        wl = out.commit_workload(rec.workload.mod)
        out.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, rec.run_secs,
                                                          rec.target, rec.args_info))
    return out, {k: v[0] * 1e6 for k, v in best.items()}


# A record must beat its default schedule by this much inside the model to be applied:
# repeated in-model timings of one kernel moved by +-5 % on this machine.
KERNEL_WIN = 0.97
# ... and the records chosen that way, applied together, must make the whole model this
# much faster: on MobileNetV2 (x86_64-avx2, 2 threads) seven records that each won in the
# model made it 6 % slower end to end (11.26 -> 12.01 ms).
MODEL_WIN = 0.98


def kernel_wins(entry: dict) -> bool:
    """Whether a ``verified`` entry says the record won inside the model (kernel and model)."""
    return (entry.get("best_us") is not None and entry.get("default_us") is not None
            and entry["best_us"] < entry["default_us"] * KERNEL_WIN
            and not entry.get("model_slower"))


def verify_in_model(mod, spec, database, *, rounds: int = 7, runs_per_round: int = 5,
                    say=None) -> dict:
    """Time the best record of each tuned workload against its default schedule in the model.

    Returns {"kernels": {workload: {"default_us", "best_us", "best_trial_us",
    "in_model": True[, "model_slower": True]}}, "end_to_end": {...}}: ``best_trial_us``
    identifies the record that was timed (the database applies a workload's fastest
    trial), so a later, faster record makes this entry stale (see
    ``tune._drop_slower_than_default``). Then the records that won their kernel
    (:data:`KERNEL_WIN`) are applied together and the model is timed end to end next to
    the default schedules; unless that is :data:`MODEL_WIN` faster, each of them gets
    ``model_slower`` and compile applies none of them.
    """
    from .pipeline import compile_relax

    say = say or (lambda *a, **k: None)
    names = kernel_workloads(mod, spec)
    best_db, trial_us = best_records_database(database, set(names.values()))
    if not trial_us:
        return {"kernels": {}, "end_to_end": {}}
    t0 = time.monotonic()
    default_ex = compile_relax(mod, spec)
    exes = {"default": default_ex, "tuned": compile_relax(mod, spec, best_db)}
    inputs = random_inputs(mod)
    kernels, e2e = time_in_model(exes, names, inputs, rounds, runs_per_round)
    out = {}
    for key, best_trial in trial_us.items():
        d, b = kernels["default"].get(key), kernels["tuned"].get(key)
        if d is None or b is None:
            continue
        out[key] = {"default_us": d, "best_us": b, "best_trial_us": best_trial,
                    "in_model": True}
    say(f"[tune] in-model timing ({time.monotonic() - t0:.0f}s, two compiles, "
        f"{rounds}x{runs_per_round} runs each): default schedules {e2e['default']:.1f} us, "
        f"every best record applied {e2e['tuned']:.1f} us end to end")
    result = {"kernels": out, "end_to_end": {"default_us": e2e["default"],
                                             "all_best_us": e2e["tuned"]}}
    winners = {k for k, v in out.items() if kernel_wins(v)}
    if winners:
        result["end_to_end"].update(_check_winners_together(
            mod, spec, database, winners, default_ex, names, inputs, out,
            2 * rounds, runs_per_round, say))
    return result


def _check_winners_together(mod, spec, database, winners, default_ex, names, inputs, out,
                            rounds, runs_per_round, say) -> dict:
    """Time the model with only the ``winners``' records next to the default schedules;
    mark every winner ``model_slower`` in ``out`` unless the model got faster."""
    from .pipeline import compile_relax

    chosen_db, _ = best_records_database(database, winners)
    exes = {"default": default_ex, "chosen": compile_relax(mod, spec, chosen_db)}
    _, e2e = time_in_model(exes, names, inputs, rounds, runs_per_round)
    faster = e2e["chosen"] < e2e["default"] * MODEL_WIN
    if not faster:
        for key in winners:
            out[key]["model_slower"] = True
    say(f"[tune] the {len(winners)} record(s) that won their kernel, applied together: "
        f"{e2e['chosen']:.1f} us vs {e2e['default']:.1f} us default end to end "
        f"({e2e['default'] / e2e['chosen']:.2f}x): "
        + ("compile applies them" if faster else "not faster, compile applies none of them"))
    return {"chosen_us": e2e["chosen"], "chosen_default_us": e2e["default"],
            "chosen_records": len(winners), "chosen_applied": faster}
