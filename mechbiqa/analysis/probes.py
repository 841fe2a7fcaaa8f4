"""Probes on the quality position: ridge probes per layer, and a Q-Scorer-style MLP score head.

Where it sits (DESIGN.md, "Score-token regression"): the recorder
(`mechbiqa_hooks.record`) caches every LLM layer's residual at the quality
position into an activation store (``llm.blocks.{l}.hook_resid_post@quality``,
`mechbiqa.store`). Everything here works on those arrays, without the model:

* `probe_layers` fits a linear (ridge) probe per layer that predicts MOS,
  cross-validated by reference photo (`group_folds`), giving the curve of probe
  SRCC over layers: where quality becomes *linearly decodable*. `lens_score_curve`
  turns the logit lens's level probabilities (`mechbiqa.analysis.lens`) into the
  same kind of curve: where the model's *words* carry the quality.
* `train_score_head` trains a small MLP on one layer's cached residuals to
  regress MOS (Q-Scorer's idea: read a continuous score from the hidden state
  rather than from level-word probabilities). The `ScoreHead` saves and loads
  with its config JSON, and scores new images at inference through
  `head_scores` (one forward with a hook at its layer).

`studies/probes.py` runs both on a store; `mechbiqa.reports.probe_table` and
`mechbiqa.reports.score_head_table` render the results.

Ridge maths: features are standardised with the training fold's mean and
standard deviation, the target centred, and the solution for every penalty of
the grid read from one SVD of the training matrix
(``w = V diag(s / (s^2 + lambda)) U^T y``). No scikit-learn: the closed form is
a few lines, and the grouped folds and penalty grid stay visible here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.model.prompts import EncodedPrompt
    from mechbiqa.model.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_ALPHAS",
    "RidgeConfig",
    "RidgeFit",
    "ProbeCurve",
    "group_folds",
    "ridge_predictions",
    "choose_alpha",
    "ridge_cv",
    "probe_layers",
    "lens_score_curve",
    "ScoreHeadConfig",
    "ScoreHead",
    "train_score_head",
    "HeadComparison",
    "compare_scorers",
    "head_scores",
    "quality_hidden",
    "quality_states",
]

# Research choice: the penalty is lambda = alpha * n_train on standardised features, so alpha
# is the penalty per sample and the same grid suits 100 or 10,000 samples and d = 32 or 4096.
# Half-decades from 1e-3 (almost unpenalised) to 1e4 (almost the mean): wide enough that the
# chosen alpha sits inside it for the compact model and a 7B one (the result records the picks).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-3.0, 4.01, 0.5))


def _srcc(a: np.ndarray, b: np.ndarray) -> float:
    from mechbiqa.metrics import srcc

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant prediction has no rank correlation
    return srcc(a, b)


def _plcc(a: np.ndarray, b: np.ndarray) -> float:
    from mechbiqa.metrics import plcc

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return plcc(a, b)


# --------------------------------------------------------------------------- grouped folds
def group_folds(groups: Sequence[Any] | np.ndarray, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split samples into folds that never share a group (a reference photo), like scikit-learn's GroupKFold.

    Groups are taken largest first and each goes to the fold with the fewest
    samples so far (ties: the lower fold), which balances fold sizes; the
    result is deterministic.

    Args:
        groups: ``[sample]`` group label of each sample (e.g. the reference photo id).
        n_splits: Number of folds.

    Returns:
        ``(train indices, test indices)`` per fold.

    Raises:
        ValueError: If there are fewer distinct groups than folds.
    """
    labels, inverse, sizes = np.unique(
        np.asarray(groups).astype(str), return_inverse=True, return_counts=True
    )
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if len(labels) < n_splits:
        raise ValueError(
            f"cannot make {n_splits} folds from {len(labels)} groups (reference photos); lower "
            "n_splits, or give more photos (each fold must hold out at least one whole photo)"
        )
    fold_of_group = np.empty(len(labels), dtype=np.int64)
    load = np.zeros(n_splits, dtype=np.int64)
    for g in np.argsort(-sizes, kind="stable"):
        fold = int(np.argmin(load))
        fold_of_group[g] = fold
        load[fold] += sizes[g]
    fold_of = fold_of_group[inverse]
    return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(n_splits)]


