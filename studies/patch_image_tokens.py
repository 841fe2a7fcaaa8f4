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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechbiqa import cli, figures, outputs, reports
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
        split: Keep one split (None: every split).
        limit: Images to patch (the sweep runs ``configurations x images`` rows).
        k: Image tokens per selection (the paper's five).
        layers: LLM layers to edit; None: every layer.
        sites: ``resid`` and/or ``kv`` (`mechbiqa.analysis.patching.SITES`).
        setters: ``zero``, ``mean``, ``source``.
        seed: Seed of the random-token control (and of ``tiny_random``).
        batch_size: Rows per stacked forward.
        out: Output folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype (the weights are cast as they are read).
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = 16
    k: int = 5
    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = ("resid", "kv")
    setters: tuple[Literal["zero", "mean", "source"], ...] = ("zero", "mean", "source")
    seed: int = 0
    batch_size: int = 64
    out: str = str(REPO / "cache" / NAME)
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.limit is not None and self.limit < 2:
            raise ValueError(
                f"--limit {self.limit}: patching needs at least 2 images (one is patched from another)"
            )
        if self.k < 1:
            raise ValueError(f"--k {self.k}: select at least 1 image token")
        if self.layers is not None and min(self.layers, default=0) < 0:
            raise ValueError(f"--layers {' '.join(map(str, self.layers))}: layers are numbered from 0")
        unknown = [s for s in self.sites if s not in SITES]
        if unknown:
            raise ValueError(f"--sites: unknown sites {unknown}; choose from {', '.join(sorted(SITES))}")
        if not self.sites or not self.setters:
            raise ValueError("--sites and --setters need at least one value each")
        if set(self.setters) - {"zero", "mean", "source"}:
            raise ValueError(f"--setters must be among zero, mean, source; got {self.setters}")
        if self.model and (Path(self.model) / "stage1").is_dir():
            raise ValueError(
                f"{self.model} is a two-stage pair: stage 2 reads text only, so no image token reaches its "
                "quality position; patch the one-stage checkpoint"
            )

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
    checkpoint = open_source(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )
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
    files = {"config": outputs.write_config(out, cfg), "json": out / f"{NAME}.json"}
    image_ids = tuple(str(s.id) for s in samples)
    summary = {
        "model": model_name,
        "images": list(image_ids),
        "source_of": source_of.tolist(),
        "selections": {k: v.tolist() for k, v in selections.items()},
        "grid": {  # each metric as a [site x setter x selection, layer] table
            metric: {"keys": list(map(list, keys)), "layers": layers, "values": values}
            for metric in ("score_effect", "logit_diff_effect", "flip_rate")
            for keys, layers, values in [result.grid(metric, rows=("site", "setter", "selection"))]
        },
        **result.to_dict(),
    }
    outputs.write_json(files["json"], summary)
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
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
