"""Findings are decided by their tests: p-values against scipy, verdicts on hand-made metric pairs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from mechbiqa.analysis.findings import decide, paired_bootstrap, paired_permutation, srcc_rows


def test_exact_sign_flip_p_value_equals_scipy() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=12)
    b = a + rng.normal(0.4, 1.0, size=12)
    ours = paired_permutation(a, b)
    ref = stats.permutation_test((b, a), lambda x, y: np.mean(x - y), permutation_type="samples",
                                 n_resamples=np.inf, alternative="two-sided")
    assert ours.p_value == pytest.approx(ref.pvalue, abs=1e-12)
    assert ours.effect == pytest.approx(np.mean(b - a))


def test_bootstrap_ci_of_the_mean_difference_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=200)
    b = a + rng.normal(0.1, 1.0, size=200)
    ours = paired_permutation(a, b, n_resamples=5_000)
    ref = stats.bootstrap((b - a,), np.mean, method="percentile", n_resamples=5_000, random_state=1)
    assert ours.ci[0] == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert ours.ci[1] == pytest.approx(ref.confidence_interval.high, abs=0.02)
    # Monte Carlo p agrees with scipy's randomised test within its resampling error
    mc = stats.permutation_test((b, a), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                                n_resamples=5_000, vectorized=True, random_state=2)
    assert ours.p_value == pytest.approx(mc.pvalue, abs=0.01)


@pytest.mark.parametrize(("shift", "verdict"), [(0.0, "inconclusive"), (0.5, "held"), (-0.5, "did not hold")])
def test_verdicts_on_hand_made_pairs(shift: float, verdict: str) -> None:
    rng = np.random.default_rng(0)
    one = rng.uniform(0.2, 0.6, size=64)  # e.g. per-image instability of the one-stage model
    noise = rng.normal(0, 0.05, size=64)
    two = one + shift + noise - noise.mean() if shift else one + noise - noise.mean()
    finding = decide("two-stage is higher", paired_permutation(one, two), "greater")
    assert finding.verdict == verdict
    row = finding.to_dict()
    assert row["test"] and row["p_value"] is not None and len(row["ci"]) == 2


def test_equal_shares_are_undecided_and_missing_data_inconclusive() -> None:
    share = np.full(40, 0.51)
    finding = decide("two-stage reads the description more", paired_permutation(share, share), "greater")
    assert finding.verdict == "inconclusive" and finding.result.p_value == 1.0
    assert decide("x", paired_permutation([np.nan], [np.nan]), "greater").verdict == "inconclusive"
    assert decide("x", None, "less").verdict == "inconclusive"


def test_srcc_difference_by_paired_bootstrap() -> None:
    rng = np.random.default_rng(5)
    mos = rng.uniform(size=300)
    good = mos + rng.normal(0, 0.1, size=300)
    poor = mos + rng.normal(0, 0.6, size=300)
    assert srcc_rows(np.stack([good, poor]), np.stack([mos, mos])) == pytest.approx(
        [stats.spearmanr(good, mos)[0], stats.spearmanr(poor, mos)[0]])
    better = paired_bootstrap(srcc_rows, poor, good, mos, units="SRCC")
    assert better.effect == pytest.approx(stats.spearmanr(good, mos)[0] - stats.spearmanr(poor, mos)[0])
    assert better.ci[0] > 0 and better.p_value < 0.01
    assert decide("b rates better", better, "greater").verdict == "held"
    same = paired_bootstrap(srcc_rows, good, good, mos)
    assert same.effect == 0 and decide("b rates better", same, "greater").verdict == "inconclusive"
