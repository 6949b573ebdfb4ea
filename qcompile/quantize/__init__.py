"""int8 quantization passes on Relax: prepare, calibrate, realize, sensitivity.

The API the CLI calls::

    from qcompile.quantize import QuantConfig, quantize_model, load_calibration

    calib = load_calibration("examples/fashion_mnist_calib.npz", imported.inputs)
    result = quantize_model(imported, calib, QuantConfig(), spec)
    result.mod      # Relax IRModule with int8 x int8 -> int32 conv2d / matmul
    result.summary  # JSON-serializable: scales, zero points, int8 vs float layers, SQNR, sizes

Each pass is usable on its own: :func:`~.prepare.prepare`,
:func:`~.plan.build_plan`, :func:`~.calibrate.calibrate`,
:func:`~.realize.realize`.

Static quantization needs calibration data: ``quantize_model(..., calib=None)``
raises :class:`~qcompile.errors.InputError` asking for ``--calib``. The
exception is a QDQ model (QuantizeLinear/DequantizeLinear, e.g. from ONNX
Runtime's ``quantize_static``): it brings its own scales, is compiled to the
same integer kernels without calibration, and ``calib`` (optional) only
feeds the per-layer SQNR report. ``QuantConfig(dynamic=True)`` (matmul layers,
activation scales from each batch's min/max at run time) needs no calibration
either.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import InputError
from .calibrate import CalibrationData, calibrate, load_calibration, observe_module
from .observers import METHODS, make_observer
from .plan import build_plan, tensor_names
from .equalize import channel_ranges, equalize
from .prepare import prepare
from .qdq import has_qdq, match_weight, strip_pairs, weight_table
from .realize import WEIGHT_SCALES, QParams, act_qparams, realize

__all__ = ["QuantConfig", "QuantResult", "quantize_model", "load_calibration", "prepare",
           "build_plan", "calibrate", "realize", "METHODS"]


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"{what} must be one of {', '.join(allowed)}, got '{value}'")


@dataclass
class QuantConfig:
    """How to quantize. Defaults: MSE-optimal ranges, per-channel symmetric int8 weights,
    asymmetric uint8 activations, conv2d and matmul quantized, 7-bit weights where
    the target asks for it (``reduce_range=None`` = the target's own setting)."""

    # minmax | percentile | entropy | mse. MSE is the default: the only method never far
    # behind on three models (measured; MobileNetV2 with 8-bit weights, 14 photos; MiniLM
    # last_hidden_state on 8 random-token sequences):
    #   method      bundled CNN top-1 agreement   MobileNetV2 logit SQNR   MiniLM SQNR
    #   minmax      99.55 %                        16.2 dB                  15.2 dB
    #   percentile  99.60 %                        18.9 dB                   6.7 dB
    #   entropy     98.30 %                        14.6 dB                   6.5 dB
    #   mse         99.55 %                        17.7 dB                  15.4 dB
    # (ORT quantize_static: 99.35 % and 13.9 dB). Clipping by percentile or KL cuts the
    # outliers a transformer's FFN activations depend on.
    method: str = "mse"
    percentile: float = 99.99         # for method="percentile"
    per_channel: bool = True          # weights: per output channel (else per tensor)
    act_dtype: str = "uint8"          # uint8 (asymmetric) | int8 (symmetric)
    reduce_range: bool | None = None  # 7-bit weights; None: target default
    skip: tuple = ()                  # layer names (ONNX node names) or op types to keep float
    ops: tuple = ("conv2d", "matmul")
    max_accuracy_drop: float | None = None  # points of top-1; None: no fallback search
    # accuracy fallback target on the model output: SQNR vs float (dB) on the evaluation
    # data at least this (with or without max_accuracy_drop; either one starts the search)
    min_output_sqnr: float | None = None
    fallback_search: str = "greedy"   # greedy (one build per layer moved) | bisect
    # how the fallback ranks layers: "isolated" (model-output SQNR with only that layer
    # int8: one model build per layer) | "local" (the layer's own output SQNR computed in
    # numpy on calibration inputs: no builds, blind to how errors propagate)
    sensitivity: str = "isolated"
    eval_data: object = None          # .npz path (input arrays + optional "labels") or batches
                                      # {input: array, "labels": array}; default: calibration data
    dynamic: bool = False             # matmul only, activation scales at run time, no calib
    # subtract (weight rounding error) x E[input] from each bias. Measured (int8 vs float
    # output SQNR): builder small_cnn 28.9 -> 37.5 dB, depthwise 32.7 -> 33.3 dB; bundled
    # CNN 38.1 -> 37.9 dB (7-bit), 42.4 -> 42.6 dB (8-bit), top-1 89.75 -> 89.70 %. On.
    bias_correction: bool = True
    # cross-layer equalization (quantize/equalize.py) of consecutive conv/matmul pairs
    # before calibration: None (off) | "weights" (data-free, Nagel et al.) | "activations"
    # (scales from each channel's measured range, residual streams too: one more float
    # pass). Off by default -- it helps MobileNetV2 but not EfficientNet-Lite0 (logit
    # SQNR on 14 photos, 8-bit weights; MiniLM has no equalizable pair):
    #   method        MobileNetV2 off/weights/activations   EfficientNet-Lite0 off/w/a
    #   mse           17.3 / 16.5 / 19.7 dB                  23.3 / 21.0 / 22.5 dB
    #   percentile    19.0 /  -   / 19.9 dB                  22.8 / - / 21.9 (pairs only)
    # and each ReLU6 between a pair becomes relu + a per-channel float minimum, which the
    # int8 epilogue (one clip bound per tensor) cannot fuse.
    equalize: str | None = None
    # per-channel weight scale: "minmax" (max|w| / 127) | "mse" (clip ratio in [0.5, 1]
    # of max|w| with the least weight MSE, per channel; realize.quantize_weight)
    weight_scale: str = "minmax"
    # "nearest" | "gptq": round each weight so the layer OUTPUT error on calibration
    # inputs is small (quantize/gptq.py); same scales and kernels
    # Default gptq: measured better on all four models (weight_scale=mse is not: -0.4 dB
    # on the bundled CNN); nearest vs gptq, same code (benchmarks/results/real_models.md):
    #   MobileNetV2 logit SQNR: mse 17.3 -> 17.8, percentile 19.0 -> 19.3,
    #     percentile + equalize activations 19.9 -> 21.4 dB (and 12/14 -> 14/14 top-1)
    #   EfficientNet-Lite0 (mse) 23.3 -> 24.3 dB; bundled CNN 43.2 -> 44.1 dB, top-1
    #   89.24 -> 89.29 %; MiniLM mean cosine 0.9904 -> 0.9907, NN 24/24 both
    # Cost: one more Gram matrix pass over the kept samples (MiniLM quantize 24 -> 93 s).
    weight_rounding: str = "gptq"
    rounding_samples: int = 16        # calibration samples whose inputs feed gptq
    # activation clip ranges: "observer" (each tensor's own range from `method`) |
    # "output" (quantize/range_search.py: the range alpha*[min, max] -- or the observer's --
    # with the least error in the OUTPUT of the layers that consume the tensor, on the
    # `rounding_samples` calibration samples). Opt-in: measured no gain (logit SQNR, 14
    # photos): MobileNetV2 percentile + equalize 21.4 -> 21.3 dB, EfficientNet-Lite0 mse
    # 24.3 -> 23.9 dB (benchmarks/results/real_models.md)
    act_range: str = "observer"
    requant: str = "float"            # float (float32 multiply, default) | fixed (int64 m0 >> n)
    sqnr: bool = True                 # per-layer SQNR vs float in the summary
    sqnr_samples: int = 64            # calibration samples used for SQNR
    calib_limit: int | None = None    # use at most this many calibration samples
    progress: bool | None = None      # None: progress bar when stderr is a terminal

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown calibration method '{self.method}'; choose one of "
                             f"{', '.join(METHODS)}")
        if self.act_dtype not in ("uint8", "int8"):
            raise InputError(f"activation dtype must be uint8 or int8, got '{self.act_dtype}'")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise InputError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise InputError("--max-accuracy-drop must be >= 0")
        _check_choice("fallback search", self.fallback_search, ("greedy", "bisect"))
        _check_choice("sensitivity", self.sensitivity, ("isolated", "local"))
        if self.equalize is True:
            self.equalize = "weights"
        if self.equalize in (False, "none", ""):
            self.equalize = None
        if self.equalize not in (None, "weights", "activations"):
            raise InputError(f"equalize must be weights, activations or none, got "
                             f"'{self.equalize}'")
        _check_choice("weight scale", self.weight_scale, WEIGHT_SCALES)
        _check_choice("weight rounding", self.weight_rounding, ("nearest", "gptq"))
        _check_choice("activation range", self.act_range, ("observer", "output"))
        _check_choice("requantize mode", self.requant, ("float", "fixed"))
        bad = [o for o in self.ops if o not in ("conv2d", "matmul")]
        if bad:
            raise InputError(f"cannot quantize ops {bad}; supported: conv2d, matmul")


