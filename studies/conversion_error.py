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

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa import figures
from mechbiqa.analysis.conversion import ConversionResult, conversion_error
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_samples, tiny_raters

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
        limit: Keep only the first N images.
        restore: ``"qalign"`` (level values) or ``"centre"`` (bin centres).
        batch_size: Images per forward.
        max_new_tokens: Longest generated answer.
        device: ``cpu`` or ``cuda``.
        out: Output folder; None: ``cache/conversion_error``.
    """

    model: str | None = None
    tiny_random: bool = False
    qscorer: str | None = None
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    restore: str = "qalign"
    batch_size: int = 32
    max_new_tokens: int = 48
    device: str = "cpu"
    out: str | None = None

    def __post_init__(self) -> None:
        """Validate."""
        if self.restore not in ("qalign", "centre"):
            raise ValueError(f"restore must be 'qalign' or 'centre', got {self.restore!r}")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random rater on ``tmp/rated.jsonl``."""
        return cls(
            **{
                "tiny_random": True,
                "dataset": str(Path(tmp) / "rated.jsonl"),
                "split": None,
                "max_new_tokens": 4,
                "out": str(Path(tmp) / NAME),
                **overrides,
            }
        )

    @property
    def out_dir(self) -> Path:
        """Where the artefacts go."""
        return Path(self.out) if self.out else REPO / "cache" / NAME


@dataclass(frozen=True)
class Result:
    """The errors and where they were written."""

    conversion: ConversionResult
    files: dict[str, Path] = field(default_factory=dict)
    model: str = ""


def main(cfg: Config) -> Result:
    """Rate the images, compute the three errors, write JSON, figure and config."""
    from mechbiqa.pipeline import load_rater
    from mechbiqa.qscorer import load_qscorer

    records = [
        r for r in load_samples(cfg.dataset, cfg.split, cfg.limit) if getattr(r, "mos01", None) is not None
    ]
    if not records:
        raise ValueError(f"no image of {cfg.dataset!r} has a MOS; the conversion error needs rated images")
    images = [r.image_path for r in records]
    if cfg.tiny_random:
        rater, source = tiny_raters(max_new_tokens=cfg.max_new_tokens)["one-stage"], "tiny-random(seed=0)"
    else:
        source = str(cfg.model or DEFAULT_CHECKPOINT)
        if not Path(source).exists():
            raise FileNotFoundError(f"no checkpoint at {source}: pass --model DIR (or --tiny-random)")
        rater = load_rater(source, device=cfg.device)
        rater.max_new_tokens = cfg.max_new_tokens
    qalign = np.array([r.score for r in rater.rate(images, batch_size=cfg.batch_size)])
    regressed = None
    if cfg.qscorer:
        scorer = load_qscorer(cfg.qscorer, device=cfg.device, max_new_tokens=cfg.max_new_tokens)
        regressed = np.array([q.regressed for q in scorer.rate(images, batch_size=cfg.batch_size)])
    result = conversion_error(np.array([r.mos01 for r in records]), qalign, regressed, restore=cfg.restore)

    out = cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.json", "json": out / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    payload = {
        "model": source,
        "qscorer": cfg.qscorer,
        "dataset": cfg.dataset,
        "split": cfg.split,
        "ids": [r.id for r in records],
        **result.to_dict(),
    }
    files["json"].write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    files["figure"] = figures.conversion_staircase(result, out / f"{NAME}.png")
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
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--model", help="checkpoint directory (default: the compact one-stage checkpoint)")
    p.add_argument("--tiny-random", action="store_true", help="the tiny random rater (pipeline check)")
    p.add_argument("--qscorer", help="a Q-Scorer checkpoint directory (adds the score-token row)")
    p.add_argument("--dataset", default=d.dataset, help="builtin, a .jsonl of IQARecords, or NAME=ROOT")
    p.add_argument("--split", default=d.split, help="split to keep ('' for all)")
    p.add_argument("--limit", type=int, help="first N images only")
    p.add_argument(
        "--restore", default=d.restore, choices=("qalign", "centre"), help="restored score of a bin"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", help="output folder (default: cache/conversion_error)")
    a = p.parse_args(argv)
    return Config(
        model=a.model,
        tiny_random=a.tiny_random,
        qscorer=a.qscorer,
        dataset=a.dataset,
        split=a.split or None,
        limit=a.limit,
        restore=a.restore,
        batch_size=a.batch_size,
        max_new_tokens=a.max_new_tokens,
        device=a.device,
        out=a.out,
    )


if __name__ == "__main__":
    from rich.console import Console

    try:
        render(main(parse_args()), Console())
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"conversion_error: {error}") from None
