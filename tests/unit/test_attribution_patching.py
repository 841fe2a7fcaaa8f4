"""Attribution patching against activation patching (the patching sweep) on the tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechbiqa.analysis.attribution_patching import (
    activation_patching_grid,
    attribution_patching,
    correlation,
    farthest_reference,
    metric_of,
    top_overlap,
)
from mechbiqa.analysis.patching import Readout
from mechbiqa.analysis.scoring_batch import scoring_batch
from mechbiqa.scoring import level_ids
from mechbiqa.sources import tiny_random_model

SOURCE = torch.tensor([1, 2, 3, 0])


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, _ = tiny_random_model(0)
    g = torch.Generator().manual_seed(0)
    size = model.cfg.vision.image_size
    batch = scoring_batch(model, tokenizer, torch.randn(4, 3, size, size, generator=g))
    return model, batch, Readout(tuple(level_ids(tokenizer)))


def _both(model, batch, readout, positions, **kwargs):
    estimate = attribution_patching(
        model,
        batch.input_ids,
        batch.pixels,
        positions,
        readout,
        attention_mask=batch.attention_mask,
        **kwargs,
    )
    actual = activation_patching_grid(
        model,
        batch.input_ids,
        batch.pixels,
        positions,
        readout,
        estimate,
        attention_mask=batch.attention_mask,
    )
    return estimate, actual


@pytest.mark.parametrize("reference", ["zero", "source"])
def test_exact_where_the_metric_is_linear_in_the_patched_activation(setup, reference):
    """The logits are linear in the final norm's output: patching it there, the estimate is the effect."""
    model, batch, readout = setup
    estimate, actual = _both(
        model,
        batch,
        readout,
        batch.quality[:, None],
        reference=reference,
        source_of=SOURCE,
        sites={"final": ("llm.ln_final.hook_normalized",)},
        layers=[0],
    )
    assert np.abs(actual["final"]).max() > 1e-3  # the patch does something
    np.testing.assert_allclose(estimate.site("final"), actual["final"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("reference", "metric", "bars"),
    [  # measured on this model and these images: resid / kv correlations
        ("source", "logit_diff", {"resid": 0.9, "kv": 0.95}),  # measured 0.974 / 0.996
        ("source", "score", {"resid": 0.95, "kv": 0.95}),  # measured 0.992 / 0.997
        (
            "zero",
            "logit_diff",
            {"resid": 0.3, "kv": 0.9},
        ),  # measured 0.447 / 0.964: zeroing a residual is far
        ("zero", "score", {"resid": 0.6, "kv": 0.8}),  # measured 0.783 / 0.883
    ],
)
def test_correlates_with_activation_patching_over_every_image_position_and_layer(
    setup, reference, metric, bars
):
    model, batch, readout = setup
    estimate, actual = _both(
        model, batch, readout, batch.image_positions, reference=reference, metric=metric, source_of=SOURCE
    )
    assert estimate.site("resid").shape == (4, 2, model.cfg.n_image_tokens)
    for site, bar in bars.items():
        assert correlation(estimate.site(site), actual[site]) > bar, site
    # the clean metric is what the model reads
    with torch.no_grad():
        logits = model(batch.input_ids, images=batch.pixels, attention_mask=batch.attention_mask).logits[
            :, -1
        ]
    np.testing.assert_allclose(estimate.clean_metric, metric_of(logits, readout, metric).numpy(), rtol=1e-6)


def test_pattern_rows_and_kv_terms(setup):
    model, batch, readout = setup
    estimate = attribution_patching(
        model,
        batch.input_ids,
        batch.pixels,
        batch.image_positions,
        readout,
        keep_pattern=True,
        attention_mask=batch.attention_mask,
    )
    assert estimate.pattern.shape[:3] == (4, 2, 4)
    np.testing.assert_allclose(estimate.pattern.sum(-1), 1.0, atol=1e-5)
    k, v = estimate.sites["kv"]
    np.testing.assert_allclose(estimate.site("kv"), estimate.effects[k] + estimate.effects[v])
    assert estimate.importance("kv").shape == (4, model.cfg.n_image_tokens)


def test_helpers_and_refusals(setup):
    model, batch, readout = setup
    assert correlation(np.array([1.0, 2, 3]), np.array([2.0, 4, 7])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1]
    )
    assert np.isnan(correlation(np.ones(3), np.arange(3.0)))
    np.testing.assert_array_equal(farthest_reference(np.array([0.1, 0.5, 0.9, 0.2])), [2, 0, 0, 2])
    np.testing.assert_allclose(
        top_overlap(np.array([[0, 1], [2, 3]]), np.array([[1, 5], [4, 6]])), [0.5, 0.0]
    )
    with pytest.raises(ValueError, match="source_of"):
        attribution_patching(
            model, batch.input_ids, batch.pixels, batch.image_positions, readout, reference="source"
        )
    with pytest.raises(KeyError, match="not hooks"):
        attribution_patching(
            model, batch.input_ids, batch.pixels, batch.image_positions, readout, sites={"x": ("llm.nope",)}
        )


