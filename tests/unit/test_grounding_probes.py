"""Grounding (forced agreement, severity lexicon), ROUGE-1 vs the library, ridge probes, the score head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechbiqa.analysis.grounding import SeverityLexicon, grounding, level_index
from mechbiqa.analysis.probes import (
    RidgeConfig,
    ScoreHead,
    ScoreHeadConfig,
    compare_scorers,
    group_folds,
    lens_score_curve,
    probe_layers,
    ridge_cv,
    ridge_predictions,
    train_score_head,
)
from mechbiqa.analysis.rouge import references_for, rouge1
from mechbiqa.data.descriptions import all_descriptions, severity
from mechbiqa.data.distortions import DISTORTIONS
from mechbiqa.metrics import srcc
from mechbiqa.model.prompts import LEVEL_WORDS


def _probs(rng: np.random.Generator, n: int) -> np.ndarray:
    logits = rng.normal(size=(n, 5)) * 2
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


# ------------------------------------------------------------------------------------------ grounding
def test_contradiction_rate_is_0_when_the_text_path_agrees_and_1_when_it_disagrees():
    rng = np.random.default_rng(0)
    image = _probs(rng, 40)
    descriptions = ["The image has slight blur, so edges look soft."] * 40
    agree = grounding(image, image.copy(), descriptions)
    assert agree.contradiction_rate == 0.0 and agree.mean_level_gap == 0.0
    assert agree.agreement_srcc == pytest.approx(1.0)
    assert np.array_equal(np.diag(agree.confusion), np.bincount(image.argmax(1), minlength=5))
    # Forced to disagree: every text-path level moved by one (bad wraps to excellent).
    disagree = grounding(image, np.roll(image, 1, axis=1), descriptions)
    assert disagree.contradiction_rate == 1.0 and disagree.contradiction.all()
    assert np.trace(disagree.confusion) == 0
    # A one-level shift of a graded path counts too ("by a level or more").
    text = np.eye(5)[np.clip(image.argmax(1) + 1, 0, 4)]
    text[image.argmax(1) == 4] = np.eye(5)[3]
    assert grounding(image, text, descriptions).contradiction_rate == 1.0


def test_description_verdict_conflicts_are_counted_both_ways():
    descriptions = [
        "There is severe motion blur across the picture, and long streaks wipe out the detail.",  # severe
        "Heavy JPEG compression: the image breaks into blocks and colors smear.",  # severe
        "The photo is clean and sharp, with natural colors and fine detail intact.",  # clean
        "Faint random noise: a light grain covers the image.",  # clean (severity 0 adjective)
        "The image has moderate blur, so edges look soft and fine texture is lost.",  # mild
        "A photo of a cat.",  # unknown
    ]
    final = [level_index(w) for w in ("good", "bad", "poor", "excellent", "bad", "good")]
    probs = np.eye(5)[final]
    result = grounding(probs, probs, descriptions, final_levels=final)
    assert result.severity == ("severe", "severe", "clean", "clean", "mild", "unknown")
    assert result.conflict == ("severe->good", "", "clean->bad", "", "", "")
    assert result.conflict_rate == pytest.approx(2 / 6)
    assert result.severe_to_good_rate == 0.5 and result.clean_to_bad_rate == 0.5
    summary = result.summary()
    assert summary["n_severe_to_good"] == 1 and summary["n_clean_to_bad"] == 1
    assert len(result.to_dict()["per_image"]) == 6


def test_severity_lexicon_reads_every_phrasing_of_the_benchmark_describer():
    lexicon = SeverityLexicon()
    checked = 0
    for name in DISTORTIONS:
        for level in range(1, 6):
            want = severity(name, level)
            expected = "severe" if want >= 3 else "clean" if want == 0 else "mild"
            for text in all_descriptions(name, level):
                assert lexicon.level(text) == want, text
                assert lexicon.classify(text) == expected, text
                checked += 1
    for text in all_descriptions(None, 0):
        assert lexicon.classify(text) == "clean", text
    assert checked > 1000
    # The adjective must qualify a degradation noun: "too strong" in an effect clause is no severity.
    assert lexicon.level("colors bleed across edges and look too strong.") is None


def test_grounding_refuses_malformed_inputs_by_name():
    image = np.full((3, 5), 0.2)
    with pytest.raises(ValueError, match="text_probs has 2 rows"):
        grounding(image, image[:2], ["a"] * 3)
    with pytest.raises(ValueError, match="probability vectors"):
        grounding(image, image * 2, ["a"] * 3)
    with pytest.raises(ValueError, match=r"\[image, 5\]"):
        grounding(image[:, :3], image, ["a"] * 3)
    with pytest.raises(ValueError, match="not a level word"):
        level_index("average")
    assert LEVEL_WORDS[level_index(" Good ")] == "good"


# ------------------------------------------------------------------------------------------ ROUGE-1
def test_rouge1_equals_the_library_on_known_strings():
    from rouge_score import rouge_scorer

    pairs = [
        ("the cat sat on the mat", "the cat is on the mat"),
        (
            "Severe blur: shapes melt together.",
            "There is severe blur across the picture, and shapes melt together.",
        ),
        ("blurred edges", "blurring edge"),
        ("", "a clean image"),
        ("JPEG2000 compression, heavy ringing!", "jpeg2000 compression with ringing"),
    ]
    predictions, references = zip(*pairs, strict=True)
    for stem in (True, False):
        ours = rouge1(list(predictions), list(references), ids=[f"i{k}" for k in range(5)], use_stemmer=stem)
        scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)
        for k, (pred, ref) in enumerate(pairs):
            ref_score = scorer.score(ref, pred)["rouge1"]  # rouge-score's argument order: target, prediction
            assert ours.precision[k] == ref_score.precision
            assert ours.recall[k] == ref_score.recall
            assert ours.f1[k] == ref_score.fmeasure
        assert ours.mean_f1 == pytest.approx(np.mean(ours.f1))
    # Hand values: 5 of 6 unigrams shared ("the" twice); stemming joins blurred/blurring and edges/edge.
    assert rouge1(["the cat sat on the mat"], ["the cat is on the mat"]).f1[0] == pytest.approx(5 / 6)
    assert rouge1(["blurred edges"], ["blurring edge"], use_stemmer=True).f1[0] == pytest.approx(1.0)
    assert rouge1(["blurred edges"], ["blurring edge"], use_stemmer=False).f1[0] == 0.0


def test_rouge1_takes_the_best_of_several_references_and_checks_lengths():
    result = rouge1(["strong noise hides detail"], [["a clean picture", "strong noise hides fine detail"]])
    assert result.f1[0] == pytest.approx(2 * 1.0 * 0.8 / 1.8) and result.n_references[0] == 2
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge1(["a", "b"], ["a"])
    with pytest.raises(KeyError, match="no reference description"):
        references_for(["x.png", "y.png"], {"x.png": "clean"})
    assert rouge1(["a"], ["a"]).to_dict()["per_image"][0]["f1"] == 1.0


# ------------------------------------------------------------------------------------------ ridge probes
def test_group_folds_keep_photos_together_and_balance_sizes():
    groups = np.repeat(["p0", "p1", "p2", "p3", "p4", "p5", "p6"], [30, 10, 10, 10, 20, 5, 15])
    folds = group_folds(groups, 3)
    tests = [t for _, t in folds]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(groups)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    assert max(len(t) for t in tests) - min(len(t) for t in tests) <= 10
    with pytest.raises(ValueError, match="cannot make 8 folds from 7 groups"):
        group_folds(groups, 8)


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)])  # primal (n > d) and dual (n <= d) branches
def test_ridge_predictions_equal_the_closed_form(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + 2
    y, test = rng.normal(size=n), rng.normal(size=(7, d))
    mean, std = x.mean(0), x.std(0)
    z, zt = (x - mean) / std, (test - mean) / std
    got = ridge_predictions(x, y, test, [0.01, 1.0])
    for row, alpha in zip(got, (0.01, 1.0), strict=True):
        w = np.linalg.solve(z.T @ z + alpha * n * np.eye(d), z.T @ (y - y.mean()))
        np.testing.assert_allclose(row, y.mean() + zt @ w, atol=1e-9)


def _planted(seed: int = 0, n_photos: int = 12, per_photo: int = 20, n_layers: int = 4, d: int = 48):
    """Residuals where MOS is a linear read-out of layer 2 only (plus noise), photo offsets everywhere."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"photo{i}" for i in range(n_photos)], per_photo)
    n = len(groups)
    resid = rng.normal(size=(n, n_layers, d))
    resid += rng.normal(size=(n_photos, 1, d)).repeat(per_photo, 0) * 0.5  # content: per-photo offsets
    signal = resid[:, 2] @ rng.normal(size=d)
    mos = 0.5 + 0.15 * (signal - signal.mean()) / signal.std() + 0.03 * rng.normal(size=n)
    return resid, mos, groups


