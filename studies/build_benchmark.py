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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mechbiqa import cli, outputs
from mechbiqa.data import (
    DEFAULT_DISTORTIONS,
    BenchmarkConfig,
    build_benchmark,
    full_reference_agreement,
)
from mechbiqa.data.summary import BuildResult, summarise_benchmark
from mechbiqa.figures_data import contact_sheet
from mechbiqa.reports_studies import build_benchmark_report


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


def main(cfg: Config) -> BuildResult:
    """Build or load the benchmark, summarise it, check it, and write the summary and contact sheet."""
    start = time.perf_counter()
    bench = build_benchmark(cfg.benchmark_config(), cfg.out_dir, overwrite=cfg.overwrite, workers=None)
    seconds = time.perf_counter() - start
    stats = summarise_benchmark(bench, cfg.examples, cfg.seed)
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


def render(result: BuildResult, console=None) -> None:
    """Print a rich summary of a `BuildResult`."""
    from rich.console import Console

    console = console or Console()
    for part in build_benchmark_report(result):
        console.print(part)


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
