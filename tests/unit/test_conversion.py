"""Conversion error against hand computations and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mechbiqa.analysis.conversion import conversion_error, label_approximation, level_bins, restored_scores
from mechbiqa.data.records import level_word, level_word_edges
from mechbiqa.model.prompts import LEVEL_WORDS


def test_label_approximation_by_hand():
    mos = np.array([0.05, 0.3, 0.5, 0.79, 0.8, 1.0])
    assert level_bins(mos).tolist() == [0, 1, 2, 3, 4, 4]
    floor, restored = label_approximation(mos)
    assert restored.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert floor.rmse == pytest.approx(math.sqrt((0.05**2 + 0.05**2 + 0 + 0.04**2 + 0.2**2 + 0) / 6))
    centre, restored = label_approximation(mos, restore="centre")
    assert restored.tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 0.9])
    assert centre.rmse == pytest.approx(math.sqrt((0.05**2 + 0 + 0 + 0.09**2 + 0.1**2 + 0.1**2) / 6))
    assert floor.srcc == pytest.approx(stats.spearmanr(restored_scores(level_bins(mos)), mos)[0])


def test_bins_agree_with_the_level_word_rule():
    mos = np.random.default_rng(0).uniform(0, 1, 200)
    words = [level_word(m, level_word_edges(0.0, 1.0)) for m in mos]
    assert [LEVEL_WORDS[4 - b] for b in level_bins(mos)] == words


def test_uniform_mos_floor_matches_the_integral():
    # MOS uniform on bin k = [k/5, (k+1)/5) restored to k/4: mean squared error = integral over each bin
    mos = (np.arange(100_000) + 0.5) / 100_000
    floor, _ = label_approximation(mos)
    exact = sum(((k + 1) / 5 - k / 4) ** 3 - (k / 5 - k / 4) ** 3 for k in range(5)) / 3
    assert floor.rmse == pytest.approx(math.sqrt(exact), rel=1e-4)


def test_restoration_and_score_token_rows():
    mos = np.array([0.1, 0.4, 0.6, 0.9])
    qalign = np.array([0.2, 0.3, 0.7, 0.8])
    result = conversion_error(mos, qalign, regressed=mos + 0.01)
    assert result.restoration.rmse == pytest.approx(0.1)
    assert result.score_token.rmse == pytest.approx(0.01)
    assert result.restoration.plcc == pytest.approx(stats.pearsonr(qalign, mos)[0])
    d = result.to_dict()
    assert d["restoration_beyond_floor_rmse"] == pytest.approx(0.1 - result.label_approximation.rmse)
    assert set(d) >= {"label_approximation", "restoration", "score_token", "per_image"}
    with pytest.raises(ValueError, match="0-1"):
        level_bins(np.array([1.0, 4.0]))
