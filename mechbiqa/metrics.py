"""IQA metrics (SRCC, KRCC, PLCC, RMSE with the 4-parameter logistic fit) and full-reference measures.

Studies call `iqa_metrics(pred, mos)` to compare a model's scores (the Q-Align
score of DESIGN.md, a probe's output, a baseline) with human or benchmark
ratings, following the protocol in DESIGN.md ("IQA metrics"): SRCC and KRCC on
the raw scores; PLCC and RMSE both raw and after the 4-parameter logistic fit
(VQEG FR-TV Phase II), the result saying which fit was used.

Invalid input never yields a silent number: NaN or infinite values, fewer than
three pairs or a constant prediction raise `MetricError` by default; with
``on_invalid="flag"`` the affected values are NaN and ``flags`` says why.

The second half holds full-reference measures (PSNR, SSIM, GMSD) used by the
built-in benchmark (`mechbiqa.data.benchmark`) to add per-image variation to
its labels and to check them independently.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage, optimize, stats

__all__ = [
    "MetricError",
    "LogisticFit",
    "IQAMetrics",
    "iqa_metrics",
    "srcc",
    "krcc",
    "plcc",
    "rmse",
    "logistic4",
    "fit_logistic4",
    "psnr",
    "ssim",
    "gmsd",
    "FR_MEASURES",
]


class MetricError(ValueError):
    """Raised when a metric would be undefined (NaN input, constant prediction, too few pairs)."""


# ---------------------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------------------


def _pair(pred, mos) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(mos, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise MetricError(f"pred and mos differ in length: {x.size} vs {y.size}")
    return x, y


def srcc(pred, mos) -> float:
    """Spearman rank correlation (no validity checks; see `iqa_metrics`)."""
    return float(stats.spearmanr(*_pair(pred, mos))[0])


def srcc_difference(pred_a, pred_b, mos, bootstrap: int = 2000, ci_level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """SRCC(b) - SRCC(a) on the same images, with a paired percentile bootstrap interval.

    Both predictors are resampled with the same image indices, so the interval
    reflects how much the *difference* depends on which images were drawn (a
    two-stage vs one-stage comparison on one test split).

    Returns:
        ``(difference, low, high)``.
    """
    a, y = _pair(pred_a, mos)
    b, _ = _pair(pred_b, mos)
    rng = np.random.default_rng(seed)
    draws = []
    with warnings.catch_warnings():  # a constant predictor (or resample) has no SRCC: NaN, dropped below
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        diff = srcc(b, y) - srcc(a, y)
        for _ in range(bootstrap):
            i = rng.integers(0, y.size, y.size)
            draws.append(srcc(b[i], y[i]) - srcc(a[i], y[i]))
    draws = np.asarray(draws)
    draws = draws[np.isfinite(draws)]
    if not draws.size:
        return diff, float("nan"), float("nan")
    tail = 100 * (1 - ci_level) / 2
    return diff, float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def krcc(pred, mos) -> float:
    """Kendall tau-b (no validity checks; see `iqa_metrics`)."""
    return float(stats.kendalltau(*_pair(pred, mos))[0])


def plcc(pred, mos) -> float:
    """Pearson linear correlation (no validity checks; see `iqa_metrics`)."""
    return float(stats.pearsonr(*_pair(pred, mos))[0])


def rmse(pred, mos) -> float:
    """Root mean squared difference."""
    x, y = _pair(pred, mos)
    return float(np.sqrt(np.mean((x - y) ** 2)))


# ---------------------------------------------------------------------------------------------------------
# The 4-parameter logistic
# ---------------------------------------------------------------------------------------------------------


def logistic4(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (VQEG; pyiqa ``logistic_4params``).

    b1 and b2 are the upper and lower asymptotes as x goes to +inf and -inf; a
    falling relation has b1 < b2 (the asymptotes swap, b4 stays positive).
    """
    z = np.clip(-(np.asarray(x, dtype=np.float64) - b3) / abs(b4), -500.0, 500.0)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


