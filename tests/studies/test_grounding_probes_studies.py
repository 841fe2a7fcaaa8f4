"""studies/grounding.py and studies/probes.py end to end on tiny random models and a tiny benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechbiqa.analysis.probes import RidgeConfig, ScoreHead, ScoreHeadConfig, head_scores, quality_hidden
from mechbiqa.data import BenchmarkConfig, build_benchmark, load_benchmark
from mechbiqa.data.records import records_to_jsonl
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.scoring import level_ids
from mechbiqa.sources import tiny_random_model
from mechbiqa.store import ActivationStore
from studies import cache_activations, grounding, probes
from tests.conftest import REPO

COMPACT = REPO / "cache" / "compact" / "one-stage"


def _strict_json(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny benchmark (4 photos, 2 crops each) as a .jsonl, and a store of the tiny random model over it."""
    tmp = tmp_path_factory.mktemp("grounding_probes")
    bench = build_benchmark(BenchmarkConfig.tiny(crops_per_photo=2), tmp / "bench")
    records_to_jsonl(list(bench), tmp / "set.jsonl", relative_to=tmp)
    cache_activations.main(cache_activations.Config.tiny(tmp, dataset=str(tmp / "set.jsonl"), batch_size=32))
    return tmp


# ------------------------------------------------------------------------------------------ grounding
def test_grounding_study_runs_and_writes_strict_json(tiny, tmp_path):
    cfg = grounding.Config.tiny(tmp_path, tiny / "set.jsonl", limit=24)
    result = grounding.main(cfg)
    assert set(result.checkpoints) == {"one-stage", "two-stage"} and result.n_images == 24
    saved = _strict_json(result.files["json"])
    for name, c in result.checkpoints.items():
        assert c.mode == name and c.grounding.n == 24 and c.rouge is not None and c.rouge.n == 24
        assert 0 <= c.grounding.contradiction_rate <= 1 and 0 <= c.rouge.mean_f1 <= 1
        row = saved["checkpoints"][name]["per_image"][0]
        assert {"description", "image_level", "text_level", "severity", "rouge1_f1", "mos", "answer"} <= set(
            row
        )
        assert set(saved["summary"][name]) >= {
            "contradiction_rate",
            "agreement_srcc",
            "conflict_rate",
            "rouge1_f1",
        }
    assert _strict_json(result.files["config"])["tiny_random"] is True


def _force_levels(model, tokenizer, with_image: str, without_image: str):
    """Hooks forcing the level-word logits to ``with_image`` in rows with an image, else ``without_image``."""
    ids = torch.tensor(level_ids(tokenizer))
    pick = torch.tensor([LEVEL_WORDS.index(with_image), LEVEL_WORDS.index(without_image)])
    state = {}

    def modality(activation, hook):
        state["image"] = activation.bool().any(-1)

    def logits(activation, hook):
        level = torch.where(state["image"], pick[0], pick[1])
        forced = torch.full((activation.shape[0], len(ids)), -30.0)
        forced[torch.arange(activation.shape[0]), level] = 30.0
        activation[:, -1, ids] = forced.to(activation.dtype)
        return activation

    return model.hooks(fwd_hooks=[("llm.hook_modality", modality), ("llm.unembed.hook_out", logits)])


@pytest.mark.parametrize("text_level,expected", [("good", 0.0), ("bad", 1.0)])
def test_contradiction_rate_follows_a_forced_text_path(tiny, tmp_path, text_level, expected):
    raters = grounding.tiny_raters(max_new_tokens=4)
    one, two = raters["one-stage"].components, raters["two-stage"].stage2
    cfg = grounding.Config.tiny(tmp_path, tiny / "set.jsonl", limit=12, max_new_tokens=4)
    with (
        _force_levels(one.model, one.tokenizer, "good", text_level),
        _force_levels(two.model, two.tokenizer, "good", text_level),
    ):
        result = grounding.main(cfg, raters=raters)
    for c in result.checkpoints.values():
        assert c.grounding.contradiction_rate == expected
        assert set(c.grounding.image_levels.tolist()) == {LEVEL_WORDS.index("good")}
        assert set(c.grounding.text_levels.tolist()) == {LEVEL_WORDS.index(text_level)}


