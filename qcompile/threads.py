"""How many threads TVM's runtime pool gets in this process.

TVM sizes its thread pool once, when the pool is first used, from ``TVM_NUM_THREADS``
(else ``OMP_NUM_THREADS``, else *half* of ``hardware_concurrency`` on x86, assuming
two hyper-threads per core). Two consequences, both measured on the 2-vCPU machines
this project runs on (one thread per core, no SMT):

* Left alone, TVM runs on one of the two cores: the bundled int8 CNN took 37 us
  instead of 16 us, int8 ResNet-18 9.8 ms instead of 5.4 ms, and ``qcompile tune``
  picked schedules that win only single-threaded.
* ``runtime.config_threadpool`` can only shrink the pool after it exists, never grow
  it, so the count must be in the environment before TVM first runs a kernel.

:func:`configure` therefore runs at the very start of the CLI: it sets
``TVM_NUM_THREADS`` to the requested count, or, when neither the user nor the
environment chose one, to the number of physical cores this process may run on.
Child processes (MetaSchedule's builders and runners, local RPC servers) inherit it.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TVM_NUM_THREADS"


SYSFS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(sysfs: Path = SYSFS_CPU) -> int:
    """Physical cores among the CPUs this process may run on (at least 1).

    Hyper-thread siblings count once (Linux sysfs topology under ``sysfs``); a CPU
    whose topology is not readable counts as a core of its own.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def configure(requested: int | None = None) -> tuple[int, str]:
    """Fix the TVM thread count for this process and its children.

    ``requested`` (``--threads``) wins; else an existing ``TVM_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` is kept; else the physical core count is set. Returns the
    count and where it came from (``"--threads"``, the variable's name, or
    ``"physical cores"``), for reports.
    """
    if requested:
        os.environ[ENV] = str(int(requested))
        return int(requested), "--threads"
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    count = physical_cores()
    os.environ[ENV] = str(count)
    return count, "physical cores"