@dataclass
class QuantResult:
    mod: object           # the int8 Relax IRModule
    summary: dict         # JSON-serializable, stored as manifest["quantization"]
    float_mod: object = None   # the prepared float module (same numerics as the import)
    plan: object = None
    qparams: dict = field(default_factory=dict)
    weight_override: object = None
    local_sensitivity: list | None = None  # [(dB, layer)] for sensitivity="local"


def _materialize(calib, inputs, limit=None):
    """Calibration data as a re-iterable list of batches (a path is loaded first)."""
    if calib is None:
        raise InputError("int8 quantization needs calibration data: pass --calib DATA (an .npz "
                         "keyed by input name, an .npy, or a directory of images), or "
                         "--quantize none")
    if isinstance(calib, (str, bytes)) or hasattr(calib, "__fspath__"):
        calib = load_calibration(calib, inputs, limit=limit)
    source = getattr(calib, "source", "calibration data")
    if isinstance(calib, dict):
        calib = [calib]
    try:
        batches = list(calib)
    except TypeError:
        raise InputError(f"{source}: calibration data must be a path or an iterable of "
                         f"{{input_name: array}} dicts, got {type(calib).__name__}") from None
    if limit is not None:
        kept, total = [], 0
        for b in batches:
            if total >= limit:
                break
            first = next(iter(b.values())) if isinstance(b, dict) and b else None
            n = len(first) if first is not None else 0
            if isinstance(b, dict) and total + n > limit:
                b = {k: v[:limit - total] for k, v in b.items()}
                n = limit - total
            kept.append(b)
            total += n
        batches = kept
    if not batches:
        raise InputError(f"{source}: calibration data is empty (no batches)")
    return CalibrationData(batches, source)


