"""studies/train_rl.py, train_qscorer.py and conversion_error.py end to end on the tiny random model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from mechbiqa.analysis.conversion import label_approximation
from mechbiqa.data.records import IQARecord, records_to_jsonl
from mechbiqa.finetune_io import write_checkpoint
from mechbiqa.pipeline import OneStageRater, load_rater, read_info
from mechbiqa.qscorer import QScorerTrainConfig, ScoreTokenSpec
from mechbiqa.rl import RLConfig
from mechbiqa.sources import tiny_random_model
from studies import conversion_error, train_qscorer, train_rl


def test_conversion_error_study(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i, mos in enumerate((1.2, 2.0, 3.1, 3.9, 4.8)):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (30, 32, 3), dtype=np.uint8)).save(path)
        records.append(IQARecord(id=f"im{i}", image_path=path, score=mos, scale=(1.0, 5.0), level_word="fair",
                                 description="The image is sharp."))
    records_to_jsonl(records, tmp_path / "rated.jsonl", relative_to=tmp_path)
    model, tok, proc = tiny_random_model(0)
    write_checkpoint(tmp_path / "one", model, tok, proc, {"mode": "one-stage", "template": "v1"})
    dataset = str(tmp_path / "rated.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl = train_rl.main(train_rl.Config(init_from=str(tmp_path / "one"), out=str(tmp_path / "rl"),
                                           dataset=dataset, split=None,
                                           rl=RLConfig(steps=1, group_size=2, max_new_tokens=3)))
        history = train_qscorer.main(train_qscorer.Config(
            init_from=str(tmp_path / "one"), out=str(tmp_path / "qs"), dataset=dataset, split=None,
            spec=ScoreTokenSpec(n_bins=5, d_hidden=8), train=QScorerTrainConfig(steps=1, batch_size=2)))
    assert len(rl.history) == 1 and len(history) == 1
    assert read_info(tmp_path / "rl").data["rl_history"][0]["step"] == 1
    assert read_info(tmp_path / "qs").data["score_head"]["n_bins"] == 5
    assert isinstance(load_rater(tmp_path / "qs"), OneStageRater)  # a Q-Scorer is a one-stage checkpoint too
    assert isinstance(load_rater(tmp_path / "rl"), OneStageRater)

    cfg = conversion_error.Config.tiny(tmp_path, qscorer=str(tmp_path / "qs"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = conversion_error.main(cfg)
    data = json.loads(result.files["json"].read_text())
    mos = np.array([r.mos01 for r in records])
    assert data["label_approximation"]["rmse"] == pytest.approx(label_approximation(mos)[0].rmse)
    assert data["per_image"]["mos"] == pytest.approx(mos.tolist())
    assert data["restoration"]["n"] == 5 and data["score_token"]["n"] == 5
    assert all(0 <= s <= 1 for s in data["per_image"]["qalign"])
    assert result.files["figure"].stat().st_size > 0
    assert json.loads(result.files["config"].read_text())["qscorer"] == str(tmp_path / "qs")
