"""results.json of the trained pair: one entry per checkpoint, read back with NaN for null, open to more entries."""

from __future__ import annotations

import json
import math

from mechbiqa import outputs
from mechbiqa.train import PairResult, read_results


def test_results_keep_every_entry_and_read_null_metrics_back_as_nan(tmp_path):
    one = {"n": 2, "srcc": math.nan, "plcc": 0.5, "level_acc": 1.0, "scores": [0.1, 0.2], "labels": [0.0, 1.0]}
    extra = {"n": 2, "srcc": 0.25, "krcc": math.nan}
    result = PairResult(entries={"one_stage": one, "two_stage": None, "rl": extra},
                        train_seconds={"one-stage": 1.0, "rl": 2.0}, eval_seconds={"one-stage": 0.5},
                        paths={"one-stage": "a", "rl": "b"}, config={"total_steps": 6},
                        comparison={"srcc_two_minus_one": math.nan, "ci95": [math.nan, math.nan], "n": 2})
    outputs.write_json(tmp_path / "results.json", result.to_dict(), indent=2)
    saved = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN is written as null
    # the layout: each entry under its key, then the fixed fields in the order results.json always had
    assert list(saved) == ["one_stage", "two_stage", "rl", "train_seconds", "eval_seconds", "paths", "config",
                           "comparison"]
    assert saved["one_stage"]["srcc"] is None and saved["two_stage"] is None and saved["rl"]["krcc"] is None
    back = read_results(tmp_path)
    assert math.isnan(back.one_stage["srcc"]) and back.one_stage["plcc"] == 0.5 and back.two_stage is None
    assert back.entry("rl")["srcc"] == 0.25 and math.isnan(back.entry("rl")["krcc"])
    assert all(math.isnan(v) for v in back.comparison["ci95"])
    assert back.paths == {"one-stage": "a", "rl": "b"} and back.train_seconds == result.train_seconds
    assert read_results(tmp_path / "nowhere") is None