def test_probe_recovers_a_planted_linear_signal_and_finds_none_in_shuffled_labels():
    resid, mos, groups = _planted()
    cfg = RidgeConfig(n_splits=4, inner_splits=3)
    curve = probe_layers(resid, mos, groups, cfg, layers=[0, 1, 2, 3], n_shuffles=1)
    assert curve.best_layer == 2 and curve.decodable_layer() == 2
    assert curve.srcc[2] > 0.85 and curve.pooled_srcc[2] > 0.85
    assert np.all(np.abs(np.delete(curve.srcc, 2)) < 0.35)
    assert abs(curve.control_srcc[2]) < 0.3
    assert curve.alphas.shape == (4, 4) and curve.predictions.shape == (4, len(mos))
    shuffled = probe_layers(resid, np.random.default_rng(1).permutation(mos), groups, cfg)
    assert np.all(np.abs(shuffled.srcc) < 0.3) and shuffled.decodable_layer() in (None, 0, 1, 2, 3)
    # The store's quality selection keeps a length-1 position axis: accepted as is.
    again = probe_layers(resid[:, :, None, :], mos, groups, cfg)
    np.testing.assert_allclose(again.srcc, curve.srcc)


def test_ridge_cv_refuses_nan_labels_and_a_single_photo():
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="NaN"):
        ridge_cv(x, np.r_[np.nan, np.ones(19)], np.arange(20) % 4)
    with pytest.raises(ValueError, match="cannot make 5 folds from 1 groups"):
        ridge_cv(x, np.arange(20.0), np.zeros(20))


