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

    python studies/train_qscorer.py --model cache/compact/one-stage --out cache/compact/qscorer
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a shared CPU

from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mechbiqa import cli  # noqa: E402
from mechbiqa.qscorer import QScorerTrainConfig, ScoreTokenSpec, finetune_qscorer  # noqa: E402
from mechbiqa.sources import load_samples, torch_dtype  # noqa: E402
from mechbiqa.train import examples_from_records  # noqa: E402


@dataclass(frozen=True)
class Config:
    """A Q-Scorer run: where from, where to, which images, the score tokens and the training run.

    Attributes:
        init_from: The one-stage checkpoint to start from (``--model``).
        out: Output checkpoint directory.
        dataset: ``builtin``, a ``.jsonl`` of IQARecords, or ``NAME=ROOT`` (images without MOS are left out).
        split: Keep only this split (None: all).
        limit: Keep only the first N images (None: all).
        spec: The score tokens and the regression head.
        train: The training run.
        lora_rank: LoRA rank on the LLM (the embeddings stay trainable); None: full fine-tuning.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Parameter dtype (the weights are cast as they are read).
    """

    init_from: str = field(
        default="cache/compact/one-stage", metadata=cli.meta(flag="--model", aliases=("--init-from",))
    )
    out: str = "cache/compact/qscorer"
    dataset: str = "builtin"
    split: str | None = "train"
    limit: int | None = None
    spec: ScoreTokenSpec = field(default_factory=ScoreTokenSpec)
    train: QScorerTrainConfig = field(default_factory=QScorerTrainConfig)
    lora_rank: int | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank {self.lora_rank}: pass a rank of at least 1, or none for full")
        if self.train.steps < 1 or not self.train.lr > 0:
            raise ValueError(f"--steps {self.train.steps} --lr {self.train.lr}: pass steps >= 1 and lr > 0")


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
        dtype=torch_dtype(cfg.dtype),
        progress=progress,
    )


def main_with_progress(cfg: Config) -> list[dict[str, float]]:
    """`main`, printing each step as it ends."""
    from rich.console import Console

    console = Console()
    return main(
        cfg,
        progress=lambda r: console.print(
            f"step {r['step']}: loss {r['loss']:.4f} ce {r['ce']:.4f} mse {r['mse']:.4f}"
        ),
    )


def render(history: list[dict[str, float]], console: Any) -> None:
    """Print the number of steps written."""
    console.print(f"{len(history)} steps written")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main_with_progress, Config, render)
