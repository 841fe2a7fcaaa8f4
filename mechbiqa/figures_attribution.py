"""Figures and tables of the attribution studies: direct logit attribution, attribution patching, tuned lens.

Where it sits: beside `mechbiqa.figures` and `mechbiqa.reports` (same rules:
each figure on its own Agg `Figure`, tables as rich renderables, nothing
computed beyond arranging numbers), for the results of
`mechbiqa.analysis.dla`, `mechbiqa.analysis.attribution_patching` and the
tuned lens of `mechbiqa.analysis.lens`; `studies/direct_logit_attribution.py`,
`studies/attribution_patching.py` and `studies/tuned_lens.py` call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.table import Table

from mechbiqa.figures import LEVEL_COLOURS, ROLE_COLOURS, _figure, _save
from mechbiqa.model.prompts import LEVEL_WORDS

if TYPE_CHECKING:
    from mechbiqa.analysis.attribution_patching import AttributionPatchingResult
    from mechbiqa.analysis.dla import DLAResult

__all__ = [
    "attribution_patching_map",
    "attribution_patching_table",
    "dla_figure",
    "dla_table",
    "lens_pair_figure",
    "tuned_lens_figure",
    "tuned_lens_table",
]


# ----------------------------------------------------------------------------- direct logit attribution
def dla_figure(result: DLAResult, path: str | Path) -> Path:
    """Per layer: attention and MLP contributions; per head; per source role (sample means)."""
    from mechbiqa.analysis.dla import SOURCE_ROLES

    panels = 3 if result.by_role is not None else 2
    fig = _figure(4.2 * panels, 3.4)
    axes = fig.subplots(1, panels)
    layers = result.layers
    ax = axes[0]
    ax.bar(layers - 0.2, result.attn.mean(0), 0.4, label="attention", color="#1f78b4")
    ax.bar(layers + 0.2, result.mlp.mean(0), 0.4, label="MLP", color="#ff7f00")
    ax.axhline(result.embed.mean(), color="k", lw=0.8, ls="--", label="embedding")
    ax.set(xlabel="layer", ylabel=f"contribution to {result.direction}", title="By layer (mean)")
    ax.legend(fontsize=7)
    heads = result.heads.mean(0)
    lim = float(np.abs(heads).max()) or 1.0
    im = axes[1].imshow(heads.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    axes[1].set(xlabel="layer", ylabel="head", title="By head (mean)")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    if result.by_role is not None:
        ax = axes[2]
        by = result.role_by_layer  # [layer, role]
        pos = np.zeros(len(layers))
        neg = np.zeros(len(layers))
        for r, role in enumerate(SOURCE_ROLES):
            v = by[:, r]
            base = np.where(v >= 0, pos, neg)
            ax.bar(
                layers, v, bottom=base, color=ROLE_COLOURS[role], label=role.label, edgecolor="white", lw=0.3
            )
            pos, neg = pos + np.clip(v, 0, None), neg + np.clip(v, None, 0)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="layer", title="Attention, by source role (mean)")
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def dla_table(result: DLAResult, title: str = "Direct logit attribution at the quality position") -> Table:
    """Per layer: attention, MLP and the source-role split (sample means)."""
    from mechbiqa.analysis.dla import SOURCE_ROLES

    roles = [r.label for r in SOURCE_ROLES] if result.by_role is not None else []
    table = Table(title=f"{title} ({result.direction})")
    for name in ("layer", "attention", "MLP", *roles):
        table.add_column(name, justify="right")
    by = result.role_by_layer
    for i, layer in enumerate(result.layers):
        cells = [f"{result.attn[:, i].mean():+.3f}", f"{result.mlp[:, i].mean():+.3f}"]
        cells += [f"{by[i, r]:+.3f}" for r in range(len(roles))] if by is not None else []
        table.add_row(str(layer), *cells)
    table.caption = (
        f"embedding {result.embed.mean():+.3f}; total {result.total.mean():+.3f}; "
        f"largest |sum - logits| {result.sum_error:.2e}"
    )
    return table


# ----------------------------------------------------------------------------- attribution patching
def attribution_patching_map(
    estimate: AttributionPatchingResult,
    path: str | Path,
    actual: Mapping[str, np.ndarray] | None = None,
    sites: Sequence[str] | None = None,
) -> Path:
    """Per site: the layer x image-position map of the estimate (mean over images).

    With ``actual`` (activation patching of the same grid), a scatter of the estimate against it beside.
    """
    sites = list(estimate.sites) if sites is None else list(sites)
    cols = 2 if actual else 1
    fig = _figure(5.0 * cols, 2.6 * len(sites))
    axes = np.asarray(fig.subplots(len(sites), cols, squeeze=False))
    for row, site in enumerate(sites):
        grid = estimate.site(site).mean(0)  # [layer, position]
        lim = float(np.abs(grid).max()) or 1.0
        ax = axes[row, 0]
        im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
        ax.set(
            xlabel="image token", ylabel="layer", title=f"{site}: attribution patching ({estimate.reference})"
        )
        fig.colorbar(im, ax=ax, shrink=0.8)
        if actual:
            ax = axes[row, 1]
            ax.scatter(actual[site].ravel(), estimate.site(site).ravel(), s=4, alpha=0.5)
            ax.axline((0, 0), slope=1, color="k", lw=0.6)
            ax.set(
                xlabel="activation patching", ylabel="estimate", title=f"{site}: effect on {estimate.metric}"
            )
    return _save(fig, path)


def attribution_patching_table(
    estimate: AttributionPatchingResult,
    corr: Mapping[str, float],
    overlap: float,
    chance: float,
    title: str = "Attribution patching of the image tokens",
) -> Table:
    """Per site: the largest mean effect, its layer and token, and the agreement with activation patching."""
    table = Table(title=title)
    for name in ("site", "max |mean effect|", "layer", "image token", "corr. with act. patching"):
        table.add_column(name, justify="right")
    for site in estimate.sites:
        grid = estimate.site(site).mean(0)
        layer, token = np.unravel_index(np.abs(grid).argmax(), grid.shape)
        r = corr.get(site)
        table.add_row(
            site,
            f"{abs(grid[layer, token]):.3g}",
            str(estimate.layers[layer] if grid.shape[0] > 1 else "-"),
            str(token),
            "-" if r is None else f"{r:.3f}",
        )
    table.caption = f"top tokens shared with the most attended: {overlap:.0%} (chance {chance:.0%})"
    return table


# ----------------------------------------------------------------------------- tuned lens
def tuned_lens_figure(
    layers: Sequence[int],
    kl: Mapping[str, np.ndarray],
    agreement: Mapping[str, np.ndarray],
    path: str | Path,
) -> Path:
    """Held-out KL to the final distribution and agreement with the final answer, per layer and lens."""
    fig = _figure(8.4, 3.2)
    left, right = fig.subplots(1, 2)
    for name, values in kl.items():
        left.plot(layers, values, marker="o", label=name)
    left.set(xlabel="layer", ylabel="KL(final || lens), nats", title="Held-out KL")
    for name, values in agreement.items():
        right.plot(layers, values, marker="o", label=name)
    right.set(xlabel="layer", ylabel="fraction", title="Agreement with the final answer", ylim=(-0.02, 1.02))
    left.legend(fontsize=8)
    return _save(fig, path)


def tuned_lens_table(
    layers: Sequence[int], kl: Mapping[str, np.ndarray], agreement: Mapping[str, np.ndarray]
) -> Table:
    """Per layer: held-out KL and agreement with the final answer, for each lens."""
    table = Table(title="Tuned lens vs logit lens (held-out samples)")
    table.add_column("layer", justify="right")
    for name in kl:
        table.add_column(f"KL {name}", justify="right")
    for name in agreement:
        table.add_column(f"agree {name}", justify="right")
    for i, layer in enumerate(layers):
        table.add_row(
            str(layer), *[f"{v[i]:.3g}" for v in kl.values()], *[f"{v[i]:.0%}" for v in agreement.values()]
        )
    return table


def lens_pair_figure(
    layers: Sequence[int],
    level_probs: Mapping[str, np.ndarray],
    kl: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "",
) -> Path:
    """The level-word trajectory of each lens side by side (mean over samples), and their KL to the final.

    Args:
        layers: ``[layer]`` layer numbers.
        level_probs: Lens name -> ``[layer, level]`` mean level-word probabilities (excellent .. bad).
        kl: Lens name -> ``[layer]`` mean KL(final || lens), nats.
        path: The PNG.
        title: Figure title.
    """
    fig = _figure(4.0 * (len(level_probs) + 1), 3.2)
    axes = fig.subplots(1, len(level_probs) + 1)
    for ax, (name, probs) in zip(axes, level_probs.items(), strict=False):
        for k, word in enumerate(LEVEL_WORDS):
            ax.plot(layers, np.asarray(probs)[:, k], marker="o", ms=3, color=LEVEL_COLOURS[k], label=word)
        ax.set(xlabel="layer", ylabel="p(level)", ylim=(0, 1), title=f"{name} lens")
    axes[0].legend(fontsize=6)
    for name, values in kl.items():
        axes[-1].plot(layers, values, marker="o", label=name)
    axes[-1].set(xlabel="layer", ylabel="KL(final || lens), nats", title="KL to the final distribution")
    axes[-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
