"""One-stage and two-stage rating: the prompt formats of both tuning modes, and inference that chains them.

This file is where the two kinds of checkpoint written by :mod:`mechbiqa.train`
are *used*. It owns the task formats (which question, which answer, which
template), so training (:mod:`mechbiqa.train`) and inference read the same
strings:

* **one-stage** (image + question -> description + quality sentence): the
  model describes the image, then says "The quality of the image is {level}."
  in the same answer;
* **two-stage**, stage 1 (image + question -> description) and stage 2 (text
  only: description + question -> quality sentence). At inference the stage-1
  model describes the image and the stage-2 model, a separate checkpoint
  directory fine-tuned from the stage-1 weights, rates that description alone.

Quality position (what studies read). Research choice: for both modes the
score is read from a *canonical scoring prompt* built after generation, not
from the logits produced while generating. The one-stage model's own
description is re-encoded as the start of its answer, followed by "The
quality of the image is"; the stage-2 prompt holds the stage-1 description in
the user turn and ends with the same prefix. The level-word logits at the last
position of that prompt give the Q-Align score (:func:`mechbiqa.scoring.qalign_score`).
Every :class:`Rating` carries that prompt (an
:class:`~mechbiqa.model.prompts.EncodedPrompt`, ``quality_index`` included) and
its token roles, so an activation study re-runs exactly the prompt that was
scored. In a stage-2 prompt the description sits in the user turn; its
positions are given the ``description`` role here (``assign_roles`` alone would
call them ``instruction``), so "attention from the quality token to the
description" means the same thing in both modes.

The template is the one the checkpoint was trained with (``v1``, recorded in
its ``mechbiqa.json``): the compact model never saw another, whereas the real
Q-Align models were trained with ``v1`` and evaluated with ``mplug_owl2``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mechbiqa.data.annotations import split_verdict
from mechbiqa.model.load import Components, load_components
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import (
    LEVEL_WORDS,
    QALIGN_ANSWER_PREFIX,
    ConversationTemplate,
    EncodedPrompt,
    encode_prompt,
    get_template,
)
from mechbiqa.model.roles import Role, TokenRoles, assign_roles, batch_prompts
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.scoring import level_ids, level_probs, qalign_from_probs, quality_logits

__all__ = [
    "Mode",
    "Task",
    "TASKS",
    "ONE_STAGE_QUESTION",
    "STAGE1_QUESTION",
    "STAGE2_QUESTION",
    "INFO_FILE",
    "CheckpointModeError",
    "CheckpointInfo",
    "read_info",
    "expect_checkpoint",
    "quality_sentence",
    "answer_text",
    "user_turn",
    "task_prompt",
    "scoring_prompt",
    "Rating",
    "generate_answers",
    "split_answer",
    "score_prompts",
    "OneStageRater",
    "TwoStageRater",
    "load_rater",
    "DescriptionMatch",
    "match_description",
]

Mode = Literal["one-stage", "two-stage"]
Task = Literal["one-stage", "stage1", "stage2"]
TASKS: tuple[str, ...] = ("one-stage", "stage1", "stage2")

STAGE1_QUESTION = "Describe the visual attributes that affect the quality of this image."
"""Stage 1 (image -> description). Contains no level word."""
ONE_STAGE_QUESTION = "Describe the visual attributes that affect the quality of this image, then rate its quality."
"""One-stage (image -> description + quality sentence)."""
STAGE2_QUESTION = "How would you rate the quality of the image described above?"
"""Stage 2 (text only): follows the description in the user turn."""

INFO_FILE = "mechbiqa.json"
"""Written beside ``config.json`` in every checkpoint directory of :mod:`mechbiqa.train`."""

_INFO_FORMAT = 1


class CheckpointModeError(ValueError):
    """A checkpoint was trained for another mode or stage than the caller needs."""


# --------------------------------------------------------------------------- checkpoint identity
@dataclass(frozen=True)
class CheckpointInfo:
    """What ``mechbiqa.json`` says about a checkpoint directory.

    Attributes:
        mode: ``"one-stage"`` or ``"two-stage"``.
        stage: 1 or 2 for two-stage checkpoints, None for one-stage.
        template: Conversation template the checkpoint was trained with.
        step: Optimizer steps taken.
        data: Everything else in the file (training config, metrics, parent).
    """

    mode: Mode
    stage: int | None
    template: str
    step: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> Task:
        """``"one-stage"``, ``"stage1"`` or ``"stage2"``."""
        return "one-stage" if self.mode == "one-stage" else f"stage{self.stage}"  # type: ignore[return-value]

    def describe(self) -> str:
        """E.g. ``"two-stage stage 1"``."""
        return self.mode if self.stage is None else f"{self.mode} stage {self.stage}"


def read_info(path: str | Path) -> CheckpointInfo:
    """Read ``mechbiqa.json`` from a checkpoint directory.

    Raises:
        FileNotFoundError: If the directory has no ``mechbiqa.json`` (not trained by mechbiqa.train).
        ValueError: If the file is malformed.
    """
    file = Path(path) / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{Path(path)} has no {INFO_FILE}: it was not written by mechbiqa.train, so its mode "
            "(one-stage / two-stage) is unknown; train it with mechbiqa.train or pass the mode explicitly"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        mode, stage = data["mode"], data.get("stage")
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{file} is not a mechbiqa checkpoint description ({error}); rewrite it") from None
    if mode not in ("one-stage", "two-stage") or (mode == "two-stage") != (stage in (1, 2)):
        raise ValueError(f"{file} has mode={mode!r}, stage={stage!r}; expected one-stage/None or two-stage/1|2")
    return CheckpointInfo(mode=mode, stage=stage, template=data.get("template", "v1"),
                          step=int(data.get("step", 0)), data=data)


def expect_checkpoint(path: str | Path, mode: Mode, stage: int | None = None) -> CheckpointInfo:
    """Read a checkpoint's info and refuse one of another mode or stage.

    Args:
        path: The checkpoint directory.
        mode: The mode the caller needs.
        stage: The stage the caller needs (two-stage only).

    Returns:
        The checkpoint's info.

    Raises:
        CheckpointModeError: Naming what was found, what was needed, and the fix.
    """
    info = read_info(path)
    if info.mode != mode or info.stage != stage:
        wanted = mode if stage is None else f"{mode} stage {stage}"
        raise CheckpointModeError(
            f"{Path(path)} is a {info.describe()} checkpoint, but a {wanted} checkpoint is needed here; "
            "pass a checkpoint trained in that mode (a two-stage pair is the directory holding both stages)"
        )
    return info


# --------------------------------------------------------------------------- task formats
def quality_sentence(level: str) -> str:
    """The quality answer: ``"The quality of the image is {level}."``."""
    if level not in LEVEL_WORDS:
        raise ValueError(f"level {level!r} is not one of the level words {LEVEL_WORDS}")
    return f"{QALIGN_ANSWER_PREFIX} {level}."


def answer_text(task: Task, description: str | None, level: str | None) -> str:
    """The assistant's training answer of a task.

    Args:
        task: ``"one-stage"``, ``"stage1"`` or ``"stage2"``.
        description: The description (one-stage, stage 1).
        level: The level word (one-stage, stage 2).

    Returns:
        ``description`` (stage 1); ``quality_sentence(level)`` (stage 2);
        ``description + " " + quality_sentence(level)`` (one-stage).
    """
    if task == "stage1":
        return description or ""
    if task == "stage2":
        return quality_sentence(level or "")
    if task == "one-stage":
        return f"{description} {quality_sentence(level or '')}"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def user_turn(task: Task, description: str | None = None) -> tuple[str, int]:
    """The user's question of a task (without image tags) and the number of images.

    Stage 2 puts the description first, then :data:`STAGE2_QUESTION`, and no image.
    """
    if task == "stage1":
        return STAGE1_QUESTION, 1
    if task == "one-stage":
        return ONE_STAGE_QUESTION, 1
    if task == "stage2":
        return f"{(description or '').strip()} {STAGE2_QUESTION}".strip(), 0
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def task_prompt(tokenizer: Tokenizer, template: ConversationTemplate, task: Task,
                description: str | None = None) -> EncodedPrompt:
    """The prompt a task's answer follows (ends with ``"ASSISTANT:"``; image tag first, then a newline).

    This is the training layout of mPLUG-Owl2 (``preprocess_multimodal`` moves
    the tag to the start of the user turn).
    """
    question, n_images = user_turn(task, description)
    return encode_prompt(tokenizer, template, question, image_first=True, n_images=n_images, image_sep="\n",
                         scores_quality=False)


def scoring_prompt(tokenizer: Tokenizer, template: ConversationTemplate, task: Task,
                   description: str) -> EncodedPrompt:
    """The prompt whose last position is the quality position.

    One-stage: the question with the image, then the model's own description
    as the start of the answer, then "The quality of the image is". Stage 2:
    the description and the question in the user turn (text only), then the
    answer prefix.
    """
    if task == "one-stage":
        return encode_prompt(tokenizer, template, ONE_STAGE_QUESTION, image_first=True, n_images=1,
                             image_sep="\n", description=description.strip(), answer_prefix=QALIGN_ANSWER_PREFIX)
    if task == "stage2":
        question, _ = user_turn("stage2", description)
        return encode_prompt(tokenizer, template, question, image_first=True, n_images=0,
                             answer_prefix=QALIGN_ANSWER_PREFIX)
    raise ValueError(f"only one-stage and stage2 prompts lead to a quality word, not {task!r}")


def _description_span(tokenizer: Tokenizer, template: ConversationTemplate, task: Task,
                      description: str, prompt: EncodedPrompt) -> tuple[int, int] | None:
    """Text-space ``[start, end)`` of the description inside a scoring prompt, or None if empty."""
    description = description.strip()
    if not description:
        return None
    if task == "one-stage":
        # The answer starts with the description; the prefix follows after a space (a piece boundary).
        without = encode_prompt(tokenizer, template, ONE_STAGE_QUESTION, image_first=True, n_images=1,
                                image_sep="\n", description=description, scores_quality=False)
        return prompt.response_start, len(without.ids)
    # Stage 2: the user turn is "{description} {question}"; both boundaries are spaces, so the
    # tokens of the text up to either boundary are a prefix of the prompt's tokens.
    head = template.render([(template.roles[0], "x")])
    head = head[: head.rindex("x")]
    start = len(_text_ids(tokenizer, head.rstrip()))
    end = len(_text_ids(tokenizer, head + description))
    return start, end


def _text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def _roles(prompt: EncodedPrompt, span: tuple[int, int] | None, n_image_tokens: int) -> TokenRoles:
    roles = assign_roles(prompt.ids, response_start=prompt.response_start, quality_index=prompt.quality_index,
                         n_image_tokens=n_image_tokens)
    if span is None or span[0] >= prompt.response_start:
        return roles
    # Stage 2: the description lies in the user turn; give it the description role.
    role = roles.role.copy()
    inside = (roles.source_index >= span[0]) & (roles.source_index < span[1]) & (role == Role.INSTRUCTION)
    role[inside] = Role.DESCRIPTION
    role.setflags(write=False)
    return replace(roles, role=role)


# --------------------------------------------------------------------------- inference pieces
@dataclass(frozen=True)
class Rating:
    """One image rated by a pipeline.

    Attributes:
        description: The description the quality word was read after (generated).
        answer: The full generated answer (one-stage: description and perhaps its own verdict).
        prompt: The scoring prompt; ``prompt.quality_index`` is the quality position (text space).
        roles: Token roles of the spliced scoring prompt (``roles.quality_position`` in spliced space).
        description_span: Text-space ``[start, end)`` of the description in ``prompt.ids``.
        level_logits: ``[5]`` logits of excellent, good, fair, poor, bad at the quality position.
        level_probs: ``[5]`` softmax over those five.
        score: Q-Align score, 0-1.
        level: The most probable level word.
    """

    description: str
    answer: str
    prompt: EncodedPrompt
    roles: TokenRoles
    description_span: tuple[int, int] | None
    level_logits: np.ndarray
    level_probs: np.ndarray
    score: float
    level: str


ImageInput = str | Path | Image.Image


def _pixels(processor: ImageProcessor, images: Sequence[ImageInput] | Tensor) -> Tensor:
    if isinstance(images, Tensor):
        return images
    return processor(list(images))


@torch.no_grad()
def generate_answers(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None = None,
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers to prompts (one image per prompt with a placeholder), cut at EOS.

    Args:
        model: The model.
        tokenizer: Its tokenizer.
        prompts: Prompts ending with ``"ASSISTANT:"``.
        pixels: ``[n, 3, S, S]``, one per prompt holding an image, in order; None for text only.
        max_new_tokens: Longest answer.
        batch_size: Prompts per forward.

    Returns:
        The decoded answers, stripped.
    """
    answers: list[str] = []
    batch = batch_prompts(prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens,
                          bos_id=tokenizer.bos_id)
    for _, sub in batch.split(batch_size):
        images = sub.pixels(pixels)
        out = model.generate(sub.input_ids.to(model.device),
                             images=None if images is None else images.to(model.device, model.dtype),
                             attention_mask=sub.attention_mask.to(model.device),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_id)
        for row in out[:, sub.input_ids.shape[1]:].tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            answers.append(tokenizer.decode(row).strip())
    return answers


