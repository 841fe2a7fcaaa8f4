"""Instability of sampled answers (the paper's Table 1), and level accuracy against the labels.

Question: asked the same image several times with sampling, how often does
the model change its quality level? The paper finds 22% of answers unstable
after one-stage tuning and 12% after two-stage tuning, with level accuracy
rising from 52.5% to 61.2%.

Method (DESIGN.md, "Instability ratio"): per image, 5 sampled answers per
session, 3 sessions with different seeds. An answer's level is its last level
word (none: unstable by definition); an answer is unstable when its level
differs from that image's most common level in the session; ratio = unstable
answers / all answers, mean and sample std over sessions
(`mechbiqa.analysis.instability`). Level accuracy = answers at the label's
level word. The 15 answers of an image share one prefill of its prompt; each
answer draws from its own seeded random stream, so answers do not depend on
batching.

Which answer is sampled:

* a one-stage checkpoint of ``mechbiqa.train``: its task prompt; the answer is
  description + "The quality of the image is {level}." (`mechbiqa.pipeline`);
* a two-stage pair (a folder with ``stage1/`` and ``stage2/``): stage 1 samples
  a description, stage 2 (text only) samples the quality sentence from it, the
  same random stream continuing;
* any other checkpoint, and the tiny random model: Q-Align's question with an
  open answer.

Output (in ``--out``, default ``cache/instability/``): ``config.json``,
``instability.json`` (every answer's level; the first images' answer texts).

Example::

    python studies/instability.py --model cache/compact/one-stage --split test
    python studies/instability.py --model cache/compact/two-stage --split test
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa import reports
from mechbiqa.analysis.instability import (
    InstabilityResult,
    SamplingConfig,
    sample_checkpoint,
    summarise_instability,
)
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.sources import load_samples, open_source

NAME = "instability"
REPO = Path(__file__).resolve().parents[1]
N_TEXTS = 20  # images whose answer texts go into the JSON


@dataclass(frozen=True)
class Config:
    """An instability run.

    Attributes:
        model: One-stage checkpoint, two-stage pair folder, or any checkpoint; None with
            ``tiny_random``, else the compact one-stage default.
        tiny_random: The tiny random model (`mechbiqa.sources.tiny_random_model`).
        dataset: ``builtin``, a folder of images, a ``.jsonl`` of records, or ``NAME=ROOT``.
        split: Keep one split.
        limit: Images.
        n_answers: Answers per image per session (5).
        seeds: One seed per session (3 sessions).
        max_new_tokens: Longest answer (each stage).
        do_sample: Sample (False: greedy, instability 0 by construction).
        temperature: Sampling temperature.
        top_k: Keep the k most likely tokens.
        top_p: Nucleus threshold.
        batch_images: Images prefilled together (each then decodes sessions x answers rows).
        seed: Seed of the tiny random model.
        out: Output folder.
        device: ``cpu`` or ``cuda``.
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    n_answers: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_images: int = 8
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images``: 4 images, short answers."""
        base = dict(
            tiny_random=True,
            dataset=str(Path(tmp) / "images"),
            split=None,
            limit=4,
            max_new_tokens=6,
            out=str(Path(tmp) / NAME),
        )
        return cls(**{**base, **overrides})

    @property
    def sampling(self) -> SamplingConfig:  # noqa: D102
        return SamplingConfig(
            n_answers=self.n_answers,
            seeds=self.seeds,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


@dataclass(frozen=True)
class Result:
    """The instability summary and what it was measured on.

    Attributes:
        instability: The `InstabilityResult`.
        mode: ``one-stage``, ``two-stage`` or ``prompted`` (any other model).
        image_ids: The images.
        seconds: Wall time of the sampling.
        files: Artefact name -> path.
    """

    instability: InstabilityResult
    mode: str
    image_ids: tuple[str, ...]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def _label_level(sample: Any) -> int:
    word = getattr(sample, "level_word", None)
    return LEVEL_WORDS.index(word) if word in LEVEL_WORDS else -1


def main(cfg: Config) -> Result:
    """Sample, parse levels, summarise; write JSON and config."""
    checkpoint = open_source(cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, device=cfg.device)
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    sampling = cfg.sampling
    began = time.perf_counter()
    sampled = sample_checkpoint(
        checkpoint, [s.image_path for s in samples], sampling, batch_images=cfg.batch_images, n_texts=N_TEXTS
    )
    levels, texts, mode, prompt = sampled.levels, sampled.texts, sampled.mode, sampled.prompt
    checkpoint = None if cfg.tiny_random else checkpoint.name
    seconds = time.perf_counter() - began
    result = summarise_instability(levels, np.array([_label_level(s) for s in samples]), sampling.seeds)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.json", "json": out / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    image_ids = tuple(str(s.id) for s in samples)
    files["json"].write_text(
        json.dumps(
            {
                "mode": mode,
                "model": str(checkpoint) if checkpoint else f"tiny-random(seed={cfg.seed})",
                "prompt": prompt.text,
                "seconds": seconds,
                "images": list(image_ids),
                **result.to_dict(),
                "answers": {image_ids[i]: t for i, t in enumerate(texts)},
            },
            indent=1,
        )
        + "\n"
    )
    return Result(instability=result, mode=mode, image_ids=image_ids, seconds=seconds, files=files)


def render(result: Result, console: Any) -> None:
    """Print the instability table."""
    console.print(
        reports.instability_table(result.instability, title=f"Instability of sampled answers ({result.mode})")
    )
    console.print(f"{len(result.image_ids)} images sampled in {result.seconds:.1f} s")
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--model", help="checkpoint or two-stage pair folder (default: cache/compact/one-stage)")
    p.add_argument("--tiny-random", action="store_true", help="the tiny random model (pipeline check)")
    p.add_argument(
        "--dataset", default=d.dataset, help="'builtin', a folder of images, a .jsonl, or NAME=ROOT"
    )
    p.add_argument("--split", default=d.split, help="keep one split (default: test; 'all' keeps every split)")
    p.add_argument("--limit", type=int, help="keep the first N images")
    p.add_argument("--n-answers", type=int, default=d.n_answers, help="answers per image per session")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="one seed per session")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (instability 0 by construction)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--batch-images", type=int, default=d.batch_images)
    p.add_argument("--out", default=d.out)
    p.add_argument("--device", default=d.device)
    a = p.parse_args(argv)
    return Config(
        model=a.model,
        tiny_random=a.tiny_random,
        dataset=a.dataset,
        split=None if a.split == "all" else a.split,
        limit=a.limit,
        n_answers=a.n_answers,
        seeds=tuple(a.seeds),
        max_new_tokens=a.max_new_tokens,
        do_sample=not a.greedy,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        batch_images=a.batch_images,
        out=a.out,
        device=a.device,
    )


if __name__ == "__main__":
    from rich.console import Console

    render(main(parse_args()), Console())