@dataclass(frozen=True, slots=True)
class LogisticFit:
    """The monotone map from prediction to MOS used for the "fitted" PLCC and RMSE.

    Attributes:
        kind: ``"logistic4"``, or ``"linear"`` when the logistic fit failed or was not asked for.
        params: (b1, b2, b3, b4) for logistic4; (slope, intercept) for linear.
        converged: Whether the optimiser reported success.
        at_bound: Whether a parameter ended on its bound (the sigmoid saturates outside the data).
    """

    kind: Literal["logistic4", "linear"]
    params: tuple[float, ...]
    converged: bool = True
    at_bound: bool = False

    def __call__(self, x) -> np.ndarray:
        """Map predictions to the MOS scale."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "linear":
            return self.params[0] * x + self.params[1]
        return logistic4(x, *self.params)


def fit_logistic4(pred, mos, maxfev: int = 20000) -> LogisticFit:
    """Fit `logistic4` from ``pred`` to ``mos`` with bounded, robust starting values.

    The start is pyiqa's (b1 = max(y), b2 = min(y), b3 = mean(x), b4 = std(x) / 4),
    with b1 and b2 swapped for a falling relation. Bounds keep the fit well posed
    when the data show only one arm of the sigmoid (an unbounded fit can send the
    asymptotes to 1e4): asymptotes within [min(y) - ptp(y), max(y) + ptp(y)],
    centre within the data range widened by ptp(x), slope scale within
    [ptp(x) / 1000, 10 ptp(x)]. Falls back to a least-squares line (``kind="linear"``)
    if the optimiser fails.
    """
    x, y = _pair(pred, mos)
    px, py = float(np.ptp(x)), float(np.ptp(y))
    if px == 0 or py == 0:
        raise MetricError("cannot fit a logistic to constant predictions or constant targets")
    rho = stats.spearmanr(x, y)[0]
    hi, lo = float(y.max()), float(y.min())
    b1, b2 = (hi, lo) if not (rho < 0) else (lo, hi)
    p0 = np.array([b1, b2, float(x.mean()), max(float(x.std()) / 4.0, px / 1000.0 * 1.01)])
    lower = np.array([lo - py, lo - py, x.min() - px, px / 1000.0])
    upper = np.array([hi + py, hi + py, x.max() + px, 10.0 * px])
    p0 = np.clip(p0, lower, upper)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic4, x, y, p0=p0, bounds=(lower, upper), maxfev=maxfev)
    except (RuntimeError, ValueError):
        slope, intercept = np.polyfit(x, y, 1)
        return LogisticFit("linear", (float(slope), float(intercept)), converged=False)
    tol = 1e-6 * (upper - lower)
    at_bound = bool(np.any(np.abs(params - lower) < tol) or np.any(np.abs(params - upper) < tol))
    return LogisticFit("logistic4", tuple(float(p) for p in params), converged=True, at_bound=at_bound)


# ---------------------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IQAMetrics:
    """Agreement of predictions with MOS.

    Attributes:
        n: Number of (prediction, MOS) pairs.
        srcc: Spearman rank correlation, raw scores.
        krcc: Kendall tau-b, raw scores.
        plcc_raw: Pearson correlation of the raw predictions.
        rmse_raw: RMSE of the raw predictions (meaningful only if they are on the MOS scale: the
            evaluation passes 0-1 targets, the scale of the Q-Align score).
        plcc_fitted: Pearson correlation after ``fit``.
        rmse_fitted: RMSE after ``fit``, in MOS units.
        fit: The map used for the fitted values (its ``kind`` says which), or None if none was possible.
        ci: Bootstrap percentile intervals per metric name, if asked for.
        ci_level: Coverage of ``ci``.
        flags: Why values are NaN or less trustworthy ("constant_prediction", "logistic_fit_failed", ...).
    """

    n: int
    srcc: float
    krcc: float
    plcc_raw: float
    rmse_raw: float
    plcc_fitted: float
    rmse_fitted: float
    fit: LogisticFit | None
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    ci_level: float | None = None
    flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no flag makes a value undefined."""
        return not any(f in _FATAL_FLAGS for f in self.flags)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "n": self.n,
            "srcc": self.srcc,
            "krcc": self.krcc,
            "plcc_raw": self.plcc_raw,
            "rmse_raw": self.rmse_raw,
            "plcc_fitted": self.plcc_fitted,
            "rmse_fitted": self.rmse_fitted,
            "fit": None
            if self.fit is None
            else {
                "kind": self.fit.kind,
                "params": list(self.fit.params),
                "converged": self.fit.converged,
                "at_bound": self.fit.at_bound,
            },
            "ci": {k: list(v) for k, v in self.ci.items()},
            "ci_level": self.ci_level,
            "flags": list(self.flags),
        }


