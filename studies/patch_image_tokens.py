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
import torch
from mechbiqa_hooks import names

from mechbiqa import cli, figures, outputs, reports
from mechbiqa.analysis.attribution import attribute
from mechbiqa.analysis.patching import (
    SITES,
    Configuration,
    Edit,
    Readout,
    Setter,
    SweepResult,
    gather_activations,
    image_token_grid,
    sweep,
)
from mechbiqa.model.prompts import EncodedPrompt
from mechbiqa.model.roles import TokenRoles, assign_roles
from mechbiqa.scoring import level_ids
from mechbiqa.sources import DEFAULT_CHECKPOINT, load_model, load_samples

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


def scoring_prompts(
    model: Any,
    tokenizer: Any,
    checkpoint: str | None,
    pixels: torch.Tensor,
) -> tuple[list[EncodedPrompt], list[TokenRoles]]:
    """The prompt each image is rated with, and its token roles (see the module docstring)."""
    from mechbiqa_hooks.record import PromptConfig

    if checkpoint is not None and (Path(checkpoint) / "mechbiqa.json").is_file():
        from mechbiqa.model.load import load_components
        from mechbiqa.pipeline import OneStageRater, read_info

        info = read_info(checkpoint)
        if info.mode != "one-stage":
            raise ValueError(
                f"{checkpoint} is a {info.describe()} checkpoint: its quality position reads no image "
                "tokens; patch the one-stage checkpoint"
            )
        parts = load_components(checkpoint, dtype=next(model.parameters()).dtype, device=str(model.device))
        ratings = OneStageRater(parts).rate(pixels)
        return [r.prompt for r in ratings], [r.roles for r in ratings]
    if checkpoint is not None and (Path(checkpoint) / "stage1").is_dir():
        raise ValueError(
            f"{checkpoint} is a two-stage pair: stage 2 reads text only; pass the one-stage checkpoint"
        )
    prompt = PromptConfig().encode(tokenizer, "score")
    roles = assign_roles(
        prompt.ids,
        response_start=prompt.response_start,
        quality_index=prompt.quality_index,
        n_image_tokens=model.cfg.n_image_tokens,
        bos_id=tokenizer.bos_id,
    )
    return [prompt] * len(pixels), [roles] * len(pixels)


def main(cfg: Config) -> Result:
    """Load, rank the image tokens, sweep, write JSON, figure and config."""
    model, tokenizer, processor, model_name = load_model(
        cfg.model, tiny_random=cfg.tiny_random, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device
    )
    samples = load_samples(cfg.dataset, cfg.split, cfg.limit)
    if len(samples) < 2:
        raise ValueError(f"{len(samples)} image: patching needs at least 2 (one is patched from another)")
    pixels = processor([s.image_path for s in samples])
    checkpoint = None if cfg.tiny_random else (cfg.model or str(DEFAULT_CHECKPOINT))
    prompts, roles = scoring_prompts(model, tokenizer, checkpoint, pixels)
    n, n_image = len(samples), model.cfg.n_image_tokens
    if not 0 < cfg.k <= n_image:
        raise ValueError(f"--k {cfg.k}: pass 1..{n_image} (the model's image tokens)")

    # One batch of (possibly unequal) prompts: right-pad the ids; the model left-pads what it splices,
    # so row i's spliced positions shift by (longest - its length); the quality position is the last column.
    length = max(len(p.ids) for p in prompts)
    ids = torch.full((n, length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p.ids)] = torch.tensor(p.ids)
        mask[i, : len(p.ids)] = 1
    spliced = max(len(r) for r in roles)
    padded = [r.left_pad(spliced - len(r)) for r in roles]
    image_positions = torch.from_numpy(
        np.stack([r.image_positions(0) for r in padded])
    ).long()  # [image, n_image]
    if image_positions.shape[1] != n_image:
        raise ValueError(f"the prompts hold {image_positions.shape[1]} image tokens, the model {n_image}")
    layers = tuple(range(model.cfg.llm.n_layers)) if cfg.layers is None else cfg.layers

    # Rank the image tokens by the quality row of every layer's attention (the attribution study's rule).
    quality = torch.full((n, 1), spliced - 1, dtype=torch.long)
    rows = gather_activations(
        model,
        ids,
        pixels,
        [names.pattern(layer) for layer in range(model.cfg.llm.n_layers)],
        quality,
        attention_mask=mask,
        pos_dim=2,
    )
    pattern = torch.stack([rows[names.pattern(layer)][:, 0] for layer in range(model.cfg.llm.n_layers)], 1)
    ranked = attribute(
        pattern.float().cpu().numpy(),
        np.stack([r.role for r in padded]),
        np.stack([r.image_index for r in padded]),
        n_image,
        k=cfg.k,
    )
    rng = np.random.default_rng(cfg.seed)
    selections = {
        "dominant": ranked.top,
        "random": np.stack([rng.choice(n_image, cfg.k, replace=False) for _ in range(n)]),
        "least": ranked.least,
    }

    readout = Readout(tuple(level_ids(tokenizer)))
    clean = sweep(model, ids, pixels, [], readout, attention_mask=mask)
    # Research choice: patch each image from the one whose clean score differs most, so the patched
    # tokens carry the most different quality information the model itself perceives (labels may be absent).
    source_of = np.abs(clean.clean_score[:, None] - clean.clean_score[None]).argmax(1)
    hooks = [h.replace("{l}", str(layer)) for site in cfg.sites for layer in layers for h in SITES[site]]
    image_acts = (
        {}
        if set(cfg.setters) == {"zero"}
        else gather_activations(model, ids, pixels, hooks, image_positions, attention_mask=mask)
    )
    configurations = image_token_grid(
        image_positions,
        {k: torch.from_numpy(v) for k, v in selections.items()},
        layers,
        sites=cfg.sites,
        setters=cfg.setters,
        image_acts=image_acts,
        source_of=torch.from_numpy(source_of),
    )  # type: ignore[arg-type]
    configurations.append(
        Configuration(  # reference: the whole image removed before the first layer
            "resid L0 all zero",
            (Edit(names.resid_pre(0), image_positions, Setter.zero()),),
            {"site": "resid", "layer": 0, "selection": "all", "setter": "zero"},
        )
    )
    result = sweep(
        model, ids, pixels, configurations, readout, attention_mask=mask, batch_size=cfg.batch_size
    )

    out = Path(cfg.out)
    files = {"config": outputs.write_config(out, cfg), "json": out / f"{NAME}.json"}
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
                    [list(map(list, g[0])), g[1], g[2]],
                    strict=True,
                )
            )
            for metric in ("score_effect", "logit_diff_effect", "flip_rate")
            for g in [result.grid(metric, rows=("site", "setter", "selection"))]
        },  # type: ignore[arg-type]
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