def test_grounding_cli_help_and_missing_checkpoints(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        grounding.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        grounding.load_raters(grounding.Config(checkpoints=(str(tmp_path),)))


# ------------------------------------------------------------------------------------------ probes
def test_probes_study_on_the_tiny_store_and_the_head_at_inference(tiny):
    result = probes.main(probes.Config.tiny(tiny))
    curve = result.curve
    assert curve.layers.tolist() == [0, 1] and np.isfinite(curve.srcc).all()
    assert (
        result.lens_srcc is not None and result.lens_srcc.shape == (2,) and result.lens_agreement[-1] == 1.0
    )
    metrics = result.comparison.metrics
    assert set(metrics) == {"level_word", "mlp_head", "ridge"} and result.comparison.eval_split == "test"
    saved = _strict_json(result.files["json"])
    assert saved["summary"]["layers"] == [0, 1] and "score_head" in saved["summary"]
    # The saved head reloads, and scores new images through one forward with a hook at its layer.
    head = ScoreHead.load(result.files["head"])
    with ActivationStore.open(tiny / "tiny.h5") as store:
        ids, paths = store.ids()[:6], store.image_paths()[:6]
        stored = store.get(f"llm.blocks.{head.layer}.hook_resid_post", "quality", samples=list(range(6)))[
            :, 0
        ]
    model, tokenizer, processor = tiny_random_model(0)
    prompt = cache_activations.PromptConfig().encode(tokenizer, "score")
    pixels = processor(paths)
    hidden = quality_hidden(model, tokenizer, [prompt] * 6, pixels, head.layer)
    # The live state is the stored one up to the store's float16 rounding ...
    np.testing.assert_allclose(hidden, stored.astype(np.float32), atol=4e-3 * np.abs(stored).max())
    # ... and head_scores is the head on that state.
    np.testing.assert_allclose(
        head_scores(head, model, tokenizer, [prompt] * 6, pixels), head.predict(hidden), atol=1e-6
    )
    assert len(ids) == 6 and set(result.comparison.eval_ids) <= set(store_ids(tiny))


def store_ids(folder: Path) -> list[str]:
    with ActivationStore.open(folder / "tiny.h5") as store:
        return store.ids()


def test_probes_study_on_arrays_finds_the_planted_layer(tmp_path):
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(10)], 16)
    resid = rng.normal(size=(160, 3, 24))
    signal = resid[:, 1] @ rng.normal(size=24)
    mos = 0.5 + 0.15 * signal / signal.std()
    splits = tuple("train" if g < "p6" else "val" if g < "p7" else "test" for g in groups)
    data = probes.ProbeData(
        resid=resid,
        mos=mos,
        groups=groups,
        splits=splits,
        ids=tuple(map(str, range(160))),
        layers=(0, 1, 2),
        source="arrays",
    )
    result = probes.main(
        probes.Config(
            out=str(tmp_path), ridge=RidgeConfig(n_splits=5), head=ScoreHeadConfig(epochs=60, layer=1)
        ),
        data=data,
    )
    assert result.curve.best_layer == 1 and result.curve.srcc[1] > 0.9 and result.lens_srcc is None
    assert result.comparison.metrics["ridge"]["srcc"] > 0.9 and result.comparison.n_eval == 48
    assert (tmp_path / "score_head" / "score_head.safetensors").is_file()
    with pytest.raises(ValueError, match="head-layer 5 is not stored"):
        probes.analyse(data, probes.Config(head=ScoreHeadConfig(layer=5), ridge=RidgeConfig(n_splits=5)))


@pytest.mark.parametrize("mode", ["one-stage", "two-stage"])
def test_probes_study_computes_the_states_live_from_a_rater(tiny, tmp_path, mode):
    records = grounding.load_records(grounding.Config(dataset=str(tiny / "set.jsonl"), split=None))[::4]
    rater = grounding.tiny_raters(max_new_tokens=3)[mode]
    data = probes.data_from_rater(rater, records, store=tmp_path / "rated.h5", batch_size=32)
    assert data.resid.shape[:2] == (len(records), 2) and data.layers == (0, 1)
    assert data.lens_probs.shape == (2, len(records), 5) and data.lens_agreement[-1] == 1.0
    assert set(data.splits) == {"train", "val", "test"} and len(set(data.groups)) == 4
    # The live states are the rater's own: the last layer's lens is its Q-Align answer.
    reader = rater.components if mode == "one-stage" else rater.stage2
    pixels = (rater.components if mode == "one-stage" else rater.stage1).processor(
        [r.image_path for r in records[:3]]
    )
    own = np.stack([r.level_probs for r in rater.rate(pixels)])
    np.testing.assert_allclose(data.lens_probs[-1, :3], own, atol=1e-4)
    assert reader.model.cfg.llm.n_layers == 2
    result = probes.main(probes.Config.tiny(tmp_path), data=data)
    assert set(result.comparison.metrics) == {"level_word", "mlp_head", "ridge"}


def test_probes_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        probes.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--store" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not (COMPACT / "config.json").is_file(), reason=f"no compact checkpoint in {COMPACT}")
def test_score_head_beats_chance_on_held_out_photos_of_the_compact_store(tmp_path):
    from mechbiqa_hooks.record import PromptConfig, RunConfig, record_dataset

    from mechbiqa.model.load import load_components
    from mechbiqa.pipeline import ONE_STAGE_QUESTION
    from mechbiqa.store import CacheSpec

    bench = load_benchmark(REPO / "cache" / "benchmark")
    photos = {}
    for r in bench.records:  # first crop of a few photos per split keeps the recording short
        photos.setdefault(r.split, set())
        if len(photos[r.split]) < {"train": 6, "val": 1, "test": 3}[r.split]:
            photos[r.split].add(r.meta["photo"])
    chosen = [r for r in bench.records if r.meta["photo"] in photos[r.split] and r.meta["crop"] == 0]
    parts = load_components(COMPACT)
    prompt = PromptConfig(template="v1", question=ONE_STAGE_QUESTION, image_first=True)
    record_dataset(
        parts.model,
        parts.tokenizer,
        parts.processor,
        chosen,
        CacheSpec.parse("llm.blocks.{l}.hook_resid_post@quality; llm.unembed.hook_out@quality"),
        tmp_path / "compact.h5",
        prompt=prompt,
        run=RunConfig(batch_size=32),
        model_name=str(COMPACT),
    )
    result = probes.main(
        probes.Config(
            store=str(tmp_path / "compact.h5"),
            model=str(COMPACT),
            ridge=RidgeConfig(n_splits=3),
            n_shuffles=0,
            out=str(tmp_path / "out"),
        )
    )
    head = result.comparison.metrics["mlp_head"]
    assert result.comparison.n_eval > 50 and head["srcc"] > 0.3, result.comparison.metrics
