"""Per-layer error and accuracy-budgeted float fallback.

* :func:`layer_sqnr` -- SQNR (dB) of every quantized layer's output and of the
  model output, int8 module vs float module, on the same batches. The int8
  layer outputs include the error accumulated from earlier layers (what the
  deployed model really sees).
* :func:`fallback_search` -- keep the most sensitive layers in float until the
  target holds on the evaluation data (top-1 within ``max_accuracy_drop`` points of
  float and/or model-output SQNR >= ``min_output_sqnr`` dB): layers are ranked by
  the model-output SQNR when *only that layer* is quantized (lowest first), then
  moved to float in that order (one at a time, or by bisection of the order).
"""

from __future__ import annotations

import numpy as np

from .calibrate import run_module


def sqnr_db(signal_power: float, noise_power: float) -> float | None:
    if noise_power <= 0:
        return None if signal_power <= 0 else float("inf")
    if signal_power <= 0:
        return None
    return float(10.0 * np.log10(signal_power / noise_power))


def collect_outputs(mod, spec, data, inputs, progress=None, desc="running", exe=None):
    """Run ``mod`` (main returns a tuple) over ``data``; list of per-field concatenations."""
    chunks: list[list] = []

    def on_batch(arrays, _valid):
        if not chunks:
            chunks.extend([] for _ in arrays)
        for store, array in zip(chunks, arrays):
            store.append(np.asarray(array))

    run_module(mod, spec, data, inputs, on_batch, progress, desc, exe=exe)
    return [np.concatenate(c) if c[0].ndim else np.stack(c) for c in chunks]


def output_array(value) -> np.ndarray:
    """The first model output as an array (models returning a tuple give their first field)."""
    while isinstance(value, (list, tuple)):
        value = value[0]
    return np.asarray(value)


def layer_sqnr(float_outs: list, int8_outs: list) -> list:
    """SQNR (dB) for each pair of float / int8 arrays."""
    result = []
    for f, q in zip(float_outs, int8_outs):
        f = np.asarray(f, dtype=np.float64)
        q = np.asarray(q, dtype=np.float64)
        result.append(sqnr_db(float(np.sum(f * f)), float(np.sum((f - q) ** 2))))
    return result


def top1_metric(reference: np.ndarray, candidate: np.ndarray, labels=None) -> float:
    """Accuracy in percent against ``labels`` when given, else top-1 agreement with ``reference``."""
    pred = candidate.reshape(len(candidate), -1).argmax(axis=1)
    if labels is not None:
        return float(100.0 * np.mean(pred == np.asarray(labels).reshape(-1)[:len(pred)]))
    ref = reference.reshape(len(reference), -1).argmax(axis=1)
    return float(100.0 * np.mean(pred == ref))


def _eval_set(config, data, inputs):
    """(batches, labels or None, description) for the fallback metric."""
    from .calibrate import CalibrationData, load_calibration

    source = config.eval_data
    if source is None:
        return data, None, f"top-1 agreement with float on the calibration data ({data.source})"
    labels = None
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        batches = load_calibration(source, inputs)
        if str(source).endswith(".npz"):
            with np.load(source, allow_pickle=False) as npz:
                for key in ("labels", "label", "y"):
                    if key in npz.files:
                        labels = np.asarray(npz[key]).reshape(-1)
        what = (f"top-1 accuracy on {source}" if labels is not None
                else f"top-1 agreement with float on {source}")
        return batches, labels, what
    batches = list(source)
    if batches and all(isinstance(b, dict) and "labels" in b for b in batches):
        labels = np.concatenate([np.asarray(b["labels"]).reshape(-1) for b in batches])
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    what = "top-1 accuracy on the evaluation data" if labels is not None \
        else "top-1 agreement with float on the evaluation data"
    return CalibrationData(batches, "evaluation data"), labels, what


def _latency_ms(exe, inputs) -> float:
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(exe, dev)
    args = [tvm.runtime.tensor(np.zeros(i.shape, i.dtype)) for i in inputs]
    timer = vm.time_evaluator("main", dev, number=5, repeat=3)
    return float(np.median(timer(*args).results) * 1e3)


