"""The main job's attribution analyses of one checkpoint: who writes the decision, from where, and when.

Where it sits: the main job (``studies/replicate.py``) records one store per checkpoint with
`mechbiqa.analysis.replication.rated_store` (its spec, `~mechbiqa.analysis.replication.STORE_SPEC`,
holds the sites of `mechbiqa.analysis.dla.DLA_SPEC`) and reads the logit lens, attention and probes
off it (`mechbiqa.analysis.replication.analyse_store`). `attribution_analysis` goes beyond attention
maps on the same store and checkpoint:

* **direct logit attribution** (`mechbiqa.analysis.dla`, offline): the decision at the quality
  position split into embedding, heads and MLPs, each head's write split by source role; the heads
  that carry it, and per image the share of the attention write that comes from each role;
* **tuned lens** (`mechbiqa.analysis.lens.TunedLens`, offline): translators trained on the store's
  quality-position residuals, cross-fitted over folds of images so that every image is read by a
  lens that never saw it; its trajectory and KL to the final distribution beside the logit lens's;
* **attribution patching** (`mechbiqa.analysis.attribution_patching`, live, only where the quality
  position reads an image): every image position x layer at once, checked against activation
  patching, and its top positions compared with the most attended ones.

It returns JSON-able metrics and per-image blocks ``{"ids": [...], quantity: [...]}`` that the
findings test (`image_vs_description`); `mechbiqa.reports_attribution` renders the metrics and
`mechbiqa.figures_attribution` draws the figures written under ``out_dir``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mechbiqa import figures_attribution as fa
from mechbiqa.analysis.attribution_patching import (
    Metric,
    activation_patching_grid,
    attribution_patching,
    compare_with_attention,
    correlation,
    farthest_reference,
    metric_of,
)
from mechbiqa.analysis.dla import SOURCE_ROLES, Direction, DLAResult, ReadoutWeights, dla_from_store
from mechbiqa.analysis.findings import Finding, decide, paired_permutation
from mechbiqa.analysis.lens import (
    RESID,
    LogitLens,
    TunedLensTraining,
    analyse_lens,
    kl_to_final,
    settle_layers,
    train_tuned_lens,
)
from mechbiqa.analysis.patching import Readout
from mechbiqa.model.roles import Role, batch_prompts
from mechbiqa.scoring import level_ids
from mechbiqa.sources import spread
from mechbiqa.store import ActivationStore

if TYPE_CHECKING:
    from mechbiqa.checkpoint import Checkpoint

__all__ = [
    "IMAGE_VS_DESCRIPTION",
    "IMAGE_VS_DESCRIPTION_CONTRAST",
    "LENS_TRAINING",
    "AttributionSettings",
    "attribution_analysis",
    "dla_section",
    "image_vs_description",
    "lens_section",
    "patching_section",
    "role_shares",
]

IMAGE_VS_DESCRIPTION = (
    "The one-stage quality decision is written more from image tokens than from the description "
    "(direct logit attribution)."
)
"""The claim `image_vs_description` decides."""
IMAGE_VS_DESCRIPTION_CONTRAST = "image share - description share of the attention write, same images"
"""What that finding's effect is the difference of (the judge's ``contrast``)."""

LENS_TRAINING = TunedLensTraining(steps=100, lr=1e-3, batch_size=None)
"""The tuned lens's default training: full-batch AdamW, 100 steps (seconds on the compact store)."""

_SHARED_ROLES = (Role.BOS, Role.INSTRUCTION, Role.IMAGE, Role.DESCRIPTION, Role.QUALITY)
"""The roles whose shares are reported (``other`` is kept in the denominator)."""


