"""Checks of the tensors entering the model: token ids before the embedding, pixels before the vision tower.

The model (`mechbiqa.model.mplug_owl2`) calls `check_token_ids` where ids are
embedded (``splice`` and the cached decoding step) and `check_pixels` where
pixels enter the vision tower (``encode_images``). Without them a bad input
gives a plausible number instead of an error: a negative id was clamped to 0
(``<unk>``) and embedded, an id past the vocabulary failed deep inside
``nn.Embedding`` as a bare ``IndexError``, and a NaN pixel turned every score
into NaN. Each check raises a `ValueError` that names the offending values,
where they are, and the fix.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbiqa.model.config import IMAGE_TOKEN_INDEX

__all__ = ["check_pixels", "check_token_ids"]


def check_token_ids(ids: Int[Tensor, "*batch pos"], vocab_size: int) -> None:
    """Refuse ids the embedding cannot look up: negative ones other than the image placeholder, or >= vocab.

    Args:
        ids: Token ids, with `IMAGE_TOKEN_INDEX` (-200) where an image goes.
        vocab_size: Rows of the embedding table.

    Raises:
        ValueError: Naming up to five bad ids with their positions, the valid range and the fix.
    """
    bad = ((ids < 0) & (ids != IMAGE_TOKEN_INDEX)) | (ids >= vocab_size)
    if not bool(bad.any()):
        return
    where = bad.nonzero().tolist()
    shown = ", ".join(f"{int(ids[tuple(w)])} at {tuple(w)}" for w in where[:5])
    more = f" (and {len(where) - 5} more)" if len(where) > 5 else ""
    raise ValueError(
        f"token id(s) outside the vocabulary: {shown}{more}; valid ids are 0..{vocab_size - 1} and "
        f"{IMAGE_TOKEN_INDEX} (the image placeholder). Tokenize with the checkpoint's own tokenizer "
        "(mechbiqa.model.prompts.tokenize_prompt) and pad with a real id (0) plus attention_mask 0, "
        "not -100 or -1"
    )


def check_pixels(pixels: Float[Tensor, "image 3 S S"]) -> None:
    """Refuse pixel tensors holding NaN or infinite values.

    Args:
        pixels: Preprocessed images (`mechbiqa.model.processor.ImageProcessor` output).

    Raises:
        ValueError: Naming how many values are bad and in which images, and the fix.
    """
    finite = torch.isfinite(pixels)
    if bool(finite.all()):
        return
    per_image = (~finite).flatten(1).sum(-1) if pixels.ndim > 1 else (~finite).long()
    images = per_image.nonzero().flatten().tolist()
    n_nan = int(torch.isnan(pixels).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise ValueError(
        f"pixels hold {n_nan} NaN and {n_inf} infinite value(s), in image(s) {images[:10]}"
        f"{' ...' if len(images) > 10 else ''}; the vision tower would turn them into NaN scores. "
        "Preprocess the images with ImageProcessor, or fix the tensor (e.g. torch.nan_to_num) before rating"
    )
