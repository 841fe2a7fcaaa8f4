"""The training loop: one-stage and two-stage checkpoints of mPLUG-Owl2, compact or real (LoRA).

How it connects: examples come from any :class:`~mechbiqa.data.records.IQARecord`
list (the built-in benchmark of :mod:`mechbiqa.data`, a Q-Align or Q-Instruct
JSON read by :mod:`mechbiqa.data.loaders`); the task formats (questions,
answers, template) are those of :mod:`mechbiqa.pipeline`, which also runs the
periodic evaluation; the model is :class:`~mechbiqa.model.MPLUGOwl2`, built
from scratch at :meth:`ModelConfig.compact` or read with
:func:`~mechbiqa.model.load.load_components`; checkpoints are written with
:func:`~mechbiqa.model.load.save_pretrained` in the original Hugging Face
layout (plus the tokenizer, ``preprocessor_config.json`` and ``mechbiqa.json``)
so ``load_pretrained`` reads them like any released checkpoint.
``studies/train_pair.py`` drives it from the command line; nothing here prints.

The recipe (the reference paper's; DESIGN.md, "Two-stage tuning"):

* loss: label-smoothed negative log-likelihood on answer tokens only (Eq. 2),
  ``(1 - eps) * -log p(y) + eps * mean_v -log p(v)``, averaged over the answer
  tokens of the batch (:func:`label_smoothed_nll`);
* AdamW, betas (0.9, 0.98), eps 1e-6; linear warm-up then cosine decay
  (:func:`learning_rate`); gradient clipping and accumulation (nanoGPT's loop);
  autocast to bf16 (fp16 with a scaler on older GPUs) where the device has it;
* modes: ``one-stage`` (image + question -> description + quality sentence),
  ``two-stage`` = stage 1 (image -> description) then stage 2 (text only,
  description -> quality sentence) from the stage-1 weights, with step budgets
  2:1 and the one-stage baseline given the same total (:func:`split_budget`).

A checkpoint directory holds the model (``config.json``, ``model.safetensors``),
tokenizer, processor, ``mechbiqa.json`` (mode, stage, template, training
config, metrics) and ``training_state.pt`` (:class:`State`: step, optimizer,
scaler, RNG states, loss history, evaluations, LoRA adapters). Data order and
augmentation are pure functions of (seed, step), so a run resumed from any
checkpoint reproduces the uninterrupted loss curve.

Real 7B checkpoints (GPU, ``pip install peft``)::

    python studies/train_pair.py --init-from /models/mplug-owl2-llama2-7b --lora-rank 64 \\
        --device cuda --precision bf16 --param-dtype bfloat16 --batch-size 8 --grad-accum 4 \\
        --lr 2e-4 --steps 1500 --out-dir cache/pair-7b [--qinstruct-json q.json --image-root imgs/]

LoRA adapters go on the LLM's attention and MLP projections (both multiway
branches of K/V); the written ``model.safetensors`` holds the merged weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechbiqa.data.records import IQARecord
from mechbiqa.model.config import ModelConfig
from mechbiqa.model.load import Components, load_components, load_pretrained, save_pretrained
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import IMAGE_TAG, LEVEL_WORDS, QALIGN_ANSWER_PREFIX, ConversationTemplate, encode_answer, get_template
from mechbiqa.model.tokenizer import CompactTokenizer, Tokenizer, load_tokenizer, train_compact_tokenizer
from mechbiqa.pipeline import (
    INFO_FILE,
    ONE_STAGE_QUESTION,
    STAGE1_QUESTION,
    STAGE2_QUESTION,
    CheckpointModeError,
    Mode,
    Task,
    answer_text,
    expect_checkpoint,
    generate_answers,
    match_description,
    quality_sentence,
    read_info,
    score_prompts,
    scoring_prompt,
    split_answer,
    task_prompt,
)

__all__ = [
    "IGNORE_INDEX",
    "STATE_FILE",
    "TrainConfig",
    "TrainingDataError",
    "Example",
    "examples_from_records",
    "check_example",
    "EncodedExample",
    "encode_example",
    "collate",
    "label_smoothed_nll",
    "learning_rate",
    "split_budget",
    "compact_tokenizer",
    "build_compact_model",
    "init_weights",
    "cpu_has_bf16",
    "dct_patch_basis",
    "State",
    "TrainEvent",
    "TrainResult",
    "evaluate",
    "train",
    "train_two_stage",
]

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt, image tokens, padding)."""

STATE_FILE = "training_state.pt"
"""The resumable part of a checkpoint directory."""

_DEFAULT_LORA_TARGETS = (
    r".*llm\.blocks\.\d+\.(attn\.(q_proj|o_proj|k_proj\.multiway\.\d|v_proj\.multiway\.\d)"
    r"|mlp\.(gate_proj|up_proj|down_proj))"
)


