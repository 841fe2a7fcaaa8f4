"""One SRCC per rater, image set and scorer, with its sample count, and why two of them differ.

Where it sits: the main job (``studies/replicate.py``) measures a checkpoint's SRCC on three
image sets: the whole rated test split (``studies/train_pair.py``'s ``results.json``), the
subset recorded into the activation store (``n_images`` spread over the test photos) and, of
that subset, the images of the photos the probes held out (`mechbiqa.analysis.probe_data`).
On different images the same rater gets different SRCCs; `srcc_entries` collects each with
its count and a bootstrap interval, and `srcc_differences` states, from the numbers, why two
of them differ: which images each holds and how they relate, whether the shared images were
rated alike, the spread of the labels, and whether the subset's sampling interval covers the
other value. `mechbiqa.reports.srcc_table` renders both.

Inputs are the main job's per-checkpoint metrics (``metrics[mode]``):

* ``test_split``: ``{"n", "srcc", "ids", "scores", "labels"}`` (``train_pair``'s per-checkpoint
  results); without it, the legacy ``srcc`` number, count unknown;
* ``per_image["store"]``: ``{"ids", "score", "mos"}`` (the stored subset);
* ``probes["per_image"]``: ``{"ids", "mos", "level_word", "mlp_head", "ridge"}`` (held-out photos).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["SCORERS", "SrccEntry", "bootstrap_srcc", "srcc_differences", "srcc_entries"]

SCORERS = {"level_word": "level words", "mlp_head": "MLP score head", "ridge": "ridge probe"}
"""Scorer key -> display name (the level words are the Q-Align score of the model's answer)."""


@dataclass(frozen=True)
class SrccEntry:
    """One SRCC: a rater's scorer on one image set.

    Attributes:
        rater: The checkpoint (``one-stage``, ``two-stage``).
        split: The image set (``test split``, ``stored subset``, ``held-out photos``).
        scorer: `SCORERS` key.
        srcc: The value.
        n: Images (None: not recorded).
        ci: 95% percentile-bootstrap interval over images (None without per-image values).
        ids: The images (None: not recorded).
        scores: ``[image]`` the scorer's predictions (None: not recorded).
        labels: ``[image]`` the 0-1 labels (None: not recorded).
    """

    rater: str
    split: str
    scorer: str
    srcc: float
    n: int | None = None
    ci: tuple[float, float] | None = None
    ids: tuple[str, ...] | None = None
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (without the per-image arrays)."""
        return {
            "rater": self.rater,
            "split": self.split,
            "scorer": self.scorer,
            "srcc": self.srcc,
            "n": self.n,
            "ci": None if self.ci is None else list(self.ci),
        }


def _srcc(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():  # a constant input has no SRCC: NaN
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic) if len(x) > 1 else math.nan


def bootstrap_srcc(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    *,
    draws: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the SRCC over images (None when undefined).

    Args:
        scores: ``[image]`` predictions.
        labels: ``[image]`` labels.
        draws: Resamples.
        level: Coverage.
        seed: Seed of the resamples.
    """
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return None
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(x), (draws, len(x)))
    # Spearman = Pearson of the (tie-averaged) ranks, all resamples at once
    rx, ry = stats.rankdata(x[index], axis=1), stats.rankdata(y[index], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    norm = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    values = np.divide((rx * ry).sum(1), norm, out=np.full(draws, np.nan), where=norm > 0)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def _entry(
    rater: str,
    split: str,
    scorer: str,
    ids: Sequence[Any],
    scores: Any,
    labels: Any,
    srcc: float | None = None,
) -> SrccEntry:
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    value = _srcc(x[keep], y[keep]) if srcc is None else float(srcc)
    return SrccEntry(
        rater, split, scorer, value, int(keep.sum()), bootstrap_srcc(x, y), tuple(str(i) for i in ids), x, y
    )


def srcc_entries(metrics: Mapping[str, Mapping[str, Any]]) -> list[SrccEntry]:
    """Every SRCC the main job measured, one per rater, image set and scorer (see the module docstring).

    Args:
        metrics: Rater -> its metrics (``studies/replicate.py``'s ``Result.metrics``).

    Returns:
        The entries, per rater: test split, stored subset, held-out photos (level words, then the
        regressors).
    """
    out: list[SrccEntry] = []
    for rater, m in metrics.items():
        test = m.get("test_split") or {}
        store = (m.get("per_image") or {}).get("store") or {}
        held = (m.get("probes") or {}).get("per_image") or {}
        if test.get("scores") is not None and test.get("labels") is not None:
            out.append(
                _entry(
                    rater,
                    "test split",
                    "level_word",
                    test.get("ids") or range(len(test["scores"])),
                    test["scores"],
                    test["labels"],
                    test.get("srcc"),
                )
            )
        elif m.get("srcc") is not None and not (store and _same(m["srcc"], m.get("srcc_subset"))):
            out.append(SrccEntry(rater, "test split", "level_word", float(m["srcc"]), test.get("n")))
        if store.get("score") is not None:
            out.append(
                _entry(rater, "stored subset", "level_word", store["ids"], store["score"], store["mos"])
            )
        for key in SCORERS:
            if held.get(key) is not None:
                out.append(_entry(rater, "held-out photos", key, held["ids"], held[key], held["mos"]))
    return out


def _same(a: Any, b: Any) -> bool:
    return a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))


