"""Figures (PNG) of the study results: logit-lens trajectories, attention heatmap, patching effects.

Where it sits: the analysis functions (`mechbiqa.analysis`) return dataclasses;
the studies (`studies/*.py`) pass them here to write PNGs next to their JSON,
as `mechbiqa.reports` turns the same results into terminal tables. Nothing is
computed here beyond arranging numbers for a plot.

Every function draws on its own `matplotlib.figure.Figure` with the Agg
canvas, created inside the function: no pyplot state, no global backend
switch at import, safe in tests and on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.model.roles import ROLE_LABELS, Role
from mechbiqa.outputs import write_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mechbiqa.analysis.attribution import AttributionResult
    from mechbiqa.analysis.conversion import ConversionResult
    from mechbiqa.analysis.lens import LensResult
    from mechbiqa.analysis.paper_figures import Fig3Data, Fig5Data, Fig6Data
    from mechbiqa.analysis.patching import SweepResult

__all__ = [
    "LEVEL_COLOURS",
    "ROLE_COLOURS",
    "attention_heatmap",
    "conversion_staircase",
    "fig3_candidates",
    "fig5_attention",
    "fig6_levels",
    "lens_trajectories",
    "patching_effects",
    "probe_lens_curves",
]

LEVEL_COLOURS = ("#1a9850", "#91cf60", "#fee08b", "#fc8d59", "#d73027")  # excellent .. bad
ROLE_COLOURS = {  # by Role value
    Role.BOS: "#000000",
    Role.INSTRUCTION: "#9e9e9e",
    Role.IMAGE: "#1f78b4",
    Role.DESCRIPTION: "#33a02c",
    Role.QUALITY: "#e31a1c",
    Role.OTHER: "#ff7f00",
    Role.PAD: "#ffffff",
}


def _figure(width: float, height: float) -> Figure:
    """A Figure on the Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # layers and positions are whole numbers
        if ax.get_xlabel() in ("layer",):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return write_figure(path, fig)


def lens_trajectories(
    result: LensResult, path: str | Path, title: str = "Logit lens at the quality position"
) -> Path:
    """Level-word probabilities per layer (mean, and by final answer) and agreement with the final answer.

    Top left: mean probability of each level word per layer; top right: the fraction of samples
    whose layer answer equals the final one, with the settle layer marked. Bottom: one panel per
    final answer that occurs ("images rated poor"), the mean trajectories of those samples.
    """
    present = [k for k in range(len(LEVEL_WORDS)) if result.n_by_answer[k] > 0]
    n_bottom = max(len(present), 1)
    fig = _figure(max(8.0, 2.6 * n_bottom), 6.2)
    grid = fig.add_gridspec(2, 2 * n_bottom)
    layers = result.layers
    ax = fig.add_subplot(grid[0, :n_bottom])
    mean = result.mean_level_probs
    for k, word in enumerate(result.level_words):
        ax.plot(layers, mean[:, k], marker="o", ms=3, color=LEVEL_COLOURS[k], label=word)
    ax.set(xlabel="layer", ylabel="p(level) (softmax over level words)", ylim=(0, 1), title="all samples")
    ax.legend(fontsize=7, ncol=1)
    ax = fig.add_subplot(grid[0, n_bottom:])
    ax.plot(layers, result.agreement, marker="o", ms=3, color="black")
    ax.axvline(
        result.median_settle, color="grey", ls="--", lw=1, label=f"median settle = {result.median_settle:g}"
    )
    ax.set(xlabel="layer", ylabel="agreement with the final answer", ylim=(0, 1.02), title="agreement")
    ax.legend(fontsize=7)
    for slot, level in enumerate(present):
        ax = fig.add_subplot(grid[1, 2 * slot : 2 * slot + 2])
        for k in range(len(result.level_words)):
            ax.plot(layers, result.by_answer[level][:, k], color=LEVEL_COLOURS[k], lw=1.5)
        ax.set(
            xlabel="layer",
            ylim=(0, 1),
            title=f"final '{result.level_words[level]}' (n={result.n_by_answer[level]})",
        )
        if slot == 0:
            ax.set_ylabel("p(level)")
    fig.suptitle(title)
    return _save(fig, path)


