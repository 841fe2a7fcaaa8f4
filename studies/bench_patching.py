"""Benchmark: a batched patching sweep vs one forward per configuration, same results.

Question: how much does stacking a sweep's configurations along the batch axis
(`mechbiqa.analysis.patching.sweep`) save over running one forward per
configuration, and are the numbers the same?

Method: a random compact-size model (`ModelConfig.compact()`: 65 image tokens,
8 LLM layers of width 128), a random prompt with one image. The sweep: each of
5 image tokens, at every LLM layer, under 3 conditions (zero, mean over the
images, the other image's activation), edited in the residual stream entering
the layer: 5 x layers x 3 configurations, each a single-token edit. Run it
with `sweep` (stacked rows, images encoded once, each row starting from the
clean run's state at its layer and position) and, as the baseline, with one
plain ``model.run_with_hooks`` forward per configuration whose hooks come from
`mechbiqa_hooks.patch` (an independent implementation of the same edits);
best wall time of ``--repeats`` alternating runs each; assert equal answers and scores
within 1e-5. ``--no-share-prefix`` times the sweep with stacking alone.

Example::

    python studies/bench_patching.py --images 2 --repeats 3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mechbiqa_hooks import names, patch

from mechbiqa import cli, outputs
from mechbiqa.analysis.patching import Readout, gather_activations, image_token_grid, read_quality, sweep
from mechbiqa.benchmarking import interleaved_best
from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.config import IMAGE_TOKEN_INDEX
from mechbiqa.sources import seeded_model


@dataclass(frozen=True)
class Config:
    """A benchmark run.

    Attributes:
        images: Clean images (each configuration runs on each).
        tokens: Image tokens edited one at a time.
        prompt_len: Text tokens of the prompt (the image adds 65).
        batch_size: Rows per forward of the batched sweep.
        repeats: Runs per method; the best time counts.
        threads: torch CPU threads (None: leave as is).
        seed: Seed of the weights, prompt and images.
        share_prefix: Let sweep rows start from the clean run's state (False: stacking alone).
        forward_cost: `sweep`'s fixed cost of a forward (None: its default for the device).
    """

    images: int = 1
    tokens: int = 5
    prompt_len: int = 30
    batch_size: int = 64
    repeats: int = 5
    threads: int | None = None
    seed: int = 0
    share_prefix: bool = True
    forward_cost: float | None = None

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.images < 1 or self.tokens < 1 or self.repeats < 1 or self.prompt_len < 2:
            raise ValueError(
                f"--images {self.images}, --tokens {self.tokens}, --repeats {self.repeats}, --prompt-len "
                f"{self.prompt_len}: pass at least 1 image, token and repeat, and 2 prompt tokens"
            )


@dataclass(frozen=True)
class Result:
    """Timings and the equality check.

    Attributes:
        n_configurations: Configurations in the sweep.
        batched_seconds: Best wall time of the batched sweep.
        single_seconds: Best wall time with one plain hooked forward per configuration.
        speedup: ``single / batched``.
        batched_forwards: Forwards the batched sweep took.
        single_forwards: Forwards the other took.
        max_score_difference: Largest |score difference| between the two.
        max_logit_diff_difference: Largest |logit-difference difference|.
        answers_equal: Whether every answer agrees.
        threads: torch threads used.
        config: The run.
    """

    n_configurations: int
    batched_seconds: float
    single_seconds: float
    speedup: float
    batched_forwards: int
    single_forwards: int
    max_score_difference: float
    max_logit_diff_difference: float
    answers_equal: bool
    threads: int
    config: Config = field(default_factory=Config)


def one_forward_per_configuration(
    model: MPLUGOwl2, ids: torch.Tensor, pixels: torch.Tensor, configurations: list, readout: Readout
) -> tuple[np.ndarray, ...]:
    """The baseline: a full hooked forward per configuration, edits written by `mechbiqa_hooks.patch`."""
    parts = []
    for config in configurations:
        hooks = []
        for edit in config.edits:
            pos = edit.positions if edit.positions.ndim == 2 else edit.positions.expand(ids.shape[0], -1)
            if edit.setter.values is None:
                hooks.append((edit.hook, patch.ablate_hook(pos, "zero", pos_dim=edit.pos_dim)))
            else:

                def write(act, hook, pos=pos, values=edit.setter.values, dim=edit.pos_dim):  # noqa: ANN001
                    return patch.set_positions(act, pos, values, dim)

                hooks.append((edit.hook, write))
        with torch.no_grad():
            logits = model.run_with_hooks(ids, images=pixels, fwd_hooks=hooks).logits[:, readout.position]
        parts.append(read_quality(logits, readout))
    return tuple(
        np.stack(p) for p in zip(*parts, strict=True)
    )  # score, logit_diff, probs, answer: [config, clean]


def main(cfg: Config) -> Result:
    """Build the model and the sweep, time both ways, compare."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    model = seeded_model(ModelConfig.compact(), cfg.seed)
    ids = torch.randint(3, model.cfg.llm.vocab_size, (1, cfg.prompt_len), generator=g)
    ids[0, 0], ids[0, cfg.prompt_len // 2] = 1, IMAGE_TOKEN_INDEX
    ids = ids.expand(cfg.images, -1)
    size = model.cfg.vision.image_size
    pixels = torch.randn(cfg.images, 3, size, size, generator=g)
    n_image = model.cfg.n_image_tokens
    positions = (cfg.prompt_len // 2 + torch.arange(n_image)).expand(cfg.images, -1)
    layers = range(model.cfg.llm.n_layers)
    acts = gather_activations(model, ids, pixels, [names.resid_pre(layer) for layer in layers], positions)
    chosen = torch.linspace(0, n_image - 1, cfg.tokens).long()  # spread over the image
    configurations = []
    for token in chosen.tolist():
        configurations += image_token_grid(
            positions,
            {f"token {token}": torch.full((cfg.images, 1), token)},
            layers,
            sites=("resid",),
            setters=("zero", "mean", "source"),
            image_acts=acts,
            source_of=torch.arange(cfg.images).roll(1),
        )
    readout = Readout(tuple(range(10, 15)))
    sweep(model, ids, pixels, configurations[:1], readout)  # warm-up: one-off allocation costs
    batched_s, batched, single_s, (score, diff, _, answer) = interleaved_best(
        lambda: sweep(
            model,
            ids,
            pixels,
            configurations,
            readout,
            batch_size=cfg.batch_size,
            share_prefix=cfg.share_prefix,
            forward_cost=cfg.forward_cost,
        ),
        lambda: one_forward_per_configuration(model, ids, pixels, configurations, readout),
        cfg.repeats,
    )
    result = Result(
        n_configurations=len(configurations),
        batched_seconds=batched_s,
        single_seconds=single_s,
        speedup=single_s / batched_s,
        batched_forwards=batched.n_forwards,
        single_forwards=len(configurations),
        max_score_difference=float(np.abs(batched.score - score).max()),
        max_logit_diff_difference=float(np.abs(batched.logit_diff - diff).max()),
        answers_equal=bool((batched.answer == answer).all()),
        threads=torch.get_num_threads(),
        config=cfg,
    )
    if not (
        result.answers_equal
        and result.max_score_difference < 1e-5
        and result.max_logit_diff_difference < 1e-4
    ):
        raise AssertionError(f"the batched sweep differs from one forward per configuration: {result}")
    return result


def render(result: Result, console: Any) -> None:
    """The numbers as JSON on stdout, then one sentence."""
    console.out(outputs.dumps({"config": result.config, "result": result}), highlight=False)
    console.print(
        f"{result.n_configurations} configurations x {result.config.images} image(s): batched "
        f"{result.batched_seconds:.2f} s ({result.batched_forwards} forwards) vs one forward per "
        f"configuration {result.single_seconds:.2f} s ({result.single_forwards} forwards): "
        f"{result.speedup:.1f}x faster; max |Δscore| {result.max_score_difference:.1e}, "
        f"answers equal: {result.answers_equal}"
    )


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
