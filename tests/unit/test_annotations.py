"""Annotation files shaped like the public releases: verdicts split from reasoning, scales per source, bad entries named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa import train as T
from mechbiqa.data.annotations import (
    TWO_STAGE_NEEDS,
    AnnotationError,
    read_annotations,
    split_holdout,
    split_verdict,
)
from mechbiqa.data.records import IQARecord
from mechbiqa.model.prompts import get_template

HUMAN = {"from": "human", "value": "<image>\nDescribe the quality of this image and rate it."}


def pathway(reasoning: str, verdict: str) -> list[dict[str, str]]:
    return [HUMAN, {"from": "gpt", "value": f"{reasoning} {verdict}"}]


def qalign(level: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
            {"from": "gpt", "value": f"The quality of the image is {level}."}]


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A Q-Pathway-like file (with bad entries) and a mixed KonIQ + SPAQ + KADID Q-Align file, with images."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    names = ["spaq_koniq/a.jpg", "spaq_koniq/b.jpg", "livefb_liveitw_aigc/c.jpg", "spaq_koniq/d.jpg",
             "koniq/10004473376.jpg", "spaq/00001.png", "kadid10k/images/I01_01_05.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(root / name)
    q_pathway = [
        {"id": "a", "image": "spaq_koniq/a.jpg",
         "conversations": pathway("The image is blurry and strong noise covers the sky.",
                                  "Thus, the quality of the image is poor.")},
        {"id": "b", "image": "spaq_koniq/b.jpg",
         "conversations": [HUMAN, {"from": "gpt", "value": "Is it sharp? Yes."},
                           {"from": "human", "value": "And overall?"},
                           {"from": "gpt", "value": "The edges are crisp and colours are vivid. Overall, the "
                                                    "quality of this image is excellent."}]},
        {"id": "c-no-verdict", "image": "livefb_liveitw_aigc/c.jpg",
         "conversations": [HUMAN, {"from": "gpt", "value": "A dog runs on a beach."}]},
        {"id": "d-no-level", "image": "spaq_koniq/d.jpg",
         "conversations": pathway("Slight blur.", "Thus, the quality of the image is unusual.")},
        {"id": "e-missing", "image": "spaq_koniq/missing.jpg",
         "conversations": pathway("Sharp.", "Thus, the quality of the image is good.")},
        {"id": "f-text-only", "conversations": [{"from": "human", "value": "What is IQA?"},
                                                {"from": "gpt", "value": "Image quality assessment."}]},
        "not an entry",
    ]
    mixed = [
        {"id": "10004473376.jpg->77.3836", "image": "koniq/10004473376.jpg", "conversations": qalign("excellent")},
        {"id": "00001.png->50.0", "image": "spaq/00001.png", "conversations": qalign("fair")},
        {"id": "I01_01_05.png->1.71", "image": "kadid10k/images/I01_01_05.png", "conversations": qalign("bad")},
    ]
    out = {"pathway": tmp_path / "q_pathway.json", "mixed": tmp_path / "train_mixed.json", "root": root}
    out["pathway"].write_text(json.dumps(q_pathway))
    out["mixed"].write_text(json.dumps(mixed))
    return out


def test_split_verdict_cuts_the_last_quality_sentence():
    assert split_verdict("Noise everywhere. Thus, the quality of the image is poor.") == (
        "Noise everywhere.", "Thus, the quality of the image is poor.", "poor")
    assert split_verdict("The quality of the image is good.") == ("", "The quality of the image is good.", "good")
    assert split_verdict("The quality is poor due to blur. The sky is blue.") == (
        "The quality is poor due to blur. The sky is blue.", None, None)
    assert split_verdict("Fine. Thus, the quality of the image is unusual.")[1:] == (
        "Thus, the quality of the image is unusual.", None)


def test_entries_are_parsed_named_and_scaled_per_source(files):
    found = read_annotations([files["pathway"], files["mixed"]], files["root"])
    by_id = {r.id: r for r in found.records}
    assert sorted(by_id) == ["00001.png", "10004473376.jpg", "I01_01_05.png", "a", "b"]
    a = by_id["a"]
    assert a.description == "The image is blurry and strong noise covers the sky." and a.level_word == "poor"
    assert a.meta["answer"] == ("The image is blurry and strong noise covers the sky. "
                                "Thus, the quality of the image is poor.")
    assert by_id["b"].level_word == "excellent" and by_id["b"].description == "The edges are crisp and colours are vivid."
    # Each entry's scale is its own source's: KADID 1-5, KonIQ and SPAQ 0-100 (hand computed).
    assert by_id["I01_01_05.png"].mos01 == pytest.approx((1.71 - 1) / 4)  # 0.18, not 0.0171
    assert by_id["10004473376.jpg"].mos01 == pytest.approx(0.773836)
    assert by_id["00001.png"].mos01 == pytest.approx(0.5)
    assert by_id["I01_01_05.png"].description is None  # a verdict alone
    reasons = {str(x) for x in found.rejected}
    assert len(found.rejected) == 5
    assert any(r.startswith("q_pathway.json[2]: no answer ends with a verdict") for r in reasons)
    assert any(r.startswith("q_pathway.json[3]: the verdict 'Thus, the quality of the image is unusual.'")
               for r in reasons)
    assert any(r.startswith("q_pathway.json[4]: image not found") for r in reasons)
    assert any(r.startswith("q_pathway.json[5]: no image") for r in reasons)
    assert any(r.startswith("q_pathway.json[6]: not an object") for r in reasons)


def test_modes_take_what_they_can_and_two_stage_refuses_verdicts_alone(files):
    found = read_annotations([files["pathway"], files["mixed"]], files["root"])
    one, bad_one = found.for_mode("one-stage")
    assert len(one) == 5 and len(bad_one) == 5
    # With the Q-Pathway file, two-stage takes its reasoning and names every bare verdict it leaves out.
    two, bad_two = found.for_mode("two-stage")
    assert [r.id for r in two] == ["a", "b"] and len(bad_two) == 8
    assert {str(x) for x in bad_two} >= {f"train_mixed.json[{i}]: verdict without reasoning (Q-Align style): "
                                         "one-stage data only" for i in range(3)}
    # The mixed Q-Align file alone: two-stage refuses it, saying what it needs.
    alone = read_annotations([files["mixed"]], files["root"])
    with pytest.raises(AnnotationError, match="every usable answer is a verdict without reasoning") as err:
        alone.for_mode("two-stage")
    assert TWO_STAGE_NEEDS in str(err.value) and "train_mixed.json" in str(err.value)
    assert len(alone.for_mode("one-stage")[0]) == 3
    # A file that mixes reasoning with bare verdicts: the bare ones are named and left out.
    data = json.loads(files["pathway"].read_text())
    data.append({"id": "g", "image": "spaq_koniq/a.jpg", "conversations": qalign("good")})
    files["pathway"].write_text(json.dumps(data))
    two, bad_two = read_annotations([files["pathway"]], files["root"]).for_mode("two-stage")
    assert [r.id for r in two] == ["a", "b"]
    assert "q_pathway.json[7]: verdict without reasoning (Q-Align style): one-stage data only" in map(str, bad_two)


def test_each_mode_trains_on_its_part_of_the_answer(files):
    records, _ = read_annotations([files["pathway"], files["mixed"]], files["root"]).for_mode("one-stage")
    tok = T.compact_tokenizer(records, vocab_size=300)
    v1 = get_template("v1")

    def answer(task, record):
        (ex,) = T.examples_from_records([record], task)
        enc = T.encode_example(tok, v1, task, ex)
        return tok.decode([i for i, label in zip(enc.ids, enc.labels, strict=True) if label != T.IGNORE_INDEX])

    a = next(r for r in records if r.id == "a")
    one, stage1, stage2 = answer("one-stage", a), answer("stage1", a), answer("stage2", a)
    assert one.startswith("The image is blurry") and "Thus, the quality of the image is poor." in one
    assert stage1.startswith("The image is blurry") and "quality" not in stage1  # no verdict in stage 1
    assert stage2.startswith("The quality of the image is poor.")
    (ex,) = T.examples_from_records([a], "stage2")
    assert ex.image is not None and T.encode_example(tok, v1, "stage2", ex).n_images == 0  # text only
    kadid = next(r for r in records if r.id == "I01_01_05.png")
    assert answer("one-stage", kadid).startswith("The quality of the image is bad.")
    with pytest.raises(T.TrainingDataError, match="empty description"):
        T.examples_from_records([kadid], "stage1")


def test_a_rated_dataset_gives_the_level_and_score(files):
    rated = IQARecord(id="a", image_path=Path("/elsewhere/a.jpg"), score=4.6, scale=(1.0, 5.0), dataset="kadid10k")
    records, _ = read_annotations([files["pathway"]], files["root"], scores=[rated]).for_mode("one-stage")
    a = next(r for r in records if r.id == "a")
    # MOS 4.6 on 1-5 is 0.9: the top of five equal bins, excellent (the verdict said poor).
    assert a.mos01 == pytest.approx(0.9) and a.level_word == "excellent" and a.meta["verdict_level"] == "poor"
    assert a.meta["answer"].endswith("The quality of the image is excellent.") and a.meta["level_source"] == "mos"


def test_holdout_keeps_images_whole_and_validates_on_training_images(tmp_path):
    records = [IQARecord(id=f"{i}-{k}", image_path=tmp_path / f"{i}.png", score=None, scale=(0, 1),
                         level_word="good", description="x") for i in range(40) for k in range(2)]
    train, val, test = split_holdout(records, seed=3, test_fraction=0.1, val_fraction=0.1)
    parts = [{r.image_path for r in part} for part in (train, val, test)]
    assert len(parts[2]) == 4 and len(parts[1]) == 4 and len(parts[0]) == 32
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(train) + len(val) + len(test) == 80 and {r.split for r in val} == {"val"}


def test_split_answer_cuts_the_verdict_a_q_pathway_tuned_model_writes_itself():
    """A generated answer that ends with its own verdict sentence: the description stops before it."""
    from mechbiqa.pipeline import split_answer

    assert split_answer("Noisy, and the details are lost. Thus, the quality of the image is poor.") == (
        "Noisy, and the details are lost.",
        "poor",
    )
    # the compact model's answers keep the fixed prefix rule; an answer with no verdict stays whole
    assert split_answer("Sharp picture. The quality of the image is good. Thus it is fair.") == ("Sharp picture.", "good")
    assert split_answer("Slight blur on the left") == ("Slight blur on the left", None)
    # a verdict without a level word is still not part of the description
    assert split_answer("Blurry. Overall, the quality of this image is unusual.") == ("Blurry.", None)
