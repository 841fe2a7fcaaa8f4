"""A checkpoint opened as one object: released, one-stage, or a two-stage pair.

Where it sits: `mechbiqa.model.load` reads one checkpoint directory into
`Components` (model, tokenizer, processor); `mechbiqa.pipeline` owns the task
prompts and the two raters (`OneStageRater`, `TwoStageRater`). This module is
the only place that knows the folder layouts and decides which of three kinds
a path is:

* **one-stage**: a directory with ``mechbiqa.json`` (``mode: one-stage``), written by
  `mechbiqa.train`;
* **two-stage**: a parent directory holding ``stage1/`` and ``stage2/``, each with its
  ``mechbiqa.json``;
* **released**: any other checkpoint directory (``config.json``, weights, tokenizer): Q-Align,
  Q-Instruct, One-Align, mPLUG-Owl2.

`open_checkpoint` returns a `Checkpoint` that rates (Q-Align score, level
probabilities, the scoring prompt and its roles), describes, and gives the
prompt answers are sampled from, the same way for every kind. Research choice:
a released checkpoint is rated with Q-Align's own scorer prompt (the image, then
"The quality of the image is"); its `rater` (for studies that compare the image
and text paths) is a `OneStageRater` with the released evaluation template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.prompts import LEVEL_WORDS, EncodedPrompt

if TYPE_CHECKING:
    from mechbiqa.model.load import Components
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.model.processor import ImageProcessor
    from mechbiqa.model.tokenizer import Tokenizer
    from mechbiqa.pipeline import ImageInput, OneStageRater, Rating, TwoStageRater

__all__ = ["STAGE_DIRS", "Checkpoint", "Kind", "checkpoint_kind", "open_checkpoint", "stage_paths", "weight_bytes"]

Kind = Literal["released", "one-stage", "two-stage"]

STAGE_DIRS: tuple[str, str] = ("stage1", "stage2")
"""The sub-directories of a two-stage pair (what `mechbiqa.train.train_two_stage` writes)."""

RELEASED_TEMPLATE = "mplug_owl2"
"""The template released checkpoints are evaluated with (their answers, `Checkpoint.rater`)."""


def stage_paths(path: str | Path) -> tuple[Path, Path]:
    """``path/stage1`` and ``path/stage2`` of a two-stage pair."""
    return Path(path) / STAGE_DIRS[0], Path(path) / STAGE_DIRS[1]


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) under a checkpoint of any kind (both stages of a
    pair, linked versions followed): about what its model holds in memory at that dtype."""
    import os

    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path, followlinks=True)
               for name in names if name.endswith((".safetensors", ".bin")))  # fmt: skip


def checkpoint_kind(path: str | Path) -> Kind:
    """Which kind of checkpoint a directory is (the one place folder layouts are probed).

    Raises:
        FileNotFoundError: The path is none of the three.
        mechbiqa.pipeline.CheckpointModeError: It is a single stage of a two-stage pair.
    """
    from mechbiqa.pipeline import INFO_FILE, CheckpointModeError, read_info

    path = Path(path)
    if all(p.is_dir() for p in stage_paths(path)):  # before any info file of the folder itself
        return "two-stage"
    if (path / INFO_FILE).is_file():
        info = read_info(path)
        if info.mode != "one-stage":
            raise CheckpointModeError(
                f"{path} is a single {info.describe()} checkpoint; a two-stage pair is the directory holding "
                f"{STAGE_DIRS[0]}/ and {STAGE_DIRS[1]}/ (e.g. {path.parent})"
            )
        return "one-stage"
    if (path / "config.json").is_file():
        return "released"
    raise FileNotFoundError(
        f"{path} is neither a checkpoint directory (config.json) nor a two-stage pair "
        f"({STAGE_DIRS[0]}/, {STAGE_DIRS[1]}/); pass one of those"
    )