_FATAL_FLAGS = ("nan_input", "too_few", "constant_prediction", "constant_mos")
_NAN = float("nan")


def _validate(x: np.ndarray, y: np.ndarray) -> list[str]:
    problems = []
    bad_x, bad_y = ~np.isfinite(x), ~np.isfinite(y)
    if bad_x.any() or bad_y.any():
        problems.append("nan_input")
    elif x.size < 3:
        problems.append("too_few")
    else:
        if np.ptp(x) == 0:
            problems.append("constant_prediction")
        if np.ptp(y) == 0:
            problems.append("constant_mos")
    return problems


def _describe_problems(problems: list[str], x: np.ndarray, y: np.ndarray) -> str:
    parts = []
    for p in problems:
        if p == "nan_input":
            parts.append(
                f"{int((~np.isfinite(x)).sum())} non-finite prediction(s) and "
                f"{int((~np.isfinite(y)).sum())} non-finite MOS value(s) "
                f"(first at index {int(np.flatnonzero(~np.isfinite(x) | ~np.isfinite(y))[0])})"
            )
        elif p == "too_few":
            parts.append(f"only {x.size} pair(s); correlations need at least 3")
        elif p == "constant_prediction":
            parts.append(f"all {x.size} predictions equal {x[0]!r}, so correlations are undefined")
        elif p == "constant_mos":
            parts.append(f"all {y.size} MOS values equal {y[0]!r}, so correlations are undefined")
    return "; ".join(parts)


def _core(x: np.ndarray, y: np.ndarray, fit: LogisticFit) -> tuple[float, float, float, float, float, float]:
    fx = fit(x)
    fitted_plcc = float(stats.pearsonr(fx, y)[0]) if np.ptp(fx) > 0 else _NAN
    return (
        float(stats.spearmanr(x, y)[0]),
        float(stats.kendalltau(x, y)[0]),
        float(stats.pearsonr(x, y)[0]),
        float(np.sqrt(np.mean((x - y) ** 2))),
        fitted_plcc,
        float(np.sqrt(np.mean((fx - y) ** 2))),
    )


def iqa_metrics(
    pred,
    mos,
    *,
    fit: Literal["logistic4", "linear"] = "logistic4",
    bootstrap: int = 0,
    ci_level: float = 0.95,
    seed: int = 0,
    on_invalid: Literal["raise", "flag"] = "raise",
) -> IQAMetrics:
    """SRCC, KRCC, PLCC and RMSE of ``pred`` against ``mos``.

    Args:
        pred: Predicted scores, any monotone scale (negate lower-is-better
            predictors such as NIQE first, or read SRCC as negative).
        mos: Ground-truth ratings.
        fit: ``"logistic4"`` (default; falls back to a line if the optimiser fails,
            flagged ``logistic_fit_failed``) or ``"linear"``.
        bootstrap: Number of bootstrap resamples for percentile confidence
            intervals (0: none). The fitted metrics reuse the full-sample fit in
            each resample (refitting would cost one optimisation per resample).
        ci_level: Coverage of the intervals.
        seed: Seed of the bootstrap resampling.
        on_invalid: ``"raise"`` a `MetricError` on NaN/inf input, fewer than 3
            pairs, or constant predictions/MOS; or ``"flag"``: return NaN values
            with ``flags`` naming the problem.

    Returns:
        An `IQAMetrics`.
    """
    x, y = _pair(pred, mos)
    problems = _validate(x, y)
    if problems:
        if on_invalid == "raise":
            raise MetricError(
                f"iqa_metrics: {_describe_problems(problems, x, y)}. "
                "Fix the predictions, or pass on_invalid='flag' to get a flagged result."
            )
        return IQAMetrics(x.size, _NAN, _NAN, _NAN, _NAN, _NAN, _NAN, None, flags=tuple(problems))

    flags: list[str] = []
    if fit == "logistic4":
        fitted = fit_logistic4(x, y)
        if fitted.kind != "logistic4":
            flags.append("logistic_fit_failed")
        elif fitted.at_bound:
            flags.append("logistic_at_bound")
    elif fit == "linear":
        slope, intercept = np.polyfit(x, y, 1)
        fitted = LogisticFit("linear", (float(slope), float(intercept)))
    else:
        raise ValueError(f"fit must be 'logistic4' or 'linear', got {fit!r}")

    values = _core(x, y, fitted)
    ci: dict[str, tuple[float, float]] = {}
    if bootstrap:
        names = ("srcc", "krcc", "plcc_raw", "rmse_raw", "plcc_fitted", "rmse_fitted")
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, x.size, x.size)
            if np.ptp(x[idx]) == 0 or np.ptp(y[idx]) == 0:
                continue  # a degenerate resample has no correlation; skip it
            samples.append(_core(x[idx], y[idx], fitted))
        if len(samples) < bootstrap:
            flags.append(f"bootstrap_skipped_{bootstrap - len(samples)}")
        arr = np.asarray(samples)
        alpha = (1.0 - ci_level) / 2.0
        for i, name in enumerate(names):
            col = arr[:, i][np.isfinite(arr[:, i])]
            if col.size:
                ci[name] = (float(np.quantile(col, alpha)), float(np.quantile(col, 1 - alpha)))
    return IQAMetrics(
        x.size, *values, fit=fitted, ci=ci, ci_level=ci_level if bootstrap else None, flags=tuple(flags)
    )