def test_lens_score_curve_reads_the_qalign_score_per_layer():
    mos = np.linspace(0, 1, 30)
    perfect = np.eye(5)[np.clip(((1 - mos) * 4.99).astype(int), 0, 4)] * 0.9 + 0.02
    flat = np.full((30, 5), 0.2)
    flat[:, 0] += np.random.default_rng(0).normal(size=30) * 0.01
    flat /= flat.sum(1, keepdims=True)
    curve = lens_score_curve(np.stack([flat, perfect]), mos)
    assert abs(curve[0]) < 0.5 and curve[1] > 0.95
    grouped = lens_score_curve(np.stack([flat, perfect]), mos, np.arange(30) // 5, 3)
    assert grouped[1] > 0.9


# ------------------------------------------------------------------------------------------ score head
def test_score_head_overfits_a_tiny_set():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)), rng.uniform(size=16)
    head = train_score_head(
        x, y, ScoreHeadConfig(hidden=32, dropout=0.0, lr=1e-2, epochs=300, batch_size=16), layer=3
    )
    pred = head.predict(x)
    assert np.mean((pred - y) ** 2) < 1e-3 and srcc(pred, y) > 0.98
    assert head.meta["history"][-1]["train_mse"] < head.meta["history"][0]["train_mse"] / 20
    assert head.hook == "llm.blocks.3.hook_resid_post"


def test_score_head_is_deterministic_by_seed_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.uniform(size=40)
    cfg = ScoreHeadConfig(hidden=8, epochs=5, batch_size=8, seed=3)
    state = torch.get_rng_state()
    a, b = train_score_head(x, y, cfg, layer=1), train_score_head(x, y, cfg, layer=1)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    other = train_score_head(x, y, ScoreHeadConfig(hidden=8, epochs=5, batch_size=8, seed=4), layer=1)
    assert not np.allclose(other.predict(x), a.predict(x))
    a.save(tmp_path / "head")
    loaded = ScoreHead.load(tmp_path / "head")
    assert loaded.config == cfg and loaded.layer == 1 and loaded.d_model == 6
    np.testing.assert_array_equal(loaded.predict(x), a.predict(x))
    assert (tmp_path / "head" / "score_head.json").is_file()
    with pytest.raises(FileNotFoundError, match="not a saved ScoreHead"):
        ScoreHead.load(tmp_path)
    with pytest.raises(ValueError, match=r"\[sample, 6\]"):
        a.predict(x[:, :4])


def test_score_head_generalises_to_held_out_photos_of_a_nonlinear_signal():
    # MOS depends non-linearly on two directions; photos add content offsets in every direction.
    rng = np.random.default_rng(2)
    n_photos, per_photo, d = 16, 24, 16
    groups = np.repeat(np.arange(n_photos).astype(str), per_photo)
    x = rng.normal(size=(n_photos * per_photo, d)) + rng.normal(size=(n_photos, d)).repeat(per_photo, 0)
    mos = 1 / (1 + np.exp(-2 * x[:, 0])) * (0.6 + 0.4 * np.tanh(x[:, 1])) + 0.02 * rng.normal(size=len(x))
    train = np.isin(groups, [str(i) for i in range(10)])
    val = np.isin(groups, ["10", "11"])
    test = ~train & ~val
    comparison, head = compare_scorers(
        x, mos, groups, train, test, layer=0, val=val, head_cfg=ScoreHeadConfig(epochs=150, hidden=32)
    )
    assert comparison.n_eval == 4 * per_photo and set(comparison.metrics) == {"mlp_head", "ridge"}
    assert comparison.metrics["mlp_head"]["srcc"] > 0.8
    assert 0 <= head.meta["best_epoch"] < 150
    with pytest.raises(ValueError, match="share reference photos"):
        compare_scorers(x, mos, groups, train, train, layer=0)
