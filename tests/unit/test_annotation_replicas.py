"""Replicas of the public annotation layouts: how annotators conclude; two-stage refusing before stage 1."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa import train as T
from mechbiqa.data.annotations import read_annotations, split_verdict, verdict_level
from mechbiqa.model import ModelConfig, MPLUGOwl2

REASONING = "The sky is covered by strong noise. The edges of the trees are soft."
#: Last sentences seen in Q-Pathway / Q-Instruct answers, and the level each states (None: refused).
ENDINGS = {
    "Thus, the quality of the image is poor.": "poor",
    "Overall, the image quality is fair": "fair",
    "Therefore, the quality of this image is rather low.": "poor",
    "In conclusion, this is a good quality image.": "good",
    "All in all, this is a poor-quality image with good colours.": "poor",
    "Despite the poor lighting, the overall quality is good.": "good",
    "So the quality of the picture is very high!": "excellent",
    "Thus, the quality of the image is not good.": None,
    "Overall, the image isn't very good in quality.": None,
}


def _entry(root: Path, image: str, pixels: np.ndarray, id_: str, question: str, answer: str) -> dict:
    """Save ``pixels`` as ``root/image`` and return the release-layout entry of one question and its answer."""
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / image)
    return {"id": id_, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}  # fmt: skip


@pytest.fixture
def pathway_file(tmp_path) -> tuple[Path, Path]:
    """A LLaVA-layout Q-Pathway replica (``<image>`` first, nested folders) over small PNGs."""
    root, entries = tmp_path / "images", []
    for k, ending in enumerate(ENDINGS):
        name = f"livefb_liveitw_aigc/sub/{k:05d}.png"
        pixels = np.random.default_rng(k).integers(0, 255, (28, 28, 3), dtype=np.uint8)
        entries.append(_entry(root, name, pixels, f"qp{k}", "<image>\nDescribe the quality of this image in detail.",
                              f"{REASONING} {ending}"))  # fmt: skip
    path = tmp_path / "cleaned_labels.json"
    path.write_text(json.dumps(entries))
    return path, root


def test_each_ending_states_its_level_and_a_denied_level_is_named(pathway_file):
    found = read_annotations([pathway_file[0]], pathway_file[1])
    levels = {r.id: r.level_word for r in found.records}
    for k, (ending, level) in enumerate(ENDINGS.items()):
        assert levels.get(f"qp{k}") == level, ending
    rejected = {x.index: x.reason for x in found.rejected}
    assert set(rejected) == {k for k, level in enumerate(ENDINGS.values()) if level is None}
    assert "denies a level ('not good')" in rejected[7] and "denies a level" in rejected[8]
    # Stage 1 learns the reasoning without the verdict, whatever its wording.
    for r in found.records:
        assert r.description == REASONING
        assert split_verdict(r.meta["answer"])[0] == REASONING


def test_verdict_level_reads_the_phrase_that_qualifies_quality():
    assert verdict_level("The quality of the image is below average.") == ("poor", None)
    assert verdict_level("The quality is acceptable.") == ("fair", None)
    assert verdict_level("The image is not sharp, so the quality is poor.") == ("poor", None)
    assert verdict_level("The quality of the image is pristine.")[0] is None


def _tiny_model(tok) -> MPLUGOwl2:
    cfg = ModelConfig.tiny()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
    return T.init_weights(MPLUGOwl2(cfg), 0)


def test_two_stage_refuses_a_record_stage_two_cannot_use_before_stage_one_trains(pathway_file, tmp_path):
    records, _ = read_annotations([pathway_file[0]], pathway_file[1]).for_mode("two-stage")
    broken = [*records, dataclasses.replace(records[0], id="no-level", level_word=None)]
    tok = T.compact_tokenizer(records, vocab_size=300)
    cfg = dict(steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_samples=2, max_new_tokens=2)
    with pytest.raises(T.TrainingDataError, match="no-level"):
        T.train_two_stage(
            T.TrainConfig(mode="two-stage", stage=1, **cfg),
            T.TrainConfig(mode="two-stage", stage=2, **cfg),
            tmp_path / "pair",
            broken,
            model=_tiny_model(tok),
            tokenizer=tok,
        )
    assert not (tmp_path / "pair" / "stage1").exists()  # nothing trained, nothing saved as finished


def test_a_mixed_qalign_file_rates_each_entry_on_its_own_scale(tmp_path):
    """Bare image names in a file whose name names several datasets; folders that name none or two."""
    root = tmp_path / "images"
    entries = [  # (image, score, level, mos01 by hand on the source's own scale)
        ("10004473376.jpg", 77.3836, "good", 0.773836),  # KonIQ 0-100, by its file naming
        ("00001.jpg", 41.0, "fair", 0.41),  # SPAQ 0-100
        ("I01_01_05.png", 1.71, "bad", (1.71 - 1) / 4),  # KADID 1-5: 0.1775, not 0.0171
        ("spaq_koniq/00002.jpg", 70.0, "good", 0.70),  # Q-Instruct's two-dataset folder
        (
            "LIVE_Challenge/Images/10.bmp",
            80.0,
            "good",
            0.80,
        ),  # LIVE-C 0-100, higher is better (not LIVE's DMOS)
        ("agi-cgi/AttnGAN_normal_000.jpg", 1.2, "poor", 1.2 / 5),  # AGIQA-3k 0-5
        ("misc/photo.jpg", 55.0, "fair", None),  # no source: the level word, no score
        ("koniq/10004473377.jpg", float("nan"), "fair", None),  # "->nan" rates nothing
    ]
    data = []
    for k, (image, score, level, _) in enumerate(entries):
        data.append(_entry(root, image, np.full((8, 8, 3), 20 * k, dtype=np.uint8), f"{Path(image).name}->{score}",
                           "How would you rate the quality of this image?\n<|image|>",
                           f"The quality of the image is {level}."))  # fmt: skip
    path = tmp_path / "train_koniq_spaq_kadid.json"
    path.write_text(json.dumps(data))
    found = read_annotations([path], root)
    assert not found.rejected
    by_image = {r.image_path.relative_to(root).as_posix(): r for r in found.records}
    for image, _, level, mos01 in entries:
        record = by_image[image]
        assert record.level_word == level
        assert record.mos01 == (None if mos01 is None else pytest.approx(mos01)), image
    records, _ = found.for_mode("one-stage")
    assert len(T.examples_from_records(records, "one-stage")) == len(entries)


def test_a_q_instruct_conversation_takes_its_last_answer_that_states_a_level(tmp_path):
    root = tmp_path / "images"
    (root / "spaq_koniq").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "spaq_koniq" / "a.jpg")
    turns = [
        {"from": "human", "value": "<image>\nHow is the quality of this image?"},
        {"from": "gpt", "value": f"{REASONING} Thus, the quality of the image is poor."},
        {"from": "human", "value": "Is it of good quality?"},
        {"from": "gpt", "value": "No, the quality of this image is not good."},
        {"from": "human", "value": "What is in it?"},
        {"from": "gpt", "value": "A tree."},
    ]
    entries = [
        {"id": "qi", "image": "spaq_koniq/a.jpg", "conversations": turns},
        {"id": "two", "image": ["spaq_koniq/a.jpg", "spaq_koniq/a.jpg"], "conversations": turns},
    ]
    path = tmp_path / "q_instruct.json"
    path.write_text(json.dumps(entries))
    found = read_annotations([path], root)
    (record,) = found.records
    assert record.level_word == "poor" and record.description == REASONING
    assert [str(x) for x in found.rejected] == [
        "q_instruct.json[1]: 'image' lists 2 images; an entry trains one image"
    ]


def test_a_bom_a_test_file_and_too_few_images_are_named_before_training(pathway_file, tmp_path):
    from mechbiqa.data.annotations import AnnotationError
    from mechbiqa.train.pair import PairConfig, pair_data

    path, root = pathway_file
    entries = json.loads(path.read_text())
    bom = tmp_path / "windows.json"
    bom.write_text(json.dumps(entries), encoding="utf-8-sig")
    assert len(read_annotations([bom], root).records) == len(read_annotations([path], root).records)
    test_file = tmp_path / "test_mixed.json"
    test_file.write_text(json.dumps([{"img_path": entries[0]["image"], "gt_score": "2.5"}]))
    (bad,) = read_annotations([test_file], root).rejected
    assert "a test entry (image and gt_score, no conversations)" in bad.reason
    two = tmp_path / "two.json"
    two.write_text(json.dumps(entries[:2]))
    cfg = PairConfig(out_dir=tmp_path / "out", annotations=(str(two),), image_root=root, modes=("one-stage",))
    with pytest.raises(
        AnnotationError, match=r"2 image\(s\) usable .* too few to hold one out as the test set"
    ):
        pair_data(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything is written or trained


def test_a_two_stage_budget_too_small_is_refused_before_the_one_stage_run(pathway_file, tmp_path):
    from mechbiqa.train.pair import PairConfig, train_pair

    path, root = pathway_file
    cfg = PairConfig(
        out_dir=tmp_path / "out",
        annotations=(str(path),),
        image_root=root,
        total_steps=2,
        batch_size=2,
        image_size=28,
        vocab_size=300,
        eval_every=0,
        checkpoint_seconds=0.0,
    )
    with pytest.raises(ValueError, match="a two-stage budget needs at least 3 steps, got 2"):
        train_pair(cfg)
    assert not (tmp_path / "out" / "one-stage").exists()


def test_a_file_given_twice_is_read_once_and_wrong_paths_are_named(pathway_file, tmp_path):
    from mechbiqa.data.annotations import AnnotationError

    path, root = pathway_file
    once = read_annotations([path], root)
    twice = read_annotations([path, tmp_path / ".." / tmp_path.name / path.name], root)
    assert [r.id for r in twice.records] == [r.id for r in once.records] and twice.files == (path,)
    with pytest.raises(AnnotationError, match="is a folder, not a JSON file"):
        read_annotations([tmp_path], root)
    with pytest.raises(AnnotationError, match=r"image folder .*nope is not a folder.*--image-root"):
        read_annotations([path], tmp_path / "nope")
