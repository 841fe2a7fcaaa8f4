"""IQA metrics: hand-computed values, agreement with scipy, the logistic fit, invalid input, FR measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mechbiqa.metrics import (
    MetricError,
    fit_logistic4,
    gmsd,
    iqa_metrics,
    logistic4,
    psnr,
    ssim,
)


def test_hand_computed_values():
    # d = (0, 0, 0, 1, 1): SRCC = 1 - 6 * 2 / (5 * 24) = 0.9; one discordant pair of 10: KRCC = 0.8;
    # cov = 9, var = 10 each: PLCC = 0.9; RMSE = sqrt(2 / 5).
    m = iqa_metrics([1, 2, 3, 4, 5], [1, 2, 3, 5, 4], fit="linear")
    assert m.n == 5
    assert m.srcc == pytest.approx(0.9)
    assert m.krcc == pytest.approx(0.8)
    assert m.plcc_raw == pytest.approx(0.9)
    assert m.rmse_raw == pytest.approx(math.sqrt(0.4))
    # A least-squares line keeps Pearson's r; its RMSE is sqrt(SSE / n) with SSE = var_y * (1 - r^2) * n.
    assert m.plcc_fitted == pytest.approx(0.9)
    assert m.rmse_fitted == pytest.approx(math.sqrt(2.0 * (1 - 0.81)))
    assert m.fit.kind == "linear"


def test_matches_scipy_on_random_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    y = 3 * np.tanh(x) + rng.normal(scale=0.5, size=200)
    m = iqa_metrics(x, y)
    assert m.srcc == pytest.approx(stats.spearmanr(x, y)[0])
    assert m.krcc == pytest.approx(stats.kendalltau(x, y)[0])
    assert m.plcc_raw == pytest.approx(stats.pearsonr(x, y)[0])
    assert m.fit.kind == "logistic4"
    assert m.plcc_fitted == pytest.approx(stats.pearsonr(m.fit(x), y)[0])
    assert m.plcc_fitted >= m.plcc_raw - 1e-6  # the sigmoid fits tanh-shaped data at least as well as a line
    assert m.ok and m.to_dict()["fit"]["kind"] == "logistic4"


@pytest.mark.parametrize("params", [(5.0, 1.0, 0.5, 0.7), (1.0, 4.5, -0.3, 1.2)])
def test_logistic_fit_recovers_known_parameters(params):
    rng = np.random.default_rng(0)
    x = np.linspace(-4, 4, 400)
    y = logistic4(x, *params) + rng.normal(scale=0.02, size=x.size)
    fit = fit_logistic4(x, y)
    assert fit.kind == "logistic4" and fit.converged and not fit.at_bound
    np.testing.assert_allclose(fit.params, params, atol=0.05)


def test_logistic_fit_is_bounded_when_only_one_arm_is_observed():
    x = np.linspace(0.0, 1.0, 50)
    y = 1 + 4 * x**3  # convex, like the lower arm of a sigmoid: an unbounded fit runs away
    fit = fit_logistic4(x, y)
    assert fit.kind == "logistic4"
    assert max(abs(p) for p in fit.params[:2]) <= y.max() + np.ptp(y) + 1e-9
    assert stats.pearsonr(fit(x), y)[0] > 0.99


def test_nan_raises_with_a_clear_message():
    with pytest.raises(MetricError, match="non-finite prediction"):
        iqa_metrics([1.0, float("nan"), 3.0, 4.0], [1, 2, 3, 4])


def test_constant_prediction_raises_or_flags():
    with pytest.raises(MetricError, match="constant|equal"):
        iqa_metrics([2.0] * 10, np.arange(10))
    m = iqa_metrics([2.0] * 10, np.arange(10), on_invalid="flag")
    assert "constant_prediction" in m.flags and not m.ok
    assert math.isnan(m.srcc) and math.isnan(m.plcc_fitted)


def test_too_few_and_length_mismatch():
    with pytest.raises(MetricError, match="at least 3"):
        iqa_metrics([1, 2], [1, 2])
    with pytest.raises(MetricError, match="differ in length"):
        iqa_metrics([1, 2, 3], [1, 2])


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(3)
    x = rng.normal(size=150)
    y = x + rng.normal(scale=1.0, size=150)
    m = iqa_metrics(x, y, bootstrap=200, seed=0)
    for name in ("srcc", "krcc", "plcc_raw", "plcc_fitted"):
        lo, hi = m.ci[name]
        assert lo <= getattr(m, name) <= hi
    assert m.ci_level == 0.95
    assert m.ci == iqa_metrics(x, y, bootstrap=200, seed=0).ci  # seeded


def test_full_reference_measures():
    rng = np.random.default_rng(0)
    ref = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
    ref = np.clip(ref.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    noisy = [np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (4, 12, 30)]
    assert (
        psnr(ref, ref) == 100.0
        and ssim(ref, ref) == pytest.approx(1.0)
        and gmsd(ref, ref) == pytest.approx(0.0)
    )
    p, s, g = [psnr(ref, n) for n in noisy], [ssim(ref, n) for n in noisy], [gmsd(ref, n) for n in noisy]
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2] and g[0] < g[1] < g[2]


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    ref = rng.random((32, 40, 3))
    dist = np.clip(ref + rng.normal(0, 0.1, ref.shape), 0, 1)
    expected = structural_similarity(
        ref,
        dist,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=-1,
    )
    assert ssim(ref, dist) == pytest.approx(expected, abs=1e-12)


def test_srcc_difference_is_paired_and_its_interval_tracks_the_evidence():
    from mechbiqa.metrics import srcc_difference

    rng = np.random.default_rng(0)
    mos = rng.normal(size=400)
    good = mos + 0.3 * rng.normal(size=400)
    bad = mos + 3.0 * rng.normal(size=400)
    diff, low, high = srcc_difference(bad, good, mos, bootstrap=500)
    assert diff == pytest.approx(stats.spearmanr(good, mos)[0] - stats.spearmanr(bad, mos)[0])
    assert 0 < low < diff < high  # a clear improvement: the interval excludes zero
    same, lo, hi = srcc_difference(good, good, mos, bootstrap=200)
    assert same == 0 and lo == 0 and hi == 0  # paired: identical predictors differ by exactly 0 in every draw
    _, lo2, hi2 = srcc_difference(good, good + 0.05 * rng.normal(size=400), mos, bootstrap=500)
    assert lo2 < 0 < hi2  # a negligible change: the interval spans zero
