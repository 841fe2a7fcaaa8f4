"""The compact preset: deep enough for layer-wise trajectories, no costlier to train than the 4-layer one."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.config import IMAGE_TOKEN_INDEX


def _training_flops(cfg: ModelConfig) -> int:
    """Forward + backward FLOPs (counted by torch) of one batch: 2 prompts of 78 text ids, one image each."""
    torch.manual_seed(0)
    model = MPLUGOwl2(cfg)
    ids = torch.randint(3, cfg.llm.vocab_size, (2, 78))
    ids[:, 5] = IMAGE_TOKEN_INDEX
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with FlopCounterMode(display=False) as counter:
        model(ids, images=images).logits.sum().backward()
    return counter.get_total_flops()


def test_compact_llm_is_deep_with_the_real_models_head_width_and_image_tokens():
    cfg = ModelConfig.compact()
    assert cfg.llm.n_layers >= 8
    assert cfg.llm.d_head == 32  # 4096 / 32 heads = 128 at 7B; 32 keeps several heads at width 128
    assert cfg.n_image_tokens == 65  # 64 queries + vit_eos, as the real model
    # written and read back through the original config.json layout unchanged
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_compact_training_step_costs_no_more_than_the_earlier_four_layer_llm():
    cfg = ModelConfig.compact(vocab_size=2048)
    four = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, d_model=192, n_layers=4, n_heads=6,
                                                             n_kv_heads=6, d_mlp=512))
    deep, shallow = _training_flops(cfg), _training_flops(four)
    # the 4-layer model's own count, by hand for its LLM's matrix products, is a sanity check of the counter:
    # every text + image position passes q, k, v, o (4 d^2) and the MLP (3 d d_mlp) in each layer, x 2 for a
    # multiply-add, x 3 for forward + backward (weights' and inputs' gradients).
    positions = 2 * (78 - 1 + four.n_image_tokens)
    llm_matmuls = 3 * 2 * positions * four.llm.n_layers * (4 * 192**2 + 3 * 192 * 512)
    assert shallow > llm_matmuls
    assert deep <= shallow
