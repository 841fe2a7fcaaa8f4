"""Columns, tables and the figure of the pair's companions (RL and Q-Scorer) and of the conversion error.

Where it sits: beside `mechbiqa.reports` and `mechbiqa.figures` (same rules: rich
renderables and Agg figures, nothing computed beyond arranging numbers), for the
entries of `mechbiqa.train.companions.train_companions` (``results.json``'s ``rl``
and ``q_scorer``) and the `mechbiqa.analysis.conversion.ConversionTable` of
`mechbiqa.train.companions.write_conversion_error`. The main job adds
`companion_columns` to ``summary.json``'s metrics and prints `companion_table`
and `conversion_error_table` after its comparison report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from mechbiqa.figures import _figure, _save

if TYPE_CHECKING:
    from mechbiqa.analysis.conversion import ConversionTable

__all__ = [
    "COLUMNS",
    "REGRESSORS",
    "ROWS",
    "companion_columns",
    "companion_table",
    "conversion_error_table",
    "conversion_figure",
]

COLUMNS: dict[str, str] = {"one_stage": "one-stage", "two_stage": "two-stage", "rl": "RL (GRPO)",
                           "q_scorer": "Q-Scorer"}  # fmt: skip
"""``results.json`` key -> column title (and ``summary.json`` mode name)."""

REGRESSORS: dict[str, str] = {"q_scorer_regressed": "Q-Scorer: MLP regressor on the score token"}
"""``conversion_error.json`` score-token key -> its label."""

ROWS: tuple[tuple[str, str], ...] = (
    ("srcc", "SRCC, test split (Q-Align score vs label)"),
    ("plcc", "PLCC, test split"),
    ("level_acc", "level accuracy"),
    ("family_rate", "descriptions naming the distortion family"),
    ("rouge1_f1", "ROUGE-1 F1 of descriptions vs references"),
    ("srcc_regressed", "SRCC: score-token regressor (MLP)"),
    ("plcc_regressed", "PLCC: score-token regressor (MLP)"),
    ("srcc_token", "SRCC: the score token's interval"),
    ("emitted_rate", "answers that wrote their score token"),
    ("train_seconds", "training seconds"),
    ("eval_seconds", "rating seconds"),
)
"""Entry key -> row label of `companion_table`, in order."""


def companion_columns(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary numbers of each checkpoint present (``summary.json``: mode -> metric -> value).

    Per-image arrays (``ids``, ``scores``, ``descriptions`` ...) are left out; ``vs_one_stage`` is kept.
    """
    keep = {k for k, _ in ROWS} | {"n", "krcc", "plcc_fitted", "vs_one_stage", "path"}
    return {COLUMNS[k]: {m: v for m, v in results[k].items() if m in keep}
            for k in COLUMNS if isinstance(results.get(k), Mapping)}  # fmt: skip


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def companion_table(results: Mapping[str, Any]) -> Table:
    """One column per checkpoint (one-stage, two-stage, RL, Q-Scorer: those present), one row per metric.

    A row that no checkpoint has is left out; the companions' comparison with the one-stage checkpoint
    (``vs_one_stage``: SRCC difference with its 95% interval, ROUGE-1 and level-hit differences with
    their p-values) follows as rows of their own.
    """
    present = [k for k in COLUMNS if isinstance(results.get(k), Mapping)]
    table = Table(title="the pair and its companions on the held-out test images")
    table.add_column("metric")
    for k in present:
        table.add_column(COLUMNS[k], justify="right")
    for key, label in ROWS:
        if any(results[k].get(key) is not None for k in present):
            table.add_row(label, *(_cell(results[k].get(key)) for k in present))
    for key, label in (("srcc", "SRCC minus one-stage [95% CI]"), ("rouge1_f1", "ROUGE-1 F1 minus one-stage"),
                       ("level_hit", "level hits minus one-stage")):  # fmt: skip
        cells = [_versus(results[k].get("vs_one_stage", {}).get(key)) for k in present]
        if any(c != "-" for c in cells):
            table.add_row(label, *cells)
    return table


def _versus(test: Mapping[str, Any] | None) -> str:
    """``+0.012 [-0.01, +0.03]`` (bootstrap) or ``+0.012, p 0.04`` (permutation)."""
    if not test:
        return "-"
    if "difference" in test:
        low, high = test["ci95"]
        return f"{test['difference']:+.3f} [{_signed(low)}, {_signed(high)}]"
    return f"{test['effect']:+.3f}, p {test['p_value']:.2g}" if test.get("effect") is not None else "-"


def _signed(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def conversion_error_table(payload: Mapping[str, Any]) -> Table:
    """``conversion_error.json`` as a table: RMSE, SRCC, PLCC and RMSE beyond the label floor per row."""
    table = Table(title=f"conversion error on 0-1 ({payload['n']} test images, restore={payload['restore']})")
    for column in ("", "RMSE", "beyond floor", "SRCC", "PLCC"):
        table.add_column(column, justify="right" if column else "left")
    floor = payload["label_approximation"]
    table.add_row("label approximation (the floor)", _cell(floor["rmse"]), "", _cell(floor["srcc"]),
                  _cell(floor["plcc"]))  # fmt: skip
    beyond = payload.get("beyond_floor_rmse", {})
    for group, suffix in (("restoration", "Q-Align score"), ("score_token", "")):
        for name, stats in payload.get(group, {}).items():
            label = f"{COLUMNS.get(name, name)}: {suffix}" if suffix else REGRESSORS.get(name, name)
            table.add_row(label, _cell(stats["rmse"]), _signed(beyond.get(name)), _cell(stats["srcc"]),
                          _cell(stats["plcc"]))  # fmt: skip
    return table


_COLOURS = {"one_stage": "#e7298a", "two_stage": "#66a61e", "rl": "#d95f02", "q_scorer": "#7570b3"}


def conversion_figure(table: ConversionTable, path: str | Path) -> Path:
    """MOS (x) against each checkpoint's score (y), over the label staircase; RMSEs in the legend."""
    fig = _figure(5.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    grid = np.linspace(0, 1, 501)
    steps = np.minimum(4, np.floor(grid * 5))
    stair = steps / 4 if table.restore == "qalign" else (steps + 0.5) / 5
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="identity")
    ax.plot(grid, stair, color="black", lw=1.4, drawstyle="steps-post",
            label=f"label approximation (RMSE {table.label_approximation.rmse:.3f})")  # fmt: skip
    for name, stats in table.restoration.items():
        ax.scatter(table.mos, table.scores[name], s=7, alpha=0.45, color=_COLOURS.get(name),
                   label=f"{COLUMNS.get(name, name)} Q-Align (RMSE {stats.rmse:.3f})")  # fmt: skip
    for name, stats in table.score_token.items():
        ax.scatter(table.mos, table.scores[name], s=9, alpha=0.6, marker="^", color="#1f78b4",
                   label=f"{REGRESSORS.get(name, name)} (RMSE {stats.rmse:.3f})")  # fmt: skip
    for edge in (0.2, 0.4, 0.6, 0.8):
        ax.axvline(edge, color="grey", lw=0.4)
    ax.set(xlabel="MOS (0-1)", ylabel="score (0-1)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="Conversion error: MOS vs restored and predicted scores")  # fmt: skip
    ax.legend(fontsize=6, loc="upper left")
    return _save(fig, path)
