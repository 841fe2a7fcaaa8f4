"""Conversion error (the third paper; DESIGN.md, "Conversion error"): what turning MOS into level words costs.

How it connects: ``studies/conversion_error.py`` rates a data set with MOS by a
checkpoint (:mod:`mechbiqa.pipeline`, the Q-Align score) and optionally a
Q-Scorer (:mod:`mechbiqa.qscorer`), and passes the arrays here; nothing here
runs a model or prints.

Definitions (all on the 0-1 scale):

* **label approximation**: MOS -> one of five equal-width bins of ``[0, 1]``
  (Q-Align's labelling rule, :func:`mechbiqa.data.records.level_word_edges`)
  -> the bin's *restored* score, the value the Q-Align rule gives that level
  word (bad 0, poor .25, fair .5, good .75, excellent 1; :data:`QALIGN_RESTORED`).
  A model trained on level words can at best reproduce the restored score, so
  its RMSE against MOS is the floor every level-word model inherits
  (:func:`label_approximation`). ``restore="centre"`` uses the bins' centres
  instead (.1, .3, ..., .9), the least-squares best a five-valued label can do
  for uniform MOS.
* **restoration**: the checkpoint's Q-Align score (softmax over the level
  words dotted with the same values) against MOS; its RMSE minus the floor is
  the error the model adds beyond the labels (:func:`restoration_error`).
* **score token**: the same for a regressor that never passes through the
  level words (the Q-Scorer's MLP).

RMSE is raw (no logistic fit: the point is the error in the label's own
units); SRCC and PLCC are reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from jaxtyping import Float

from mechbiqa.metrics import plcc, rmse, srcc

__all__ = [
    "QALIGN_RESTORED",
    "ErrorStats",
    "ConversionResult",
    "level_bins",
    "restored_scores",
    "error_stats",
    "label_approximation",
    "restoration_error",
    "conversion_error",
]

QALIGN_RESTORED: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
"""The score each bin (lowest first: bad .. excellent) is restored to by the Q-Align rule."""


def level_bins(mos01: Float[np.ndarray, " image"], n_bins: int = 5) -> np.ndarray:
    """Equal-width bin of each 0-1 MOS: ``min(n - 1, floor(mos * n))`` (0 = lowest, i.e. "bad")."""
    mos = np.asarray(mos01, dtype=np.float64)
    if mos.size and (np.nanmin(mos) < 0 or np.nanmax(mos) > 1):
        raise ValueError("MOS must be on the 0-1 scale (IQARecord.mos01); rescale it first")
    return np.minimum(n_bins - 1, np.floor(mos * n_bins)).astype(np.int64)


def restored_scores(
    bins: np.ndarray, n_bins: int = 5, restore: Literal["qalign", "centre"] = "qalign"
) -> np.ndarray:
    """The score a bin is restored to: Q-Align's value ``k / (n - 1)``, or the centre ``(k + .5) / n``."""
    bins = np.asarray(bins, dtype=np.float64)
    if restore == "qalign":
        return bins / (n_bins - 1)
    if restore == "centre":
        return (bins + 0.5) / n_bins
    raise ValueError(f"restore must be 'qalign' or 'centre', got {restore!r}")


@dataclass(frozen=True)
class ErrorStats:
    """Agreement of predicted with true 0-1 scores.

    Attributes:
        rmse: Root mean squared error (raw, 0-1 units).
        srcc: Spearman rank correlation (NaN when a side is constant).
        plcc: Pearson correlation (raw; NaN when a side is constant).
        n: Images.
    """

    rmse: float
    srcc: float
    plcc: float
    n: int


def error_stats(pred: np.ndarray, mos01: np.ndarray) -> ErrorStats:
    """RMSE, SRCC and PLCC of predictions against MOS (correlations NaN when either side is constant)."""
    pred, mos = np.asarray(pred, dtype=np.float64), np.asarray(mos01, dtype=np.float64)
    if pred.shape != mos.shape or pred.ndim != 1:
        raise ValueError(f"pred and MOS must be 1-D of one length, got {pred.shape} and {mos.shape}")
    varied = len(pred) > 2 and np.ptp(pred) > 0 and np.ptp(mos) > 0
    return ErrorStats(
        rmse=rmse(pred, mos),
        srcc=srcc(pred, mos) if varied else float("nan"),
        plcc=plcc(pred, mos) if varied else float("nan"),
        n=len(pred),
    )


def label_approximation(
    mos01: np.ndarray, n_bins: int = 5, restore: Literal["qalign", "centre"] = "qalign"
) -> tuple[ErrorStats, np.ndarray]:
    """The floor: MOS -> bin -> restored score, against MOS. Returns the stats and the restored scores."""
    restored = restored_scores(level_bins(mos01, n_bins), n_bins, restore)
    return error_stats(restored, mos01), restored


def restoration_error(scores01: np.ndarray, mos01: np.ndarray) -> ErrorStats:
    """A checkpoint's (or a regressor's) 0-1 scores against MOS."""
    return error_stats(scores01, mos01)