@pytest.mark.parametrize("reference", ["zero", "source"])
def test_chunks_give_the_same_estimate(setup, reference):
    """One image per forward/backward (the source images then come from a separate reference run)."""
    model, batch, readout = setup
    kwargs = dict(
        reference=reference, source_of=SOURCE, attention_mask=batch.attention_mask, keep_pattern=True
    )
    whole = attribution_patching(
        model, batch.input_ids, batch.pixels, batch.image_positions, readout, **kwargs
    )
    parts = attribution_patching(
        model, batch.input_ids, batch.pixels, batch.image_positions, readout, chunk=3, **kwargs
    )
    for template, grid in whole.effects.items():
        np.testing.assert_allclose(parts.effects[template], grid, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(parts.clean_metric, whole.clean_metric, rtol=1e-6)
    np.testing.assert_allclose(parts.pattern, whole.pattern, atol=1e-6)


def test_path_averaged_gradients_complete_the_whole_image_swap(setup):
    """Integrated gradients on the image rows tend to the effect of swapping the whole image.

    Summed over every image position of the residual entering layer 0 (the image rows themselves),
    the estimate tends to the model run with the reference image, closer with more steps; steps=1 is
    the plain estimate.
    """
    model, batch, readout = setup
    args = (model, batch.input_ids, batch.pixels, batch.image_positions, readout)
    kwargs = dict(
        reference="source",
        source_of=SOURCE,
        sites={"r": ("llm.blocks.{l}.hook_resid_pre",)},
        layers=[0],
        attention_mask=batch.attention_mask,
        metric="logit_diff",
    )
    with torch.no_grad():  # independent: each prompt read with its reference image
        swapped = model(
            batch.input_ids, images=batch.pixels[SOURCE], attention_mask=batch.attention_mask
        ).logits
    plain = attribution_patching(*args, **kwargs)
    whole = metric_of(swapped[:, -1], readout, "logit_diff").numpy() - plain.clean_metric
    errors = []
    for steps in (1, 2, 16):
        estimate = attribution_patching(*args, steps=steps, chunk=3, **kwargs)
        errors.append(np.abs(estimate.site("r")[:, 0].sum(-1) - whole).max())
        if steps == 1:
            np.testing.assert_allclose(estimate.site("r"), plain.site("r"), rtol=1e-5, atol=1e-7)
    # measured max |error| 3.8e-3, 1.9e-3, 2.3e-4 for a largest whole-swap effect of 9.8e-3
    assert (
        np.abs(whole).max() > 1e-3
        and errors[2] < errors[1] < errors[0]
        and errors[2] < 0.1 * np.abs(whole).max()
    )
    with pytest.raises(ValueError, match="steps=2"):
        attribution_patching(*args, steps=2, reference="zero")
