"""Findings: a claim about two checkpoints, decided by a stated test over images.

The main job compares checkpoints (one-stage vs two-stage, and the companion
papers' RL and Q-Scorer models) on the same images. A difference of two means is
not a finding until a test says it is larger than the run's own spread, so every
verdict here comes from one of two paired tests over images:

* `paired_permutation`: per-image differences ``b - a``; the two-sided sign-flip
  permutation test of "mean difference = 0" (exact over all ``2^n`` sign patterns
  up to ``exact_max`` images, Monte Carlo beyond), with a percentile bootstrap CI of
  the mean difference. For per-image quantities: instability of an image's answers,
  the lens' answer changes, a patching effect, an attention share.
* `paired_bootstrap`: a statistic of the whole sample (SRCC against the label) whose
  difference between the two predictors is bootstrapped by resampling images with the
  same indices for both; the CI and a two-sided bootstrap p-value.

`decide` turns a test into a verdict: **held** when the test rejects "no difference"
at ``alpha`` (two-sided, 5% by default) in the claimed direction, **did not hold** when
it rejects in the other direction, **inconclusive** otherwise (also when the data are
missing or not finite). A comparison whose outcome is fixed by how it was built (e.g.
the image attention of a text-only prompt) is not a finding and is never passed here.
Everything returns plain numbers; `mechbiqa.reports` prints them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = ["TestResult", "Finding", "paired_permutation", "paired_bootstrap", "srcc_rows", "decide"]

Verdict = Literal["held", "did not hold", "inconclusive"]


@dataclass(frozen=True)
class TestResult:
    """One test's outcome.

    Attributes:
        test: Its name as the report states it.
        effect: The estimate of ``b - a`` (in ``units``).
        ci: Its two-sided confidence interval at ``ci_level``.
        p_value: Two-sided p-value of "no difference".
        n: Number of paired images.
        units: What ``effect`` is measured in.
        ci_level: The interval's level.
    """

    test: str
    effect: float
    ci: tuple[float, float]
    p_value: float
    n: int
    units: str = ""
    ci_level: float = 0.95


@dataclass(frozen=True)
class Finding:
    """A claim, the test that decides it, and the verdict."""

    claim: str
    verdict: Verdict
    result: TestResult | None
    evidence: str = ""

    @property
    def held(self) -> bool | None:
        """True / False / None (inconclusive), the older boolean form."""
        return {"held": True, "did not hold": False}.get(self.verdict)

    def to_dict(self) -> dict[str, Any]:
        """JSON: claim, verdict, held, evidence and the test's fields (``test``, ``p_value``, ``ci`` ...)."""
        out: dict[str, Any] = {
            "finding": self.claim,
            "verdict": self.verdict,
            "held": self.held,
            "evidence": self.evidence,
        }
        if self.result is not None:
            out.update(asdict(self.result))
            out["ci"] = list(self.result.ci)
        return out


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired tests need one value per image for both: got {a.size} and {b.size} values")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def paired_permutation(
    a: Any,
    b: Any,
    *,
    units: str = "",
    n_resamples: int = 10_000,
    exact_max: int = 16,
    ci_level: float = 0.95,
    seed: int = 0,
) -> TestResult:
    """Sign-flip permutation test of the mean per-image difference ``b - a`` (pairs with a NaN are dropped).

    Under "no difference" each image's difference is as likely ``+d`` as ``-d``; the p-value is the share
    of sign patterns whose mean is at least as far from 0 as the observed one (the observed pattern
    counted, so p > 0). The CI is the percentile bootstrap of the mean difference.
    """
    a, b = _paired(a, b)
    d = b - a
    n = d.size
    name = "paired sign-flip permutation test of the mean difference"
    if n == 0:
        return TestResult(name, math.nan, (math.nan, math.nan), math.nan, 0, units, ci_level)
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    tolerance = 1e-12 * max(1.0, np.abs(d).max())
    if n <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        p = float(np.mean(np.abs(signs @ d / n) >= observed - tolerance))
    else:
        signs = rng.choice((1.0, -1.0), size=(n_resamples, n))
        hits = np.sum(np.abs(signs @ d / n) >= observed - tolerance)
        p = float((hits + 1) / (n_resamples + 1))
    means = d[rng.integers(0, n, size=(n_resamples, n))].mean(axis=1)
    tail = 100 * (1 - ci_level) / 2
    ci = (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))
    return TestResult(name, float(d.mean()), ci, p, n, units, ci_level)


