"""`mechbiqa_hooks.names`: templates over layers and the per-sample shapes the store allocates."""

from __future__ import annotations

import pytest
import torch

from mechbiqa.model import IMAGE_TOKEN_INDEX as IMG
from mechbiqa_hooks import names


def test_templates_are_the_layer_names_with_each():
    for build in (
        names.resid_pre,
        names.resid_mid,
        names.resid_post,
        names.attn_out,
        names.mlp_out,
        names.pattern,
    ):
        assert build(names.EACH) == names.template(build(3)) == build(3).replace(".3.", ".{l}.")
    assert names.attn(names.EACH, "v") == "llm.blocks.{l}.attn.hook_v"
    assert names.mlp(2, "post") == "llm.blocks.2.mlp.hook_post"
    assert names.pattern(names.EACH, "abstractor") == "abstractor.blocks.{l}.hook_pattern"
    assert names.each_layer(names.resid_post(names.EACH), [0, 2]) == [
        names.resid_post(0),
        names.resid_post(2),
    ]
    assert names.each_layer(names.LOGITS, [0, 2]) == [names.LOGITS]
    assert names.layer_of(names.attn(5, "z")) == 5 and names.layer_of(names.LN_FINAL_SCALE) is None


@torch.no_grad()
def test_position_shape_matches_every_llm_hook_of_the_model(tiny_model):
    ids = torch.tensor([[1, 9, IMG, 7, 8], [1, IMG, 3, 4, 5]])
    _, cache = tiny_model.run_with_cache(ids, images=torch.zeros(2, 3, 28, 28))
    t = cache[names.MODALITY].shape[1]
    llm = [n for n in names.all_hook_names(tiny_model.cfg) if n.startswith("llm.")]
    assert len(llm) == 2 * 17 + 4  # 17 per block, plus the modality, the final norm (2) and the logits
    for name in llm:
        shape, dims = names.position_shape(name, tiny_model.cfg.llm, t, t)
        assert tuple(cache[name].shape[1:]) == shape, name
        assert len(dims) == len(shape) and "pos" in dims
        assert names.has_key_axis(name) == (dims[-1] == "key_pos")
    with pytest.raises(ValueError, match="cannot cache hook"):
        names.position_shape(names.IMAGE_TOKENS, tiny_model.cfg.llm, t, t)
