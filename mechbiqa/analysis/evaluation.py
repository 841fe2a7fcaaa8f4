"""Quality evaluation: agreement of a model's scores with human ratings per data set, and inference time.

Where it sits: `studies/evaluate_quality.py` rates the images of one or more
data sets (`mechbiqa.data` records) with `mechbiqa.scoring.rate_images`,
timing the model with `Stopwatch`, and hands scores, ratings and data-set
names to `evaluate_by_dataset`, which applies DESIGN.md's IQA protocol
(`mechbiqa.metrics.iqa_metrics`: SRCC and KRCC raw; PLCC and RMSE raw and
after the 4-parameter logistic fit) to each data set and to all together.
`mechbiqa.reports.evaluation_table` renders the result (the paper's Table 2).

Every row is computed on one scale: the rating normalised to 0-1, higher
is better (`normalised_target`, from each record's own score scale; the
table is `mechbiqa.data.scales.DATASET_SCALES`). Per data set this changes
no correlation (the map is affine); for the pooled row it is what makes the
numbers mean anything: KonIQ's 0-100 and KADID's 1-5 pooled raw rank every
KonIQ image above every KADID one. `evaluate_by_dataset` refuses targets that
are plainly not on the 0-1 scale when it pools.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechbiqa.metrics import IQAMetrics, iqa_metrics

__all__ = [
    "ALL",
    "DatasetEvaluation",
    "EvaluationResult",
    "Stopwatch",
    "aligned_target",
    "evaluate_by_dataset",
    "normalised_target",
]

ALL = "all"
"""The name of the pooled row (every data set together)."""


@dataclass
class Stopwatch:
    """Accumulate wall time of repeated sections: ``with watch: ...``; ``watch.seconds``.

    Attributes:
        seconds: Total time inside the sections.
        count: Number of sections timed.
    """

    seconds: float = 0.0
    count: int = 0
    _start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start
        self.count += 1


def aligned_target(score: float | None, higher_is_better: bool) -> float:
    """A rating on its own scale, oriented so that higher is better (DMOS negated), NaN when unrated.

    Only for a single data set: ratings of different data sets are on different
    scales, so pooled rows use `normalised_target` instead.

    Research choice: correlations of a quality score with DMOS are negative by construction;
    negating DMOS keeps every SRCC/PLCC in the table "higher is better" (fitted RMSE is then
    in negated DMOS units, same magnitude).
    """
    if score is None:
        return float("nan")
    return float(score) if higher_is_better else -float(score)


def normalised_target(sample: Any) -> float:
    """A sample's rating on the common 0-1 scale, higher is better; NaN when it has none.

    ``(score - low) / (high - low)`` over the record's own ``scale``, flipped for
    DMOS, as `IQARecord.mos01` but not clipped, so ratings a data set places just
    outside its nominal range keep their order.

    Args:
        sample: An `IQARecord` (or anything with ``score``, ``scale`` and
            ``higher_is_better``); a sample without a score (a folder of images) gives NaN.
    """
    from mechbiqa.data.scales import DatasetScale

    score = getattr(sample, "score", None)
    if score is None:
        return float("nan")
    low, high = sample.scale
    return DatasetScale(low, high, getattr(sample, "higher_is_better", True)).normalise(score, clip=False)


#: How far outside [0, 1] a pooled target may lie (scores a data set places beyond its
#: nominal range, e.g. LIVE's realigned DMOS) before it is taken for an unnormalised rating.
_POOL_TOLERANCE = 0.5


@dataclass(frozen=True)
class DatasetEvaluation:
    """One data set's row.

    Attributes:
        name: Data-set name (`ALL` for the pooled row).
        n: Images rated.
        metrics: SRCC/KRCC/PLCC/RMSE (`IQAMetrics`; ``flags`` say why a value is NaN).
        seconds_per_image: Model time per image (forward at the quality position, batched).
    """

    name: str
    n: int
    metrics: IQAMetrics
    seconds_per_image: float

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "name": self.name,
            "n": self.n,
            "seconds_per_image": self.seconds_per_image,
            **self.metrics.to_dict(),
        }


@dataclass(frozen=True)
class EvaluationResult:
    """Agreement with ratings per data set.

    Attributes:
        rows: One `DatasetEvaluation` per data set, then the pooled row when there are several.
        fit: The fit used for the "fitted" PLCC/RMSE (``logistic4`` unless a fit failed, see flags).
        checkpoint: What was evaluated.
    """

    rows: tuple[DatasetEvaluation, ...]
    fit: str
    checkpoint: str = ""

    def row(self, name: str) -> DatasetEvaluation:
        """The row of a data set."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no data set {name!r}; rows: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"checkpoint": self.checkpoint, "fit": self.fit, "rows": [r.to_dict() for r in self.rows]}