def _constant_bytes(mod) -> int:
    """Bytes of every constant in ``mod``'s main (the weights as stored)."""
    from . import _ir

    total = 0
    for binding in _ir.main_bindings(mod["main"]):
        for arg in getattr(binding.value, "args", []):
            array = _ir.const_value(arg)
            if array is not None:
                total += array.nbytes
    return total


def quantize_model(imported, calib, config: QuantConfig | None = None, spec=None) -> QuantResult:
    """Quantize an imported float model to int8 (see the module docstring)."""
    from ..target import get_target

    config = config or QuantConfig()
    config.validate()
    spec = get_target(spec)
    if config.dynamic:
        return _quantize_dynamic(imported, calib, config, spec)
    reduce_range = spec.reduce_range if config.reduce_range is None else bool(config.reduce_range)
    started = time.perf_counter()
    qdq = has_qdq(imported.mod)
    equalized = None
    data = None
    if not qdq or calib is not None:
        data = _materialize(calib, imported.inputs, config.calib_limit)
    onnx_model = getattr(imported, "onnx_model", None)
    kept = []
    local_ranking = None
    range_report = {}  # act_range="output": {root: observer vs chosen range}
    if qdq:
        # the model brings its own scales: no calibration, weights as given
        table = weight_table(imported.mod)
        float_mod, given = strip_pairs(prepare(imported.mod))
        plan = build_plan(float_mod, onnx_model, skip=config.skip, ops=config.ops, given=given)
        qparams = {var: given[var] for var in plan.roots}
        ranges = {var: (p.scale * (p.qmin - p.zero_point), p.scale * (p.qmax - p.zero_point))
                  for var, p in qparams.items()}

        def override(layer, axis):
            return match_weight(table, layer.weight, axis)

    else:
        override = None
        float_mod = prepare(imported.mod)
        if config.equalize:
            ranges = (channel_ranges(float_mod, spec, data, imported.inputs, config.progress)
                      if config.equalize == "activations" else None)
            float_mod, equalized = equalize(float_mod, ranges=ranges,
                                            per_channel=config.per_channel)
        plan = build_plan(float_mod, onnx_model, skip=config.skip, ops=config.ops)
        extra = [l.out_var for l in plan.quantized()] if config.sqnr else []
        # layer inputs kept for gptq rounding and/or the output-aware range search
        rounding_vars = []
        local = config.sensitivity == "local" and (config.max_accuracy_drop is not None
                                                   or config.min_output_sqnr is not None)
        if config.weight_rounding == "gptq" or config.act_range == "output" or local:
            rounding_vars = list(dict.fromkeys(l.input_var for l in plan.quantized()))
        means = ({l.input_var: (1 if l.kind == "conv2d" else -1) for l in plan.quantized()}
                 if config.bias_correction else None)
        observers, kept = calibrate(float_mod, plan, spec, data, imported.inputs,
                                    lambda: make_observer(config.method, config.percentile,
                                                          config.act_dtype),
                                    progress=config.progress, extra=extra + rounding_vars,
                                    keep_samples=max(config.sqnr_samples if config.sqnr else 0,
                                                     config.rounding_samples
                                                     if rounding_vars else 0),
                                    channel_means=means)
        samples = _kept_inputs(kept, extra, rounding_vars, config.rounding_samples)
        if config.weight_rounding == "gptq":
            override = _gptq_weights(plan, samples, config, reduce_range)
        if not config.sqnr:
            kept = []
        if config.bias_correction:
            correct_biases(plan, observers.pop("means"), config.per_channel, reduce_range,
                           config.weight_scale, weights=override)
        ranges = {var: obs.compute_range() for var, obs in observers.items()}
        if config.act_range == "output":
            from .range_search import output_aware_ranges

            bounds = {var: (obs.min, obs.max) for var, obs in observers.items()}
            ranges, range_report = output_aware_ranges(plan, samples, ranges, bounds,
                                                       config.act_dtype)
        qparams = {var: act_qparams(lo, hi, config.act_dtype) for var, (lo, hi) in ranges.items()}
        if local:
            from .sensitivity import local_sensitivity

            local_ranking = local_sensitivity(plan, samples, qparams, override,
                                              config.per_channel, reduce_range,
                                              config.weight_scale)
        samples = None
    names = tensor_names(plan, float_mod["main"])
    qmod, records = realize(float_mod, plan, qparams, config.per_channel, reduce_range,
                            weight_override=override, fake_quant=qdq, requant=config.requant,
                            names=names, weight_scale=config.weight_scale)

    if override is not None and not qdq:  # gptq: computed here, not brought by the model
        for record in records:
            record["weight"].update(from_model=False, rounding="gptq",
                                    scale_method=config.weight_scale)
    weight_bits = sorted({r["weight"]["bits"] for r in records}) or [7 if reduce_range else 8]
    summary = {
        "method": "qdq" if qdq else config.method,
        "percentile": config.percentile if config.method == "percentile" and not qdq else None,
        "weights": {"dtype": "int8", "symmetric": True,
                    "per_channel": all(r["weight"]["per_channel"] for r in records)
                    if records else config.per_channel,
                    "bits": max(weight_bits), "reduce_range": reduce_range and not qdq,
                    "scale": "from the model" if qdq else config.weight_scale,
                    "rounding": "from the model" if qdq else config.weight_rounding},
        "activations": {"dtype": config.act_dtype if not qdq else
                        sorted({p.dtype for p in qparams.values()}),
                        "symmetric": config.act_dtype == "int8" if not qdq else None},
        "bias_correction": bool(config.bias_correction and not qdq),
        "equalization": (None if equalized is None else
                         {"mode": config.equalize,
                          "pairs": len(equalized["pairs"]),
                          "residual_groups": len(equalized.get("groups", [])),
                          "sweeps": equalized["sweeps"],
                          "per_channel_clips": sum(p["clip"] for p in equalized["pairs"])}),
        "requantize": ("float32 multiply + round-half-even" if config.requant == "float" else
                       "int64 fixed-point multiply + rounding right shift")
        + ", fused into the conv/matmul epilogue",
        "calibration": ({"source": getattr(data, "source", "calibration data"),
                         "batches": len(data),
                         "samples": int(sum(len(next(iter(b.values()))) for b in data))}
                        if data is not None else None),
        "target": spec.name,
        "act_range": "from the model" if qdq else config.act_range,
        "tensors": {names.get(var, var.name): {**qparams[var].to_dict(),
                                               "range": [float(lo), float(hi)],
                                               **({"observer_range":
                                                   range_report[var]["observer_range"]}
                                                  if var in range_report else {})}
                    for var, (lo, hi) in ranges.items()},
        "layers": [],
    }
    by_name = {r["name"]: r for r in records}
    for layer in plan.layers:
        if layer.quantize:
            summary["layers"].append(by_name[layer.name])
        else:
            summary["layers"].append({"name": layer.name, "op": layer.onnx_op,
                                      "kind": layer.kind, "int8": False,
                                      "reason": layer.reason})
    result = QuantResult(mod=qmod, summary=summary, float_mod=float_mod, plan=plan,
                         qparams=qparams, weight_override=override,
                         local_sensitivity=local_ranking)
    if config.sqnr and plan.quantized() and kept:
        _add_sqnr(result, spec, kept, imported.inputs, config)
    elif qdq and config.sqnr and data is not None and plan.quantized():
        _add_qdq_sqnr(result, imported, spec, data, config)
    fallback = config.max_accuracy_drop is not None or config.min_output_sqnr is not None
    if fallback and qdq:
        summary["fallback"] = {"max_accuracy_drop": config.max_accuracy_drop,
                               "min_output_sqnr_db": config.min_output_sqnr,
                               "skipped": "a QDQ model's own quantization is kept as given"}
    elif fallback:
        from .sensitivity import fallback_search

        fallback_search(result, imported, data, config, spec, reduce_range)
    _finish_summary(result, started)
    return result


