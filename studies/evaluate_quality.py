"""Quality evaluation of a checkpoint (the paper's Table 2): SRCC/PLCC per data set and time per image.

Question: how well do a checkpoint's quality scores agree with human ratings
on each data set, and what does a rating cost?

Method: rate every image (the Q-Align score, DESIGN.md "Score"):

* a one-stage checkpoint of ``mechbiqa.train`` or a two-stage pair folder
  (``stage1/`` + ``stage2/``): its pipeline, description generated and then the
  level-word logits of the canonical scoring prompt (`mechbiqa.pipeline.load_rater`);
* any other checkpoint, and the tiny random model: Q-Align's scorer prompt
  (`mechbiqa.scoring.rate_images`).

Compare with the data set's ratings, oriented so that higher is better (DMOS
negated): SRCC and KRCC raw; PLCC and RMSE raw and after the 4-parameter
logistic fit (`mechbiqa.metrics.iqa_metrics` via
`mechbiqa.analysis.evaluation.evaluate_by_dataset`), per data set and pooled.
Time per image is the model's wall time (image decoding and preprocessing
excluded) after one warm-up batch, at the given batch size.

Output (in ``--out``, default ``cache/evaluate_quality/``): ``config.json``,
``evaluate_quality.json`` (metrics and every image's score).

Example::

    python studies/evaluate_quality.py --model cache/compact/one-stage --dataset builtin --split test
    python studies/evaluate_quality.py --model /ckpt/one-align --dataset koniq10k=/data/koniq spaq=/data/spaq
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mechbiqa import cli, outputs, reports
from mechbiqa.analysis.evaluation import EvaluationResult, Stopwatch, aligned_target, evaluate_by_dataset
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
        datasets: Data sets, each ``builtin``, a folder of images, a ``.jsonl`` of records or
            ``NAME=ROOT`` (a real data set `mechbiqa.data.load_dataset` knows).
        split: Keep one split of each data set (None: all).
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


def main(cfg: Config) -> Result:
    """Rate every data set, time it, compute the metrics; write JSON and config."""
    rate, processor, name = _rater(cfg)
    scores: dict[str, np.ndarray] = {}
    all_scores, targets, groups, ids = [], [], [], []
    seconds: dict[str, float] = {}
    warm = False
    for spec in cfg.datasets:
        samples = load_samples(spec, cfg.split, cfg.limit)
        dataset = getattr(samples[0], "dataset", "") or Path(spec.split("=")[-1]).name or spec
        watch, parts = Stopwatch(), []
        for start in range(0, len(samples), cfg.batch_size):
            pixels = processor([s.image_path for s in samples[start : start + cfg.batch_size]])
            if not warm:  # the first forward pays one-off costs (allocation, kernel selection): not timed
                rate(pixels[:1])
                warm = True
            with watch:
                parts.append(rate(pixels))
        scores[dataset] = np.concatenate(parts)
        seconds[dataset] = watch.seconds
        all_scores.append(scores[dataset])
        targets += [
            aligned_target(getattr(s, "score", None), getattr(s, "higher_is_better", True)) for s in samples
        ]
        groups += [dataset] * len(samples)
        ids += [str(s.id) for s in samples]
    evaluation = evaluate_by_dataset(
        np.concatenate(all_scores), targets, groups, seconds, checkpoint=name, fit=cfg.fit
    )
    out = Path(cfg.out)
    flat = np.concatenate(all_scores)
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(
            out / f"{NAME}.json",
            {
                **evaluation.to_dict(),
                "images": [
                    {"id": i, "dataset": g, "score": s, "target": t}
                    for i, g, s, t in zip(ids, groups, flat, targets, strict=True)
                ],
            },
        ),
    }
    return Result(evaluation=evaluation, scores=scores, files=files)


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
