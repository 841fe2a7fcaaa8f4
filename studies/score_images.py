"""Score images with an mPLUG-Owl2 checkpoint, Q-Align's way.

Question: what does a checkpoint say about the quality of these images?
Method: Q-Align's scorer prompt ("... ASSISTANT: The quality of the image is"),
softmax over the five level-word logits at the last position, expectation of
the level weights (`LEVEL_WEIGHTS`: 1 for excellent .. 0 for bad). Output: a
rich table (score, level, level distribution) and ``ratings.json`` +
``config.json`` in the output directory.

With no ``--model`` it uses the compact one-stage checkpoint that
``studies/train_pair.py`` leaves in ``cache/``; when that does not exist yet it
builds a *random* compact model (scores then mean nothing: it shows the
pipeline). With no images it rates packaged photos, clean and distorted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from mechbiqa import cli, outputs
from mechbiqa.data import apply_distortion, find_photos, load_photo
from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, QALIGN_SCORER_PROMPT
from mechbiqa.model.tokenizer import train_compact_tokenizer
from mechbiqa.reports import ratings_table
from mechbiqa.scoring import Ratings, rate_images
from mechbiqa.sources import load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "cache" / "compact" / "one-stage"


@dataclass(frozen=True)
class Config:
    """What to score and with which checkpoint.

    Attributes:
        images: Image files; none given: packaged photos, clean and distorted.
        model: Checkpoint directory in the original layout (config.json + weights + tokenizer);
            None: the compact one-stage checkpoint, or a random compact model until one is trained.
        out: Output folder (``ratings.json``, ``config.json``, the demo images).
        dtype: Model dtype (the weights are cast as they are read).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        batch_size: Images per forward.
        seed: Seed of the demo distortions and of the random model.
    """

    images: tuple[str, ...] = field(default=(), metadata=cli.meta(positional=True))
    model: str | None = None
    out: str = field(default=str(REPO / "cache" / "score_images"), metadata=cli.meta(aliases=("--out-dir",)))
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        missing = [p for p in self.images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"no such image file: {', '.join(missing)}; pass existing image files")


@dataclass(frozen=True)
class Result:
    """Per-image ratings and where they came from."""

    names: list[str]
    ratings: Ratings
    checkpoint: str
    file: Path | None = None


def demo_images(out_dir: Path, seed: int) -> list[Path]:
    """Three packaged photos, each clean, blurred and noisy (KADID level 4), saved as PNG."""
    rng = np.random.default_rng(seed)
    paths = []
    for info in find_photos()[:3]:
        photo = load_photo(info)
        for kind, image in (("clean", photo), ("blur", apply_distortion(photo, "gaussian_blur", 4, rng)),
                            ("noise", apply_distortion(photo, "white_noise", 4, rng))):
            path = out_dir / "images" / f"{info.id}_{kind}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths


def random_compact(seed: int):
    """An untrained compact model with a tokenizer that knows the prompt and level words."""
    torch.manual_seed(seed)
    tokenizer = train_compact_tokenizer([QALIGN_SCORER_PROMPT.replace("<|image|>", ""), *LEVEL_WORDS], vocab_size=300)
    cfg = ModelConfig.compact(vocab_size=tokenizer.vocab_size)
    return MPLUGOwl2(cfg).eval(), tokenizer, ImageProcessor(image_size=cfg.vision.image_size)


def main(cfg: Config) -> Result:
    """Rate the images; write ``ratings.json`` and ``config.json``."""
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = cfg.model or (str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file() else None)
    if checkpoint is None:
        model, tokenizer, processor = random_compact(cfg.seed)
        model = model.to(cfg.device, getattr(torch, cfg.dtype))
        checkpoint = "random compact model (untrained: run studies/train_pair.py for a trained one)"
    else:
        model, tokenizer, processor, _ = load_model(checkpoint, dtype=cfg.dtype, device=cfg.device)
    paths = [Path(p) for p in cfg.images] or demo_images(out_dir, cfg.seed)
    ratings = rate_images(model, tokenizer, processor(paths), batch_size=cfg.batch_size)
    names = [p.name for p in paths]
    outputs.write_config(out_dir, cfg)
    file = outputs.write_json(out_dir / "ratings.json", {
        "checkpoint": checkpoint, "prompt": ratings.prompt, "level_words": list(LEVEL_WORDS),
        "images": [{"image": str(p), "score_0to1": float(s), "level": lv, "level_probs": pr}
                   for p, s, lv, pr in zip(paths, ratings.scores, ratings.levels, ratings.level_probs)],
    }, indent=2)
    return Result(names=names, ratings=ratings, checkpoint=checkpoint, file=file)


def render(result: Result, console: Console) -> None:
    """Print the ratings table and where they were written."""
    console.print(ratings_table(result.names, result.ratings.scores, result.ratings.level_probs,
                                title=f"Q-Align ratings - {result.checkpoint}"))
    console.print(f"written to {result.file}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