@dataclass(frozen=True)
class AttributionSettings:
    """How the attribution analyses of a checkpoint run.

    Attributes:
        direction: The decision direction of the direct logit attribution (`mechbiqa.analysis.dla`):
            ``score`` (the Q-Align weights centred: all five levels, the same for every image, and
            linear in the logits, so the parts sum to it exactly), ``logit_diff`` or ``score_gradient``.
        top_heads: Heads listed, by mean |contribution| over images.
        k: Image positions compared with the k most attended (the paper's five).
        n_patch: Images of the attribution patching (spread over the records given).
        metric: The attribution-patching metric (``logit_diff``: good - poor at the quality position,
            linear in the logits, as the patching study; or the Q-Align ``score``).
        sites: Patched sites (`mechbiqa.analysis.patching.SITES`).
        path_steps: Gradients averaged along the path from each image to its reference
            (`mechbiqa.analysis.attribution_patching.attribution_patching`'s ``steps``; 1: the plain
            first-order estimate at the clean run).
        qk_fix: Recompute the attention pattern of each patched key (AtP*'s QK fix,
            `mechbiqa.analysis.attribution_patching.attribution_patching`'s ``qk_fix``); False: the
            plain gradient x difference.
        resid_path: How a patched residual is estimated to reach the quality position
            (`mechbiqa.analysis.attribution_patching.attribution_patching`'s ``resid_path``: ``kv_sum``,
            through its own and every later layer's keys and values; ``gradient``).
        validate: Run the activation-patching grid as the check (one forward per site, layer and
            position; expensive for a 7B model: restrict ``validate_layers``).
        validate_layers: Layers of that check (None: every layer).
        chunk: Images per forward/backward of the estimate.
        batch_size: Rows per forward (rating, activation patching).
        lens_folds: Folds of images for the tuned lens (each image is read by the lens trained
            on the other folds).
        lens_training: The tuned lens's optimiser settings (`TunedLensTraining`; its ``holdout`` is
            not used: the folds are the hold-out).
        seed: Seed of the folds.
    """

    direction: Direction = "score"
    top_heads: int = 5
    k: int = 5
    n_patch: int = 8
    metric: Metric = "logit_diff"
    sites: tuple[str, ...] = ("resid", "kv")
    path_steps: int = 1
    qk_fix: bool = True
    resid_path: Literal["kv_sum", "gradient"] = "kv_sum"
    validate: bool = True
    validate_layers: tuple[int, ...] | None = None
    chunk: int = 8
    batch_size: int = 64
    lens_folds: int = 4
    lens_training: TunedLensTraining = field(default_factory=lambda: LENS_TRAINING)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings out of range (the message names them)."""
        if self.top_heads < 1 or self.k < 1 or self.chunk < 1 or self.batch_size < 1:
            raise ValueError(
                f"top_heads={self.top_heads}, k={self.k}, chunk={self.chunk}, batch_size={self.batch_size}: "
                "each must be at least 1"
            )
        if self.n_patch < 2 or self.lens_folds < 2:
            raise ValueError(
                f"n_patch={self.n_patch}, lens_folds={self.lens_folds}: patching needs 2 images (one is "
                "the other's reference) and cross-fitting 2 folds"
            )


# ----------------------------------------------------------------------------- direct logit attribution
def role_shares(by_role: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each role's net write and its share of the attention write, per sample.

    Research choice: a role's write is its net contribution summed over every layer and head
    (``W_r``, signed: heads that push the decision either way cancel, as they do in the residual);
    its share is ``|W_r| / sum_r' |W_r'|``, so shares are comparable between images whose
    decisions point in opposite directions.

    Args:
        by_role: ``[sample, layer, head, role]`` head contributions by source role (`SOURCE_ROLES`).

    Returns:
        ``write [sample, role]`` and ``share [sample, role]`` (NaN where every role writes 0).
    """
    write = np.asarray(by_role, dtype=float).sum((1, 2))
    total = np.abs(write).sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, np.abs(write) / total, np.nan)
    return write, share


