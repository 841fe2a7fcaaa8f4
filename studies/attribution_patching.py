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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechbiqa import cli, outputs
from mechbiqa import figures_attribution as fa
from mechbiqa.analysis.attribution_check import check_estimate, clean_sources
from mechbiqa.analysis.attribution_patching import AttributionPatchingResult, attribution_patching
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
        split: Keep one split (None: every split).
        limit: Images (at least 2 for the ``source`` reference).
        metric: ``logit_diff`` or ``score``.
        reference: ``source`` (another image) or ``zero``.
        sites: ``resid`` and/or ``kv``.
        k: Tokens compared with the k most attended.
        validate_layers: Layers of the activation-patching check (none: every layer; the option
            with no value skips the check).
        chunk: Images per forward/backward of the estimate.
        batch_size: Rows per forward of the check.
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
    metric: Literal["logit_diff", "score"] = "logit_diff"
    reference: Literal["source", "zero"] = "source"
    sites: tuple[str, ...] = ("resid", "kv")
    k: int = 5
    validate_layers: tuple[int, ...] | None = None
    chunk: int = 8
    batch_size: int = 64
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.metric not in ("logit_diff", "score") or self.reference not in ("source", "zero"):
            raise ValueError(
                f"--metric {self.metric} --reference {self.reference}: the metric is logit_diff or score, "
                "the reference source or zero"
            )
        unknown = sorted(set(self.sites) - set(SITES))
        if unknown or not self.sites:
            raise ValueError(
                f"--sites {' '.join(self.sites)}: choose one or more of {', '.join(sorted(SITES))}"
            )
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"--limit {self.limit}: pass at least 2 images (one is the other's reference)")
        if self.k < 1 or self.chunk < 1:
            raise ValueError(f"--k {self.k} --chunk {self.chunk}: both must be at least 1")
        if self.validate_layers and min(self.validate_layers) < 0:
            raise ValueError(f"--validate-layers {self.validate_layers}: layers are numbered from 0")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (4 images in chunks of 3, k=2 of its 5 image tokens)."""
        base = dict(tiny_random=True, dataset=str(Path(tmp) / "images"), split=None, limit=4, k=2, chunk=3)
        return cls(**{**base, "out": str(Path(tmp) / NAME), **overrides})


@dataclass(frozen=True)
class Result:
    """The estimate, its check, and where they were written.

    Attributes:
        estimate: The attribution-patching estimate.
        actual: Site -> ``[image, layer, image position]`` effects by activation patching (empty: skipped).
        corr: Site -> Pearson correlation of the estimate with ``actual``.
        overlap: ``[image]`` fraction of the top tokens among the k most attended.
        chance: The overlap expected by chance (k / image tokens).
        image_ids: The images.
        files: Artefact name -> path.
    """

    estimate: AttributionPatchingResult
    actual: dict[str, np.ndarray]
    corr: dict[str, float]
    overlap: np.ndarray
    chance: float
    image_ids: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Estimate, validate, compare with attention, write JSON, figure and config."""
    model, tokenizer, processor, name = load_model(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    if len(samples) < 2:
        raise ValueError(f"--dataset {cfg.dataset}: {len(samples)} image(s); attribution patching needs 2")
    checkpoint = None if cfg.tiny_random else (cfg.model or str(DEFAULT_CHECKPOINT))
    batch = scoring_batch(model, tokenizer, processor([s.image_path for s in samples]), checkpoint)
    readout = Readout(tuple(level_ids(tokenizer)))
    source_of = clean_sources(model, batch, readout, cfg.metric) if cfg.reference == "source" else None
    estimate = attribution_patching(
        model, batch.input_ids, batch.pixels, batch.image_positions, readout, metric=cfg.metric,
        reference=cfg.reference, source_of=source_of, sites=cfg.sites, attention_mask=batch.attention_mask,
        keep_pattern=True, chunk=cfg.chunk,
    )  # fmt: skip
    actual, corr, top, attended, overlap = check_estimate(model, batch, readout, estimate, k=cfg.k,
        layers=cfg.validate_layers, batch_size=cfg.batch_size, site=cfg.sites[0])  # fmt: skip
    chance = cfg.k / model.cfg.n_image_tokens
    out, image_ids = Path(cfg.out), tuple(str(s.id) for s in samples)
    summary = {
        "model": name,
        "images": image_ids,
        "metric": cfg.metric,
        "reference": cfg.reference,
        "source_of": source_of,
        "layers": estimate.layers,
        "checks": {"corr_with_activation_patching": corr},
        "clean_metric": estimate.clean_metric,
        "mean_effect": {s: estimate.site(s).mean(0) for s in estimate.sites},
        "top_tokens": top,
        "most_attended": attended,
        "overlap_with_most_attended": float(overlap.mean()),
        "overlap_chance": chance,
        "activation_patching": {s: np.nan_to_num(g.mean(0), nan=0.0) for s, g in actual.items()},
    }
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", summary),
        "figure": fa.attribution_patching_map(estimate, out / f"{NAME}.png", actual),
    }
    return Result(estimate, actual, corr, overlap, chance, image_ids, files)


def render(result: Result, console: Any) -> None:
    """Print the per-site table."""
    overlap = float(result.overlap.mean())
    console.print(fa.attribution_patching_table(result.estimate, result.corr, overlap, result.chance))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
