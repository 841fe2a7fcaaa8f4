"""Direct logit attribution at the quality position: who writes the quality decision?

Question: which layers, heads and MLPs write the level decision into the
residual stream at the quality position, and from which tokens (image,
instruction, description, BOS) do the heads copy what they write? Attention
weights say where a head looks, not what it writes; this says what it writes.

Method: the final residual at the quality position is the embedding plus
every layer's attention output (per head) plus every MLP output; each part is
projected on the decision direction through the final RMSNorm with its scale
frozen at that position, so the parts sum exactly to the decision
(`mechbiqa.analysis.dla`; the direction is ``logit_diff`` = logit(good) -
logit(poor), ``score`` = the Q-Align weights centred, or ``score_gradient`` =
the gradient of the Q-Align score at this sample's logits). Each head's part
splits by source position j (attention weight x value x W_O, grouped-query
aware) and is summed by token role. Live: one hooked forward over the images
(Q-Align's scorer prompt; a one-stage checkpoint's own prompt). Offline:
``--store`` recorded with ``--spec DLA_SPEC --dtype float32``.

Output (in ``--out``, default ``cache/direct_logit_attribution/``):
``config.json``, ``direct_logit_attribution.json`` (``checks.sum_error``: the
largest |sum of parts - decision read from the logits|), and the figure.

Example::

    python studies/direct_logit_attribution.py --model cache/compact/one-stage --split test --limit 32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechbiqa import cli, outputs
from mechbiqa import figures_attribution as fa
from mechbiqa.analysis.dla import DIRECTIONS, DLA_SPEC, DLAResult, ReadoutWeights, dla_from_store, dla_live
from mechbiqa.analysis.scoring_batch import scoring_batch
from mechbiqa.scoring import level_ids
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_samples

NAME = "direct_logit_attribution"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A direct-logit-attribution run.

    Attributes:
        model: Checkpoint directory; None with ``tiny_random``, else the compact one-stage default.
        tiny_random: The tiny random model (tests, pipeline checks).
        dataset: ``builtin``, a folder of images, a ``.jsonl`` of records, or ``NAME=ROOT`` (live).
        split: Keep one split (live; None: every split).
        limit: Images (live).
        store: Read a store recorded with ``--spec DLA_SPEC --dtype float32`` instead of running the
            model on images; None: live.
        direction: ``logit_diff``, ``score`` or ``score_gradient``.
        k: Top image tokens per sample in the JSON.
        batch_size: Images per forward (live).
        seed: Seed of ``tiny_random``.
        out: Output folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype (the weights are cast as they are read).
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = 16
    store: str | None = None
    direction: Literal["logit_diff", "score", "score_gradient"] = "logit_diff"
    k: int = 5
    batch_size: int = field(default=8, metadata=cli.meta(aliases=("--chunk",)))
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"--direction {self.direction}: choose one of {', '.join(DIRECTIONS)}")
        if self.k < 1:
            raise ValueError(f"--k {self.k}: report at least 1 image token per sample")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (4 images in batches of 3)."""
        base = dict(
            tiny_random=True, dataset=str(Path(tmp) / "images"), split=None, limit=4, k=2, batch_size=3
        )
        return cls(**{**base, "out": str(Path(tmp) / NAME), **overrides})


@dataclass(frozen=True)
class Result:
    """The attribution and where it was written.

    Attributes:
        dla: The `DLAResult`.
        files: Artefact name -> path (``config``, ``json``, ``figure``).
        model: What was decomposed.
    """

    dla: DLAResult
    files: dict[str, Path] = field(default_factory=dict)
    model: str = ""


def main(cfg: Config) -> Result:
    """Decompose (live or from the store), write JSON, figure and config."""
    model, tokenizer, processor, name = load_model(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )
    ids = level_ids(tokenizer)
    if cfg.store:
        from mechbiqa.store import ActivationStore
        from mechbiqa_hooks.record import model_identity

        with ActivationStore.open(cfg.store) as store:
            store.check_identity(model_identity(model))
            result = dla_from_store(store, ReadoutWeights.from_model(model, ids), cfg.direction)
    else:
        samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
        checkpoint = None if cfg.tiny_random else (cfg.model or str(DEFAULT_CHECKPOINT))
        batch = scoring_batch(model, tokenizer, processor([s.image_path for s in samples]), checkpoint)
        labels = [getattr(s, "label", None) for s in samples]
        labels = [
            x if x is not None else getattr(s, "mos01", None) for x, s in zip(labels, samples, strict=True)
        ]
        result = dla_live(
            model,
            batch,
            ids,
            cfg.direction,
            sample_ids=[str(s.id) for s in samples],
            labels=np.array([np.nan if x is None else float(x) for x in labels]),
            chunk=cfg.batch_size,
        )
    out = Path(cfg.out)
    checks = {"sum_error": result.sum_error, "split_error": result.split_error}
    summary = {"model": name, "source": cfg.store or "live", "spec": DLA_SPEC, "checks": checks,
               **result.to_dict(cfg.k)}  # fmt: skip
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", summary),
        "figure": fa.dla_figure(result, out / f"{NAME}.png"),
    }
    return Result(dla=result, files=files, model=name)


def render(result: Result, console: Any) -> None:
    """Print the per-layer table."""
    console.print(fa.dla_table(result.dla))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