@dataclass(frozen=True)
class ConversionResult:
    """The three errors and the arrays behind them.

    Attributes:
        label_approximation: MOS -> level -> restored score, against MOS (the floor).
        restoration: The checkpoint's Q-Align score against MOS (None without scores).
        score_token: The score-token regressor against MOS (None without one).
        mos: ``[image]`` MOS on 0-1.
        restored: ``[image]`` the labels' restored scores.
        qalign: ``[image]`` Q-Align scores, or None.
        regressed: ``[image]`` regressed scores, or None.
        restore: ``"qalign"`` or ``"centre"``.
    """

    label_approximation: ErrorStats
    restoration: ErrorStats | None
    score_token: ErrorStats | None
    mos: np.ndarray
    restored: np.ndarray
    qalign: np.ndarray | None
    regressed: np.ndarray | None
    restore: str = "qalign"

    @property
    def beyond_floor(self) -> float | None:
        """RMSE of the Q-Align score minus the label-approximation RMSE."""
        return None if self.restoration is None else self.restoration.rmse - self.label_approximation.rmse

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the named errors, the excess over the floor, and the per-image arrays."""
        as_list = lambda a: None if a is None else [float(x) for x in a]  # noqa: E731
        return {
            "scale": "0-1",
            "restore": self.restore,
            "n": int(len(self.mos)),
            "label_approximation": asdict(self.label_approximation),
            "restoration": None if self.restoration is None else asdict(self.restoration),
            "score_token": None if self.score_token is None else asdict(self.score_token),
            "restoration_beyond_floor_rmse": self.beyond_floor,
            "per_image": {
                "mos": as_list(self.mos),
                "restored": as_list(self.restored),
                "qalign": as_list(self.qalign),
                "regressed": as_list(self.regressed),
            },
        }


def conversion_error(
    mos01: np.ndarray,
    qalign: np.ndarray | None = None,
    regressed: np.ndarray | None = None,
    restore: Literal["qalign", "centre"] = "qalign",
) -> ConversionResult:
    """All three errors for one data set.

    Args:
        mos01: MOS on 0-1, one per image.
        qalign: The checkpoint's Q-Align scores (0-1), same order; None to skip.
        regressed: The score-token regressor's scores (0-1); None to skip.
        restore: How a bin is restored (see :func:`restored_scores`).
    """
    mos = np.asarray(mos01, dtype=np.float64)
    floor, restored = label_approximation(mos, restore=restore)
    return ConversionResult(
        label_approximation=floor,
        restoration=None if qalign is None else restoration_error(qalign, mos),
        score_token=None if regressed is None else restoration_error(regressed, mos),
        mos=mos,
        restored=restored,
        qalign=None if qalign is None else np.asarray(qalign, dtype=np.float64),
        regressed=None if regressed is None else np.asarray(regressed, dtype=np.float64),
        restore=restore,
    )


@dataclass(frozen=True)
class ConversionTable:
    """Conversion errors of several checkpoints on one data set (the main job's ``conversion_error.json``).

    Attributes:
        label_approximation: MOS -> level -> restored score, against MOS (the floor every level-word
            model inherits).
        restoration: Checkpoint name -> its Q-Align score against MOS.
        score_token: Regressor name -> its regressed score against MOS (the Q-Scorer's MLP).
        mos: ``[image]`` MOS on 0-1.
        restored: ``[image]`` the labels' restored scores.
        scores: Name -> ``[image]`` each checkpoint's or regressor's scores.
        ids: Image ids.
        restore: ``"qalign"`` or ``"centre"``.
    """

    label_approximation: ErrorStats
    restoration: dict[str, ErrorStats]
    score_token: dict[str, ErrorStats]
    mos: np.ndarray
    restored: np.ndarray
    scores: dict[str, np.ndarray]
    ids: tuple[str, ...] = ()
    restore: str = "qalign"

    def beyond_floor(self) -> dict[str, float]:
        """Each predictor's RMSE minus the label-approximation RMSE (negative: below the floor)."""
        floor = self.label_approximation.rmse
        return {name: s.rmse - floor for name, s in {**self.restoration, **self.score_token}.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the named errors, each one's excess over the floor, and the per-image arrays."""
        return {
            "scale": "0-1",
            "restore": self.restore,
            "n": int(len(self.mos)),
            "label_approximation": asdict(self.label_approximation),
            "restoration": {k: asdict(v) for k, v in self.restoration.items()},
            "score_token": {k: asdict(v) for k, v in self.score_token.items()},
            "beyond_floor_rmse": self.beyond_floor(),
            "per_image": {
                "ids": list(self.ids),
                "mos": [float(x) for x in self.mos],
                "restored": [float(x) for x in self.restored],
                **{k: [float(x) for x in v] for k, v in self.scores.items()},
            },
        }


def conversion_table(
    mos01: np.ndarray,
    qalign: dict[str, np.ndarray],
    regressed: dict[str, np.ndarray] | None = None,
    *,
    ids: tuple[str, ...] | list[str] = (),
    restore: Literal["qalign", "centre"] = "qalign",
) -> ConversionTable:
    """The label approximation, each checkpoint's restoration and each regressor's error, on one data set.

    Args:
        mos01: MOS on 0-1, one per image.
        qalign: Checkpoint name -> its Q-Align scores (0-1), same image order.
        regressed: Regressor name -> its regressed scores (0-1); None: none.
        ids: Image ids (kept in the per-image arrays).
        restore: How a bin is restored (see :func:`restored_scores`).

    Raises:
        ValueError: A name is both a checkpoint and a regressor, or an array's length differs.
    """
    mos = np.asarray(mos01, dtype=np.float64)
    regressed = regressed or {}
    if set(qalign) & set(regressed):
        raise ValueError(f"names {sorted(set(qalign) & set(regressed))} are both checkpoints and regressors")
    floor, restored = label_approximation(mos, restore=restore)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in {**qalign, **regressed}.items()}
    return ConversionTable(
        label_approximation=floor,
        restoration={k: restoration_error(arrays[k], mos) for k in qalign},
        score_token={k: restoration_error(arrays[k], mos) for k in regressed},
        mos=mos,
        restored=restored,
        scores=arrays,
        ids=tuple(str(i) for i in ids),
        restore=restore,
    )


__all__ += ["ConversionTable", "conversion_table"]
