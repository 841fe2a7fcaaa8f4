"""Token roles: what every position of a spliced sequence is (DESIGN.md, "Token roles").

The model's LLM reads the text-space ids of :mod:`mechbiqa.model.prompts` with
each ``-200`` placeholder replaced by the image's tokens (65 for mPLUG-Owl2:
64 abstractor queries + 1). :func:`assign_roles` labels every position of that
spliced sequence, from the text-space indices an
:class:`~mechbiqa.model.prompts.EncodedPrompt` records. The recorder stores the
roles with every cached sample, and studies select positions by role (for
example the quality row of the attention pattern, or the image tokens to
patch), never by hard-coded index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechbiqa.model.tokenizer import IMAGE_TOKEN_ID

if TYPE_CHECKING:
    from mechbiqa.model.prompts import EncodedPrompt


class Role(IntEnum):
    """The role of a position.

    ``PAD`` marks padding added to batch sequences of unequal length (an
    addition to DESIGN.md's list).
    """

    BOS = 0
    INSTRUCTION = 1
    IMAGE = 2
    DESCRIPTION = 3
    QUALITY = 4
    OTHER = 5
    PAD = 6

    @property
    def label(self) -> str:
        """Lower-case display name, e.g. ``"quality"``."""
        return self.name.lower()


ROLE_LABELS: tuple[str, ...] = tuple(role.label for role in Role)
"""Display names indexed by role value."""


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, slots=True)
class TokenRoles:
    """Roles of every position of one spliced sequence.

    All arrays have one entry per position (shape ``[pos]``) and are read-only.

    Attributes:
        role: ``int8`` :class:`Role` values.
        image_index: ``int16`` index of the position inside its image's block
            (0..n_image_tokens-1), -1 where the position is not an image token.
        image_number: ``int16`` which image of the sequence (0, 1, ...), -1
            where not an image token.
        source_index: ``int32`` index in the text-space ids the position comes
            from (an image block maps to its placeholder), -1 for padding.
    """

    role: np.ndarray
    image_index: np.ndarray
    image_number: np.ndarray
    source_index: np.ndarray

    def __post_init__(self) -> None:
        """Check that all arrays have one entry per position."""
        n = len(self.role)
        for name in ("image_index", "image_number", "source_index"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TokenRoles.{name} has {len(getattr(self, name))} entries, role has {n}")

    def __len__(self) -> int:
        """Number of spliced positions."""
        return len(self.role)

    def mask(self, role: Role) -> np.ndarray:
        """Boolean ``[pos]`` mask of the positions with a role."""
        return self.role == int(role)

    def positions(self, role: Role) -> np.ndarray:
        """Positions (``int64``, ascending) that have a role."""
        return np.flatnonzero(self.role == int(role))

    @property
    def quality_position(self) -> int | None:
        """The quality position, or None when the sequence has none."""
        found = self.positions(Role.QUALITY)
        return int(found[0]) if len(found) else None

    @property
    def n_images(self) -> int:
        """Number of images spliced into the sequence."""
        return int(self.image_number.max()) + 1 if len(self) and self.image_number.max() >= 0 else 0

    def image_positions(self, image_number: int = 0) -> np.ndarray:
        """Positions of one image's tokens, in ``image_index`` order."""
        return np.flatnonzero(self.image_number == image_number)

    def labels(self) -> list[str]:
        """Display name of each position's role."""
        return [ROLE_LABELS[r] for r in self.role]

    def counts(self) -> dict[str, int]:
        """Number of positions per role name (every role listed)."""
        found = np.bincount(self.role.astype(np.int64), minlength=len(Role))
        return {role.label: int(found[role]) for role in Role}

    def unpadded(self) -> TokenRoles:
        """The roles without their PAD positions."""
        keep = self.role != int(Role.PAD)
        return TokenRoles(
            role=_frozen(self.role[keep]),
            image_index=_frozen(self.image_index[keep]),
            image_number=_frozen(self.image_number[keep]),
            source_index=_frozen(self.source_index[keep]),
        )

    def left_pad(self, n: int) -> TokenRoles:
        """Prepend ``n`` PAD positions (a left-padded batch row)."""
        return self._pad(n, left=True)

    def right_pad(self, n: int) -> TokenRoles:
        """Append ``n`` PAD positions (a right-padded batch row, as in training)."""
        return self._pad(n, left=False)

    def _pad(self, n: int, *, left: bool) -> TokenRoles:
        if n < 0:
            raise ValueError(f"cannot pad by {n} positions; pass n >= 0")

        def pad(array: np.ndarray, value: int) -> np.ndarray:
            filler = np.full(n, value, dtype=array.dtype)
            return _frozen(np.concatenate([filler, array] if left else [array, filler]))

        return TokenRoles(
            role=pad(self.role, Role.PAD),
            image_index=pad(self.image_index, -1),
            image_number=pad(self.image_number, -1),
            source_index=pad(self.source_index, -1),
        )


def assign_roles(
    ids: Sequence[int],
    *,
    response_start: int,
    quality_index: int | None,
    n_image_tokens: int | Sequence[int],
    image_token_id: int = IMAGE_TOKEN_ID,
    bos_id: int = 1,
) -> TokenRoles:
    """Label every position of the spliced sequence built from text-space ids.

    Rules, in order of precedence, for text id ``i`` at text index ``t``:

    * ``t == quality_index`` -> QUALITY (the position whose logits choose the
      level word; it may be the last prompt token, before ``response_start``);
    * ``t == 0`` and ``i == bos_id`` -> BOS;
    * ``t < response_start`` -> INSTRUCTION (system text, user turn, the
      ``ASSISTANT:`` marker);
    * ``t < quality_index`` -> DESCRIPTION (answer tokens before the quality
      word, the answer prefix "The quality of the image" included);
    * otherwise -> OTHER (the level word itself, what follows, EOS; or the
      whole answer when there is no quality position).

    Each placeholder expands to a block of IMAGE positions with
    ``image_index`` 0..k-1, images numbered in order of appearance.

    Args:
        ids: Text-space ids (``EncodedPrompt.ids`` or prompt + answer).
        response_start: Text index where the assistant's answer begins.
        quality_index: Text index of the quality position, or None.
        n_image_tokens: Tokens per image (65 for mPLUG-Owl2), or one count per
            placeholder (e.g. n_frames * 65 for a video).
        image_token_id: The placeholder id.
        bos_id: The BOS id.

    Returns:
        The roles of the ``len(ids) - n_images + sum(tokens per image)``
        spliced positions.

    Raises:
        ValueError: If the indices are out of range, the quality position is a
            placeholder, or the token counts do not fit the placeholders.
    """
    ids = [int(i) for i in ids]
    n_text = len(ids)
    placeholders = [t for t, i in enumerate(ids) if i == image_token_id]
    if isinstance(n_image_tokens, int | np.integer):
        per_image = [int(n_image_tokens)] * len(placeholders)
    else:
        per_image = [int(k) for k in n_image_tokens]
        if len(per_image) != len(placeholders):
            raise ValueError(
                f"n_image_tokens lists {len(per_image)} counts but ids hold {len(placeholders)} image "
                "placeholder(s); pass one count per placeholder, or a single int"
            )
    if any(k <= 0 for k in per_image):
        raise ValueError(f"n_image_tokens must be positive (65 for mPLUG-Owl2); got {per_image}")
    if not 0 <= response_start <= n_text:
        raise ValueError(f"response_start={response_start} is outside 0..{n_text} (the text length)")
    if quality_index is not None:
        if not 0 <= quality_index < n_text:
            raise ValueError(f"quality_index={quality_index} is outside 0..{n_text - 1}")
        if ids[quality_index] == image_token_id:
            raise ValueError(
                f"quality_index={quality_index} is an image placeholder; "
                "the quality position must be a text token"
            )

    n_positions = n_text - len(placeholders) + sum(per_image)
    role = np.empty(n_positions, dtype=np.int8)
    image_index = np.full(n_positions, -1, dtype=np.int16)
    image_number = np.full(n_positions, -1, dtype=np.int16)
    source_index = np.empty(n_positions, dtype=np.int32)

    position = 0
    image = 0
    for t, token in enumerate(ids):
        if token == image_token_id:
            k = per_image[image]
            block = slice(position, position + k)
            role[block] = Role.IMAGE
            image_index[block] = np.arange(k, dtype=np.int16)
            image_number[block] = image
            source_index[block] = t
            position += k
            image += 1
            continue
        if t == quality_index:
            role[position] = Role.QUALITY
        elif t == 0 and token == bos_id:
            role[position] = Role.BOS
        elif t < response_start:
            role[position] = Role.INSTRUCTION
        elif quality_index is not None and t < quality_index:
            role[position] = Role.DESCRIPTION
        else:
            role[position] = Role.OTHER
        source_index[position] = t
        position += 1

    return TokenRoles(
        role=_frozen(role),
        image_index=_frozen(image_index),
        image_number=_frozen(image_number),
        source_index=_frozen(source_index),
    )


def pad_batch(
    rows: Sequence[TokenRoles], *, side: Literal["left", "right"] = "right"
) -> tuple[TokenRoles, ...]:
    """Pad the roles of a batch's sequences to one length with PAD positions.

    Args:
        rows: Roles of each sequence.
        side: "right" (the original's training padding) or "left".

    Returns:
        The rows, each as long as the longest.
    """
    _check_side(side)
    length = max((len(r) for r in rows), default=0)
    pad = TokenRoles.left_pad if side == "left" else TokenRoles.right_pad
    return tuple(pad(r, length - len(r)) for r in rows)


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}")


