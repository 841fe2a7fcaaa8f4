"""IQARecord: normalisation to mos01, validation, JSON round trip; level-word bins."""

from __future__ import annotations

from pathlib import Path

import pytest

from mechbiqa.data.records import (
    IQARecord,
    level_word,
    level_word_edges,
    records_from_jsonl,
    records_to_jsonl,
)


def test_mos01_direction_and_clipping():
    mos = IQARecord(id="a", image_path="a.png", score=75.0, scale=(0, 100))
    dmos = IQARecord(id="b", image_path="b.png", score=0.2, scale=(0, 1), higher_is_better=False)
    out_of_range = IQARecord(id="c", image_path="c.png", score=104.0, scale=(0, 100), higher_is_better=False)
    assert mos.mos01 == pytest.approx(0.75) and mos.mos5 == pytest.approx(4.0)
    assert dmos.mos01 == pytest.approx(0.8)
    assert out_of_range.mos01 == 0.0
    assert IQARecord(id="d", image_path="d.png", score=None, scale=(0, 1)).mos01 is None


def test_validation_names_the_problem():
    with pytest.raises(ValueError, match="scale must be"):
        IQARecord(id="a", image_path="a.png", score=1.0, scale=(5, 1))
    with pytest.raises(ValueError, match="split 'training'"):
        IQARecord(id="a", image_path="a.png", score=1.0, scale=(1, 5), split="training")
    with pytest.raises(ValueError, match="level_word 'great'"):
        IQARecord(id="a", image_path="a.png", score=1.0, scale=(1, 5), level_word="great")
    with pytest.raises(ValueError, match="score is nan"):
        IQARecord(id="a", image_path="a.png", score=float("nan"), scale=(1, 5))


def test_records_are_immutable_and_round_trip(tmp_path):
    rec = IQARecord(
        id="x",
        image_path=tmp_path / "img" / "x.png",
        score=3.2,
        scale=(1, 5),
        split="test",
        distortion="jpeg",
        level=4,
        level_word="fair",
        description="Blocks.",
        params={"quality": 7},
        meta={"photo": "coffee"},
    )
    with pytest.raises((AttributeError, TypeError)):
        rec.score = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        rec.params["quality"] = 9  # type: ignore[index]
    records_to_jsonl([rec], tmp_path / "m.jsonl", relative_to=tmp_path)
    assert '"image_path": "img/x.png"' in (tmp_path / "m.jsonl").read_text()
    (back,) = records_from_jsonl(tmp_path / "m.jsonl", root=tmp_path)
    assert back == rec and back.image_path == tmp_path / "img" / "x.png"
    assert IQARecord.from_dict(rec.to_dict()).with_root(Path("/elsewhere")) == rec


def test_level_words_equal_width_bins():
    edges = level_word_edges(1.0, 6.0)
    assert edges == pytest.approx((2.0, 3.0, 4.0, 5.0))
    assert [level_word(s, edges) for s in (0.5, 1.0, 2.5, 3.0, 4.99, 5.0, 9.0)] == [
        "bad",
        "bad",
        "poor",
        "fair",
        "good",
        "excellent",
        "excellent",
    ]


def test_records_are_hashable():
    a = IQARecord(id="a", image_path="a.png", score=1.0, scale=(1, 5), meta={"k": 1})
    b = IQARecord(id="a", image_path="a.png", score=1.0, scale=(1, 5), meta={"k": 1})
    assert a == b and len({a, b}) == 1


def test_a_record_pickles_to_an_equal_read_only_record():
    """Records travel to side-by-side processes: pickled and back they are equal and still read-only."""
    import pickle
    from types import MappingProxyType

    record = IQARecord(dataset="koniq", id="826373.jpg", image_path="/data/826373.jpg", score=3.9, scale=(1, 5),
                       split="test", params={"blur": 0.5}, meta={"ref": "photo3"})  # fmt: skip
    back = pickle.loads(pickle.dumps(record))
    assert back == record and back.mos01 == record.mos01
    assert isinstance(back.params, MappingProxyType) and dict(back.meta) == {"ref": "photo3"}
