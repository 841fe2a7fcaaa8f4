"""Training examples: checking, encoding (answer-only labels), collation, the Eq. 2 loss and the data order.

How it connects: :func:`examples_from_records` turns :class:`~mechbiqa.data.records.IQARecord`
lists into :class:`Example` objects; :func:`encode_example` tokenizes one with the task's
prompt from :mod:`mechbiqa.pipeline`; :func:`collate` batches them in the model's
spliced, left-padded label space; :class:`BatchOrder` decides which examples (and
which augmentation) make up every micro-batch as a pure function of (seed, step),
which is what makes a resumed run reproduce the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechbiqa.data.records import IQARecord
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import (
    IMAGE_TAG,
    LEVEL_WORDS,
    ConversationTemplate,
    encode_answer,
)
from mechbiqa.model.roles import pad_ids
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.pipeline import (
    Task,
    answer_text,
    task_prompt,
)
from mechbiqa.train.config import TrainConfig

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, image tokens, padding)."""


class TrainingDataError(ValueError):
    """An example that cannot be trained on in the requested mode (the message names the problem)."""


@dataclass(frozen=True, slots=True)
class Example:
    """One training or evaluation example, before tokenization.

    Attributes:
        id: Record id.
        image: Image path (ignored in stage 2).
        description: Description of the visual attributes.
        level: Level word (excellent, good, fair, poor, bad).
        score: 0-1 rating for metrics (higher is better), or None.
        distortion: Distortion type for the family-naming metric, or None.
        answer: The one-stage answer as the annotation file gives it (reasoning and verdict, e.g.
            Q-Pathway's "... Thus, the quality of the image is poor."), trained on verbatim; None:
            ``description`` + the quality sentence. Stage 1 and stage 2 never read it.
    """

    id: str
    image: Path | None
    description: str | None
    level: str | None
    score: float | None = None
    distortion: str | None = None
    answer: str | None = None


def check_example(example: Example, task: Task) -> None:
    """Refuse an example that the task cannot train on.

    Raises:
        TrainingDataError: "empty description" (stage 1, stage 2; one-stage unless
            the example has its own ``answer``), "answer without a quality word"
            (one-stage, stage 2), "no image" (one-stage, stage 1), or an image tag
            inside the text.
    """
    where = f"example {example.id!r} ({task})"
    if task not in ("one-stage", "stage1", "stage2"):
        raise ValueError(f"task must be one-stage, stage1 or stage2, got {task!r}")
    own_answer = task == "one-stage" and bool(example.answer and example.answer.strip())
    if not own_answer and (example.description is None or not example.description.strip()):
        raise TrainingDataError(
            f"{where}: empty description; every mode trains on descriptions (stage 2 reads one, the others "
            "write one). Drop the example or give it a description"
        )
    for text in (example.description, example.answer if own_answer else None):
        if text and IMAGE_TAG in text:
            raise TrainingDataError(f"{where}: the text contains {IMAGE_TAG!r}; remove the tag")
    if task in ("one-stage", "stage2") and example.level not in LEVEL_WORDS:
        raise TrainingDataError(
            f"{where}: answer without a quality word (level={example.level!r}); the answer must end "
            f"'The quality of the image is <level>.' with <level> one of {LEVEL_WORDS}"
        )
    if task in ("one-stage", "stage1") and example.image is None:
        raise TrainingDataError(f"{where}: no image; {task} trains on images (stage 2 is the text-only one)")


def examples_from_records(records: Sequence[IQARecord], task: Task) -> list[Example]:
    """Examples of a task from IQA records (benchmark, Q-Align JSON, Q-Instruct JSON), each checked.

    A record's ``meta["answer"]`` (set by :mod:`mechbiqa.data.annotations`) becomes the one-stage
    answer trained on verbatim.

    Raises:
        TrainingDataError: For the first record the task cannot use (see :func:`check_example`).
    """
    out = []
    for r in records:
        ex = Example(id=r.id, image=r.image_path, description=r.description, level=r.level_word,
                     score=r.mos01, distortion=r.distortion, answer=r.meta.get("answer"))
        check_example(ex, task)
        out.append(ex)
    return out


