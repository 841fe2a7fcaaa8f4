"""The built-in benchmark: label order, KADID agreement, splits, determinism, reuse, descriptions, records."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
import pytest
from scipy import stats

from mechbiqa.data.benchmark import (
    MOS_SCALE,
    PRISTINE_MOS,
    BenchmarkConfig,
    BenchmarkMismatchError,
    build_benchmark,
    full_reference_agreement,
    load_benchmark,
)
from mechbiqa.data.descriptions import all_descriptions, contains_level_word, describe, severity
from mechbiqa.data.distortions import DEFAULT_DISTORTIONS, DISTORTIONS
from mechbiqa.data.records import LEVEL_WORDS, IQARecord, level_word, level_word_edges

# Every default distortion on six photos that ship with the dependencies, at 48 px: ~600 images in seconds.
MEDIUM = BenchmarkConfig(
    image_size=48,
    crops_per_photo=1,
    photos=("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "grace_hopper"),
    split_fractions=(0.5, 0.17, 0.33),
)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    return build_benchmark(MEDIUM, tmp_path_factory.mktemp("medium") / "bench")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "bench"
    build_benchmark(BenchmarkConfig.tiny(), root)
    return root


def _digest(root) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "config.json"
    }


def test_counts_and_record_fields(medium):
    n_cells = 1 + 5 * len(DEFAULT_DISTORTIONS)
    assert len(medium) == 6 * n_cells
    for r in medium:
        assert isinstance(r, IQARecord) and r.image_path.is_file() and r.image_path.is_absolute()
        assert r.scale == MOS_SCALE and r.higher_is_better and MOS_SCALE[0] <= r.score <= MOS_SCALE[1]
        assert r.mos01 == pytest.approx((r.score - 1) / 4)
        assert r.level_word in LEVEL_WORDS and r.description and r.split in ("train", "val", "test")
        assert (r.level == 0) == (r.distortion == "pristine")
        if r.level:
            spec = DISTORTIONS[r.distortion]
            assert r.params == {spec.param: spec.levels[r.level - 1]}
    image = medium.load_image(medium.records[0])
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8


def test_label_falls_with_level_per_type(medium):
    cells = defaultdict(list)
    for r in medium:
        cells[(r.distortion, r.level)].append(r.score)
    for name in DEFAULT_DISTORTIONS:
        means = [np.mean(cells[(name, level)]) for level in range(1, 6)]
        assert all(a > b for a, b in zip(means, means[1:], strict=False)), (
            f"{name}: mean label by level {np.round(means, 2)}"
        )
        assert np.mean(cells[("pristine", 0)]) == pytest.approx(PRISTINE_MOS) and PRISTINE_MOS > means[0]


def test_labels_correlate_with_kadid_table(medium):
    distorted = [r for r in medium if r.level > 0]
    table = [DISTORTIONS[r.distortion].kadid_mos[r.level - 1] for r in distorted]
    labels = [r.score for r in distorted]
    assert stats.spearmanr(labels, table)[0] > 0.9
    # ... and the per-image part is real: labels vary within a cell.
    assert np.std(np.array(labels) - np.array(table)) > 0.05


def test_no_photo_in_two_splits(medium):
    split_of = defaultdict(set)
    for r in medium:
        split_of[r.meta["photo"]].add(r.split)
        split_of[r.ref_id].add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {r.split for r in medium} == {"train", "val", "test"}
    assert {p["id"]: p["split"] for p in medium.photos} == {
        k: next(iter(v)) for k, v in split_of.items() if "-c" not in k
    }


def test_independent_full_reference_check(medium):
    # GMSD plays no part in the labels (they use SSIM); it must still rank the test images like the labels.
    m = full_reference_agreement(medium, "gmsd", "test")
    assert m.srcc >= 0.6, m
    assert medium.config.label_measure != "gmsd"


def test_level_words_are_equal_width_bins_of_the_train_range(medium):
    train = [r.score for r in medium.split("train")]
    edges = level_word_edges(min(train), max(train))
    assert medium.word_edges == pytest.approx(edges)
    assert np.diff((min(train), *edges, max(train))) == pytest.approx([(max(train) - min(train)) / 5] * 5)
    for r in medium:
        assert r.level_word == level_word(r.score, edges)
    assert {r.level_word for r in medium.split("train")} == set(LEVEL_WORDS)


def test_same_seed_gives_identical_files(tiny_dir, tmp_path):
    again = build_benchmark(BenchmarkConfig.tiny(), tmp_path / "again")
    assert _digest(tiny_dir) == _digest(again.root)
    other = build_benchmark(BenchmarkConfig.tiny(seed=1), tmp_path / "other")
    assert _digest(tiny_dir) != _digest(other.root)


def test_photos_rendered_in_two_processes_give_the_same_files(tiny_dir, tmp_path):
    parallel = build_benchmark(BenchmarkConfig.tiny(), tmp_path / "parallel", workers=2)
    assert _digest(tiny_dir) == _digest(parallel.root)


def test_reuse_mismatch_and_overwrite(tiny_dir):
    first = load_benchmark(tiny_dir)
    again = build_benchmark(BenchmarkConfig.tiny(), tiny_dir)
    assert again.reused and again.fingerprint == first.fingerprint and again.records == first.records
    with pytest.raises(BenchmarkMismatchError, match="image_size: 32 -> 40") as refused:
        build_benchmark(BenchmarkConfig.tiny(image_size=40), tiny_dir)
    assert "delete the directory" in str(refused.value)  # the fix is named, and the old build is kept
    assert load_benchmark(tiny_dir).records == first.records


def test_overwrite_rebuilds_and_refuses_foreign_dirs(tmp_path):
    root = tmp_path / "b"
    build_benchmark(BenchmarkConfig.tiny(), root)
    rebuilt = build_benchmark(BenchmarkConfig.tiny(image_size=40), root, overwrite=True)
    assert not rebuilt.reused and rebuilt.load_image(rebuilt.records[0]).shape == (40, 40, 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_benchmark(BenchmarkConfig.tiny(), foreign)
    with pytest.raises(FileNotFoundError, match="not a built benchmark"):
        load_benchmark(foreign)


def test_manifest_and_config_files(tiny_dir):
    info = json.loads((tiny_dir / "config.json").read_text())
    assert info["config"] == BenchmarkConfig.tiny().to_dict()
    assert {p["id"] for p in info["photos"]} == set(BenchmarkConfig.tiny().photos)
    assert all(len(p["sha256"]) == 64 for p in info["photos"])
    lines = (tiny_dir / "manifest.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert not first["image_path"].startswith("/") and first["mos01"] is not None
    assert len(lines) == len(load_benchmark(tiny_dir))


def test_config_validation():
    with pytest.raises(KeyError, match="unknown distortion"):
        BenchmarkConfig(distortions=("gaussian_blur", "nope"))
    with pytest.raises(ValueError, match="split_fractions"):
        BenchmarkConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(KeyError, match="unknown photo"):
        build_benchmark(BenchmarkConfig.tiny(photos=("astronaut", "lena", "coffee")), "unused")


# ---------------------------------------------------------------------------------------------------------
# Descriptions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, *DISTORTIONS])
def test_no_description_contains_a_level_word(name):
    levels = [0] if name is None else range(1, 6)
    for level in levels:
        for text in all_descriptions(name, level):
            assert contains_level_word(text) is None, text
            assert 6 <= len(text.split()) <= 25, text


def test_descriptions_vary_and_are_seeded():
    texts = {describe("jpeg", 4, np.random.default_rng(i)) for i in range(50)}
    assert len(texts) >= 5
    assert describe("jpeg", 4, np.random.default_rng(3)) == describe("jpeg", 4, np.random.default_rng(3))
    # Severity words follow KADID's rating of the cell, and effects differ between levels.
    assert severity("gaussian_blur", 1) < severity("gaussian_blur", 5)
    assert set(all_descriptions("jpeg", 4)).isdisjoint(all_descriptions("jpeg", 5))


def test_benchmark_descriptions_match_their_cells(medium):
    for r in medium.records[:200]:
        assert r.description in all_descriptions(r.distortion, r.level)


def test_a_build_by_older_code_is_rebuilt(tmp_path):
    root = tmp_path / "b"
    build_benchmark(BenchmarkConfig.tiny(), root)
    info = json.loads((root / "config.json").read_text())
    info["version"], info["fingerprint"] = 0, "old"
    (root / "config.json").write_text(json.dumps(info))
    with pytest.raises(BenchmarkMismatchError, match="version 0"):
        load_benchmark(root)
    again = build_benchmark(BenchmarkConfig.tiny(), root)
    assert not again.reused and again.info["version"] > 0
