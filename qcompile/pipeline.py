"""The lowering pipeline shared by ``compile`` and ``tune``.

Relax module -> fused TIR kernels -> scheduled kernels -> VM executable:

1. ``fuse_passes``: library dispatch, LegalizeOps, FoldConstant, FuseOps,
   FuseTIR. ``tune`` extracts its tasks from exactly this output, so tuning
   records always match the kernels ``compile`` builds.
2. ``schedule_passes``: tuning records first (MetaScheduleApplyDatabase),
   then qcompile's default schedules (``qcompile.schedules``) for every kernel
   no record covers.
3. TVM's dataflow-lowering and finalize passes for the target.
"""

from __future__ import annotations

# x86: requantize rounding + clip + narrowing cast as one vcvtps2dq (schedules/rounding.py)
REQUANT_LRINT = True


def fuse_passes(target) -> list:
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = relax_pipeline.library_dispatch_passes(target)
    except (ValueError, AttributeError):
        dispatch = []
    from qcompile.layout import layout_passes  # weight packing before legalization
    from qcompile.schedules.rounding import rounding_passes

    return [
        *dispatch,
        *layout_passes(target),
        *(rounding_passes(target) if REQUANT_LRINT else []),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def fuse(mod, target):
    """The fused-TIR module that tuning extracts tasks from."""
    import tvm

    with target:
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def schedule_passes(spec, target, use_database: bool) -> list:
    from tvm import relax

    from qcompile import schedules

    passes = []
    if use_database:
        passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
    passes.extend(schedules.default_schedule_passes(spec, target))
    return passes


def lower_passes(target) -> list:
    import importlib

    # TVM 0.27's relax.pipeline.dataflow_lower_passes looks the function up on the
    # backend package, whose __init__ does not export it for CPU: go to the module.
    backend = "cuda" if target.kind.name == "cuda" else "cpu_generic"
    module = importlib.import_module(f"tvm.relax.backend.{backend}.pipeline")
    return module.dataflow_lower_passes(target) + module.finalize_passes(target)


def relax_pipeline(spec, target, use_database: bool = False):
    """One module pass running the three stages above for ``spec``."""
    import tvm

    @tvm.transform.module_pass(opt_level=3, name="qcompile.pipeline")
    def _pipeline(mod, _ctx):
        with target:
            mod = tvm.transform.Sequential(fuse_passes(target))(mod)
            mod = tvm.transform.Sequential(schedule_passes(spec, target, use_database))(mod)
            return tvm.transform.Sequential(lower_passes(target))(mod)

    return _pipeline


def compile_relax(mod, spec, database=None):
    """Build a Relax module into a VM executable for ``spec`` (a TargetSpec)."""
    import contextlib

    import tvm

    target = spec.tvm_target()
    pipeline = relax_pipeline(spec, target, use_database=database is not None)
    # MetaScheduleApplyDatabase reads the database from the enclosing context.
    records = database if database is not None else contextlib.nullcontext()
    with target, records, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=pipeline)
