"""Per-layer error and accuracy-budgeted float fallback.

* :func:`layer_sqnr` -- SQNR (dB) of every quantized layer's output and of the
  model output, int8 module vs float module, on the same batches. The int8
  layer outputs include the error accumulated from earlier layers (what the
  deployed model really sees).
* :func:`fallback` -- keep the most sensitive layers in float until the metric
  on the evaluation data is within ``max_drop``: layers are ranked by the
  model-output SQNR when *only that layer* is quantized (lowest first), then
  moved to float one at a time until the budget holds.
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


def collect_outputs(mod, spec, data, inputs, progress=None, desc="running"):
    """Run ``mod`` (main returns a tuple) over ``data``; list of per-field concatenations."""
    chunks: list[list] = []

    def on_batch(arrays, _valid):
        if not chunks:
            chunks.extend([] for _ in arrays)
        for store, array in zip(chunks, arrays):
            store.append(np.asarray(array))

    run_module(mod, spec, data, inputs, on_batch, progress, desc)
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