def dla_section(
    store: ActivationStore, weights: ReadoutWeights, direction: Direction = "score", top_heads: int = 5
) -> tuple[dict[str, Any], dict[str, Any], DLAResult]:
    """Direct logit attribution of a store: summary, per-image role shares, and the result.

    Raises:
        LookupError: The store lacks the sites (`mechbiqa.analysis.dla.dla_from_store` names the fix).
    """
    result = dla_from_store(store, weights, direction)
    heads_abs = np.abs(result.heads).mean(0)  # [layer, head]
    order = np.argsort(-heads_abs, axis=None, kind="stable")[:top_heads]
    by_role_mean = None if result.by_role is None else result.by_role.mean(0)  # [layer, head, role]
    labels = [r.label for r in SOURCE_ROLES]
    heads = []
    for flat in order:
        layer, head = (int(x) for x in np.unravel_index(flat, heads_abs.shape))
        entry: dict[str, Any] = {
            "layer": int(result.layers[layer]),
            "head": head,
            "mean": float(result.heads[:, layer, head].mean()),
            "mean_abs": float(heads_abs[layer, head]),
            "share_of_head_writes": float(heads_abs[layer, head] / max(heads_abs.sum(), 1e-300)),
        }
        if by_role_mean is not None:
            entry["by_role"] = dict(zip(labels, by_role_mean[layer, head].tolist(), strict=True))
        heads.append(entry)
    metrics: dict[str, Any] = {
        "direction": result.direction,
        "n_images": len(result.sample_ids),
        "sum_error": result.sum_error,
        "split_error": result.split_error,
        "decision": (float(result.target.mean()), float(result.target.std())),
        "embed": float(result.embed.mean()),
        "attn_by_layer": result.attn.mean(0).tolist(),
        "mlp_by_layer": result.mlp.mean(0).tolist(),
        "attn_total": (float(result.attn.sum(1).mean()), float(result.attn.sum(1).std())),
        "mlp_total": (float(result.mlp.sum(1).mean()), float(result.mlp.sum(1).std())),
        "top_heads": heads,
        "roles": None,
    }
    per_image: dict[str, Any] = {"ids": list(result.sample_ids), "decision": result.target}
    if result.by_role is not None:
        write, share = role_shares(result.by_role)
        metrics["roles"] = {
            role.label: {
                "write": (float(write[:, i].mean()), float(write[:, i].std())),
                "share": (float(np.nanmean(share[:, i])), float(np.nanstd(share[:, i])))
                if np.isfinite(share[:, i]).any()
                else None,
            }
            for i, role in enumerate(SOURCE_ROLES)
            if role in _SHARED_ROLES
        }
        for i, role in enumerate(SOURCE_ROLES):
            if role in _SHARED_ROLES:
                per_image[f"{role.label}_share"] = share[:, i]
                per_image[f"{role.label}_write"] = write[:, i]
    return metrics, per_image, result


def image_vs_description(block: Mapping[str, Any] | None) -> Finding | None:
    """The finding "the one-stage decision is written more from image tokens than from the description".

    Paired sign-flip permutation test (`mechbiqa.analysis.findings.paired_permutation`) of
    ``image_share - description_share`` over the images of the one-stage checkpoint's ``dla``
    per-image block (`attribution_analysis`); held when the image share is larger at 5%.

    Returns:
        The `Finding`, or None when the block has no shares (a store without the split by source).
    """
    if not block or "image_share" not in block or "description_share" not in block:
        return None
    test = paired_permutation(
        block["description_share"], block["image_share"], units="share of the attention write"
    )
    return decide(IMAGE_VS_DESCRIPTION, test, "greater")


# ----------------------------------------------------------------------------- tuned lens
def _folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, min(folds, n)) if len(part)]


