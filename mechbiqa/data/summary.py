"""What a built benchmark holds: counts per split, type and level, label statistics, example descriptions.

`summarise_benchmark` reads a `Benchmark` (`mechbiqa.data.benchmark`) and returns plain
counts and means; `BuildResult` is `studies/build_benchmark.py`'s record of one build with
that summary and the independent label check. The tables are in `mechbiqa.reports_studies`,
the contact sheet in `mechbiqa.figures_data`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa.data.benchmark import Benchmark

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BuildResult:
    """What the build produced.

    Attributes:
        root: Benchmark directory.
        fingerprint: Its fingerprint.
        reused: Whether an existing build was loaded.
        seconds: Wall time of this run's build or load.
        build_seconds: Wall time of the original build.
        n_images: Number of images.
        photos_per_split: Photo ids per split.
        images_per_split: Image counts per split.
        cell_counts: ``{distortion: [count per level 0..5]}``.
        cell_mean_mos: ``{distortion: [mean label per level, None where empty]}``.
        word_counts: ``{split: {word: count}}``.
        word_edges: Level-word bin edges.
        mos_histogram: ``{"edges": [...], split: [counts]}``.
        examples: (id, level word, MOS, description) samples.
        check: The independent check, `IQAMetrics.to_dict()` plus the measure and split.
        contact_sheet: Path of the PNG.
        summary_json: Path of the JSON summary.
    """

    root: Path
    fingerprint: str
    reused: bool
    seconds: float
    build_seconds: float | None
    n_images: int
    photos_per_split: dict[str, list[str]]
    images_per_split: dict[str, int]
    cell_counts: dict[str, list[int]]
    cell_mean_mos: dict[str, list[float | None]]
    word_counts: dict[str, dict[str, int]]
    word_edges: list[float]
    mos_histogram: dict[str, list[float]]
    examples: list[tuple[str, str, float, str]]
    check: dict[str, Any]
    contact_sheet: Path
    summary_json: Path
    label_measure: str = field(default="ssim")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        for k in ("root", "contact_sheet", "summary_json"):
            d[k] = str(d[k])
        return d


def summarise_benchmark(bench: Benchmark, examples: int, seed: int) -> dict[str, Any]:
    """Counts, label statistics and ``examples`` test-split descriptions (drawn under ``seed``).

    Returns:
        The `BuildResult` fields ``photos_per_split``, ``images_per_split``, ``cell_counts``,
        ``cell_mean_mos``, ``word_counts``, ``mos_histogram`` (16 bins over 1-5) and ``examples``.
    """
    photos_per_split = {s: sorted({r.meta["photo"] for r in bench.split(s)}) for s in SPLITS}
    images_per_split = {s: len(bench.split(s)) for s in SPLITS}
    per_cell: dict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in range(6)])
    for r in bench.records:
        per_cell[r.distortion][r.level].append(r.score)
    order = ["pristine", *bench.config.distortions]
    cell_counts = {d: [len(v) for v in per_cell[d]] for d in order if d in per_cell}
    cell_mean = {
        d: [round(float(np.mean(v)), 3) if v else None for v in per_cell[d]] for d in order if d in per_cell
    }
    word_counts = {s: dict(Counter(r.level_word for r in bench.split(s))) for s in SPLITS}
    edges = np.linspace(1.0, 5.0, 17)
    histogram: dict[str, list[float]] = {"edges": edges.tolist()}
    for s in SPLITS:
        histogram[s] = np.histogram([r.score for r in bench.split(s)], bins=edges)[0].tolist()
    rng = np.random.default_rng(seed)
    test = bench.split("test")
    picks = rng.choice(len(test), size=min(examples, len(test)), replace=False)
    chosen = [
        (test[i].id, test[i].level_word, round(test[i].score, 3), test[i].description) for i in sorted(picks)
    ]
    return dict(
        photos_per_split=photos_per_split,
        images_per_split=images_per_split,
        cell_counts=cell_counts,
        cell_mean_mos=cell_mean,
        word_counts=word_counts,
        mos_histogram=histogram,
        examples=chosen,
    )
