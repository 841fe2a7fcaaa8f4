"""Direct logit attribution on tiny models: parts sum to the decision, a head's source split to the head."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mechbiqa.analysis.dla import (
    SOURCE_ROLES,
    ReadoutWeights,
    decompose,
    direction_coefficients,
    dla_live,
)
from mechbiqa.analysis.scoring_batch import scoring_batch
from mechbiqa.model.config import ModelConfig
from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS
from mechbiqa.model.roles import Role
from mechbiqa.scoring import level_ids
from mechbiqa.sources import seeded_model, tiny_random_model
from mechbiqa_hooks import names
from tests.conftest import randomize_


def _gqa_model():
    """The tiny random model with grouped-query attention (4 query heads share 2 key/value heads)."""
    model, tokenizer, processor = tiny_random_model(0)
    cfg = model.cfg
    cfg = replace(cfg, llm=replace(cfg.llm, n_kv_heads=2))
    return randomize_(seeded_model(cfg, 0), seed=3).eval(), tokenizer, processor


@pytest.fixture(scope="module", params=["mha", "gqa"])
def setup(request):
    model, tokenizer, processor = tiny_random_model(0) if request.param == "mha" else _gqa_model()
    g = torch.Generator().manual_seed(0)
    size = model.cfg.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=g)
    return model, tokenizer, scoring_batch(model, tokenizer, pixels)


@pytest.mark.parametrize("direction", ["logit_diff", "score", "score_gradient"])
def test_parts_sum_to_the_decision_read_from_the_logits(setup, direction):
    model, tokenizer, batch = setup
    ids = level_ids(tokenizer)
    result = dla_live(model, batch, ids, direction)
    # independent: the model's own logits at the quality position, combined by hand
    with torch.no_grad():
        logits = model(batch.input_ids, images=batch.pixels, attention_mask=batch.attention_mask).logits
    level = logits[torch.arange(3), batch.quality][:, ids].double()
    if direction == "logit_diff":
        expected = level[:, LEVEL_WORDS.index("good")] - level[:, LEVEL_WORDS.index("poor")]
    elif direction == "score":
        w = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)
        expected = (level * (w - w.mean())).sum(-1)
    else:  # d score / d logits, by autograd
        z = level.clone().requires_grad_(True)
        w = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)
        (grad,) = torch.autograd.grad((z.softmax(-1) @ w).sum(), z)
        expected = (grad * level).sum(-1)
    np.testing.assert_allclose(result.total, expected.numpy(), atol=1e-4)
    assert result.sum_error < 1e-4 and np.abs(expected.numpy()).max() > 1e-3
    assert result.heads.shape == (3, 2, 4) and result.mlp.shape == (3, 2)


def test_source_split_of_one_head_sums_to_that_heads_output(setup):
    """Keep only head h's z (the others zeroed): the layer's attention output is head h's write."""
    model, tokenizer, batch = setup
    ids = level_ids(tokenizer)
    result = dla_live(model, batch, ids, "logit_diff")
    weights = ReadoutWeights.from_model(model, ids)
    layer, head = 1, 2
    kept: dict[str, torch.Tensor] = {}

    def only_head(z, hook):  # [batch, pos, head, d_head]
        out = torch.zeros_like(z)
        out[:, :, head] = z[:, :, head]
        return out

    def keep(x, hook):
        kept[hook.name] = x

    hooks = [
        (names.attn(layer, "z"), only_head),
        (names.attn_out(layer), keep),
        ("llm.ln_final.hook_scale", keep),
    ]
    with torch.no_grad():
        model.run_with_hooks(
            batch.input_ids, images=batch.pixels, attention_mask=batch.attention_mask, fwd_hooks=hooks
        )
    # the scale of the clean run (frozen): recompute it from a clean forward
    _, cache = model.run_with_cache(
        batch.input_ids,
        images=batch.pixels,
        attention_mask=batch.attention_mask,
        names_filter=lambda n: n == "llm.ln_final.hook_scale",
    )
    rows = torch.arange(3)
    scale = cache["llm.ln_final.hook_scale"][rows, batch.quality, 0].double()
    c = direction_coefficients("logit_diff", torch.zeros(3, 5))
    u = (c @ weights.w_levels) * weights.ln_final * scale[:, None]
    head_out = (kept[names.attn_out(layer)][rows, batch.quality].double() * u).sum(-1)
    np.testing.assert_allclose(result.heads[:, layer, head], head_out.numpy(), atol=1e-5)
    np.testing.assert_allclose(result.by_role[:, layer, head].sum(-1), head_out.numpy(), atol=1e-5)
    assert result.split_error < 1e-6
    # the image tokens' share equals the image role's, and padding gets nothing
    image_role = SOURCE_ROLES.index(Role.IMAGE)
    np.testing.assert_allclose(result.image.sum(-1), result.by_role[..., image_role].sum(2), atol=1e-8)


