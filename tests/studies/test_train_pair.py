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


def test_train_pair_help_and_flags():
    study = _study()
    cfg = study.parse_args(["--total-steps", "9", "--modes", "two-stage", "--lora-rank", "8"])
    assert cfg.total_steps == 9 and cfg.modes == ("two-stage",) and cfg.lora_rank == 8
    assert cfg.train_config("two-stage", 2, 3).init_from is None
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--total-steps" in done.stdout and "two-stage" in done.stdout
