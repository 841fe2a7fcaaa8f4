"""Quality evaluation of a checkpoint (the paper's Table 2): SRCC/PLCC per data set and time per image.

Question: how well do a checkpoint's quality scores agree with human ratings
on each data set, and what does a rating cost?

Method: rate every image (the Q-Align score, DESIGN.md "Score"):

* a one-stage checkpoint of ``mechbiqa.train`` or a two-stage pair folder
  (``stage1/`` + ``stage2/``): its pipeline, description generated and then the
  level-word logits of the canonical scoring prompt (`mechbiqa.pipeline.load_rater`);
* any other checkpoint, and the tiny random model: Q-Align's scorer prompt
  (`mechbiqa.scoring.rate_images`).

Compare with the data set's ratings normalised to 0-1 from each data set's
own scale, higher is better (DMOS flipped; `mechbiqa.data.scales`), so the
pooled row compares images, not score scales: SRCC and KRCC raw; PLCC and
RMSE raw and after the 4-parameter logistic fit (`mechbiqa.metrics.iqa_metrics` via
`mechbiqa.analysis.evaluation.evaluate_by_dataset`), per data set and pooled.
Time per image is the model's wall time (image decoding and preprocessing
excluded) after one warm-up batch, at the given batch size.

Output (in ``--out``, default ``cache/evaluate_quality/``): ``config.json``,
``evaluate_quality.json`` (metrics and every image's score).

Example::

    python studies/evaluate_quality.py --model cache/compact/one-stage --dataset builtin --split test
    python studies/evaluate_quality.py --model /ckpt/one-align --dataset koniq10k=/data/koniq spaq=/data/spaq
    python studies/evaluate_quality.py --model /ckpt/one-align --dataset test_jsons/test_kadid.json=data/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mechbiqa import cli, outputs, reports
from mechbiqa.analysis.evaluation import EvaluationResult, Stopwatch, evaluate_by_dataset, normalised_target
from mechbiqa.data.loaders import load_qalign_json, parse_scale
from mechbiqa.errors import UserError
from mechbiqa.scoring import rate_images
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_rater, load_samples

NAME = "evaluate_quality"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """An evaluation run.

    Attributes:
        model: Checkpoint directory or two-stage pair folder; None with ``tiny_random``, else
            the compact one-stage default.
        tiny_random: The tiny random model (`mechbiqa.sources.tiny_random_model`).
        datasets: Data sets, each ``builtin``, a folder of images, a ``.jsonl`` of records,
            ``NAME=ROOT`` (a real data set `mechbiqa.data.load_dataset` knows) or a Q-Align
            JSON ``FILE.json[=IMAGE_ROOT]``.
        split: Keep one split of each data set (None: all); a data set without splits is refused.
        scales: ``NAME=LOW,HIGH[,lower]`` score scales of Q-Align JSON sources mechbiqa does not know.
        limit: Keep the first N images of each data set.
        batch_size: Images per forward.
        seed: Seed of the tiny random model.
        fit: ``logistic4`` or ``linear`` (the "fitted" PLCC/RMSE).
        out: Output folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype (the weights are cast as they are read).
    """

    model: str | None = None
    tiny_random: bool = False
    datasets: tuple[str, ...] = field(default=("builtin",), metadata=cli.meta(flag="--dataset"))
    split: str | None = "test"
    scales: tuple[str, ...] = field(default=(), metadata=cli.meta(flag="--scale"))
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    fit: Literal["logistic4", "linear"] = "logistic4"
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if not self.datasets:
            raise ValueError(
                "--dataset: name at least one data set ('builtin', a folder, a .jsonl or NAME=ROOT)"
            )

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (unrated: metrics are NaN, flagged)."""
        base = dict(
            tiny_random=True,
            datasets=(str(Path(tmp) / "images"),),
            split=None,
            limit=6,
            batch_size=4,
            out=str(Path(tmp) / NAME),
        )
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class Result:
    """The evaluation and per-image scores.

    Attributes:
        evaluation: The `EvaluationResult` (one row per data set, then pooled).
        scores: Data set -> ``[image]`` scores (0-1).
        files: Artefact name -> path.
    """

    evaluation: EvaluationResult
    scores: dict[str, np.ndarray]
    files: dict[str, Path] = field(default_factory=dict)


