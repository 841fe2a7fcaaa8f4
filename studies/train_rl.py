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

    python studies/train_rl.py --init-from cache/compact/one-stage --out cache/compact/one-stage-rl --steps 40
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a shared CPU

import argparse  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from mechbiqa.rl import RewardWeights, RLConfig, RLResult, finetune_checkpoint  # noqa: E402
from mechbiqa.sources import load_samples  # noqa: E402
from mechbiqa.train import examples_from_records  # noqa: E402


@dataclass(frozen=True)
class Config:
    """A GRPO run: where from, where to, on which images, and the `RLConfig`."""

    init_from: str = "cache/compact/one-stage"
    out: str = "cache/compact/one-stage-rl"
    dataset: str = "builtin"
    split: str | None = "train"
    limit: int | None = None
    rl: RLConfig = field(default_factory=RLConfig)
    lora_rank: int | None = None
    device: str = "cpu"
    dtype: str = "float32"


def main(cfg: Config, progress: Any = None) -> RLResult:
    """Fine-tune and write the checkpoint."""
    records = load_samples(cfg.dataset, cfg.split, cfg.limit)
    examples = examples_from_records(records, "one-stage")
    return finetune_checkpoint(
        cfg.init_from,
        Path(cfg.out),
        examples,
        cfg.rl,
        lora_rank=cfg.lora_rank,
        device=cfg.device,
        dtype=getattr(torch, cfg.dtype),
        progress=progress,
    )


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d, r, w = Config(), RLConfig(), RewardWeights()
    p.add_argument("--init-from", default=d.init_from, help="one-stage checkpoint directory")
    p.add_argument("--out", default=d.out, help="output checkpoint directory")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--split", default=d.split, help="'' for all")
    p.add_argument("--limit", type=int)
    for name in ("steps", "images_per_step", "group_size", "max_new_tokens", "inner_steps", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(r, name))
    for name in ("lr", "clip_eps", "kl_beta", "temperature"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(r, name))
    for name in ("level", "mos", "rouge", "consistency_answer", "consistency_label"):
        p.add_argument(
            f"--w-{name.replace('_', '-')}", type=float, default=getattr(w, name), help="reward weight"
        )
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--autocast", choices=("bfloat16", "float16"))
    a = p.parse_args(argv)
    weights = RewardWeights(
        level=a.w_level,
        mos=a.w_mos,
        rouge=a.w_rouge,
        consistency_answer=a.w_consistency_answer,
        consistency_label=a.w_consistency_label,
    )
    rl = RLConfig(
        steps=a.steps,
        images_per_step=a.images_per_step,
        group_size=a.group_size,
        lr=a.lr,
        clip_eps=a.clip_eps,
        kl_beta=a.kl_beta,
        inner_steps=a.inner_steps,
        temperature=a.temperature,
        max_new_tokens=a.max_new_tokens,
        autocast=a.autocast,
        weights=weights,
        seed=a.seed,
    )
    return Config(
        init_from=a.init_from,
        out=a.out,
        dataset=a.dataset,
        split=a.split or None,
        limit=a.limit,
        rl=rl,
        lora_rank=a.lora_rank,
        device=a.device,
        dtype=a.dtype,
    )


if __name__ == "__main__":
    from rich.console import Console

    console = Console()
    try:
        result = main(
            parse_args(),
            progress=lambda s: console.print(
                f"step {s.step}: reward {s.reward:.3f} {s.parts} kl {s.kl:.4f} {s.seconds:.1f}s"
            ),
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"train_rl: {error}") from None
    console.print(f"{len(result.history)} steps, {result.seconds_per_step:.1f} s/step")