def attention_heatmap(
    result: AttributionResult, path: str | Path, title: str = "Attention of the quality position"
) -> Path:
    """Layers x key positions heatmap of the quality row, with a band coloured by token role beneath it."""
    heat = result.heatmap
    roles = result.heatmap_roles
    real = np.flatnonzero(roles != int(Role.PAD))
    width = int(real.max()) + 1 if len(real) else heat.shape[1]
    heat, roles = heat[:, :width], roles[:width]
    fig = _figure(min(18.0, 4.0 + width * 0.06), 2.6 + 0.25 * heat.shape[0])
    grid = fig.add_gridspec(2, 2, height_ratios=(max(heat.shape[0], 2), 0.6), width_ratios=(1, 0.02))
    ax = fig.add_subplot(grid[0, 0])
    from matplotlib.colors import PowerNorm

    # a square-root colour scale: attention sinks (BOS) would otherwise leave the image tokens black
    image = ax.imshow(
        heat,
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        norm=PowerNorm(0.5, vmin=0),
        extent=(-0.5, width - 0.5, result.layers[-1] + 0.5, result.layers[0] - 0.5),
    )
    ax.set(ylabel="layer", title=f"{title} (mean over heads and {len(result.sample_ids)} samples)")
    ax.set_xticks([])
    step = max(1, len(result.layers) // 16)
    ax.set_yticks(result.layers[::step])
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), label="attention")
    band = fig.add_subplot(grid[1, 0], sharex=ax)
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([ROLE_COLOURS[Role(v)] for v in range(len(Role))])
    band.imshow(
        roles[None].astype(float),
        aspect="auto",
        cmap=cmap,
        vmin=-0.5,
        vmax=len(Role) - 0.5,
        interpolation="nearest",
        extent=(-0.5, width - 0.5, 0, 1),
    )
    band.set_yticks([])
    band.set_xlabel("key position (0 = BOS)")
    from matplotlib.patches import Patch

    shown = sorted({int(r) for r in roles} - {int(Role.PAD)})
    band.legend(
        handles=[Patch(color=ROLE_COLOURS[Role(r)], label=ROLE_LABELS[r]) for r in shown],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.9),
        ncol=len(shown),
        fontsize=7,
        frameon=False,
    )
    return _save(fig, path)


def patching_effects(
    result: SweepResult,
    path: str | Path,
    selections: Sequence[str] | None = None,
    title: str = "Patching the image tokens",
) -> Path:
    """Mean score change and answer flip rate per layer: one row pair per site, one column per setter.

    One line per token selection (dominant / random / least attended ...); y axes are shared
    within a row so that the selections and setters compare at a glance.
    """
    keys, layers, effect = result.grid("score_effect", rows=("site", "setter", "selection"))
    _, _, flips = result.grid("flip_rate", rows=("site", "setter", "selection"))
    sites = list(dict.fromkeys(k[0] for k in keys))
    setters = list(dict.fromkeys(k[1] for k in keys))
    chosen = list(selections) if selections is not None else list(dict.fromkeys(k[2] for k in keys))
    colours = {"dominant": "#d62728", "random": "#7f7f7f", "least": "#1f77b4", "all": "#000000"}
    fig = _figure(max(6.0, 3.2 * len(setters)), 2.4 * 2 * max(len(sites), 1) + 0.6)
    grid = fig.add_gridspec(2 * max(len(sites), 1), max(len(setters), 1))
    for r, site in enumerate(sites):
        first_top = first_bottom = None
        for c, setter in enumerate(setters):
            top = fig.add_subplot(grid[2 * r, c], sharey=first_top)
            bottom = fig.add_subplot(grid[2 * r + 1, c], sharey=first_bottom)
            first_top, first_bottom = first_top or top, first_bottom or bottom
            for selection in chosen:
                if (site, setter, selection) not in keys:
                    continue
                row = keys.index((site, setter, selection))
                style = dict(marker="o", ms=3, label=selection, color=colours.get(selection))
                top.plot(layers, effect[row], **style)
                bottom.plot(layers, flips[row], **style)
            top.axhline(0, color="black", lw=0.5)
            top.set(title=f"{site} / {setter}", xlabel="layer")
            bottom.set(xlabel="layer", ylim=(-0.02, 1.02))
            if c == 0:
                top.set_ylabel("score change (0-1)")
                bottom.set_ylabel("answer flip rate")
            if r == 0 and c == 0:
                top.legend(fontsize=7)
    fig.suptitle(f"{title} ({result.score.shape[1]} images; mean over images)")
    return _save(fig, path)