def evaluate_by_dataset(
    scores: Sequence[float] | np.ndarray,
    targets: Sequence[float] | np.ndarray,
    datasets: Sequence[str],
    seconds: dict[str, float] | None = None,
    *,
    checkpoint: str = "",
    fit: str = "logistic4",
) -> EvaluationResult:
    """IQA metrics of the scores against the targets, per data set and pooled.

    Args:
        scores: ``[image]`` predicted quality (the Q-Align score).
        targets: ``[image]`` ratings on the 0-1 scale, higher is better (`normalised_target`); NaN
            rows are left out. The pooled row needs them on that one scale; a single data set's
            rows would be the same on any affine rescaling.
        datasets: ``[image]`` data-set name of each image.
        seconds: Model seconds spent per data set (for the per-image time).
        checkpoint: What was evaluated (for the record).
        fit: ``logistic4`` or ``linear`` (see `mechbiqa.metrics.iqa_metrics`).

    Returns:
        An `EvaluationResult`; metrics that cannot be computed (e.g. fewer than 3 rated
        images) are NaN with a flag saying why, never an error.

    Raises:
        ValueError: If several data sets are pooled and a target lies far outside [0, 1]
            (raw MOS of different scales); the message names the data sets.
    """
    pred = np.asarray(scores, dtype=np.float64)
    target = np.asarray(targets, dtype=np.float64)
    names = np.asarray(list(datasets), dtype=object)
    if not (len(pred) == len(target) == len(names)):
        raise ValueError(
            f"scores ({len(pred)}), targets ({len(target)}) and datasets ({len(names)}) differ in length"
        )
    seconds = seconds or {}
    order = list(dict.fromkeys(names.tolist()))
    groups = [(name, names == name) for name in order]
    if len(order) > 1:
        _check_one_scale(target, names, order)
        groups.append((ALL, np.ones(len(pred), dtype=bool)))
    rows = []
    for name, chosen in groups:
        rated = chosen & np.isfinite(target)
        metrics = iqa_metrics(pred[rated], target[rated], fit=fit, on_invalid="flag")  # type: ignore[arg-type]
        total = sum(seconds.values()) if name == ALL else seconds.get(name, float("nan"))
        rows.append(DatasetEvaluation(name, int(chosen.sum()), metrics, total / max(int(chosen.sum()), 1)))
    return EvaluationResult(rows=tuple(rows), fit=fit, checkpoint=checkpoint)


def _check_one_scale(target: np.ndarray, names: np.ndarray, order: list[str]) -> None:
    """Refuse to pool targets that are not on the 0-1 scale (they would rank data sets, not images)."""
    off = []
    for name in order:
        values = target[(names == name) & np.isfinite(target)]
        if values.size and (values.min() < -_POOL_TOLERANCE or values.max() > 1 + _POOL_TOLERANCE):
            off.append(f"{name} ({values.min():.3g}..{values.max():.3g})")
    if off:
        raise ValueError(
            f"cannot pool data sets whose targets are not on the 0-1 scale: {', '.join(off)}; "
            "pass each rating normalised (normalised_target(record), or mechbiqa.data.normalise(score, "
            "dataset)), so that the pooled row compares images, not score scales"
        )
