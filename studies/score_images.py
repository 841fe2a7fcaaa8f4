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

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from mechbiqa.data import apply_distortion, find_photos, load_photo
from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.load import load_components
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, QALIGN_SCORER_PROMPT
from mechbiqa.model.tokenizer import train_compact_tokenizer
from mechbiqa.reports import ratings_table
from mechbiqa.scoring import Ratings, rate_images

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "cache" / "compact" / "one-stage"


@dataclass(frozen=True)
class Config:
    """What to score and with which checkpoint."""

    model: str | None = None  # checkpoint directory; None: the compact one-stage checkpoint, else a random one
    images: tuple[str, ...] = ()  # image files; empty: packaged photos, clean and distorted
    out_dir: str = str(REPO / "cache" / "score_images")
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Result:
    """Per-image ratings and where they came from."""

    names: list[str]
    ratings: Ratings
    checkpoint: str


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
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    checkpoint = cfg.model or (str(DEFAULT_CHECKPOINT) if (DEFAULT_CHECKPOINT / "config.json").is_file() else None)
    if checkpoint is None:
        model, tokenizer, processor = random_compact(cfg.seed)
        model = model.to(cfg.device, dtype)
        checkpoint = "random compact model (untrained: run studies/train_pair.py for a trained one)"
    else:
        parts = load_components(checkpoint, dtype=dtype, device=cfg.device)
        model, tokenizer, processor = parts.model, parts.tokenizer, parts.processor
    paths = [Path(p) for p in cfg.images] or demo_images(out_dir, cfg.seed)
    ratings = rate_images(model, tokenizer, processor(paths), batch_size=cfg.batch_size)
    names = [p.name for p in paths]
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    (out_dir / "ratings.json").write_text(json.dumps({
        "checkpoint": checkpoint, "prompt": ratings.prompt, "level_words": list(LEVEL_WORDS),
        "images": [{"image": str(p), "score_0to1": float(s), "level": lv, "level_probs": pr.tolist()}
                   for p, s, lv, pr in zip(paths, ratings.scores, ratings.levels, ratings.level_probs)],
    }, indent=2) + "\n")
    return Result(names=names, ratings=ratings, checkpoint=checkpoint)


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files (default: packaged photos, clean and distorted)")
    p.add_argument("--model", help="checkpoint directory in the original layout (config.json + weights + tokenizer)")
    p.add_argument("--out-dir", default=Config.out_dir)
    p.add_argument("--dtype", default=Config.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=Config.device)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--seed", type=int, default=Config.seed)
    a = p.parse_args(argv)
    return Config(model=a.model, images=tuple(a.images), out_dir=a.out_dir, dtype=a.dtype, device=a.device,
                  batch_size=a.batch_size, seed=a.seed)


if __name__ == "__main__":
    config = parse_args()
    result = main(config)
    console = Console()
    console.print(ratings_table(result.names, result.ratings.scores, result.ratings.level_probs,
                                title=f"Q-Align ratings - {result.checkpoint}"))
    console.print(f"written to {config.out_dir}/ratings.json")