def probe_lens_curves(
    curves: dict[str, dict],
    path: str | Path,
    title: str = "Where quality is decodable (probes) vs where the words settle (logit lens)",
) -> Path:
    """One panel per checkpoint: ridge-probe SRCC per layer beside the logit lens's curves.

    Args:
        curves: Checkpoint name -> the probes section of ``studies/replicate.py``'s summary
            (``layers``, ``probe_srcc``, ``probe_control_srcc``, ``lens_srcc``, ``lens_agreement``,
            ``lens_final_prob``; missing or None curves are left out).
        path: The PNG.
        title: Figure title.
    """
    names = [n for n, c in curves.items() if c.get("layers")]
    fig = _figure(4.2 * max(len(names), 1), 3.4)
    styles = (
        ("probe_srcc", "probe SRCC (ridge, CV by photo)", dict(color="#1f78b4", marker="o")),
        ("probe_control_srcc", "probe, shuffled labels", dict(color="#1f78b4", ls=":", lw=1)),
        ("lens_srcc", "lens SRCC (Q-Align score)", dict(color="#e7298a", marker="s")),
        ("lens_agreement", "lens answer = final", dict(color="black", ls="--", lw=1)),
        ("lens_final_prob", "lens P(final level)", dict(color="grey", lw=1)),
    )
    for slot, name in enumerate(names):
        c = curves[name]
        ax = fig.add_subplot(1, max(len(names), 1), slot + 1)
        for key, label, style in styles:
            values = c.get(key)
            if values is None:
                continue
            ys = np.array([np.nan if v is None else float(v) for v in values])
            ax.plot(c["layers"], ys, ms=3, label=label, **style)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="layer", ylim=(-1.02, 1.02), title=name)
        if slot == 0:
            ax.set_ylabel("SRCC / share / probability")
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(title)
    return _save(fig, path)


