"""A Q-Scorer from a one-stage checkpoint: score tokens plus an MLP that regresses MOS (`mechbiqa.qscorer`).

Question: does a regressor that never passes through the five level words get
below the label-approximation floor (``studies/conversion_error.py --qscorer``)?

Method: `mechbiqa.qscorer.finetune_qscorer`: ``n_bins`` score tokens are added to
the tokenizer, the embedding and ``lm_head`` (rows start as the level words'),
the answer ends with the MOS interval's token, and an MLP on that token's
hidden state (last layer, after ``ln_final``) regresses MOS; loss
``L_ce + lambda * L_score``.

Output (``--out``): a one-stage checkpoint directory with ``score_head.safetensors``
and a ``score_head`` field in ``mechbiqa.json``.

Example::

    python studies/train_qscorer.py --init-from cache/compact/one-stage --out cache/compact/qscorer
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a shared CPU

import argparse  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from mechbiqa.qscorer import QScorerTrainConfig, ScoreTokenSpec, finetune_qscorer  # noqa: E402
from mechbiqa.sources import load_samples  # noqa: E402
from mechbiqa.train import examples_from_records  # noqa: E402


@dataclass(frozen=True)
class Config:
    """A Q-Scorer run: where from, where to, which images, the score tokens and the training run."""

    init_from: str = "cache/compact/one-stage"
    out: str = "cache/compact/qscorer"
    dataset: str = "builtin"
    split: str | None = "train"
    limit: int | None = None
    spec: ScoreTokenSpec = field(default_factory=ScoreTokenSpec)
    train: QScorerTrainConfig = field(default_factory=QScorerTrainConfig)
    lora_rank: int | None = None
    device: str = "cpu"
    dtype: str = "float32"


def main(cfg: Config, progress: Any = None) -> list[dict[str, float]]:
    """Train and write the checkpoint; return the per-step history."""
    records = [r for r in load_samples(cfg.dataset, cfg.split, cfg.limit) if r.mos01 is not None]
    examples = examples_from_records(records, "one-stage")
    return finetune_qscorer(
        cfg.init_from,
        Path(cfg.out),
        examples,
        cfg.spec,
        cfg.train,
        lora_rank=cfg.lora_rank,
        device=cfg.device,
        dtype=getattr(torch, cfg.dtype),
        progress=progress,
    )


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d, s, t = Config(), ScoreTokenSpec(), QScorerTrainConfig()
    p.add_argument("--init-from", default=d.init_from, help="one-stage checkpoint directory")
    p.add_argument("--out", default=d.out, help="output checkpoint directory")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--split", default=d.split, help="'' for all")
    p.add_argument("--limit", type=int)
    p.add_argument("--n-bins", type=int, default=s.n_bins, help="score tokens (equal MOS intervals)")
    p.add_argument("--d-hidden", type=int, default=s.d_hidden, help="MLP width")
    p.add_argument("--lam", type=float, default=s.lam, help="lambda in L_ce + lambda L_score")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--lora-rank", type=int, help="LoRA on the LLM (embeddings stay trainable); None: full")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    a = p.parse_args(argv)
    return Config(
        init_from=a.init_from,
        out=a.out,
        dataset=a.dataset,
        split=a.split or None,
        limit=a.limit,
        spec=ScoreTokenSpec(n_bins=a.n_bins, d_hidden=a.d_hidden, lam=a.lam),
        train=QScorerTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed),
        lora_rank=a.lora_rank,
        device=a.device,
        dtype=a.dtype,
    )


if __name__ == "__main__":
    from rich.console import Console

    console = Console()
    try:
        history = main(
            parse_args(),
            progress=lambda r: console.print(
                f"step {r['step']}: loss {r['loss']:.4f} ce {r['ce']:.4f} mse {r['mse']:.4f}"
            ),
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"train_qscorer: {error}") from None
    console.print(f"{len(history)} steps written")
