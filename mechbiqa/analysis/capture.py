"""The quality position of per-sample scoring prompts: recorded into a store, or captured live.

Where it sits: a rater of `mechbiqa.pipeline` reads the quality word after a
prompt of its own for every image (one-stage: the image, the model's own
description, "The quality of the image is"; two-stage: the stage-2 model's
text-only prompt holding the stage-1 description), and every `Rating` carries
that prompt and its token roles. Two routes lead from there to the studies:

* `record_rater` (the route of `studies/replicate.py` and
  ``studies/cache_activations.py --mode rated``): rate the images, turn each
  rating into a `mechbiqa.store.record.PromptedSample` (`rate_samples`,
  `rated_samples`) and record them with `mechbiqa.store.record.record_prompts`
  into an activation store (`mechbiqa.store`): one store per checkpoint, which
  the logit lens, the attention attribution and the probes read offline.
  `plan_rater` and `rater_attrs` are its two halves for a torchrun run
  (`mechbiqa.store.shards.record_sharded`: every rank rates its own part).
* `capture_quality` (a few prompts, no store): one batched forward per chunk
  of prompts with hooks on the quality position's residual (and, if asked,
  attention row) of the chosen layers. The one padding loop for live
  captures: `mechbiqa.analysis.probes.quality_states` (a `ScoreHead` at
  inference) is a call of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mechbiqa_hooks import names
from torch import Tensor

from mechbiqa.model.processor import ImageLoadError
from mechbiqa.model.prompts import EncodedPrompt
from mechbiqa.model.roles import batch_prompts

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.pipeline import OneStageRater, Rating, TwoStageRater
    from mechbiqa.store import CacheSpec
    from mechbiqa.store.record import PromptedSample, RecordPlan, RecordResult, RetryPolicy

__all__ = [
    "QualityCapture",
    "capture_quality",
    "plan_rater",
    "rate_samples",
    "rated_samples",
    "rater_attrs",
    "rater_mode",
    "record_rater",
    "scoring_components",
    "unrated_sample",
]


# ----------------------------------------------------------------------------- into a store
def scoring_components(rater: OneStageRater | TwoStageRater) -> Any:
    """The `Components` whose forward reads the quality word (a two-stage pair: stage 2)."""
    from mechbiqa.checkpoint import rater_parts

    return rater_parts(rater)[-1]


def _record_fields(source: Any) -> dict[str, Any]:
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    return dict(getattr(source, "record", None) or {})


def rater_mode(rater: OneStageRater | TwoStageRater) -> str:
    """``"one-stage"`` or ``"two-stage"``."""
    from mechbiqa.pipeline import OneStageRater

    return "one-stage" if isinstance(rater, OneStageRater) else "two-stage"


def _label(source: Any) -> float | None:
    label = getattr(source, "label", None)
    if label is None:
        label = getattr(source, "mos01", None)
    return None if label is None else float(label)


def unrated_sample(source: Any, reason: str) -> PromptedSample:
    """A record that could not be rated, as an error row of the store."""
    from mechbiqa.store.record import PromptedSample

    return PromptedSample(
        id=str(source.id),
        prompt=None,
        image_path=getattr(source, "image_path", None),
        label=_label(source),
        record=_record_fields(source),
        error=reason,
    )


def rated_samples(records: Sequence[Any], ratings: Sequence[Rating], mode: str) -> list[PromptedSample]:
    """One `PromptedSample` per rating: its scoring prompt and roles, the image, label and rating.

    Args:
        records: The rated records (``id``, ``image_path``, a label as ``label`` or ``mos01``).
        ratings: ``rater.rate(...)`` of those records, in order.
        mode: ``"one-stage"`` or ``"two-stage"`` (kept in each sample's record).

    The stored record is the source record plus ``rating`` (score, level, description,
    level probabilities), so a store answers "what did the model say" without the model.
    """
    from mechbiqa.store.record import PromptedSample

    if len(records) != len(ratings):
        raise ValueError(f"{len(records)} records but {len(ratings)} ratings")
    out = []
    for source, rating in zip(records, ratings, strict=True):
        extra = {
            "rating": {
                "mode": mode,
                "score": float(rating.score),
                "level": rating.level,
                "description": rating.description,
                "level_probs": [float(x) for x in rating.level_probs],
            }
        }
        out.append(
            PromptedSample(
                id=str(source.id),
                prompt=rating.prompt,
                image_path=getattr(source, "image_path", None),
                roles=rating.roles,
                label=_label(source),
                record=_record_fields(source) | extra,
                answer=rating.answer,
            )
        )
    return out


def rate_samples(
    rater: OneStageRater | TwoStageRater,
    records: Sequence[Any],
    *,
    rate_batch_size: int = 64,
    rate_chunk: int = 256,
) -> list[PromptedSample]:
    """Rate the records; one `PromptedSample` each: its scoring prompt, or why it has none.

    An image that cannot be read is not rated; its sample carries the reason (an error row).
    """
    from mechbiqa.checkpoint import rater_parts

    processor = rater_parts(rater)[0].processor  # the describing model reads the image
    readable: list[int] = []
    errors: dict[int, str] = {}
    ratings: list[Rating] = []
    for start in range(0, len(records), rate_chunk):  # pixels of one chunk in memory at a time
        pixels = []
        for i in range(start, min(len(records), start + rate_chunk)):
            try:
                pixels.append(torch.from_numpy(processor.preprocess(Path(records[i].image_path))))
                readable.append(i)
            except ImageLoadError as error:
                errors[i] = error.reason
            except (OSError, ValueError) as error:  # anything else PIL raises on a bad file
                errors[i] = f"{type(error).__name__}: {error}"
        if pixels:
            ratings += rater.rate(torch.stack(pixels), batch_size=rate_batch_size)
    good = rated_samples([records[i] for i in readable], ratings, rater_mode(rater))
    rated = dict(zip(readable, good, strict=True))
    return [
        rated[i] if i in rated else unrated_sample(record, f"cannot rate it: {errors[i]}")
        for i, record in enumerate(records)
    ]


def _scoring_parts(rater: OneStageRater | TwoStageRater, model_name: str | None) -> tuple[Any, Any, str]:
    """The scoring components, the processor of their prompts (None: text only) and the store's model name."""
    parts = scoring_components(rater)
    processor = parts.processor if rater_mode(rater) == "one-stage" else None
    return parts, processor, str(parts.path) if model_name is None else model_name


def rater_attrs(
    rater: OneStageRater | TwoStageRater,
    spec: CacheSpec | None = None,
    *,
    batch_size: int = 8,
    model_name: str | None = None,
    shard: dict[str, int] | None = None,
) -> dict[str, str]:
    """The attributes `plan_rater`'s store will have, known before any image is rated."""
    from mechbiqa.store import CacheSpec
    from mechbiqa.store.record import prompts_attrs

    parts, processor, name = _scoring_parts(rater, model_name)
    return prompts_attrs(parts.model, parts.tokenizer, processor, spec or CacheSpec.default(),
                         batch_size=batch_size, model_name=name, shard=shard)  # fmt: skip


def plan_rater(
    rater: OneStageRater | TwoStageRater,
    records: Sequence[Any],
    path: str | Path,
    spec: CacheSpec | None = None,
    *,
    batch_size: int = 8,
    rate_batch_size: int = 64,
    rate_chunk: int = 256,
    shard: dict[str, int] | None = None,
    model_name: str | None = None,
) -> RecordPlan:
    """Rate the records and plan the recording of their scoring prompts (`record_rater`'s first half)."""
    from mechbiqa.store import CacheSpec
    from mechbiqa.store.record import plan_prompts

    samples = rate_samples(rater, records, rate_batch_size=rate_batch_size, rate_chunk=rate_chunk)
    parts, processor, name = _scoring_parts(rater, model_name)
    return plan_prompts(parts.model, parts.tokenizer, processor, samples, spec or CacheSpec.default(), path,
                        batch_size=batch_size, model_name=name, shard=shard)  # fmt: skip


def record_rater(
    rater: OneStageRater | TwoStageRater,
    records: Sequence[Any],
    path: str | Path,
    spec: CacheSpec | None = None,
    *,
    batch_size: int = 8,
    rate_batch_size: int = 64,
    rate_chunk: int = 256,
    overwrite: bool = False,
    shard: dict[str, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    model_name: str | None = None,
    fsync: bool = False,
    retry_failed: RetryPolicy = "auto",
) -> RecordResult:
    """Rate the records and record every rating's scoring prompt into a store (one per checkpoint).

    The store holds the model that reads the quality word: a one-stage checkpoint with its
    image, or the stage-2 model of a two-stage pair with its text-only prompt (no image
    tokens; ``samples/n_images`` is 0 and ``image_path`` names the image stage 1 described).
    Its ``model`` attribute is that checkpoint's directory, from which the offline studies
    read the logit lens.

    Args:
        rater: A `OneStageRater` or `TwoStageRater`.
        records: Records with ``id``, ``image_path`` and a label (``IQARecord``s).
        path: The store file.
        spec: What to cache (default `CacheSpec.default()`: residuals at the quality and image
            positions, the quality attention row, the quality logits; float16).
        batch_size: Samples per recorded forward.
        rate_batch_size: Images per forward while rating.
        rate_chunk: Images preprocessed and rated at a time (memory).
        overwrite: Record again even if a store exists.
        shard: One torchrun rank's part (`mechbiqa.store.shards.record_sharded` runs the whole).
        progress: ``(done, total)`` after each recorded batch.
        model_name: The store's ``model`` attribute (default: the scoring checkpoint's directory).
        fsync: Flush each batch to disk before committing it.
        retry_failed: Which failed rows of an existing store to record again (default: those whose
            image can now be read and rated).

    An image that cannot be read is not rated; it is stored as a failed sample with the
    reason (``ActivationStore.errors``), as the shared-prompt recorder does.
    """
    plan = plan_rater(rater, records, path, spec, batch_size=batch_size, rate_batch_size=rate_batch_size,
                      rate_chunk=rate_chunk, shard=shard, model_name=model_name)  # fmt: skip
    return plan.run(overwrite=overwrite, fsync=fsync, retry_failed=retry_failed, progress=progress)


# ----------------------------------------------------------------------------- live
@dataclass(frozen=True)
class QualityCapture:
    """What the quality position saw, for every prompt (live, not stored).

    Attributes:
        layers: The layer numbers of the layer axes.
        resid: ``[prompt, layer, d_model]`` ``hook_resid_post`` at the quality position (the
            store's ``llm.blocks.{l}.hook_resid_post@quality`` without its pos axis).
        pattern: ``[prompt, layer, head, key_pos]`` the quality position's attention row over the
            prompt's own positions (0 = BOS, zero beyond its length), or None when not asked for.
    """

    layers: tuple[int, ...]
    resid: np.ndarray
    pattern: np.ndarray | None = None


@torch.no_grad()
def capture_quality(
    model: MPLUGOwl2,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None,
    pad_id: int,
    *,
    layers: Sequence[int] | None = None,
    pattern: bool = False,
    batch_size: int = 32,
) -> QualityCapture:
    """Run each prompt once with hooks at its quality position (its last id) on the chosen layers.

    Args:
        model: The model.
        prompts: Prompts that end at their quality position (``EncodedPrompt.quality_index`` is the
            last id: `mechbiqa.pipeline.scoring_prompt`, or ``encode_prompt(..., answer_prefix=...)``).
        pixels: ``[image, 3, S, S]``: one per placeholder, in prompt order; None for text only.
        pad_id: Id used for padding (masked; never attended).
        layers: The blocks to read (default: all).
        pattern: Also keep the quality position's attention row of each layer and head.
        batch_size: Prompts per forward.

    Raises:
        ValueError: A prompt does not end at its quality position, or a layer does not exist.
    """
    bad = [i for i, p in enumerate(prompts) if p.quality_index != len(p.ids) - 1]
    if bad:
        raise ValueError(
            f"prompts {bad[:5]} do not end at their quality position; build them with "
            "mechbiqa.pipeline.scoring_prompt or encode_prompt(..., answer_prefix=...)"
        )
    n_layers = model.cfg.llm.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(int(x) for x in layers)
    resid_names = [names.resid_post(layer) for layer in layers]
    pattern_names = [names.pattern(layer) for layer in layers] if pattern else []
    missing = [n for n in resid_names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hook {missing[0]!r} (it has {n_layers} LLM layers)")
    resid: list[Tensor] = []
    rows: list[Tensor] = []
    if not prompts:
        empty = np.zeros((0, len(layers), model.cfg.llm.d_model), np.float32)
        return QualityCapture(layers=layers, resid=empty, pattern=None)
    batch = batch_prompts(prompts, pad_id=pad_id, n_image_tokens=model.cfg.n_image_tokens)
    lengths = [len(r.unpadded()) for r in batch.roles]  # spliced lengths
    grabbed: dict[str, Tensor] = {}

    def grab(activation: Tensor, hook: Any) -> None:
        # The model left-pads spliced rows: the last column is every row's quality position
        # (a pattern's last query row; its keys stay left-padded until unpadded below).
        row = activation[:, :, -1] if "pattern" in hook.name else activation[:, -1]
        grabbed[hook.name] = row.float().cpu()

    with model.hooks(fwd_hooks=[(name, grab) for name in resid_names + pattern_names]):
        for span, _, _ in model.forward_batches(batch, pixels, batch_size, logits_at=-1):
            resid.append(torch.stack([grabbed[name] for name in resid_names], dim=1))
            if pattern:
                block = torch.stack([grabbed[name] for name in pattern_names], dim=1)  # [b, layer, head, key]
                out = torch.zeros((*block.shape[:3], batch.length))
                for i, n in enumerate(lengths[span]):  # unpad the keys: position 0 = BOS, as in a store
                    out[i, ..., :n] = block[i, ..., block.shape[-1] - n :]
                rows.append(out)
    d_model = model.cfg.llm.d_model
    return QualityCapture(
        layers=layers,
        resid=torch.cat(resid).numpy() if resid else np.zeros((0, len(layers), d_model), dtype=np.float32),
        pattern=(torch.cat(rows).numpy() if rows else None) if pattern else None,
    )