@dataclass
class Checkpoint:
    """One opened checkpoint of any kind.

    Build it with `open_checkpoint` (a directory) or `Checkpoint.from_rater` /
    `Checkpoint.released` (models already in memory).

    Attributes:
        kind: ``"released"``, ``"one-stage"`` or ``"two-stage"``.
        rater: The pipeline rater (a released checkpoint: one-stage with its evaluation template).
        name: The path, or a name for models built in memory.
    """

    kind: Kind
    rater: OneStageRater | TwoStageRater
    name: str

    # ------------------------------------------------------------------ building
    @classmethod
    def from_rater(
        cls, rater: OneStageRater | TwoStageRater, name: str | None = None, kind: Kind | None = None
    ) -> Checkpoint:
        """Wrap a rater (e.g. `mechbiqa.sources.tiny_raters`)."""
        from mechbiqa.pipeline import OneStageRater

        kind = kind or ("one-stage" if isinstance(rater, OneStageRater) else "two-stage")
        return cls(kind=kind, rater=rater, name=name or str(rater_parts(rater)[0].path))

    @classmethod
    def released(
        cls,
        components: Components,
        *,
        template: str = RELEASED_TEMPLATE,
        max_new_tokens: int = 48,
        name: str | None = None,
    ) -> Checkpoint:
        """A checkpoint without ``mechbiqa.json`` (or a random model): rated by Q-Align's scorer prompt."""
        from mechbiqa.pipeline import OneStageRater

        rater = OneStageRater(components, template=template, max_new_tokens=max_new_tokens)
        return cls(kind="released", rater=rater, name=name or str(components.path))

    # ------------------------------------------------------------------ parts
    @property
    def mode(self) -> str:
        """``"two-stage"`` for a pair, else ``"one-stage"`` (a released checkpoint answers in one go)."""
        return "two-stage" if self.kind == "two-stage" else "one-stage"

    @property
    def parts(self) -> tuple[Components, ...]:
        """The loaded directories: one, or stage 1 and stage 2."""
        return rater_parts(self.rater)

    @property
    def describer(self) -> Components:
        """The components that see the image (stage 1 of a pair)."""
        return self.parts[0]

    @property
    def scorer(self) -> Components:
        """The components whose forward reads the quality word (stage 2 of a pair)."""
        return self.parts[-1]

    @property
    def processor(self) -> ImageProcessor:
        """The image processor (of the model that sees the image)."""
        return self.describer.processor

    @property
    def model(self) -> MPLUGOwl2:
        """The scoring model."""
        return self.scorer.model

    @property
    def tokenizer(self) -> Tokenizer:
        """The scoring model's tokenizer."""
        return self.scorer.tokenizer

    @property
    def image_at_quality(self) -> bool:
        """Whether the quality position reads image tokens (False for a pair: stage 2 is text only)."""
        return self.kind != "two-stage"

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Checkpoint:
        """Move every model (in place); returns self."""
        for part in self.parts:
            part.model.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ use
    def pixels(self, images: Sequence[ImageInput] | Tensor) -> Tensor:
        """Preprocessed pixels ``[n, 3, S, S]`` (tensors are passed through)."""
        return images if isinstance(images, Tensor) else self.processor(list(images))

    @torch.no_grad()
    def rate(self, images: Sequence[ImageInput] | Tensor, batch_size: int = 64) -> list[Rating]:
        """Rate each image: Q-Align score, level probabilities, the scoring prompt and its roles.

        One-stage and two-stage checkpoints rate as their pipeline rater (description, then the
        quality word after it); a released checkpoint with Q-Align's scorer prompt.
        """
        if self.kind != "released":
            return self.rater.rate(images, batch_size=batch_size)
        return self._rate_scorer_prompt(self.pixels(images), batch_size)

    def _rate_scorer_prompt(self, pixels: Tensor, batch_size: int) -> list[Rating]:
        from mechbiqa.model.roles import batch_prompts
        from mechbiqa.pipeline import Rating
        from mechbiqa.scoring import level_ids, level_probs, qalign_from_probs, quality_logits, scorer_prompt

        c = self.scorer
        prompt = scorer_prompt(c.tokenizer)
        if not len(pixels):
            return []
        batch = batch_prompts(
            [prompt] * len(pixels),
            pad_id=c.tokenizer.pad_id,
            n_image_tokens=c.model.cfg.n_image_tokens,
            bos_id=c.tokenizer.bos_id,
        )
        logits = quality_logits(c.model, batch, pixels, batch_size=batch_size)[:, level_ids(c.tokenizer)]
        probs = level_probs(logits, list(range(len(LEVEL_WORDS)))).numpy()
        return [
            Rating(description="", answer="", prompt=prompt, roles=batch.roles[i].unpadded(),
                   description_span=None, level_logits=logits[i].numpy(), level_probs=probs[i],
                   score=float(qalign_from_probs(probs[i])), level=LEVEL_WORDS[int(np.argmax(probs[i]))])
            for i in range(len(pixels))
        ]  # fmt: skip

    @torch.no_grad()
    def describe(self, images: Sequence[ImageInput] | Tensor, batch_size: int = 64) -> list[str]:
        """A greedy description per image.

        Stage 1 of a pair; a one-stage answer before its quality sentence; a released
        checkpoint's whole answer to Q-Align's question.
        """
        from mechbiqa.pipeline import TwoStageRater, generate_answers, split_answer

        if isinstance(self.rater, TwoStageRater):
            return self.rater.describe(images, batch_size=batch_size)
        c, pixels = self.describer, self.pixels(images)
        answers = generate_answers(
            c.model,
            c.tokenizer,
            [self.sample_prompt()] * len(pixels),
            pixels,
            max_new_tokens=self.rater.max_new_tokens,
            batch_size=batch_size,
        )
        return answers if self.kind == "released" else [split_answer(a)[0] for a in answers]

    def sample_prompt(self) -> EncodedPrompt:
        """The prompt answers are drawn from with the image (its answer left open).

        One-stage: its task prompt (description, then the quality sentence); a pair: the
        stage-1 prompt; a released checkpoint: Q-Align's question with an open answer.
        """
        from mechbiqa.pipeline import task_prompt

        c = self.describer
        if self.kind == "released":
            from mechbiqa_hooks.record import PromptConfig

            return PromptConfig().encode(c.tokenizer, "generate")
        return task_prompt(
            c.tokenizer, self.rater.template, "one-stage" if self.kind == "one-stage" else "stage1"
        )

    def stage2_prompt(self, description: str) -> EncodedPrompt:
        """A pair's stage-2 prompt for a description (text only, answer open)."""
        from mechbiqa.pipeline import task_prompt

        if self.kind != "two-stage":
            raise ValueError(f"{self.name} is a {self.kind} checkpoint: it has no stage 2")
        return task_prompt(self.scorer.tokenizer, self.rater.template, "stage2", description)


