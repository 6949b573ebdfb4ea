"""TVM's thread pool size: qcompile sets TVM_NUM_THREADS to the physical cores before TVM
starts its pool (TVM's own default halves the CPUs on x86, and its pool can only shrink
later), keeps a count the user set, and honours --threads."""

import os
import subprocess
import sys

import pytest

from qcompile import threads


def _fake_topology(root, cores_of_cpus):
    for cpu, (package, core) in enumerate(cores_of_cpus):
        if core is None:
            (root / f"cpu{cpu}").mkdir()
            continue
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_physical_cores_counts_hyperthread_siblings_once(tmp_path, monkeypatch):
    # 2 packages x 2 cores x 2 threads, of which the process may use cpus 0-5
    layout = [(p, c) for p in (0, 1) for c in (0, 1) for _ in (0, 1)]
    _fake_topology(tmp_path, layout)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert threads.physical_cores(tmp_path) == 3  # (0,0) (0,1) (1,0)


def test_physical_cores_without_topology_counts_each_cpu(tmp_path, monkeypatch):
    _fake_topology(tmp_path, [(0, 0), (0, None), (0, None)])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert threads.physical_cores(tmp_path) == 3


def _pool_size(env_updates, code):
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_updates)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


CONFIGURE_THEN_RUN = """
import sys
from qcompile import threads
req = int(sys.argv[1]) if len(sys.argv) > 1 else None
n, source = threads.configure({req})
import tvm
print(n, source.replace(' ', '_'), tvm.get_global_func('runtime.NumThreads')())
"""


def test_default_is_the_physical_cores_and_tvm_uses_them():
    n, source, pool = _pool_size({}, CONFIGURE_THEN_RUN.format(req=None))
    assert source == "physical_cores"
    assert int(n) == threads.physical_cores()
    assert int(pool) == int(n)


@pytest.mark.parametrize("var", ["TVM_NUM_THREADS", "OMP_NUM_THREADS"])
def test_a_count_in_the_environment_is_kept(var):
    n, source, pool = _pool_size({var: "1"}, CONFIGURE_THEN_RUN.format(req=None))
    assert (n, source, pool) == ("1", var, "1")


def test_requested_threads_win_over_the_environment():
    # (TVM reports at most the machine's cores, so the request is the smaller count)
    n, source, pool = _pool_size({"TVM_NUM_THREADS": "2"}, CONFIGURE_THEN_RUN.format(req=1))
    assert (n, source, pool) == ("1", "--threads", "1")


def test_the_cli_sizes_the_pool_before_any_verb_runs():
    code = """
import sys
import qcompile.cli as cli
def probe(args):
    import tvm
    print(tvm.get_global_func('runtime.NumThreads')())
    return 0
cli.COMMANDS['tune'] = probe
sys.exit(cli.main(sys.argv[1:]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    for argv, expected in ((["tune", "m.onnx"], threads.physical_cores()),
                           (["tune", "m.onnx", "--threads", "1"], 1)):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                              text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert int(proc.stdout.split()[-1]) == expected
