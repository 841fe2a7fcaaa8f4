"""Rendering: results (dataclasses, arrays) -> rich renderables. Nothing is computed here.

Studies return results; these functions turn them into tables and bar rows that a
`rich.console.Console` prints. Keeping rendering apart lets tests check numbers
without parsing text, and lets a user re-render a saved result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.table import Table
from rich.text import Text

from mechbiqa.model.prompts import LEVEL_WORDS

LEVEL_COLOURS = ("green", "bright_green", "yellow", "orange3", "red")  # excellent .. bad
_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int = 20, style: str = "cyan") -> Text:
    """A horizontal bar of ``fraction`` in [0, 1] drawn with eighth-blocks."""
    fraction = float(np.clip(fraction, 0.0, 1.0))
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    return Text("█" * full + (_BLOCKS[rest] if rest else "") + " " * (width - full - (1 if rest else 0)), style=style)


def level_distribution(probs: Sequence[float], width: int = 20) -> Text:
    """One stacked bar of the five level probabilities, coloured excellent (green) to bad (red)."""
    out = Text()
    cells = np.round(np.asarray(probs, dtype=float) * width).astype(int)
    cells[int(np.argmax(probs))] += width - cells.sum()  # absorb rounding in the largest cell
    for n, colour in zip(cells, LEVEL_COLOURS):
        out.append("█" * max(int(n), 0), style=colour)
    return out


def level_legend() -> Text:
    """The colour key of `level_distribution`."""
    out = Text()
    for word, colour in zip(LEVEL_WORDS, LEVEL_COLOURS):
        out.append("█ ", style=colour).append(word + "  ")
    return out


def ratings_table(names: Sequence[str], scores: np.ndarray, level_probs: np.ndarray, title: str = "") -> Table:
    """One row per image: score, predicted level and the level distribution."""
    table = Table(title=title or None, caption=level_legend())
    table.add_column("image")
    table.add_column("score (0-1)", justify="right")
    table.add_column("level")
    table.add_column("p(excellent .. bad)", no_wrap=True, min_width=20)
    for name, score, probs in zip(names, scores, level_probs):
        k = int(np.argmax(probs))
        table.add_row(name, f"{score:.3f}", Text(LEVEL_WORDS[k], style=LEVEL_COLOURS[k]), level_distribution(probs))
    return table