def pad_ids(
    rows: Sequence[Sequence[int]], pad_id: int, *, side: Literal["left", "right"] = "right"
) -> tuple[Tensor, Tensor]:
    """Text-space ids of unequal length as one ``[batch, text_pos]`` tensor and its mask.

    Args:
        rows: Each sequence's ids (``-200`` placeholders kept).
        pad_id: The id written at padding (masked, never attended).
        side: Where the padding goes. The model splices each row from its real tokens and
            left-pads the spliced rows itself, so both sides give the same logits.

    Returns:
        ``input_ids`` (long) and ``attention_mask`` (long, 1 at real tokens).
    """
    _check_side(side)
    length = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, cols] = torch.tensor([int(t) for t in row], dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass(frozen=True)
class PromptBatch:
    """Prompts padded into one model input, with the roles of the sequence the model sees.

    Build it with `batch_prompts`. The text-space ids are padded on ``side``; the model
    splices every row from its real tokens and left-pads the spliced rows, so ``roles`` are
    left-padded to the spliced length and a position in them is a column of the model's
    activations. The last spliced column is every row's last real token.

    Attributes:
        prompts: The prompts, in row order.
        input_ids: ``[batch, text_pos]`` long.
        attention_mask: ``[batch, text_pos]`` long, 1 at real tokens.
        roles: Each row's spliced roles, left-padded to one length.
        pad_id: The id at padding.
        side: Side of the text-space padding.
        first_image: Index of this batch's first image in the pixels it is run with (for
            sub-batches from `split`; 0 for a whole batch).
    """

    prompts: tuple[EncodedPrompt, ...]
    input_ids: Tensor
    attention_mask: Tensor
    roles: tuple[TokenRoles, ...]
    pad_id: int
    side: Literal["left", "right"] = "right"
    first_image: int = 0

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.prompts)

    @property
    def length(self) -> int:
        """Spliced length (every row's roles are this long)."""
        return len(self.roles[0]) if self.roles else 0

    @property
    def n_images(self) -> int:
        """Images the rows hold together (one per placeholder)."""
        return sum(p.n_images for p in self.prompts)

    @property
    def quality(self) -> np.ndarray:
        """``[batch]`` spliced column of each row's quality position (-1 where a row has none)."""
        return np.array([-1 if r.quality_position is None else r.quality_position for r in self.roles],
                        dtype=np.int64)

    def image_positions(self, image_number: int = 0) -> Tensor:
        """``[batch, n_image_tokens]`` spliced columns of each row's ``image_number``-th image tokens."""
        found = [r.image_positions(image_number) for r in self.roles]
        if len({len(f) for f in found}) != 1 or not len(found[0]):
            counts = [len(f) for f in found]
            raise ValueError(f"not every row holds an image {image_number} (token counts {counts})")
        return torch.from_numpy(np.stack(found)).long()

    def stacked(self, field: Literal["role", "image_index", "image_number", "source_index"]) -> np.ndarray:
        """``[batch, pos]`` one roles array of every row."""
        return np.stack([getattr(r, field) for r in self.roles]) if self.roles else np.zeros((0, 0))

    def pixels(self, pixels: Float[Tensor, "image 3 S S"] | None) -> Tensor | None:
        """This batch's images out of the pixels of the whole prompt list (None when it holds none)."""
        n = self.n_images
        if n == 0:
            return None
        if pixels is None or pixels.shape[0] < self.first_image + n:
            have = 0 if pixels is None else pixels.shape[0]
            raise ValueError(f"the prompts hold {self.first_image + n} image placeholders but {have} images "
                             "were given: pass one image per placeholder, in prompt order")
        return pixels[self.first_image : self.first_image + n]

    def split(self, size: int) -> Iterator[tuple[slice, PromptBatch]]:
        """Consecutive sub-batches of at most ``size`` rows, each padded to its own length.

        Yields:
            ``(rows, sub_batch)``: the rows of this batch it holds, and the sub-batch (its
            ``first_image`` counts from this batch's pixels).
        """
        size = max(1, int(size))
        first = self.first_image
        for start in range(0, len(self), size):
            rows = slice(start, min(len(self), start + size))
            prompts = self.prompts[rows]
            roles = [r.unpadded() for r in self.roles[rows]]
            yield rows, _batch(prompts, roles, self.pad_id, self.side, first)
            first += sum(p.n_images for p in prompts)


