"""The CLI contract: fast startup, targets table, compile -> artifact, measure ->
report.json/report.md with the documented keys, report re-render, measure over
a local RPC server and through a tracker, clear errors for user mistakes."""

import json
import subprocess
import sys
import time

import pytest

from qcompile.cli import main
from qcompile.target import get_target


def _timed(argv):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qcompile.cli", *argv], capture_output=True,
                          text=True, timeout=60)
    return proc, time.perf_counter() - started


def test_help_is_fast_and_lists_the_verbs():
    proc, seconds = _timed(["--help"])
    assert proc.returncode == 0
    for verb in ("targets", "compile", "measure", "tune", "report"):
        assert verb in proc.stdout
    assert seconds < 2.0, f"qcompile --help took {seconds:.2f}s"


def test_targets_is_fast_and_lists_all_six():
    proc, seconds = _timed(["targets"])
    assert proc.returncode == 0
    for name in ("x86_64-avx2", "x86_64-avx512-vnni", "x86_64-amx", "aarch64-neon-dotprod",
                 "aarch64-neon", "cuda-sm80", "cuda-sm61"):
        assert name in proc.stdout
    assert seconds < 3.0, f"qcompile targets took {seconds:.2f}s"
    assert "tvm" not in sys.modules or True  # (in-process state is irrelevant here)


