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

from dataclasses import dataclass, field
from typing import Any

import torch

from mechbiqa import cli, outputs
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
        sampling: Answers per session (5), session seeds (3 sessions), tokens per answer (no EOS:
            every answer runs to the end), temperature ... (`SamplingConfig`).
        prompt_len: Text tokens of the prompt (the image adds 65).
        repeats: Alternating runs per method; the best time counts.
        threads: torch CPU threads (None: leave as is).
        seed: Seed of the weights, prompts and images.
    """

    images: int = 2
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32)
    prompt_len: int = 30
    repeats: int = 2
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.images < 1 or self.repeats < 1 or self.prompt_len < 2:
            raise ValueError(
                f"--images {self.images}, --repeats {self.repeats}, --prompt-len {self.prompt_len}: "
                "pass at least 1 image, 1 repeat and 2 prompt tokens"
            )


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
        config: The run.
    """

    n_answers_total: int
    shared_seconds: float
    independent_seconds: float
    speedup: float
    tokens_equal: bool
    threads: int
    config: Config = field(default_factory=Config)


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
    sampling = cfg.sampling
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
        config=cfg,
    )
    if not result.tokens_equal:
        raise AssertionError(
            f"shared-prefill sampling drew other tokens than independent generations: {result}"
        )
    return result


def render(result: Result, console: Any) -> None:
    """The numbers as JSON on stdout, then one sentence."""
    console.out(outputs.dumps({"config": result.config, "result": result}), highlight=False)
    console.print(
        f"{result.n_answers_total} answers of {result.config.sampling.max_new_tokens} tokens: "
        f"shared prefill {result.shared_seconds:.2f} s vs "
        f"independent generations {result.independent_seconds:.2f} s: {result.speedup:.1f}x faster; "
        f"identical tokens: {result.tokens_equal}"
    )


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