def _add_sqnr(result, spec, kept, inputs, config) -> None:
    """Per-layer and output SQNR: int8 module vs the float values kept from calibration."""
    from .sensitivity import collect_outputs, layer_sqnr, output_array

    layers = result.plan.quantized()
    extra = [l.out_var for l in layers]
    feeds = CalibrationData([feed for feed, _valid, _arrays in kept], "SQNR samples")
    float_outs = [np.concatenate([np.asarray(a[i])[:valid] if np.ndim(a[i]) else a[i]
                                  for _f, valid, a in kept]) for i in range(len(extra) + 1)]
    int8_mod, _ = realize(result.float_mod, result.plan, result.qparams,
                          config.per_channel, result.summary["weights"]["reduce_range"],
                          extra_outputs=extra, weight_override=result.weight_override,
                          requant=config.requant, weight_scale=config.weight_scale)
    int8_outs = collect_outputs(int8_mod, spec, feeds, inputs, config.progress, "SQNR")
    int8_outs = [np.asarray(o)[:len(f)] for o, f in zip(int8_outs, float_outs)]
    values = layer_sqnr(float_outs[1:], int8_outs[1:])
    by_name = {r["name"]: r for r in result.summary["layers"]}
    for layer, value in zip(layers, values):
        by_name[layer.name]["sqnr_db"] = value
    f_out, q_out = output_array(float_outs[0]), output_array(int8_outs[0])
    result.summary["output_sqnr_db"] = layer_sqnr([f_out], [q_out])[0]
    result.summary["sqnr_samples"] = int(len(f_out))
    if f_out.ndim == 2:
        result.summary["calib_top1_agreement"] = float(
            np.mean(f_out.argmax(axis=1) == q_out.argmax(axis=1)))


