"""Checkpoints open as one object: released, one-stage and two-stage rate as the per-image reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mechbiqa.analysis.instability import SamplingConfig, sample_checkpoint
from mechbiqa.checkpoint import checkpoint_kind, open_checkpoint
from mechbiqa.model import save_pretrained
from mechbiqa.model.prompts import LEVEL_WEIGHTS, QALIGN_SCORER_PROMPT, get_template, tokenize_prompt
from mechbiqa.model.roles import Role
from mechbiqa.pipeline import (
    CheckpointModeError,
    OneStageRater,
    TwoStageRater,
    load_rater,
    scoring_prompt,
    split_answer,
    task_prompt,
)
from mechbiqa.scoring import level_ids
from mechbiqa.sources import load_raters, tiny_random_model

REPO = Path(__file__).resolve().parents[2]
MAX_NEW = 5


def _write(directory: Path, seed: int, info: dict | None) -> None:
    model, tokenizer, processor = tiny_random_model(seed)
    save_pretrained(model, directory)
    tokenizer.save(directory)
    processor.save_pretrained(directory)
    if info is not None:
        (directory / "mechbiqa.json").write_text(json.dumps({"template": "v1", "step": 0, **info}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    _write(root / "released", 0, None)
    _write(root / "one", 1, {"mode": "one-stage", "stage": None})
    _write(root / "pair" / "stage1", 2, {"mode": "two-stage", "stage": 1})
    _write(root / "pair" / "stage2", 3, {"mode": "two-stage", "stage": 2})
    return root


@pytest.fixture(scope="module")
def pixels(folders) -> torch.Tensor:
    _, _, processor = tiny_random_model(0)
    return torch.randn(
        3, 3, processor.image_size, processor.image_size, generator=torch.Generator().manual_seed(4)
    )


def _greedy(model, tokenizer, ids, image) -> str:
    """One prompt, unbatched, greedy, cut at EOS (the reference for batched generation)."""
    out = model.generate(
        torch.tensor([ids]), images=image, max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_id
    )
    new = out[0, len(ids) :].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    return tokenizer.decode(new).strip()


def _level_probs(model, tokenizer, ids, image) -> np.ndarray:
    logits = model(torch.tensor([ids]), images=image).logits[0, -1]
    return logits[level_ids(tokenizer)].float().softmax(-1).numpy()


def _check(ratings, expected_probs, descriptions) -> None:
    for rating, probs, description in zip(ratings, expected_probs, descriptions, strict=True):
        assert rating.description == description
        np.testing.assert_allclose(rating.level_probs, probs, atol=1e-5)
        assert rating.score == pytest.approx(float(probs @ np.asarray(LEVEL_WEIGHTS)), abs=1e-5)
        assert rating.roles.quality_position == len(rating.roles) - 1
        assert rating.prompt.quality_index == len(rating.prompt.ids) - 1


@torch.no_grad()
def test_kinds_are_told_apart_and_single_stages_refused(folders):
    assert checkpoint_kind(folders / "released") == "released"
    assert checkpoint_kind(folders / "one") == "one-stage"
    assert checkpoint_kind(folders / "pair") == "two-stage"
    with pytest.raises(CheckpointModeError, match="stage1/ and stage2/"):
        open_checkpoint(folders / "pair" / "stage1")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        open_checkpoint(folders)
    with pytest.raises(CheckpointModeError, match="two-stage pair is needed"):
        TwoStageRater.from_pretrained(folders / "one")
    assert isinstance(load_rater(folders / "one"), OneStageRater)
    assert isinstance(load_rater(folders / "pair"), TwoStageRater)
    loaded = load_raters([f"a={folders / 'one'}", f"b={folders / 'pair'}", f"c={folders / 'released'}"])
    assert [type(r).__name__ for r, _ in loaded.values()] == [
        "OneStageRater",
        "TwoStageRater",
        "OneStageRater",
    ]
    assert loaded["c"][0].template.name == get_template("mplug_owl2").name


def test_a_pair_folder_with_its_own_info_file_is_still_the_pair(folders, tmp_path):
    pair = tmp_path / "pair"
    pair.mkdir()
    for stage in ("stage1", "stage2"):
        (pair / stage).symlink_to(folders / "pair" / stage)
    (pair / "mechbiqa.json").write_text(json.dumps({"mode": "two-stage", "template": "v1"}))  # no stage
    assert checkpoint_kind(pair) == "two-stage"
    assert isinstance(load_rater(pair), TwoStageRater)


def test_the_smoke_pair_of_one_released_checkpoint_opens_as_a_two_stage_pair(folders, tmp_path):
    from mechbiqa.benchmarking import shared_weights_pair

    pair = shared_weights_pair(folders / "released", tmp_path / "pair")
    checkpoint = open_checkpoint(pair)
    assert checkpoint.kind == "two-stage" and not (pair / "mechbiqa.json").exists()
    assert checkpoint.rater.stage2.model is checkpoint.rater.stage1.model  # the same files: loaded once
    assert checkpoint.rater.stage2.path == pair / "stage2"
    other = open_checkpoint(folders / "pair").rater  # two sets of weights: two models
    assert other.stage1.model is not other.stage2.model
    assert (folders / "released" / "model.safetensors").exists() and not (folders / "released" / "mechbiqa.json").exists()


@torch.no_grad()
def test_one_stage_rates_as_the_per_image_reference(folders, pixels):
    checkpoint = open_checkpoint(folders / "one", max_new_tokens=MAX_NEW)
    assert checkpoint.kind == "one-stage" and checkpoint.image_at_quality
    c, template = checkpoint.scorer, get_template("v1")
    ask = task_prompt(c.tokenizer, template, "one-stage")
    descriptions = [
        split_answer(_greedy(c.model, c.tokenizer, ask.ids, pixels[i : i + 1]))[0] for i in range(3)
    ]
    probs = [
        _level_probs(
            c.model, c.tokenizer, scoring_prompt(c.tokenizer, template, "one-stage", d).ids, pixels[i : i + 1]
        )
        for i, d in enumerate(descriptions)
    ]
    ratings = checkpoint.rate(pixels, batch_size=2)
    _check(ratings, probs, descriptions)
    assert all(Role.IMAGE in r.roles.role for r in ratings)
    assert checkpoint.describe(pixels, batch_size=2) == descriptions


@torch.no_grad()
def test_two_stage_pair_rates_as_the_per_image_reference(folders, pixels):
    checkpoint = open_checkpoint(folders / "pair", max_new_tokens=MAX_NEW)
    assert checkpoint.kind == "two-stage" and not checkpoint.image_at_quality
    first, second, template = checkpoint.describer, checkpoint.scorer, get_template("v1")
    ask = task_prompt(first.tokenizer, template, "stage1")
    descriptions = [_greedy(first.model, first.tokenizer, ask.ids, pixels[i : i + 1]) for i in range(3)]
    probs = [
        _level_probs(
            second.model, second.tokenizer, scoring_prompt(second.tokenizer, template, "stage2", d).ids, None
        )
        for d in descriptions
    ]
    ratings = checkpoint.rate(pixels, batch_size=2)
    _check(ratings, probs, descriptions)
    assert all(Role.IMAGE not in r.roles.role for r in ratings)


@torch.no_grad()
def test_released_checkpoint_rates_with_the_qalign_scorer_prompt(folders, pixels):
    checkpoint = open_checkpoint(folders / "released")
    c = checkpoint.scorer
    ids = tokenize_prompt(c.tokenizer, QALIGN_SCORER_PROMPT, n_images=1)
    probs = [_level_probs(c.model, c.tokenizer, ids, pixels[i : i + 1]) for i in range(3)]
    _check(checkpoint.rate(pixels, batch_size=2), probs, ["", "", ""])


@torch.no_grad()
def test_sampling_a_pair_continues_each_rows_stream_into_stage_two(folders, pixels):
    checkpoint = open_checkpoint(folders / "pair", max_new_tokens=MAX_NEW)
    sampling = SamplingConfig(n_answers=2, seeds=(0, 1), max_new_tokens=4)
    whole = sample_checkpoint(checkpoint, pixels, sampling, batch_images=3)
    split = sample_checkpoint(checkpoint, pixels, sampling, batch_images=2)  # image numbers seed the streams
    assert whole.mode == "two-stage" and whole.levels.shape == (2, 3, 2)
    np.testing.assert_array_equal(whole.levels, split.levels)
    assert whole.texts == split.texts


def test_qalign_weights_are_written_in_one_file_only():
    pattern = re.compile(r"0?\.75\s*,\s*0?\.5\s*,\s*0?\.25")
    found = [
        str(p.relative_to(REPO))
        for folder in ("mechbiqa", "hooks", "studies")
        for p in sorted((REPO / folder).rglob("*.py"))
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert found == ["mechbiqa/model/prompts.py"]