class TrainingDataError(ValueError):
    """An example that cannot be trained on in the requested mode (the message names the problem)."""


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One training run (one checkpoint). The defaults are the compact model's on 2 CPU cores.

    Attributes:
        mode: ``"one-stage"`` or ``"two-stage"``.
        stage: 1 or 2 for two-stage runs, None for one-stage.
        steps: Optimizer steps.
        batch_size: Examples per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        visual_lr_scale: Learning-rate multiplier of the vision tower and abstractor.
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine decay).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay (matrices only; norms, biases and embeddings get none).
        betas: AdamW betas (the paper: 0.9, 0.98).
        adam_eps: AdamW epsilon (the paper: 1e-6).
        label_smoothing: Eq. 2's epsilon (the paper's default 0.1).
        clip_norm: Gradient-norm clip (0: none).
        precision: ``"auto"`` (bf16 autocast on a GPU that has it, fp16 with a scaler on
            one that does not; on CPU bf16 where it is native, see :func:`cpu_has_bf16`, else
            fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        param_dtype: dtype of the weights (``"bfloat16"`` for 7B LoRA on a GPU).
        augment: Image augmentation: ``"none"``, ``"flip"`` (horizontal) or ``"dihedral"``
            (the 8 flips and quarter turns; they keep every benchmark distortion's type and level).
        eval_every: Steps between evaluations (0: only at the end).
        eval_samples: Held-out examples per evaluation (0: all).
        checkpoint_every: Steps between resumable checkpoints (0: only at the end).
        max_new_tokens: Longest generated answer at evaluation.
        template: Conversation template (``v1``: the original training template).
        seed: Seed of initialisation, data order and augmentation.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``...
        init_from: Checkpoint directory to start from (stage 2: the stage-1 checkpoint;
            real models: the released checkpoint); None for a model passed to :func:`train`.
        lora_rank: LoRA rank (None: full fine-tuning). Needs ``peft``.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_targets: Regex of module names that get adapters.
        cache_images: Keep preprocessed training images in memory (compact data sets).
    """

    mode: Mode = "one-stage"
    stage: int | None = None
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    visual_lr_scale: float = 1.0
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    augment: Literal["none", "flip", "dihedral"] = "dihedral"
    eval_every: int = 200
    eval_samples: int = 160
    checkpoint_every: int = 0
    max_new_tokens: int = 48
    template: str = "v1"
    seed: int = 0
    device: str = "auto"
    init_from: str | None = None
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = _DEFAULT_LORA_TARGETS
    cache_images: bool = True

    def __post_init__(self) -> None:
        """Validate (no side effects: seeding and device choice happen in :func:`train`)."""
        if self.mode not in ("one-stage", "two-stage"):
            raise ValueError(f"mode must be 'one-stage' or 'two-stage', got {self.mode!r}")
        if self.mode == "one-stage" and self.stage is not None:
            raise ValueError(f"a one-stage run has no stage; got stage={self.stage} (use mode='two-stage')")
        if self.mode == "two-stage" and self.stage not in (1, 2):
            raise ValueError(f"a two-stage run needs stage=1 or stage=2, got {self.stage!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.augment not in ("none", "flip", "dihedral"):
            raise ValueError(f"augment must be none, flip or dihedral, got {self.augment!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive rank or None, got {self.lora_rank}")
        get_template(self.template)

    @property
    def task(self) -> Task:
        """``"one-stage"``, ``"stage1"`` or ``"stage2"``."""
        return "one-stage" if self.mode == "one-stage" else f"stage{self.stage}"  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; warns on unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"TrainConfig.from_dict: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def split_budget(total_steps: int) -> tuple[int, int]:
    """Stage-1 and stage-2 steps for a total: 2:1, as in the paper (the one-stage baseline gets the total)."""
    if total_steps < 3:
        raise ValueError(f"a two-stage budget needs at least 3 steps, got {total_steps}")
    stage1 = round(total_steps * 2 / 3)
    return stage1, total_steps - stage1


# --------------------------------------------------------------------------------------------- examples
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
    """

    id: str
    image: Path | None
    description: str | None
    level: str | None
    score: float | None = None
    distortion: str | None = None


def check_example(example: Example, task: Task) -> None:
    """Refuse an example that the task cannot train on.

    Raises:
        TrainingDataError: "empty description" (one-stage, stage 1, stage 2),
            "answer without a quality word" (one-stage, stage 2), "no image"
            (one-stage, stage 1), or an image tag inside the text.
    """
    where = f"example {example.id!r} ({task})"
    if task not in ("one-stage", "stage1", "stage2"):
        raise ValueError(f"task must be one-stage, stage1 or stage2, got {task!r}")
    if example.description is None or not example.description.strip():
        raise TrainingDataError(
            f"{where}: empty description; every mode trains on descriptions (stage 2 reads one, the others "
            "write one). Drop the example or give it a description"
        )
    if IMAGE_TAG in example.description:
        raise TrainingDataError(f"{where}: the description contains {IMAGE_TAG!r}; remove the tag")
    if task in ("one-stage", "stage2") and example.level not in LEVEL_WORDS:
        raise TrainingDataError(
            f"{where}: answer without a quality word (level={example.level!r}); the answer must end "
            f"'The quality of the image is <level>.' with <level> one of {LEVEL_WORDS}"
        )
    if task in ("one-stage", "stage1") and example.image is None:
        raise TrainingDataError(f"{where}: no image; {task} trains on images (stage 2 is the text-only one)")


def examples_from_records(records: Sequence[IQARecord], task: Task) -> list[Example]:
    """Examples of a task from IQA records (benchmark, Q-Align JSON, Q-Instruct JSON), each checked.

    Raises:
        TrainingDataError: For the first record the task cannot use (see :func:`check_example`).
    """
    out = []
    for r in records:
        ex = Example(id=r.id, image=r.image_path, description=r.description, level=r.level_word,
                     score=r.mos01, distortion=r.distortion)
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
    answer = encode_answer(tokenizer, answer_text(task, example.description, example.level))
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
    length = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    spliced = []
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        row: list[int] = []
        for token, label in zip(e.ids, e.labels):
            row.extend([IGNORE_INDEX] * n_image_tokens if token == image_token_id else [label])
        spliced.append(row)
    width = max(len(r) for r in spliced)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(spliced):
        labels[i, width - len(row):] = torch.tensor(row)
    return ids, mask, labels


# --------------------------------------------------------------------------------------------- loss
def label_smoothed_nll(
    logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"], smoothing: float = 0.1
) -> tuple[Tensor, int]:
    """Eq. 2: label-smoothed negative log-likelihood of the answer tokens.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled
    IGNORE_INDEX carry no loss. Per answer token, with ``eps = smoothing`` and
    ``V`` the vocabulary size: ``(1 - eps) * -log p(y) + eps * (1/V) sum_v -log p(v)``
    (the target distribution puts ``1 - eps`` on the answer token and spreads
    ``eps`` uniformly), averaged over all answer tokens of the batch.

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
    logp = logits[:, :-1][keep].float().log_softmax(-1)  # [n, vocab]
    nll = -logp.gather(-1, targets[keep][:, None]).squeeze(-1)
    uniform = -logp.mean(-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean(), n


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - low)


# --------------------------------------------------------------------------------------------- compact model
def compact_tokenizer(records: Sequence[IQARecord], vocab_size: int = 1024, template: str = "v1") -> CompactTokenizer:
    """A BPE tokenizer trained on the benchmark's text: system sentence, questions, descriptions, answers.

    Research choice: the tokenizer sees only training-split text (pass the
    train records), so a held-out description is read with the same vocabulary
    a real user's text would be.
    """
    tpl = get_template(template)
    fixed = [tpl.prompt(f"{IMAGE_TAG}\n{ONE_STAGE_QUESTION}"), tpl.prompt(f"{IMAGE_TAG}\n{STAGE1_QUESTION}"),
             tpl.prompt(STAGE2_QUESTION, QALIGN_ANSWER_PREFIX)]
    fixed += [quality_sentence(w) for w in LEVEL_WORDS]
    descriptions = [r.description for r in records if r.description]
    # The fixed strings occur in every example, so weight them like it: BPE then merges them into
    # few pieces and every sequence is shorter.
    texts = fixed * max(2, len(descriptions) // 4) + descriptions
    # Research choice: the BPE pre-tokenizer splits on spaces only, so "bad." would become one piece
    # and the model would never emit the level word's own piece, whose logit the Q-Align rule reads.
    # Training on text with punctuation set apart learns no letter+punctuation merges, so "bad."
    # encodes as "▁bad" "." -- as LLaMA's SentencePiece does.
    texts = [_PUNCTUATION.sub(r" \1", t) for t in texts]
    tokenizer = train_compact_tokenizer(texts, vocab_size)
    check_level_pieces(tokenizer)
    return tokenizer


_PUNCTUATION = re.compile(r"([.,;:!?])")


def check_level_pieces(tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer whose quality answer does not contain the level words' own pieces.

    Q-Align reads the logit of ``tokenizer.word_id(level)`` after "The quality
    of the image is"; training must teach that very piece.

    Raises:
        ValueError: Naming the level word whose piece is missing from its answer.
    """
    for word in LEVEL_WORDS:
        ids = tokenizer.encode(quality_sentence(word))
        if tokenizer.word_id(word) not in ids:
            pieces = [tokenizer.id_to_piece(i) for i in ids]
            raise ValueError(
                f"the tokenizer encodes {quality_sentence(word)!r} as {pieces}, without the piece of {word!r} "
                f"(id {tokenizer.word_id(word)}) that the Q-Align score reads; retrain it so that the level "
                "word and the full stop are separate pieces (compact_tokenizer does)"
            )


def dct_patch_basis(patch: int, n_filters: int) -> Tensor:
    """Orthonormal patch filters ``[n_filters, 3, patch, patch]``: opponent colour x 2-D DCT-II.

    Luminance (R+G+B) at every spatial frequency first, lowest frequency first,
    then the two chroma axes (R-G, R+G-2B) interleaved from the lowest
    frequency; filters beyond ``3 * patch**2`` are N(0, 0.02).
    """
    a = [math.sqrt((1 if u == 0 else 2) / patch) for u in range(patch)]
    x = torch.arange(patch, dtype=torch.float64)
    cos = torch.stack([a[u] * torch.cos(math.pi * (2 * x + 1) * u / (2 * patch)) for u in range(patch)])
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    colours = colours / colours.norm(dim=1, keepdim=True)
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], max(f), f))
    order = [(0, f) for f in freqs] + [(c, f) for f in freqs for c in (1, 2)]
    filters = [colours[c][:, None, None] * torch.outer(cos[u], cos[v])[None] for c, (u, v) in order[:n_filters]]
    out = torch.stack(filters)
    if len(out) < n_filters:
        g = torch.Generator().manual_seed(0)
        extra = torch.randn(n_filters - len(out), 3, patch, patch, generator=g, dtype=torch.float64) * 0.02
        out = torch.cat([out, extra])
    return out.float()


