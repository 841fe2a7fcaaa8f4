"""Figures of the built-in benchmark: the contact sheet of `studies/build_benchmark.py`.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state), like `mechbiqa.figures`.
"""

from __future__ import annotations

from pathlib import Path

from mechbiqa.data.benchmark import Benchmark


def contact_sheet(bench: Benchmark, path: Path, split: str = "test") -> Path:
    """PNG grid: one crop of ``split`` under every type (rows) and level 0-5 (columns), with labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = bench.split(split) or list(bench.records)
    ref_id = sorted({r.ref_id for r in records})[0]
    by_cell = {(r.distortion, r.level): r for r in records if r.ref_id == ref_id}
    rows = list(bench.config.distortions)
    fig = Figure(figsize=(6 * 1.25, len(rows) * 1.35 + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 6, squeeze=False)
    for i, name in enumerate(rows):
        for level in range(6):
            ax = axes[i][level]
            ax.set_xticks([])
            ax.set_yticks([])
            rec = by_cell.get(("pristine", 0)) if level == 0 else by_cell.get((name, level))
            if rec is None:
                ax.axis("off")
                continue
            ax.imshow(bench.load_image(rec), interpolation="nearest")
            ax.set_title(f"{rec.score:.2f} {rec.level_word}", fontsize=7, pad=2)
            if level == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    height = len(rows) * 1.35 + 0.4
    fig.suptitle(
        f"{ref_id} ({split}): level 0 (pristine) to 5; label = MOS (1-5) and level word",
        fontsize=9,
        y=1 - 0.08 / height,
        va="top",
    )
    fig.subplots_adjust(left=0.2, right=0.99, top=1 - 0.55 / height, bottom=0.01, hspace=0.35, wspace=0.05)
    fig.savefig(path)
    return path
