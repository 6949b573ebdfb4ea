"""The `qcompile tune` options and runner, called by :mod:`qcompile.cli`.

``add_arguments(parser)`` adds the tuning options to the ``tune`` sub-parser;
``run(args, mod, spec, model_name)`` tunes the (already imported, optionally
quantized) Relax module and prints a summary. Exit code 0 on success,
including a run stopped by its budget or by Ctrl-C (the records are kept and
the same command continues the run).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tuning (MetaSchedule + XGBoost cost model)")
    group.add_argument("--trials", type=int, default=64, metavar="N",
                       help="total measured trials for the model (default 64); trials "
                            "already in the log count, so re-running continues a run")
    group.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                       help="stop cleanly after M minutes (records so far are kept)")
    group.add_argument("--log", default=None, metavar="DIR",
                       help="tuning database directory (default: "
                            "./tuning_logs/<model>-<target>/); appended to, never rewritten")
    group.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                       help="measure on the boards registered at this TVM RPC tracker")
    group.add_argument("--rpc-key", default=None, metavar="KEY",
                       help="board key at the tracker (default: the target's rpc_key)")
    group.add_argument("--trials-per-batch", type=int, default=None, metavar="N",
                       help="candidates measured per batch (default: up to 16)")
    group.add_argument("--summary-json", default=None, metavar="FILE",
                       help="also write the run summary as JSON")
    group.add_argument("--quiet-tuning", action="store_true",
                       help="no per-batch progress lines on stderr")
    group.add_argument("--space", default="qcompile", choices=("qcompile", "generic", "union"),
                       help="design space of qcompile's conv/matmul kernels: 'qcompile' "
                            "(default: the default schedules with their tile sizes and "
                            "loop-order variants as tunable decisions), 'generic' "
                            "(MetaSchedule's own), 'union' (both)")
    group.add_argument("--verify", action="store_true",
                       help="do not tune: re-time the best record of each kernel against "
                            "its default schedule inside the compiled model and update "
                            "which records compile applies (run after the default "
                            "schedules change)")


def run(args, mod, spec, model_name: str) -> int:
    from .errors import TuningError
    from .tune import default_log_dir, tune

    if args.trials is not None and args.trials < 1:
        raise TuningError(f"--trials must be at least 1, got {args.trials}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        raise TuningError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.rpc_key and not args.rpc_tracker:
        raise TuningError("--rpc-key needs --rpc-tracker HOST:PORT")
    log_dir = args.log or default_log_dir(model_name, spec)
    if getattr(args, "verify", False):
        from .tune import verify
        from .tune_verify import kernel_wins

        res = verify(mod, spec, log_dir, progress=not getattr(args, "quiet_tuning", False))
        e2e = res["end_to_end"]
        # the very test compile applies (margin included), so both lines agree
        kept = sum(1 for v in res["kernels"].values() if kernel_wins(v))
        print(f"{kept} of {len(res['kernels'])} tuned kernel(s) beat the default schedule in "
              f"the model; compile applies those from {log_dir}"
              + (f" (end to end: default {e2e['default_us']:.1f} us, every best record "
                 f"{e2e['all_best_us']:.1f} us)" if e2e else ""))
        return 0
    summary = tune(mod, spec, log_dir, trials=args.trials, budget_minutes=args.budget_minutes,
                   rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
                   progress=not getattr(args, "quiet_tuning", False), model_name=model_name,
                   trials_per_iter=getattr(args, "trials_per_batch", None),
                   space=getattr(args, "space", "qcompile"))
    print(summary.message)
    if summary.measured:
        print(f"tuning log: {summary.log_dir}  (use: qcompile compile ... --tuning-log "
              f"{summary.log_dir})")
    if getattr(args, "summary_json", None):
        with open(args.summary_json, "w") as fh:
            json.dump(summary.to_dict(), fh, indent=1, default=str)
            fh.write("\n")
    if not summary.measured:
        print(f"note: nothing was measured: {summary.runner}", file=sys.stderr)
    return 0