def _quantize_dynamic(imported, calib, config, spec) -> QuantResult:
    """Dynamic quantization: matmul layers with run-time activation scales; no calibration.

    ``calib`` is optional: when given, it only feeds the output SQNR in the summary.
    """
    from ..target import get_target
    from .realize import realize_dynamic
    from .sensitivity import layer_sqnr

    spec = get_target(spec)
    started = time.perf_counter()
    reduce_range = spec.reduce_range if config.reduce_range is None else bool(config.reduce_range)
    float_mod = prepare(imported.mod)
    plan = build_plan(float_mod, getattr(imported, "onnx_model", None), skip=config.skip,
                      ops=("matmul",))
    for layer in plan.layers:
        if layer.quantize is False and layer.kind == "conv2d" and "not selected" in layer.reason:
            layer.reason = "dynamic quantization covers matmul only"
    qmod, records = realize_dynamic(float_mod, plan, config.per_channel, reduce_range,
                                    config.weight_scale)
    by_name = {r["name"]: r for r in records}
    layers = [by_name.get(l.name) or {"name": l.name, "op": l.onnx_op, "kind": l.kind,
                                      "int8": False, "reason": l.reason}
              for l in plan.layers]
    summary = {
        "method": "dynamic",
        "weights": {"dtype": "int8", "symmetric": True, "per_channel": config.per_channel,
                    "bits": 7 if reduce_range else 8, "reduce_range": reduce_range},
        "activations": {"dtype": "uint8", "symmetric": False,
                        "scales": "per tensor, from each batch's min/max at run time"},
        "requantize": "none: int32 accumulators dequantized to float after each matmul",
        "calibration": None, "target": spec.name, "tensors": {}, "layers": layers,
    }
    result = QuantResult(mod=qmod, summary=summary, float_mod=float_mod, plan=plan)
    if calib is not None and config.sqnr and records:
        data = _materialize(calib, imported.inputs, config.calib_limit)
        ref, got = _reference_and_int8_outputs(float_mod, qmod, imported, spec, data, config,
                                               "SQNR (float)")
        summary["output_sqnr_db"] = layer_sqnr([ref], [got])[0]
        summary["sqnr_samples"] = int(len(ref))
    _finish_summary(result, started)
    return result