def srcc_differences(entries: Sequence[SrccEntry], tolerance: float = 0.005) -> list[str]:
    """Why two SRCCs of one rater and scorer on different image sets differ, one sentence each.

    Each image set is compared with the next larger one it was drawn from (test split ->
    stored subset -> held-out photos). The sentence says, as far as the per-image values were
    recorded: how many images each holds and whether one is a subset of the other; whether the
    shared images got the same scores (a different rating path would show here); the spread
    (std) of the labels, on which an SRCC depends; and whether the smaller set's 95%
    bootstrap interval covers the other value (then drawing fewer images explains it).

    Args:
        entries: `srcc_entries`.
        tolerance: Differences at most this large are not explained.
    """
    lines = []
    order = ("test split", "stored subset", "held-out photos")
    for rater in dict.fromkeys(e.rater for e in entries):
        for scorer in SCORERS:
            chain = sorted(
                (e for e in entries if e.rater == rater and e.scorer == scorer),
                key=lambda e: order.index(e.split) if e.split in order else len(order),
            )
            for big, small in zip(chain, chain[1:], strict=False):
                if (
                    not (np.isfinite(big.srcc) and np.isfinite(small.srcc))
                    or abs(big.srcc - small.srcc) <= tolerance
                ):
                    continue
                lines.append(_why(big, small))
    return lines


def _count(e: SrccEntry) -> str:
    return f"n={e.n}" if e.n is not None else "n not recorded"


def _why(big: SrccEntry, small: SrccEntry) -> str:
    head = (
        f"{big.rater}, {SCORERS[big.scorer]}: {big.split} {big.srcc:.3f} ({_count(big)}) vs "
        f"{small.split} {small.srcc:.3f} ({_count(small)}): "
    )
    reasons = []
    if big.ids is not None and small.ids is not None:
        shared = set(big.ids) & set(small.ids)
        if len(shared) == len(set(small.ids)):
            reasons.append(f"other images (the {len(small.ids)} are a subset of the {len(big.ids)})")
        else:
            reasons.append(f"other images ({len(shared)} shared)")
        if shared and big.scores is not None and small.scores is not None:
            a = dict(zip(big.ids, big.scores, strict=True))
            b = dict(zip(small.ids, small.scores, strict=True))
            gaps = np.array([abs(a[i] - b[i]) for i in shared], dtype=np.float64)
            gap = float(gaps[np.isfinite(gaps)].max()) if np.isfinite(gaps).any() else math.nan
            if np.isfinite(gap):
                reasons.append(
                    "rated alike on the shared images"
                    if gap < 1e-4
                    else f"the shared images were rated differently (max |Δscore| {gap:.3g})"
                )
    else:
        reasons.append("other images (which ones was not recorded)")
    if big.labels is not None and small.labels is not None:
        reasons.append(f"label spread (std) {np.nanstd(big.labels):.3f} vs {np.nanstd(small.labels):.3f}")
    if small.ci is not None:
        low, high = small.ci
        inside = low <= big.srcc <= high
        reasons.append(
            f"{big.srcc:.3f} is {'inside' if inside else 'outside'} the {small.split}'s 95% "
            f"bootstrap interval [{low:.3f}, {high:.3f}]: "
            + (
                "drawing fewer images explains it"
                if inside
                else "drawing fewer images alone does not explain it"
            )
        )
    return head + "; ".join(reasons)
