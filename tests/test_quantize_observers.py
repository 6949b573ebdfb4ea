"""Observers on synthetic distributions with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.quantize.observers import (EntropyObserver, MinMaxObserver, MSEObserver,
                                         PercentileObserver, _quant_mse, make_observer)


def feed(obs, data, chunks=5):
    for part in np.array_split(np.asarray(data), chunks):
        obs.update(part)
    return obs


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(1234)


def test_minmax_exact_over_batches(rng):
    data = rng.normal(size=(10, 100)).astype(np.float32)
    obs = MinMaxObserver()
    for row in data:
        obs.update(row)
    assert obs.compute_range() == (float(data.min()), float(data.max()))


def test_observer_without_data_raises():
    for obs in (MinMaxObserver(), PercentileObserver(), EntropyObserver(), MSEObserver()):
        with pytest.raises(ValueError):
            obs.compute_range()


def test_histogram_growth_keeps_every_sample(rng):
    # batches with a growing range force several doublings of the histogram
    obs = PercentileObserver(99.0)
    total = 0
    for scale in (0.1, 1.0, 10.0, 100.0):
        part = rng.uniform(-scale, scale, 10_000)
        obs.update(part)
        total += part.size
    assert obs.hist.sum() == total
    assert obs.bound >= 100.0


def test_percentile_uniform(rng):
    data = rng.uniform(-1.0, 1.0, 1_000_000)
    lo, hi = feed(PercentileObserver(99.0), data).compute_range()
    assert lo == pytest.approx(-0.98, abs=0.005)
    assert hi == pytest.approx(0.98, abs=0.005)


def test_percentile_matches_numpy_on_gaussian(rng):
    data = rng.normal(size=500_000)
    lo, hi = feed(PercentileObserver(99.9), data).compute_range()
    assert hi == pytest.approx(np.quantile(data, 0.999), abs=0.01)
    assert lo == pytest.approx(np.quantile(data, 0.001), abs=0.01)


def test_percentile_nonnegative_keeps_zero(rng):
    data = np.maximum(rng.normal(size=100_000), 0.0)  # a ReLU output
    lo, hi = feed(PercentileObserver(99.0), data).compute_range()
    assert lo == 0.0
    assert hi == pytest.approx(np.quantile(data, 0.99), abs=0.01)


def test_percentile_rejects_bad_value():
    with pytest.raises(ValueError):
        PercentileObserver(30.0)


def test_entropy_uniform_keeps_full_range(rng):
    # nothing to gain from clipping a uniform distribution
    data = rng.uniform(0.0, 1.0, 1_000_000)
    lo, hi = feed(EntropyObserver(), data).compute_range()
    assert hi > 0.97


def test_entropy_clips_rare_outliers(rng):
    data = np.concatenate([rng.normal(size=1_000_000), [80.0, -80.0, 75.0]])
    lo, hi = feed(EntropyObserver(unsigned=False), data).compute_range()
    assert 3.0 < hi < 10.0
    assert -10.0 < lo < -3.0


def test_entropy_relu_output_not_collapsed_by_zero_spike(rng):
    # half the values are exactly 0: the threshold must still cover the positive tail
    data = np.maximum(rng.normal(size=1_000_000), 0.0)
    lo, hi = feed(EntropyObserver(), data).compute_range()
    assert lo == 0.0
    assert 3.0 < hi <= data.max()


@pytest.mark.parametrize("levels, expected", [(256, 9.89), (16, 5.03)])
def test_mse_laplace_matches_analytic_clipping(rng, levels, expected):
    # Banner et al. (ACIQ): the MSE-optimal clip of Laplace(0, b=1) is ~9.89 b for
    # 8 bits and ~5.03 b for 4 bits
    data = rng.laplace(0.0, 1.0, 1_000_000)
    lo, hi = feed(MSEObserver(levels=levels, symmetric=True), data).compute_range()
    amax = max(-lo, hi)
    assert amax == pytest.approx(expected, rel=0.1)


def test_mse_beats_minmax_with_outliers(rng):
    data = np.concatenate([rng.normal(size=200_000), [40.0, -40.0]])
    obs = feed(MSEObserver(levels=256, symmetric=False), data)
    lo, hi = obs.compute_range()
    assert hi < 40.0 and lo > -40.0

    def true_mse(lo, hi):
        return _quant_mse(data, np.ones_like(data), lo, hi, 256, False) / data.size

    assert true_mse(lo, hi) < true_mse(data.min(), data.max())


def test_mse_uniform_keeps_full_range(rng):
    data = rng.uniform(-2.0, 2.0, 500_000)
    lo, hi = feed(MSEObserver(), data).compute_range()
    assert hi > 1.9 and lo < -1.9


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_make_observer_same_interface(rng, method):
    obs = make_observer(method)
    obs.update(rng.normal(size=1000).astype(np.float32))
    lo, hi = obs.compute_range()
    assert lo < 0 < hi


def test_make_observer_unknown():
    with pytest.raises(ValueError, match="unknown calibration method"):
        make_observer("magic")


def test_entropy_spike_on_one_side_does_not_clip_the_other(rng):
    # like a normalized image: most pixels are the black background (-0.81)
    data = np.concatenate([np.full(700_000, -0.81), rng.uniform(0.0, 2.0, 300_000)])
    lo, hi = feed(EntropyObserver(), data).compute_range()
    assert lo == pytest.approx(-0.81)
    assert hi > 1.8