def test_no_tvm_import_on_fast_paths():
    code = ("import sys; from qcompile.cli import build_parser, cmd_targets; build_parser(); "
            "cmd_targets(None); print('tvm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def float_report(tmp_path_factory, bundled_model, bundled_test_data):
    out = tmp_path_factory.mktemp("report")
    code = main(["measure", str(bundled_model), "--target", "host", "--quantize", "none",
                 "--data", str(bundled_test_data), "--limit", "200", "--repeat", "10",
                 "--out", str(out)])
    assert code == 0
    return out


def test_measure_writes_report_with_documented_keys(float_report):
    report = json.loads((float_report / "report.json").read_text())
    assert {"float", "int8"} <= set(report)
    section = report["float"]
    assert {"median", "p90"} <= set(section["latency_ms"])
    assert section["latency_ms"]["median"] > 0
    assert {"top1", "cosine", "sqnr_db"} <= set(section["agreement"])
    assert section["agreement"]["top1"] == 1.0 and section["agreement"]["cosine"] > 0.99999
    assert section["agreement"]["samples"] == 200
    assert 0.8 < section["accuracy"] <= 1.0
    markdown = (float_report / "report.md").read_text()
    assert "latency median" in markdown and "top-1 agreement" in markdown


def test_report_says_which_kernels_use_tuned_records(tmp_path, bundled_model, bundled_test_data,
                                                     bundled_calib_data):
    """The shipped AVX2 log of the bundled model has a record compile applies: the report
    counts it (table row, JSON, a note naming the kernel); float kernels have none."""
    from pathlib import Path

    log = Path(__file__).resolve().parents[1] / "tuning_logs" / "fashion_mnist_cnn-x86_64-avx2"
    out = tmp_path / "rep"
    assert main(["measure", str(bundled_model), "--target", "x86_64-avx2", "--data",
                 str(bundled_test_data), "--calib", str(bundled_calib_data), "--limit", "20",
                 "--repeat", "5", "--tuning-log", str(log), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    tuning = report["int8"]["tuning"]
    assert 1 <= tuning["tuned_kernels"] < tuning["total_kernels"] and tuning["tuned"]
    assert report["float"]["tuning"]["tuned_kernels"] == 0
    row = next(ln for ln in (out / "report.md").read_text().splitlines()
               if ln.startswith("| kernels with a tuned record"))
    assert row == (f"| kernels with a tuned record | none | "
                   f"{tuning['tuned_kernels']} of {tuning['total_kernels']} |")
    assert any(n.startswith("int8: ") and tuning["tuned"][0] in n for n in report["notes"])


def test_report_rerenders_from_json(float_report, capsys):
    (float_report / "report.md").unlink()
    assert main(["report", str(float_report)]) == 0
    assert (float_report / "report.md").is_file()
    assert (float_report / "latency.png").stat().st_size > 1000


def test_compile_then_measure_the_artifact(tmp_path, bundled_model, bundled_test_data):
    out = tmp_path / "art"
    assert main(["compile", str(bundled_model), "--target", "host", "-o", str(out),
                 "--quantize", "none"]) == 0
    assert (out / "lib.so").is_file() and (out / "manifest.json").is_file()
    assert main(["measure", str(out), "--data", str(bundled_test_data), "--limit", "20",
                 "--repeat", "5", "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["float"]["agreement"]["top1"] == 1.0 and report["int8"] is None


def test_measure_over_local_rpc_server_and_tracker(tmp_path, bundled_model):
    from qcompile import rpc

    with rpc.start_server() as server:
        assert main(["measure", str(bundled_model), "--quantize", "none", "--limit", "4",
                     "--repeat", "5", "--rpc", server.address,
                     "--out", str(tmp_path / "direct")]) == 0
    direct = json.loads((tmp_path / "direct" / "report.json").read_text())
    assert direct["device"].startswith("rpc ") and direct["float"]["agreement"]["top1"] == 1
    with rpc.start_tracker() as tracker, \
            rpc.start_server(tracker=tracker.address, key="x86-test"):
        assert main(["measure", str(bundled_model), "--quantize", "none", "--limit", "4",
                     "--repeat", "5", "--rpc-tracker", tracker.address, "--rpc-key",
                     "x86-test", "--out", str(tmp_path / "tracked")]) == 0
        tracked = json.loads((tmp_path / "tracked" / "report.json").read_text())
        assert "tracker" in tracked["device"] and tracked["float"]["latency_ms"]["median"] > 0


def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, bundled_model):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    assert main(["compile", str(bad), "-o", str(tmp_path / "o"), "--quantize", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qcompile: error:") and str(bad) in err and "Traceback" not in err
    assert main(["compile", str(bundled_model), "--target", "nope", "-o",
                 str(tmp_path / "o")]) == 2
    assert "unknown target" in capsys.readouterr().err
    assert main(["measure", str(bundled_model), "--target", "aarch64-neon",
                 "--quantize", "none", "--out", str(tmp_path / "r")]) == 2
    assert "cannot run on this machine" in capsys.readouterr().err


def test_measure_dead_rpc_address_fails_fast(tmp_path, bundled_model, capsys):
    from qcompile.rpc import _free_port

    port = _free_port("127.0.0.1")
    started = time.perf_counter()
    assert main(["measure", str(bundled_model), "--quantize", "none", "--rpc",
                 f"127.0.0.1:{port}", "--out", str(tmp_path / "r")]) == 2
    assert time.perf_counter() - started < 60
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    assert get_target("host")  # nothing else broke


def test_tuning_log_none_turns_the_shipped_logs_off(monkeypatch, tmp_path, bundled_model):
    """`--tuning-log none` reaches compile_model as False (no shipped logs either), a
    directory reaches it as given, and no flag leaves the shipped-log default (None)."""
    from qcompile import build
    from qcompile.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["compile", "m.onnx", "-o", "o", "--tuning-log", "none"]).tuning_log is False
    assert parse(["measure", "m.onnx", "--tuning-log", "NONE"]).tuning_log is False
    assert parse(["compile", "m.onnx", "-o", "o", "--tuning-log", "logs/x"]).tuning_log == "logs/x"
    assert parse(["compile", "m.onnx", "-o", "o"]).tuning_log is None

    seen = []
    real = build._tuning_database
    monkeypatch.setattr(build, "_tuning_database",
                        lambda mod, spec, log, say: seen.append(log) or real(mod, spec, log, say))
    out = tmp_path / "a"
    assert main(["compile", str(bundled_model), "--target", "x86_64-avx2", "-o", str(out),
                 "--quantize", "none", "--tuning-log", "none"]) == 0
    assert seen == [False]
    assert json.loads((out / "manifest.json").read_text())["tuning"] == {"log": None}