def init_weights(model: MPLUGOwl2, seed: int = 0, patch_init: Literal["dct", "normal"] = "dct",
                 scheme: Literal["fan_in", "gpt2"] = "fan_in", energy_gain: float | None = 4.0,
                 pool_queries: bool = True) -> MPLUGOwl2:
    """Initialise a model for training from scratch.

    Weight matrices ~ N(0, 1/fan_in) (``scheme="fan_in"``; ``"gpt2"``: N(0, 0.02)),
    the output projection of every residual branch scaled by ``1/sqrt(2 L)``
    (L the layers of its tower), token embeddings, ``lm_head``, class token,
    positions and ``vit_eos`` N(0, 0.02), biases 0, norms 1.

    Research choices, each measured with a probe (vision tower + abstractor +
    linear heads predicting distortion type and severity, 600 steps, held-out photos):

    * ``fan_in``: at the compact widths (128-192) GPT-2's 0.02 leaves every
      pre-activation so small that the network starts almost linear and
      attention uniform; N(0, 1/fan_in) reached SRCC 0.43 in 200 steps where
      0.02 needed 400+ steps for 0.34.
    * The abstractor's ``query_embeds`` start at **zero**. Its first layer
      normalises the queries and starts its residual from them; a random start
      makes that residual a per-query constant that swamps the image (0.01% of
      the image tokens' variance came from the image), so the LLM first learns
      to ignore the image. From zero, ``LayerNorm(0) = 0``, the residual is
      what the queries read from the image (65% of the variance), and the 64
      queries still differ through their sin-cos positions.
    * ``patch_init="dct"``: the patch embedding starts as an orthonormal
      colour x DCT filter bank (:func:`dct_patch_basis`), so every vision token
      separates brightness, colour and each spatial frequency from the first
      step -- what blur, noise, compression and colour distortions change (a
      ridge regression on LayerNorm-ed DCT patch statistics alone reaches
      held-out SRCC 0.69 at 64 px). It is only an initialisation.
    * ``energy_gain`` (with ``"dct"``): the first vision block's MLP starts as a
      rectifier bank that replaces each DCT coefficient by its magnitude:
      hidden units ``k`` and ``d + k`` read ``+gain * x_k`` and ``-gain * x_k``,
      and ``fc2`` writes ``2 / gain * quick_gelu(-gain * x_k) ~ 2 relu(-x_k)``
      back to channel ``k``, so the stream leaves the block as ``|x_k|``, the
      local energy of every colour x frequency (the other hidden units start
      silent, ``fc2`` zero, and learn). Blur, noise, blocking and banding change
      these energies, not the coefficients' mean, and only a nonlinearity
      before pooling keeps them: a ridge regression from the untrained vision
      tower's mean output to the labels reaches held-out SRCC 0.65 with it,
      0.50 without.
    * ``pool_queries``: the abstractor's query projections start at zero, so
      every query attends uniformly and the 64 queries start as the image's
      average energies; a ridge on the abstractor's output reaches 0.59 (0.51
      with random query projections). Trained one-stage (1,200 steps of 16,
      960 test images of the held-out photos) the compact model reached SRCC
      0.62 with ``visual_lr_scale=0.1`` (0.51 at 1.0, 0.54 at 0.02); the
      earlier random-projection bank reached 0.36 in twice the steps.
    """
    g = torch.Generator().manual_seed(seed)
    residual_out = ("attn.out.weight", "mlp.fc2.weight", "out_proj.weight", "mlp.w2.weight",
                    "attn.o_proj.weight", "mlp.down_proj.weight")
    small = ("cls_token", "position_embedding", "vit_eos", "llm.embed.weight", "llm.unembed.weight")
    depth = {"vision": model.cfg.vision.n_layers, "abstractor": model.cfg.abstractor.n_layers,
             "llm": model.cfg.llm.n_layers}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("query_embeds"):
                p.zero_()
            elif name.endswith(small) or (p.ndim >= 2 and scheme == "gpt2"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.ndim >= 2:
                std = p[0].numel() ** -0.5
                if name.endswith(residual_out):
                    std /= math.sqrt(2 * depth[name.split(".")[0]])
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        if patch_init == "dct":
            weight = model.vision.embed.patch_embed.weight
            weight.copy_(dct_patch_basis(model.cfg.vision.patch_size, weight.shape[0]))
            if energy_gain and model.cfg.vision.d_mlp >= 2 * model.cfg.vision.d_model:
                d = model.cfg.vision.d_model
                mlp = model.vision.blocks[0].mlp
                eye = torch.eye(d)
                mlp.fc1.weight[:d] = eye * energy_gain
                mlp.fc1.weight[d : 2 * d] = -eye * energy_gain
                mlp.fc1.bias.zero_()
                mlp.fc2.weight.zero_()
                mlp.fc2.weight[:, d : 2 * d] = eye * (2 / energy_gain)  # x + 2 relu(-x) = |x|
        elif patch_init != "normal":
            raise ValueError(f"patch_init must be 'dct' or 'normal', got {patch_init!r}")
        if pool_queries:
            for block in model.abstractor.blocks:
                block.query.weight.zero_()
        if scheme not in ("fan_in", "gpt2"):
            raise ValueError(f"scheme must be 'fan_in' or 'gpt2', got {scheme!r}")
    return model


def build_compact_model(tokenizer: Tokenizer, image_size: int = 64, seed: int = 0) -> MPLUGOwl2:
    """A from-scratch compact model for a tokenizer (:meth:`ModelConfig.compact`, 65 image tokens)."""
    return init_weights(MPLUGOwl2(ModelConfig.compact(vocab_size=tokenizer.vocab_size, image_size=image_size)),
                        seed)


# --------------------------------------------------------------------------------------------- data order
class _Images:
    """Preprocessed pixels by path, cached when asked (the compact data set fits in memory)."""

    def __init__(self, processor: ImageProcessor, cache: bool) -> None:
        self.processor, self.cache = processor, cache
        self._store: dict[Path, Tensor] = {}

    def get(self, paths: Sequence[Path]) -> Tensor:
        if not self.cache:
            return self.processor(list(paths))
        missing = list(dict.fromkeys(p for p in paths if p not in self._store))
        if missing:
            self._store.update(zip(missing, self.processor(missing)))
        return torch.stack([self._store[p] for p in paths])


def _dihedral(pixels: Tensor, codes: Sequence[int]) -> Tensor:
    out = []
    for image, code in zip(pixels, codes):
        if code & 4:
            image = image.flip(-1)
        out.append(torch.rot90(image, k=code & 3, dims=(-2, -1)) if code & 3 else image)
    return torch.stack(out)


class _Order:
    """Which examples (and which augmentation) make up micro-batch ``(step, micro)``: a function of the seed.

    Research choice: epochs are seeded permutations and the position in the
    stream is computed from the step, so no sampler state needs saving and a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, cfg: TrainConfig) -> None:
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
        b = self.cfg.batch_size
        start = (step * self.cfg.grad_accum + micro) * b
        index, codes = [], []
        for i in range(start, start + b):
            perm, aug = self._epoch(i // self.n)
            index.append(int(perm[i % self.n]))
            codes.append(int(aug[i % self.n]))
        return index, codes


# --------------------------------------------------------------------------------------------- state
@dataclass
class State:
    """The resumable part of a checkpoint (tuned-lens style: a dataclass that saves and loads itself).

    Attributes:
        step: Optimizer steps taken.
        config: The run's configuration (as a dict).
        optimizer: ``optimizer.state_dict()``.
        scaler: ``GradScaler.state_dict()`` (fp16), or None.
        rng: torch, CUDA, numpy and Python RNG states.
        history: One dict per step: step, loss, lr, grad_norm, tokens, seconds.
        evals: One dict per evaluation.
        adapter: LoRA weights by module path (None: full weights live in ``model.safetensors``).
        elapsed: Training seconds so far (evaluation included).
    """

    step: int
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float | int]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Tensor] | None = None
    elapsed: float = 0.0

    def save(self, directory: str | Path) -> Path:
        """Write ``training_state.pt`` into a directory."""
        path = Path(directory) / STATE_FILE
        torch.save(dataclasses.asdict(self), path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> State:
        """Read ``training_state.pt`` from a checkpoint directory.

        Raises:
            FileNotFoundError: If there is none (the directory is a finished export, not resumable).
        """
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {directory} holds no resumable training state")
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**data)


def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": random.getstate()[0], "internal": list(random.getstate()[1]),
                   "gauss": random.getstate()[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class TrainEvent:
    """What the loop reports to a progress callback.

    Attributes:
        kind: ``"start"``, ``"step"``, ``"eval"``, ``"checkpoint"`` or ``"done"``.
        step: Steps taken.
        steps: Steps in the run.
        loss: Training loss of the step (``"step"``).
        lr: Learning rate of the step.
        grad_norm: Gradient norm before clipping.
        metrics: Evaluation results (``"eval"``, ``"done"``).
        elapsed: Seconds since the run started (resumed time included).
        label: The run's task, e.g. ``"stage1"``.
    """

    kind: str
    step: int
    steps: int
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    metrics: dict[str, Any] | None = None
    elapsed: float = 0.0
    label: str = ""


@dataclass(frozen=True)
class TrainResult:
    """A finished run.

    Attributes:
        path: The checkpoint directory.
        config: The run's configuration.
        history: Per-step records (loss, lr, grad_norm, tokens, seconds).
        evals: Evaluations, the last one at the final step.
        elapsed: Training seconds (evaluation included).
    """

    path: Path
    config: TrainConfig
    history: list[dict[str, float | int]]
    evals: list[dict[str, Any]]
    elapsed: float

    @property
    def losses(self) -> list[float]:
        """Training loss per step."""
        return [h["loss"] for h in self.history]

    @property
    def metrics(self) -> dict[str, Any]:
        """The last evaluation."""
        return self.evals[-1] if self.evals else {}


# --------------------------------------------------------------------------------------------- evaluation
def _metrics(pred: Sequence[float] | np.ndarray, truth: Sequence[float] | np.ndarray) -> dict[str, float]:
    from mechbiqa.metrics import iqa_metrics

    m = iqa_metrics(np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64), on_invalid="flag")
    return {"srcc": m.srcc, "plcc": m.plcc_raw, "plcc_fitted": m.plcc_fitted, "krcc": m.krcc}


@torch.no_grad()
def evaluate(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor | None,
    task: Task,
    examples: Sequence[Example],
    *,
    template: str = "v1",
    label_smoothing: float = 0.1,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    descriptions: Sequence[str] | None = None,
    pixels: Tensor | None = None,
) -> dict[str, Any]:
    """Held-out metrics of a model for its task.

    * every task: teacher-forced ``loss`` (Eq. 2) and ``nll`` on the answers;
    * one-stage: generate each answer, read the Q-Align score after its
      description (:class:`~mechbiqa.pipeline.OneStageRater`'s rule), then
      ``srcc``/``plcc`` against the label, ``level_acc`` (argmax level word vs
      the label's), ``family_rate`` (the description names the right
      distortion family, :func:`~mechbiqa.pipeline.match_description`);
    * stage 1: ``family_rate``, ``type_rate`` (exact distortion type), ``level_rate``;
    * stage 2: rate ``descriptions`` (default: the examples' reference
      descriptions; pass stage-1 outputs to measure the chain) -> ``srcc``,
      ``plcc``, ``level_acc``.

    Returns:
        A flat dict of numbers, plus ``"descriptions"`` (generated, one-stage/stage 1).
    """
    tpl = get_template(template)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {"n": len(examples)}
    if pixels is None and task != "stage2":
        pixels = processor([e.image for e in examples])  # type: ignore[misc]
    # Teacher-forced loss.
    encoded = [encode_example(tokenizer, tpl, task, e) for e in examples]
    total, total_nll, count = 0.0, 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask, labels = collate(chunk, tokenizer.pad_id, model.cfg.n_image_tokens)
        images = None if task == "stage2" else pixels[start : start + len(chunk)].to(model.device, model.dtype)
        logits = model(ids.to(model.device), images=images, attention_mask=mask.to(model.device)).logits
        labels = labels.to(model.device)
        loss, n = label_smoothed_nll(logits, labels, label_smoothing)
        nll, _ = label_smoothed_nll(logits, labels, 0.0)
        total, total_nll, count = total + float(loss) * n, total_nll + float(nll) * n, count + n
    out["loss"], out["nll"] = total / count, total_nll / count

    if task in ("one-stage", "stage1"):
        prompt = task_prompt(tokenizer, tpl, task)
        answers = generate_answers(model, tokenizer, [prompt] * len(examples), pixels,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        texts = [split_answer(a)[0] for a in answers] if task == "one-stage" else answers
        out["descriptions"] = texts
        out.update(_description_metrics(texts, examples))
        if task == "one-stage":
            prompts = [scoring_prompt(tokenizer, tpl, "one-stage", d) for d in texts]
            logits = score_prompts(model, tokenizer, prompts, pixels, batch_size=batch_size)
            out.update(_score_metrics(logits, examples))
    else:
        texts = list(descriptions) if descriptions is not None else [e.description or "" for e in examples]
        prompts = [scoring_prompt(tokenizer, tpl, "stage2", d) for d in texts]
        logits = score_prompts(model, tokenizer, prompts, None, batch_size=batch_size)
        out.update(_score_metrics(logits, examples))
    model.train(was_training)
    return out


def _score_metrics(logits: np.ndarray, examples: Sequence[Example]) -> dict[str, Any]:
    probs = torch.from_numpy(logits).float().softmax(-1).numpy()
    scores = probs @ np.asarray((1.0, 0.75, 0.5, 0.25, 0.0))
    out: dict[str, Any] = {"scores": scores.tolist()}
    rated = [i for i, e in enumerate(examples) if e.score is not None]
    if len(rated) >= 3:
        out.update(_metrics(scores[rated], [examples[i].score for i in rated]))  # type: ignore[misc]
    worded = [i for i, e in enumerate(examples) if e.level in LEVEL_WORDS]
    if worded:
        predicted = probs.argmax(-1)
        out["level_acc"] = float(np.mean([LEVEL_WORDS[predicted[i]] == examples[i].level for i in worded]))
    return out


def _description_metrics(texts: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    from mechbiqa.data import DISTORTIONS

    known = [(t, e) for t, e in zip(texts, examples) if e.distortion in DISTORTIONS or e.distortion == "pristine"]
    if not known:
        return {}
    family = type_ = level = 0
    for text, e in known:
        m = match_description(text)
        truth_family = "pristine" if e.distortion == "pristine" else DISTORTIONS[e.distortion].group
        family += m.family == truth_family
        type_ += m.distortion == e.distortion
        level += m.distortion == e.distortion and e.id.endswith(f"-{m.level}")
    n = len(known)
    return {"family_rate": family / n, "type_rate": type_ / n, "type_level_rate": level / n}


# --------------------------------------------------------------------------------------------- the loop
def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _autocast(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """The autocast context for the configured precision, and whether a GradScaler is needed."""
    precision = cfg.precision
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), precision == "fp16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX).

    Where it does, autocast to bf16 about halves the compact model's step time
    (measured: 2.0 s -> 1.0 s per step of 16 on one core of an AMD EPYC with
    avx512_bf16); elsewhere bf16 is emulated and slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _add_lora(model: MPLUGOwl2, cfg: TrainConfig) -> MPLUGOwl2:
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


def _adapter_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _plain_model(model: MPLUGOwl2) -> MPLUGOwl2:
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


def _write_checkpoint(directory: Path, model: MPLUGOwl2, tokenizer: Tokenizer, processor: ImageProcessor,
                      info: dict[str, Any], state: State | None, max_shard_bytes: int | None) -> None:
    """Write a complete checkpoint next to ``directory`` and swap it in, so a kill never leaves half of one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.writing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(_plain_model(model), tmp, max_shard_bytes=max_shard_bytes)
    tokenizer.save(tmp)
    processor.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    if state is not None:
        state.save(tmp)
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, directory: Path) -> None:
    old = TrainConfig.from_dict(saved)
    if (old.mode, old.stage) != (cfg.mode, cfg.stage):
        found = old.mode if old.stage is None else f"{old.mode} stage {old.stage}"
        wanted = cfg.mode if cfg.stage is None else f"{cfg.mode} stage {cfg.stage}"
        raise CheckpointModeError(
            f"{directory} holds a {found} run, but this run is {wanted}; use another out_dir or the same mode"
        )
    free = {"eval_every", "eval_samples", "checkpoint_every", "max_new_tokens", "device", "cache_images"}
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in free
              and getattr(old, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(
            f"{directory} holds a run with a different config ({', '.join(differ)} differ); resume with the same "
            "TrainConfig, or train into a new out_dir"
        )


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example] = (),
    *,
    model: MPLUGOwl2 | None = None,
    tokenizer: Tokenizer | None = None,
    processor: ImageProcessor | None = None,
    eval_descriptions: Sequence[str] | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    stop_after: int | None = None,
    extra_info: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
) -> TrainResult:
    """Train one checkpoint (one-stage, stage 1 or stage 2), resuming from ``out_dir`` if it holds a run.

    Where the weights come from, in order: a resumable state in ``out_dir``
    (same config required); ``model`` + ``tokenizer`` (+ ``processor``) passed
    in (e.g. :func:`build_compact_model`); ``cfg.init_from`` (stage 2 requires
    a two-stage stage-1 checkpoint there).

    Args:
        cfg: The run's configuration.
        out_dir: Checkpoint directory (written in the original layout, plus ``mechbiqa.json``
            and ``training_state.pt``).
        train_examples: Training examples (checked for the task).
        eval_examples: Held-out examples for periodic evaluation (``cfg.eval_samples`` of them are used).
        model: A model to train (ignored when resuming).
        tokenizer: Its tokenizer.
        processor: Its image processor (default: CLIP preprocessing at the vision tower's size).
        eval_descriptions: Stage 2: descriptions to rate at evaluation, one per eval example
            (e.g. the stage-1 model's), instead of the references.
        progress: Called with a :class:`TrainEvent` at start, every step, evaluation, checkpoint and end.
        stop_after: Stop (with a resumable checkpoint) after this many steps in total: an interrupted run.
        extra_info: Merged into ``mechbiqa.json`` (e.g. the data set's fingerprint).
        max_shard_bytes: Shard ``model.safetensors`` above this size (7B).

    Returns:
        The :class:`TrainResult`.

    Raises:
        TrainingDataError: An example the task cannot use.
        CheckpointModeError: ``out_dir`` or ``init_from`` holds a checkpoint of another mode or stage.
    """
    out_dir = Path(out_dir)
    task = cfg.task
    device = _device(cfg)
    dtype = getattr(torch, cfg.param_dtype)
    started = time.perf_counter()
    emit = progress or (lambda event: None)
    template = get_template(cfg.template)

    # ---------------------------------------------------------------- weights and state
    state: State | None = None
    if (out_dir / STATE_FILE).is_file():
        state = State.load(out_dir)
        _check_resume(state.config, cfg, out_dir)
        if cfg.lora_rank is None:
            comps = load_components(out_dir, dtype=dtype, device=device)
        else:
            comps = load_components(_require_init(cfg), dtype=dtype, device=device)
        model, tokenizer, processor = comps.model, comps.tokenizer, comps.processor
    elif model is not None:
        if tokenizer is None:
            raise ValueError("train(model=...) needs the model's tokenizer too")
        model = model.to(device=device, dtype=dtype)
        processor = processor or ImageProcessor(image_size=model.cfg.vision.image_size)
    else:
        init = _require_init(cfg)
        if task == "stage2":
            expect_checkpoint(init, "two-stage", 1)
        comps = load_components(init, dtype=dtype, device=device)
        model, tokenizer, processor = comps.model, comps.tokenizer, comps.processor
    assert tokenizer is not None and processor is not None
    if cfg.lora_rank is not None:
        model = _add_lora(model, cfg)
        if state is not None and state.adapter is not None:
            model.load_state_dict({**model.state_dict(), **{k: v.to(device) for k, v in state.adapter.items()}})
    model.train()

    # ---------------------------------------------------------------- data
    encoded = [encode_example(tokenizer, template, task, e) for e in train_examples]
    if not encoded:
        raise TrainingDataError("no training examples; pass at least one")
    held_out = list(eval_examples)
    descriptions = None if eval_descriptions is None else list(eval_descriptions)
    if cfg.eval_samples and len(held_out) > cfg.eval_samples:
        pick = np.sort(np.random.default_rng(0).choice(len(held_out), cfg.eval_samples, replace=False))
        held_out = [held_out[i] for i in pick]
        descriptions = None if descriptions is None else [descriptions[i] for i in pick]
    for e in held_out:
        check_example(e, task)
    images = _Images(processor, cfg.cache_images)
    eval_pixels = None if task == "stage2" or not held_out else processor([e.image for e in held_out])
    order = _Order(len(encoded), cfg)

    # ---------------------------------------------------------------- optimizer
    torch.manual_seed(cfg.seed)
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            visual = n.startswith(("vision.", "abstractor."))
            decays = p.ndim >= 2 and "embed" not in n
            groups.setdefault((visual, decays), []).append(p)
    use_fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
          "lr_scale": cfg.visual_lr_scale if visual else 1.0} for (visual, decays), ps in sorted(groups.items())],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, **({"fused": True} if use_fused else {}),
    )
    autocast, needs_scaler = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if needs_scaler else None
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    elapsed_before = 0.0
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        _restore_rng(state.rng)
        history, evals, elapsed_before = list(state.history), list(state.evals), state.elapsed
    step = state.step if state is not None else 0
    params = [p for p in model.parameters() if p.requires_grad]

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    def run_eval() -> dict[str, Any]:
        metrics = evaluate(model, tokenizer, processor, task, held_out, template=cfg.template,
                           label_smoothing=cfg.label_smoothing, max_new_tokens=cfg.max_new_tokens,
                           descriptions=descriptions, pixels=eval_pixels)
        record = {"step": step, "elapsed": elapsed(),
                  **{k: v for k, v in metrics.items() if k not in ("descriptions", "scores")}}
        if "descriptions" in metrics:
            record["examples"] = [{"id": e.id, "description": d} for e, d in
                                  zip(held_out[:4], metrics["descriptions"][:4])]
        evals.append(record)
        emit(TrainEvent("eval", step, cfg.steps, metrics=record, elapsed=elapsed(), label=task))
        return record

    def info(finished: bool) -> dict[str, Any]:
        return {
            "format": 1, "mode": cfg.mode, "stage": cfg.stage, "task": task, "template": cfg.template,
            "questions": {"one-stage": ONE_STAGE_QUESTION, "stage1": STAGE1_QUESTION, "stage2": STAGE2_QUESTION},
            "step": step, "steps": cfg.steps, "finished": finished, "parent": cfg.init_from,
            "train_config": cfg.to_dict(), "model_config": model.cfg.to_dict(),
            "metrics": evals[-1] if evals else None, "elapsed_seconds": elapsed(),
            "n_train_examples": len(encoded), **(extra_info or {}),
        }

    def checkpoint(finished: bool) -> None:
        st = State(step=step, config=cfg.to_dict(), optimizer=optimizer.state_dict(),
                   scaler=None if scaler is None else scaler.state_dict(), rng=_capture_rng(),
                   history=history, evals=evals,
                   adapter=None if cfg.lora_rank is None else _adapter_state(model), elapsed=elapsed())
        _write_checkpoint(out_dir, model, tokenizer, processor, info(finished), st, max_shard_bytes)
        emit(TrainEvent("checkpoint", step, cfg.steps, elapsed=elapsed(), label=task))

    emit(TrainEvent("start", step, cfg.steps, elapsed=elapsed(), label=task))
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    while step < last:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            index, codes = order.batch(step, micro)
            batch = [encoded[i] for i in index]
            ids, mask, labels = collate(batch, tokenizer.pad_id, model.cfg.n_image_tokens)
            pixels = None
            if task != "stage2":
                pixels = images.get([train_examples[i].image for i in index])  # type: ignore[misc]
                if cfg.augment != "none":
                    pixels = _dihedral(pixels, codes)
                pixels = pixels.to(device, dtype)
            with autocast():
                logits = model(ids.to(device), images=pixels, attention_mask=mask.to(device)).logits
            loss, n = label_smoothed_nll(logits, labels.to(device), cfg.label_smoothing)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            tokens += n
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm if cfg.clip_norm > 0 else float("inf")))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                        "seconds": time.perf_counter() - t0})
        emit(TrainEvent("step", step, cfg.steps, loss=loss_sum, lr=lr, grad_norm=grad_norm, elapsed=elapsed(),
                        label=task))
        if held_out and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last:
            checkpoint(finished=False)
    finished = step >= cfg.steps
    if held_out and finished and (not evals or evals[-1]["step"] != step):
        run_eval()
    checkpoint(finished=finished)
    emit(TrainEvent("done", step, cfg.steps, metrics=evals[-1] if evals else None, elapsed=elapsed(), label=task))
    return TrainResult(path=out_dir, config=cfg, history=history, evals=evals, elapsed=elapsed())


