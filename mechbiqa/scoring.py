"""From level-word logits to a quality score: the Q-Align and Q-Instruct rules.

Q-Align (and One-Align) read the logits of five level words at the quality
position, softmax over those five only, and take the expectation of the
level values: `LEVEL_WEIGHTS` (0-1 scale, ``scorer.py``; the one definition, in
`mechbiqa.model.prompts`) or ``4 w + 1`` (1-5 scale, the Hugging Face ``model.score``). Q-Instruct
uses three words (good, average, poor) with ``[1, .5, 0]``; its "boost" mode
averages the logits of three synonyms per level first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechbiqa.model.prompts import (
    LEVEL_WEIGHTS,
    LEVEL_WORDS,
    QALIGN_SCORER_PROMPT,
    EncodedPrompt,
    tokenize_prompt,
)
from mechbiqa.model.roles import PromptBatch, batch_prompts

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.model.tokenizer import Tokenizer

QINSTRUCT_WORDS = ("good", "average", "poor")
QINSTRUCT_BOOST_WORDS = (("good", "high", "fine"), ("average", "medium", "acceptable"), ("poor", "low", "bad"))

_QALIGN_WEIGHTS = {"0-1": LEVEL_WEIGHTS, "1-5": tuple(4.0 * w + 1.0 for w in LEVEL_WEIGHTS)}


def qalign_from_probs(probs: Float[np.ndarray, "*batch level"]) -> Float[np.ndarray, "*batch"] | np.floating:
    """Q-Align's 0-1 score from level probabilities (best first): their expectation of `LEVEL_WEIGHTS`."""
    probs = np.asarray(probs)
    weights = np.asarray(LEVEL_WEIGHTS, dtype=probs.dtype if probs.dtype.kind == "f" else np.float64)
    return np.asarray(probs @ weights)  # a 0-d array (not a numpy scalar) for one image's [5] probabilities


def level_probs(logits: Float[Tensor, "*batch vocab"], level_ids: Tensor | list[int]) -> Float[Tensor, "*batch level"]:
    """Softmax over the level-word logits only (in float32)."""
    ids = torch.as_tensor(level_ids, device=logits.device)
    return logits[..., ids].float().softmax(dim=-1)


def qalign_score(
    logits: Float[Tensor, "*batch vocab"], level_ids: Tensor | list[int], scale: Literal["0-1", "1-5"] = "0-1"
) -> Float[Tensor, "*batch"]:
    """Q-Align's score from the logits at the quality position.

    Args:
        logits: next-token logits at the quality position.
        level_ids: token ids of excellent, good, fair, poor, bad, in that order.
        scale: ``"0-1"`` (weights 1..0) or ``"1-5"`` (weights 5..1); ``s_1to5 = 4 s_0to1 + 1``.
    """
    if len(level_ids) != 5:
        raise ValueError(f"Q-Align needs the ids of the five level words {LEVEL_WORDS}, got {len(level_ids)}")
    weights = torch.tensor(_QALIGN_WEIGHTS[scale], device=logits.device)
    return level_probs(logits, level_ids) @ weights


def qinstruct_score(
    logits: Float[Tensor, "*batch vocab"], word_ids: Tensor | list[int] | list[list[int]]
) -> Float[Tensor, "*batch"]:
    """Q-Instruct's 0-1 score: softmax over good/average/poor (or the mean logit of each synonym group).

    Args:
        logits: next-token logits at the quality position.
        word_ids: three ids (good, average, poor), or three groups of synonym ids ("boost" mode).
    """
    groups = [ids if isinstance(ids, list | tuple) else [int(ids)] for ids in list(word_ids)]
    if len(groups) != 3:
        raise ValueError("Q-Instruct needs three levels: good, average, poor (or three synonym groups)")
    level_logits = torch.stack([logits[..., list(g)].float().mean(-1) for g in groups], dim=-1)
    return level_logits.softmax(-1) @ torch.tensor([1.0, 0.5, 0.0], device=logits.device)


@dataclass(frozen=True)
class Ratings:
    """Q-Align ratings of a set of images.

    Attributes:
        scores: ``[image]`` Q-Align score on the 0-1 scale.
        level_probs: ``[image, 5]`` softmax over the level words, best first.
        levels: the most probable level word per image.
        prompt: the prompt the model was asked.
    """

    scores: np.ndarray
    level_probs: np.ndarray
    levels: list[str]
    prompt: str


def level_ids(tokenizer: Tokenizer, words: tuple[str, ...] = LEVEL_WORDS) -> list[int]:
    """Token ids of the level words, read as Q-Align does (first piece of the word with its leading space)."""
    return [tokenizer.word_id(w) for w in words]


@torch.no_grad()
def quality_logits(
    model: MPLUGOwl2,
    batch: PromptBatch,
    pixels: Float[Tensor, "image 3 S S"] | None = None,
    *,
    batch_size: int = 64,
) -> Float[Tensor, "prompt vocab"]:
    """Next-token logits at every prompt's last position (where the quality word is read), float32 on CPU.

    Args:
        model: The model.
        batch: Prompts padded by `mechbiqa.model.roles.batch_prompts`.
        pixels: One image per placeholder, in prompt order (None: text only).
        batch_size: Prompts per forward.
    """
    out = [o.logits[:, 0].float().cpu() for _, _, o in model.forward_batches(batch, pixels, batch_size,
                                                                             logits_at=-1)]
    return torch.cat(out) if out else torch.zeros((0, model.cfg.llm.vocab_size))


@torch.no_grad()
def rate_images(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    pixels: Float[Tensor, "image 3 S S"],
    prompt: str = QALIGN_SCORER_PROMPT,
    batch_size: int = 8,
) -> Ratings:
    """Score each image with the Q-Align rule at the last position of ``prompt``.

    The prompt must end right before the level word (Q-Align's ends with
    "The quality of the image is") and hold one ``<|image|>`` placeholder.
    """
    encoded = scorer_prompt(tokenizer, prompt)
    if pixels.shape[0] == 0:
        p = np.zeros((0, 5), dtype=np.float32)
    else:
        batch = batch_prompts([encoded] * pixels.shape[0], pad_id=tokenizer.pad_id,
                              n_image_tokens=model.cfg.n_image_tokens, bos_id=tokenizer.bos_id)
        logits = quality_logits(model, batch, pixels, batch_size=batch_size)
        p = level_probs(logits, level_ids(tokenizer)).numpy()
    scores = qalign_from_probs(p).astype(np.float32)
    return Ratings(scores=scores, level_probs=p, levels=[LEVEL_WORDS[i] for i in p.argmax(-1)], prompt=prompt)


def scorer_prompt(tokenizer: Tokenizer, prompt: str = QALIGN_SCORER_PROMPT) -> EncodedPrompt:
    """A raw prompt that ends right before the level word, as an `EncodedPrompt` (last id = quality position).

    The answer starts after the last ``"ASSISTANT:"`` (the answer prefix "The quality of the
    image is" then has the description role, as in `mechbiqa.model.prompts.encode_prompt`);
    without the marker the whole prompt is instruction.
    """
    ids = tuple(tokenize_prompt(tokenizer, prompt, n_images=1))
    start = len(ids)
    marker = prompt.rfind(ASSISTANT_MARKER)
    if marker >= 0:
        head = tuple(tokenize_prompt(tokenizer, prompt[: marker + len(ASSISTANT_MARKER)]))
        if ids[: len(head)] == head:  # the marker ends on a token boundary
            start = len(head)
    return EncodedPrompt(text=prompt, ids=ids, response_start=start, quality_index=len(ids) - 1)


ASSISTANT_MARKER = "ASSISTANT:"
