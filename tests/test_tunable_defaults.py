"""The default CPU schedules as a tuning design space (schedules.cpu.tunable_spaces).

Default compile must take exactly the heuristic's choices (no sampling instruction, the
same TIR as the space's first design with its decisions), and a record drawn from the
space with other decisions must replay in compile (MetaScheduleApplyDatabase) and compute
the same int8 outputs bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

TARGET = "x86_64-avx2"


@pytest.fixture(scope="module")
def int8_model(bundled_model):
    """(quantized Relax module, spec, packed-kernel tasks) of the bundled model."""
    from qcompile.frontend import import_onnx
    from qcompile.quantize import QuantConfig, quantize_model
    from qcompile.quantize.calibrate import load_calibration
    from qcompile.target import get_target
    from qcompile.tune import extract_tasks

    spec = get_target(TARGET)
    imp = import_onnx(bundled_model)
    calib = load_calibration(bundled_model.parent / "fashion_mnist_calib.npz", imp.inputs)
    mod = quantize_model(imp, calib, QuantConfig(), spec).mod
    tasks = [t for t in extract_tasks(mod, spec) if "conv2d_packed_int8" in t.task_name]
    assert len(tasks) == 2
    return mod, spec, tasks


def _spaces(task, spec):
    from tvm import s_tir

    from qcompile.schedules import cpu

    target = spec.tvm_target()
    cpu.allow_vector_nearbyint()
    with target:
        return cpu.tunable_spaces(s_tir.Schedule(task.dispatched[0]), target)


def _samples(sch):
    return [inst for inst in sch.trace.insts if inst.kind.name.startswith("Sample")]


def test_default_compile_takes_the_heuristic_decisions(int8_model, monkeypatch):
    """(Compared with padding decomposition off: tuning spaces never decompose, see
    ``schedules.cpu.DECOMPOSE_PADDING``.)"""
    from tvm_ffi import structural_equal

    from qcompile.schedules import cpu

    _, spec, tasks = int8_model
    target = spec.tvm_target()
    monkeypatch.setattr(cpu, "DECOMPOSE_PADDING", False)
    for task in tasks:
        func = task.dispatched[0]["main"]
        with target:
            default = cpu.apply_packed_rule(func, target)
        assert _samples(default) == []  # default compile: plain ints, nothing sampled
        spaces = _spaces(task, spec)
        assert len(spaces) >= 3  # the default structure plus variants
        first = spaces[0]
        tiles = _samples(first)
        assert tiles and tiles[0].kind.name == "SamplePerfectTile"
        # the decision is the heuristic's tile: the same TIR as the default schedule
        assert structural_equal(first.mod["main"], default.mod["main"])
        # and the variants really differ from it
        assert not any(structural_equal(sp.mod["main"], default.mod["main"])
                       for sp in spaces[1:])


def _redraw(space, task, wanted_inner):
    """The space's trace with its first tile decided as ``[*, wanted_inner]``, replayed."""
    from tvm import s_tir

    inst = _samples(space)[0]
    decision = [int(d) for d in space.trace.decisions[inst]]
    total = decision[0] * decision[1]
    assert total % wanted_inner == 0 and decision[1] != wanted_inner
    trace = space.trace.with_decision(inst, [total // wanted_inner, wanted_inner],
                                      remove_postproc=True)
    sch = s_tir.Schedule(task.dispatched[0])
    trace.apply_to_schedule(sch, remove_postproc=False)
    return sch


def test_record_from_the_space_applies_in_compile_bit_identical(int8_model, tmp_path):
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm_ffi import structural_equal

    from qcompile.pipeline import compile_relax
    from qcompile.tune import coverage_detail, register_schedule_intrinsics

    mod, spec, tasks = int8_model
    register_schedule_intrinsics(spec.int8_intrinsic)
    target = spec.tvm_target()
    db = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    for task in tasks:
        space = _spaces(task, spec)[0]
        sch = _redraw(space, task, 2)  # 2 pixels per register tile instead of the default
        assert not structural_equal(sch.mod["main"], space.mod["main"])
        wl = db.commit_workload(task.dispatched[0])
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, wl, [1e-6], target, ms.arg_info.ArgInfo.from_prim_func(
                task.dispatched[0]["main"])))
    # reload from disk: what compile reads from a tuning log
    db = ms.database.JSONDatabase(work_dir=str(tmp_path), module_equality="structural")
    tuned, _ = coverage_detail(mod, spec, db)
    assert sum("conv2d_packed_int8" in n for n in tuned) == 2

    x = np.random.RandomState(3).rand(1, 1, 28, 28).astype("float32")
    outs = []
    for database in (None, db):
        ex = compile_relax(mod, spec, database=database)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_design_space_per_kernel(int8_model):
    from tvm.s_tir import meta_schedule as ms

    from qcompile.errors import TuningError
    from qcompile.tune import design_space, extract_tasks

    mod, spec, conv_tasks = int8_model
    target = spec.tvm_target()
    for task in conv_tasks:
        assert isinstance(design_space(task, target), ms.space_generator.ScheduleFn)
        assert design_space(task, target, "generic") == "post-order-apply"
        assert isinstance(design_space(task, target, "union"),
                          ms.space_generator.SpaceGeneratorUnion)
    others = [t for t in extract_tasks(mod, spec) if "max_pool2d" in t.task_name]
    assert others and all(design_space(t, target) == "post-order-apply" for t in others)
    with pytest.raises(TuningError, match="unknown design space"):
        design_space(conv_tasks[0], target, "mine")


def test_design_spaces_print_as_python(int8_model):
    """MetaSchedule prints every design space's trace as Python when a task starts; a
    trace TVM cannot print (DecomposePadding in TVM 0.27) fails the whole tuning run."""
    _, spec, tasks = int8_model
    for task in tasks:
        for space in _spaces(task, spec):
            assert space.trace.as_python()
