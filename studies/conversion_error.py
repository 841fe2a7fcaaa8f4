"""Conversion error: how much of a rater's error is fixed by turning MOS into level words (the third paper).

Question: a model trained on level words can at best reproduce the score its
level restores; how large is that floor on this data set, how far beyond it
does a checkpoint's Q-Align score lie, and does a score-token regressor
(Q-Scorer) get below it?

Method (`mechbiqa.analysis.conversion`): MOS on 0-1 -> five equal-width bins
-> the bin's restored score (Q-Align's level values 0, .25, .5, .75, 1; or the
bin centres with ``--restore centre``): the *label approximation*, against
MOS. The checkpoint (one-stage, or a two-stage pair) rates every image with
its pipeline (`mechbiqa.pipeline`; the Q-Align score at the quality position):
the *restoration* error. With ``--qscorer DIR`` the Q-Scorer's regressed
score gives the *score-token* error. Each: RMSE on 0-1 (raw), SRCC, PLCC.

Output (in ``--out``, default ``cache/conversion_error/``): ``config.json``,
``conversion_error.json`` (``label_approximation``, ``restoration``,
``score_token``, ``restoration_beyond_floor_rmse``, per-image arrays),
``conversion_error.png`` (MOS vs restored score with the bin staircase).

Example::

    python studies/conversion_error.py --model cache/compact/one-stage --split test
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechbiqa import cli, figures, outputs
from mechbiqa.analysis.conversion import ConversionResult, conversion_error
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_rater, load_samples, tiny_raters, torch_dtype

NAME = "conversion_error"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A conversion-error run.

    Attributes:
        model: Checkpoint directory (one-stage, or a two-stage pair folder); None: the compact
            one-stage default. Ignored with ``tiny_random``.
        tiny_random: Rate with the tiny random one-stage rater (pipeline check).
        qscorer: A Q-Scorer checkpoint (`mechbiqa.qscorer.save_qscorer`); None: no score-token row.
        dataset: ``builtin``, a ``.jsonl`` of IQARecords, or ``NAME=ROOT`` (records need MOS).
        split: Keep only this split (None: all).
        limit: Keep only the first N images (None: all).
        restore: ``qalign`` (level values) or ``centre`` (bin centres).
        batch_size: Images per forward.
        max_new_tokens: Longest generated answer.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype of the rater and the Q-Scorer (the weights are cast as they are read).
        out: Output folder; None: ``cache/conversion_error``.
    """

    model: str | None = None
    tiny_random: bool = False
    qscorer: str | None = None
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    restore: Literal["qalign", "centre"] = "qalign"
    batch_size: int = 32
    max_new_tokens: int = 48
    device: str = "cpu"
    dtype: str = "float32"
    out: str | None = None

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.restore not in ("qalign", "centre"):
            raise ValueError(f"--restore {self.restore}: choose qalign or centre")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: generate at least 1 token")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random rater on ``tmp/rated.jsonl``."""
        base = dict(tiny_random=True, dataset=str(Path(tmp) / "rated.jsonl"), split=None, max_new_tokens=4,
                    out=str(Path(tmp) / NAME))  # fmt: skip
        return cls(**{**base, **overrides})

    @property
    def out_dir(self) -> Path:
        """Where the artefacts go."""
        return Path(self.out) if self.out else REPO / "cache" / NAME


@dataclass(frozen=True)
class Result:
    """The errors and where they were written.

    Attributes:
        conversion: The `ConversionResult`.
        files: Artefact name -> path (``config``, ``json``, ``figure``).
        model: What rated the images.
    """

    conversion: ConversionResult
    files: dict[str, Path] = field(default_factory=dict)
    model: str = ""


def main(cfg: Config) -> Result:
    """Rate the images, compute the three errors, write JSON, figure and config."""
    from mechbiqa.qscorer import load_qscorer

    records = [
        r for r in load_samples(cfg.dataset, cfg.split, cfg.limit) if getattr(r, "mos01", None) is not None
    ]
    if not records:
        raise ValueError(
            f"--dataset {cfg.dataset}: no image has a MOS; the conversion error needs rated images"
        )
    images = [r.image_path for r in records]
    if cfg.tiny_random:
        rater, source = tiny_raters(max_new_tokens=cfg.max_new_tokens)["one-stage"], "tiny-random(seed=0)"
        rater.components.model.to(cfg.device, torch_dtype(cfg.dtype))
    else:
        source = str(cfg.model or DEFAULT_CHECKPOINT)
        if not Path(source).exists():
            raise FileNotFoundError(f"no checkpoint at {source}: pass --model DIR (or --tiny-random)")
        rater = load_rater(source, dtype=cfg.dtype, device=cfg.device, max_new_tokens=cfg.max_new_tokens)
    qalign = np.array([r.score for r in rater.rate(images, batch_size=cfg.batch_size)])
    regressed = None
    if cfg.qscorer:
        scorer = load_qscorer(cfg.qscorer, dtype=torch_dtype(cfg.dtype), device=cfg.device,
                              max_new_tokens=cfg.max_new_tokens)  # fmt: skip
        regressed = np.array([q.regressed for q in scorer.rate(images, batch_size=cfg.batch_size)])
    result = conversion_error(np.array([r.mos01 for r in records]), qalign, regressed, restore=cfg.restore)

    out = cfg.out_dir
    payload = {"model": source, "qscorer": cfg.qscorer, "dataset": cfg.dataset, "split": cfg.split,
               "ids": [r.id for r in records], **result.to_dict()}  # fmt: skip
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", payload),
        "figure": figures.conversion_staircase(result, out / f"{NAME}.png"),
    }
    return Result(conversion=result, files=files, model=source)


def render(result: Result, console: Any) -> None:
    """Print the three errors."""
    from rich.table import Table

    c = result.conversion
    table = Table(title=f"Conversion error on 0-1 ({c.label_approximation.n} images, restore={c.restore})")
    for column in ("", "RMSE", "SRCC", "PLCC"):
        table.add_column(column, justify="right" if column else "left")
    for name, stats in (
        ("label approximation (floor)", c.label_approximation),
        ("Q-Align score", c.restoration),
        ("score-token regressor", c.score_token),
    ):
        if stats is not None:
            table.add_row(name, f"{stats.rmse:.4f}", f"{stats.srcc:.3f}", f"{stats.plcc:.3f}")
    console.print(table)
    if c.beyond_floor is not None:
        console.print(f"the Q-Align score lies {c.beyond_floor:+.4f} RMSE beyond the label floor")
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