# --------------------------------------------------------------------------- ridge
@dataclass(frozen=True, slots=True)
class RidgeConfig:
    """How the ridge probes are fitted and cross-validated.

    Attributes:
        alphas: Penalty grid, per training sample (``lambda = alpha * n_train`` on standardised features).
        n_splits: Outer folds, by reference photo (the reported out-of-fold predictions).
        inner_splits: Folds, again by photo, inside each outer training set that choose
            alpha (nested CV: the held-out photos never choose their own penalty).
    """

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    n_splits: int = 5
    inner_splits: int = 3

    def __post_init__(self) -> None:
        """Check the grid and the fold counts."""
        if not self.alphas or min(self.alphas) <= 0:
            raise ValueError(f"RidgeConfig alphas must be positive and non-empty; got {self.alphas}")
        if self.n_splits < 2 or self.inner_splits < 2:
            raise ValueError(
                f"RidgeConfig needs n_splits >= 2 and inner_splits >= 2; got {self.n_splits}, "
                f"{self.inner_splits}"
            )


def ridge_predictions(
    x_train: np.ndarray | Tensor,
    y_train: np.ndarray | Tensor,
    x_test: np.ndarray | Tensor,
    alphas: Sequence[float],
    *,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Ridge predictions on ``x_test`` for every alpha, from one eigendecomposition.

    Features are standardised with the training mean and std, the target centred
    (the intercept is the training mean). The smaller Gram matrix is
    diagonalised: ``Z Z^T`` (dual form) when samples <= features, as for a 7B
    model's 4096-wide residual, else ``Z^T Z``; every alpha then costs one
    matrix product. Float64 throughout.

    Args:
        x_train: ``[n_train, d]`` features.
        y_train: ``[n_train]`` targets.
        x_test: ``[n_test, d]`` features.
        alphas: Penalties per training sample (``lambda = alpha * n_train``).
        device: Where to compute (``"cuda"`` for 7B stores; default CPU).

    Returns:
        ``[alpha, n_test]`` predictions.
    """

    def tensor(a: np.ndarray | Tensor) -> Tensor:
        return torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a).to(device, torch.float64)

    xtr, xte, y = tensor(x_train), tensor(x_test), tensor(y_train)
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False)
    std = torch.where(
        std > 1e-12 * std.max().clamp_min(1.0), std, torch.ones_like(std)
    )  # constant columns stay 0
    ztr, zte = (xtr - mean) / std, (xte - mean) / std
    offset = y.mean()
    yc = y - offset
    lam = torch.as_tensor(list(alphas), dtype=torch.float64, device=ztr.device)[:, None] * len(y)
    n, d = ztr.shape
    if n <= d:  # dual: predictions = Z_te Z^T U diag(1 / (e + lambda)) U^T y
        evals, u = torch.linalg.eigh(ztr @ ztr.T)
        coef = (u.T @ yc) / (evals.clamp_min(0) + lam)  # [alpha, n]
        out = coef @ ((zte @ ztr.T) @ u).T
    else:  # primal: w = V diag(1 / (e + lambda)) V^T Z^T y
        evals, v = torch.linalg.eigh(ztr.T @ ztr)
        coef = (v.T @ (ztr.T @ yc)) / (evals.clamp_min(0) + lam)  # [alpha, d]
        out = coef @ (zte @ v).T
    return (offset + out).cpu().numpy()


@dataclass(frozen=True)
class RidgeFit:
    """Out-of-fold ridge predictions of one feature set (one layer).

    Research choice: the headline SRCC is the mean of the SRCCs *inside* each
    held-out fold, not the SRCC of the predictions pooled over folds. Each fold
    has its own intercept (its training mean), and photos with high MOS leave a
    low training mean behind, so pooling anti-correlates a probe that learnt
    nothing (about -0.2 on 12 photos). Within a fold all predictions come from
    one fit, so chance is 0. The pooled values are kept beside.

    Attributes:
        predictions: ``[sample]`` out-of-fold predictions.
        alphas: ``[fold]`` the alpha the inner CV chose for each outer fold.
        fold_srcc: ``[fold]`` SRCC inside each held-out fold.
        fold_plcc: ``[fold]`` PLCC inside each held-out fold.
        srcc: Mean of ``fold_srcc`` (NaN folds, e.g. a constant prediction, ignored).
        plcc: Mean of ``fold_plcc``.
        pooled_srcc: SRCC of all out-of-fold predictions together.
        pooled_plcc: PLCC of the same.
    """

    predictions: np.ndarray
    alphas: np.ndarray
    fold_srcc: np.ndarray
    fold_plcc: np.ndarray
    srcc: float
    plcc: float
    pooled_srcc: float
    pooled_plcc: float


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def choose_alpha(
    x: np.ndarray | Tensor,
    y: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    cfg: RidgeConfig = RidgeConfig(),
    *,
    device: str | torch.device | None = None,
) -> float:
    """The alpha of ``cfg.alphas`` with the least squared error in photo-grouped CV (``inner_splits`` folds).

    Raises:
        ValueError: If the samples come from a single photo (no grouped CV possible).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(device, torch.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups.astype(str)))
    if n_groups < 2:
        raise ValueError(
            "an outer training fold holds a single reference photo, so the inner CV cannot choose "
            "alpha; give more photos or fewer outer folds (n_splits)"
        )
    errors = np.zeros(len(cfg.alphas))
    for train, test in group_folds(groups, min(cfg.inner_splits, n_groups)):
        predictions = ridge_predictions(x[train], y[train], x[test], cfg.alphas, device=device)
        errors += ((predictions - y[test]) ** 2).sum(1)
    return float(cfg.alphas[int(np.argmin(errors))])  # ties: the smaller penalty (first in the grid)