def rater_parts(rater: OneStageRater | TwoStageRater) -> tuple[Components, ...]:
    """A rater's loaded directories: ``(components,)`` or ``(stage1, stage2)``."""
    from mechbiqa.pipeline import OneStageRater

    return (rater.components,) if isinstance(rater, OneStageRater) else (rater.stage1, rater.stage2)


def open_checkpoint(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    max_new_tokens: int = 48,
    template: str | None = None,
    released_template: str = RELEASED_TEMPLATE,
) -> Checkpoint:
    """Open a released checkpoint, a one-stage checkpoint, or a two-stage pair.

    Args:
        path: The directory (a pair: the parent of ``stage1/`` and ``stage2/``).
        dtype: Model dtype (``"float32"``, ``"bfloat16"`` ... or a torch dtype).
        device: ``cpu``, ``cuda`` ...
        max_new_tokens: Longest generated description.
        template: Conversation template (default: the one in ``mechbiqa.json``).
        released_template: Template of a released checkpoint's answers.

    Raises:
        FileNotFoundError: The path is not a checkpoint.
        mechbiqa.pipeline.CheckpointModeError: The path is one stage of a pair, or a pair's stages
            are not stage 1 and stage 2 of a two-stage run.
    """
    from mechbiqa.model.load import load_components
    from mechbiqa.pipeline import OneStageRater, TwoStageRater, expect_checkpoint

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(path)
    kind = checkpoint_kind(path)
    load = lambda p: load_components(p, dtype=dtype, device=device)  # noqa: E731
    if kind == "released":
        return Checkpoint.released(
            load(path), template=released_template, max_new_tokens=max_new_tokens, name=str(path)
        )
    if kind == "one-stage":
        from mechbiqa.qscorer import QScorerRater, is_qscorer, load_qscorer

        info = expect_checkpoint(path, "one-stage")
        rater: OneStageRater | TwoStageRater = (
            QScorerRater(load_qscorer(path, dtype=dtype, device=device, max_new_tokens=max_new_tokens))
            if is_qscorer(path)  # a one-stage rater whose ratings add the score token and regression
            else OneStageRater(load(path), template=template or info.template, max_new_tokens=max_new_tokens)
        )
    else:
        from dataclasses import replace

        from mechbiqa.model.load import find_weight_files

        first, second = stage_paths(path)
        info = expect_checkpoint(first, "two-stage", 1)
        expect_checkpoint(second, "two-stage", 2)
        stage1 = load(first)
        same = {p.resolve() for p in find_weight_files(first)} == {p.resolve() for p in find_weight_files(second)}
        stage2 = replace(stage1, path=second) if same else load(second)  # one set of weights: loaded once
        rater = TwoStageRater(stage1, stage2, template=template or info.template, max_new_tokens=max_new_tokens)
    return Checkpoint(kind=kind, rater=rater, name=str(path))
