"""studies/train_pair.py end to end on a tiny benchmark: both checkpoints, results.json, reuse."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import warnings

import pytest
from scipy import stats

from mechbiqa import train as T
from mechbiqa.model import load_pretrained
from mechbiqa.pipeline import read_info
from tests.conftest import REPO

SCRIPT = REPO / "studies" / "train_pair.py"


def _study():
    spec = importlib.util.spec_from_file_location("train_pair", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_pair"] = module
    spec.loader.exec_module(module)
    return module


def test_train_pair_tiny_end_to_end(tmp_path):
    study = _study()
    cfg = study.Config.tiny(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        result = study.main(cfg)
    out = cfg.out_dir
    saved = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    for mode in ("one_stage", "two_stage"):
        metrics = saved[mode]
        assert metrics["n"] == cfg.test_samples
        assert {"srcc", "plcc", "level_acc", "family_rate"} <= set(metrics)
        assert len(metrics["scores"]) == len(metrics["labels"]) == len(metrics["ids"]) == cfg.test_samples
    # the comparison is SRCC(two) - SRCC(one) over the same stored images, its interval around it
    one, two = saved["one_stage"], saved["two_stage"]
    assert one["ids"] == two["ids"] and one["labels"] == two["labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant tiny-model score has no SRCC (NaN)
        expected = stats.spearmanr(two["scores"], two["labels"])[0] - stats.spearmanr(one["scores"], one["labels"])[0]
    comparison = saved["comparison"]  # strict JSON: a NaN is written as null
    assert comparison["n"] == cfg.test_samples
    diff = comparison["srcc_two_minus_one"]
    assert (diff is None) == math.isnan(expected)
    assert diff is None or diff == pytest.approx(expected)
    low, high = comparison["ci95"]
    assert (low is None and high is None) or low <= diff <= high
    assert read_info(out / "one-stage").task == "one-stage" and read_info(out / "one-stage").step == 6
    assert read_info(out / "two-stage" / "stage1").step == 4 and read_info(out / "two-stage" / "stage2").step == 2
    for path in (out / "one-stage", out / "two-stage" / "stage1", out / "two-stage" / "stage2"):
        assert load_pretrained(path).cfg.n_image_tokens == 65
    assert set(result.train_seconds) >= {"one-stage", "stage1", "stage2"}
    # A second call reuses the finished checkpoints (no training) and gives the same numbers.
    again = study.main(cfg)
    assert again.one_stage["srcc"] == pytest.approx(result.one_stage["srcc"], nan_ok=True)
    assert read_info(out / "one-stage").data["elapsed_seconds"] == pytest.approx(again.train_seconds["one-stage"])
    # train_or_reuse reads results.json back (nothing trained or rated; null metrics as NaN) ...
    written = (out / "results.json").stat().st_mtime_ns
    reused = T.train_or_reuse(cfg)
    assert (out / "results.json").stat().st_mtime_ns == written
    assert reused.to_dict().keys() == saved.keys() and reused.paths == saved["paths"]
    for mode in ("one-stage", "two-stage"):
        for name, value in saved[mode.replace("-", "_")].items():
            got = reused.entry(mode)[name]
            if value is None:  # strict JSON wrote a NaN metric as null
                assert name in T.pair.METRIC_NAMES and math.isnan(got), name
            else:
                assert got == value, name


def test_side_by_side_trains_the_pair_as_one_after_the_other_does(tmp_path):
    """Both checkpoints in their own processes (one thread each) end as the sequential run (two threads) ends."""
    from dataclasses import replace

    base = T.PairConfig.tiny(tmp_path)
    sequential = replace(base, out_dir=tmp_path / "sequential", threads=2, parallel=False)
    parallel = replace(base, out_dir=tmp_path / "parallel", threads=2)
    assert not T.pair.side_by_side(sequential) and T.pair.side_by_side(parallel)
    assert not T.pair.side_by_side(replace(parallel, modes=("one-stage",)))
    events = []
    one_after = T.train_pair(sequential)
    side = T.train_pair(parallel, progress=events.append)
    for sub in ("one-stage", "two-stage/stage1", "two-stage/stage2"):
        a, b = T.State.load(sequential.out_dir / sub), T.State.load(parallel.out_dir / sub)
        assert b.finished and b.step == a.step
        assert [h["loss"] for h in b.history] == pytest.approx([h["loss"] for h in a.history], rel=1e-4)
    for mode in ("one-stage", "two-stage"):
        a, b = one_after.entry(mode), side.entry(mode)
        assert b["ids"] == a["ids"] and b["scores"] == pytest.approx(a["scores"], rel=1e-3, abs=1e-4)
    # every step of every run reached the caller's callback, in order within each run
    for label, steps in (("one-stage", 6), ("stage1", 4), ("stage2", 2)):
        assert [e.step for e in events if e.label == label and e.kind == "step"] == list(range(1, steps + 1))


def test_train_pair_help_and_flags():
    study = _study()
    cfg = study.parse_args(["--total-steps", "9", "--modes", "two-stage", "--lora-rank", "8"])
    assert cfg.total_steps == 9 and cfg.modes == ("two-stage",) and cfg.lora_rank == 8
    assert cfg.train_config("two-stage", 2, 3).init_from is None
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--total-steps" in done.stdout and "two-stage" in done.stdout


def _annotation_files(tmp_path):
    """A Q-Pathway-like file (reasoning + verdict, two bad entries) and a Q-Align KonIQ file, with images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    root.mkdir()
    words = ("excellent", "good", "fair", "poor", "bad")
    pathway, qalign = [], []
    for i in range(14):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / f"p{i}.png")
        level = words[i % 5]
        pathway.append({"id": f"p{i}", "image": f"p{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nHow is the quality of this image?"},
            {"from": "gpt", "value": f"The noise is {'weak' if i % 2 else 'strong'} and the edges are "
                                     f"{'sharp' if i % 3 else 'soft'}. Thus, the quality of the image is {level}."}]})
    pathway.append({"id": "no-verdict", "image": "p0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A street."}]})
    pathway.append({"id": "missing", "image": "nowhere.png", "conversations": pathway[0]["conversations"]})
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / f"k{i}.png")
        qalign.append({"id": f"k{i}.png->{10 + 15 * i}", "image": f"k{i}.png", "conversations": [
            {"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
            {"from": "gpt", "value": f"The quality of the image is {words[4 - i % 5]}."}]})
    (tmp_path / "q_pathway.json").write_text(json.dumps(pathway))
    (tmp_path / "train_koniq.json").write_text(json.dumps(qalign))
    return tmp_path / "q_pathway.json", tmp_path / "train_koniq.json", root


def _annotation_argv(tmp_path, *files, modes=("one-stage", "two-stage")):
    *paths, root = files
    return ["--out-dir", str(tmp_path / "pair"), "--annotations", *map(str, paths), "--image-root", str(root),
            "--image-size", "28", "--total-steps", "3", "--batch-size", "2", "--warmup-steps", "1",
            "--vocab-size", "300", "--eval-every", "0", "--eval-samples", "1", "--test-samples", "0",
            "--threads", "1", "--modes", *modes]


def test_train_pair_on_annotation_files_names_bad_entries_before_training(tmp_path):
    from mechbiqa.train import State

    study = _study()
    pathway, koniq, root = _annotation_files(tmp_path)
    cfg = study.parse_args(_annotation_argv(tmp_path, pathway, koniq, root))
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def progress(event):
            if not seen:  # the first training event: every bad entry must already be named
                named = [str(w.message) for w in caught if issubclass(w.category, study.AnnotationWarning)]
                seen.extend(named or ["none"])

        study.main(cfg, progress=progress)
    one, two = (next(m for m in seen if f"cannot train {mode}" in m) for mode in ("one-stage", "two-stage"))
    assert one.startswith("2 of 22 annotation entries cannot train one-stage")
    assert "q_pathway.json[14]: no answer ends with a verdict" in one and "q_pathway.json[15]: image not found" in one
    assert two.startswith("8 of 22 annotation entries cannot train two-stage")
    assert "train_koniq.json[0]: verdict without reasoning" in two
    out = cfg.out_dir
    data = read_info(out / "one-stage").data["data"]
    assert data["rejected"]["two-stage"][0].startswith("q_pathway.json[14]")
    # 20 usable images: 1 test (10% of the 14 both modes can use), 1 validation (out of the other 19), 18
    # training; two-stage trains only on the entries with reasoning.
    assert data["n_test"] == 1 and data["n"]["one-stage"]["val"] == 1
    assert data["n"]["one-stage"]["train"] == 18 and read_info(out / "one-stage").data["n_train_examples"] == 18
    n2 = data["n"]["two-stage"]
    assert n2["train"] + n2["val"] == 13 and read_info(out / "two-stage" / "stage1").data["n_train_examples"] == n2["train"]
    assert State.load(out / "two-stage" / "stage2").finished
    saved = json.loads((out / "results.json").read_text())
    assert saved["one_stage"]["n"] == saved["two_stage"]["n"] == 1
    assert saved["one_stage"]["ids"] == saved["two_stage"]["ids"] and saved["one_stage"]["ids"][0].startswith("p")


def test_train_pair_refuses_two_stage_on_qalign_verdicts_before_training(tmp_path):
    from mechbiqa.data.annotations import AnnotationError

    study = _study()
    _, koniq, root = _annotation_files(tmp_path)
    cfg = study.parse_args(_annotation_argv(tmp_path, koniq, root))
    with pytest.raises(AnnotationError, match="train_koniq.json: every usable answer is a verdict without reasoning"):
        study.main(cfg)
    assert not (cfg.out_dir / "one-stage").exists() and not (cfg.out_dir / "two-stage").exists()
