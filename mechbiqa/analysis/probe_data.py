"""Probes of one activation store: what is read from it, and the analysis of a probes run.

Where it sits: `mechbiqa.analysis.probes` holds the estimators (ridge probes per
layer with folds by reference photo, the lens' score curve, the MLP score head and
its comparison with the level words); this module reads their inputs from a store
(`data_from_store`, or a rater's own prompts recorded first: `data_from_rater`) and
runs them together (`analyse_probes` with a `ProbeRun`). ``studies/probes.py`` and
the main job (``studies/replicate.py``) both call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa.analysis.probes import (
    HeadComparison,
    ProbeCurve,
    RidgeConfig,
    ScoreHead,
    ScoreHeadConfig,
    compare_scorers,
    group_folds,
    lens_score_curve,
    probe_layers,
)
from mechbiqa.model.prompts import LEVEL_WEIGHTS
from mechbiqa.sources import load_lens, stored_model
from mechbiqa.store import CacheSpec
from mechbiqa_hooks import names

__all__ = ["RESID", "ProbeData", "ProbeRun", "ProbeAnalysis", "photo_of", "data_from_store",
           "data_from_rater", "split_masks", "compare_heads", "analyse_probes"]

RESID = names.resid_post(names.EACH)
_QALIGN = np.asarray(LEVEL_WEIGHTS)


@dataclass(frozen=True)
class ProbeRun:
    """How a probes run fits (the ``studies/probes.py`` options of the same names).

    Attributes:
        ridge: The ridge probes' penalty grid and photo folds (`RidgeConfig`).
        n_shuffles: Shuffled-label fits per layer (the chance curve); 0: none.
        head: The score head and its training (`ScoreHeadConfig`).
        train_split: Records of this split train the head.
        val_split: ... choose its epoch (none present: the last epoch).
        eval_split: ... score it against the level-word score.
        seed: Seeds the shuffles.
        device: Where the ridge algebra and the head run.
    """

    ridge: RidgeConfig = RidgeConfig()
    n_shuffles: int = 1
    head: ScoreHeadConfig = ScoreHeadConfig()
    train_split: str = "train"
    val_split: str = "val"
    eval_split: str = "test"
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class ProbeData:
    """What the study reads: from a store (`data_from_store`) or arrays a caller passes in.

    Attributes:
        resid: ``[sample, layer, d_model]`` residual at the quality position per layer.
        mos: ``[sample]`` 0-1 labels (finite).
        groups: ``[sample]`` reference photo of each sample.
        splits: Split of each sample (``train``/``val``/``test``, or None).
        ids: Sample ids.
        layers: Layer number of each index of the layer axis.
        lens_probs: ``[layer, sample, 5]`` level-word probabilities of the logit lens, or None.
        lens_agreement: ``[layer]`` share of samples whose lens answer equals the final one, or None.
        lens_settle: Median layer at which the lens answer settles, or None.
        source: Where it came from (store path, model).
    """

    resid: np.ndarray
    mos: np.ndarray
    groups: np.ndarray
    splits: tuple[str | None, ...]
    ids: tuple[str, ...]
    layers: tuple[int, ...]
    lens_probs: np.ndarray | None = None
    lens_agreement: np.ndarray | None = None
    lens_settle: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        """Check that every array has one entry per sample."""
        n = len(self.mos)
        if self.resid.ndim != 3 or self.resid.shape[0] != n or self.resid.shape[1] != len(self.layers):
            raise ValueError(
                f"ProbeData.resid must be [sample={n}, layer={len(self.layers)}, d_model]; got "
                f"{self.resid.shape}"
            )
        if len(self.groups) != n or len(self.splits) != n or len(self.ids) != n:
            raise ValueError("ProbeData: mos, groups, splits and ids must have one entry per sample")
        if not np.isfinite(self.mos).all():
            raise ValueError("ProbeData.mos holds NaN: drop unrated samples first")
        if self.lens_probs is not None and self.lens_probs.shape[:2] != (len(self.layers), n):
            raise ValueError(f"ProbeData.lens_probs must be [layer, sample, 5]; got {self.lens_probs.shape}")


@dataclass(frozen=True)
class ProbeAnalysis:
    """Probe and lens curves and the score-head comparison of one `ProbeData` (`analyse_probes`).

    Attributes:
        curve: The ridge `ProbeCurve`.
        lens_srcc: ``[layer]`` SRCC of the logit-lens Q-Align score in the same folds, or None.
        lens_agreement: ``[layer]`` share of lens answers equal to the final answer, or None.
        lens_settle: Median settle layer of the lens, or None.
        comparison: The `HeadComparison`.
        head: The trained `ScoreHead`.
        source: What was read.
        files: Artefact name -> path.
    """

    curve: ProbeCurve
    lens_srcc: np.ndarray | None
    lens_agreement: np.ndarray | None
    lens_settle: float | None
    comparison: HeadComparison
    head: ScoreHead
    source: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what the comparison report prints and the summary JSON keeps)."""
        return {
            "layers": self.curve.layers.tolist(),
            "probe_srcc": self.curve.srcc.tolist(),
            "probe_control_srcc": None
            if self.curve.control_srcc is None
            else self.curve.control_srcc.tolist(),
            "lens_srcc": None if self.lens_srcc is None else self.lens_srcc.tolist(),
            "lens_agreement": None if self.lens_agreement is None else self.lens_agreement.tolist(),
            "probe_best_layer": self.curve.best_layer,
            "probe_decodable_layer": self.curve.decodable_layer(),
            "lens_settle_median": self.lens_settle,
            "score_head": self.comparison.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything JSON-ready (curves in full, per-sample head predictions)."""
        return {
            "source": self.source,
            "summary": self.summary(),
            "probe_curve": self.curve.to_dict(),
            "score_head": self.comparison.to_dict(per_sample=True),
            "head_history": self.head.meta.get("history", []),
        }


# ----------------------------------------------------------------------------- reading a store
def photo_of(record: dict[str, Any]) -> str:
    """The reference photo of a stored record: ``meta.photo``, else ``ref_id``, else the sample id.

    Research choice: the benchmark cuts several crops from each photo (``ref_id`` is the crop);
    crops share content, so folds and splits group them by photo.
    """
    meta = record.get("meta") or {}
    return str(meta.get("photo") or record.get("ref_id") or record.get("id"))


def data_from_store(
    store_path: str | Path, model: str | None = None, *, lens: bool = True, read_out: Any = None
) -> ProbeData:
    """Read residuals, labels, photos and splits from a store, and the lens when asked for.

    Samples without a quality position or a label are left out (the lens keeps the same ones).

    Args:
        store_path: The store.
        model: Checkpoint directory of the lens; None: the model the store names.
        lens: Compute the logit-lens curves (`mechbiqa.analysis.lens.lens_from_store`).
        read_out: ``(Lens, tokenizer)`` to use instead of loading ``model`` (a model already in
            memory; the lens still has to reproduce the store's logits at the last layer).

    Raises:
        LookupError: The store lacks ``llm.blocks.{l}.hook_resid_post`` at ``quality``.
        ValueError: Fewer than 3 labelled samples.
    """
    from mechbiqa.store import ActivationStore

    with ActivationStore.open(store_path) as store:
        try:
            spec = store.spec_of(RESID, "quality")
        except KeyError as error:
            raise LookupError(
                f"the probes need {RESID} at the quality position; {store.path} lacks it "
                f"({error.args[0]}): record it with studies/cache_activations.py --spec default"
            ) from None
        rows = store.valid[store.counts("quality") > 0]
        labels = store.labels(rows)
        keep = rows[np.isfinite(labels)]
        if len(keep) < 3:
            raise ValueError(
                f"{store.path} has {len(keep)} labelled samples with a quality position; the probes "
                "need labelled images (record a data set with ratings)"
            )
        records = store.records(keep)
        resid = store.get(RESID, "quality", samples=keep)[:, :, 0].astype(np.float32)
        ids = tuple(store.ids(keep))
        source = str(store.path)
        lens_probs = agreement = settle = None
        if lens:
            from mechbiqa.analysis.lens import lens_from_store
            from mechbiqa.scoring import level_ids

            name = model or stored_model(store)
            if read_out is None:
                read_out = load_lens(name)
            lens_map, tokenizer = read_out
            result = lens_from_store(store, lens_map, level_ids(tokenizer))
            index = {s: i for i, s in enumerate(result.sample_ids)}
            order = [index[i] for i in ids]
            lens_probs = np.asarray(result.level_probs)[:, order]
            agreement = (np.asarray(result.answer)[:, order] == np.asarray(result.final)[order]).mean(1)
            settle = float(np.median(np.asarray(result.settle)[order]))
            source += f" (lens: {name})"
    return ProbeData(
        resid=resid,
        mos=labels[np.isfinite(labels)].astype(np.float64),
        groups=np.asarray([photo_of(r) for r in records]),
        splits=tuple(r.get("split") for r in records),
        ids=ids,
        layers=tuple(int(x) for x in spec.layers),
        lens_probs=lens_probs,
        lens_agreement=agreement,
        lens_settle=settle,
        source=source,
    )


def data_from_rater(
    rater: Any,
    records: Sequence[Any],
    *,
    store: str | Path | None = None,
    batch_size: int = 32,
    source: str = "",
) -> ProbeData:
    """Record a rater's own scoring prompts into a store, then read it like any other (`data_from_store`).

    Each image is described and rated by the rater (`mechbiqa.pipeline`); its scoring prompt
    (one-stage: image + own description + "The quality of the image is"; two-stage: the
    stage-2 text-only prompt) is recorded with every layer's residual at the quality position
    (`mechbiqa.analysis.capture.record_rater`), and the logit lens of the same model reads the
    same states.

    Args:
        rater: A `OneStageRater` or `TwoStageRater`.
        records: Rated records (`IQARecord`s with ``mos01``; unrated ones are left out).
        store: Where the store goes; None: a temporary file, deleted after reading.
        batch_size: Images per forward.
        source: Recorded in the result.
    """
    import tempfile

    from mechbiqa.analysis.capture import record_rater, scoring_components
    from mechbiqa.analysis.lens import LogitLens

    records = [r for r in records if getattr(r, "mos01", None) is not None]
    if len(records) < 3:
        raise ValueError(f"{len(records)} rated records; the probes need images with ratings")
    reader = scoring_components(rater)  # the model whose quality position is read
    read_out = (LogitLens.from_model(reader.model), reader.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(store) if store is not None else Path(tmp) / "rated.h5"
        spec = CacheSpec.parse(f"{RESID}@quality; {names.LOGITS}@quality", dtype="float32")
        record_rater(
            rater, records, path, spec, batch_size=batch_size, rate_batch_size=batch_size, overwrite=True
        )
        data = data_from_store(path, str(reader.path), read_out=read_out)
    return replace(data, source=source or f"{path} ({type(rater).__name__})")


def split_masks(data: ProbeData, cfg: ProbeRun) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Train / val / eval masks from the records' splits, else a quarter of the photos held out."""
    splits = np.asarray([s or "" for s in data.splits])
    train, val, test = (splits == cfg.train_split), (splits == cfg.val_split), (splits == cfg.eval_split)
    if train.sum() >= 2 and test.sum() >= 3:
        return train, val, test, cfg.eval_split
    n_folds = min(4, len(np.unique(data.groups.astype(str))))
    if n_folds < 2:
        raise ValueError(
            "the score head needs held-out photos: the store has no train/test splits and a "
            "single reference photo; record a data set with splits or several photos"
        )
    _, held = group_folds(data.groups, n_folds)[0]
    test = np.isin(np.arange(len(splits)), held)
    return ~test, np.zeros_like(test), test, "held-out photos"


def compare_heads(data: ProbeData, cfg: ProbeRun) -> tuple[HeadComparison, ScoreHead]:
    """The score-head comparison: `compare_scorers` on the configured layer and splits."""
    layer = data.layers[-1] if cfg.head.layer is None else cfg.head.layer
    if layer not in data.layers:
        raise ValueError(f"--head-layer {layer} is not stored; stored layers: {list(data.layers)}")
    train, val, test, name = split_masks(data, cfg)
    # The last layer's lens is the model's own read-out: its Q-Align score is the level-word score.
    level_word = None if data.lens_probs is None else data.lens_probs[-1] @ _QALIGN
    return compare_scorers(
        data.resid[:, data.layers.index(layer)],
        data.mos,
        data.groups,
        train,
        test,
        layer=layer,
        val=val,
        level_word_scores=level_word,
        head_cfg=cfg.head,
        ridge_cfg=cfg.ridge,
        ids=data.ids,
        eval_name=name,
        device=cfg.device,
        meta={"source": data.source, "train_split": cfg.train_split, "val_split": cfg.val_split},
    )


def analyse_probes(data: ProbeData, cfg: ProbeRun) -> ProbeAnalysis:
    """Probe curve, lens curve and head comparison of already-read data (no files written)."""
    curve = probe_layers(
        data.resid,
        data.mos,
        data.groups,
        cfg.ridge,
        layers=data.layers,
        n_shuffles=cfg.n_shuffles,
        seed=cfg.seed,
        device=cfg.device,
    )
    lens_srcc = None
    if data.lens_probs is not None:
        lens_srcc = lens_score_curve(data.lens_probs, data.mos, data.groups, cfg.ridge.n_splits)
    comparison, head = compare_heads(data, cfg)
    return ProbeAnalysis(
        curve=curve,
        lens_srcc=lens_srcc,
        lens_agreement=data.lens_agreement,
        lens_settle=data.lens_settle,
        comparison=comparison,
        head=head,
        source=data.source,
    )


def data_from_checkpoint(
    checkpoint: str,
    dataset: str,
    store: Path,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    max_new_tokens: int = 48,
) -> ProbeData:
    """`data_from_rater` for a checkpoint directory (one-stage, two-stage pair or real) over a data set.

    The checkpoint and records load as in every study (`mechbiqa.sources`); the store is written at
    ``store`` and named, with the checkpoint, as the data's source.
    """
    from mechbiqa.sources import load_raters, load_samples

    raters = load_raters((checkpoint,), dtype=dtype, device=device, max_new_tokens=max_new_tokens)
    ((rater, path),) = raters.values()
    records = load_samples(dataset, None, limit)
    return data_from_rater(
        rater, records, store=store, batch_size=batch_size, source=f"{store} (recorded from {path})"
    )
