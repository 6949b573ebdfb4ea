"""``qcompile tune --verify``: its summary line counts what compile will apply."""

from __future__ import annotations

import argparse


def test_verify_summary_counts_only_records_compile_applies(monkeypatch, capsys, tmp_path):
    from qcompile import tune, tune_cli

    res = {"kernels": {"a": {"best_us": 90.0, "default_us": 100.0},     # wins by 10 %
                       "b": {"best_us": 99.0, "default_us": 100.0},     # 1 %: under the margin
                       "c": {"best_us": 80.0, "default_us": 100.0, "model_slower": True}},
           "end_to_end": {}}
    monkeypatch.setattr(tune, "verify", lambda *a, **k: res)
    args = argparse.Namespace(trials=None, budget_minutes=None, rpc_key=None, rpc_tracker=None,
                              log=str(tmp_path), verify=True, quiet_tuning=True)
    assert tune_cli.run(args, mod=None, spec=None, model_name="m") == 0
    assert capsys.readouterr().out.startswith("1 of 3 tuned kernel(s) beat the default")