def local_sensitivity(plan, samples: dict, qparams: dict, weights, per_channel=True,
                      reduce_range=False, weight_scale="minmax") -> list:
    """[(SQNR dB, layer name)] of each quantized layer computed alone in numpy: its own
    input quantization and weight rounding, on sampled calibration inputs (no model
    build per layer; does not see how the error propagates to the model output).
    ``weights(layer, axis)`` gives (int8 codes, scales) or None for nearest rounding."""
    from .range_search import ROWS, _Consumer
    from .realize import dequantized_weight

    rng = np.random.default_rng(0)
    out = []
    for layer in plan.quantized():
        if not samples.get(layer.input_var):
            continue
        dequant = dequantized_weight(layer, weights, per_channel, reduce_range, weight_scale)
        consumer = _Consumer(layer, samples[layer.input_var], ROWS, rng)
        params = qparams[plan.params_root(layer.root)]
        out.append((consumer.local_sqnr(params, dequant), layer.name))
    return out


def fallback_search(result, imported, data, config, spec, reduce_range) -> None:
    """Move the most sensitive layers to float until the target holds.

    Target: the top-1 metric within ``config.max_accuracy_drop`` points of float
    (when set) and the model-output SQNR vs float on the same data at least
    ``config.min_output_sqnr`` dB (when set). The top-1 metric is accuracy when the
    evaluation data has labels, else agreement with the float model, in percent.
    Sensitivity of a layer: the model-output SQNR when only that layer is quantized
    (lowest = most sensitive). ``config.fallback_search``: "greedy" moves one layer at a
    time, in that order, re-measuring after each; "bisect" finds the shortest prefix
    of that order that meets the target by bisection (about log2(layers) builds
    instead of one per layer; assumes more float layers never hurt, and checks the
    prefix it returns). Updates ``result.mod`` / ``result.plan`` and records the search
    in ``result.summary["fallback"]``.
    """
    from ..pipeline import compile_relax
    from .calibrate import observe_module, runnable_spec
    from .plan import build_plan
    from .realize import realize

    budget = None if config.max_accuracy_drop is None else float(config.max_accuracy_drop)
    min_sqnr = None if config.min_output_sqnr is None else float(config.min_output_sqnr)
    evalset, labels, what = _eval_set(config, data, imported.inputs)
    inputs = imported.inputs
    onnx_model = getattr(imported, "onnx_model", None)
    base_skip = tuple(config.skip)

    # a plan rebuilt from the float module has the model's own biases: carry over the
    # bias-corrected ones of the quantized layers (realize reads the plan's biases)
    corrected = {l.name: l.bias for l in result.plan.quantized()}

    def build(skip):
        plan = build_plan(result.float_mod, onnx_model, skip=skip, ops=config.ops)
        for layer in plan.quantized():
            if layer.name in corrected:
                layer.bias = corrected[layer.name]
        missing = [r for r in plan.roots if r not in result.qparams]
        if missing:
            raise RuntimeError(f"fallback: no calibrated range for {[v.name for v in missing]}")
        mod, records = realize(result.float_mod, plan, result.qparams, config.per_channel,
                               reduce_range, weight_override=result.weight_override,
                               requant=config.requant, weight_scale=config.weight_scale)
        return plan, mod, records

    compiled = {}

    def executable(mod):
        key = id(mod)
        if key not in compiled:
            compiled[key] = (mod, compile_relax(observe_module(mod, []), runnable_spec(spec)))
        return compiled[key][1]

    def outputs(mod, batches):
        return output_array(collect_outputs(None, spec, batches, inputs, config.progress,
                                            "evaluating", exe=executable(mod))[0])

    reference = outputs(result.float_mod, evalset)
    float_metric = top1_metric(reference, reference, labels)

    def measure(mod):
        """(top-1 metric, drop, output SQNR dB, meets the target) of ``mod``."""
        out = outputs(mod, evalset)
        metric = top1_metric(reference, out, labels)
        sqnr = layer_sqnr([reference], [out])[0]
        sqnr = float("inf") if sqnr is None else sqnr
        ok = ((budget is None or float_metric - metric <= budget)
              and (min_sqnr is None or sqnr >= min_sqnr))
        return metric, float_metric - metric, sqnr, ok

    all_int8_mod = result.mod
    start_metric, drop, start_sqnr, ok = measure(result.mod)
    metric, sqnr = start_metric, start_sqnr
    steps = []
    fallen: list[str] = []
    quantized = [l.name for l in result.plan.quantized()]
    ranking = []
    if not ok and quantized and config.sensitivity == "local":
        ranking = [item for item in (result.local_sensitivity or []) if item[1] in quantized]
    elif not ok and quantized:
        # isolated sensitivity on (at most) the first 64 samples of the evaluation data
        subset, count = [], 0
        for batch in evalset:
            subset.append(batch)
            count += len(next(iter(batch.values())))
            if count >= 64:
                break
        from .calibrate import CalibrationData

        subset = CalibrationData(subset, "sensitivity samples")
        ref_small = outputs(result.float_mod, subset)
        for name in quantized:
            others = tuple(n for n in quantized if n != name)
            _plan, mod, _rec = build(base_skip + others)
            ranking.append((layer_sqnr([ref_small], [outputs(mod, subset)])[0] or 0.0, name))
            compiled.clear()  # one executable per layer: keep memory flat
    ranking.sort(key=lambda item: (item[0] if item[0] != float("inf") else 1e9))  # worst first
    order = [name for _s, name in ranking]
    isolated = dict((name, s) for s, name in ranking)

    def probe(count):
        plan, mod, _records = build(base_skip + tuple(order[:count]))
        m, d, q, good = measure(mod)
        steps.append({"float_layers": count, "float_layer": order[count - 1] if count else None,
                      "isolated_output_sqnr_db": isolated.get(order[count - 1]) if count
                      else None, "metric": m, "drop": d, "output_sqnr_db": q, "meets": good})
        compiled.clear()
        return plan, mod, m, d, q, good

    if ranking and config.fallback_search == "bisect":
        lo, hi = 0, len(order)   # lo fails (checked above); hi = all float, assumed to pass
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(mid)[-1]:
                hi = mid
            else:
                lo = mid
        plan, mod, metric, drop, sqnr, ok = probe(hi)
        fallen = order[:hi]
        result.plan, result.mod = plan, mod
    else:
        for name in order:
            if ok:
                break
            fallen.append(name)
            plan, mod, metric, drop, sqnr, ok = probe(len(fallen))
            result.plan, result.mod = plan, mod
    if fallen:
        by_name = {l["name"]: l for l in result.summary["layers"]}
        for name in fallen:
            layer = by_name[name]
            for key in ("input", "output", "weight", "activation", "groups"):
                layer.pop(key, None)
            layer.update({"int8": False, "reason": "kept float by the accuracy fallback"})
    latency = {}
    try:
        latency["all_int8_ms"] = _latency_ms(executable(all_int8_mod), inputs)
        latency["final_ms"] = (_latency_ms(executable(result.mod), inputs)
                               if fallen else latency["all_int8_ms"])
    except Exception as exc:  # noqa: BLE001 - timing is informative only
        latency["error"] = str(exc).splitlines()[0][:200]
    result.summary["fallback"] = {
        "max_accuracy_drop": budget, "min_output_sqnr_db": min_sqnr, "metric": what,
        "search": config.fallback_search, "sensitivity_measure": config.sensitivity,
        "float_metric": float_metric,
        "all_int8_metric": start_metric, "all_int8_output_sqnr_db": start_sqnr,
        "final_metric": metric, "final_drop": drop, "final_output_sqnr_db": sqnr,
        "within_budget": bool(ok), "float_layers": fallen,
        "sensitivity": [{"layer": n, "isolated_output_sqnr_db": s} for s, n in ranking],
        "steps": steps, "latency": latency,
    }