def _batch(prompts: Sequence[EncodedPrompt], roles: Sequence[TokenRoles], pad_id: int,
           side: Literal["left", "right"], first_image: int) -> PromptBatch:
    ids, mask = pad_ids([p.ids for p in prompts], pad_id, side=side)
    roles = pad_batch(roles, side="left")
    return PromptBatch(tuple(prompts), ids, mask, roles, int(pad_id), side, first_image)


def batch_prompts(
    prompts: Sequence[EncodedPrompt],
    *,
    pad_id: int,
    n_image_tokens: int,
    roles: Sequence[TokenRoles] | None = None,
    bos_id: int = 1,
    side: Literal["left", "right"] = "right",
) -> PromptBatch:
    """Pad prompts into one model input (the one place prompts are padded).

    Args:
        prompts: The prompts (`mechbiqa.model.prompts.EncodedPrompt`).
        pad_id: The tokenizer's pad id.
        n_image_tokens: Tokens per image (``model.cfg.n_image_tokens``).
        roles: Each prompt's unpadded roles when they differ from `assign_roles` of the prompt
            (e.g. a stage-2 prompt whose user turn holds the description); default: assigned.
        bos_id: The BOS id (for assigned roles).
        side: Side of the text-space padding.

    Raises:
        ValueError: No prompts, or given roles do not fit the prompts.
    """
    if not prompts:
        raise ValueError("batch_prompts got no prompts")
    if roles is None:
        roles = [
            assign_roles(p.ids, response_start=p.response_start, quality_index=p.quality_index,
                         n_image_tokens=n_image_tokens, bos_id=bos_id)
            for p in prompts
        ]  # fmt: skip
    elif len(roles) != len(prompts):
        raise ValueError(f"{len(roles)} roles for {len(prompts)} prompts: pass one per prompt")
    return _batch(prompts, roles, pad_id, side, 0)
