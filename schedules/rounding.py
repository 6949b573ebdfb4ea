"""Requantize rounding on x86: ``astype(clip(round(v), lo, hi), int8|uint8)`` as one
``vcvtps2dq`` instead of ``vroundps`` + ``vcvttps2dq``.

Every int8 epilogue the quantizer emits ends with that chain. LLVM lowers ``round``
(TVM's ``nearbyint``: half to even) to ``vroundps`` (2 uops, 8-cycle latency) and the
narrowing cast to ``vcvttps2dq``; ``llvm.lrint`` rounds with the current mode (half to
even, the default) in a single ``vcvtps2dq``. Clipping to integer bounds commutes with
rounding, so the clip moves in front of the conversion, and the clipped int32 narrows
exactly. The values equal the original chain's for every float input, NaN aside.
The epilogues of outputs with a zero point, ``astype(clip(round(v) + zp, lo, hi))``, take
the same path with the zero point moved into the clip bounds and added to the integer.

``RequantRoundingPass()`` is a Relax pass run before LegalizeOps
(``qcompile.pipeline.fuse_passes``, x86 targets only): it replaces the chain with one TE
compute, which FuseOps fuses into the kernel epilogue like the ops it replaces.
"""

from __future__ import annotations

_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
# offsets (zero points) folded into the clip bounds: far inside int32 and float32's exact
# integers, so the moved bounds and the integer add are exact
_MAX_OFFSET = 1 << 16


def _scalar(expr):
    """The float value of a scalar constant / PrimValue clip bound, else None."""
    while hasattr(expr, "value"):  # PrimValue -> IntImm / FloatImm -> number
        expr = expr.value
    return float(expr) if isinstance(expr, (int, float)) else None


def _one_value_constant(expr):
    """The value of a one-element float32 constant tensor (a per-tensor zero point), else None."""
    from qcompile.quantize._ir import const_value

    arr = const_value(expr)
    if arr is None or arr.dtype != "float32" or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def lrint_clip_compute(v, lo: float, hi: float, dtype: str, offset: int = 0):
    """``dtype(lrint(clip(v, lo, hi)) + offset)`` elementwise (TE)."""
    from tvm import te, tirx

    def elem(*idx):
        x = tirx.max(tirx.min(v(*idx), tirx.const(hi, "float32")), tirx.const(lo, "float32"))
        r = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", x)
        return tirx.Cast(dtype, r + tirx.const(offset, "int32") if offset else r)

    return te.compute(v.shape, elem, name="requant_lrint")


def _make_mutator():
    from tvm import relax
    from tvm.relax import expr_functor
    from tvm_ffi import structural_equal

    @expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def _producer(self, expr, op_name):
            """The ``op_name`` call computing ``expr`` (nested, or bound to a var)."""
            if isinstance(expr, relax.Call):
                bound = expr
            elif isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
            else:
                return None
            if isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == op_name:
                return bound
            return None

        def visit_call_(self, orig):
            call = super().visit_call_(orig)
            if getattr(call.op, "name", None) != "relax.astype":
                return call
            dtype = str(call.attrs.dtype)
            clip = self._producer(call.args[0], "relax.clip")
            if dtype not in _RANGES or clip is None:
                return call
            rnd, offset = self._rounded(clip.args[0])
            if rnd is None:
                return call
            v = rnd.args[0]
            lo, hi = _scalar(clip.args[1]), _scalar(clip.args[2])
            if (lo is None or hi is None or str(v.ty.dtype) != "float32"
                    or not _RANGES[dtype][0] <= lo <= hi <= _RANGES[dtype][1]
                    or lo != int(lo) or hi != int(hi)):
                return call
            # clip(round(v) + c, lo, hi) == clip(round(v), lo - c, hi - c) + c for an
            # integer c, and the clipped integer plus c is exact in int32
            return self.builder_.call_te(lrint_clip_compute, v, lo - offset, hi - offset,
                                         dtype, offset, primfunc_name_hint="requant_lrint")

        def _rounded(self, expr):
            """(the round call, integer offset c) for ``round(v)`` or ``round(v) + c``
            (c a one-value integer constant: a zero point), else (None, 0)."""
            rnd = self._producer(expr, "relax.round")
            if rnd is not None:
                return rnd, 0
            add = self._producer(expr, "relax.add")
            if add is None:
                return None, 0
            for a, b in (add.args, add.args[::-1]):
                c = _one_value_constant(b)
                rnd = self._producer(a, "relax.round")
                if (rnd is not None and c is not None and c == int(c) and abs(c) <= _MAX_OFFSET
                        and structural_equal(add.ty.shape, rnd.ty.shape)):
                    return rnd, int(c)
            return None, 0

    return _Rewriter


def RequantRoundingPass():  # noqa: N802 - a pass constructor, named like TVM's
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="qcompile.RequantRounding")
    def _pass(mod, _ctx):
        rewriter = _make_mutator()(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        mod = rewriter.builder_.get()
        return relax.transform.DeadCodeElimination()(mod)

    return _pass


def rounding_passes(target) -> list:
    """The pass for the x86 targets (the int8 families of ``schedules.x86``, as the layout
    pass classifies the target); [] elsewhere (unchecked there)."""
    from qcompile.layout import plan_for_target

    from .x86 import PIXEL_FAMILIES

    plan = plan_for_target(target)
    return [RequantRoundingPass()] if plan and plan.int8_intrin in PIXEL_FAMILIES else []