def _kept_inputs(kept, extra, input_vars, limit) -> dict:
    """{var: [float arrays]} of ``input_vars`` over the first ``limit`` kept samples
    (``kept`` arrays are ``[model output, *extra, *input_vars]``)."""
    first = 1 + len(extra)
    samples, count = {v: [] for v in input_vars}, 0
    for _feed, valid, arrays in kept:
        if count >= limit:
            break
        for var, array in zip(input_vars, arrays[first:]):
            samples[var].append(np.asarray(array)[:valid])
        count += valid
    return samples


def _gptq_weights(plan, samples, config, reduce_range):
    """{layer: (q int8, scales)} rounded against the kept calibration inputs
    (``samples``: {layer input var: [arrays]}), as a ``weight_override`` for realize."""
    from .gptq import conv_gram, gptq_weight, matmul_gram
    from .realize import quantize_weight

    table = {}
    qmax = 63 if reduce_range else 127
    for layer in plan.quantized():
        axis = 0 if layer.kind == "conv2d" else 1
        _q, scale = quantize_weight(layer.weight, axis, config.per_channel, reduce_range,
                                    config.weight_scale)
        gram = (conv_gram(samples[layer.input_var], layer.weight.shape, layer.call.attrs)
                if layer.kind == "conv2d" else matmul_gram(samples[layer.input_var]))
        table[layer.name] = (gptq_weight(layer.weight, scale, gram, layer.kind, qmax), scale)

    def override(layer, _axis):
        return table.get(layer.name)

    return override


