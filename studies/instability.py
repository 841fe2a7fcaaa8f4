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
import torch

from mechbiqa import cli, outputs, reports
from mechbiqa.analysis.instability import (
    InstabilityResult,
    SamplingConfig,
    answer_levels,
    decode,
    sample_answers,
    session_generators,
    summarise_instability,
)
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.scoring import level_ids
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_samples, torch_dtype

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


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def main(cfg: Config) -> Result:
    """Sample, parse levels, summarise; write JSON and config."""
    checkpoint = None if cfg.tiny_random else Path(cfg.model or DEFAULT_CHECKPOINT)
    two_stage = (
        checkpoint is not None and (checkpoint / "stage1").is_dir() and (checkpoint / "stage2").is_dir()
    )
    model, tokenizer, processor, _ = load_model(
        str(checkpoint / "stage1") if two_stage else cfg.model,
        tiny_random=cfg.tiny_random,
        seed=cfg.seed,
        dtype=cfg.dtype,
        device=cfg.device,
    )
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    stage2 = template = None
    if two_stage or (checkpoint is not None and (checkpoint / "mechbiqa.json").is_file()):
        from mechbiqa.model.prompts import get_template
        from mechbiqa.pipeline import expect_checkpoint, task_prompt

        info = (
            expect_checkpoint(checkpoint / "stage1", "two-stage", 1)
            if two_stage
            else expect_checkpoint(checkpoint, "one-stage")
        )  # type: ignore[operator]
        template = get_template(info.template)
        mode = "two-stage" if two_stage else "one-stage"
        prompt = task_prompt(tokenizer, template, "stage1" if two_stage else "one-stage")
        if two_stage:
            from mechbiqa.model.load import load_components

            expect_checkpoint(checkpoint / "stage2", "two-stage", 2)  # type: ignore[operator]
            stage2 = load_components(
                checkpoint / "stage2", dtype=torch_dtype(cfg.dtype), device=cfg.device  # type: ignore[operator]
            )
    else:
        from mechbiqa_hooks.record import PromptConfig

        mode, prompt = "prompted", PromptConfig().encode(tokenizer, "generate")
    sampling = cfg.sampling
    final_tokenizer = stage2.tokenizer if stage2 is not None else tokenizer
    levels_of = level_ids(final_tokenizer)
    n, n_rows = len(samples), len(sampling.seeds) * sampling.n_answers
    levels = np.full((len(sampling.seeds), n, sampling.n_answers), -1, dtype=np.int64)
    texts: list[list[list[str]]] = []
    began = time.perf_counter()
    for start in range(0, n, cfg.batch_images):
        chunk = samples[start : start + cfg.batch_images]
        pixels = processor([s.image_path for s in chunk])
        ids = torch.tensor([prompt.ids] * len(chunk))
        numbers = list(range(start, start + len(chunk)))
        generators = session_generators(sampling, numbers, model.device)
        tokens = sample_answers(
            model,
            ids,
            pixels,
            sampling,
            image_numbers=numbers,
            eos_token_id=tokenizer.eos_id,
            generators=generators,
        )  # [session, image, answer, new]
        if stage2 is not None:  # stage 2 rates each sampled description, text only, its stream continuing
            from mechbiqa.pipeline import task_prompt

            rows = tokens.transpose(0, 1).reshape(len(chunk) * n_rows, -1).tolist()  # generator order
            descriptions = [tokenizer.decode(_cut(r, tokenizer.eos_id)).strip() for r in rows]
            asks = [task_prompt(stage2.tokenizer, template, "stage2", d).ids for d in descriptions]  # type: ignore[arg-type]
            width = max(len(a) for a in asks)
            ids2 = torch.full((len(asks), width), stage2.tokenizer.pad_id, dtype=torch.long)
            mask2 = torch.zeros_like(ids2)
            for i, a in enumerate(asks):
                ids2[i, : len(a)], mask2[i, : len(a)] = torch.tensor(a), 1
            cache = stage2.model.prefill(
                ids2.to(stage2.model.device), attention_mask=mask2.to(stage2.model.device)
            )
            answer = decode(stage2.model, cache, sampling, generators, eos_token_id=stage2.tokenizer.eos_id)
            tokens = answer.reshape(len(chunk), len(sampling.seeds), sampling.n_answers, -1).transpose(0, 1)
        eos = final_tokenizer.eos_id
        flat = tokens.reshape(-1, tokens.shape[-1])
        levels[:, start : start + len(chunk)] = answer_levels(flat, levels_of, eos).reshape(
            len(sampling.seeds), len(chunk), sampling.n_answers
        )
        for i in range(min(len(chunk), max(0, N_TEXTS - start))):
            texts.append(
                [
                    [
                        final_tokenizer.decode(_cut(tokens[s, i, a].tolist(), eos)).strip()
                        for a in range(sampling.n_answers)
                    ]
                    for s in range(len(sampling.seeds))
                ]
            )
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