def test_decompose_by_hand():
    """One layer, one head, d_model 2: every number checked by hand."""
    weights = ReadoutWeights(
        w_o=(torch.eye(2, dtype=torch.float64).reshape(2, 1, 2),),  # one layer: [d_model, head, d_head]
        ln_final=torch.tensor([2.0, 1.0], dtype=torch.float64),
        eps=1e-6,
        w_levels=torch.tensor([[0, 0], [1, 0], [0, 0], [0, 1], [0, 0]], dtype=torch.float64),
        n_kv_heads=1,
        level_ids=(0, 1, 2, 3, 4),
    )
    c = direction_coefficients("logit_diff", torch.zeros(1, 5))  # good - poor: direction (1, -1)
    pattern = torch.tensor([[[[0.25, 0.75]]]], dtype=torch.float64)  # [sample, layer, head, key]
    v = torch.tensor([[[[[1.0, 0.0]], [[0.0, 2.0]]]]], dtype=torch.float64)  # [sample, layer, key, kv, d]
    z = torch.einsum("slhk,slkhe->slhe", pattern, v)
    out = decompose(
        weights,
        c,
        torch.tensor([[1.0, 1.0]]),
        z,
        torch.tensor([[[0.5, 0.0]]]),
        torch.tensor([0.5]),
        pattern=pattern,
        v=v,
        roles=np.array([[int(Role.BOS), int(Role.IMAGE)]]),
        image_index=np.array([[-1, 0]]),
        n_image=1,
    )
    # u = (1, -1) * (2, 1) * 0.5 = (1, -0.5)
    assert out["embed"][0] == pytest.approx(0.5)
    assert out["mlp"][0, 0] == pytest.approx(0.5)
    assert out["heads"][0, 0, 0] == pytest.approx(0.25 * 1 - 0.75 * 2 * 0.5)
    assert out["by_role"][0, 0, 0, SOURCE_ROLES.index(Role.BOS)] == pytest.approx(0.25)
    assert out["by_role"][0, 0, 0, SOURCE_ROLES.index(Role.IMAGE)] == pytest.approx(-0.75)
    assert out["image"][0, 0, 0] == pytest.approx(-0.75)


def test_unknown_direction_is_refused():
    with pytest.raises((ValueError, TypeError), match="logit_diff"):  # TypeError: under jaxtyping checks
        direction_coefficients("up", torch.zeros(1, 5))  # type: ignore[arg-type]
    assert ModelConfig.tiny().llm.n_heads == 4


def test_chunks_give_the_same_attribution(setup):
    model, tokenizer, batch = setup
    ids = level_ids(tokenizer)
    whole, parts = dla_live(model, batch, ids), dla_live(model, batch, ids, chunk=2)
    for name in ("embed", "heads", "mlp", "target", "by_role", "image"):
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), atol=1e-5)  # fp32 kernels
    assert (
        len(batch.select([2, 0])) == 2
        and batch.select(slice(1, None)).quality.tolist() == batch.quality[1:].tolist()
    )
