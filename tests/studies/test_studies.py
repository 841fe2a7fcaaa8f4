"""Studies 1-5 end to end on the tiny random model, with warnings as errors: artefacts, reports, refusals."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studies import (
    attention_attribution,
    cache_activations,
    evaluate_quality,
    instability,
    logit_lens,
    patch_image_tokens,
)

STUDIES = {
    "logit_lens": (logit_lens, ("--store", "--model", "--out", "--top-k")),
    "attention_attribution": (attention_attribution, ("--store", "--out", "--k", "--score-layers")),
    "patch_image_tokens": (
        patch_image_tokens,
        ("--model", "--tiny-random", "--dataset", "--k", "--layers", "--sites", "--setters", "--batch-size"),
    ),
    "instability": (
        instability,
        ("--model", "--tiny-random", "--n-answers", "--seeds", "--no-do-sample", "--temperature"),
    ),
    "evaluate_quality": (evaluate_quality, ("--model", "--tiny-random", "--dataset", "--split", "--fit")),
}


def make_images(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (28 + i, 30, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A folder with ``images/`` and the tiny model's default store ``tiny.h5`` beside it."""
    root = tmp_path_factory.mktemp("studies")
    make_images(root / "images")
    cache_activations.main(cache_activations.Config.tiny(root))
    return root


def run(study, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return study.main(cfg)


def rendered(study, result) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=160)
    study.render(result, console)
    return console.file.getvalue()


def check_files(result, name: str) -> dict:
    for key in ("config", "json"):
        assert result.files[key].is_file()
    assert json.loads(result.files["config"].read_text())
    if "figure" in result.files:
        assert result.files["figure"].stat().st_size > 5000
    return json.loads(result.files["json"].read_text())


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_help_lists_the_options(name, capsys):
    study, options = STUDIES[name]
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Question" in text and "Method" in text
    for option in options:
        assert option in text


def test_logit_lens(tiny):
    result = run(logit_lens, logit_lens.Config.tiny(tiny))
    data = check_files(result, "logit_lens")
    lens = result.lens
    assert lens.level_probs.shape[:2] == (2, 6) and lens.last_layer_error < 0.01  # fp16 store vs the model
    assert data["model"] == "tiny-random(seed=0)" and len(data["samples"]) == 6
    text = rendered(logit_lens, result)
    assert "settle" in text and "top tokens" in text


def test_attention_attribution(tiny):
    result = run(attention_attribution, attention_attribution.Config.tiny(tiny))
    data = check_files(result, "attention_attribution")
    mass = np.array(data["mass_by_layer"])
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-2)  # fp16 storage
    assert len(data["consensus"]) == 2 and len(data["samples"]) == 6
    assert "Dominant image tokens" in rendered(attention_attribution, result)


def test_patch_image_tokens(tiny):
    cfg = patch_image_tokens.Config.tiny(tiny, sites=("resid", "kv"))
    result = run(patch_image_tokens, cfg)
    data = check_files(result, "patch_image_tokens")
    n_configs = 2 * 2 * 3 * 3 + 1  # sites x layers x selections x setters + whole image zeroed
    assert result.sweep.score.shape == (n_configs, 4) and result.sweep.n_forwards < n_configs
    assert (result.source_of != np.arange(4)).all()
    assert set(data["selections"]) == {"dominant", "random", "least"}
    assert "dominant" in rendered(patch_image_tokens, result)


def test_instability(tiny):
    result = run(instability, instability.Config.tiny(tiny))
    data = check_files(result, "instability")
    assert result.instability.levels.shape == (3, 4, 5) and len(data["ratio"]) == 3
    assert data["mode"] == "prompted" and len(data["answers"]) == 4
    greedy = run(instability, instability.Config.tiny(tiny, do_sample=False, out=str(tiny / "greedy")))
    levels = greedy.instability.levels  # every answer equal: stable unless it holds no level word
    assert (levels == levels[:1, :, :1]).all()
    assert "unstable" in rendered(instability, result)


def test_evaluate_quality(tiny):
    from mechbiqa.data.records import IQARecord, records_to_jsonl

    files = sorted((tiny / "images").glob("*.png"))
    records = [
        IQARecord(id=p.name, image_path=p, score=float(i), scale=(0.0, 10.0), dataset="toy")
        for i, p in enumerate(files)
    ]
    records_to_jsonl(records, tiny / "toy.jsonl", relative_to=tiny)
    cfg = evaluate_quality.Config.tiny(tiny, datasets=(str(tiny / "images"), str(tiny / "toy.jsonl")))
    result = run(evaluate_quality, cfg)
    data = check_files(result, "evaluate_quality")
    assert [r["name"] for r in data["rows"]] == ["images", "toy", "all"]
    toy = result.evaluation.row("toy")
    assert toy.metrics.n == 6 and np.isfinite(toy.metrics.srcc) and toy.seconds_per_image > 0
    assert "too_few" in result.evaluation.row("images").metrics.flags  # a folder of images has no ratings
    assert "SRCC" in rendered(evaluate_quality, result)


def test_studies_refuse_a_store_that_lacks_what_they_need(tmp_path):
    make_images(tmp_path / "images", 3)
    cache_activations.main(cache_activations.Config.tiny(tmp_path, spec="llm.unembed.hook_out@quality"))
    with pytest.raises(LookupError, match=r"llm\.blocks\.\{l\}\.hook_resid_post"):
        logit_lens.main(logit_lens.Config.tiny(tmp_path))
    with pytest.raises(LookupError, match=r"llm\.blocks\.\{l\}\.attn\.hook_pattern"):
        attention_attribution.main(attention_attribution.Config.tiny(tmp_path))
    # every layer's residual but the last: the final answer is missing
    cache_activations.main(
        cache_activations.Config.tiny(
            tmp_path, spec="llm.blocks.{l}.hook_resid_post@quality:0", out=str(tmp_path / "first.h5")
        )
    )
    with pytest.raises(LookupError, match=r"llm\.blocks\.1\.hook_resid_post"):
        logit_lens.main(logit_lens.Config.tiny(tmp_path, store=str(tmp_path / "first.h5")))


def test_attribution_refuses_a_store_without_image_tokens(tiny):
    from mechbiqa.analysis.attribution import attribute_store
    from mechbiqa.model.roles import Role

    class NoImage:  # the store with every image role relabelled: what a text-only prompt would give
        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            return getattr(self._store, name)

        def roles(self, samples=None):
            roles = self._store.roles(samples)
            return np.where(roles == int(Role.IMAGE), int(Role.INSTRUCTION), roles)

    from mechbiqa.store import ActivationStore

    with ActivationStore.open(tiny / "tiny.h5") as store, pytest.raises(LookupError, match="role 'image'"):
        attribute_store(NoImage(store))