def lens_section(
    store: ActivationStore,
    base: LogitLens,
    ids: Sequence[int],
    folds: int = 4,
    training: TunedLensTraining = LENS_TRAINING,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Tuned lens cross-fitted over folds of the store's images, beside the logit lens.

    Each fold's images are read by a tuned lens trained on the other folds' quality-position
    residuals (`train_tuned_lens` with that fold held out), so every number is out of sample; the
    logit lens needs no training and reads every image.

    Returns:
        Summary (per layer: KL to the final distribution, agreement with the final answer,
        probability of the final answer, mean level probabilities; per lens), per-image answer
        changes and settle layers of the tuned lens, and ``{"tuned": [layer, level],
        "logit": ...}`` mean level probabilities (for the figure).
    """
    spec = store.spec_of(RESID, "quality")
    rows = store.valid[store.counts("quality") > 0]
    resid = torch.from_numpy(
        np.ascontiguousarray(store.get(RESID, "quality", samples=rows)[:, :, 0].transpose(1, 0, 2))
    ).float()  # [layer, sample, d_model]
    layers = [int(x) for x in spec.layers]
    n = resid.shape[1]
    if n < 2:
        raise ValueError(
            f"{store.path}: the tuned lens needs at least 2 images with a quality position; got {n}"
        )
    sample_ids = store.ids(rows)
    logit = analyse_lens(base, resid, ids, layers, sample_ids=sample_ids)
    kl_logit = kl_to_final(base, resid, layers)
    probs = np.zeros_like(logit.level_probs)  # [layer, sample, level]
    kl_tuned = np.zeros(len(layers))
    start = time.perf_counter()
    parts = _folds(n, folds, seed)
    for held in parts:
        fit = train_tuned_lens(base, resid, layers, training, heldout=held)
        part = resid[:, torch.from_numpy(held)]
        probs[:, held] = analyse_lens(fit.lens, part, ids, layers).level_probs
        kl_tuned += kl_to_final(fit.lens, part, layers) * len(held) / n
    seconds = time.perf_counter() - start
    answer = probs.argmax(-1)
    settle, changes = settle_layers(answer, np.asarray(layers))
    final = logit.final  # the last layer is the model's own read-out for both lenses
    p_final = {
        "logit": np.take_along_axis(logit.level_probs, final[None, :, None], 2)[..., 0].mean(1),
        "tuned": np.take_along_axis(probs, final[None, :, None], 2)[..., 0].mean(1),
    }
    last = len(layers) - 1
    metrics = {
        "layers": layers,
        "n_images": n,
        "folds": len(parts),
        "steps": training.steps,
        "train_seconds": seconds,
        "kl": {"logit": kl_logit, "tuned": kl_tuned},
        "tuned_below_logit": bool((kl_tuned[:last] < kl_logit[:last]).all()) if last else None,
        "agreement": {"logit": logit.agreement, "tuned": (answer == final[None]).mean(1)},
        "p_final": p_final,
        "level_probs": {"logit": logit.mean_level_probs, "tuned": probs.mean(1)},
        "changes": {
            "logit": (float(logit.n_changes.mean()), float(logit.n_changes.std())),
            "tuned": (float(changes.mean()), float(changes.std())),
        },
        "settle": {
            "logit": (float(logit.settle.mean()), float(logit.settle.std())),
            "tuned": (float(settle.mean()), float(settle.std())),
        },
    }
    per_image = {"ids": list(sample_ids), "changes": changes, "settle": settle}
    return metrics, per_image, {"logit": logit.mean_level_probs, "tuned": probs.mean(1)}


# ----------------------------------------------------------------------------- attribution patching
def patching_section(
    checkpoint: Checkpoint, records: Sequence[Any], settings: AttributionSettings, out_dir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attribution patching of every image position x layer, checked against activation patching.

    Each image is rated on the checkpoint's own scoring prompt (`Checkpoint.rate`, the prompt its
    store holds) and patched from the image whose clean metric differs most (``source``
    reference, `farthest_reference`), as the patching study of the main job does.

    Returns:
        Summary (Pearson r of the estimate against activation patching per site and pooled, the
        top positions by estimated effect and the most attended ones, their overlap) and per-image
        overlaps.
    """
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    picked = spread(records, settings.n_patch)  # the main job's test split is ordered by photo
    pixels = checkpoint.pixels([r.image_path for r in picked])
    n_image = model.cfg.n_image_tokens
    ratings = checkpoint.rate(pixels, batch_size=settings.batch_size)
    batch = batch_prompts(
        [r.prompt for r in ratings],
        roles=[r.roles for r in ratings],
        pad_id=tokenizer.pad_id,
        n_image_tokens=n_image,
        bos_id=tokenizer.bos_id,
    )
    if (batch.quality != batch.length - 1).any():
        raise ValueError("a scoring prompt does not end at its quality position; rate with Checkpoint.rate")
    readout = Readout(tuple(level_ids(tokenizer)), position=-1)
    positions = batch.image_positions(0)  # [image, n_image]
    with torch.no_grad():
        logits = model(
            batch.input_ids.to(model.device),
            images=pixels.to(model.device, model.dtype),
            attention_mask=batch.attention_mask.to(model.device),
        ).logits
    clean = metric_of(logits[:, readout.position], readout, settings.metric).float().cpu().numpy()
    source_of = farthest_reference(clean)
    args = (model, batch.input_ids, pixels, positions, readout)
    estimate = attribution_patching(
        *args,
        metric=settings.metric,
        reference="source",
        source_of=torch.from_numpy(source_of),
        sites=settings.sites,
        attention_mask=batch.attention_mask,
        keep_pattern=True,
        chunk=settings.chunk,
        steps=settings.path_steps,
        qk_fix=settings.qk_fix,
        resid_path=settings.resid_path,
    )
    actual: dict[str, np.ndarray] = {}
    if settings.validate:
        actual = activation_patching_grid(
            *args,
            estimate,
            layers=settings.validate_layers,
            attention_mask=batch.attention_mask,
            batch_size=settings.batch_size,
        )
    corr = {site: correlation(estimate.site(site), grid) for site, grid in actual.items()}
    pooled = (
        correlation(np.stack([estimate.site(s) for s in actual]), np.stack(list(actual.values())))
        if actual
        else None
    )
    roles, index = batch.stacked("role"), batch.stacked("image_index")
    top, attended, overlap = compare_with_attention(
        estimate, roles, index, n_image, settings.k, settings.sites[0]
    )
    # the map's top positions (mean over images of each position's largest |effect| over layers) and the
    # most attended ones (the quality row's attention to each image index, mean over layers, heads, images)
    importance = estimate.importance(settings.sites[0]).mean(0)  # [n_image]
    pattern = np.asarray(estimate.pattern)  # [image, layer, head, key]
    cols = positions.numpy()
    attention = np.stack([pattern[i][..., cols[i]].mean((0, 1)) for i in range(len(cols))]).mean(0)
    top_map = np.argsort(-importance, kind="stable")[: settings.k]
    top_attended = np.argsort(-attention, kind="stable")[: settings.k]
    grids = {s: estimate.site(s).mean(0) for s in estimate.sites}  # [layer, position]
    peaks = {}
    for site, grid in grids.items():
        layer, token = np.unravel_index(np.abs(grid).argmax(), grid.shape)
        peaks[site] = {
            "layer": int(estimate.layers[layer]),
            "token": int(token),
            "effect": float(grid[layer, token]),
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = fa.attribution_patching_map(estimate, out_dir / "attribution_patching.png", actual or None)
    metrics = {
        "metric": settings.metric,
        "reference": "source",
        "path_steps": settings.path_steps,
        "qk_fix": settings.qk_fix,
        "resid_path": settings.resid_path,
        "n_images": len(picked),
        "sites": list(estimate.sites),
        "layers": estimate.layers.tolist(),
        "corr": corr,
        "corr_pooled": pooled,
        "validated_layers": None if settings.validate_layers is None else list(settings.validate_layers),
        "top_positions": top_map.tolist(),
        "most_attended": top_attended.tolist(),
        "top_overlap": len(set(top_map.tolist()) & set(top_attended.tolist())) / settings.k,
        "overlap": (float(overlap.mean()), float(overlap.std())),
        "overlap_chance": settings.k / n_image,
        "per_image_top": top.tolist(),
        "per_image_attended": attended.tolist(),
        "peaks": peaks,
        "mean_effect": grids,
        "figure": str(figure),
    }
    per_image = {"ids": [str(r.id) for r in picked], "overlap": overlap, "clean_metric": clean}
    return metrics, per_image


# ----------------------------------------------------------------------------- the entry point
def attribution_analysis(
    checkpoint: Checkpoint,
    store_path: str | Path,
    records: Sequence[Any],
    out_dir: str | Path,
    settings: AttributionSettings = AttributionSettings(),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Direct logit attribution, tuned lens and, for an image at the quality position, attribution patching.

    Args:
        checkpoint: The checkpoint the store was recorded from (`mechbiqa.checkpoint.Checkpoint`).
        store_path: Its store (`mechbiqa.analysis.replication.rated_store`).
        records: The images (``IQARecord``s) the attribution patching picks ``settings.n_patch`` of.
        out_dir: Where the figures go (``dla.png``, ``lens.png``, ``attribution_patching.png``).
        settings: `AttributionSettings`.

    Returns:
        ``metrics`` (``dla``, ``tuned_lens``, ``attribution_patching``: JSON-able summaries; the last
        None with ``attribution_patching_skipped`` saying why for a checkpoint whose quality position
        reads no image) and ``per_image`` blocks ``{"ids": [...], quantity: [...]}``: ``dla`` (role
        shares and writes), ``tuned_lens`` (answer changes, settle layer), ``attribution_patching``
        (overlap of the top positions with the most attended).

    Raises:
        LookupError: The store lacks the direct-logit-attribution sites (record it with
            `rated_store`, whose spec holds them).
        mechbiqa.store.StoreMismatchError: The store was recorded from another model.
    """
    from mechbiqa_hooks.record import model_identity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    ids = level_ids(tokenizer)
    # the tuned lens trains against a copy of the read-out: the checkpoint's modules stay untouched
    base = LogitLens(
        copy.deepcopy(model.llm.ln_final), copy.deepcopy(model.llm.unembed), str(checkpoint.name)
    )
    with ActivationStore.open(store_path) as store:
        store.check_identity(model_identity(model))
        dla_metrics, dla_images, dla_result = dla_section(
            store, ReadoutWeights.from_model(model, ids), settings.direction, settings.top_heads
        )
        lens_metrics, lens_images, lens_probs = lens_section(
            store, base, ids, settings.lens_folds, settings.lens_training, settings.seed
        )
    dla_metrics["figure"] = str(fa.dla_figure(dla_result, out / "dla.png"))
    lens_metrics["figure"] = str(
        fa.lens_pair_figure(
            lens_metrics["layers"],
            lens_probs,
            lens_metrics["kl"],
            out / "lens.png",
            title=Path(store_path).stem,
        )
    )
    metrics: dict[str, Any] = {"dla": dla_metrics, "tuned_lens": lens_metrics, "attribution_patching": None}
    per_image: dict[str, Any] = {"dla": dla_images, "tuned_lens": lens_images}
    if checkpoint.image_at_quality and len(records) >= 2:
        metrics["attribution_patching"], per_image["attribution_patching"] = patching_section(
            checkpoint, records, settings, out
        )
    else:
        metrics["attribution_patching_skipped"] = (
            "the quality position reads no image (two-stage: stage 2 is text only)"
            if not checkpoint.image_at_quality
            else f"{len(records)} image(s): patching needs 2"
        )
    return metrics, per_image
