"""The main job's analyses of one checkpoint, each with the per-image values its findings test.

The main job (``studies/replicate.py``) rates the same images with two checkpoints and
records each rating's own scoring prompt into one activation store per checkpoint
(`rated_store`); `analyse_store` then reads the logit lens, the attention attribution and
the probes off that store without another forward pass, and hands over the summary
numbers with the per-image values the findings test (`mechbiqa.analysis.findings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa import figures, outputs
from mechbiqa.analysis.attribution import attribute_store
from mechbiqa.analysis.capture import record_rater, scoring_components
from mechbiqa.analysis.dla import DLA_HEADS_SPEC, DLA_SPEC
from mechbiqa.analysis.grounding import grounding, rate_paths
from mechbiqa.analysis.instability import (
    InstabilityResult,
    SamplingConfig,
    sample_checkpoint,
    summarise_instability,
)
from mechbiqa.analysis.lens import LogitLens, lens_from_store
from mechbiqa.analysis.patching import SweepResult, patch_image_tokens
from mechbiqa.analysis.per_image import instability_per_image, non_image_share, patching_per_image
from mechbiqa.analysis.probe_data import ProbeRun, analyse_probes, data_from_store
from mechbiqa.analysis.probes import RidgeConfig, ScoreHeadConfig
from mechbiqa.analysis.rouge import rouge1
from mechbiqa.checkpoint import Checkpoint
from mechbiqa.metrics import iqa_metrics
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.pipeline import OneStageRater, TwoStageRater
from mechbiqa.scoring import level_ids
from mechbiqa.store import ActivationStore, CacheSpec, StoreError
from mechbiqa.store.spec import PRESETS

__all__ = ["STORE_SPEC", "STORE_SPEC_HEADS", "ProbeSettings", "rated_store", "analyse_store", "probe_section",
           "patching_summary", "sampled_instability", "image_token_patching", "grounding_per_image",
           "instability_section", "rating_summary", "lens_read_out"]


def _with_default(sites: str) -> str:
    """``"default; <sites>"`` without the sites the default preset already holds (a spec names each once)."""
    held = {site.key for site in PRESETS["default"]}
    items = [item.strip() for item in sites.split(";")]
    return "; ".join(["default", *(item for item in items if item.split(":")[0] not in held)])


STORE_SPEC = _with_default(DLA_SPEC)
"""What the main job's stores record (`CacheSpec.parse` text): the default preset (logit lens,
attention attribution, probes) and `DLA_SPEC` (direct logit attribution and its split by source
role). The split's ``hook_v@all`` is the large part (~100 MB per sample in float32 for a 7B model
with a 200-token prompt); `STORE_SPEC_HEADS` keeps the per-head parts only."""
STORE_SPEC_HEADS = _with_default(DLA_HEADS_SPEC)
"""The default preset and `DLA_HEADS_SPEC`: direct logit attribution by head, no split by source."""


@dataclass(frozen=True)
class ProbeSettings:
    """The probes of a store.

    Attributes:
        splits: Outer folds (by reference photo) of the ridge probes, at most one per photo.
        shuffles: Shuffled-label fits per layer (the probes' chance curve).
        head_epochs: Training epochs of the MLP score head.
        device: Where the ridge algebra and the head run.
    """

    splits: int = 5
    shuffles: int = 1
    head_epochs: int = 200
    device: str = "cpu"


def rated_store(rater: OneStageRater | TwoStageRater, records: Sequence[Any], path: Path,
                store_dtype: str = "float32", spec: str = STORE_SPEC) -> Path:
    """The checkpoint's store of ``records``: reused when finished for the same model and images.

    Otherwise the images are rated and their scoring prompts recorded; an interrupted store
    (``.partial``) resumes when the ratings give the same prompts, and a store made by another
    model, other images or an older schema is recorded again.

    Args:
        rater: The checkpoint's rater; its scoring model is recorded.
        records: The images (`IQARecord`s).
        path: The store.
        store_dtype: Activation dtype.
        spec: What to record (`CacheSpec.parse` text; default `STORE_SPEC`).
    """
    from mechbiqa_hooks.record import model_identity

    model = scoring_components(rater).model
    cache_spec = CacheSpec.parse(spec, store_dtype)
    try:
        with ActivationStore.open(path) as store:
            store.check_identity(model_identity(model))
            same = store.ids("all") == [str(r.id) for r in records] and store.info.spec == cache_spec
            if store.complete and same:
                return path
    except (FileNotFoundError, StoreError):
        pass
    try:
        return record_rater(rater, records, path, cache_spec).path
    except StoreError:  # another model, images, spec or schema: start again
        return record_rater(rater, records, path, cache_spec, overwrite=True).path


def analyse_store(path: Path, rater: OneStageRater | TwoStageRater, probes: ProbeSettings, out: Path
                  ) -> dict[str, Any]:
    """Logit lens, attention attribution and probes of one checkpoint's store (offline: no forward pass).

    The lens reads the scoring model's final norm and lm_head, and must reproduce the logits
    the store holds at the last layer. The figures go beside the store (``<stem>.lens.png``,
    ``<stem>.attention.png``); the probes' files into ``out``.

    Returns:
        Summary numbers (mean, spread) for the report, and ``per_image`` blocks ``{"ids": [...],
        quantity: [...]}``: the store's scores and labels, the lens' answer changes and settle
        layers, the description's share of the non-image attention (`mechbiqa.analysis.per_image`).
    """
    parts = scoring_components(rater)
    lens_map = LogitLens.from_model(parts.model)
    with ActivationStore.open(path) as store:
        lens = lens_from_store(store, lens_map, level_ids(parts.tokenizer), tokenizer=parts.tokenizer)
        # the two-stage store is text only: its role masses are measured, its image tokens are none
        attr = attribute_store(store, k=5, require_image=False)
        rows = store.valid[store.counts("quality") > 0]
        has_image = bool((store.n_images(rows) > 0).any())
        scores = [r["rating"]["score"] for r in store.records(rows)]
        mos = store.labels(rows).tolist()
        ids = store.ids(rows)
    # figures beside the store: <mode>.lens.png, <mode>.attention.png (only where image tokens exist)
    figures.lens_trajectories(lens, path.with_suffix(".lens.png"), title=f"Logit lens ({path.stem})")
    if has_image:
        figures.attention_heatmap(attr, path.with_suffix(".attention.png"),
                                  title=f"Attention of the quality position ({path.stem})")
    share = non_image_share(attr.mass_per_sample, attr.role_labels)  # [sample]
    last = attr.mass[-1].mean(0)  # [role], last layer, mean over heads
    overall = attr.mass.mean((0, 1))  # mean over layers and heads
    role = {label: i for i, label in enumerate(attr.role_labels)}
    return {
        "store": str(path), "scores": scores, "mos": mos,
        "lens_changes": (float(lens.n_changes.mean()), float(lens.n_changes.std())),
        "lens_settle": (float(lens.settle.mean()), float(lens.settle.std())),
        "lens_agreement": lens.agreement.tolist(),
        "lens_last_layer_error": lens.last_layer_error,
        "image_mass": (float(overall[role["image"]]),
                       float(attr.mass_per_sample[..., role["image"]].mean(1).std())),
        "description_mass": (float(overall[role["description"]]),
                             float(attr.mass_per_sample[..., role["description"]].mean(1).std())),
        "description_share": (float(np.nanmean(share)), float(np.nanstd(share))) if np.isfinite(share).any()
        else None,
        "image_mass_last_layer": float(last[role["image"]]),
        "description_mass_last_layer": float(last[role["description"]]),
        "top5_share": (float(attr.top_share.mean()), float(attr.top_share.std())) if has_image else None,
        "top5_jaccard": (attr.jaccard, attr.jaccard_chance) if has_image else None,
        "top5_consensus": attr.consensus.tolist() if has_image else None,
        "probes": probe_section(path, (lens_map, parts.tokenizer), str(parts.path), probes, out),
        "per_image": {
            "store": {"ids": ids, "score": scores, "mos": mos},
            "lens": {"ids": list(lens.sample_ids), "changes": lens.n_changes, "settle": lens.settle},
            "attention": {"ids": list(attr.sample_ids),
                          "description_share": share},
        },
    }


def probe_section(path: Path, read_out: Any, model: str, cfg: ProbeSettings, out: Path) -> dict[str, Any]:
    """The probes of a store (`analyse_probes`): probe and lens curves per layer, MLP head vs level words.

    Research choice: folds group the crops of one reference photo; with fewer than 3 photos
    among the stored images (the tiny benchmark) there is nothing to hold out by photo, and
    each image is its own group (the JSON says which: ``grouping``).
    """
    data = data_from_store(path, model, read_out=read_out)
    grouping = "photo"
    if len(np.unique(data.groups.astype(str))) < 3:
        data, grouping = replace(data, groups=np.asarray(data.ids)), "image (fewer than 3 photos)"
    n_groups = len(np.unique(data.groups.astype(str)))
    if n_groups < 3:
        return {"skipped": f"{n_groups} labelled images: the probes need at least 3"}
    ridge = RidgeConfig(n_splits=min(cfg.splits, n_groups), inner_splits=min(3, n_groups - 1))
    result = analyse_probes(data, ProbeRun(ridge=ridge, n_shuffles=cfg.shuffles, device=cfg.device,
                                           head=ScoreHeadConfig(epochs=cfg.head_epochs)))
    files = {"json": outputs.write_json(out / "probes.json", result.to_dict()),
             "head": result.head.save(out / "score_head")}
    probs = np.asarray(data.lens_probs)  # [layer, sample, level]
    final = probs[-1].argmax(-1)
    head = result.comparison
    mos = dict(zip(map(str, data.ids), np.asarray(data.mos, dtype=float), strict=True))
    return result.summary() | {
        "per_image": {"ids": list(head.eval_ids), "mos": [mos[str(i)] for i in head.eval_ids],
                      **{k: np.asarray(v, dtype=float) for k, v in head.predictions.items()}},
        "grouping": grouping, "n_groups": n_groups, "n_samples": len(data.ids),
        "lens_level_probs": probs.mean(1).tolist(),  # [layer, level] excellent .. bad
        "lens_final_prob": np.take_along_axis(probs, final[None, :, None], 2)[..., 0].mean(1).tolist(),
        "files": {k: str(v) for k, v in files.items()},
    }


def patching_summary(sweep: SweepResult) -> dict[str, Any]:
    """Mean |change of the Q-Align score| and flip rate per selection, over layers, sites and setters."""
    out = {}
    for selection in sorted({t["selection"] for t in sweep.tags}):
        rows = [i for i, t in enumerate(sweep.tags) if t["selection"] == selection]
        effect = np.abs(sweep.score_effect[rows])
        flips = sweep.flipped[rows]
        out[selection] = {"abs_score_effect": (float(effect.mean()), float(effect.std())),
                          "flip_rate": float(flips.mean())}
    return out


def sampled_instability(checkpoint: Checkpoint, records: list) -> InstabilityResult:
    """5 sampled answers x 3 seeded sessions per image (`sample_checkpoint`), their levels summarised."""
    sampling = SamplingConfig(max_new_tokens=64)
    sampled = sample_checkpoint(checkpoint, [r.image_path for r in records], sampling, batch_images=8)
    labels = [LEVEL_WORDS.index(r.level_word) if getattr(r, "level_word", None) in LEVEL_WORDS else -1
              for r in records]
    return summarise_instability(sampled.levels, np.array(labels), sampling.seeds)


def image_token_patching(checkpoint: Checkpoint, records: list, out: Path
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ablating 5 dominant / random / least-attended image tokens (`patch_image_tokens`)."""
    sweep = patch_image_tokens(checkpoint, [r.image_path for r in records], k=5, batch_size=64).sweep
    figures.patching_effects(sweep, out / "patching.png", selections=("dominant", "random", "least", "all"))
    per_image = {s: patching_per_image(sweep.score_effect, sweep.tags, s) for s in ("dominant", "random")}
    return patching_summary(sweep), {"ids": [str(r.id) for r in records], **per_image}


def grounding_per_image(rater: Any, records: list, references: Sequence[Sequence[str]] | None = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Image path vs own-description path (`rate_paths`, `grounding`), ROUGE-1: summary, per-image flags.

    ``references``: per record its reference descriptions (`mechbiqa.analysis.rouge.references_with`: the
    benchmark's and a user's annotations; the best-matching one counts); None: each record's description.
    """
    ids = [str(r.id) for r in records]
    with torch.no_grad():
        paths = rate_paths(rater, Checkpoint.from_rater(rater).processor([r.image_path for r in records]),
                           batch_size=32)
    mos = [getattr(r, "mos01", None) for r in records]
    g = grounding(paths.image_probs, paths.text_probs, paths.descriptions, final_levels=paths.final_levels,
                  ids=ids, mos=None if None in mos else np.asarray(mos, dtype=float))
    refs = [getattr(r, "description", None) for r in records] if references is None else list(references)
    rouge = rouge1(list(paths.descriptions), refs, ids=ids) if all(refs) else None
    summary = g.summary() | {"mode": paths.mode, "rouge1_f1": None if rouge is None else rouge.mean_f1}
    return summary, {"ids": ids, "contradiction": np.asarray(g.contradiction, dtype=float)}


def instability_section(checkpoint: Checkpoint, records: list, label: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """Sampled instability (`sampled_instability`): summary (mean, std over sessions) and per-image values.

    Args:
        checkpoint: The opened checkpoint.
        records: The images.
        label: The checkpoint's name in the paper's Table 1 layout.

    Returns:
        ``{"instability", "accuracy", "sessions", "table1"}`` (``table1``: its row of the paper's
        Table 1, `mechbiqa.analysis.paper_figures.table1_rows`) and the per-image block ``{"ids",
        "instability", "accuracy", ...}`` (`mechbiqa.analysis.per_image.instability_per_image`).
    """
    from mechbiqa.analysis.paper_figures import table1_rows

    inst = sampled_instability(checkpoint, records)
    summary = {"instability": inst.ratio_mean_std, "accuracy": inst.accuracy_mean_std, "sessions": len(inst.ratio),
               "table1": table1_rows({label: inst})[0].to_dict()}
    per_image = instability_per_image(inst.levels, inst.label_levels, inst.unstable)
    return summary, {"ids": [str(r.id) for r in records], **per_image}


def rating_summary(scores: Sequence[float], mos: Sequence[float], held_out: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """SRCC, PLCC and level accuracy of a checkpoint: on its whole held-out test split where measured, else here.

    Args:
        scores: The checkpoint's Q-Align scores of the analysed images.
        mos: Their labels.
        held_out: The checkpoint's test metrics over the whole test split (`mechbiqa.train.train_pair`'s
            entry), or None (a given checkpoint).

    Returns:
        ``srcc_subset`` (on these images), ``srcc``, ``plcc`` (raw) and ``level_acc`` (None unless measured).
    """
    subset = iqa_metrics(np.asarray(scores), np.asarray(mos), on_invalid="flag")
    held_out = held_out or {}
    return {"srcc_subset": subset.srcc, "srcc": held_out.get("srcc", subset.srcc),
            "plcc": held_out.get("plcc", subset.plcc_raw), "level_acc": held_out.get("level_acc")}


def lens_read_out(rater: Any) -> tuple[Any, Any]:
    """``(logit lens, tokenizer)`` of the model whose forward reads the quality word (a pair: stage 2).

    The lens shares the loaded model's final norm and unembedding, so figures drawn from a store need
    no second copy of the weights (`mechbiqa.analysis.paper_figures.paper_figures`'s ``read_out``).
    """
    from mechbiqa.analysis.capture import scoring_components
    from mechbiqa.analysis.lens import LogitLens

    parts = scoring_components(rater)
    return LogitLens.from_model(parts.model), parts.tokenizer