def _rater(cfg: Config) -> tuple[Any, Any, str]:
    """``(rate(pixels) -> scores, processor, name)`` for the checkpoint the config names."""
    checkpoint = None if cfg.tiny_random else Path(cfg.model or DEFAULT_CHECKPOINT)
    if checkpoint is not None and (
        (checkpoint / "mechbiqa.json").is_file() or (checkpoint / "stage1").is_dir()
    ):
        rater = load_rater(checkpoint, dtype=cfg.dtype, device=cfg.device)
        processor = rater.components.processor if hasattr(rater, "components") else rater.stage1.processor

        def rate(pixels: torch.Tensor) -> np.ndarray:
            return np.array([r.score for r in rater.rate(pixels, batch_size=cfg.batch_size)])

        return rate, processor, f"{checkpoint} ({rater.mode})"
    model, tokenizer, processor, name = load_model(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )

    def rate(pixels: torch.Tensor) -> np.ndarray:
        return rate_images(model, tokenizer, pixels, batch_size=cfg.batch_size).scores

    return rate, processor, f"{name} (Q-Align scorer prompt)"


def _samples(spec: str, cfg: Config) -> list[Any]:
    """The samples of one ``--dataset`` spec after ``--split`` and ``--limit``; a `UserError` if none.

    A ``.json`` spec (``FILE.json`` or ``FILE.json=IMAGE_ROOT``; the image root defaults to the
    file's folder) is a Q-Align JSON, each entry rated on its own source's scale.
    """
    file, _, root = spec.partition("=")
    try:
        if file.endswith(".json"):
            scales = dict(parse_scale(s) for s in cfg.scales)
            samples = load_qalign_json(file, root or Path(file).parent, scales=scales)
        else:
            samples = load_samples(spec)
    except (FileNotFoundError, ValueError) as error:
        raise UserError(f"--dataset {spec}: {error}") from None
    if cfg.split is not None:
        splits = sorted({s for s in (getattr(x, "split", None) for x in samples) if s is not None})
        if not splits:
            raise UserError(
                f"--dataset {spec}: this data set has no official split (no image carries one), so "
                f"--split {cfg.split} keeps nothing; pass --split all to evaluate every image"
            )
        samples = [x for x in samples if getattr(x, "split", None) == cfg.split]
        if not samples:
            raise UserError(
                f"--dataset {spec}: no image in split {cfg.split!r}; its splits are {splits}: pass one of "
                "them, or --split all"
            )
    return samples[: cfg.limit] if cfg.limit is not None else samples


def main(cfg: Config) -> Result:
    """Rate every data set, time it, compute the metrics on the 0-1 scale; write JSON and config."""
    for spec in cfg.scales:  # a malformed --scale fails before the model loads
        try:
            parse_scale(spec)
        except ValueError as error:
            raise UserError(f"--scale: {error}") from None
    loaded = [(spec, _samples(spec, cfg)) for spec in cfg.datasets]
    rate, processor, name = _rater(cfg)
    scores: dict[str, list[np.ndarray]] = {}
    all_scores, targets, groups, ids = [], [], [], []
    seconds: dict[str, float] = {}
    warm = False
    for spec, samples in loaded:
        default = Path(spec.split("=")[-1]).name or spec
        # A Q-Align JSON may mix sources: each image counts under its own data set.
        names = [getattr(s, "dataset", "") or default for s in samples]
        watch, parts = Stopwatch(), []
        for start in range(0, len(samples), cfg.batch_size):
            pixels = processor([s.image_path for s in samples[start : start + cfg.batch_size]])
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
    try:
        evaluation = evaluate_by_dataset(
            np.concatenate(all_scores), targets, groups, seconds, checkpoint=name, fit=cfg.fit
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    out = Path(cfg.out)
    flat = np.concatenate(all_scores)
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(
            out / f"{NAME}.json",
            {
                **evaluation.to_dict(),
                "target_scale": "0-1, higher is better (each data set's own scale normalised)",
                "images": [
                    {"id": i, "dataset": g, "score": s, "target": t}
                    for i, g, s, t in zip(ids, groups, flat, targets, strict=True)
                ],
            },
        ),
    }
    return Result(
        evaluation=evaluation, scores={k: np.concatenate(v) for k, v in scores.items()}, files=files
    )


def render(result: Result, console: Any) -> None:
    """Print the evaluation table."""
    console.print(reports.evaluation_table(result.evaluation))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
