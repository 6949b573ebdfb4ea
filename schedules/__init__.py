"""Default schedules and int8 tensor intrinsics, per ISA family.

Installed as ``qcompile.schedules``. ``default_schedule_passes(spec, target)``
returns the passes that schedule every fused kernel no tuning record covers.

How it fits together:

* ``qcompile.layout`` (run by ``pipeline.fuse_passes`` before LegalizeOps) rewrites
  conv2d / matmul with constant weights into qcompile TE computes with packed weights
  (and, for int8, an in-kernel activation repack to ``[N, C/4, H, W, 4]``); their
  reduction blocks carry the ``qcompile_kernel`` annotation.
* ``cpu``    default CPU rules: register-tiled micro-kernels for the annotated kernels
             (float FMA, int8 via the target's dot-product tile), fused epilogues inlined
             into the tile write-back, outer loops parallel; dlight GEMV/Reduction;
             pools one task per channel plane (padding copied inside it); parallel +
             vectorize for everything else.
* ``intrin`` the int8 ``L x 4`` tile semantics and its lazy registry; ``x86`` (AVX-512
             VNNI ``vpdpbusd``, AVX2 ``vpmaddubsw``+``vpmaddwd``), ``arm`` (NEON ``sdot``):
             real implementations; every family also has a portable (plain TIR) one.
* ``amx``    Intel AMX ``tdpbsud`` for the int8 convs that fit its tiles (AMX targets):
             a 2x2 block of 16x16 int32 tiles held in tile registers over the reduction.
* ``cuda``   ``__dp4a`` for the packed int8 kernels; the rest stays with dlight's GPU rules.

Every rule works on a copy of the kernel and falls back (next rule, then the kernel
unchanged) when it does not apply, so a kernel no rule knows never fails a build.
Set ``QCOMPILE_SCHEDULE_DEBUG=1`` to raise instead (tests use it while developing).
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
    from .amx import apply_amx_schedules
    from .arm import apply_arm_i8mm_schedules
    from .cpu import apply_cpu_schedules

    # AMX and smmla kernels (packed by qcompile.layout only for AMX / +i8mm targets, or
    # when forced) first; those passes leave every other kernel to the CPU rules.
    return [apply_amx_schedules(target), apply_arm_i8mm_schedules(target),
            apply_cpu_schedules(target)]
