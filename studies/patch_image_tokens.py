"""Activation patching of the dominant image tokens.

Question: are the few image tokens the quality position attends to (the
paper's five) what the rating is computed from? If the rating reads them,
removing or replacing their content should move the score, flip answers, and
do so more than for k random or the k least attended image tokens.

Method: for each image, find its k most and k least attended image tokens
from the quality position's attention (every layer and head, the ranking of
`mechbiqa.analysis.attribution.attribute`, computed online from the same
prompt) and k random ones (seeded). At those positions, per layer, either in
the residual stream entering the layer (``resid``: all later layers see the
edit) or in the keys and values that layer computes from them (``kv``: only
what later positions read at that layer changes), write zeros, the mean over
the images of the activation at the same image index (``mean``), or the
activation of the image whose clean score differs most (``source``). Read at
the quality position the Q-Align score, the good-minus-poor logit difference
and whether the answer flips. One reference configuration zeroes every image
token entering layer 0. Every configuration runs in a few stacked forwards
(`mechbiqa.analysis.patching.sweep`).

Prompt: Q-Align's scorer prompt for released checkpoints and the tiny random
model; a one-stage checkpoint of ``mechbiqa.train`` is scored on its own
canonical prompt (its greedy description, then "The quality of the image is",
`mechbiqa.pipeline`). Two-stage checkpoints have no image at the quality
position (stage 2 reads text only) and are refused.

Output (in ``--out``, default ``cache/patch_image_tokens/``): ``config.json``,
``patch_image_tokens.json``, ``patch_image_tokens.png``.

Example::

    python studies/patch_image_tokens.py --model cache/compact/one-stage --split test --limit 16
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa import figures, reports
from mechbiqa.analysis.patching import SITES, SweepResult, patch_image_tokens
from mechbiqa.sources import load_samples, open_source

NAME = "patch_image_tokens"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A patching sweep.

    Attributes:
        model: Checkpoint directory; None with ``tiny_random``, else the compact one-stage default.
        tiny_random: The tiny random model (`mechbiqa.sources.tiny_random_model`) (tests, pipeline checks).
        dataset: ``builtin``, a folder of images, a ``.jsonl`` of records, or ``NAME=ROOT``.
        split: Keep one split.
        limit: Images to patch (the sweep runs ``configurations x images`` rows).
        k: Image tokens per selection (the paper's five).
        layers: LLM layers to edit; None: every layer.
        sites: ``resid`` and/or ``kv`` (`mechbiqa.analysis.patching.SITES`).
        setters: ``zero``, ``mean``, ``source``.
        seed: Seed of the random-token control (and of ``tiny_random``).
        batch_size: Rows per stacked forward.
        out: Output folder.
        device: ``cpu`` or ``cuda``.
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = 16
    k: int = 5
    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = ("resid", "kv")
    setters: tuple[str, ...] = ("zero", "mean", "source")
    seed: int = 0
    batch_size: int = 64
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in SITES]
        if unknown:
            raise ValueError(f"unknown sites {unknown}; choose from {sorted(SITES)}")
        if set(self.setters) - {"zero", "mean", "source"}:
            raise ValueError(f"setters must be among zero, mean, source; got {self.setters}")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The tiny random model on ``tmp/images`` (4 images, k=2 of its 5 image tokens)."""
        base = dict(
            tiny_random=True,
            dataset=str(Path(tmp) / "images"),
            split=None,
            limit=4,
            k=2,
            out=str(Path(tmp) / NAME),
        )
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class Result:
    """The sweep and what it was run on.

    Attributes:
        sweep: The `SweepResult` (``[configuration, image]`` arrays).
        image_ids: The images.
        selections: Selection name -> ``[image, k]`` image indices.
        source_of: ``[image]`` the image each one was patched from.
        files: Artefact name -> path.
    """

    sweep: SweepResult
    image_ids: tuple[str, ...]
    selections: dict[str, np.ndarray]
    source_of: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Load, rank the image tokens, sweep, write JSON, figure and config."""
    checkpoint = open_source(cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, device=cfg.device)
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    patched = patch_image_tokens(
        checkpoint,
        [s.image_path for s in samples],
        k=cfg.k,
        layers=cfg.layers,
        sites=cfg.sites,
        setters=cfg.setters,  # type: ignore[arg-type]
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    result, selections, source_of = patched.sweep, patched.selections, patched.source_of
    model_name = checkpoint.name

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": out / "config.json", "json": out / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    image_ids = tuple(str(s.id) for s in samples)
    summary = {
        "model": model_name,
        "images": list(image_ids),
        "source_of": source_of.tolist(),
        "selections": {k: v.tolist() for k, v in selections.items()},
        "grid": {
            metric: dict(
                zip(
                    ["keys", "layers", "values"],
                    [
                        list(map(list, g[0])),
                        g[1],
                        [[None if np.isnan(x) else x for x in row] for row in g[2].tolist()],
                    ],
                    strict=True,
                )
            )
            for metric in ("score_effect", "logit_diff_effect", "flip_rate")
            for g in [result.grid(metric, rows=("site", "setter", "selection"))]
        },  # type: ignore[arg-type]
        **result.to_dict(),
    }
    files["json"].write_text(json.dumps(summary, indent=1) + "\n")
    files["figure"] = figures.patching_effects(
        result, out / f"{NAME}.png", selections=("dominant", "random", "least", "all")
    )
    return Result(sweep=result, image_ids=image_ids, selections=selections, source_of=source_of, files=files)


def render(result: Result, console: Any) -> None:
    """Print the patching table."""
    console.print(reports.patching_table(result.sweep))
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
    p.add_argument("--split", default=d.split, help="keep one split (default: test; 'all' keeps every split)")
    p.add_argument("--limit", type=int, default=d.limit, help="images to patch")
    p.add_argument("--k", type=int, default=d.k, help="image tokens per selection")
    p.add_argument("--layers", type=int, nargs="+", help="LLM layers to edit (default: all)")
    p.add_argument("--sites", nargs="+", default=list(d.sites), choices=sorted(SITES))
    p.add_argument("--setters", nargs="+", default=list(d.setters), choices=["zero", "mean", "source"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per stacked forward")
    p.add_argument("--out", default=d.out)
    p.add_argument("--device", default=d.device)
    a = p.parse_args(argv)
    return Config(
        model=a.model,
        tiny_random=a.tiny_random,
        dataset=a.dataset,
        split=None if a.split == "all" else a.split,
        limit=a.limit,
        k=a.k,
        layers=tuple(a.layers) if a.layers else None,
        sites=tuple(a.sites),
        setters=tuple(a.setters),
        seed=a.seed,
        batch_size=a.batch_size,
        out=a.out,
        device=a.device,
    )


if __name__ == "__main__":
    from rich.console import Console

    render(main(parse_args()), Console())
