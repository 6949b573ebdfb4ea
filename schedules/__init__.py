"""Default schedules and int8 tensor intrinsics, per ISA family.

Installed as ``qcompile.schedules``. ``default_schedule_passes(spec, target)``
returns the passes that schedule every fused kernel no tuning record covers.

* ``cpu``    default CPU rules (packed conv2d/matmul micro-kernels, float and int8,
             with fused epilogues; dlight GEMV/Reduction; parallel+vectorize fallback).
* ``intrin`` the int8 L x 4 dot-product tile and its registry (lazy).
* ``x86``, ``arm``, ``cuda``: per-ISA implementations of that tile.
"""

from __future__ import annotations


def default_schedule_passes(spec, target) -> list:
    """Passes that give each untuned kernel a schedule fit for ``target``.

    GPU: packed int8 conv2d/matmul on ``__dp4a`` (``cuda``), everything else on TVM's
    dlight GPU rules (every kernel needs thread binding to build).
    CPU: qcompile's CPU rules (``qcompile.schedules.cpu``).
    """
    if spec.is_cuda or target.kind.name == "cuda":
        from tvm.s_tir import dlight as dl

        from .cuda import apply_cuda_int8_schedules

        return [apply_cuda_int8_schedules(target), dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
    from .cpu import apply_cpu_schedules

    return [apply_cpu_schedules(target)]