def ridge_cv(
    x: np.ndarray | Tensor,
    y: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    cfg: RidgeConfig = RidgeConfig(),
    *,
    device: str | torch.device | None = None,
) -> RidgeFit:
    """Nested, photo-grouped cross-validation of a ridge probe.

    For each outer fold: choose alpha by inner grouped CV (squared error summed
    over the inner folds) on the training photos, refit on all of them, predict
    the held-out photos.

    Args:
        x: ``[sample, d]`` features (e.g. one layer's residual at the quality position).
        y: ``[sample]`` targets (MOS, 0-1).
        groups: ``[sample]`` reference photo of each sample.
        cfg: Grid and folds.
        device: Where the linear algebra runs (default CPU).

    Returns:
        A `RidgeFit`.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(device, torch.float64)
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    if x.ndim != 2 or y.shape != (x.shape[0],) or groups.shape != y.shape:
        raise ValueError(
            f"ridge_cv needs x [sample, d], y [sample], groups [sample]; got {tuple(x.shape)}, "
            f"{y.shape}, {groups.shape}"
        )
    if not (bool(torch.isfinite(x).all()) and np.isfinite(y).all()):
        raise ValueError("ridge_cv got NaN or infinite values; drop unrated samples (NaN labels) first")
    out = np.empty_like(y)
    chosen, fold_srcc, fold_plcc = [], [], []
    for train, test in group_folds(groups, cfg.n_splits):
        alpha = choose_alpha(x[train], y[train], groups[train], cfg, device=device)
        out[test] = ridge_predictions(x[train], y[train], x[test], [alpha], device=device)[0]
        chosen.append(alpha)
        fold_srcc.append(_srcc(out[test], y[test]))
        fold_plcc.append(_plcc(out[test], y[test]))
    return RidgeFit(
        predictions=out,
        alphas=np.asarray(chosen),
        fold_srcc=np.asarray(fold_srcc),
        fold_plcc=np.asarray(fold_plcc),
        srcc=_nanmean(fold_srcc),
        plcc=_nanmean(fold_plcc),
        pooled_srcc=_srcc(out, y),
        pooled_plcc=_plcc(out, y),
    )


@dataclass(frozen=True)
class ProbeCurve:
    """Ridge probe quality per layer.

    Attributes:
        layers: ``[layer]`` layer numbers (output of block ``l``).
        srcc: ``[layer]`` mean within-fold SRCC of the out-of-fold predictions with MOS (see `RidgeFit`).
        plcc: ``[layer]`` mean within-fold PLCC.
        pooled_srcc: ``[layer]`` SRCC of the pooled out-of-fold predictions.
        fold_srcc: ``[layer, fold]`` SRCC inside each held-out fold (spread across photos).
        alphas: ``[layer, fold]`` alpha chosen per outer fold.
        predictions: ``[layer, sample]`` out-of-fold predictions.
        control_srcc: ``[layer]`` mean SRCC of the same probe fitted to shuffled labels (chance level),
            or None when no shuffles were asked for.
        n_samples: Samples used.
        n_groups: Distinct reference photos.
        config: The `RidgeConfig`.
    """

    layers: np.ndarray
    srcc: np.ndarray
    plcc: np.ndarray
    pooled_srcc: np.ndarray
    fold_srcc: np.ndarray
    alphas: np.ndarray
    predictions: np.ndarray
    control_srcc: np.ndarray | None
    n_samples: int
    n_groups: int
    config: RidgeConfig = field(default_factory=RidgeConfig)

    @property
    def best_layer(self) -> int | None:
        """The layer with the highest probe SRCC (None when no layer has one, e.g. constant states)."""
        if not np.isfinite(self.srcc).any():
            return None
        return int(self.layers[int(np.nanargmax(self.srcc))])

    def decodable_layer(self, fraction: float = 0.9) -> int | None:
        """First layer whose probe SRCC reaches ``fraction`` of the best (None if the best is not positive).

        Research choice: "where quality becomes linearly decodable" is read as the
        first layer within 10% of the best probe, robust to a noisy maximum.
        """
        best = float(np.nanmax(self.srcc)) if np.isfinite(self.srcc).any() else float("nan")
        if not best > 0:
            return None
        return int(self.layers[int(np.argmax(np.nan_to_num(self.srcc, nan=-1.0) >= fraction * best))])

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """JSON-ready dict (out-of-fold predictions only with ``per_sample``)."""
        out = {
            "layers": self.layers.tolist(),
            "srcc": self.srcc.tolist(),
            "plcc": self.plcc.tolist(),
            "pooled_srcc": self.pooled_srcc.tolist(),
            "fold_srcc_std": [
                float(np.std(f[np.isfinite(f)])) if np.isfinite(f).any() else None for f in self.fold_srcc
            ],
            "alphas": self.alphas.tolist(),
            "control_srcc": None if self.control_srcc is None else self.control_srcc.tolist(),
            "best_layer": self.best_layer,
            "decodable_layer": self.decodable_layer(),
            "n_samples": self.n_samples,
            "n_groups": self.n_groups,
            "n_splits": self.config.n_splits,
            "inner_splits": self.config.inner_splits,
            "alpha_grid": list(self.config.alphas),
        }
        if per_sample:
            out["predictions"] = self.predictions.tolist()
        return out


def _layer_items(
    resid: np.ndarray | Iterable[tuple[int, np.ndarray]], layers: Sequence[int] | None
) -> Iterable[tuple[int, np.ndarray]]:
    if isinstance(resid, np.ndarray):
        if resid.ndim == 4 and resid.shape[2] == 1:  # the store's [sample, layer, 1, d] quality selection
            resid = resid[:, :, 0]
        if resid.ndim != 3:
            raise ValueError(
                f"resid must be [sample, layer, d_model] (or the store's [sample, layer, 1, "
                f"d_model]); got shape {resid.shape}"
            )
        numbers = list(range(resid.shape[1])) if layers is None else list(layers)
        if len(numbers) != resid.shape[1]:
            raise ValueError(f"{len(numbers)} layer numbers for {resid.shape[1]} layers of residuals")
        return ((n, resid[:, i]) for i, n in enumerate(numbers))
    return resid


def probe_layers(
    resid: np.ndarray | Iterable[tuple[int, np.ndarray]],
    mos: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    cfg: RidgeConfig = RidgeConfig(),
    *,
    layers: Sequence[int] | None = None,
    n_shuffles: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> ProbeCurve:
    """A ridge probe per layer, cross-validated by reference photo: the probe-SRCC curve.

    Args:
        resid: ``[sample, layer, d_model]`` residuals at the quality position, or an iterable of
            ``(layer, [sample, d_model])`` (e.g. ``ActivationStore.iter_layers``: one layer in memory).
        mos: ``[sample]`` ratings (0-1).
        groups: ``[sample]`` reference photo ids (crops of one photo belong together).
        cfg: Penalty grid and folds.
        layers: Layer numbers of the array's layer axis (default ``0..``).
        n_shuffles: Also fit to this many random permutations of ``mos`` (chance level).
        seed: Seed of the permutations.
        device: Where the linear algebra runs (``"cuda"`` for 7B stores).

    Returns:
        A `ProbeCurve`.
    """
    y = np.asarray(mos, dtype=np.float64)
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    shuffles = [rng.permutation(y) for _ in range(n_shuffles)]
    numbers, fits, control = [], [], []
    for layer, x in _layer_items(resid, layers):
        x = np.asarray(x)
        if x.ndim == 3 and x.shape[1] == 1:
            x = x[:, 0]
        numbers.append(int(layer))
        fits.append(ridge_cv(x, y, groups, cfg, device=device))
        if shuffles:
            control.append(_nanmean([ridge_cv(x, s, groups, cfg, device=device).srcc for s in shuffles]))
    if not fits:
        raise ValueError("probe_layers got no layers")
    return ProbeCurve(
        layers=np.asarray(numbers),
        srcc=np.asarray([f.srcc for f in fits]),
        plcc=np.asarray([f.plcc for f in fits]),
        pooled_srcc=np.asarray([f.pooled_srcc for f in fits]),
        fold_srcc=np.stack([f.fold_srcc for f in fits]),
        alphas=np.stack([f.alphas for f in fits]),
        predictions=np.stack([f.predictions for f in fits]),
        control_srcc=np.asarray(control) if shuffles else None,
        n_samples=len(y),
        n_groups=len(np.unique(groups.astype(str))),
        config=cfg,
    )


def lens_score_curve(
    level_probs: np.ndarray,
    mos: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_splits: int | None = None,
) -> np.ndarray:
    """``[layer]`` SRCC with MOS of the Q-Align score read through the logit lens at each layer.

    Args:
        level_probs: ``[layer, sample, 5]`` level-word probabilities per layer
            (`mechbiqa.analysis.lens.LensResult.level_probs`), excellent .. bad.
        mos: ``[sample]`` ratings.
        groups: With ``n_splits``, the SRCC is averaged inside the same photo folds
            as `probe_layers` (`group_folds`), so the two curves are one statistic.
        n_splits: The probes' number of folds.
    """
    probs = np.asarray(level_probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[2] != 5:
        raise ValueError(f"level_probs must be [layer, sample, 5]; got {probs.shape}")
    from mechbiqa.model.prompts import LEVEL_WEIGHTS

    scores = probs @ np.asarray(LEVEL_WEIGHTS)
    y = np.asarray(mos, dtype=np.float64)
    if groups is None or n_splits is None:
        return np.asarray([_srcc(s, y) for s in scores])
    folds = [test for _, test in group_folds(groups, n_splits)]
    return np.asarray([_nanmean([_srcc(s[t], y[t]) for t in folds]) for s in scores])


# --------------------------------------------------------------------------- the MLP score head
@dataclass(frozen=True, slots=True)
class ScoreHeadConfig:
    """A Q-Scorer-style regression head and how it is trained.

    Attributes:
        layer: The LLM layer whose ``hook_resid_post`` at the quality position the head reads
            (None: the last layer, the state the level word is read from).
        hidden: Width of the hidden layer.
        dropout: Dropout after the hidden layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: Passes over the training set (the best validation epoch is kept when a
            validation set is given).
        batch_size: Samples per step.
        seed: Seeds initialisation, dropout and the sample order.
    """

    layer: int | None = None
    hidden: int = 64
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    epochs: int = 200
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the sizes and the dropout rate."""
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"ScoreHeadConfig needs hidden, epochs and batch_size >= 1; got {self.hidden}, "
                f"{self.epochs}, {self.batch_size}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ScoreHeadConfig dropout must be in [0, 1); got {self.dropout}")


