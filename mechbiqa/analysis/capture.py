"""Capture the quality position's residuals and attention rows for a set of scoring prompts, live.

This is the in-memory twin of an activation store for prompts that differ per
sample (a one-stage model's own description, a stage-2 prompt holding the
stage-1 description): the recorder of `mechbiqa_hooks.record` streams one
shared prompt to disk; this function runs each sample's own prompt (as
`mechbiqa.pipeline` scored it) and returns the arrays `lens.analyse_lens` and
`attribution.attribute` read. Prompts must end at their quality position; the
model left-pads spliced rows, so the last column is every sample's quality
position and the roles are left-padded to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.prompts import EncodedPrompt
from mechbiqa.model.roles import TokenRoles
from mechbiqa_hooks import names


@dataclass(frozen=True)
class QualityCapture:
    """What the quality position saw, for every sample.

    Attributes:
        resid: ``[layer, sample, d_model]`` ``hook_resid_post`` of every layer at the quality position.
        pattern: ``[sample, layer, head, key_pos]`` the quality position's attention row, left-padded.
        roles: ``[sample, key_pos]`` role of each key position (PAD where padded).
        image_index: ``[sample, key_pos]`` index inside the image, -1 elsewhere.
    """

    resid: np.ndarray
    pattern: np.ndarray
    roles: np.ndarray
    image_index: np.ndarray


@torch.no_grad()
def capture_quality(
    model: MPLUGOwl2,
    prompts: Sequence[EncodedPrompt],
    roles: Sequence[TokenRoles],
    pixels: Tensor | None,
    pad_id: int,
    batch_size: int = 32,
) -> QualityCapture:
    """Run each prompt once with hooks on every layer's residual and attention pattern.

    Args:
        model: The model that scored the prompts.
        prompts: Scoring prompts ending at the quality position.
        roles: Their spliced token roles (one `TokenRoles` per prompt, unpadded).
        pixels: ``[image, 3, S, S]``: one per placeholder, in prompt order; None for text only.
        pad_id: Id used for padding (masked; never attended).
        batch_size: Prompts per forward.
    """
    if any(p.quality_index != len(p.ids) - 1 for p in prompts):
        raise ValueError("every prompt must end at its quality position (build it with mechbiqa.pipeline.scoring_prompt)")
    n_layers = model.cfg.llm.n_layers
    length = max(len(r.role) for r in roles)
    image_at = np.cumsum([0] + [p.n_images for p in prompts])
    resid, pattern = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p.ids) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, :len(p.ids)] = torch.tensor(p.ids)
            mask[i, :len(p.ids)] = 1
        images = None
        if pixels is not None and image_at[start + len(chunk)] > image_at[start]:
            images = pixels[image_at[start]:image_at[start + len(chunk)]].to(model.device, model.dtype)
        grabbed: dict[str, Tensor] = {}

        def keep(act: Tensor, hook) -> None:
            grabbed[hook.name] = act[..., -1, :].float().cpu() if "pattern" in hook.name else act[:, -1].float().cpu()

        hooks = [(names.resid_post(layer), keep) for layer in range(n_layers)]
        hooks += [(names.pattern(layer), keep) for layer in range(n_layers)]
        with model.hooks(fwd_hooks=hooks):
            model(ids.to(model.device), images=images, attention_mask=mask.to(model.device))
        resid.append(torch.stack([grabbed[names.resid_post(layer)] for layer in range(n_layers)]))
        rows = torch.stack([grabbed[names.pattern(layer)] for layer in range(n_layers)], dim=1)  # [b, layer, head, key]
        pattern.append(torch.nn.functional.pad(rows, (length - rows.shape[-1], 0)))  # left-pad keys to one width
    padded = [r.left_pad(length - len(r.role)) for r in roles]
    return QualityCapture(
        resid=torch.cat(resid, dim=1).numpy(),
        pattern=torch.cat(pattern).numpy(),
        roles=np.stack([r.role for r in padded]).astype(np.int8),
        image_index=np.stack([r.image_index for r in padded]).astype(np.int16),
    )
