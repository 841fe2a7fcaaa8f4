"""Benchmark: instability sampling with a shared prompt prefill vs 15 independent generations, same tokens.

Question: how much does drawing an image's 15 answers (3 sessions x 5) from one
prefill of its prompt (`mechbiqa.analysis.instability.sample_answers`) save
over 15 independent ``model.generate`` calls, and are the answers the same?

Method: a random compact-size model (`ModelConfig.compact()`), random prompts
with one image each. Shared: each batch of images is prefilled once, the cache
repeated 15 times, and all continuations decode together, each row drawing
from its own seeded stream. Independent
(`mechbiqa.analysis.instability.sample_answers_independently`): one full
``generate`` per answer (prompt, image and all), seeded with the same stream.
Best wall time of ``--repeats`` alternating runs each; the generated tokens
must be identical.

Example::

    python studies/bench_instability.py --images 2 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from mechbiqa.analysis.instability import SamplingConfig, sample_answers, sample_answers_independently
from mechbiqa.benchmarking import interleaved_best
from mechbiqa.model import ModelConfig
from mechbiqa.model.config import IMAGE_TOKEN_INDEX
from mechbiqa.sources import seeded_model


@dataclass(frozen=True)
class Config:
    """A benchmark run.

    Attributes:
        images: Images (each gets sessions x answers continuations).
        n_answers: Answers per session (5).
        seeds: Session seeds (3 sessions).
        max_new_tokens: Tokens per answer (no EOS: every answer runs to the end).
        prompt_len: Text tokens of the prompt (the image adds 65).
        temperature: Sampling temperature.
        repeats: Alternating runs per method; the best time counts.
        threads: torch CPU threads (None: leave as is).
        seed: Seed of the weights, prompts and images.
    """

    images: int = 2
    n_answers: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 32
    prompt_len: int = 30
    temperature: float = 1.0
    repeats: int = 2
    threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Result:
    """Timings and the equality check.

    Attributes:
        n_answers_total: Continuations drawn (images x sessions x answers).
        shared_seconds: Best wall time with the shared prefill.
        independent_seconds: Best wall time of independent generations.
        speedup: ``independent / shared``.
        tokens_equal: Whether every generated token agrees.
        threads: torch threads used.
    """

    n_answers_total: int
    shared_seconds: float
    independent_seconds: float
    speedup: float
    tokens_equal: bool
    threads: int


def main(cfg: Config) -> Result:
    """Build the model, sample both ways, compare."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    model = seeded_model(ModelConfig.compact(), cfg.seed)
    ids = torch.randint(3, model.cfg.llm.vocab_size, (cfg.images, cfg.prompt_len), generator=g)
    ids[:, 0], ids[:, cfg.prompt_len // 2] = 1, IMAGE_TOKEN_INDEX
    size = model.cfg.vision.image_size
    pixels = torch.randn(cfg.images, 3, size, size, generator=g)
    sampling = SamplingConfig(
        n_answers=cfg.n_answers,
        seeds=cfg.seeds,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
    )
    sample_answers(
        model, ids[:1], pixels[:1], SamplingConfig(n_answers=1, seeds=(0,), max_new_tokens=2)
    )  # warm-up
    shared_s, shared, alone_s, alone = interleaved_best(
        lambda: sample_answers(model, ids, pixels, sampling),
        lambda: sample_answers_independently(model, ids, pixels, sampling),
        cfg.repeats,
    )
    result = Result(
        n_answers_total=int(shared.shape[0] * shared.shape[1] * shared.shape[2]),
        shared_seconds=shared_s,
        independent_seconds=alone_s,
        speedup=alone_s / shared_s,
        tokens_equal=bool(torch.equal(shared, alone)),
        threads=torch.get_num_threads(),
    )
    if not result.tokens_equal:
        raise AssertionError(
            f"shared-prefill sampling drew other tokens than independent generations: {result}"
        )
    return result


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    for name in ("images", "n_answers", "max_new_tokens", "prompt_len", "repeats", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    return Config(**{**{k: getattr(a, k) for k in asdict(d)}, "seeds": tuple(a.seeds)})


if __name__ == "__main__":
    cfg = parse_args()
    r = main(cfg)
    print(json.dumps({"config": asdict(cfg), "result": asdict(r)}, indent=1))
    print(
        f"{r.n_answers_total} answers of {cfg.max_new_tokens} tokens: "
        f"shared prefill {r.shared_seconds:.2f} s vs "
        f"independent generations {r.independent_seconds:.2f} s: {r.speedup:.1f}x faster; "
        f"identical tokens: {r.tokens_equal}"
    )