def conversion_staircase(
    result: ConversionResult, path: str | Path, title: str = "Conversion error: MOS vs restored score"
) -> Path:
    """MOS (x) against the restored scores (y): the label staircase, the Q-Align score, the regressor.

    Args:
        result: A `mechbiqa.analysis.conversion.ConversionResult`.
        path: The PNG.
        title: Figure title.
    """
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.linspace(0, 1, 501)
    steps = np.minimum(4, np.floor(grid * 5))
    stair = steps / 4 if result.restore == "qalign" else (steps + 0.5) / 5
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="identity")
    label = f"label approximation (RMSE {result.label_approximation.rmse:.3f})"
    ax.plot(grid, stair, color="black", lw=1.4, drawstyle="steps-post", label=label)
    if result.qalign is not None and result.restoration is not None:
        ax.scatter(result.mos, result.qalign, s=9, alpha=0.6, color="#e7298a",
                   label=f"Q-Align score (RMSE {result.restoration.rmse:.3f})")
    if result.regressed is not None and result.score_token is not None:
        ax.scatter(result.mos, result.regressed, s=9, alpha=0.6, marker="^", color="#1f78b4",
                   label=f"score-token regressor (RMSE {result.score_token.rmse:.3f})")
    for edge in (0.2, 0.4, 0.6, 0.8):
        ax.axvline(edge, color="grey", lw=0.4)
    ax.set(xlabel="MOS (0-1)", ylabel="restored score (0-1)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


# ----------------------------------------------------------------------------- the paper's figures
# Drawn from `mechbiqa.analysis.paper_figures` (which computes them from a store).
def fig3_candidates(data: Fig3Data, path: str | Path, title: str = "Fig. 3") -> Path:
    """One image's logit lens: the top-k candidate tokens per layer, and its level-word probabilities.

    Left: one row per layer, one cell per candidate (most probable first), shaded by its
    full-vocabulary probability; level words are bold. Right: the five level words' softmax at
    the same layers (stacked, excellent green .. bad red).
    """
    n_layers, k = data.top_probs.shape
    fig = _figure(2.0 + 1.5 * k + 2.6, 1.2 + 0.28 * n_layers)
    grid = fig.add_gridspec(1, 2, width_ratios=(1.5 * k, 2.6))
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(data.top_probs, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n_layers):
        for j in range(k):
            text = data.top_tokens[i][j].strip() or f"#{int(data.top_ids[i, j])}"
            bold = text in LEVEL_WORDS
            ax.text(j, i, f"{text} {data.top_probs[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    weight="bold" if bold else "normal",
                    color="white" if data.top_probs[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [f"top {j + 1}" for j in range(k)])
    ax.set_yticks(range(n_layers), [str(int(x)) for x in data.layers])
    ax.set_ylabel("layer")
    label = "" if not np.isfinite(data.label) else f", label {data.label:.2f}"
    ax.set_title(f"top-{k} candidates at the quality position ({data.sample_id}{label})", fontsize=9)
    bars = fig.add_subplot(grid[0, 1], sharey=ax)
    left = np.zeros(n_layers)
    for level, word in enumerate(LEVEL_WORDS):
        bars.barh(range(n_layers), data.level_probs[:, level], left=left, color=LEVEL_COLOURS[level],
                  label=word)
        left += data.level_probs[:, level]
    bars.set(xlim=(0, 1), xlabel="p(level) (softmax over level words)")
    bars.tick_params(labelleft=False)
    bars.legend(fontsize=6, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(title)
    return write_figure(path, fig)


def fig5_attention(data: Fig5Data, path: str | Path, title: str = "Fig. 5") -> Path:
    """Layers x role-aligned key columns: the quality position's attention, with the role runs marked.

    Columns follow `Fig5Data.segments` (image tokens by index, the description in relative bins);
    a band beneath colours each column by role and a line separates the runs.
    """
    from matplotlib.colors import ListedColormap, PowerNorm

    heat = data.heat
    n_layers, width = heat.shape
    fig = _figure(min(18.0, 6.0 + width * 0.07), 3.2 + 0.22 * n_layers)
    grid = fig.add_gridspec(2, 2, height_ratios=(max(n_layers, 2), 0.6), width_ratios=(1, 0.02))
    ax = fig.add_subplot(grid[0, 0])
    # square-root colours: the attention sink (bos) would otherwise leave every other column black
    image = ax.imshow(heat, aspect="auto", cmap="magma", interpolation="nearest", norm=PowerNorm(0.5, vmin=0),
                      extent=(-0.5, width - 0.5, n_layers - 0.5, -0.5))
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step), [str(int(x)) for x in data.layers[::step]])
    ax.set_xticks([])
    ax.set_ylabel("layer")
    for seg in data.segments[1:]:
        ax.axvline(seg["start"] - 0.5, color="white", lw=0.6)
    ax.set_title(f"attention of the quality position, aligned by role\n(mean over heads and "
                 f"{len(data.sample_ids)} samples)", fontsize=8)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, 1]), label="attention per key")
    band = fig.add_subplot(grid[1, 0])
    cmap = ListedColormap([ROLE_COLOURS[Role(v)] for v in range(len(Role))])
    band.imshow(data.column_roles[None].astype(float), aspect="auto", cmap=cmap, vmin=-0.5,
                vmax=len(Role) - 0.5, interpolation="nearest", extent=(-0.5, width - 0.5, 0, 1))
    band.set(xlim=ax.get_xlim(), yticks=[])
    # one label per run, slanted so that short runs (bos, a 1-token instruction) stay legible
    band.set_xticks([(s["start"] + s["stop"] - 1) / 2 for s in data.segments],
                    [s["role"] + (" (relative)" if "bins" in s["align"] else "") for s in data.segments],
                    fontsize=6, rotation=35, ha="right")
    band.set_xlabel("key positions aligned by role (image tokens by index)", fontsize=7)
    fig.suptitle(title)
    return write_figure(path, fig)


def fig6_levels(data: Fig6Data, path: str | Path, title: str = "Fig. 6") -> Path:
    """For the samples labelled ``data.label``: the frequency of each level as the argmax, per last layer.

    One group of five bars per layer (excellent .. bad), heights = share of those samples.
    """
    n_layers = len(data.layers)
    fig = _figure(max(5.0, 0.9 * n_layers + 1.5), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    freq = np.nan_to_num(data.frequency)
    width = 0.8 / len(LEVEL_WORDS)
    x = np.arange(n_layers)
    for level, word in enumerate(LEVEL_WORDS):
        ax.bar(x - 0.4 + width * (level + 0.5), freq[:, level], width, color=LEVEL_COLOURS[level], label=word,
               edgecolor="black", linewidth=0.3)
    ax.set_xticks(x, [str(int(v)) for v in data.layers])
    ax.set(xlabel="layer", ylabel="share of the samples (argmax level)", ylim=(0, 1.18),
           title=f"samples labelled '{data.label}' (n={len(data.sample_ids)}): "
                 "the level each layer would answer")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    fig.suptitle(title)
    return write_figure(path, fig)
