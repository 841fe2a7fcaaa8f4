"""LoRA adapters (peft) on the LLM's projections: inject, read the adapter weights, merge once at the end."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.train.config import TrainConfig


def add_lora(model: MPLUGOwl2, cfg: TrainConfig) -> MPLUGOwl2:
    try:
        import peft
    except ImportError:
        raise ImportError("lora_rank needs peft: pip install peft (or leave lora_rank=None)") from None
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_targets, bias="none")
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora_targets={cfg.lora_targets!r} matched no module of the model")
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def plain_model(model: MPLUGOwl2) -> MPLUGOwl2:
    """The model with LoRA deltas merged, as a plain :class:`MPLUGOwl2` (itself if it has no adapters)."""
    names = dict(model.named_modules())
    lora = [n for n, m in names.items() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")]
    if not lora:
        return model
    state: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for n in lora:
            module = names[n]
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            state[f"{n}.weight"] = (module.base_layer.weight + delta).to(module.base_layer.weight.dtype)
    with torch.device("meta"):
        plain = MPLUGOwl2(model.cfg)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()
