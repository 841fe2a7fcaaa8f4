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

from mechbiqa import cli, outputs, reports
from mechbiqa.analysis.evaluation import EvaluationResult, evaluate_by_dataset
from mechbiqa.analysis.quality_rating import checkpoint_scorer, rate_datasets, select_samples
from mechbiqa.data.loaders import parse_scale
from mechbiqa.errors import UserError

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


def main(cfg: Config) -> Result:
    """Rate every data set, time it, compute the metrics on the 0-1 scale; write JSON and config."""
    for spec in cfg.scales:  # a malformed --scale fails before the model loads
        try:
            parse_scale(spec)
        except ValueError as error:
            raise UserError(f"--scale: {error}") from None
    loaded = [(spec, select_samples(spec, cfg.split, cfg.limit, cfg.scales)) for spec in cfg.datasets]
    rate, processor, name = checkpoint_scorer(
        cfg.model,
        tiny_random=cfg.tiny_random,
        seed=cfg.seed,
        dtype=cfg.dtype,
        device=cfg.device,
        batch_size=cfg.batch_size,
    )
    rated = rate_datasets(loaded, rate, processor, cfg.batch_size)
    try:
        evaluation = evaluate_by_dataset(
            rated.scores, rated.targets, rated.groups, rated.seconds, checkpoint=name, fit=cfg.fit
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    out = Path(cfg.out)
    images = [
        {"id": i, "dataset": g, "score": s, "target": t}
        for i, g, s, t in zip(rated.ids, rated.groups, rated.scores, rated.targets, strict=True)
    ]
    scale = "0-1, higher is better (each data set's own scale normalised)"
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(
            out / f"{NAME}.json", {**evaluation.to_dict(), "target_scale": scale, "images": images}
        ),
    }
    return Result(evaluation=evaluation, scores=rated.by_dataset, files=files)


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
