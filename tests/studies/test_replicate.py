"""The main job end to end on the tiny benchmark and a few training steps."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mechbiqa.model.roles import Role
from mechbiqa.reports import comparison_report
from mechbiqa.sources import spread, stored_model
from mechbiqa.store import ActivationStore

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def load(name: str):
    key = f"test_study_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, STUDIES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def test_replicate_runs_end_to_end_and_writes_its_summary(tmp_path):
    replicate = load("replicate")
    result = replicate.main(replicate.Config.tiny(tmp_path))
    summary = json.loads((tmp_path / "replicate" / "summary.json").read_text())
    for mode in ("one-stage", "two-stage"):
        m = summary["metrics"][mode]
        for key in ("srcc", "instability", "image_mass", "description_mass", "lens_changes", "grounding"):
            assert key in m, (mode, key)
        assert 0.0 <= m["image_mass"][0] <= 1.0
    # the two-stage quality position reads text only: no attention can reach an image token
    assert summary["metrics"]["two-stage"]["image_mass"][0] == 0.0
    assert "patching" in summary["metrics"]["one-stage"]
    assert {f["finding"] for f in result.findings + result.untested}
    # every finding names its test and carries a p-value or an interval; held only when the test rejects at 5%
    for f in summary["findings"]:
        assert f["test"] and np.isfinite(f["p_value"]) and np.isfinite(f["ci"]).all(), f
        assert f["held"] is {"held": True, "did not hold": False}.get(f["verdict"])
        if f["held"] is not None:
            assert f["p_value"] < 0.05, f
    # a test undefined on these images (the tiny model's constant scores) is listed apart, never decided
    for f in summary["untested"]:
        assert f["test"] and f["verdict"] == "inconclusive" and "undefined" in f["evidence"], f
    assert len(summary["findings"]) + len(summary["untested"]) >= 9
    assert any("non-image attention" in f["finding"] for f in summary["findings"] + summary["untested"])
    per_image = summary["metrics"]["one-stage"]["per_image"]
    assert per_image["lens"]["ids"] == one_ids(tmp_path) and len(per_image["instability"]["instability"]) == 2
    # the lens, attribution and probes read one store per checkpoint; the two-stage one is text only
    with ActivationStore.open(tmp_path / "replicate" / "one-stage.h5") as one, \
            ActivationStore.open(tmp_path / "replicate" / "two-stage.h5") as two:
        assert one.complete and (one.n_images() == 1).all() and (two.n_images() == 0).all()
        assert not (two.roles() == int(Role.IMAGE)).any() and (two.roles() == int(Role.DESCRIPTION)).any()
        assert two.ids() == one.ids() and len(one.ids()) == 8
        assert Path(stored_model(two)).name == "stage2"  # recorded from the stage-2 model
    for mode in ("one-stage", "two-stage"):
        m = summary["metrics"][mode]
        assert m["store"].endswith(f"{mode}.h5") and m["lens_last_layer_error"] < 1e-3
        probes = m["probes"]
        n_layers = len(probes["layers"])
        for key in ("probe_srcc", "lens_srcc", "lens_agreement", "lens_final_prob", "lens_level_probs"):
            assert len(probes[key]) == n_layers, (mode, key)
        assert probes["lens_agreement"][-1] == 1.0
        assert set(probes["score_head"]["metrics"]) == {"level_word", "mlp_head", "ridge"}
        assert probes["grouping"].startswith("image")  # the tiny benchmark's test split is one photo
        assert "contradiction_rate" in m["grounding"] and "rouge1_f1" in m["grounding"]
    for name in ("one-stage.lens.png", "two-stage.lens.png", "one-stage.attention.png", "probe_lens_curves.png"):
        assert (tmp_path / "replicate" / name).stat().st_size > 0, name
    rendered = Console(record=True, width=200)
    rendered.print(comparison_report(result.metrics, result.findings + result.untested, result.seconds))
    text = rendered.export_text()
    assert "probe SRCC" in text and "MLP score head" in text and "contradiction rate" in text
    # a second run reuses the checkpoints and their test ratings instead of training and rating again
    results = tmp_path / "compact" / "results.json"
    before = results.stat().st_mtime_ns
    store = tmp_path / "replicate" / "two-stage.h5"
    stored = store.stat().st_mtime_ns
    again = replicate.main(replicate.Config.tiny(tmp_path))
    assert results.stat().st_mtime_ns == before and store.stat().st_mtime_ns == stored  # stores reused too
    assert again.metrics["one-stage"]["srcc"] == result.metrics["one-stage"]["srcc"]
    for mode in ("one-stage", "two-stage"):  # the same store, the same curves (NaN where a fold is constant)
        curve = again.metrics[mode]["probes"]["probe_srcc"]
        np.testing.assert_equal(curve, result.metrics[mode]["probes"]["probe_srcc"])
    # a given pair on a given data set: nothing is trained or built, and the findings are tested the same way
    given = tmp_path / "given"
    pair = replace(replicate.Config.tiny(given), one_stage=str(tmp_path / "compact" / "one-stage"),
                   two_stage=str(tmp_path / "compact" / "two-stage"),
                   dataset=str(tmp_path / "benchmark" / "manifest.jsonl"))
    third = replicate.main(pair)
    assert not (given / "compact").exists() and not (given / "benchmark").exists()
    assert third.paths == {"one-stage": pair.one_stage, "two-stage": pair.two_stage}
    assert "benchmark + training" in third.seconds and third.seconds["benchmark + training"] < 1
    claims = [f["finding"][:40] for f in result.findings + result.untested]
    assert [f["finding"][:40] for f in third.findings + third.untested] == claims
    assert all(f["test"] and np.isfinite(f["p_value"]) for f in third.findings)


def one_ids(tmp_path):
    with ActivationStore.open(tmp_path / "replicate" / "one-stage.h5") as store:
        return store.ids()


def test_the_command_line_takes_a_pair_and_a_data_set():
    replicate = load("replicate")
    cfg = replicate.parse_args(["--one-stage", "ckpt/one", "--two-stage", "ckpt/pair",
                                "--dataset", "koniq10k=/data"])
    assert (cfg.one_stage, cfg.two_stage, cfg.dataset) == ("ckpt/one", "ckpt/pair", "koniq10k=/data")
    assert replicate.parse_args([]).dataset == "builtin" and replicate.parse_args([]).one_stage is None
    with pytest.raises(ValueError, match="--one-stage and --two-stage go together"):
        replicate.Config(one_stage="ckpt/one")


def test_no_study_imports_another_or_a_private_name():
    """Studies compose library calls: no study module, no importlib, no ``_private`` name from elsewhere."""
    for script in sorted(STUDIES.glob("*.py")):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith(("studies", "importlib")), (script.name, name)
                assert not name.rsplit(".", 1)[-1].startswith("_") or name == "__future__", (script.name, name)


def test_spread_picks_evenly_over_the_list():
    assert spread(list(range(10)), 3) == [0, 4, 9]  # positions 0, 4.5, 9 (half to even)
    assert spread(list("abcdefg"), 4) == ["a", "c", "e", "g"]  # 0, 2, 4, 6
    assert spread(list(range(4)), 9) == [0, 1, 2, 3]


@pytest.mark.slow
def test_analyses_side_by_side_equal_one_after_the_other(tmp_path):
    """Two threads: the checkpoints are analysed two at a time in processes of their own, or (--no-parallel)
    one after the other here; the metrics and the findings are the same."""
    replicate = load("replicate")
    cfg = replace(replicate.Config.tiny(tmp_path), threads=2)
    apart = replicate.main(cfg)  # trains the pair and the companions side by side too
    together = replicate.main(replace(cfg, parallel=False))  # reuses them; analyses one after the other
    assert apart.paths == together.paths and set(apart.metrics) == {"one-stage", "two-stage", "rl", "q-scorer"}
    same = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731  (NaN where a metric is undefined)
    assert same(apart.trained) == same(together.trained)  # reused, not trained again
    for mode, m in apart.metrics.items():
        other = together.metrics[mode]
        assert m["per_image"]["lens"]["ids"] == other["per_image"]["lens"]["ids"]
        for key in ("scores", "mos"):
            assert m[key] == pytest.approx(other[key], abs=1e-5), (mode, key)
        for key in ("instability", "image_mass", "description_mass", "lens_changes"):
            assert m[key] == pytest.approx(other[key], abs=1e-5, nan_ok=True), (mode, key)
        assert m["grounding"]["contradiction_rate"] == other["grounding"]["contradiction_rate"]
    mine = [(f["finding"], f["verdict"], f["effect"], f["p_value"]) for f in apart.findings]
    theirs = [(f["finding"], f["verdict"], f["effect"], f["p_value"]) for f in together.findings]
    assert [f[:2] for f in mine] == [f[:2] for f in theirs]
    for i in (2, 3):  # the effects, the p-values
        assert [f[i] for f in mine] == pytest.approx([f[i] for f in theirs], abs=1e-6)
    assert "analyses of 4 checkpoints (wall)" in apart.seconds
