"""Default schedules and int8 tensor intrinsics, per ISA family.

Installed as ``qcompile.schedules``. ``default_schedule_passes(spec, target)``
returns the passes that schedule every fused kernel no tuning record covers.
"""

from __future__ import annotations


def default_schedule_passes(spec, target) -> list:
    """Passes that give each untuned kernel a schedule fit for ``target``.

    GPU: TVM's dlight GPU rules (every kernel needs thread binding to build).
    CPU: TVM's dlight CPU rules (GEMV, reduction); conv2d and matmul are left
    to LLVM's loop vectorizer until qcompile's own CPU rules land.
    """
    from tvm.s_tir import dlight as dl

    if spec.is_cuda:
        return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
    return [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())]
