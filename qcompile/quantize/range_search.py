"""Activation ranges chosen for the error they cause in the layers that consume them.

The observers (observers.py) pick each activation's clip range from that tensor's own
values: min-max, a percentile, KL or the tensor's own squared error. What the model
feels is different: the error that reaches the *consuming* layer's output,
``W · (fq(x) - x)``. Rounding noise is roughly independent from element to element and
partly averages out in the weighted sum, while clipping error is one-sided and adds up
coherently; and a channel the weights barely use may be clipped freely while one they
weigh heavily may not. :func:`output_aware_ranges` scores candidate clip ranges
``alpha · [min, max]`` (plus the observer's own range) by that consumer-output error on
calibration inputs and keeps the best.

Cost: one fake-quantization of a fixed sample of im2col rows per candidate and consumer,
and one matrix product with the consumer's weight (float32, BLAS).
"""

from __future__ import annotations

import numpy as np

from .realize import act_qparams

# candidate upper fractions of the observed range (largest first, so ties keep less clipping)
ALPHAS = np.concatenate([np.linspace(1.0, 0.5, 26), np.linspace(0.48, 0.2, 15)])
# im2col rows sampled per consumer layer (fixed seed: the search is deterministic)
ROWS = 4096


def _fake_quant(x: np.ndarray, params) -> np.ndarray:
    q = np.clip(np.round(x / params.scale) + params.zero_point, params.qmin, params.qmax)
    return ((q - params.zero_point) * params.scale).astype(np.float32)


def _conv_rows(samples, weight_shape, attrs, rows: int, rng) -> np.ndarray:
    """[R, groups, C/groups * kh * kw] im2col rows of NCHW ``samples`` at ``rows`` random
    output positions, in the OIHW weight's order. Padding positions hold 0, which every
    asymmetric or symmetric activation grid represents exactly."""
    _o, cg, kh, kw = weight_shape
    groups = int(attrs.groups)
    sh, sw = (int(v) for v in attrs.strides)
    dh, dw = (int(v) for v in attrs.dilation)
    top, left, bottom, right = (int(v) for v in attrs.padding)
    x = np.concatenate([np.asarray(s, np.float32) for s in samples])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    pick = rng.choice(total, size=min(rows, total), replace=False)
    ni, rest = np.divmod(pick, oh * ow)
    oy, ox = np.divmod(rest, ow)
    ty, tx = np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij")
    ys = (oy * sh)[:, None] + ty.reshape(1, -1)          # [R, taps]
    xs = (ox * sw)[:, None] + tx.reshape(1, -1)
    patches = x[ni[:, None, None], np.arange(c)[None, :, None], ys[:, None, :], xs[:, None, :]]
    return patches.reshape(len(pick), groups, cg * kh * kw)  # [R, C, taps] -> groups


def _matmul_rows(samples, rows: int, rng) -> np.ndarray:
    """[R, 1, K] rows of matmul inputs [..., K]."""
    flat = np.concatenate([np.asarray(s, np.float32).reshape(-1, np.shape(s)[-1])
                           for s in samples])
    pick = rng.choice(len(flat), size=min(rows, len(flat)), replace=False)
    return flat[pick][:, None, :]


def _grouped(weight, groups: int) -> np.ndarray:
    """A layer's weight as float32 [groups, K, out per group]: a matmul's [K, out] gets a
    unit group axis, a conv's OIHW is split by group and transposed."""
    if np.ndim(weight) == 2:
        return np.asarray(weight, np.float32)[None]
    out_c = weight.shape[0]
    return np.ascontiguousarray(
        weight.reshape(groups, out_c // groups, -1).transpose(0, 2, 1), np.float32)


class _Consumer:
    """One layer that reads a root: its sampled input rows and grouped weight."""

    def __init__(self, layer, samples, rows, rng):
        if layer.kind == "conv2d":
            self.rows = _conv_rows(samples, layer.weight.shape, layer.call.attrs, rows, rng)
        else:
            self.rows = _matmul_rows(samples, rows, rng)
        self.weight = _grouped(layer.weight, self.rows.shape[1])
        signal = self._output(self.rows)
        self.power = float(np.sum(signal.astype(np.float64) ** 2)) or 1.0

    def _output(self, rows):
        return np.matmul(rows.transpose(1, 0, 2), self.weight)  # [groups, R, out]

    def local_sqnr(self, params, dequantized_weight) -> float:
        """SQNR (dB) of this layer's output with its input on the grid ``params`` and its
        weight replaced by ``dequantized_weight``, vs float (the layer alone)."""
        out = np.matmul(_fake_quant(self.rows, params).transpose(1, 0, 2),
                        _grouped(dequantized_weight, self.weight.shape[0]))
        err = float(np.sum((out - self._output(self.rows)).astype(np.float64) ** 2))
        return float("inf") if err == 0 else float(10 * np.log10(self.power / err))

    def error(self, params) -> float:
        """Output error power of this layer, relative to its float output power."""
        err = self._output(_fake_quant(self.rows, params) - self.rows)
        return float(np.sum(err.astype(np.float64) ** 2)) / self.power


def output_aware_ranges(plan, samples: dict, ranges: dict, bounds: dict, act_dtype: str,
                        rows: int = ROWS, alphas=ALPHAS) -> tuple[dict, dict]:
    """Refined ``ranges`` ({root: (lo, hi)}) and a report {root: detail}.

    ``samples``: {layer input var: [float arrays]} from calibration; ``bounds``: {root:
    (observed min, observed max)}; ``ranges``: the observer's ranges (one candidate, and
    what a root without a sampled consumer keeps). For each root the candidates are
    ``alpha · (min, max)`` for every ``alpha`` in ``alphas`` (both sides scaled: a signed
    root like a normalized image input shrinks symmetrically) and the observer's range;
    the one with the least summed relative output error over the root's consumers wins.
    """
    rng = np.random.default_rng(0)
    consumers: dict = {}
    for layer in plan.quantized():
        if layer.input_var in samples and samples[layer.input_var]:
            consumers.setdefault(layer.root, []).append(layer)
    out, report = dict(ranges), {}
    for root, layers in consumers.items():
        if root not in ranges or root not in bounds:
            continue
        made = [_Consumer(l, samples[l.input_var], rows, rng) for l in layers]
        lo0, hi0 = min(bounds[root][0], 0.0), max(bounds[root][1], 0.0)
        candidates = [tuple(ranges[root])] + [(lo0 * a, hi0 * a) for a in alphas]
        scores = [sum(c.error(act_qparams(lo, hi, act_dtype)) for c in made)
                  for lo, hi in candidates]
        best = int(np.argmin(scores))
        out[root] = (float(candidates[best][0]), float(candidates[best][1]))
        report[root] = {"observer_range": [float(v) for v in ranges[root]],
                        "range": list(out[root]),
                        "observer_error": float(scores[0]), "error": float(scores[best]),
                        "consumers": [l.name for l in layers]}
    return out, report
