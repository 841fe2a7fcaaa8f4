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
    python studies/instability.py --model ckpt/ --dtype bfloat16 --device cuda --n-answers 5 --seeds 0 1 2
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa import cli, outputs, reports
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
        split: Keep one split (None: every split).
        limit: Images.
        sampling: How answers are drawn (`SamplingConfig`: answers per session, session seeds,
            longest answer (each stage), sampling or greedy decoding, temperature, top-k, top-p).
        batch_images: Images prefilled together (each then decodes sessions x answers rows).
        seed: Seed of the tiny random model.
        out: Output folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype (the weights are cast as they are read).
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64)
    batch_images: int = 8
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.batch_images < 1:
            raise ValueError(f"--batch-images {self.batch_images}: pass at least 1")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images``: 4 images, short answers.

        ``overrides`` may name `SamplingConfig` fields (``do_sample=False``) as well as this Config's.
        """
        names = {f.name for f in fields(SamplingConfig)}
        sampling = {k: overrides.pop(k) for k in list(overrides) if k in names}
        base = dict(
            tiny_random=True,
            dataset=str(Path(tmp) / "images"),
            split=None,
            limit=4,
            sampling=replace(cls.sampling, **{"max_new_tokens": 6, **sampling}),
            out=str(Path(tmp) / NAME),
        )
        return cls(**{**base, **overrides})


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
    checkpoint = open_source(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )
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
    files = {"config": outputs.write_config(out, cfg), "json": out / f"{NAME}.json"}
    image_ids = tuple(str(s.id) for s in samples)
    outputs.write_json(
        files["json"],
        {
            "mode": mode,
            "model": str(checkpoint) if checkpoint else f"tiny-random(seed={cfg.seed})",
            "prompt": prompt.text,
            "seconds": seconds,
            "images": list(image_ids),
            **result.to_dict(),
            "answers": {image_ids[i]: t for i, t in enumerate(texts)},
        },
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
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
