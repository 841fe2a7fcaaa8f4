"""Rendering of the main job's attribution analyses: metrics -> rich tables. Nothing is computed here.

Where it sits: `mechbiqa.analysis.replication_attribution.attribution_analysis` returns, per
checkpoint, JSON-able metrics (``dla``, ``tuned_lens``, ``attribution_patching``); these
functions arrange them for the terminal beside `mechbiqa.reports.comparison_report`. They take
the metrics as returned or as read back from ``summary.json`` (tuples as lists), for any number
of checkpoints, and stay legible at 80 columns also for 32 layers: one row per head, role or
layer, a few narrow columns, one lens table per checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from rich import box
from rich.console import Group
from rich.table import Table

__all__ = ["attribution_report", "heads_table", "lens_table", "patching_table", "roles_table"]

_ROLES = ("image", "description", "instruction", "bos", "quality")
_BOX = box.SIMPLE_HEAD
_WIDTH = 78
"""Every table is drawn this wide (titles and captions on few lines; fits an 80-column terminal)."""


def _pm(pair: Any, fmt: str = "+.3f") -> str:
    """``mean ± std`` of a (mean, std) pair; "-" when missing."""
    if pair is None:
        return "-"
    mean, spread = (float(x) for x in pair)
    return f"{mean:{fmt}} ± {abs(spread):{fmt.lstrip('+')}}"


def heads_table(metrics: Mapping[str, Mapping[str, Any]]) -> Table:
    """The heads that carry the decision: per checkpoint, its top heads by mean |contribution|.

    Args:
        metrics: Checkpoint name -> `attribution_analysis` metrics.
    """
    direction = next((m["dla"]["direction"] for m in metrics.values() if m.get("dla")), "")
    table = Table(
        title=f"Heads that write the quality decision (direct logit attribution, {direction})",
        box=_BOX,
        min_width=_WIDTH,
        caption="write: mean contribution over images; |write|: mean of its size; "
        "image, descr.: the mean write copied from those tokens",
    )
    for name, justify in (
        ("checkpoint", "left"),
        ("head", "left"),
        ("write", "right"),
        ("|write|", "right"),
        ("share", "right"),
        ("image", "right"),
        ("descr.", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for mode, m in metrics.items():
        for rank, head in enumerate((m.get("dla") or {}).get("top_heads", [])):
            roles = head.get("by_role") or {}
            cell = lambda r, roles=roles: "-" if r not in roles else f"{roles[r]:+.3f}"  # noqa: E731
            table.add_row(
                mode if rank == 0 else "",
                f"L{head['layer']}.H{head['head']}",
                f"{head['mean']:+.3f}",
                f"{head['mean_abs']:.3f}",
                f"{head['share_of_head_writes']:.0%}",
                cell("image"),
                cell("description"),
                end_section=rank == len(m["dla"]["top_heads"]) - 1,
            )
    return table


def roles_table(metrics: Mapping[str, Mapping[str, Any]]) -> Table:
    """Share of the attention write on the decision coming from each source role, per checkpoint."""
    table = Table(
        title="Where the decision is written from: share of the attention write (mean ± std)",
        box=_BOX,
        min_width=_WIDTH,
        caption="share: |net write of the role| / sum over roles, per image; sum error: "
        "largest |sum of parts - decision from the logits|",
    )
    table.add_column("source", justify="left")
    for mode in metrics:
        table.add_column(mode, justify="right")
    dla = {mode: m.get("dla") or {} for mode, m in metrics.items()}
    for role in _ROLES:
        cells = []
        for d in dla.values():
            entry = (d.get("roles") or {}).get(role)
            cells.append("-" if entry is None else _pm(entry["share"], ".2f"))
        table.add_row(role, *cells)
    table.add_section()
    table.add_row("attention total", *[_pm(d.get("attn_total")) for d in dla.values()])
    table.add_row("MLP total", *[_pm(d.get("mlp_total")) for d in dla.values()])
    table.add_row("embedding", *["-" if "embed" not in d else f"{d['embed']:+.3f}" for d in dla.values()])
    table.add_row("decision", *[_pm(d.get("decision")) for d in dla.values()])
    table.add_row(
        "sum error", *["-" if d.get("sum_error") is None else f"{d['sum_error']:.1e}" for d in dla.values()]
    )
    table.add_row("images", *[str(d.get("n_images", "-")) for d in dla.values()])
    return table


def patching_table(metrics: Mapping[str, Mapping[str, Any]]) -> Table | None:
    """Attribution patching (checkpoints whose quality position reads the image): its check and top positions.

    Returns:
        The table, or None when no checkpoint has the analysis.
    """
    rows = {mode: m["attribution_patching"] for mode, m in metrics.items() if m.get("attribution_patching")}
    if not rows:
        return None
    first = next(iter(rows.values()))
    k = len(first["top_positions"])
    table = Table(
        title=f"Attribution patching of the image tokens ({first['metric']}, {first['reference']} reference)",
        box=_BOX,
        min_width=_WIDTH,
        caption=f"r: Pearson correlation with activation patching over images x layers x positions; "
        f"top {k}: image tokens with the largest mean estimated effect; attended: the {k} most "
        "attended by the quality position",
    )
    for name, justify in (
        ("checkpoint", "left"),
        ("site", "left"),
        ("r", "right"),
        ("peak", "right"),
        (f"top {k}", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for mode, ap in rows.items():
        for i, site in enumerate(ap["sites"]):
            r = (ap.get("corr") or {}).get(site)
            peak = ap["peaks"][site]
            table.add_row(
                mode if i == 0 else "",
                site,
                "-" if r is None else f"{r:.3f}",
                f"L{peak['layer']} t{peak['token']}",
                " ".join(map(str, ap["top_positions"])) if i == 0 else "",
            )
        pooled = ap.get("corr_pooled")
        table.add_row("", "pooled", "-" if pooled is None else f"{pooled:.3f}", "", "")
        table.add_row("", "attended", "", "", " ".join(map(str, ap["most_attended"])))
        overlap = ap["overlap"]
        table.add_row(
            "",
            "overlap",
            "",
            "",
            f"{ap['top_overlap']:.0%} of the mean top {k}; per image "
            f"{float(overlap[0]):.0%} ± {float(overlap[1]):.0%} (chance {ap['overlap_chance']:.0%})",
            end_section=True,
        )
    return table


def lens_table(name: str, lens: Mapping[str, Any]) -> Table:
    """Per layer, the tuned lens beside the logit lens: KL to the final, agreement, p(final answer)."""
    layers = list(lens["layers"])
    kl = {k: np.asarray(v, dtype=float) for k, v in lens["kl"].items()}
    agree = {k: np.asarray(v, dtype=float) for k, v in lens["agreement"].items()}
    p_final = {k: np.asarray(v, dtype=float) for k, v in lens["p_final"].items()}
    below = lens.get("tuned_below_logit")
    verdict = (
        ""
        if below is None
        else (
            "; tuned KL below logit KL at every layer but the last"
            if below
            else "; tuned KL NOT below logit KL at every layer but the last"
        )
    )
    changes, settle = lens["changes"], lens["settle"]
    table = Table(
        title=f"{name}: tuned lens vs logit lens at the quality position",
        box=_BOX,
        min_width=_WIDTH,
        caption=f"{lens['n_images']} images, {lens['folds']}-fold cross-fitted tuned lens ({lens['steps']} "
        f"steps, {lens['train_seconds']:.1f} s){verdict}. Answer changes: logit "
        f"{_pm(changes['logit'], '.2f')}, tuned {_pm(changes['tuned'], '.2f')}; settle layer: logit "
        f"{_pm(settle['logit'], '.2f')}, tuned {_pm(settle['tuned'], '.2f')}",
    )
    for column in ("layer", "KL logit", "KL tuned", "agree lg", "agree tn", "p(fin) lg", "p(fin) tn"):
        table.add_column(column, justify="right")
    for i, layer in enumerate(layers):
        table.add_row(
            str(layer),
            f"{kl['logit'][i]:.3g}",
            f"{kl['tuned'][i]:.3g}",
            f"{agree['logit'][i]:.0%}",
            f"{agree['tuned'][i]:.0%}",
            f"{p_final['logit'][i]:.2f}",
            f"{p_final['tuned'][i]:.2f}",
        )
    return table


def attribution_report(metrics: Mapping[str, Mapping[str, Any]]) -> Group:
    """Every table of the attribution analyses, for checkpoint name -> `attribution_analysis` metrics."""
    parts: list[Any] = [heads_table(metrics), roles_table(metrics)]
    patching = patching_table(metrics)
    if patching is not None:
        parts.append(patching)
    parts += [lens_table(mode, m["tuned_lens"]) for mode, m in metrics.items() if m.get("tuned_lens")]
    return Group(*parts)