def correct_biases(plan, means: dict, per_channel: bool, reduce_range: bool,
                   weight_scale: str = "minmax", weights=None) -> None:
    """Bias correction: remove the expected output shift caused by weight rounding.

    With ``dW = dequantize(quantize(W)) - W`` and the per-channel mean ``E[x]`` of
    the layer input over the calibration data, the int8 layer's output is off by
    ``dW . E[x]`` on average (per output channel); that is subtracted from the
    bias (conv: summed over the kernel window and the channels of the group).
    """
    from .realize import dequantized_weight

    for layer in plan.quantized():
        mean = means.get(layer.input_var)
        if mean is None:
            continue
        delta = (dequantized_weight(layer, weights, per_channel, reduce_range, weight_scale)
                 - layer.weight.astype(np.float64))
        if layer.kind == "conv2d":
            out_c, in_per_group = delta.shape[:2]
            groups = int(layer.call.attrs.groups)
            per_out = out_c // groups
            shift = np.zeros(out_c)
            for o in range(out_c):
                g = o // per_out
                m = mean[g * in_per_group:(g + 1) * in_per_group]
                shift[o] = np.sum(delta[o].sum(axis=(1, 2)) * m)
        else:
            shift = mean @ delta  # [K] x [K, N]
        base = layer.bias if layer.bias is not None else np.zeros(len(shift))
        layer.bias = base - shift


def _add_qdq_sqnr(result, imported, spec, data, config) -> None:
    """QDQ model: output SQNR of the integer module vs the model's own float fake-quant graph.

    (Per-layer SQNR against a float model is not defined here: QDQ exporters fold
    ReLUs into the quantization ranges, so the graph without Q/DQ is not the float model.)
    """
    from .sensitivity import layer_sqnr

    ref, got = _reference_and_int8_outputs(imported.mod, result.mod, imported, spec, data,
                                           config, "SQNR (QDQ float)")
    result.summary["output_sqnr_db"] = layer_sqnr([ref], [got])[0]
    result.summary["output_sqnr_reference"] = "the QDQ model computed in float (fake quant)"
    result.summary["sqnr_samples"] = int(len(ref))
    if ref.ndim == 2:
        result.summary["calib_top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))


def _reference_and_int8_outputs(ref_mod, int8_mod, imported, spec, data, config, ref_label):
    """Model outputs of both modules on the first ``config.sqnr_samples`` samples of ``data``."""
    from .sensitivity import collect_outputs, output_array

    subset, count = [], 0
    for batch in data:
        subset.append(batch)
        count += len(next(iter(batch.values())))
        if count >= config.sqnr_samples:
            break
    subset = CalibrationData(subset, data.source)
    ref = output_array(collect_outputs(observe_module(ref_mod, []), spec, subset,
                                       imported.inputs, config.progress, ref_label)[0])
    got = output_array(collect_outputs(observe_module(int8_mod, []), spec, subset,
                                       imported.inputs, config.progress, "SQNR (int8)")[0])
    return ref, got


def _finish_summary(result, started) -> None:
    summary = result.summary
    summary["int8_layers"] = [l["name"] for l in summary["layers"] if l["int8"]]
    summary["float_layers"] = [l["name"] for l in summary["layers"] if not l["int8"]]
    fp32 = _constant_bytes(result.float_mod)
    int8 = _constant_bytes(result.mod)
    summary["weight_bytes"] = {"fp32": int(fp32), "int8": int(int8),
                               "ratio": float(fp32 / int8) if int8 else None}
    summary["time_s"] = round(time.perf_counter() - started, 3)
    for key, value in list(summary.items()):
        if isinstance(value, float) and not np.isfinite(value):
            summary[key] = None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    for layer in summary["layers"]:
        v = layer.get("sqnr_db")
        if isinstance(v, float) and not np.isfinite(v):
            layer["sqnr_db"] = "inf"


def config_dict(config: QuantConfig) -> dict:
    out = asdict(config)
    out.pop("eval_data", None)
    return out
