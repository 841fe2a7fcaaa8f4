"""Evaluation on one scale: pooled rows on the 0-1 rating, Q-Align JSON test files, clear refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from mechbiqa.analysis.evaluation import ALL, evaluate_by_dataset, normalised_target
from mechbiqa.data.records import IQARecord
from mechbiqa.errors import UserError
from studies import evaluate_quality

# Two data sets on different scales: KonIQ (0-100) and KADID (1-5); by hand, (score - low) / (high - low).
KONIQ = [22.0, 38.0, 55.0, 61.0, 80.0]
KADID = [1.2, 2.1, 2.9, 3.8, 4.6]
HAND = [s / 100 for s in KONIQ] + [(s - 1) / 4 for s in KADID]


def test_pooled_row_is_computed_on_the_normalised_scale():
    rng = np.random.default_rng(0)
    pred = np.array(HAND) + rng.normal(scale=0.08, size=len(HAND))
    groups = ["koniq10k"] * 5 + ["kadid10k"] * 5
    records = [
        IQARecord(id=str(i), image_path=Path(f"{i}.png"), score=s, scale=sc)
        for i, (s, sc) in enumerate([(s, (0.0, 100.0)) for s in KONIQ] + [(s, (1.0, 5.0)) for s in KADID])
    ]
    targets = [normalised_target(r) for r in records]
    np.testing.assert_allclose(targets, HAND)
    pooled = evaluate_by_dataset(pred, targets, groups, fit="linear").row(ALL).metrics
    assert pooled.srcc == pytest.approx(stats.spearmanr(pred, HAND)[0])
    assert pooled.plcc_raw == pytest.approx(stats.pearsonr(pred, HAND)[0])
    assert pooled.krcc == pytest.approx(stats.kendalltau(pred, HAND)[0])
    assert pooled.rmse_raw == pytest.approx(np.sqrt(np.mean((pred - np.array(HAND)) ** 2)))
    # pooled raw, KonIQ's 0-100 would outrank every KADID image: a different (wrong) number
    raw = KONIQ + KADID
    assert abs(stats.spearmanr(pred, raw)[0] - pooled.srcc) > 0.1
    with pytest.raises(ValueError, match=r"not on the 0-1 scale: koniq10k \(22\.\.80\)"):
        evaluate_by_dataset(pred, raw, groups)
    # a DMOS data set is flipped: CSIQ 0.2 (lower is better) is 0.8
    csiq = IQARecord(id="c", image_path=Path("c.png"), score=0.2, scale=(0.0, 1.0), higher_is_better=False)
    assert normalised_target(csiq) == pytest.approx(0.8)


def _images(root: Path, names: list[str]) -> None:
    rng = np.random.default_rng(1)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 255, (24 + 2 * i, 28, 3), dtype=np.uint8)
        Image.fromarray(array).save(root / name)


def test_study_reads_a_mixed_qalign_json_and_pools_on_the_normalised_scale(tmp_path):
    names = [f"koniq/{i}.jpg" for i in range(5)] + [f"kadid10k/I01_0{i}_01.png" for i in range(5)]
    _images(tmp_path / "data", names)
    entries = [{"image": n, "gt_score": s} for n, s in zip(names, KONIQ + KADID, strict=True)]
    path = tmp_path / "data" / "test_jsons" / "mixed.json"
    path.parent.mkdir()
    path.write_text(json.dumps(entries))
    cfg = evaluate_quality.Config.tiny(
        tmp_path, datasets=(f"{path}={tmp_path / 'data'}",), split="test", limit=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_quality.main(cfg)
    assert [r.name for r in result.evaluation.rows] == ["koniq10k", "kadid10k", ALL]
    scores = np.concatenate([result.scores["koniq10k"], result.scores["kadid10k"]])
    pooled = result.evaluation.row(ALL).metrics
    assert pooled.n == 10 and pooled.srcc == pytest.approx(stats.spearmanr(scores, HAND)[0])
    assert pooled.plcc_raw == pytest.approx(stats.pearsonr(scores, HAND)[0])
    written = json.loads(result.files["json"].read_text())
    np.testing.assert_allclose([x["target"] for x in written["images"]], HAND)


def test_study_refusals_are_one_line(tmp_path):
    _images(tmp_path / "images", ["a.png", "b.png", "c.png"])
    base = evaluate_quality.Config.tiny(tmp_path)
    # the default --split test on a data set with no official split
    with pytest.raises(UserError, match=r"no official split.*--split all"):
        evaluate_quality.main(evaluate_quality.Config.tiny(tmp_path, split="test"))
    # a mistyped data set name: the known names, no KeyError traceback
    with pytest.raises(UserError, match=r"unknown dataset 'konqi10k'.*'koniq10k'") as info:
        evaluate_quality.main(evaluate_quality.Config(**{**base.__dict__, "datasets": ("konqi10k=/x",)}))
    assert "\n" not in str(info.value)
    # a Q-Align source with no known scale names the --scale fix; given, it loads
    (tmp_path / "cgi").mkdir()
    _images(tmp_path, ["cgi/a.png", "cgi/b.png", "cgi/c.png"])
    path = tmp_path / "cgi.json"
    path.write_text(json.dumps([{"image": f"cgi/{n}.png", "gt_score": s} for n, s in zip("abc", (1, 2, 4))]))
    with pytest.raises(UserError, match=r"--scale cgi=LOW,HIGH"):
        evaluate_quality.main(evaluate_quality.Config.tiny(tmp_path, datasets=(str(path),)))
    with pytest.raises(UserError, match=r"--scale: .*NAME=LOW,HIGH"):
        evaluate_quality.main(evaluate_quality.Config.tiny(tmp_path, datasets=(str(path),), scales=("cgi",)))
    result = evaluate_quality.main(
        evaluate_quality.Config.tiny(tmp_path, datasets=(str(path),), scales=("cgi=0,5",))
    )
    assert result.evaluation.rows[0].name == "cgi" and result.evaluation.rows[0].n == 3
    assert evaluate_quality.parse_args(["--scale", "cgi=0,5", "--split", "all"]).scales == ("cgi=0,5",)


def test_qalign_json_refusals_name_the_fix(tmp_path):
    """Images elsewhere than next to the file; a file with a non-object entry (a Q-Pathway replica)."""
    from mechbiqa.analysis.quality_rating import select_samples

    _images(tmp_path / "images", ["koniq/1.jpg"])
    path = tmp_path / "test_koniq.json"
    path.write_text(json.dumps([{"image": "koniq/1.jpg", "gt_score": 50.0}]))
    with pytest.raises(UserError, match=rf"--dataset {path}=IMAGE_ROOT") as info:
        select_samples(str(path), "test", None)
    assert "\n" not in str(info.value)
    assert len(select_samples(f"{path}={tmp_path / 'images'}", "test", None)) == 1
    path.write_text(json.dumps([{"image": "koniq/1.jpg", "gt_score": 50.0}, "stray text"]))
    with pytest.raises(UserError, match=r"1 entries are not objects, e.g. entry 1 \(str\)"):
        select_samples(f"{path}={tmp_path / 'images'}", "test", None)