@dataclass(frozen=True, slots=True)
class EncodedExample:
    """Text-space ids of prompt + answer, and labels that are IGNORE_INDEX outside the answer."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    n_images: int


def encode_example(tokenizer: Tokenizer, template: ConversationTemplate, task: Task,
                   example: Example) -> EncodedExample:
    """Tokenize an example: the task's prompt (``v1``: system, image tag, newline, question), the answer, ``</s>``.

    Only the answer and its ``</s>`` carry labels (the original's ``preprocess_v1``
    masks the system text and the user turn).
    """
    check_example(example, task)
    prompt = task_prompt(tokenizer, template, task, example.description)
    text = example.answer if task == "one-stage" and example.answer else answer_text(task, example.description,
                                                                                      example.level)
    answer = encode_answer(tokenizer, text)
    return EncodedExample(ids=prompt.ids + tuple(answer),
                          labels=(IGNORE_INDEX,) * len(prompt.ids) + tuple(answer), n_images=prompt.n_images)


def collate(batch: Sequence[EncodedExample], pad_id: int, n_image_tokens: int,
            image_token_id: int = -200) -> tuple[Tensor, Tensor, Tensor]:
    """Batch encoded examples for :class:`MPLUGOwl2`.

    Returns:
        ``input_ids [batch, text_pos]`` and ``attention_mask`` (right-padded; the
        model splices real tokens only and left-pads), and ``labels [batch, pos]``
        in the *spliced*, left-padded space of the model's logits (each image
        placeholder becomes ``n_image_tokens`` ignored positions).
    """
    ids, mask = pad_ids([e.ids for e in batch], pad_id, side="right")
    spliced = []
    for e in batch:
        row: list[int] = []
        for token, label in zip(e.ids, e.labels, strict=False):
            row.extend([IGNORE_INDEX] * n_image_tokens if token == image_token_id else [label])
        spliced.append(row)
    labels, _ = pad_ids(spliced, IGNORE_INDEX, side="left")  # the model left-pads its spliced rows
    return ids, mask, labels


def predicting_positions(labels: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """The positions whose logits predict an answer token (``labels[:, t + 1]`` is not IGNORE_INDEX).

    Passed to the model as ``logits_at``, it unembeds only these rows (about a fifth of a
    one-stage sequence: the vocabulary-wide product is then ~13% of a compact step instead of ~30%).
    """
    return F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)


def label_smoothed_nll(
    logits: Float[Tensor, "batch pos vocab"] | Float[Tensor, "n vocab"], labels: Int[Tensor, "batch pos"],
    smoothing: float = 0.1, reduction: Literal["mean", "sum"] = "mean",
) -> tuple[Tensor, int]:
    """Eq. 2: label-smoothed negative log-likelihood of the answer tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled
    IGNORE_INDEX carry no loss. ``[n, vocab]`` logits are those of
    `predicting_positions` already (``logits_at=predicting_positions(labels)``). Per answer token, with ``eps = smoothing`` and
    ``V`` the vocabulary size: ``(1 - eps) * -log p(y) + eps * (1/V) sum_v -log p(v)``
    (the target distribution puts ``1 - eps`` on the answer token and spreads
    ``eps`` uniformly), averaged over all answer tokens of the batch
    (``reduction="sum"``: summed, for a caller that divides by the tokens of
    several micro-batches or processes).

    Returns:
        The loss (float32 scalar) and the number of answer tokens.

    Raises:
        ValueError: If the batch holds no answer token.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        raise ValueError("the batch has no answer tokens to train on (every label is IGNORE_INDEX)")
    if logits.dim() == 2 and logits.shape[0] != n:
        raise ValueError(f"{logits.shape[0]} rows of logits for {n} answer tokens: select them with predicting_positions")
    selected = logits if logits.dim() == 2 else logits[:, :-1][keep]
    logp = selected.float().log_softmax(-1)  # [n, vocab]
    nll = -logp.gather(-1, targets[keep][:, None]).squeeze(-1)
    uniform = -logp.mean(-1)
    per_token = (1.0 - smoothing) * nll + smoothing * uniform
    return (per_token.sum() if reduction == "sum" else per_token.mean()), n


class ImageCache:
    """Preprocessed pixels by path, cached when asked (the compact data set fits in memory)."""

    def __init__(self, processor: ImageProcessor, cache: bool) -> None:  # noqa: D107
        self.processor, self.cache = processor, cache
        self._store: dict[Path, Tensor] = {}

    def get(self, paths: Sequence[Path]) -> Tensor:
        """Pixels ``[batch, 3, size, size]`` of the images."""
        if not self.cache:
            return self.processor(list(paths))
        missing = list(dict.fromkeys(p for p in paths if p not in self._store))
        if missing:
            self._store.update(zip(missing, self.processor(missing)))
        return torch.stack([self._store[p] for p in paths])


def dihedral(pixels: Tensor, codes: Sequence[int]) -> Tensor:
    """Each image flipped (bit 2 of its code) and turned by ``code & 3`` quarter turns."""
    out = []
    for image, code in zip(pixels, codes):
        if code & 4:
            image = image.flip(-1)
        out.append(torch.rot90(image, k=code & 3, dims=(-2, -1)) if code & 3 else image)
    return torch.stack(out)


class BatchOrder:
    """Which examples (and which augmentation) make up micro-batch ``(step, micro)``: a function of the seed.

    Research choice: epochs are seeded permutations and the position in the
    stream is computed from the step, so no sampler state needs saving and a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, cfg: TrainConfig) -> None:  # noqa: D107
        self.n, self.cfg = n, cfg
        self._epochs: dict[int, tuple[Tensor, Tensor]] = {}

    def _epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            n_codes = {"none": 1, "flip": 2, "dihedral": 8}[self.cfg.augment]
            codes = torch.randint(0, n_codes, (self.n,), generator=g)
            if self.cfg.augment == "flip":
                codes = codes * 4  # bit 2 is the horizontal flip
            self._epochs = {epoch: (perm, codes)}  # keep one epoch in memory
        return self._epochs[epoch]

    def batch(self, step: int, micro: int) -> tuple[list[int], list[int]]:
        """Example indices and augmentation codes of a global micro-batch (``batch_size`` of each)."""
        b = self.cfg.batch_size
        start = (step * self.cfg.grad_accum + micro) * b
        index, codes = [], []
        for i in range(start, start + b):
            perm, aug = self._epoch(i // self.n)
            index.append(int(perm[i % self.n]))
            codes.append(int(aug[i % self.n]))
        return index, codes
