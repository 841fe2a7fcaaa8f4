"""Build the built-in BIQA benchmark and summarise it.

Question: is the embedded benchmark there, and are its labels meaningful?
Method: build (or reuse) the benchmark with `mechbiqa.data.build_benchmark`;
count images per split, type and level; tabulate the labels (KADID 1-5 scale)
and level words; sample descriptions; check the labels independently with a
full-reference measure that played no part in making them (GMSD by default;
the labels use SSIM), as SRCC and fitted PLCC on the test split with bootstrap
intervals. Output: ``<out_dir>/summary.json``, ``<out_dir>/contact_sheet.png``
(one test-split crop under every type and level, with labels) and a rich
summary in the terminal.

    python studies/build_benchmark.py --out cache/benchmark
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mechbiqa import cli, outputs
from mechbiqa.data import (
    DEFAULT_DISTORTIONS,
    Benchmark,
    BenchmarkConfig,
    build_benchmark,
    full_reference_agreement,
)
from mechbiqa.data.records import LEVEL_WORDS


@dataclass(frozen=True, slots=True)
class Config:
    """What to build and how to check it.

    Attributes:
        out_dir: The benchmark directory (summary and contact sheet are written into it too; ``--out``).
        image_size: Image side in pixels.
        crops_per_photo: Crops per reference photo.
        distortions: Distortion types.
        photos: Exactly these photo ids (None: every packaged photo found).
        seed: Seed of the build.
        overwrite: Rebuild a directory that holds a build from another config.
        check_measure: Full-reference measure for the independent label check (not the label measure).
        check_split: Split of the check.
        bootstrap: Bootstrap resamples for the check's confidence intervals.
        examples: Example descriptions to show.
    """

    out_dir: Path = field(
        default=Path("cache/benchmark"), metadata=cli.meta(flag="--out", aliases=("--out-dir",))
    )
    image_size: int = 64
    crops_per_photo: int = 12
    distortions: tuple[str, ...] = DEFAULT_DISTORTIONS
    photos: tuple[str, ...] | None = None
    seed: int = 0
    overwrite: bool = False
    check_measure: Literal["gmsd", "psnr", "ssim"] = "gmsd"
    check_split: Literal["train", "val", "test"] = "test"
    bootstrap: int = 200
    examples: int = 8

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.image_size < 8 or self.crops_per_photo < 1 or self.bootstrap < 0 or self.examples < 0:
            raise ValueError(
                f"--image-size {self.image_size}, --crops-per-photo {self.crops_per_photo}, --bootstrap "
                f"{self.bootstrap}, --examples {self.examples}: pass an image side of at least 8 px, "
                "at least one crop, and no negative counts"
            )
        if not self.distortions:
            raise ValueError("--distortions: name at least one distortion type")

    @classmethod
    def tiny(cls, out_dir: Path) -> Config:
        """A seconds-long run for tests."""
        tiny = BenchmarkConfig.tiny()
        return cls(
            out_dir=Path(out_dir),
            image_size=tiny.image_size,
            crops_per_photo=tiny.crops_per_photo,
            distortions=tiny.distortions,
            photos=tiny.photos,
            bootstrap=20,
            examples=3,
        )

    def benchmark_config(self) -> BenchmarkConfig:
        """The `BenchmarkConfig` this run builds."""
        extra = (
            {"split_fractions": (0.5, 0.25, 0.25)} if self.photos is not None and len(self.photos) < 6 else {}
        )
        return BenchmarkConfig(
            image_size=self.image_size,
            crops_per_photo=self.crops_per_photo,
            distortions=self.distortions,
            photos=self.photos,
            seed=self.seed,
            **extra,
        )


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


# ---------------------------------------------------------------------------------------------------------
# Computation
# ---------------------------------------------------------------------------------------------------------


def summarise(bench: Benchmark, cfg: Config) -> dict[str, Any]:
    """Counts, label statistics and examples of a built benchmark."""
    splits = ("train", "val", "test")
    photos_per_split = {s: sorted({r.meta["photo"] for r in bench.split(s)}) for s in splits}
    images_per_split = {s: len(bench.split(s)) for s in splits}
    per_cell: dict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in range(6)])
    for r in bench.records:
        per_cell[r.distortion][r.level].append(r.score)
    order = ["pristine", *bench.config.distortions]
    cell_counts = {d: [len(v) for v in per_cell[d]] for d in order if d in per_cell}
    cell_mean = {
        d: [round(float(np.mean(v)), 3) if v else None for v in per_cell[d]] for d in order if d in per_cell
    }
    word_counts = {
        s: {w: c for w, c in Counter(r.level_word for r in bench.split(s)).items()} for s in splits
    }
    edges = np.linspace(1.0, 5.0, 17)
    histogram: dict[str, list[float]] = {"edges": edges.tolist()}
    for s in splits:
        histogram[s] = np.histogram([r.score for r in bench.split(s)], bins=edges)[0].tolist()
    rng = np.random.default_rng(cfg.seed)
    test = bench.split("test")
    picks = rng.choice(len(test), size=min(cfg.examples, len(test)), replace=False)
    examples = [
        (test[i].id, test[i].level_word, round(test[i].score, 3), test[i].description) for i in sorted(picks)
    ]
    return dict(
        photos_per_split=photos_per_split,
        images_per_split=images_per_split,
        cell_counts=cell_counts,
        cell_mean_mos=cell_mean,
        word_counts=word_counts,
        mos_histogram=histogram,
        examples=examples,
    )


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


def main(cfg: Config) -> BuildResult:
    """Build or load the benchmark, summarise it, check it, and write the summary and contact sheet."""
    start = time.perf_counter()
    bench = build_benchmark(cfg.benchmark_config(), cfg.out_dir, overwrite=cfg.overwrite)
    seconds = time.perf_counter() - start
    stats = summarise(bench, cfg)
    metrics = full_reference_agreement(bench, cfg.check_measure, cfg.check_split, bootstrap=cfg.bootstrap)
    check = dict(metrics.to_dict(), measure=cfg.check_measure, split=cfg.check_split)
    sheet = contact_sheet(bench, bench.root / "contact_sheet.png")
    result = BuildResult(
        root=bench.root,
        fingerprint=bench.fingerprint,
        reused=bench.reused,
        seconds=round(seconds, 3),
        build_seconds=bench.info.get("build_seconds"),
        n_images=len(bench),
        word_edges=list(bench.word_edges),
        check=check,
        contact_sheet=sheet,
        summary_json=bench.root / "summary.json",
        label_measure=bench.config.label_measure,
        **stats,
    )
    outputs.write_json(result.summary_json, result.to_dict(), indent=2)
    return result


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def render(result: BuildResult, console=None) -> None:
    """Print a rich summary of a `BuildResult`."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    how = "reused" if result.reused else "built"
    console.print(
        f"[bold]Benchmark[/] {result.root} ({how} in {result.seconds:.1f} s; original build "
        f"{result.build_seconds} s), {result.n_images} images, fingerprint {result.fingerprint[:12]}"
    )

    splits = Table(title="Splits (by reference photo)")
    for col in ("split", "photos", "images", *LEVEL_WORDS):
        splits.add_column(col)
    for s, photos in result.photos_per_split.items():
        words = result.word_counts.get(s, {})
        splits.add_row(
            s,
            ", ".join(photos),
            str(result.images_per_split[s]),
            *(str(words.get(w, 0)) for w in LEVEL_WORDS),
        )
    console.print(splits)

    cells = Table(title="Images and mean label (MOS 1-5) per type and level")
    cells.add_column("distortion")
    for level in range(6):
        cells.add_column(f"L{level}", justify="right")
    for name, counts in result.cell_counts.items():
        means = result.cell_mean_mos[name]
        cells.add_row(name, *(f"{n} / {m:.2f}" if n else "" for n, m in zip(counts, means, strict=True)))
    console.print(cells)

    hist = Table(title="Label distribution (MOS bins)")
    hist.add_column("bin")
    for s in ("train", "val", "test"):
        hist.add_column(s, justify="right")
    edges = result.mos_histogram["edges"]
    for i in range(len(edges) - 1):
        hist.add_row(
            f"{edges[i]:.2f}-{edges[i + 1]:.2f}",
            *(str(result.mos_histogram[s][i]) for s in ("train", "val", "test")),
        )
    console.print(hist)
    console.print("Level-word edges: " + ", ".join(f"{e:.2f}" for e in result.word_edges))

    ex = Table(title="Example descriptions (test split)")
    for col in ("id", "word", "MOS", "description"):
        ex.add_column(col)
    for id_, word, mos, text in result.examples:
        ex.add_row(id_, word, f"{mos:.2f}", text)
    console.print(ex)

    c = result.check
    ci = c.get("ci", {}).get("srcc")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    console.print(
        f"[bold]Independent check[/]: {c['measure'].upper()} (labels use {result.label_measure.upper()}) "
        "vs labels on "
        f"{c['split']} (n={c['n']}): SRCC {c['srcc']:.3f}{ci_text}, KRCC {c['krcc']:.3f}, "
        f"PLCC {c['plcc_fitted']:.3f} after {c['fit']['kind'] if c['fit'] else 'no'} fit"
        + (f"; flags {c['flags']}" if c["flags"] else "")
    )
    console.print(f"Contact sheet: {result.contact_sheet}\nSummary: {result.summary_json}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
