"""Rating data sets with a checkpoint, timed (`studies/evaluate_quality.py`'s method before the metrics).

`checkpoint_scorer` turns what a user names into ``rate(pixels) -> scores``: a mechbiqa
one-stage checkpoint or two-stage pair rates with its own pipeline (description, then the
canonical scoring prompt), anything else with Q-Align's scorer prompt. `select_samples`
reads one ``--dataset`` spec (any source `mechbiqa.sources.load_samples` knows, or a
Q-Align JSON) and keeps one split. `rate_datasets` rates them batch by batch, timing the
model alone; `mechbiqa.analysis.evaluation.evaluate_by_dataset` turns the result into metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa.analysis.evaluation import Stopwatch, normalised_target
from mechbiqa.data.loaders import load_qalign_json, parse_scale
from mechbiqa.errors import UserError
from mechbiqa.scoring import rate_images
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_rater, load_samples

Rate = Callable[[torch.Tensor], np.ndarray]


def checkpoint_scorer(
    model: str | None, *, tiny_random: bool, seed: int, dtype: str, device: str, batch_size: int
) -> tuple[Rate, Any, str]:
    """``(rate(pixels) -> [image] scores 0-1, processor, name)`` for the checkpoint a user names.

    Args:
        model: Checkpoint directory or two-stage pair folder; None: the compact one-stage default
            (or the tiny random model).
        tiny_random: The tiny random model (`mechbiqa.sources.tiny_random_model`) under ``seed``.
        seed: Its seed.
        dtype: Model dtype.
        device: Model device.
        batch_size: Images per forward.
    """
    checkpoint = None if tiny_random else Path(model or DEFAULT_CHECKPOINT)
    if checkpoint is not None and (
        (checkpoint / "mechbiqa.json").is_file() or (checkpoint / "stage1").is_dir()
    ):
        rater = load_rater(checkpoint, dtype=dtype, device=device)
        processor = rater.components.processor if hasattr(rater, "components") else rater.stage1.processor

        def rate(pixels: torch.Tensor) -> np.ndarray:
            return np.array([r.score for r in rater.rate(pixels, batch_size=batch_size)])

        return rate, processor, f"{checkpoint} ({rater.mode})"
    loaded, tokenizer, processor, name = load_model(
        model, tiny_random=tiny_random, seed=seed, dtype=dtype, device=device
    )

    def rate(pixels: torch.Tensor) -> np.ndarray:
        return rate_images(loaded, tokenizer, pixels, batch_size=batch_size).scores

    return rate, processor, f"{name} (Q-Align scorer prompt)"


def select_samples(spec: str, split: str | None, limit: int | None, scales: Sequence[str] = ()) -> list[Any]:
    """The samples of one ``--dataset`` spec after ``--split`` and ``--limit``; a `UserError` if none.

    A ``.json`` spec (``FILE.json`` or ``FILE.json=IMAGE_ROOT``; the image root defaults to the
    file's folder) is a Q-Align JSON, each entry rated on its own source's scale (``scales``:
    ``NAME=LOW,HIGH[,lower]`` for sources mechbiqa does not know).
    """
    file, _, root = spec.partition("=")
    try:
        if file.endswith(".json"):
            known = dict(parse_scale(s) for s in scales)
            samples = load_qalign_json(file, root or Path(file).parent, scales=known)
        else:
            samples = load_samples(spec)
    except (FileNotFoundError, ValueError) as error:
        hint = ""
        if file.endswith(".json") and not root and "not found" in str(error):
            hint = (f"; the images are looked for next to the file: give their folder, "
                    f"--dataset {file}=IMAGE_ROOT")
        raise UserError(f"--dataset {spec}: {error}{hint}") from None
    if split is not None:
        splits = sorted({s for s in (getattr(x, "split", None) for x in samples) if s is not None})
        if not splits:
            raise UserError(
                f"--dataset {spec}: this data set has no official split (no image carries one), so "
                f"--split {split} keeps nothing; pass --split all to evaluate every image"
            )
        samples = [x for x in samples if getattr(x, "split", None) == split]
        if not samples:
            raise UserError(
                f"--dataset {spec}: no image in split {split!r}; its splits are {splits}: pass one of "
                "them, or --split all"
            )
    return samples[:limit] if limit is not None else samples


@dataclass
class RatedImages:
    """Every image's score, target and data set, and the model's time per data set.

    Attributes:
        scores: ``[image]`` scores (0-1), all data sets in order.
        targets: ``[image]`` the data set's rating normalised to 0-1, higher is better.
        groups: ``[image]`` the data set each image counts under.
        ids: ``[image]`` sample ids.
        seconds: Data set -> the model's wall time on its images.
        by_dataset: Data set -> ``[image]`` its scores.
    """

    scores: np.ndarray
    targets: list[float]
    groups: list[str]
    ids: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    by_dataset: dict[str, np.ndarray] = field(default_factory=dict)


def rate_datasets(
    loaded: Sequence[tuple[str, Sequence[Any]]], rate: Rate, processor: Any, batch_size: int
) -> RatedImages:
    """Rate each ``(spec, samples)`` batch by batch; the model's time, after one untimed warm-up forward.

    Image decoding and preprocessing are not timed. A Q-Align JSON may mix sources: each image
    counts under its own data set (its ``dataset``; else the spec's folder name).
    """
    scores: dict[str, list[np.ndarray]] = {}
    all_scores, targets, groups, ids = [], [], [], []
    seconds: dict[str, float] = {}
    warm = False
    for spec, samples in loaded:
        default = Path(spec.split("=")[-1]).name or spec
        names = [getattr(s, "dataset", "") or default for s in samples]
        watch, parts = Stopwatch(), []
        for start in range(0, len(samples), batch_size):
            pixels = processor([s.image_path for s in samples[start : start + batch_size]])
            if not warm:  # the first forward pays one-off costs (allocation, kernel selection): not timed
                rate(pixels[:1])
                warm = True
            with watch:
                parts.append(rate(pixels))
        rated = np.concatenate(parts)
        for dataset in dict.fromkeys(names):
            chosen = np.array([n == dataset for n in names])
            scores.setdefault(dataset, []).append(rated[chosen])
            seconds[dataset] = seconds.get(dataset, 0.0) + watch.seconds * chosen.mean()
        all_scores.append(rated)
        targets += [normalised_target(s) for s in samples]
        groups += names
        ids += [str(s.id) for s in samples]
    by_dataset = {k: np.concatenate(v) for k, v in scores.items()}
    return RatedImages(np.concatenate(all_scores), targets, groups, ids, seconds, by_dataset)