def split_answer(answer: str) -> tuple[str, str | None]:
    """Split a one-stage answer into its description and the level word it gave (or None).

    The description is the text before the first "The quality of the image is".
    A model tuned on Q-Pathway / Q-Instruct answers ends its reasoning with a
    verdict sentence of its own ("... Thus, the quality of the image is poor."):
    without the prefix, that last sentence is cut off as the verdict
    (`mechbiqa.data.annotations.split_verdict`, the rule that built the training
    targets), so the scoring prompt never follows an answer already given. Else
    the whole answer is the description.
    """
    at = answer.find(QALIGN_ANSWER_PREFIX)
    if at < 0:
        reasoning, verdict, level = split_verdict(answer)
        return (reasoning, level) if verdict is not None else (answer.strip(), None)
    found = re.match(r"\s*(\w+)", answer[at + len(QALIGN_ANSWER_PREFIX):])
    word = found.group(1).lower() if found else None
    return answer[:at].strip(), word if word in LEVEL_WORDS else None


@torch.no_grad()
def score_prompts(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    prompts: Sequence[EncodedPrompt],
    pixels: Tensor | None = None,
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits of the five level words (best first) at each prompt's last position: ``[n, 5]``."""
    if not prompts:
        return np.zeros((0, 5), dtype=np.float32)
    batch = batch_prompts(prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens,
                          bos_id=tokenizer.bos_id)
    return quality_logits(model, batch, pixels, batch_size=batch_size)[:, level_ids(tokenizer)].numpy()


def _ratings(tokenizer: Tokenizer, template: ConversationTemplate, task: Task, descriptions: Sequence[str],
             answers: Sequence[str], prompts: Sequence[EncodedPrompt], logits: np.ndarray,
             n_image_tokens: int) -> list[Rating]:
    probs = level_probs(torch.from_numpy(logits), list(range(5))).numpy()
    ratings = []
    for i, prompt in enumerate(prompts):
        span = _description_span(tokenizer, template, task, descriptions[i], prompt)
        ratings.append(Rating(
            description=descriptions[i], answer=answers[i], prompt=prompt,
            roles=_roles(prompt, span, n_image_tokens), description_span=span,
            level_logits=logits[i], level_probs=probs[i], score=float(qalign_from_probs(probs[i])),
            level=LEVEL_WORDS[int(probs[i].argmax())],
        ))  # fmt: skip
    return ratings


# --------------------------------------------------------------------------- the two raters
class OneStageRater:
    """A one-stage checkpoint: describe the image and rate it in one answer.

    Args:
        components: Model, tokenizer and processor of a one-stage checkpoint.
        template: Template name (default: the one in ``mechbiqa.json``, else ``v1``).
        max_new_tokens: Longest generated answer.
    """

    mode: Mode = "one-stage"

    def __init__(self, components: Components, template: str | None = None, max_new_tokens: int = 48) -> None:
        """Wrap loaded components."""
        self.components = components
        self.template = get_template(template or _template_of(components.path))
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> OneStageRater:
        """Load a one-stage checkpoint directory; refuse any other mode."""
        info = expect_checkpoint(path, "one-stage")
        return cls(load_components(path, device=device), template=kwargs.pop("template", info.template), **kwargs)

    @torch.no_grad()
    def rate(self, images: Sequence[ImageInput] | Tensor, batch_size: int = 64) -> list[Rating]:
        """Generate each answer, then read the level logits after its description.

        Args:
            images: Paths, PIL images, or preprocessed pixels ``[n, 3, S, S]``.
            batch_size: Images per forward.
        """
        c = self.components
        pixels = _pixels(c.processor, images)
        ask = task_prompt(c.tokenizer, self.template, "one-stage")
        answers = generate_answers(c.model, c.tokenizer, [ask] * len(pixels), pixels,
                                   max_new_tokens=self.max_new_tokens, batch_size=batch_size)
        descriptions = [split_answer(a)[0] for a in answers]
        prompts = [scoring_prompt(c.tokenizer, self.template, "one-stage", d) for d in descriptions]
        logits = score_prompts(c.model, c.tokenizer, prompts, pixels, batch_size=batch_size)
        return _ratings(c.tokenizer, self.template, "one-stage", descriptions, answers, prompts, logits,
                        c.model.cfg.n_image_tokens)


class TwoStageRater:
    """A two-stage pair: the stage-1 model describes, the stage-2 model rates the description alone.

    Args:
        stage1: Components of the stage-1 checkpoint.
        stage2: Components of the stage-2 checkpoint.
        template: Template name (default: the stage-1 checkpoint's).
        max_new_tokens: Longest generated description.
    """

    mode: Mode = "two-stage"

    def __init__(self, stage1: Components, stage2: Components, template: str | None = None,
                 max_new_tokens: int = 48) -> None:
        """Wrap loaded components."""
        self.stage1, self.stage2 = stage1, stage2
        self.template = get_template(template or _template_of(stage1.path))
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> TwoStageRater:
        """Load a two-stage pair (`mechbiqa.checkpoint.open_checkpoint`); refuse any other kind."""
        from mechbiqa.checkpoint import open_checkpoint

        checkpoint = open_checkpoint(path, device=device, **kwargs)
        if checkpoint.kind != "two-stage":
            raise CheckpointModeError(
                f"{path} is a {checkpoint.kind} checkpoint, but a two-stage pair is needed here: "
                "pass the directory holding both stages"
            )
        return checkpoint.rater  # type: ignore[return-value]

    @torch.no_grad()
    def describe(self, images: Sequence[ImageInput] | Tensor, batch_size: int = 64) -> list[str]:
        """Stage 1 only: a description per image."""
        c = self.stage1
        pixels = _pixels(c.processor, images)
        ask = task_prompt(c.tokenizer, self.template, "stage1")
        return generate_answers(c.model, c.tokenizer, [ask] * len(pixels), pixels,
                                max_new_tokens=self.max_new_tokens, batch_size=batch_size)

    @torch.no_grad()
    def rate_descriptions(self, descriptions: Sequence[str], answers: Sequence[str] | None = None,
                          batch_size: int = 64) -> list[Rating]:
        """Stage 2 only: rate descriptions (text only)."""
        c = self.stage2
        prompts = [scoring_prompt(c.tokenizer, self.template, "stage2", d) for d in descriptions]
        logits = score_prompts(c.model, c.tokenizer, prompts, None, batch_size=batch_size)
        return _ratings(c.tokenizer, self.template, "stage2", list(descriptions),
                        list(answers if answers is not None else descriptions), prompts, logits,
                        c.model.cfg.n_image_tokens)

    def rate(self, images: Sequence[ImageInput] | Tensor, batch_size: int = 64) -> list[Rating]:
        """Describe each image with stage 1, then rate the description with stage 2."""
        descriptions = self.describe(images, batch_size=batch_size)
        return self.rate_descriptions(descriptions, batch_size=batch_size)


def load_rater(path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> OneStageRater | TwoStageRater:
    """A one-stage checkpoint, or a two-stage pair (`mechbiqa.checkpoint.open_checkpoint` opens any kind)."""
    from mechbiqa.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path, device=device, **kwargs)
    if checkpoint.kind == "released":
        raise FileNotFoundError(
            f"{path} has no {INFO_FILE}: it was not written by mechbiqa.train; open it with "
            "mechbiqa.checkpoint.open_checkpoint (a released checkpoint)"
        )
    return checkpoint.rater


def _template_of(path: Path) -> str:
    try:
        return read_info(path).template
    except FileNotFoundError:
        return "v1"


# --------------------------------------------------------------------------- reading descriptions
@dataclass(frozen=True)
class DescriptionMatch:
    """The benchmark phrasing nearest to a description.

    Attributes:
        distortion: Distortion type of the nearest phrasing (``"pristine"`` for a clean image).
        level: Its level (0 for pristine).
        family: The KADID group of the type (blur, color, ...), or ``"pristine"``.
        similarity: ROUGE-1 F1 between the description and that phrasing.
    """

    distortion: str
    level: int
    family: str
    similarity: float


_PHRASINGS: dict[tuple[str, ...], list[tuple[str, int, str, str]]] = {}


def match_description(text: str, distortions: Sequence[str] | None = None) -> DescriptionMatch:
    """Which benchmark distortion a (generated) description names: the nearest phrasing by ROUGE-1.

    Research choice: generated text is matched against every phrasing the
    benchmark's describer can produce (:func:`mechbiqa.data.descriptions.all_descriptions`)
    rather than by keywords, so a description counts as naming a family only
    when it is closest, as a whole, to that family's wording. The similarity is
    ROUGE-1 F1 of `mechbiqa.analysis.rouge` (``rouge-score``, unstemmed).

    Args:
        text: A description.
        distortions: Candidate types (default: the benchmark's default types).
    """
    from mechbiqa.analysis.rouge import nearest
    from mechbiqa.data import DEFAULT_DISTORTIONS, DISTORTIONS
    from mechbiqa.data.descriptions import all_descriptions

    key = tuple(distortions or DEFAULT_DISTORTIONS)
    if key not in _PHRASINGS:
        table = []
        cells = [("pristine", 0)] + [(d, lv) for d in key for lv in range(1, 6)]
        for name, level in cells:
            family = "pristine" if level == 0 else DISTORTIONS[name].group
            phrases = all_descriptions(None if level == 0 else name, level)
            table += [(name, level, family, phrase) for phrase in phrases]
        _PHRASINGS[key] = table
    index, similarity = nearest(text, [row[3] for row in _PHRASINGS[key]])
    best = _PHRASINGS[key][index]
    return DescriptionMatch(distortion=best[0], level=best[1], family=best[2], similarity=similarity)
