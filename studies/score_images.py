"""Score images with an mPLUG-Owl2 checkpoint, Q-Align's way.

Question: what does a checkpoint say about the quality of these images?
Method: Q-Align's scorer prompt ("... ASSISTANT: The quality of the image is"),
softmax over the five level-word logits at the last position, expectation of
the level weights (`LEVEL_WEIGHTS`: 1 for excellent .. 0 for bad). Output: a
rich table (score, level, level distribution) and ``ratings.json`` +
``config.json`` in the output directory.

The checkpoint is opened with `mechbiqa.sources.open_source` (in ``--dtype`` on
``--device``), so any kind rates: a released checkpoint with Q-Align's scorer
prompt, a one-stage checkpoint or a two-stage pair (the folder holding
``stage1/`` and ``stage2/``) as its pipeline does (a generated description,
then the quality word after it). With no ``--model`` it uses the compact
one-stage checkpoint that ``studies/train_pair.py`` leaves in ``cache/``; when
that does not exist yet it builds a *random* compact model (scores then mean
nothing: it shows the pipeline); ``--tiny-random`` uses the tiny random model.
With no images it rates packaged photos, clean and distorted.

Files that cannot be read (missing, corrupt, not an image, a mode with no RGB
reading) do not stop the run: the others are rated, each bad one is listed in
the output and in ``ratings.json`` (``{"image": ..., "error": reason}``), and
the script exits with code 1. When no file can be read it ends with one line
and rates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from mechbiqa import cli, outputs
from mechbiqa.checkpoint import Checkpoint
from mechbiqa.data.synthetic import demo_images
from mechbiqa.model.load import Components
from mechbiqa.model.processor import ImageFailure, load_images
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.reports import ratings_table
from mechbiqa.scoring import Ratings
from mechbiqa.sources import open_source, random_compact, torch_dtype

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "cache" / "compact" / "one-stage"


@dataclass(frozen=True)
class Config:
    """What to score and with which checkpoint.

    Attributes:
        images: Image files; none given: packaged photos, clean and distorted. Files that cannot be
            read are reported and skipped (exit code 1).
        model: Checkpoint directory (released, one-stage) or two-stage pair folder (stage1/, stage2/);
            None: the compact one-stage checkpoint, or a random compact model until one is trained.
        tiny_random: Use the tiny random model instead (pipeline checks, tests).
        out: Output folder (``ratings.json``, ``config.json``, the demo images).
        dtype: Model dtype (the weights are cast as they are read).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        batch_size: Images per forward.
        seed: Seed of the demo distortions and of the random model.
        max_new_tokens: Longest generated description (one-stage and two-stage checkpoints).
    """

    images: tuple[str, ...] = field(default=(), metadata=cli.meta(positional=True))
    model: str | None = None
    tiny_random: bool = False
    out: str = field(default=str(REPO / "cache" / "score_images"), metadata=cli.meta(aliases=("--out-dir",)))
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option).

        Image files are not checked here: one that cannot be read is reported by `main`
        while the others are rated.
        """
        cli.check_common(self)
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: pass at least 1")


@dataclass(frozen=True)
class Result:
    """Per-image ratings, the files that could not be read, and where they came from.

    Attributes:
        names: File name of each rated image (the rows of ``ratings``).
        ratings: Ratings of the images that loaded, in input order.
        checkpoint: The checkpoint's name (its path, or what the random model is).
        failures: One per file that could not be read (path and reason).
        file: The ``ratings.json`` written.
    """

    names: list[str]
    ratings: Ratings
    checkpoint: str
    failures: tuple[ImageFailure, ...] = ()
    file: Path | None = None

    @property
    def exit_code(self) -> int:
        """1 when some file could not be read, else 0 (`mechbiqa.cli.run` exits with it)."""
        return 1 if self.failures else 0


def open_model(cfg: Config) -> Checkpoint:
    """The checkpoint to rate with, in ``cfg.dtype`` on ``cfg.device`` (see the module docstring)."""
    if cfg.tiny_random or cfg.model or (DEFAULT_CHECKPOINT / "config.json").is_file():
        return open_source(cfg.model or DEFAULT_CHECKPOINT, tiny_random=cfg.tiny_random, seed=cfg.seed,
                           dtype=cfg.dtype, device=cfg.device, max_new_tokens=cfg.max_new_tokens)
    model, tokenizer, processor = random_compact(cfg.seed)  # the seed draws the weights
    parts = Components(model=model.to(cfg.device, torch_dtype(cfg.dtype)), tokenizer=tokenizer,
                       processor=processor, path=Path("random-compact"))
    name = "random compact model (untrained: run studies/train_pair.py for a trained one)"
    return Checkpoint.released(parts, max_new_tokens=cfg.max_new_tokens, name=name)


def no_image_loaded(failures: list[ImageFailure]) -> ValueError:
    """The one-line error when every file failed (the first few named with their reasons)."""
    more = f"; ... (+{len(failures) - 3} more)" if len(failures) > 3 else ""
    shown = "; ".join(map(str, failures[:3])) + more
    return ValueError(f"none of the {len(failures)} image file(s) could be read ({shown}); "
                      "pass readable image files (PNG, JPEG, ...)")


def main(cfg: Config) -> Result:
    """Rate the images that load; write ``ratings.json`` (ratings and failures) and ``config.json``.

    Raises:
        ValueError: No image file could be read (nothing is rated or written).
    """
    out_dir = Path(cfg.out)
    paths = [Path(p) for p in cfg.images]
    if not paths:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = demo_images(out_dir, cfg.seed)
    loaded, failures = load_images(paths)
    if not loaded:
        raise no_image_loaded(failures)
    checkpoint = open_model(cfg)
    rated = checkpoint.rate([image for _, image in loaded], batch_size=cfg.batch_size)
    ratings = Ratings(
        scores=np.array([r.score for r in rated], dtype=np.float32),
        level_probs=np.stack([np.asarray(r.level_probs, dtype=np.float32) for r in rated]),
        levels=[r.level for r in rated],
        prompt=rated[0].prompt.text if checkpoint.kind == "released" else "",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_config(out_dir, cfg)
    entries: list[dict[str, Any]] = [
        {"image": str(path), "score_0to1": r.score, "level": r.level, "level_probs": r.level_probs,
         **({"description": r.description} if checkpoint.kind != "released" else {})}
        for (path, _), r in zip(loaded, rated, strict=True)
    ]  # fmt: skip
    entries += [{"image": str(f.path), "error": f.reason} for f in failures]
    file = outputs.write_json(out_dir / "ratings.json", {
        "checkpoint": checkpoint.name, "kind": checkpoint.kind, "prompt": ratings.prompt or None,
        "level_words": list(LEVEL_WORDS), "images": entries,
    }, indent=2)  # fmt: skip
    return Result(names=[p.name for p, _ in loaded], ratings=ratings, checkpoint=checkpoint.name,
                  failures=tuple(failures), file=file)


def render(result: Result, console: Console) -> None:
    """Print the ratings table, each file that could not be read, and where they were written."""
    console.print(ratings_table(result.names, result.ratings.scores, result.ratings.level_probs,
                                title=f"Q-Align ratings - {result.checkpoint}"))
    if result.failures:
        total = len(result.failures) + len(result.names)
        head = f"{len(result.failures)} of {total} image file(s) could not be read, not rated:"
        console.print(head, style="red", soft_wrap=True)
        for failure in result.failures:
            console.print(f"  {failure}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"written to {result.file}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
