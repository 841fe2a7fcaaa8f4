"""Attribution patching of every image token at every layer, validated against activation patching.

Question: which of the image tokens, at which layer, does the rating depend
on? The paper picks five tokens by attention; attention is not effect, and a
patching sweep over all 65 tokens x all layers costs a forward each.

Method: one forward and one backward per image estimate, for every image
position and layer, the effect of patching the residual entering the layer
(``resid``) or the keys and values it computes there (``kv``) as gradient x
(reference - clean) (`mechbiqa.analysis.attribution_patching`), with the
reference another image's activation at the same image index (``source``: the
image whose clean metric differs most) or zeros (``zero``). The metric is the
good-minus-poor logit difference or the Q-Align score at the quality position.
Validation: the same grid by activation patching
(`mechbiqa.analysis.patching.sweep`, one position at a time, ``--validate-layers``),
Pearson correlation per site. The most important tokens (largest |effect| over
layers, at the first site) are compared with the k most attended ones (the attention
ranking of `mechbiqa.analysis.attribution`, from the same forward).

Output (in ``--out``, default ``cache/attribution_patching/``): ``config.json``,
``attribution_patching.json`` (``checks.corr_with_activation_patching``), and the
layer x image-position map.

Example::

    python studies/attribution_patching.py --model cache/compact/one-stage --split test --limit 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa import figures_attribution as fa
from mechbiqa.analysis.attribution_patching import (
    AttributionPatchingResult,
    activation_patching_grid,
    attribution_patching,
    compare_with_attention,
    correlation,
    farthest_reference,
    metric_of,
)
from mechbiqa.analysis.patching import SITES, Readout
from mechbiqa.analysis.scoring_batch import scoring_batch
from mechbiqa.scoring import level_ids
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_samples

NAME = "attribution_patching"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """An attribution-patching run.

    Attributes:
        model: Checkpoint directory; None with ``tiny_random``, else the compact one-stage default.
        tiny_random: The tiny random model (tests, pipeline checks).
        dataset: ``builtin``, a folder of images, a ``.jsonl`` of records, or ``NAME=ROOT``.
        split: Keep one split.
        limit: Images (at least 2 for the ``source`` reference).
        metric: ``logit_diff`` or ``score``.
        reference: ``source`` (another image) or ``zero``.
        sites: ``resid`` and/or ``kv``.
        k: Tokens compared with the k most attended.
        validate_layers: Layers of the activation-patching check (None: all; () skips it).
        chunk: Images per forward/backward of the estimate.
        batch_size: Rows per forward of the check.
        seed: Seed of ``tiny_random``.
        out: Output folder.
        device: ``cpu`` or ``cuda``.
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = 16
    metric: str = "logit_diff"
    reference: str = "source"
    sites: tuple[str, ...] = ("resid", "kv")
    k: int = 5
    validate_layers: tuple[int, ...] | None = None
    chunk: int = 8
    batch_size: int = 64
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.metric not in ("logit_diff", "score") or self.reference not in ("source", "zero"):
            raise ValueError(
                f"metric must be logit_diff or score, reference source or zero; "
                f"got {self.metric}, {self.reference}"
            )
        if set(self.sites) - set(SITES):
            raise ValueError(
                f"unknown sites {sorted(set(self.sites) - set(SITES))}; choose from {sorted(SITES)}"
            )

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (4 images in chunks of 3, k=2 of its 5 image tokens)."""
        base = dict(tiny_random=True, dataset=str(Path(tmp) / "images"), split=None, limit=4, k=2, chunk=3)
        return cls(**{**base, "out": str(Path(tmp) / NAME), **overrides})


@dataclass(frozen=True)
class Result:
    """The estimate, its check, and where they were written."""

    estimate: AttributionPatchingResult
    actual: dict[str, np.ndarray]
    corr: dict[str, float]
    overlap: np.ndarray
    chance: float
    image_ids: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Estimate, validate, compare with attention, write JSON, figure and config."""
    try:
        model, tokenizer, processor, name = load_model(
            cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, device=cfg.device
        )
        samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
    if len(samples) < 2:
        raise SystemExit("attribution patching needs at least 2 images (one is the other's reference)")
    checkpoint = None if cfg.tiny_random else (cfg.model or str(DEFAULT_CHECKPOINT))
    try:
        batch = scoring_batch(model, tokenizer, processor([s.image_path for s in samples]), checkpoint)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    readout = Readout(tuple(level_ids(tokenizer)))
    args = (model, batch.input_ids, batch.pixels, batch.image_positions, readout)
    source_of = None
    if cfg.reference == "source":  # the reference run: a plain forward gives every image's clean metric
        with torch.no_grad():
            logits = model(batch.input_ids, images=batch.pixels, attention_mask=batch.attention_mask).logits
        clean = metric_of(logits[:, readout.position], readout, cfg.metric)  # type: ignore[arg-type]
        source_of = torch.from_numpy(farthest_reference(clean.cpu().numpy()))
    estimate = attribution_patching(
        *args,
        metric=cfg.metric,
        reference=cfg.reference,
        source_of=source_of,
        sites=cfg.sites,  # type: ignore[arg-type]
        attention_mask=batch.attention_mask,
        keep_pattern=True,
        chunk=cfg.chunk,
    )
    actual: dict[str, np.ndarray] = {}
    if cfg.validate_layers != ():
        actual = activation_patching_grid(
            *args,
            estimate,
            layers=cfg.validate_layers,
            attention_mask=batch.attention_mask,
            batch_size=cfg.batch_size,
        )
    corr = {site: correlation(estimate.site(site), grid) for site, grid in actual.items()}
    n_image = model.cfg.n_image_tokens
    top, attended, overlap = compare_with_attention(
        estimate, batch.role_array, batch.image_index, n_image, cfg.k, cfg.sites[0]
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.json", "json": out / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    image_ids = tuple(str(s.id) for s in samples)
    summary = {
        "model": name,
        "images": list(image_ids),
        "metric": cfg.metric,
        "reference": cfg.reference,
        "source_of": None if source_of is None else source_of.tolist(),
        "layers": estimate.layers.tolist(),
        "checks": {"corr_with_activation_patching": corr},
        "clean_metric": estimate.clean_metric.tolist(),
        "mean_effect": {s: estimate.site(s).mean(0).tolist() for s in estimate.sites},
        "top_tokens": top.tolist(),
        "most_attended": attended.tolist(),
        "overlap_with_most_attended": float(overlap.mean()),
        "overlap_chance": cfg.k / n_image,
        "activation_patching": {s: np.nan_to_num(g.mean(0), nan=0.0).tolist() for s, g in actual.items()},
    }
    files["json"].write_text(json.dumps(summary, indent=1) + "\n")
    files["figure"] = fa.attribution_patching_map(estimate, out / f"{NAME}.png", actual)
    return Result(estimate, actual, corr, overlap, cfg.k / n_image, image_ids, files)


def render(result: Result, console: Any) -> None:
    """Print the per-site table."""
    console.print(
        fa.attribution_patching_table(
            result.estimate, result.corr, float(result.overlap.mean()), result.chance
        )
    )
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
    p.add_argument("--metric", default=d.metric, choices=["logit_diff", "score"])
    p.add_argument("--reference", default=d.reference, choices=["source", "zero"])
    p.add_argument("--sites", nargs="+", default=list(d.sites), choices=sorted(SITES))
    p.add_argument("--k", type=int, default=d.k, help="tokens compared with the k most attended")
    p.add_argument("--chunk", type=int, default=d.chunk, help="images per forward/backward")
    p.add_argument(
        "--validate-layers",
        type=int,
        nargs="*",
        help="layers of the activation-patching check (default: all; give none to skip it)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
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
        metric=a.metric,
        reference=a.reference,
        sites=tuple(a.sites),
        k=a.k,
        chunk=a.chunk,
        validate_layers=None if a.validate_layers is None else tuple(a.validate_layers),
        batch_size=a.batch_size,
        seed=a.seed,
        out=a.out,
        device=a.device,
    )


if __name__ == "__main__":
    from rich.console import Console

    render(main(parse_args()), Console())
