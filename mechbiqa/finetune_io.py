"""Checkpoints of models fine-tuned outside :mod:`mechbiqa.train`: RL (:mod:`mechbiqa.rl`) and Q-Scorer.

Both start from a one-stage checkpoint and write one back in the same layout
(``config.json`` + ``model.safetensors`` in the original key names, tokenizer,
``preprocessor_config.json``, ``mechbiqa.json``), so
:func:`mechbiqa.model.load.load_pretrained`, :func:`~mechbiqa.model.load.load_components`
and :func:`mechbiqa.pipeline.load_rater` read them like any other. LoRA
adapters (peft, injected or wrapped in a ``PeftModel``) are merged into the
written weights; the model in memory is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechbiqa.model.load import save_pretrained
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.pipeline import INFO_FILE

__all__ = ["add_lora", "core_model", "lora_layers", "merged_model", "write_checkpoint"]


def core_model(model: nn.Module) -> MPLUGOwl2:
    """The `MPLUGOwl2` inside a ``PeftModel`` (or the model itself); injected adapters stay in it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, MPLUGOwl2):
        raise TypeError(f"expected an MPLUGOwl2 (or a peft model wrapping one), got {type(inner).__name__}")
    return inner


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Peft's LoRA layers inside a model (empty when it has no adapters)."""
    return [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")]


def add_lora(
    model: MPLUGOwl2, rank: int, targets: str | None = None, also_train: tuple[str, ...] = ()
) -> MPLUGOwl2:
    """Inject peft LoRA adapters (alpha = 2 * rank) and freeze everything else but ``also_train``.

    Args:
        model: The model (adapters are injected in place).
        rank: LoRA rank.
        targets: Regex of module names that get adapters (default: `mechbiqa.train.TrainConfig`'s,
            the LLM's attention and MLP projections).
        also_train: Parameter names that stay trainable in full (e.g. the embeddings of new tokens).
    """
    import peft

    from mechbiqa.train import TrainConfig

    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets or TrainConfig().lora_targets
    )
    model = peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name in also_train)
    return model


@torch.no_grad()
def merged_model(model: nn.Module) -> MPLUGOwl2:
    """A plain `MPLUGOwl2` with each active LoRA delta added to its base weight (itself without adapters)."""
    core = core_model(model)
    names = {m: n for n, m in core.named_modules()}
    layers = lora_layers(core)
    if not layers:
        return core
    state = {k.replace(".base_layer.", "."): v for k, v in core.state_dict().items() if "lora_" not in k}
    for layer in layers:
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        state[f"{names[layer]}.weight"] = (layer.base_layer.weight + delta).to(layer.base_layer.weight.dtype)
    with torch.device("meta"):
        plain = MPLUGOwl2(core.cfg)
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def write_checkpoint(
    directory: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    info: dict[str, Any],
) -> Path:
    """Write a loadable one-stage checkpoint directory.

    Args:
        directory: Created if missing; files in it are overwritten.
        model: The fine-tuned model (LoRA adapters are merged into the written weights).
        tokenizer: Its tokenizer (with any added tokens).
        processor: Its image processor.
        info: The content of ``mechbiqa.json``; must name ``mode`` (and ``stage`` for two-stage).

    Returns:
        The directory.
    """
    if "mode" not in info:
        raise ValueError("info must name the checkpoint's mode ('one-stage'), as mechbiqa.json requires")
    directory = Path(directory)
    save_pretrained(merged_model(model), directory)
    tokenizer.save(directory)
    processor.save_pretrained(directory)
    (directory / INFO_FILE).write_text(
        json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    return directory
