"""Attribution studies end to end on the tiny random model (warnings as errors): artefacts and checks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from mechbiqa.analysis.attribution_patching import correlation
from mechbiqa.analysis.dla import DLA_SPEC
from mechbiqa.sources import tiny_random_model
from mechbiqa.store import ActivationStore
from studies import attribution_patching, cache_activations, direct_logit_attribution, logit_lens, tuned_lens
from tests.studies.test_studies import check_files, make_images, rendered

STUDIES = {
    "direct_logit_attribution": (direct_logit_attribution, ("--store", "--direction", "--tiny-random")),
    "attribution_patching": (
        attribution_patching,
        ("--metric", "--reference", "--sites", "--validate-layers"),
    ),
    "tuned_lens": (tuned_lens, ("--store", "--steps", "--holdout")),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """``images/``, the default store ``tiny.h5`` and a float32 store of `DLA_SPEC`, ``dla.h5``."""
    root = tmp_path_factory.mktemp("attribution")
    make_images(root / "images")
    cache_activations.main(cache_activations.Config.tiny(root))
    cache_activations.main(
        cache_activations.Config.tiny(root, spec=DLA_SPEC, store_dtype="float32", out=str(root / "dla.h5"))
    )
    return root


def run(study, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return study.main(cfg)


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_help_lists_the_options(name, capsys):
    study, options = STUDIES[name]
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "Question" in text and "Method" in text
    for option in options:
        assert option in text


def test_direct_logit_attribution_live_and_from_the_store(tiny):
    live = run(direct_logit_attribution, direct_logit_attribution.Config.tiny(tiny))
    data = check_files(live, "direct_logit_attribution")
    totals = np.array([s["total"] for s in data["samples"]])
    targets = np.array([s["target"] for s in data["samples"]])
    assert data["checks"]["sum_error"] == pytest.approx(np.abs(totals - targets).max(), abs=1e-12)
    assert data["checks"]["sum_error"] < 1e-4 and np.abs(targets).max() > 1e-2
    assert data["checks"]["split_error"] < 1e-6 and len(data["top_image_tokens"][0]) == 2
    assert "instruction" in rendered(direct_logit_attribution, live)

    cfg = direct_logit_attribution.Config.tiny(tiny, store=str(tiny / "dla.h5"), out=str(tiny / "dla_store"))
    stored = run(direct_logit_attribution, cfg)
    assert json.loads(stored.files["json"].read_text())["checks"]["sum_error"] < 1e-4
    order = [stored.dla.sample_ids.index(s) for s in live.dla.sample_ids]  # the live run took the first 4
    np.testing.assert_allclose(stored.dla.heads[order], live.dla.heads, atol=1e-5)
    np.testing.assert_allclose(stored.dla.by_role[order], live.dla.by_role, atol=1e-5)
    np.testing.assert_allclose(stored.dla.target[order], live.dla.target, atol=1e-5)
    with pytest.raises(LookupError, match=r"attn\.hook_z@quality"):
        run(direct_logit_attribution, direct_logit_attribution.Config.tiny(tiny, store=str(tiny / "tiny.h5")))


def test_attribution_patching_checks_against_activation_patching(tiny):
    result = run(attribution_patching, attribution_patching.Config.tiny(tiny))
    data = check_files(result, "attribution_patching")
    corr = data["checks"]["corr_with_activation_patching"]
    for site in ("resid", "kv"):
        assert corr[site] == pytest.approx(correlation(result.estimate.site(site), result.actual[site]))
        assert corr[site] > 0.9  # measured 0.974 (resid), 0.997 (kv) on these images
        assert np.isfinite(result.actual[site]).all()
    assert 0 <= data["overlap_with_most_attended"] <= 1 and data["overlap_chance"] == pytest.approx(2 / 5)
    assert (np.array(data["source_of"]) != np.arange(4)).all()
    assert "corr. with act. patching" in rendered(attribution_patching, result)
    skipped = run(
        attribution_patching,
        attribution_patching.Config.tiny(tiny, validate_layers=(), reference="zero", out=str(tiny / "ap0")),
    )
    assert skipped.corr == {} and skipped.estimate.reference == "zero"


def test_tuned_lens_reports_held_out_kl_and_feeds_the_logit_lens(tiny):
    result = run(tuned_lens, tuned_lens.Config.tiny(tiny))
    data = check_files(result, "tuned_lens")
    kl_tuned, kl_logit = np.array(data["checks"]["kl_tuned"]), np.array(data["checks"]["kl_logit"])
    assert len(kl_tuned) == len(kl_logit) == 2 and data["n_train"] == 4 and data["n_heldout"] == 2
    assert kl_tuned[-1] == pytest.approx(0.0, abs=1e-7) and kl_tuned[0] < kl_logit[0]
    # the logit lens's held-out KL, by hand: the tiny model's norm and head on the stored residuals
    lens_cfg = json.loads(result.files["config"].read_text())
    model, _, _ = tiny_random_model(0)
    with ActivationStore.open(tiny / "tiny.h5") as store:
        rows = [store.index_of(i) for i in store.ids()]
        resid = store.get("llm.blocks.{l}.hook_resid_post", "quality", samples=rows)[:, :, 0]
    resid = resid[np.array(lens_cfg["heldout_samples"])].astype(np.float64)  # [sample, layer, d]
    w_norm = model.llm.ln_final.weight.detach().double().numpy()
    w_u = model.llm.unembed.weight.detach().double().numpy()
    logits = (resid / np.sqrt((resid**2).mean(-1, keepdims=True) + 1e-6) * w_norm) @ w_u.T
    final = log_softmax(logits[:, -1], -1)
    expected = [
        (softmax(logits[:, -1], -1) * (final - log_softmax(logits[:, i], -1))).sum(-1).mean()
        for i in range(2)
    ]
    np.testing.assert_allclose(kl_logit, expected, rtol=1e-3, atol=1e-6)
    assert "held-out" in rendered(tuned_lens, result)

    cfg = logit_lens.Config.tiny(
        tiny, tuned_lens=str(result.files["config"].parent), out=str(tiny / "ll_tuned")
    )
    read = run(logit_lens, cfg)
    assert read.lens.last_layer_error < 0.01 and read.lens.level_probs.shape[:2] == (2, 6)
    plain = run(logit_lens, logit_lens.Config.tiny(tiny, out=str(tiny / "ll_plain"))).lens
    np.testing.assert_allclose(
        read.lens.level_probs[-1], plain.level_probs[-1], atol=1e-6
    )  # last layer: identity
    assert (
        np.abs(read.lens.level_probs[0] - plain.level_probs[0]).max() > 1e-4
    )  # layer 0 read through its translator
