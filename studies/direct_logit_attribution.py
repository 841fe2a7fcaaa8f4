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

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        split: Keep one split (live).
        limit: Images (live).
        store: Read a store recorded with `DLA_SPEC` instead of running the model on images.
        direction: ``logit_diff``, ``score`` or ``score_gradient``.
        k: Top image tokens per sample in the JSON.
        chunk: Images per forward (live).
        seed: Seed of ``tiny_random``.
        out: Output folder.
        device: ``cpu`` or ``cuda``.
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = 16
    store: str | None = None
    direction: str = "logit_diff"
    k: int = 5
    chunk: int = 8
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r} is not one of {DIRECTIONS}")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (4 images in chunks of 3)."""
        base = dict(tiny_random=True, dataset=str(Path(tmp) / "images"), split=None, limit=4, k=2, chunk=3)
        return cls(**{**base, "out": str(Path(tmp) / NAME), **overrides})


@dataclass(frozen=True)
class Result:
    """The attribution and where it was written."""

    dla: DLAResult
    files: dict[str, Path] = field(default_factory=dict)
    model: str = ""


def main(cfg: Config) -> Result:
    """Decompose (live or from the store), write JSON, figure and config."""
    try:
        model, tokenizer, processor, name = load_model(
            cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, device=cfg.device
        )
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    ids = level_ids(tokenizer)
    if cfg.store:
        from mechbiqa.store import ActivationStore
        from mechbiqa_hooks.record import model_identity

        with ActivationStore.open(cfg.store) as store:
            store.check_identity(model_identity(model))
            result = dla_from_store(store, ReadoutWeights.from_model(model, ids), cfg.direction)  # type: ignore[arg-type]
    else:
        try:
            samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(str(error)) from None
        checkpoint = None if cfg.tiny_random else (cfg.model or str(DEFAULT_CHECKPOINT))
        try:
            batch = scoring_batch(model, tokenizer, processor([s.image_path for s in samples]), checkpoint)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        labels = [
            getattr(s, "label", None) if getattr(s, "label", None) is not None else getattr(s, "mos01", None)
            for s in samples
        ]
        result = dla_live(
            model,
            batch,
            ids,
            cfg.direction,  # type: ignore[arg-type]
            sample_ids=[str(s.id) for s in samples],
            labels=[float("nan") if x is None else float(x) for x in labels],
            chunk=cfg.chunk,
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.json", "json": out / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    checks = {"sum_error": result.sum_error, "split_error": result.split_error}
    summary = {
        "model": name,
        "source": cfg.store or "live",
        "spec": DLA_SPEC,
        "checks": checks,
        **result.to_dict(cfg.k),
    }
    files["json"].write_text(json.dumps(summary, indent=1) + "\n")
    files["figure"] = fa.dla_figure(result, out / f"{NAME}.png")
    return Result(dla=result, files=files, model=name)


def render(result: Result, console: Any) -> None:
    """Print the per-layer table."""
    console.print(fa.dla_table(result.dla))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument("--model", help="checkpoint directory (default: cache/compact/one-stage)")
    p.add_argument("--tiny-random", action="store_true", help="the tiny random model (pipeline check)")
    p.add_argument(
        "--dataset", default=d.dataset, help="'builtin', a folder of images, a .jsonl, or NAME=ROOT"
    )
    p.add_argument("--split", default=d.split, help="keep one split ('all' keeps every split)")
    p.add_argument("--limit", type=int, default=d.limit, help="images")
    p.add_argument("--store", help=f"a store recorded with --spec '{DLA_SPEC}' (instead of images)")
    p.add_argument("--direction", default=d.direction, choices=DIRECTIONS)
    p.add_argument("--k", type=int, default=d.k, help="top image tokens per sample")
    p.add_argument("--chunk", type=int, default=d.chunk, help="images per forward (live)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    p.add_argument("--device", default=d.device)
    a = p.parse_args(argv)
    return Config(
        model=a.model,
        tiny_random=a.tiny_random,
        dataset=a.dataset,
        split=None if a.split == "all" else a.split,
        limit=a.limit,
        store=a.store,
        direction=a.direction,
        k=a.k,
        chunk=a.chunk,
        seed=a.seed,
        out=a.out,
        device=a.device,
    )


if __name__ == "__main__":
    from rich.console import Console

    render(main(parse_args()), Console())