_HEAD_FORMAT = 1
_HEAD_CONFIG = "score_head.json"
_HEAD_WEIGHTS = "score_head.safetensors"


class ScoreHead(nn.Module):
    """MOS from one layer's hidden state at the quality position: standardise, Linear-GELU-Dropout-Linear.

    Research choice: inputs are standardised with the training set's per-feature
    mean and std (stored as buffers), so the head is independent of the scale of
    the residual stream, which grows with depth in LLaMA models.

    Args:
        d_model: Width of the hidden state.
        layer: The layer it reads.
        config: The `ScoreHeadConfig`.
        meta: Where it was trained (store path, prompt, metrics), saved with it.
    """

    def __init__(
        self,
        d_model: int,
        layer: int,
        config: ScoreHeadConfig = ScoreHeadConfig(),
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Build the layers; the normalisation buffers start at mean 0, std 1."""
        super().__init__()
        self.d_model, self.layer, self.config = int(d_model), int(layer), config
        self.meta = dict(meta or {})
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))
        self.net = nn.Sequential(
            nn.Linear(d_model, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 1),
        )

    @property
    def hook(self) -> str:
        """The hook the head reads: ``llm.blocks.{layer}.hook_resid_post``."""
        return names.resid_post(self.layer)

    def forward(self, hidden: Tensor) -> Tensor:
        """``[*batch, d_model]`` -> ``[*batch]`` predicted MOS (0-1 scale of the training labels)."""
        return self.net((hidden.float() - self.mean) / self.std).squeeze(-1)

    @torch.no_grad()
    def predict(self, hidden: np.ndarray | Tensor, batch_size: int = 4096) -> np.ndarray:
        """Predicted MOS of ``[sample, d_model]`` hidden states (eval mode, float64 numpy)."""
        was = self.training
        self.eval()
        x = (
            torch.as_tensor(np.asarray(hidden, dtype=np.float32))
            if isinstance(hidden, np.ndarray)
            else hidden
        )
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(
                f"ScoreHead.predict needs [sample, {self.d_model}] hidden states; got {tuple(x.shape)}"
            )
        out = (
            torch.cat(
                [self(x[i : i + batch_size].to(self.mean.device)) for i in range(0, len(x), batch_size)]
            )
            if len(x)
            else torch.zeros(0)
        )
        self.train(was)
        return out.double().cpu().numpy()

    def save(self, directory: str | Path) -> Path:
        """Write ``score_head.json`` (config, layer, width, meta) and ``score_head.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {
            "format": _HEAD_FORMAT,
            "d_model": self.d_model,
            "layer": self.layer,
            "hook": self.hook,
            "config": asdict(self.config),
            "meta": self.meta,
        }
        (directory / _HEAD_CONFIG).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(directory / _HEAD_WEIGHTS),
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ScoreHead:
        """Inverse of `save`.

        Raises:
            FileNotFoundError: If the directory lacks the config or the weights (named).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (_HEAD_CONFIG, _HEAD_WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: {directory} is not a saved ScoreHead "
                    "(write one with ScoreHead.save or studies/probes.py --save-head)"
                )
        info = json.loads((directory / _HEAD_CONFIG).read_text())
        if info.get("format") != _HEAD_FORMAT:
            raise ValueError(
                f"{directory / _HEAD_CONFIG} has format {info.get('format')}; this mechbiqa reads "
                f"format {_HEAD_FORMAT}: retrain the head"
            )
        head = cls(info["d_model"], info["layer"], ScoreHeadConfig(**info["config"]), info.get("meta"))
        head.load_state_dict(load_file(str(directory / _HEAD_WEIGHTS)))
        return head.eval()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def train_score_head(
    hidden: np.ndarray,
    mos: Sequence[float] | np.ndarray,
    cfg: ScoreHeadConfig = ScoreHeadConfig(),
    *,
    layer: int | None = None,
    val_hidden: np.ndarray | None = None,
    val_mos: Sequence[float] | np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> ScoreHead:
    """Train a `ScoreHead` on cached hidden states (no model needed).

    MSE loss on the 0-1 MOS, AdamW, mini-batches in a seeded order. With a
    validation set the weights of the epoch with the lowest validation MSE are
    kept (early stopping without a patience knob); without one, the last.

    Args:
        hidden: ``[sample, d_model]`` the layer's residual at the quality position.
        mos: ``[sample]`` targets.
        cfg: Architecture and training settings.
        layer: The layer the states come from (default ``cfg.layer``; one of them is needed,
            so the head knows where to read at inference).
        val_hidden: ``[sample, d_model]`` validation states (other photos), optional.
        val_mos: Their targets.
        meta: Saved with the head (store path, prompt, split ...).

    Returns:
        The trained head in eval mode; ``head.meta["history"]`` holds the loss per epoch.
    """
    layer = cfg.layer if layer is None else layer
    if layer is None:
        raise ValueError(
            "train_score_head needs the layer the hidden states come from: pass layer= or set "
            "ScoreHeadConfig.layer"
        )
    x = torch.as_tensor(np.asarray(hidden, dtype=np.float32))
    y = torch.as_tensor(np.asarray(mos, dtype=np.float32))
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(
            f"train_score_head needs hidden [sample, d] and mos [sample]; got {tuple(x.shape)}, "
            f"{tuple(y.shape)}"
        )
    if len(x) < 2 or not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError(
            "train_score_head needs at least 2 samples and finite values; drop unrated samples first"
        )
    has_val = val_hidden is not None and val_mos is not None and len(val_mos) > 0
    with torch.random.fork_rng(devices=[]):  # seeded init and dropout without touching the caller's stream
        torch.manual_seed(cfg.seed)
        head = ScoreHead(x.shape[1], layer, cfg, meta)
        head.mean.copy_(x.mean(0))
        head.std.copy_(x.std(0).clamp_min(1e-6))  # constant features: divide by a tiny number times 0
        order = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.AdamW(head.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        xv = torch.as_tensor(np.asarray(val_hidden, dtype=np.float32)) if has_val else None
        yv = torch.as_tensor(np.asarray(val_mos, dtype=np.float32)) if has_val else None
        best = (math.inf, -1, None)
        history: list[dict[str, float]] = []
        for epoch in range(cfg.epochs):
            head.train()
            total = 0.0
            for batch in torch.randperm(len(x), generator=order).split(cfg.batch_size):
                loss = nn.functional.mse_loss(head(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            row = {"epoch": epoch, "train_mse": total / len(x)}
            if has_val:
                head.eval()
                with torch.no_grad():
                    val = float(nn.functional.mse_loss(head(xv), yv))
                row["val_mse"] = val
                if val < best[0]:
                    best = (val, epoch, {k: v.clone() for k, v in head.state_dict().items()})
            history.append(row)
        if best[2] is not None:
            head.load_state_dict(best[2])
    head.meta["history"] = history
    head.meta["best_epoch"] = best[1] if has_val else cfg.epochs - 1
    return head.eval()


@dataclass(frozen=True)
class HeadComparison:
    """Level-word score vs regression on the same held-out images.

    Attributes:
        layer: The layer the head and the ridge read.
        eval_split: Which images were scored (a split name, or ``"held-out photos"``).
        n_train: Training samples.
        n_val: Validation samples (epoch choice).
        n_eval: Scored samples.
        metrics: ``{"level_word" | "mlp_head" | "ridge": {"srcc", "plcc", "plcc_fitted"}}`` (level_word
            absent without the lens).
        predictions: Name -> ``[eval sample]`` predicted scores.
        eval_ids: The scored samples.
    """

    layer: int
    eval_split: str
    n_train: int
    n_val: int
    n_eval: int
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    eval_ids: tuple[str, ...] = ()

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """JSON-ready dict."""
        out = {
            "layer": self.layer,
            "eval_split": self.eval_split,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_eval": self.n_eval,
            "metrics": self.metrics,
        }
        if per_sample:
            out["per_sample"] = [
                {"id": i, **{k: float(v[j]) for k, v in self.predictions.items()}}
                for j, i in enumerate(self.eval_ids)
            ]
        return out


def _scorer_metrics(pred: np.ndarray, mos: np.ndarray) -> dict[str, float]:
    from mechbiqa.metrics import iqa_metrics

    m = iqa_metrics(pred, mos, on_invalid="flag")
    return {"srcc": m.srcc, "plcc": m.plcc_raw, "plcc_fitted": m.plcc_fitted}


def compare_scorers(
    hidden: np.ndarray,
    mos: Sequence[float] | np.ndarray,
    groups: Sequence[Any] | np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    layer: int,
    val: np.ndarray | None = None,
    level_word_scores: np.ndarray | None = None,
    head_cfg: ScoreHeadConfig = ScoreHeadConfig(),
    ridge_cfg: RidgeConfig = RidgeConfig(),
    ids: Sequence[str] | None = None,
    eval_name: str = "test",
    device: str | torch.device | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[HeadComparison, ScoreHead]:
    """Train the MLP head (and a ridge probe) on ``train``; score both and the level-word score on ``test``.

    Args:
        hidden: ``[sample, d_model]`` one layer's state at the quality position.
        mos: ``[sample]`` 0-1 labels.
        groups: ``[sample]`` reference photos (the ridge penalty is chosen by photo-grouped CV on ``train``).
        train: Boolean mask of the training samples.
        test: Boolean mask of the scored samples (other photos than ``train``).
        layer: The layer ``hidden`` comes from.
        val: Boolean mask of the samples that choose the head's epoch (optional).
        level_word_scores: ``[sample]`` Q-Align scores of the model's own answer (optional).
        head_cfg: The head's settings.
        ridge_cfg: The penalty grid.
        ids: Sample ids (kept for the per-sample predictions).
        eval_name: Name of the scored set (a split name).
        device: Where the ridge algebra runs.
        meta: Saved with the head.

    Returns:
        The `HeadComparison` and the trained `ScoreHead`.
    """
    x = np.asarray(hidden)
    y = np.asarray(mos, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    train, test = np.asarray(train, dtype=bool), np.asarray(test, dtype=bool)
    val = np.zeros_like(train) if val is None else np.asarray(val, dtype=bool)
    if set(groups[train]) & set(groups[test]):
        raise ValueError(
            "the training and scored samples share reference photos; score held-out photos "
            "(split by photo) so the comparison measures generalisation to new content"
        )
    head = train_score_head(
        x[train],
        y[train],
        head_cfg,
        layer=layer,
        val_hidden=x[val] if val.any() else None,
        val_mos=y[val] if val.any() else None,
        meta=meta,
    )
    if len(np.unique(groups[train])) >= 2:
        alpha = choose_alpha(x[train], y[train], groups[train], ridge_cfg, device=device)
    else:
        alpha = 1.0  # one training photo: no grouped CV possible; a mid-grid penalty
    predictions = {
        "mlp_head": head.predict(x[test]),
        "ridge": ridge_predictions(x[train], y[train], x[test], [alpha], device=device)[0],
    }
    if level_word_scores is not None:
        predictions = {"level_word": np.asarray(level_word_scores, dtype=np.float64)[test], **predictions}
    metrics = {k: _scorer_metrics(v, y[test]) for k, v in predictions.items()}
    head.meta.update(metrics=metrics, ridge_alpha=alpha)
    eval_ids = tuple(np.asarray(ids)[test].tolist()) if ids is not None else ()
    return HeadComparison(
        layer=layer,
        eval_split=eval_name,
        n_train=int(train.sum()),
        n_val=int(val.sum()),
        n_eval=int(test.sum()),
        metrics=metrics,
        predictions=predictions,
        eval_ids=eval_ids,
    ), head


# --------------------------------------------------------------------------- the head at inference
@torch.no_grad()
def quality_states(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None,
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """``[prompt, layer, d_model]`` residual after each block at each prompt's last (quality) position.

    What the store holds as ``llm.blocks.{l}.hook_resid_post@quality``, computed live (one
    `mechbiqa.analysis.capture.capture_quality` call): for a score head at inference, or a few
    prompts without a store.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        prompts: Prompts that end right before the level word (``EncodedPrompt.quality_index``
            is the last id), as the store's prompt did.
        pixels: ``[image, 3, S, S]``, one per prompt with an image, in order; None for text only.
        layers: The blocks to read (default: all).
        batch_size: Prompts per forward.
    """
    from mechbiqa.analysis.capture import capture_quality

    captured = capture_quality(model, prompts, pixels, tokenizer.pad_id, layers=layers, batch_size=batch_size)
    return captured.resid


def quality_hidden(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None,
    layer: int,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """``[prompt, d_model]``: `quality_states` of one layer (what a `ScoreHead` reads)."""
    return quality_states(model, tokenizer, prompts, pixels, [layer], batch_size=batch_size)[:, 0]


def head_scores(
    head: ScoreHead,
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None,
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Score images with a trained head: one forward per batch, the head on its layer's quality state.

    Args:
        head: A trained `ScoreHead`.
        model: The model whose store it was trained on.
        tokenizer: Its tokenizer.
        prompts: Scoring prompts (e.g. ``[r.prompt for r in rater.rate(images)]``, or the store's prompt).
        pixels: ``[image, 3, S, S]``, one per prompt with an image, in order.
        batch_size: Prompts per forward.

    Returns:
        ``[prompt]`` predicted MOS (0-1).
    """
    return head.predict(quality_hidden(model, tokenizer, prompts, pixels, head.layer, batch_size=batch_size))
