"""The pair's companions (RL, Q-Scorer): references, resumption, rating, conversion error (tiny models)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy import stats

from mechbiqa.analysis.conversion import conversion_table
from mechbiqa.analysis.rouge import annotation_references, references_with
from mechbiqa.checkpoint import Checkpoint, open_checkpoint
from mechbiqa.data import BenchmarkConfig, build_benchmark
from mechbiqa.finetune_io import write_checkpoint
from mechbiqa.model.prompts import LEVEL_WEIGHTS, get_template
from mechbiqa.pipeline import read_info, score_prompts, scoring_prompt
from mechbiqa.qscorer import (
    QScorerRater,
    QScorerTrainConfig,
    ScoreTokenSpec,
    load_qscorer,
    qscorer_from_checkpoint,
    save_qscorer,
)
from mechbiqa.reports_companions import companion_columns, companion_table, conversion_error_table
from mechbiqa.rl import (
    RL_STATE_FILE,
    RewardWeights,
    RLConfig,
    Sampled,
    finetune_checkpoint,
    paper_rewards,
    rouge_rewards,
)
from mechbiqa.sources import tiny_random_model
from mechbiqa.train import Example, examples_from_records
from mechbiqa.train.companions import CompanionSettings, train_companions, write_conversion_error

PATHWAY = [
    {"id": "a->3.1", "image": "sub/a.png", "conversations": [
        {"from": "human", "value": "<image>\nHow is the quality?"},
        {"from": "gpt", "value": "Heavy blur hides the edges. Thus, the quality of the image is poor."}]},
    {"id": "b", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nRate it."},
        {"from": "gpt", "value": "The quality of the image is good."}]},  # a verdict alone: no reference
]  # fmt: skip


# ------------------------------------------------------------------------------------------ references
def test_annotation_references_read_conversation_reasoning_and_plain_objects(tmp_path):
    (tmp_path / "pathway.json").write_text(json.dumps(PATHWAY))
    plain = {"a.png": ["Soft focus.", "Heavy blur hides the edges."]}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    refs = annotation_references([tmp_path / "pathway.json", tmp_path / "plain.json"])
    # keyed by id (score suffix cut) and by image file name; the verdict sentence is cut off
    assert refs == {"a": ("Heavy blur hides the edges.",),
                    "a.png": ("Heavy blur hides the edges.", "Soft focus.")}  # fmt: skip

    class R:  # a record with its own description
        def __init__(self, id, image_path, description):
            self.id, self.image_path, self.description = id, image_path, description

    records = [R("a", Path("/x/a.png"), "Sharp."), R("b", Path("/x/b.png"), None),
               R("c", Path("c.png"), "Dark.")]  # fmt: skip
    assert references_with(records, refs) == [
        ("Sharp.", "Heavy blur hides the edges.", "Soft focus."), (), ("Dark.",)]  # fmt: skip
    assert references_with(records) == [("Sharp.",), (), ("Dark.",)]
    with pytest.raises(ValueError, match="expected a list"):
        (tmp_path / "bad.json").write_text("3")
        annotation_references([tmp_path / "bad.json"])


def test_rouge_reward_takes_the_best_of_several_references(tmp_path):
    # "blurry dark image" vs "dark image": overlap 2, P 2/3, R 1 -> F1 0.8; vs "sharp photo": 0
    assert rouge_rewards(["blurry dark image"], ["sharp photo", "dark image"]) == [pytest.approx(0.8)]
    assert rouge_rewards(["blurry dark image"], "sharp photo") == [0.0]
    assert rouge_rewards(["blurry dark image"], []) == [0.0]
    model, tok, _ = tiny_random_model(0)
    example = Example(id="x", image=None, description="sharp photo", level="good", score=0.7)
    answer = [Sampled(ids=(), text="", description="blurry dark image", level="good")]
    weights = RewardWeights(level=0.0, rouge=1.0, consistency_answer=0.0, consistency_label=0.0)
    kwargs = dict(tokenizer=tok, template=get_template("v1"), weights=weights)
    assert paper_rewards(model, answer, example, **kwargs)[0] == [0.0]  # the example's own description
    assert paper_rewards(model, answer, example, references=("sharp photo", "dark image"), **kwargs)[0] == [
        pytest.approx(0.8)
    ]


# ------------------------------------------------------------------------------------------ conversion
def test_conversion_table_by_hand():
    mos = np.array([0.1, 0.35, 0.9, 0.62])
    restored = np.array([0.0, 0.25, 1.0, 0.75])  # bins 0, 1, 4, 3 -> Q-Align values
    a, r = np.array([0.2, 0.3, 0.8, 0.5]), np.array([0.1, 0.4, 0.85, 0.6])
    table = conversion_table(mos, {"one_stage": a}, {"head": r}, ids=["w", "x", "y", "z"])
    rmse = lambda p: math.sqrt(float(np.mean((p - mos) ** 2)))  # noqa: E731
    assert table.label_approximation.rmse == pytest.approx(rmse(restored))
    assert table.restoration["one_stage"].rmse == pytest.approx(rmse(a))
    assert table.score_token["head"].rmse == pytest.approx(rmse(r))
    assert table.beyond_floor()["head"] == pytest.approx(rmse(r) - rmse(restored))
    assert table.restoration["one_stage"].srcc == pytest.approx(stats.spearmanr(a, mos)[0])
    data = table.to_dict()
    assert data["per_image"]["ids"] == ["w", "x", "y", "z"] and data["per_image"]["head"] == pytest.approx(r)
    with pytest.raises(ValueError, match="both"):
        conversion_table(mos, {"x": a}, {"x": r})


# ------------------------------------------------------------------------------------------ on tiny models
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_benchmark(BenchmarkConfig.tiny(image_size=28), tmp_path_factory.mktemp("bench") / "b")


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory) -> Path:
    model, tok, proc = tiny_random_model(0)
    return write_checkpoint(tmp_path_factory.mktemp("pair") / "one-stage", model, tok, proc,
                            {"mode": "one-stage", "template": "v1"})  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_a_killed_rl_run_resumes_on_its_trajectory_and_a_finished_one_is_reused(tmp_path, bench, one_stage):
    examples = examples_from_records(bench.split("train")[:4], "one-stage")
    cfg = RLConfig(steps=2, images_per_step=1, group_size=3, lr=1e-2, max_new_tokens=3, clip_norm=0.0)
    refs = {e.id: (e.description, "blurry image") for e in examples}

    def reward(m, answers, example):  # varies within a group (a random model never names a level)
        return [float(a.ids[0] % 7) for a in answers], {}

    whole = finetune_checkpoint(one_stage, tmp_path / "whole", examples, cfg, references=refs,
                                reward_fn=reward)  # fmt: skip

    class Killed(Exception):
        pass

    def kill_at_2(step):
        if step.step == 2:
            raise Killed

    with pytest.raises(Killed):
        finetune_checkpoint(one_stage, tmp_path / "cut", examples, cfg, references=refs, checkpoint_every=1,
                            progress=kill_at_2, reward_fn=reward)  # fmt: skip
    info = read_info(tmp_path / "cut").data
    assert info["finished"] is False and info["step"] == 1 and (tmp_path / "cut" / RL_STATE_FILE).is_file()
    seen = []
    resumed = finetune_checkpoint(one_stage, tmp_path / "cut", examples, cfg, references=refs,
                                  checkpoint_every=1, progress=seen.append, reward_fn=reward)  # fmt: skip
    assert [s.step for s in seen] == [2]  # only the step that was lost
    assert [h.reward for h in resumed.history] == pytest.approx([h.reward for h in whole.history])
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], _weights(one_stage)[k]) for k in a)  # it did train
    version = (tmp_path / "cut").resolve()
    again = finetune_checkpoint(one_stage, tmp_path / "cut", examples, cfg, references=refs,
                                progress=seen.append, reward_fn=reward)  # fmt: skip
    assert len(seen) == 1 and (tmp_path / "cut").resolve() == version  # reused, not trained
    assert [h.reward for h in again.history] == pytest.approx([h.reward for h in whole.history])
    assert read_info(tmp_path / "cut").data["finished"] is True
    assert not (tmp_path / "cut" / RL_STATE_FILE).exists()


def test_rl_prompts_with_the_checkpoints_own_template(tmp_path, bench):
    """A checkpoint trained on another template (a released one's ``mplug_owl2``) is tuned on its own prompts."""
    model, tok, proc = tiny_random_model(0)
    one = write_checkpoint(tmp_path / "one-stage", model, tok, proc, {"mode": "one-stage", "template": "mplug_owl2"})
    examples = examples_from_records(bench.split("train")[:2], "one-stage")

    def reward(m, answers, example):
        return [float(a.ids[0] % 7) for a in answers], {}

    cfg = RLConfig(steps=1, images_per_step=1, group_size=2, max_new_tokens=2)  # its default template: v1
    finetune_checkpoint(one, tmp_path / "rl", examples, cfg, reward_fn=reward)
    info = read_info(tmp_path / "rl").data
    assert info["template"] == "mplug_owl2" and info["rl_config"]["template"] == "mplug_owl2"


def test_a_qscorer_opens_as_a_one_stage_rater_reporting_token_and_regression(tmp_path, bench, one_stage):
    spec = ScoreTokenSpec(n_bins=5, d_hidden=8)
    model, head, tok, proc = qscorer_from_checkpoint(one_stage, spec, seed=0)
    save_qscorer(tmp_path / "qs", model, head, tok, proc, spec)
    checkpoint = open_checkpoint(tmp_path / "qs", max_new_tokens=6)
    assert checkpoint.kind == "one-stage" and isinstance(checkpoint.rater, QScorerRater)
    records = bench.split("test")[:3]
    images = [r.image_path for r in records]
    ratings = checkpoint.rate(images)
    reference = load_qscorer(tmp_path / "qs", max_new_tokens=6).rate(images)
    for rating, q in zip(ratings, reference, strict=True):
        assert (rating.token, rating.bin, rating.emitted) == (q.token, q.bin, q.emitted)
        assert rating.regressed == pytest.approx(q.regressed, abs=1e-6)
        assert rating.token in spec.pieces and rating.answer == q.answer
    # the Q-Align reading: level words after the description, on the one-stage scoring prompt
    for rating, image in zip(ratings, images, strict=True):
        prompt = scoring_prompt(tok, get_template("v1"), "one-stage", rating.description)
        logits = score_prompts(checkpoint.model, tok, [prompt], checkpoint.pixels([image]))
        probs = torch.tensor(logits[0]).softmax(-1).numpy()
        assert rating.score == pytest.approx(float(probs @ np.array(LEVEL_WEIGHTS)), abs=1e-5)


@pytest.mark.slow
def test_the_main_jobs_per_checkpoint_analyses_run_on_a_qscorer(tmp_path, bench, one_stage):
    from mechbiqa.analysis.replication import grounding_per_image, rated_store, sampled_instability

    spec = ScoreTokenSpec(n_bins=5, d_hidden=8)
    model, head, tok, proc = qscorer_from_checkpoint(one_stage, spec, seed=0)
    save_qscorer(tmp_path / "qs", model, head, tok, proc, spec)
    checkpoint = open_checkpoint(tmp_path / "qs", max_new_tokens=6)
    records = bench.split("test")[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SRCC of 3 images may be undefined
        store = rated_store(checkpoint.rater, records, tmp_path / "qs.h5", "float32")
        summary, per_image = grounding_per_image(checkpoint.rater, records)
    assert Path(store).is_file() and per_image["ids"] == [r.id for r in records]
    assert summary["mode"] == "one-stage" and summary["rouge1_f1"] is not None
    # a user's annotations beside the benchmark's descriptions: the best reference counts
    own = references_with(records)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        same = grounding_per_image(checkpoint.rater, records, references=own)[0]
        more = grounding_per_image(checkpoint.rater, records, references=[(*r, "the image") for r in own])[0]
    assert same["rouge1_f1"] == pytest.approx(summary["rouge1_f1"])
    assert more["rouge1_f1"] >= summary["rouge1_f1"]
    assert isinstance(Checkpoint.from_rater(checkpoint.rater).rater, QScorerRater)
    inst = sampled_instability(checkpoint, records[:1])
    assert inst.levels.shape[-1] == 5  # 5 answers per image and session


def _close(value, expected) -> bool:
    """``value`` (None: undefined, as JSON stores NaN) equals ``expected`` (NaN: undefined)."""
    return math.isnan(expected) if value is None else value == pytest.approx(expected)


def test_train_companions_rates_the_pairs_test_images_and_reuses_its_work(tmp_path, bench, one_stage):
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "one-stage").symlink_to(one_stage)
    test = bench.split("test")
    rated = [r.id for r in test[::3][:6]]  # the pair rated 6; the companions rate 5 of them
    one = {"ids": rated, "scores": [0.2, 0.4, 0.5, 0.7, 0.9, 0.1],
           "labels": [bench.by_id[i].mos01 for i in rated]}  # fmt: skip
    (pair / "results.json").write_text(json.dumps({"one_stage": one}))
    (tmp_path / "notes.json").write_text(json.dumps({test[0].id: "Noise everywhere."}))
    settings = CompanionSettings(
        rl=RLConfig(steps=2, images_per_step=1, group_size=2, max_new_tokens=3),
        spec=ScoreTokenSpec(n_bins=5, d_hidden=8), qscorer=QScorerTrainConfig(steps=2, batch_size=2),
        compare_samples=3, max_new_tokens=4, annotations=(str(tmp_path / "notes.json"),),
        checkpoint_every=1, test_samples=5)  # fmt: skip
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        entries = train_companions(pair, bench.root, settings, progress=lambda n, r: seen.append(n))
    assert set(entries) == {"rl", "q_scorer"} and {"rl", "q_scorer", "one-stage"} <= set(seen)
    ids = entries["rl"]["ids"]
    assert len(ids) == 5 and [i for i in rated if i in ids] == ids  # the pair's images, in its order
    labels = [bench.by_id[i].mos01 for i in ids]
    one_scores = [one["scores"][rated.index(i)] for i in ids]
    for e in entries.values():
        assert e["ids"] == ids and e["labels"] == pytest.approx(labels)
        assert _close(e["srcc"], stats.spearmanr(e["scores"], labels)[0])
        hits = [lv == bench.by_id[i].level_word for lv, i in zip(e["levels"], ids, strict=True)]
        assert e["level_acc"] == pytest.approx(np.mean(hits))
        srcc = e["vs_one_stage"]["srcc"]
        expected = stats.spearmanr(e["scores"], labels)[0] - stats.spearmanr(one_scores, labels)[0]
        assert srcc["n"] == 5 and _close(srcc["difference"], expected)
        assert e["vs_one_stage"]["level_hit"]["n"] == 3
        assert read_info(e["path"]).data["parent"] == str(pair / "one-stage")
    q = entries["q_scorer"]
    assert len(q["regressed"]) == 5
    assert _close(q["srcc_regressed"], stats.spearmanr(q["regressed"], labels)[0])
    assert read_info(pair / "rl").data["rl_config"]["steps"] == 2
    seen.clear()
    again = train_companions(pair, bench.root, settings, progress=lambda n, r: seen.append(n))
    assert not seen and entries == again  # nothing trained or rated again

    payload = write_conversion_error({"one_stage": one, **entries}, tmp_path / "rep")
    mos = np.array(labels)
    restored = np.minimum(4, np.floor(mos * 5)) / 4
    assert payload["label_approximation"]["rmse"] == pytest.approx(math.sqrt(np.mean((restored - mos) ** 2)))
    for name, e in (("one_stage", {"scores": one_scores}), *entries.items()):
        rmse = math.sqrt(np.mean((np.array(e["scores"]) - mos) ** 2))
        assert payload["restoration"][name]["rmse"] == pytest.approx(rmse)
    assert payload["score_token"]["q_scorer_regressed"]["rmse"] == pytest.approx(
        math.sqrt(np.mean((np.array(q["regressed"]) - mos) ** 2)))
    assert json.loads((tmp_path / "rep" / "conversion_error.json").read_text())["n"] == 5  # images all rated
    assert (tmp_path / "rep" / "conversion_error.png").stat().st_size > 0

    results = {"one_stage": {"srcc": 0.5, "plcc": 0.4, "level_acc": 0.3}, **entries}
    console = Console(width=200, record=True)
    console.print(companion_table(results))
    console.print(conversion_error_table(payload))
    text = console.export_text()
    assert "RL (GRPO)" in text and "Q-Scorer" in text and "SRCC minus one-stage" in text
    assert f"{payload['label_approximation']['rmse']:.3f}" in text
    columns = companion_columns(results)
    assert set(columns) == {"one-stage", "RL (GRPO)", "Q-Scorer"} and "scores" not in columns["Q-Scorer"]
    assert columns["Q-Scorer"]["srcc_regressed"] == q["srcc_regressed"]


def test_companions_side_by_side_equal_one_after_the_other(tmp_path, bench, one_stage):
    """Two processes of one thread each (threads=2) train and rate as this process does on one thread."""
    settings = CompanionSettings.tiny()
    entries = {}
    for threads in (1, 2):
        pair = tmp_path / f"pair{threads}"
        pair.mkdir()
        (pair / "one-stage").symlink_to(one_stage)
        seen = []
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as each side-by-side process has
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                entries[threads] = train_companions(pair, bench.root, settings, threads=threads,
                                                    progress=lambda n, r: seen.append((n, r)))  # fmt: skip
        finally:
            torch.set_num_threads(before)
        ratings = [n for n, r in seen if r == "rating"]
        assert sorted(ratings) == ["one-stage", "q_scorer", "rl"]  # each rater announced, in this process
        assert {n for n, r in seen if r != "rating"} == {"rl", "q_scorer"}  # the training steps came back
    one, two = entries[1], entries[2]
    for name in ("rl", "q_scorer"):
        assert two[name]["ids"] == one[name]["ids"] and two[name]["levels"] == one[name]["levels"]
        assert two[name]["scores"] == pytest.approx(one[name]["scores"], abs=1e-6)
        assert two[name]["descriptions"] == one[name]["descriptions"]
        assert two[name]["vs_one_stage"]["level_hit"]["n"] == one[name]["vs_one_stage"]["level_hit"]["n"] == 2
    assert two["q_scorer"]["regressed"] == pytest.approx(one["q_scorer"]["regressed"], abs=1e-6)