# ---------------------------------------------------------------------------------------------------------
# Full-reference measures (reference and distorted image: uint8 or float in [0, 1], [H, W, 3] or [H, W])
# ---------------------------------------------------------------------------------------------------------


def _as_float(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def _luma(image: np.ndarray) -> np.ndarray:
    a = _as_float(image)
    return a if a.ndim == 2 else a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def psnr(ref: np.ndarray, dist: np.ndarray) -> float:
    """PSNR in dB over all channels (higher is better; 100 for identical images)."""
    mse = float(np.mean((_as_float(ref) - _as_float(dist)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10.0 * math.log10(1.0 / mse))


def ssim(ref: np.ndarray, dist: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03), averaged over RGB channels.

    Higher is better, 1 for identical images. Computed per channel so that
    colour changes (saturation, colour bleeding) lower it, unlike luma SSIM.
    Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``, the mean taken
    inside a 5-pixel border, but filters all channels at once (several times faster).
    """
    a, b = _as_float(ref), _as_float(dist)
    if a.shape != b.shape:
        raise ValueError(f"ssim: images differ in shape, {a.shape} vs {b.shape}")
    sigma = (1.5, 1.5) + (0.0,) * (a.ndim - 2)

    def blur(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma, truncate=3.5, mode="reflect")

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = 5  # (window 11 - 1) / 2, as skimage crops before averaging
    return float(s_map[pad:-pad, pad:-pad].mean())


_PREWITT = np.array([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]]) / 3.0


def gmsd(ref: np.ndarray, dist: np.ndarray) -> float:
    """Gradient magnitude similarity deviation (Xue et al. 2014); lower is better, 0 for identical images.

    Luma on 0-255, 2x2 average and down-sampling by 2, Prewitt gradients, the
    similarity map (2 m_r m_d + c) / (m_r^2 + m_d^2 + c) with c = 170, and its
    standard deviation.
    """

    def prep(img: np.ndarray) -> np.ndarray:
        y = _luma(img) * 255.0
        y = ndimage.uniform_filter(y, 2, mode="nearest")
        return y[::2, ::2]

    r, d = prep(ref), prep(dist)

    def grad(img: np.ndarray) -> np.ndarray:
        gx = ndimage.correlate(img, _PREWITT, mode="nearest")
        gy = ndimage.correlate(img, _PREWITT.T, mode="nearest")
        return np.hypot(gx, gy)

    mr, md = grad(r), grad(d)
    c = 170.0
    gms = (2 * mr * md + c) / (mr**2 + md**2 + c)
    return float(gms.std())


#: name -> (function, higher_is_better)
FR_MEASURES = {"psnr": (psnr, True), "ssim": (ssim, True), "gmsd": (gmsd, False)}
