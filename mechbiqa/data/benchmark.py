"""The built-in BIQA benchmark: packaged photos, KADID-style distortions, calibrated labels, descriptions.

This is the embedded default data set of mechbiqa (DESIGN.md, "The built-in
benchmark and compact model"): it builds offline on any machine from installed
packages alone, and the compact mPLUG-Owl2 model trains on it.

How an image is made:

1. Reference photos come from `mechbiqa.data.photos`; each photo gives
   ``crops_per_photo`` square crops (a random window of 35-80% of its short
   side, the most detailed of three candidates, Lanczos-resized to
   ``image_size``), so a few photos still give varied content.
2. Each crop is saved pristine (level 0) and distorted by every type in
   ``distortions`` at levels 1-5 (`mechbiqa.data.distortions`, KADID's level
   parameters, applied at the final resolution).
3. Label (``score``, KADID's 1-5 scale, higher is better): the KADID-10k mean
   human rating of that (type, level) cell, plus a per-image part from a
   full-reference measure (``label_measure``, SSIM by default): the image's
   measure minus the cell mean, times the slope of a least-squares line from the
   measure to the cell ratings over all distorted images, clipped to
   +-``content_clip``. So each cell keeps KADID's mean (before clipping to 1-5)
   while images that a distortion hurts more than usual (by the measure) rate
   lower. Pristine crops get `PRISTINE_MOS`.
4. Level word: five equal-width bins over the train split's label range (Q-Align's rule).
5. Description: `mechbiqa.data.descriptions`, phrasing drawn per image.
6. Split: by reference photo (every crop and distortion of a photo in the same split).

Everything random is drawn from generators seeded by (seed, photo, crop,
distortion, level), so the same config gives byte-identical files.

On disk (``root``): ``config.json`` (config, fingerprint, photos with SHA-256,
level-word edges, label fit), ``manifest.jsonl`` (one `IQARecord` per line,
image paths relative to ``root``), ``images/<photo>-c<k>/<distortion>-<level>.png``.
`build_benchmark` reuses a directory whose fingerprint matches the config,
rebuilds one written by an older `BENCHMARK_VERSION`, and raises
`BenchmarkMismatchError` for a directory built with another config (pass
``overwrite=True`` to rebuild it, or use another directory). The build
is written to a temporary sibling directory and renamed into place, so a killed
build leaves no half-written benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image

from mechbiqa.data.descriptions import describe
from mechbiqa.data.distortions import DEFAULT_DISTORTIONS, DISTORTIONS, apply_distortion, get_distortion
from mechbiqa.data.photos import DEFAULT_SOURCES, PhotoInfo, find_photos, load_photo, photo_sha256
from mechbiqa.data.records import (
    SPLITS,
    IQARecord,
    level_word,
    level_word_edges,
    records_from_jsonl,
    records_to_jsonl,
)

__all__ = [
    "BENCHMARK_VERSION",
    "PRISTINE_MOS",
    "MOS_SCALE",
    "DATASET_NAME",
    "BenchmarkConfig",
    "Benchmark",
    "BenchmarkMismatchError",
    "build_benchmark",
    "load_benchmark",
    "fingerprint",
    "full_reference_agreement",
]

#: Bumped whenever a change would alter the generated files.
BENCHMARK_VERSION = 2
#: Label of pristine crops. KADID rates visually lossless cells at about 4.6
#: (Gaussian blur sigma 0.1: 4.61, darken 0.05: 4.60); its best image is 4.93.
PRISTINE_MOS = 4.70
#: The label scale (KADID-10k's), higher is better.
MOS_SCALE = (1.0, 5.0)
DATASET_NAME = "mechbiqa-benchmark"

_CONFIG_FILE = "config.json"
_MANIFEST_FILE = "manifest.jsonl"


class BenchmarkMismatchError(RuntimeError):
    """A benchmark directory holds a build from a different configuration."""


@dataclass(frozen=True, slots=True)
class BenchmarkConfig:
    """What to build. The defaults give 16,128 images of 64 px (the compact model's input) in about a minute.

    Attributes:
        image_size: Side of the square images in pixels.
        crops_per_photo: Distinct crops taken from each reference photo.
        distortions: Distortion types (keys of `mechbiqa.data.distortions.DISTORTIONS`).
        include_pristine: Also save each crop undistorted (level 0).
        photo_sources: Packages searched for photos (missing optional ones are skipped).
        photos: Use exactly these photo ids instead (e.g. in tests).
        split_fractions: Fractions of *photos* in train, val, test.
        crop_fraction: Range of the crop window side, as a fraction of the photo's short side.
        label_measure: Full-reference measure for the per-image part of the label
            (a key of `mechbiqa.metrics.FR_MEASURES`).
        content_weight: Weight of that per-image part (0: labels are the KADID cell means).
        content_clip: Largest per-image deviation from the cell mean, in MOS units.
        seed: Seed of every random choice.
    """

    image_size: int = 64
    crops_per_photo: int = 12
    distortions: tuple[str, ...] = DEFAULT_DISTORTIONS
    include_pristine: bool = True
    photo_sources: tuple[str, ...] = DEFAULT_SOURCES
    photos: tuple[str, ...] | None = None
    split_fractions: tuple[float, float, float] = (0.65, 0.1, 0.25)
    crop_fraction: tuple[float, float] = (0.35, 0.8)
    label_measure: str = "ssim"
    content_weight: float = 1.0
    content_clip: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the values (names of distortions, fractions, ranges)."""
        from mechbiqa.metrics import FR_MEASURES

        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 px, got {self.image_size}")
        if self.crops_per_photo < 1:
            raise ValueError(f"crops_per_photo must be at least 1, got {self.crops_per_photo}")
        if not self.distortions:
            raise ValueError("distortions is empty; name at least one type")
        for name in self.distortions:
            get_distortion(name)
        if len(set(self.distortions)) != len(self.distortions):
            raise ValueError(f"distortions has duplicates: {self.distortions}")
        if (
            len(self.split_fractions) != 3
            or min(self.split_fractions) < 0
            or abs(sum(self.split_fractions) - 1) > 1e-6
        ):
            raise ValueError(
                f"split_fractions must be three non-negative numbers summing to 1, got {self.split_fractions}"
            )
        lo, hi = self.crop_fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_fraction must satisfy 0 < low <= high <= 1, got {self.crop_fraction}")
        if self.label_measure not in FR_MEASURES:
            raise ValueError(f"label_measure {self.label_measure!r} is not one of {sorted(FR_MEASURES)}")
        if self.content_weight < 0 or self.content_clip < 0:
            raise ValueError("content_weight and content_clip must be non-negative")

    @classmethod
    def tiny(cls, **overrides: Any) -> BenchmarkConfig:
        """A seconds-long build for tests: 4 scikit-image photos, 32 px, 1 crop each, 6 types."""
        base = dict(
            image_size=32,
            crops_per_photo=1,
            photos=("astronaut", "chelsea", "coffee", "rocket"),
            distortions=("gaussian_blur", "white_noise", "jpeg", "saturation_lab", "pixelate", "darken"),
            split_fractions=(0.5, 0.25, 0.25),
        )
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkConfig:
        """Inverse of `to_dict`; unknown keys are ignored with a warning."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"BenchmarkConfig.from_dict: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)


@dataclass(frozen=True)
class Benchmark:
    """A built benchmark: its records and where they live.

    Attributes:
        root: The benchmark directory.
        config: The configuration it was built from.
        fingerprint: SHA-256 of (version, config, photo hashes).
        records: Every image, pristine ones included, as `IQARecord`s with absolute paths.
        word_edges: The four inner edges of the level-word bins (MOS units).
        photos: Per photo: id, package, licence, sha256, split.
        info: The rest of ``config.json`` (label fit, build time, library versions).
        reused: True if `build_benchmark` found it already built.
    """

    root: Path
    config: BenchmarkConfig
    fingerprint: str
    records: tuple[IQARecord, ...]
    word_edges: tuple[float, ...]
    photos: tuple[dict[str, Any], ...]
    info: dict[str, Any]
    reused: bool = False

    def __len__(self) -> int:
        """Number of images."""
        return len(self.records)

    def __iter__(self) -> Iterator[IQARecord]:
        """Iterate over the records."""
        return iter(self.records)

    def split(self, name: str) -> list[IQARecord]:
        """The records of one split (``"train"``, ``"val"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [r for r in self.records if r.split == name]

    @functools.cached_property
    def by_id(self) -> dict[str, IQARecord]:
        """Records by id."""
        return {r.id: r for r in self.records}

    def reference_of(self, record: IQARecord) -> IQARecord:
        """The pristine record of the crop ``record`` was made from."""
        key = f"{record.ref_id}-pristine-0"
        if key not in self.by_id:
            raise KeyError(
                f"no pristine record {key!r}; was the benchmark built with include_pristine=False?"
            )
        return self.by_id[key]

    @staticmethod
    def load_image(record: IQARecord) -> np.ndarray:
        """The image of a record as uint8 RGB ``[H, W, 3]`` (`mechbiqa.model.processor.load_image`)."""
        from mechbiqa.model.processor import load_image

        return np.asarray(load_image(record.image_path))


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------


def _photos(cfg: BenchmarkConfig) -> list[PhotoInfo]:
    photos = find_photos(cfg.photo_sources, cfg.photos)
    if len(photos) < 3:
        raise ValueError(
            f"the benchmark needs at least 3 reference photos (one per split), found {[p.id for p in photos]}"
        )
    return photos


def fingerprint(cfg: BenchmarkConfig, photos: Sequence[PhotoInfo] | None = None) -> str:
    """SHA-256 identifying what `build_benchmark` would write for ``cfg`` on this machine."""
    photos = _photos(cfg) if photos is None else photos
    payload = {
        "version": BENCHMARK_VERSION,
        "config": cfg.to_dict(),
        "photos": [[p.id, photo_sha256(p)] for p in photos],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _assign_splits(photo_ids: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Photo id -> split: a seeded shuffle cut by the fractions; val and test non-empty when asked for."""
    n = len(photo_ids)
    order = np.random.default_rng([seed, 0]).permutation(n)
    n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
    n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} photos cannot fill train/val/test with fractions {fractions}; add photos")
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return {photo_ids[i]: s for i, s in zip(order, splits, strict=True)}


def _detail(image: np.ndarray) -> float:
    g = image.astype(np.float64).mean(axis=-1)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def _crop(
    photo: np.ndarray, size: int, fraction: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, list[int]]:
    """The most detailed of three random square windows, resized to ``size``.

    Returns:
        The crop and its window as [top, left, side] in the photo.
    """
    h, w = photo.shape[:2]
    best = None
    for _ in range(3):
        side = max(size, int(round(rng.uniform(*fraction) * min(h, w))))
        side = min(side, h, w)
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        window = Image.fromarray(photo[top : top + side, left : left + side])
        crop = np.asarray(window.resize((size, size), Image.Resampling.LANCZOS))
        score = _detail(crop)
        if best is None or score > best[0]:
            best = (score, crop, [top, left, side])
    return best[1], best[2]


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG", compress_level=1)  # fast; the images are small


def _photo_key(photo_id: str) -> int:
    """A stable integer per photo for seeding: its crops stay the same when other photos come or go."""
    return zlib.crc32(photo_id.encode())


def _render(cfg: BenchmarkConfig, photos: list[PhotoInfo], split_of: dict[str, str], out: Path,
            workers: int = 1) -> list[dict]:
    """Write every image under ``out/images``; one row (everything but the label) per image.

    Photos render independently (every draw is seeded by photo, crop, distortion and level), so
    ``workers`` processes render one photo each at a time and the rows come back in photo order:
    the files and rows are the same for any number of workers.
    """
    jobs = [(cfg, photo, split_of[photo.id], out) for photo in photos]
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        return [row for job in jobs for row in _render_photo(*job)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [row for rows in pool.map(_render_photo, *zip(*jobs, strict=True)) for row in rows]


def _render_photo(cfg: BenchmarkConfig, photo: PhotoInfo, split: str, out: Path) -> list[dict]:
    """One photo's crops, each pristine and under every distortion and level."""
    from mechbiqa.metrics import FR_MEASURES

    measure = FR_MEASURES[cfg.label_measure][0]
    cells: list[tuple[str, int]] = [("pristine", 0)] if cfg.include_pristine else []
    cells += [(name, level) for name in cfg.distortions for level in range(1, 6)]
    rows: list[dict[str, Any]] = []
    pixels, pk = load_photo(photo), _photo_key(photo.id)
    for k in range(cfg.crops_per_photo):
        crop_rng = np.random.default_rng([cfg.seed, 1, pk, k])
        ref, box = _crop(pixels, cfg.image_size, cfg.crop_fraction, crop_rng)
        ref_id = f"{photo.id}-c{k}"
        (out / "images" / ref_id).mkdir(parents=True)
        for name, level in cells:
            spec = DISTORTIONS.get(name)
            kid = spec.kadid_id if spec else 0
            if level == 0:
                image = ref
            else:
                rng = np.random.default_rng([cfg.seed, 2, pk, k, kid, level])
                image = apply_distortion(ref, name, level, rng)
            rel = Path("images") / ref_id / f"{name}-{level}.png"
            _save_png(image, out / rel)
            text_rng = np.random.default_rng([cfg.seed, 3, pk, k, kid, level])
            rows.append(
                {
                    "id": f"{ref_id}-{name}-{level}",
                    "path": rel,
                    "split": split,
                    "ref_id": ref_id,
                    "distortion": name,
                    "level": level,
                    "params": {spec.param: spec.levels[level - 1]} if level else {},
                    "description": describe(None if level == 0 else name, level, text_rng),
                    "q": float(measure(ref, image)) if level else None,
                    "cell_mos": PRISTINE_MOS if level == 0 else spec.kadid_mos[level - 1],
                    "meta": {"photo": photo.id, "crop": k, "crop_box": box},
                }
            )
    return rows


def _label(rows: list[dict], cfg: BenchmarkConfig) -> float:
    """Set ``row["mos"]``: the KADID cell mean plus the image's measure relative to its cell, in MOS units.

    Returns:
        The slope (MOS per unit of the measure) of the least-squares line from
        the measure to the cell ratings over all distorted images.
    """
    distorted = [r for r in rows if r["level"] > 0]
    q = np.array([r["q"] for r in distorted])
    m = np.array([r["cell_mos"] for r in distorted])
    slope = float(np.polyfit(q, m, 1)[0]) if np.ptp(q) > 0 else 0.0
    cell_q: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in distorted:
        cell_q[(r["distortion"], r["level"])].append(r["q"])
    cell_mean = {key: float(np.mean(v)) for key, v in cell_q.items()}
    for r in rows:
        if r["level"] == 0:
            r["mos"] = PRISTINE_MOS
            continue
        dev = cfg.content_weight * slope * (r["q"] - cell_mean[(r["distortion"], r["level"])])
        dev = float(np.clip(dev, -cfg.content_clip, cfg.content_clip))
        r["mos"] = round(float(np.clip(r["cell_mos"] + dev, *MOS_SCALE)), 6)
    return slope


def _build_into(
    cfg: BenchmarkConfig, photos: list[PhotoInfo], fp: str, out: Path, workers: int = 1
) -> dict[str, Any]:
    start = time.perf_counter()
    split_of = _assign_splits([p.id for p in photos], cfg.split_fractions, cfg.seed)
    rows = _render(cfg, photos, split_of, out, workers)
    slope = _label(rows, cfg)
    train_mos = [r["mos"] for r in rows if r["split"] == "train"]
    edges = level_word_edges(min(train_mos), max(train_mos))
    records = []
    for r in rows:
        meta = dict(r["meta"], kadid_cell_mos=r["cell_mos"])
        if r["q"] is not None:
            meta[cfg.label_measure] = r["q"]
        records.append(
            IQARecord(
                id=r["id"],
                image_path=r["path"],
                score=r["mos"],
                scale=MOS_SCALE,
                higher_is_better=True,
                dataset=DATASET_NAME,
                split=r["split"],
                ref_id=r["ref_id"],
                distortion=r["distortion"],
                level=r["level"],
                level_word=level_word(r["mos"], edges),
                description=r["description"],
                params=r["params"],
                meta=meta,
            )
        )
    records_to_jsonl(records, out / _MANIFEST_FILE)

    import PIL
    import scipy

    from mechbiqa.metrics import FR_MEASURES

    info = {
        "version": BENCHMARK_VERSION,
        "fingerprint": fp,
        "config": cfg.to_dict(),
        "photos": [
            {
                "id": p.id,
                "package": p.package,
                "file": p.relpath,
                "licence": p.licence,
                "sha256": photo_sha256(p),
                "split": split_of[p.id],
            }
            for p in photos
        ],
        "word_edges": list(edges),
        "label_fit": {
            "measure": cfg.label_measure,
            "measure_higher_is_better": FR_MEASURES[cfg.label_measure][1],
            "slope_mos_per_unit": slope,
            "pristine_mos": PRISTINE_MOS,
        },
        "n_images": len(records),
        "build_seconds": round(time.perf_counter() - start, 3),
        "library_versions": {"numpy": np.__version__, "pillow": PIL.__version__, "scipy": scipy.__version__},
    }
    (out / _CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return info


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return (
        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
        or "same config, different photos or version"
    )


def build_benchmark(
    cfg: BenchmarkConfig, root: Path | str, *, overwrite: bool = False, workers: int | None = 1
) -> Benchmark:
    """Build the benchmark into ``root``, or load it if ``root`` already holds this build.

    Args:
        cfg: What to build.
        root: The benchmark directory (created; its parent must be writable).
        overwrite: Replace a benchmark built there from a different config.
        workers: Processes that render photos side by side (the result is the same for any number);
            None: one per CPU this process may run on.

    Returns:
        The `Benchmark`; ``reused`` says whether it was already there.

    Raises:
        BenchmarkMismatchError: ``root`` holds a build from another config (the
            message lists the differences) and ``overwrite`` is False.
        FileExistsError: ``root`` is a non-empty directory that is not a benchmark.
    """
    root = Path(root)
    if workers is None:  # sched_getaffinity is Linux-only
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    photos = _photos(cfg)
    fp = fingerprint(cfg, photos)
    root.parent.mkdir(parents=True, exist_ok=True)
    # One builder per directory across processes; a second one waits, then finds the build and reuses it.
    with FileLock(root.parent / f".{root.name}.lock"):
        return _build_or_reuse(cfg, root, photos, fp, overwrite, workers)


def _build_or_reuse(
    cfg: BenchmarkConfig, root: Path, photos: list[PhotoInfo], fp: str, overwrite: bool, workers: int = 1
) -> Benchmark:
    config_path = root / _CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        if old.get("fingerprint") == fp:
            return load_benchmark(root, _reused=True)
        stale = old.get("version") != BENCHMARK_VERSION  # built by older code: ours to replace
        if not (overwrite or stale):
            raise BenchmarkMismatchError(
                f"{root} holds a benchmark built from another configuration "
                f"({_config_diff(old.get('config', {}), cfg.to_dict())}). "
                "Build into a different directory, pass overwrite=True, or delete the directory to replace "
                "it (it is rebuilt from the packaged photos)."
            )
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists, is not empty and holds no {_CONFIG_FILE}; choose an empty or new directory"
        )

    tmp = root.parent / f".{root.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _build_into(cfg, photos, fp, tmp, workers)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_benchmark(root)


def load_benchmark(root: Path | str, *, check_files: bool = True, _reused: bool = False) -> Benchmark:
    """Load a benchmark written by `build_benchmark`.

    Args:
        root: The benchmark directory.
        check_files: Check that every image file exists.

    Raises:
        FileNotFoundError: If ``config.json``, ``manifest.jsonl`` or images are missing (named).
    """
    root = Path(root)
    config_path, manifest_path = root / _CONFIG_FILE, root / _MANIFEST_FILE
    for path in (config_path, manifest_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {root} is not a built benchmark; "
                f"build it with build_benchmark(cfg, {str(root)!r})"
            )
    info = json.loads(config_path.read_text(encoding="utf-8"))
    if info.get("version") != BENCHMARK_VERSION:
        raise BenchmarkMismatchError(
            f"{root} was built by benchmark version {info.get('version')}, "
            f"this is {BENCHMARK_VERSION}; rebuild it"
        )
    records = tuple(records_from_jsonl(manifest_path, root=root.resolve()))
    if check_files:
        missing = [r.image_path for r in records if not r.image_path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} benchmark image(s) missing under {root}, e.g. {missing[0]}; rebuild"
            )
    rest = {k: v for k, v in info.items() if k not in ("config", "fingerprint", "word_edges", "photos")}
    return Benchmark(
        root=root,
        config=BenchmarkConfig.from_dict(info["config"]),
        fingerprint=info["fingerprint"],
        records=records,
        word_edges=tuple(info["word_edges"]),
        photos=tuple(info["photos"]),
        info=rest,
        reused=_reused,
    )


def full_reference_agreement(
    bench: Benchmark, measure: str = "gmsd", split: str | None = "test", *, bootstrap: int = 0
):
    """How well a full-reference measure agrees with the labels: `mechbiqa.metrics.iqa_metrics`.

    The independent check of the labels: use a measure other than the
    config's ``label_measure``. Lower-is-better measures are negated, so
    agreement shows as positive correlation.

    Args:
        bench: A built benchmark (needs its pristine images).
        measure: A key of `mechbiqa.metrics.FR_MEASURES`.
        split: Which split, or None for all images.
        bootstrap: Bootstrap resamples for confidence intervals.

    Returns:
        `mechbiqa.metrics.IQAMetrics` of (signed measure, label) over the split's images.
    """
    from mechbiqa.metrics import FR_MEASURES, iqa_metrics

    fn, higher_better = FR_MEASURES[measure]
    records = bench.records if split is None else bench.split(split)
    pristine = {r.ref_id: r for r in bench.records if r.level == 0}
    if not pristine:
        raise ValueError("full_reference_agreement needs pristine images; build with include_pristine=True")
    refs: dict[str, np.ndarray] = {}
    pred, mos = [], []
    for r in records:
        if r.ref_id not in refs:
            refs[r.ref_id] = bench.load_image(pristine[r.ref_id])
        value = fn(refs[r.ref_id], bench.load_image(r))
        pred.append(value if higher_better else -value)
        mos.append(r.score)
    return iqa_metrics(pred, mos, bootstrap=bootstrap)
