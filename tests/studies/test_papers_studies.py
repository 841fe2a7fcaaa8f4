"""studies/conversion_error.py end to end on the tiny random rater, with an untrained Q-Scorer beside it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from mechbiqa.analysis.conversion import label_approximation
from mechbiqa.data.records import IQARecord, records_to_jsonl
from mechbiqa.finetune_io import write_checkpoint
from mechbiqa.qscorer import ScoreTokenSpec, qscorer_from_checkpoint, save_qscorer
from mechbiqa.sources import tiny_random_model
from studies import conversion_error


def test_conversion_error_study(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i, mos in enumerate((1.2, 2.0, 3.1, 3.9, 4.8)):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (30, 32, 3), dtype=np.uint8)).save(path)
        records.append(IQARecord(id=f"im{i}", image_path=path, score=mos, scale=(1.0, 5.0)))
    records_to_jsonl(records, tmp_path / "rated.jsonl", relative_to=tmp_path)
    model, tok, proc = tiny_random_model(0)
    write_checkpoint(tmp_path / "one", model, tok, proc, {"mode": "one-stage", "template": "v1"})
    spec = ScoreTokenSpec(n_bins=5, d_hidden=8)
    save_qscorer(tmp_path / "qs", *qscorer_from_checkpoint(tmp_path / "one", spec), spec)  # untrained

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
