"""LoRA adapters (peft) on the LLM's projections: inject, checkpoint the adapters only, merge once at the end.

The adapters go into the :class:`~mechbiqa.model.MPLUGOwl2` in place (peft's
``LoraModel`` tuner, so the trained module is still an ``MPLUGOwl2`` with its
hooks and ``cfg``); periodic checkpoints hold :func:`adapter_state` (megabytes,
not the 7B weights); the final export is :func:`merge` (peft's
``merge_and_unload``), once, after the last step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.train.config import TrainConfig

__all__ = ["add_lora", "adapter_state", "merge"]


def add_lora(model: MPLUGOwl2, cfg: TrainConfig) -> Any:
    """Inject LoRA adapters into ``model`` (in place) and freeze everything else.

    Returns:
        peft's ``LoraModel`` tuner; its ``.model`` is ``model``, now with adapters.

    Raises:
        ImportError: peft is missing (``pip install mechbiqa[lora]``).
        ValueError: ``cfg.lora_targets`` matches no module.
    """
    try:
        import peft
    except ImportError:
        raise ImportError("lora_rank needs peft: pip install 'mechbiqa[lora]' (or leave lora_rank=None)") from None
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_targets, bias="none")
    try:
        tuner = peft.LoraModel(model, config, "default")
    except ValueError as err:
        raise ValueError(f"lora_targets={cfg.lora_targets!r} matched no module of the model ({err})") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"lora_targets={cfg.lora_targets!r} matched no module of the model")
    return tuner


def adapter_state(state: dict[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    """The LoRA weights (keys containing ``lora_``) of a model or a state dict, on the CPU."""
    items = state.state_dict().items() if isinstance(state, nn.Module) else state.items()
    return {k: v.detach().cpu().clone() for k, v in items if "lora_" in k}


def merge(tuner: Any) -> MPLUGOwl2:
    """Fold the adapters into the weights with peft's ``merge_and_unload``: a plain ``MPLUGOwl2`` again.

    The tuner's model is changed in place; call this once, after the last step.
    """
    return tuner.merge_and_unload().eval()
