"""Score scales: one table; a Q-Align JSON that mixes datasets rates each entry on its own scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa.data.loaders import (
    DATASET_SCALES,
    DatasetFormatError,
    UnknownDatasetError,
    load_dataset,
    load_qalign_json,
    normalise,
    parse_scale,
)
from mechbiqa.data.scales import DatasetScale, resolve


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def _entry(image: str, score: float) -> dict:
    name = image.rsplit("/", 1)[-1]
    return {
        "id": f"{name}->{score}",
        "image": image,
        "conversations": [
            {"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
            {"from": "gpt", "value": "The quality of the image is fair."},
        ],
    }


# ----------------------------------------------------------------------------- the table
def test_normalise_matches_hand_computation():
    assert normalise(1.71, "kadid10k") == pytest.approx((1.71 - 1) / 4)
    assert normalise(77.38, "koniq") == pytest.approx(0.7738)  # alias
    assert normalise(68.75, "SPAQ") == pytest.approx(0.6875)
    assert normalise(0.2, "csiq") == pytest.approx(0.8)  # DMOS: lower is better
    assert normalise(30.0, "live") == pytest.approx(0.7)
    assert normalise(4.5, "TID2013") == pytest.approx(0.5)
    assert normalise(2.81, "agi-cgi") == pytest.approx(2.81 / 5)  # Q-Align's AGIQA-3k folder
    assert normalise(120.0, "livec") == 1.0 and normalise(120.0, "livec", clip=False) == pytest.approx(1.2)
    assert (
        resolve("KonIQ-10k") == "koniq10k" and resolve("LIVE Challenge") == "livec" and resolve("x") is None
    )


def test_unknown_dataset_is_one_clear_error():
    with pytest.raises(UnknownDatasetError) as info:
        normalise(3.0, "konqi")
    message = str(info.value)
    assert (
        "unknown dataset 'konqi'" in message and "koniq10k" in message and "--scale konqi=LOW,HIGH" in message
    )
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownDatasetError, match=r"unknown dataset 'kadid11k'.*'kadid10k'"):
        load_dataset("kadid11k", "/nowhere")


def test_parse_scale():
    assert parse_scale("cgi=0,5") == ("cgi", DatasetScale(0.0, 5.0))
    assert parse_scale("live = 0, 100, lower") == ("live", DatasetScale(0.0, 100.0, higher_is_better=False))
    for bad in ("cgi", "cgi=0", "cgi=a,b", "cgi=0,5,upward", "=0,5"):
        with pytest.raises(ValueError, match="NAME=LOW,HIGH"):
            parse_scale(bad)
    with pytest.raises(ValueError, match="low < high"):
        parse_scale("cgi=5,0")


# ----------------------------------------------------------------------------- mixed Q-Align files
def test_mixed_file_rates_each_entry_on_its_own_scale(tmp_path):
    images = ["koniq/6787512667.jpg", "spaq/04462.jpg", "kadid10k/I01_02_01.png"]
    scores = [77.38, 68.75, 1.71]
    for image in images:
        _image(tmp_path / image)
    path = tmp_path / "train_koniq_spaq_kadid.json"
    path.write_text(json.dumps([_entry(i, s) for i, s in zip(images, scores, strict=True)]))
    records = load_qalign_json(path, tmp_path)
    # by hand: (score - low) / (high - low) with KonIQ and SPAQ on 0-100, KADID on 1-5
    assert [r.mos01 for r in records] == pytest.approx([0.7738, 0.6875, 0.71 / 4])
    assert [r.dataset for r in records] == ["koniq10k", "spaq", "kadid10k"]
    assert [r.scale for r in records] == [(0.0, 100.0), (0.0, 100.0), (1.0, 5.0)]
    assert all(r.split == "train" for r in records)
    # the same entries in any order, or a file name naming only one dataset, change nothing
    path2 = tmp_path / "train_koniq.json"
    path2.write_text(json.dumps([_entry(i, s) for i, s in zip(images[::-1], scores[::-1], strict=True)]))
    assert [r.mos01 for r in load_qalign_json(path2, tmp_path)] == pytest.approx([0.71 / 4, 0.6875, 0.7738])
    for record in records:
        assert record.mos01 == pytest.approx(normalise(record.score, record.dataset))


def test_source_from_field_file_name_or_user_scale(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "cgi" / "b.png")
    entries = [
        {"image": "imgs/a.png", "gt_score": 2.0, "dataset": "KADID-10k"},  # an explicit field
        {"image": "cgi/b.png", "gt_score": 4.0},  # a source with no known scale
    ]
    mixed = tmp_path / "train_koniq_spaq.json"  # names two datasets: no single fallback
    mixed.write_text(json.dumps(entries))
    with pytest.raises(DatasetFormatError) as info:
        load_qalign_json(mixed, tmp_path)
    message = str(info.value)
    assert "1 of 2 entries" in message and "'cgi/b.png'" in message and "--scale cgi=LOW,HIGH" in message
    records = load_qalign_json(mixed, tmp_path, scales={"cgi": (0, 5)})
    assert [r.mos01 for r in records] == pytest.approx([0.25, 0.8])
    assert [r.dataset for r in records] == ["kadid10k", "cgi"]
    name, scale = parse_scale("cgi=0,10,lower")
    assert load_qalign_json(mixed, tmp_path, scales={name: scale})[1].mos01 == pytest.approx(0.6)
    # a user scale overrides the table for a known source, too
    assert load_qalign_json(mixed, tmp_path, scales={"kadid": (0, 4), "cgi": (0, 5)})[0].mos01 == 0.5
    # a file whose name names one dataset lends it to entries that name none
    _image(tmp_path / "c.png")
    single = tmp_path / "test_kadid.json"
    single.write_text(json.dumps([{"image": "c.png", "gt_score": 3.0}]))
    (record,) = load_qalign_json(single, tmp_path)
    assert record.mos01 == 0.5 and record.dataset == "kadid10k" and record.split == "test"


def test_test_jsons_folder_gives_the_test_split(tmp_path):
    folder = tmp_path / "test_jsons"
    _image(tmp_path / "livec" / "t1.bmp")
    folder.mkdir()
    (folder / "livec.json").write_text(json.dumps([{"img_path": "livec/t1.bmp", "gt_score": 63.9}]))
    (record,) = load_qalign_json(folder / "livec.json", tmp_path)
    assert record.split == "test" and record.mos01 == pytest.approx(0.639)


def test_loaders_read_the_table():
    import mechbiqa.data as data

    assert data.DATASET_SCALES is DATASET_SCALES and data.normalise is normalise
    assert DATASET_SCALES["kadid10k"].range == (1.0, 5.0) and not DATASET_SCALES["csiq"].higher_is_better
    with pytest.raises(TypeError):
        DATASET_SCALES["new"] = DatasetScale(0, 1)  # type: ignore[index]
