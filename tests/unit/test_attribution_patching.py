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
    qk_fixed_kv_effect,
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
    ("reference", "metric", "bars", "fixed_bars"),
    [  # measured on this model and these images: resid / kv correlations, plain and with the QK fix
        # measured 0.974 / 0.996 and 0.988 / 1.000
        ("source", "logit_diff", {"resid": 0.9, "kv": 0.95}, {"resid": 0.97, "kv": 0.999}),
        # measured 0.992 / 0.997 and 0.995 / 1.000
        ("source", "score", {"resid": 0.95, "kv": 0.95}, {"resid": 0.99, "kv": 0.999}),
        # measured 0.447 / 0.964 (zeroing a residual is far) and 0.805 / 1.000
        ("zero", "logit_diff", {"resid": 0.3, "kv": 0.9}, {"resid": 0.75, "kv": 0.999}),
        # measured 0.783 / 0.883 and 0.945 / 1.000
        ("zero", "score", {"resid": 0.6, "kv": 0.8}, {"resid": 0.9, "kv": 0.999}),
    ],
)
def test_correlates_with_activation_patching_over_every_image_position_and_layer(
    setup, reference, metric, bars, fixed_bars
):
    model, batch, readout = setup
    estimate, actual = _both(
        model,
        batch,
        readout,
        batch.image_positions,
        reference=reference,
        metric=metric,
        source_of=SOURCE,
        qk_fix=False,
    )
    fixed = attribution_patching(
        model,
        batch.input_ids,
        batch.pixels,
        batch.image_positions,
        readout,
        attention_mask=batch.attention_mask,
        reference=reference,
        metric=metric,
        source_of=SOURCE,
    )
    assert estimate.site("resid").shape == fixed.site("resid").shape == (4, 2, model.cfg.n_image_tokens)
    for site, bar in bars.items():
        plain_r, fixed_r = (
            correlation(estimate.site(site), actual[site]),
            correlation(fixed.site(site), actual[site]),
        )
        assert plain_r > bar and fixed_r > fixed_bars[site] and fixed_r > plain_r, site
    # at the last layer a residual reaches the quality position only through that layer's keys and values:
    # patching it is patching them, and the fixed estimates agree as the effects do
    np.testing.assert_allclose(actual["resid"][:, -1], actual["kv"][:, -1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fixed.site("resid")[:, -1], fixed.site("kv")[:, -1], rtol=1e-5, atol=1e-7)
    gap = np.abs(estimate.site("resid")[:, -1] - estimate.site("kv")[:, -1]).max()
    assert gap > 0.05 * np.abs(actual["kv"][:, -1]).max()  # plain: they differ (the norm is linearised)
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


def _attention(q, k, v, key_mask, W):
    """A single causal attention layer (grouped keys, padded keys) read linearly: sum(W * z)."""
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / q.shape[-1] ** 0.5
    n = q.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & key_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
    return (W * z).sum((1, 2, 3)), scores


def test_qk_fix_is_exact_for_one_attention_layer_read_linearly():
    """Patching one key and value: the recomputed pattern gives the effect, where the gradient does not.

    Large scores saturate the softmax (weights within 1e-12 of 1 and 0), the plain gradient x difference
    misses most of the effect; the QK-fixed estimate equals the brute-force patched run.
    """
    g = torch.Generator().manual_seed(0)
    batch, n, heads, kv_heads, d, k = 2, 7, 4, 2, 5, 3
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
    q, key, value = (
        rand(batch, n, heads, d, scale=3),
        rand(batch, n, kv_heads, d, scale=3),
        rand(batch, n, kv_heads, d),
    )
    W = rand(batch, n, heads, d)
    key_mask = torch.ones(batch, n, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding
    positions = torch.tensor([[2, 4, 6], [2, 3, 5]])
    k_ref, v_ref = rand(batch, k, kv_heads, d, scale=3), rand(batch, k, kv_heads, d)
    clean, scores = _attention(q, key, value, key_mask, W)
    rows = torch.arange(batch)
    actual = torch.zeros(batch, k, dtype=torch.float64)
    for m in range(k):
        k2, v2 = key.clone(), value.clone()
        k2[rows, positions[:, m]], v2[rows, positions[:, m]] = k_ref[:, m], v_ref[:, m]
        actual[:, m] = _attention(q, k2, v2, key_mask, W)[0] - clean
    key_term, value_term = qk_fixed_kv_effect(q, key, value, scores, W, positions, k_ref, v_ref)
    np.testing.assert_allclose(key_term + value_term, actual, rtol=1e-9, atol=1e-12)
    # the plain estimate: gradient x difference at the keys and values
    k_leaf, v_leaf = key.clone().requires_grad_(), value.clone().requires_grad_()
    gk, gv = torch.autograd.grad(_attention(q, k_leaf, v_leaf, key_mask, W)[0].sum(), [k_leaf, v_leaf])
    plain = ((k_ref - key[rows[:, None], positions]) * gk[rows[:, None], positions]).sum((2, 3)) + (
        (v_ref - value[rows[:, None], positions]) * gv[rows[:, None], positions]
    ).sum((2, 3))
    assert (plain - actual).abs().max() > 1.0  # saturated: the linear estimate is far off
    # values alone: the pattern is unchanged, the value term is the gradient x difference
    none, alone = qk_fixed_kv_effect(q, key, value, scores, W, positions, None, v_ref)
    np.testing.assert_allclose(
        alone,
        ((v_ref - value[rows[:, None], positions]) * gv[rows[:, None], positions]).sum((2, 3)),
        rtol=1e-9,
    )
    assert (none == 0).all()


def test_qk_fix_does_not_depend_on_the_other_sites(setup):
    """A residual site alone gets the same QK-fixed estimate (its layer's keys and values are read anyway)."""
    model, batch, readout = setup
    args = (model, batch.input_ids, batch.pixels, batch.image_positions, readout)
    kwargs = dict(reference="source", source_of=SOURCE, attention_mask=batch.attention_mask)
    both = attribution_patching(*args, **kwargs)
    alone = attribution_patching(*args, sites=("resid",), chunk=3, **kwargs)
    np.testing.assert_allclose(alone.site("resid"), both.site("resid"), rtol=1e-4, atol=1e-8)
    plain = attribution_patching(*args, sites=("resid",), qk_fix=False, **kwargs)
    assert np.abs(plain.site("resid") - both.site("resid")).max() > 1e-4


def test_a_patched_residual_reaches_the_quality_position_through_its_later_keys_and_values(setup):
    """``resid_path='kv_sum'``: the residual estimate at layer l is the sum of the key-and-value estimates of
    layers l..last; its premise (activation patching's residual effect is the sum of its key-and-value effects
    over those layers) is checked on the model, and it tracks activation patching at least as well as the
    first-order path through the later layers."""
    model, batch, readout = setup
    summed, actual = _both(model, batch, readout, batch.image_positions, reference="source", source_of=SOURCE)
    linear = attribution_patching(model, batch.input_ids, batch.pixels, batch.image_positions, readout,
                                  attention_mask=batch.attention_mask, reference="source", source_of=SOURCE,
                                  resid_path="gradient")  # fmt: skip
    later_sum = lambda grid: np.flip(np.cumsum(np.flip(grid, 1), 1), 1)  # noqa: E731  [clean, layer, k]
    np.testing.assert_allclose(summed.site("resid"), later_sum(summed.site("kv")), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(summed.site("kv"), linear.site("kv"))  # only the residual site changes
    premise = correlation(later_sum(actual["kv"]), actual["resid"])
    assert premise > 0.99, premise
    r_sum, r_linear = correlation(summed.site("resid"), actual["resid"]), correlation(linear.site("resid"),
                                                                                      actual["resid"])
    assert r_sum > 0.97 and r_sum >= r_linear - 1e-3, (r_sum, r_linear)
    # a zero reference is not a trajectory the position follows: the option leaves that estimate alone
    zero = [attribution_patching(model, batch.input_ids, batch.pixels, batch.image_positions, readout,
                                 attention_mask=batch.attention_mask, reference="zero", resid_path=path)
            for path in ("kv_sum", "gradient")]  # fmt: skip
    np.testing.assert_array_equal(zero[0].site("resid"), zero[1].site("resid"))


def test_only_the_image_rows_build_a_graph_and_the_weights_keep_their_flags(setup):
    """The vision tower runs without a graph (at 7B its saved activations took gigabytes)."""
    model, batch, readout = setup
    seen = []
    handle = model.vision.register_forward_hook(lambda module, args, out: seen.append(out[0].requires_grad))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        estimate = attribution_patching(model, batch.input_ids, batch.pixels, batch.image_positions, readout,
                                        attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert all(np.isfinite(grid).all() for grid in estimate.effects.values())