def _require_init(cfg: TrainConfig) -> str:
    if cfg.init_from is None:
        raise ValueError(
            "no weights to train: pass model= and tokenizer= (e.g. build_compact_model), or set "
            "TrainConfig.init_from to a checkpoint directory"
        )
    return cfg.init_from


def train_two_stage(
    stage1: TrainConfig,
    stage2: TrainConfig,
    parent: str | Path,
    train_records: Sequence[IQARecord],
    eval_records: Sequence[IQARecord] = (),
    *,
    model: MPLUGOwl2 | None = None,
    tokenizer: Tokenizer | None = None,
    processor: ImageProcessor | None = None,
    progress: Callable[[TrainEvent], None] | None = None,
    extra_info: dict[str, Any] | None = None,
) -> tuple[TrainResult, TrainResult]:
    """Stage 1 into ``parent/stage1``, then stage 2 from its weights into ``parent/stage2``.

    Stage 2's evaluation rates the stage-1 model's own descriptions of the
    held-out images, so its metrics are those of the chained pipeline.

    Args:
        stage1: Config with ``mode="two-stage", stage=1``.
        stage2: Config with ``mode="two-stage", stage=2`` (its ``init_from`` is set here).
        parent: Directory of the pair.
        train_records: Training records (images, descriptions, level words).
        eval_records: Held-out records.
        model: Stage-1 starting model (else ``stage1.init_from``).
        tokenizer: Its tokenizer.
        processor: Its processor.
        progress: Progress callback.
        extra_info: Merged into both ``mechbiqa.json`` files.

    Returns:
        The two results.
    """
    if (stage1.mode, stage1.stage, stage2.mode, stage2.stage) != ("two-stage", 1, "two-stage", 2):
        raise CheckpointModeError("train_two_stage needs a two-stage stage-1 config and a two-stage stage-2 config")
    parent = Path(parent)
    first = train(stage1, parent / "stage1", examples_from_records(train_records, "stage1"),
                  examples_from_records(eval_records, "stage1"), model=model, tokenizer=tokenizer,
                  processor=processor, progress=progress, extra_info=extra_info)
    eval2 = examples_from_records(eval_records, "stage2")
    described = None
    if eval2:
        comps = load_components(parent / "stage1")
        held = eval2
        if stage2.eval_samples and len(held) > stage2.eval_samples:
            pick = np.sort(np.random.default_rng(0).choice(len(held), stage2.eval_samples, replace=False))
            held = [held[i] for i in pick]
        prompt = task_prompt(comps.tokenizer, get_template(stage2.template), "stage1")
        pixels = comps.processor([e.image for e in held])
        described = generate_answers(comps.model, comps.tokenizer, [prompt] * len(held), pixels,
                                     max_new_tokens=stage2.max_new_tokens)
        eval2 = held
    second = train(stage2.replace(init_from=str(parent / "stage1")), parent / "stage2",
                   examples_from_records(train_records, "stage2"), eval2, eval_descriptions=described,
                   progress=progress, extra_info=extra_info)
    return first, second


def load_trained(path: str | Path, mode: Mode, stage: int | None = None, **kwargs: Any) -> Components:
    """Load a checkpoint written here, refusing one of another mode or stage."""
    expect_checkpoint(path, mode, stage)
    return load_components(path, **kwargs)


# Re-exported for callers that only import this module.
__all__ += ["load_trained", "read_info", "load_pretrained", "load_tokenizer"]
