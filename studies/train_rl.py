"""GRPO fine-tuning of a one-stage checkpoint with the second paper's rewards (`mechbiqa.rl`).

Question: do rewards for the human label, for the reasoning's overlap with the
reference description, and for self-consistency (the same model, reading only
its own description, rates as it did with the image) make the answers of a
one-stage rater more grounded in its own description?

Method: `mechbiqa.rl.finetune_checkpoint`: per step, a group of G sampled
answers per image, group-normalised advantages, the clipped ratio objective
with a k3 KL penalty to the frozen starting model, loss on answer tokens only;
the result is a one-stage checkpoint (LoRA merged). Measure it with
``studies/instability.py`` / ``studies/grounding.py`` / ``studies/evaluate_quality.py``.

Output (``--out``): the checkpoint directory; its ``mechbiqa.json`` holds the
RL config and the per-step rewards, KL and clip fractions.

Example::

    python studies/train_rl.py --model cache/compact/one-stage --out cache/compact/one-stage-rl --steps 40
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a shared CPU

from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mechbiqa import cli  # noqa: E402
from mechbiqa.rl import RewardWeights, RLConfig, RLResult, finetune_checkpoint  # noqa: E402
from mechbiqa.sources import load_samples, torch_dtype  # noqa: E402
from mechbiqa.train import examples_from_records  # noqa: E402


@dataclass(frozen=True)
class Config:
    """A GRPO run: where from, where to, on which images, the `RLConfig` and the reward weights.

    Attributes:
        init_from: The one-stage checkpoint to start from (``--model``).
        out: Output checkpoint directory.
        dataset: ``builtin``, a ``.jsonl`` of IQARecords, or ``NAME=ROOT`` (records need labels).
        split: Keep only this split (None: all).
        limit: Keep only the first N images (None: all).
        rl: The GRPO run (its ``weights`` come from ``weights``).
        weights: The reward weights (``--w-*``).
        lora_rank: LoRA rank on the LLM (peft); None: full fine-tuning.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Parameter dtype (the weights are cast as they are read; ``bfloat16`` for 7B with LoRA).
    """

    init_from: str = field(
        default="cache/compact/one-stage", metadata=cli.meta(flag="--model", aliases=("--init-from",))
    )
    out: str = "cache/compact/one-stage-rl"
    dataset: str = "builtin"
    split: str | None = "train"
    limit: int | None = None
    rl: RLConfig = field(default_factory=RLConfig)
    weights: RewardWeights = field(default_factory=RewardWeights, metadata=cli.meta(prefix="w"))
    lora_rank: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank {self.lora_rank}: pass a rank of at least 1, or none for full")
        if self.rl.weights not in (RewardWeights(), self.weights):
            raise ValueError("give the reward weights as Config.weights (--w-level ...), not as rl.weights")


def main(cfg: Config, progress: Any = None) -> RLResult:
    """Fine-tune and write the checkpoint."""
    records = load_samples(cfg.dataset, cfg.split, cfg.limit)
    examples = examples_from_records(records, "one-stage")
    return finetune_checkpoint(
        cfg.init_from,
        Path(cfg.out),
        examples,
        replace(cfg.rl, weights=cfg.weights),
        lora_rank=cfg.lora_rank,
        device=cfg.device,
        dtype=torch_dtype(cfg.dtype),
        progress=progress,
    )


def main_with_progress(cfg: Config) -> RLResult:
    """`main`, printing each step as it ends."""
    from rich.console import Console

    console = Console()
    return main(
        cfg,
        progress=lambda s: console.print(
            f"step {s.step}: reward {s.reward:.3f} {s.parts} kl {s.kl:.4f} {s.seconds:.1f}s"
        ),
    )


def render(result: RLResult, console: Any) -> None:
    """Print the number of steps and their speed."""
    console.print(f"{len(result.history)} steps, {result.seconds_per_step:.1f} s/step")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main_with_progress, Config, render)
