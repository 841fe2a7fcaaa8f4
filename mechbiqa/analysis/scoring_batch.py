"""One padded batch of scoring prompts with their token roles, for analyses that run the model live.

Where it sits: `mechbiqa.analysis.dla` and `mechbiqa.analysis.attribution_patching`
run the model on images (`studies/direct_logit_attribution.py`,
`studies/attribution_patching.py`) and need, beside the ids and pixels, the
role of every spliced position and the column of the quality position. A
`ScoringBatch` holds both in the coordinates the model computes in: the
model left-pads what it splices (`mechbiqa.model.mplug_owl2`), so each row's
roles are left-padded with ``PAD`` to the longest spliced row and the quality
position of a scoring prompt is the last column.

Prompt: Q-Align's scorer prompt (`mechbiqa_hooks.record.PromptConfig`) for
released checkpoints and the tiny random model; a one-stage checkpoint of
``mechbiqa.train`` is scored on its own canonical prompt (its greedy
description, then "The quality of the image is", `mechbiqa.pipeline`), the
rule of `studies/patch_image_tokens.py`. A two-stage pair reads no image at the
quality position and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.roles import TokenRoles, assign_roles, pad_batch, pad_ids

__all__ = ["ScoringBatch", "scoring_batch"]


@dataclass(frozen=True)
class ScoringBatch:
    """Scoring prompts of a set of images, padded for one forward.

    Attributes:
        input_ids: ``[batch, text_pos]`` right-padded text ids (``-200`` where the image goes).
        attention_mask: ``[batch, text_pos]`` 1 at real tokens.
        pixels: ``[batch, 3, S, S]`` preprocessed images.
        roles: Per row, the roles of the spliced sequence left-padded to the batch's length.
        quality: ``[batch]`` column of the quality position in the spliced (padded) sequence.
    """

    input_ids: Tensor
    attention_mask: Tensor
    pixels: Tensor
    roles: tuple[TokenRoles, ...]
    quality: Tensor

    def __len__(self) -> int:
        """Rows (images)."""
        return len(self.roles)

    def select(self, index: Sequence[int] | slice) -> ScoringBatch:
        """A sub-batch (the same padding: roles and quality columns stay valid)."""
        picked = list(range(len(self)))[index] if isinstance(index, slice) else [int(j) for j in index]
        i = torch.as_tensor(picked, dtype=torch.long)
        return ScoringBatch(
            self.input_ids[i],
            self.attention_mask[i],
            self.pixels[i],
            tuple(self.roles[j] for j in picked),
            self.quality[i],
        )

    @property
    def role_array(self) -> np.ndarray:
        """``[batch, pos]`` `Role` values (``PAD`` at padding)."""
        return np.stack([r.role for r in self.roles]).astype(np.int64)

    @property
    def image_index(self) -> np.ndarray:
        """``[batch, pos]`` index inside the image, -1 elsewhere."""
        return np.stack([r.image_index for r in self.roles]).astype(np.int64)

    @property
    def image_positions(self) -> Tensor:
        """``[batch, n_image]`` column of each image token of the first image, in image-index order."""
        return torch.from_numpy(np.stack([r.image_positions(0) for r in self.roles])).long()


def scoring_batch(
    model: Any, tokenizer: Any, pixels: Tensor, checkpoint: str | Path | None = None
) -> ScoringBatch:
    """The scoring prompt of every image (see the module docstring), padded into one batch.

    Args:
        model: The model (its image-token count; the one-stage rater runs it to describe).
        tokenizer: Its tokenizer.
        pixels: ``[batch, 3, S, S]`` preprocessed images.
        checkpoint: The checkpoint directory the model came from (None: the tiny random model
            or a released checkpoint, scored on Q-Align's prompt).

    Raises:
        ValueError: The checkpoint is a two-stage pair or a stage-2 model (no image at the
            quality position), or a prompt has no quality position.
    """
    from mechbiqa_hooks.record import PromptConfig

    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and (ckpt / "stage1").is_dir():
        raise ValueError(
            f"{ckpt} is a two-stage pair: stage 2 reads text only; pass the one-stage checkpoint"
        )
    if ckpt is not None and (ckpt / "mechbiqa.json").is_file():
        from mechbiqa.model.load import Components
        from mechbiqa.pipeline import OneStageRater, read_info

        info = read_info(ckpt)
        if info.mode != "one-stage":
            raise ValueError(f"{ckpt} is a {info.describe()} checkpoint: its quality position reads no image")
        parts = Components(model=model, tokenizer=tokenizer, processor=None, path=ckpt)  # type: ignore[arg-type]
        ratings = OneStageRater(parts, template=info.template).rate(pixels)
        prompts, roles = [r.prompt for r in ratings], [r.roles for r in ratings]
    else:
        prompt = PromptConfig().encode(tokenizer, "score")
        one = assign_roles(
            prompt.ids,
            response_start=prompt.response_start,
            quality_index=prompt.quality_index,
            n_image_tokens=model.cfg.n_image_tokens,
            bos_id=tokenizer.bos_id,
        )
        prompts, roles = [prompt] * len(pixels), [one] * len(pixels)
    ids, mask = pad_ids([p.ids for p in prompts], tokenizer.pad_id, side="right")
    padded = pad_batch(roles, side="left")  # the model left-pads its spliced rows
    quality = [r.quality_position for r in padded]
    if any(q is None for q in quality):
        raise ValueError(
            "a scoring prompt has no quality position; end the prompt right before the level word"
        )
    return ScoringBatch(ids, mask, pixels, padded, torch.tensor(quality, dtype=torch.long))
