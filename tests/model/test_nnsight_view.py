"""The nnsight view sees the same activations as the TransformerLens hooks, and can patch."""

from __future__ import annotations

import torch

from mechbiqa_hooks import names
from mechbiqa_hooks.nnsight_view import nnsight_view

IMG = -200


def test_trace_saves_the_same_activations_as_run_with_cache(tiny_model):
    ids = torch.tensor([[1, 9, IMG, 7, 8, 3], [1, 4, 5, 6, IMG, 2]])
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, cache = tiny_model.run_with_cache(ids, images=pixels)
    view = nnsight_view(tiny_model)
    with torch.no_grad(), view.trace(ids, images=pixels):
        image_tokens = view.hook_image_tokens.output.save()
        pattern = view.llm.blocks[0].attn.hook_pattern.output.save()
        resid = view.llm.blocks[1].hook_resid_post.output.save()
        logits = view.output.logits.save()
    assert torch.equal(image_tokens, cache[names.IMAGE_TOKENS])
    assert torch.equal(pattern, cache[names.pattern(0)])
    assert torch.equal(resid, cache[names.resid_post(1)])
    assert torch.equal(logits, out.logits)


def test_assignment_patches_like_a_hook(tiny_model):
    ids = torch.tensor([[1, 9, IMG, 7, 8, 3]])
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    image = slice(2, 7)

    def zero(act, hook):
        act = act.clone()
        act[:, image] = 0
        return act

    with torch.no_grad():
        hooked = tiny_model.run_with_hooks(ids, images=pixels, fwd_hooks=[(names.resid_post(0), zero)]).logits
        clean = tiny_model(ids, images=pixels).logits
    view = nnsight_view(tiny_model)
    with torch.no_grad(), view.trace(ids, images=pixels):
        view.llm.blocks[0].hook_resid_post.output[:, image] = 0
        patched = view.output.logits.save()
    assert torch.allclose(patched, hooked, atol=1e-6)
    assert (patched - clean).abs().max() > 1e-3
