"""Per-kernel time of a compiled model: which fused kernels eat the time.

    .venv/bin/python benchmarks/profile_kernels.py --model mobilenet_v2 --int8 [--target host]
        [--top 25] [--repeat 20] [--threads 1] [--json out.json]

Compiles a model from ``benchmarks/bench_models.py`` (same builders, same quantizer call)
with qcompile's default schedules, runs it once through the Relax VM with an instrument
that records every kernel call (name + argument tensors), then times each distinct call
on its own with the runtime's time evaluator (median of ``--repeat`` runs). Prints a table
sorted by total time (calls x median): kernel name, argument shapes/dtypes, ms per call,
share of the summed kernel time; and the end-to-end median for comparison (the difference
is VM overhead: allocation, reshapes, Python entry).

Threads: TVM's pool reads ``TVM_NUM_THREADS`` once per process; ``--threads`` sets it
before TVM is imported. Clock: with one thread the kernels run on the calling thread, so
the default ``--clock cpu`` times them with that thread's CPU time, which time spent
descheduled on a loaded machine does not inflate; ``--clock wall`` for more threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOCK = {"cpu": time.thread_time, "wall": time.perf_counter}
_now = time.perf_counter
sys.path.insert(0, str(ROOT / "benchmarks"))


def _compile(model_name: str, int8: bool, target_name: str):
    """(executable, input array, compile seconds) for a bench_models model."""
    import bench_models as bm

    model = bm.MODELS[model_name]()
    ex, secs = bm.qc_executable(model, model_name, int8, target_name)
    return ex, bm._input_of(model)[1], secs


def _record_calls(vm, arg, runs: int = 5):
    """Run ``main``; every call as (symbol, [argument tensors], in-model ms).

    The in-model time is the wall time between the instrument's before and after
    callbacks (median over ``runs`` runs): the kernel as it runs inside the model, with
    the caches the previous kernel left, plus a few microseconds of callback overhead.
    VM builtins (``vm.builtin.*``: allocation, reshape, ...) are kept too.
    """
    import numpy as np
    import tvm

    calls, times = [], []
    state = {"t0": 0.0, "k": 0, "first": True}

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            if state["first"]:
                kept = []
                for a in args:
                    if isinstance(a, tvm.runtime.Tensor):
                        # copy: the VM reuses storage, a later call may overwrite it
                        kept.append(tvm.runtime.tensor(a.numpy(), a.device))
                    else:
                        kept.append(a)
                calls.append((str(symbol), kept))
                times.append([])
            state["t0"] = _now()
        else:
            times[state["k"]].append((_now() - state["t0"]) * 1e3)
            state["k"] += 1
        return 0  # VMInstrumentReturnKind.kNoOp

    vm.set_instrument(instrument)
    for _ in range(runs):
        state["k"] = 0
        vm["main"](arg)
        state["first"] = False
    return [(sym, args, float(np.median(t))) for (sym, args), t in zip(calls, times)]


def _kernel_library(ex):
    """The compiled PrimFunc library (the VM executable imports it)."""
    mod = ex.mod if hasattr(ex, "mod") else ex
    for imp in mod.imports:
        if imp.kind in ("llvm", "static_library", "library", "so"):
            return imp
    return mod.imports[0] if mod.imports else mod


def _describe(args) -> str:
    parts = []
    for a in args:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            parts.append(f"{a.dtype}{list(a.shape)}")
    return " ".join(parts)


_FLUSH = {}


def _flush_caches(nbytes: int = 64 << 20):
    """Evict the CPU caches (rewrite a buffer larger than the last-level cache), so that
    the next kernel call starts with its weights and activations in DRAM: the other end
    of the range from the warm "alone" timing; in the model the truth is in between."""
    import numpy as np

    buf = _FLUSH.setdefault("buf", np.zeros(nbytes // 8))
    buf += 1.0


def profile(model_name, int8, target_name, repeat):
    import numpy as np
    import tvm
    from tvm import relax

    ex, x, compile_s = _compile(model_name, int8, target_name)
    dev = tvm.cpu()
    arg = tvm.runtime.tensor(x)
    vm = relax.VirtualMachine(ex, dev)
    calls = _record_calls(vm, arg)
    # end-to-end on a fresh VM (no instrument)
    vm2 = relax.VirtualMachine(ex, dev)
    fn = vm2["main"]
    for _ in range(3):
        fn(arg)
    e2e = []
    for _ in range(repeat):
        t0 = _now()
        fn(arg)
        e2e.append((_now() - t0) * 1e3)
    lib = _kernel_library(ex)
    rows = {}
    builtin_ms = 0.0
    for sym, args, inmodel in calls:
        if sym.startswith("vm."):
            builtin_ms += inmodel
            continue
        key = (sym, _describe(args))
        if key in rows:
            rows[key]["calls"] += 1
            rows[key]["in_model_ms"] += inmodel
            continue
        try:
            kernel = lib.get_function(sym)
            kernel(*args)  # warm-up
            samples = []
            for _ in range(repeat):
                t0 = _now()
                kernel(*args)
                samples.append((_now() - t0) * 1e3)
            ms = float(np.median(samples))
            cold = []
            for _ in range(max(3, repeat // 4)):
                _flush_caches()
                t0 = _now()
                kernel(*args)
                cold.append((_now() - t0) * 1e3)
            cold_ms = float(np.median(cold))
        except Exception as exc:  # noqa: BLE001 - a builtin that cannot be timed alone
            print(f"  (not timed: {sym}: {type(exc).__name__}: {str(exc)[:120]})",
                  file=sys.stderr)
            continue
        rows[key] = {"kernel": sym, "args": key[1], "ms": ms, "cold_ms": cold_ms, "calls": 1,
                     "in_model_ms": inmodel}
    out = sorted(rows.values(), key=lambda r: -r["in_model_ms"])
    total = sum(r["ms"] * r["calls"] for r in out)
    return {"model": model_name, "int8": int8, "target": target_name,
            "compile_s": compile_s, "e2e_ms": float(np.median(e2e)),
            "kernel_sum_ms": total,
            "kernel_cold_sum_ms": sum(r["cold_ms"] * r["calls"] for r in out),
            "in_model_sum_ms": sum(r["in_model_ms"] for r in out),
            "builtin_ms": builtin_ms, "kernels": out}


def print_table(res, top):
    kind = "int8" if res["int8"] else "fp32"
    print(f"# {res['model']} {kind} target={res['target']} threads="
          f"{os.environ.get('TVM_NUM_THREADS', '?')} clock={res.get('clock', '?')}  "
          f"compile {res['compile_s']:.1f} s (wall)")
    print(f"end-to-end median {res['e2e_ms']:.2f} ms; kernels in the model {res['in_model_sum_ms']:.2f} ms, "
          f"alone {res['kernel_sum_ms']:.2f} ms, alone with caches flushed "
          f"{res['kernel_cold_sum_ms']:.2f} ms ({len(res['kernels'])} distinct kernel calls); "
          f"VM builtins {res['builtin_ms']:.2f} ms")
    print("in-model: all calls of the kernel inside the model run (sorted by it); "
          "alone: one call timed by itself, warm caches; cold: alone after a cache flush")
    print(f"{'#':>3} {'in-model':>8} {'share':>6} {'calls':>5} {'alone/call':>10} {'cold/call':>9}  kernel  [args]")
    for i, r in enumerate(res["kernels"][:top], 1):
        share = 100 * r["in_model_ms"] / max(res["in_model_sum_ms"], 1e-9)
        print(f"{i:>3} {r['in_model_ms']:8.3f} {share:5.1f}% {r['calls']:>5} {r['ms']:10.3f}  "
              f"{r['kernel']}  [{r['args']}]")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--int8", action="store_true", help="quantize first (else float)")
    p.add_argument("--target", default="host")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the full table as JSON here")
    p.add_argument("--clock", choices=sorted(CLOCK), default=None,
                   help="cpu: calling thread's CPU time (default at 1 thread); wall")
    args = p.parse_args(argv)
    global _now
    _now = CLOCK[args.clock or ("cpu" if args.threads == 1 else "wall")]
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    res = profile(args.model, args.int8, args.target, args.repeat)
    res["clock"] = args.clock or ("cpu" if args.threads == 1 else "wall")
    print_table(res, args.top)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