def srcc_rows(pred: np.ndarray, label: np.ndarray) -> np.ndarray | np.floating:
    """Spearman correlation of each row of ``pred`` with the same row of ``label`` (ties: average ranks)."""
    rp, rl = stats.rankdata(pred, axis=-1), stats.rankdata(label, axis=-1)
    rp, rl = rp - rp.mean(-1, keepdims=True), rl - rl.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rp * rl).sum(-1) / np.sqrt((rp**2).sum(-1) * (rl**2).sum(-1))


def paired_bootstrap(
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    a: Any,
    b: Any,
    label: Any,
    *,
    units: str = "",
    n_resamples: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
    name: str = "paired bootstrap over images",
) -> TestResult:
    """``statistic(b, label) - statistic(a, label)`` with images resampled together for both predictors.

    ``statistic`` works on rows: ``[..., n]`` predictions and labels -> ``[...]`` (e.g. `srcc_rows`), so all
    resamples are computed at once. The p-value is two-sided: twice the smaller share of resampled
    differences on either side of 0 (at least ``1 / n_resamples``); resamples where the statistic is
    undefined are dropped.
    """
    a, b, y = (np.asarray(x, dtype=float).ravel() for x in (a, b, label))
    if not a.size == b.size == y.size:
        raise ValueError(
            f"one value per image for both predictors and the label: got {a.size}, {b.size}, {y.size}"
        )
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(y)
    a, b, y = a[keep], b[keep], y[keep]
    n = y.size
    if n < 3:
        return TestResult(name, math.nan, (math.nan, math.nan), math.nan, n, units, ci_level)
    rng = np.random.default_rng(seed)
    effect = float(statistic(b, y) - statistic(a, y))
    i = rng.integers(0, n, size=(n_resamples, n))
    with np.errstate(all="ignore"):
        draws = statistic(b[i], y[i]) - statistic(a[i], y[i])
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return TestResult(name, effect, (math.nan, math.nan), math.nan, n, units, ci_level)
    tail = 100 * (1 - ci_level) / 2
    ci = (float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail)))
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0)))
    return TestResult(name, effect, ci, max(float(p), 1 / draws.size), n, units, ci_level)


def decide(
    claim: str,
    result: TestResult | None,
    direction: Literal["greater", "less"],
    *,
    alpha: float = 0.05,
    evidence: str = "",
) -> Finding:
    """The verdict on ``claim`` that ``b - a`` is ``direction`` than 0, from a two-sided test at ``alpha``."""
    if result is None or not (np.isfinite(result.effect) and np.isfinite(result.p_value)):
        return Finding(claim, "inconclusive", result, evidence or "no data to test")
    if result.p_value >= alpha:
        verdict: Verdict = "inconclusive"
    elif (result.effect > 0) == (direction == "greater") and result.effect != 0:
        verdict = "held"
    else:
        verdict = "did not hold"
    if not evidence:
        ci = f"{100 * result.ci_level:g}% CI [{result.ci[0]:+.3g}, {result.ci[1]:+.3g}]"
        evidence = (
            f"difference {result.effect:+.3g} {result.units}".rstrip() + f", {ci}, p = {result.p_value:.3g}"
            f", n = {result.n} ({result.test})"
        )
    return Finding(claim, verdict, result, evidence)
