"""Conversation templates, the exact scorer prompts, and prompt tokenization.

This file turns a question (and, for training, an answer) into the text-space
ids the model reads: the template renders the conversation text as mPLUG-Owl2's
``conversation.py`` does, :func:`tokenize_prompt` tokenizes it chunk by chunk
around ``<|image|>`` as ``mm_utils.tokenizer_image_token`` does (with a
:class:`~mechbiqa.model.tokenizer.Tokenizer`), and :func:`encode_prompt` also
records where the answer starts and which position chooses the quality word.
:mod:`mechbiqa.model.roles` turns those indices into a role per spliced position;
the model replaces each ``-200`` placeholder with the image's 65 tokens.

Which prompt the original code used where (fact sheet §10, §12 item 6):

* inference and evaluation use the ``mplug_owl2`` template (no system text);
* training used ``v1`` (with the system sentence, image tag first);
* Q-Align's scorer and Q-Instruct's scorer hard-code strings whose turn
  separator is a newline; :data:`QALIGN_SCORER` and :data:`QINSTRUCT_SCORER`
  are templates that render them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mechbiqa.model.config import LEVEL_WORDS
from mechbiqa.model.tokenizer import IMAGE_TAG, IMAGE_TOKEN_ID, Tokenizer

__all__ = [
    "IMAGE_TAG",
    "IMAGE_TOKEN_ID",
    "LEVEL_WORDS",
    "LEVEL_WEIGHTS",
    "QALIGN_EVAL_WORDS",
    "ConversationTemplate",
    "MPLUG_OWL2",
    "V1",
    "QALIGN_SCORER",
    "QINSTRUCT_SCORER",
    "TEMPLATES",
    "QALIGN_QUESTION",
    "QALIGN_ANSWER_PREFIX",
    "QALIGN_TRAIN_QUESTION",
    "QINSTRUCT_QUESTION",
    "QALIGN_SCORER_PROMPT",
    "QALIGN_EVAL_PROMPT",
    "QINSTRUCT_SCORER_PROMPT",
    "QINSTRUCT_EVAL_PROMPT",
    "qalign_scorer_prompt",
    "tokenize_prompt",
    "EncodedPrompt",
    "encode_prompt",
    "encode_answer",
    "find_quality_index",
    "get_template",
]

# --------------------------------------------------------------------------- levels
# LEVEL_WORDS (Q-Align's five level words, best first) is defined in config.py and re-exported here.

LEVEL_WEIGHTS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
"""Q-Align ``scorer.py`` weights of :data:`LEVEL_WORDS` (score in [0, 1])."""

QALIGN_EVAL_WORDS: tuple[str, ...] = (
    "good", "poor", "high", "fair", "low", "excellent", "bad",
    "fine", "moderate", "decent", "average", "medium", "acceptable",
)  # fmt: skip
"""The 13 words whose logits Q-Align's evaluation scripts dump (first piece each)."""


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True, slots=True)
class ConversationTemplate:
    r"""An mPLUG-Owl2 conversation template (``SeparatorStyle.TWO`` / ``TWO_NO_SYS``).

    Rendering follows ``Conversation.get_prompt``: the system text (if emitted)
    and ``sep``, then for each message ``role + ": " + message`` followed by
    ``sep`` after a user turn and ``sep2`` after an assistant turn; an open
    (empty) message renders as ``role + ":"``.

    Attributes:
        name: Registry name.
        system: The template's system sentence.
        emit_system: Whether the system sentence is rendered (``v1``: yes;
            ``mplug_owl2``: no, style ``TWO_NO_SYS`` drops it).
        roles: User and assistant role names.
        sep: Text after a user turn (``" "``; ``"\\n"`` in the scorer strings).
        sep2: Text after an assistant turn.
        open_suffix: Text after ``"ASSISTANT:"`` when the open answer is empty
            (Q-Instruct's scorer ends its prompt with ``"ASSISTANT: "``).
    """

    name: str
    system: str
    emit_system: bool
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    open_suffix: str = ""

    def render(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """Render messages exactly as the original ``get_prompt`` does.

        Args:
            messages: ``(role, message)`` pairs alternating user/assistant; a
                ``None`` or empty message is an open turn.

        Returns:
            The conversation text.
        """
        seps = (self.sep, self.sep2)
        text = self.system + self.sep if self.emit_system else ""
        for i, (role, message) in enumerate(messages):
            if message:
                text += role + ": " + message + seps[i % 2]
            else:
                text += role + ":"
        return text

    def prompt(self, question: str, answer_prefix: str = "") -> str:
        """One user turn and an open assistant turn.

        The answer prefix follows ``"ASSISTANT:"`` after one space, the way the
        evaluation scripts append ``" The quality of the image is"`` to
        ``get_prompt()``.

        Args:
            question: The user message (with any ``<|image|>`` tags in place).
            answer_prefix: Start of the assistant's answer, or "".

        Returns:
            The prompt text.
        """
        text = self.render([(self.roles[0], question), (self.roles[1], None)])
        return text + (" " + answer_prefix if answer_prefix else self.open_suffix)


_OWL2_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

MPLUG_OWL2 = ConversationTemplate(name="mplug_owl2", system=_OWL2_SYSTEM, emit_system=False)
"""Inference template (CLI, Q-Instruct and Q-Align evaluations): ``USER: {q} ASSISTANT: {a}</s>``."""

V1 = ConversationTemplate(name="v1", system=_V1_SYSTEM, emit_system=True)
"""Training template (``--version v1``): the system sentence, then the same turns."""

QALIGN_SCORER = ConversationTemplate(name="qalign_scorer", system="", emit_system=False, sep="\n")
"""Renders Q-Align ``scorer.py`` / HF ``model.score``: ``USER: {q}\\nASSISTANT: {prefix}``."""

QINSTRUCT_SCORER = ConversationTemplate(
    name="qinstruct_scorer", system="", emit_system=False, sep="\n", open_suffix=" "
)
"""Renders Q-Instruct ``boost_qa``: ``USER: {q}\\nASSISTANT: `` (trailing space)."""

TEMPLATES: dict[str, ConversationTemplate] = {
    t.name: t for t in (MPLUG_OWL2, V1, QALIGN_SCORER, QINSTRUCT_SCORER)
} | {"vicuna_v1": V1}
"""Templates by name (``vicuna_v1`` is the original alias of ``v1``)."""


def get_template(name: str) -> ConversationTemplate:
    """Look a template up by name.

    Raises:
        KeyError: If unknown; the message lists the known names.
    """
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


# --------------------------------------------------------------------------- exact prompts
QALIGN_QUESTION = "How would you rate the quality of this image?"
QALIGN_ANSWER_PREFIX = "The quality of the image is"
QALIGN_TRAIN_QUESTION = "What is your quality rating for this image?"
"""One-Align's training question (``train_koniq.json``), used with ``V1`` and the tag first."""
QINSTRUCT_QUESTION = "Rate the quality of the image."

QALIGN_SCORER_PROMPT = (
    "USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT: The quality of the image is"
)
"""Q-Align ``evaluate/scorer.py`` L30 and the fixed HF ``model.score``: 28 ids, 92 LLM positions."""

QALIGN_EVAL_PROMPT = (
    "USER: How would you rate the quality of this image?\n<|image|> ASSISTANT: The quality of the image is"
)
"""Q-Align ``evaluate/iqa_eval.py`` (template + appended prefix): a space, not a newline, before ASSISTANT."""

QINSTRUCT_SCORER_PROMPT = "USER: <|image|>Rate the quality of the image.\nASSISTANT: "
"""Q-Instruct ``boost_qa/model.py`` scorer (trailing space): 20 ids."""

QINSTRUCT_EVAL_PROMPT = "USER: <|image|>Rate the quality of the image. ASSISTANT:"
"""Q-Instruct ``eval_image_quality.py`` (the ``mplug_owl2`` template)."""


def qalign_scorer_prompt(
    task: Literal["quality", "aesthetics"] = "quality", medium: Literal["image", "video"] = "image"
) -> str:
    """Q-Align's scorer prompt for a task and medium (``scorer.py`` L30/L67, HF ``task_``).

    Args:
        task: "quality" or "aesthetics".
        medium: "image" or "video" (a video's frames all replace the one tag).

    Returns:
        E.g. :data:`QALIGN_SCORER_PROMPT` for the defaults.
    """
    if task not in ("quality", "aesthetics") or medium not in ("image", "video"):
        raise ValueError(
            f"task must be 'quality' or 'aesthetics' and medium 'image' or 'video'; got {task!r}, {medium!r}"
        )
    question = f"How would you rate the {task} of this {medium}?"
    return f"USER: {question}\n{IMAGE_TAG}\nASSISTANT: The {task} of the {medium} is"


# --------------------------------------------------------------------------- tokenization
def tokenize_prompt(tokenizer: Tokenizer, text: str, *, n_images: int | None = None) -> list[int]:
    """Tokenize a prompt chunk by chunk around ``<|image|>`` (``tokenizer_image_token``).

    Split on the tag, encode each chunk as the original tokenizer call would
    (each with BOS and its own dummy prefix), keep the first chunk's BOS, drop
    the later chunks' BOS, and join the chunks with ``-200``. A chunk that
    starts with a newline or a space therefore begins with a lone ``▁`` (29871).

    Args:
        tokenizer: The tokenizer.
        text: The full prompt text.
        n_images: If given, the number of images that go with the prompt; the
            number of tags must equal it.

    Returns:
        Text-space ids, starting with BOS, with one ``-200`` per tag.

    Raises:
        ValueError: If ``n_images`` is given and differs from the number of tags.
    """
    chunks = text.split(IMAGE_TAG)
    n_tags = len(chunks) - 1
    if n_images is not None and n_images != n_tags:
        raise ValueError(
            f"prompt has {n_tags} {IMAGE_TAG!r} tag(s) but {n_images} image(s) go with it; put one "
            f"{IMAGE_TAG!r} where each image belongs (e.g. 'USER: {IMAGE_TAG}\\nRate the quality ...')"
        )
    ids = [tokenizer.bos_id, *tokenizer.encode(chunks[0])]
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_ID)
        ids.extend(tokenizer.encode(chunk))
    return ids


def encode_answer(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of an assistant answer for training: the text, then EOS (the template's ``</s>``).

    Appended to a prompt that ends with ``"ASSISTANT:"``, this equals the
    original's tokenization of the whole ``"ASSISTANT: {text}</s>"`` string,
    because the answer's dummy prefix stands for the space after the colon.

    Args:
        tokenizer: The tokenizer.
        text: The answer, without leading space and without ``</s>``.

    Returns:
        The answer ids followed by ``eos_id``.

    Raises:
        ValueError: If the text contains the image tag, or is empty.
    """
    if not text:
        raise ValueError(
            "encode_answer() got an empty answer; pass the assistant's text, "
            "e.g. 'The quality of the image is good.'"
        )
    if IMAGE_TAG in text:
        raise ValueError(f"an answer cannot contain {IMAGE_TAG!r}; images go in the user turn")
    return [*tokenizer.encode(text), tokenizer.eos_id]


@dataclass(frozen=True, slots=True)
class EncodedPrompt:
    """A tokenized prompt and the indices the token roles are built from.

    Attributes:
        text: The rendered prompt.
        ids: Text-space ids with one ``-200`` per image.
        response_start: Index in ``ids`` where the assistant's answer begins
            (``len(ids)`` when the answer is still empty).
        quality_index: Index in ``ids`` of the position whose next-token logits
            choose the quality word (the last id when the prompt ends right
            before it), or None when the prompt does not lead to one.
    """

    text: str
    ids: tuple[int, ...]
    response_start: int
    quality_index: int | None

    def __post_init__(self) -> None:
        """Check that the indices fit the ids."""
        n = len(self.ids)
        if not 0 <= self.response_start <= n:
            raise ValueError(f"response_start={self.response_start} is outside 0..{n}")
        if self.quality_index is not None:
            if not self.response_start - 1 <= self.quality_index < n:
                raise ValueError(
                    f"quality_index={self.quality_index} must lie in {self.response_start - 1}..{n - 1} "
                    "(the last prompt position or later)"
                )
            if self.ids[self.quality_index] == IMAGE_TOKEN_ID:
                raise ValueError(
                    f"quality_index={self.quality_index} falls on an image placeholder; the quality "
                    "position must be a text token: add text (e.g. '\\nASSISTANT:') after the image"
                )

    @property
    def n_images(self) -> int:
        """Number of image placeholders."""
        return sum(1 for i in self.ids if i == IMAGE_TOKEN_ID)

    def __len__(self) -> int:
        """Number of text-space ids."""
        return len(self.ids)


def encode_prompt(
    tokenizer: Tokenizer,
    template: ConversationTemplate,
    question: str,
    *,
    image_first: bool,
    n_images: int = 1,
    image_sep: str = "\n",
    answer_prefix: str = "",
    description: str = "",
    scores_quality: bool = True,
) -> EncodedPrompt:
    """Build, render and tokenize a one-turn prompt, recording its role indices.

    The user turn is the question with ``n_images`` tags before it
    (``image_first``, as in training and Q-Instruct) or after it (as in
    Q-Align), joined by ``image_sep``. The open assistant turn holds the
    description (a one-stage model's own words, when teacher-forcing them)
    followed by the answer prefix, e.g. "The quality of the image is".

    Examples of exact originals:

    * Q-Align scorer: ``encode_prompt(tok, QALIGN_SCORER, QALIGN_QUESTION,
      image_first=False, answer_prefix=QALIGN_ANSWER_PREFIX)``;
    * Q-Align eval: the same with ``MPLUG_OWL2``;
    * Q-Instruct scorer: ``encode_prompt(tok, QINSTRUCT_SCORER,
      QINSTRUCT_QUESTION, image_first=True, image_sep="")``.

    Args:
        tokenizer: The tokenizer.
        template: The conversation template.
        question: The user's question, without image tags.
        image_first: Put the tags before the question (else after it).
        n_images: Number of images (0 for a text-only prompt, e.g. the
            second stage of two-stage inference).
        image_sep: Text between the tags and the question.
        answer_prefix: Start of the answer that leads to the quality word.
        description: Answer text before ``answer_prefix``.
        scores_quality: Whether the prompt ends right before the quality word,
            so that its last position is the quality position. Pass False for
            a prompt meant for free generation.

    Returns:
        The encoded prompt.

    Raises:
        ValueError: If the question, prefix or description holds an image tag,
            ``n_images`` is negative, or the quality position would be an image.
    """
    for name, value in (
        ("question", question),
        ("answer_prefix", answer_prefix),
        ("description", description),
    ):
        if IMAGE_TAG in value:
            raise ValueError(
                f"{name} contains {IMAGE_TAG!r}; encode_prompt places the tags itself "
                "(n_images, image_first): "
                "pass the text without them, or tokenize a hand-written prompt with tokenize_prompt()"
            )
    if n_images < 0:
        raise ValueError(f"n_images={n_images} is negative; pass 0 for a text-only prompt")
    tags = IMAGE_TAG * n_images
    if n_images == 0:
        user = question
    elif image_first:
        user = tags + image_sep + question
    else:
        user = question + image_sep + tags

    answer = " ".join(part for part in (description, answer_prefix) if part)
    text = template.prompt(user, answer)
    ids = tokenize_prompt(tokenizer, text, n_images=n_images)

    # The answer starts after "ASSISTANT:". Tokenize the text up to there on its own:
    # the boundary is ":" then a space, which no piece spans, so those ids are a prefix.
    head = template.prompt(user)
    head = head[: len(head) - len(template.open_suffix)] if template.open_suffix else head
    head_ids = tokenize_prompt(tokenizer, head)
    if tuple(ids[: len(head_ids)]) != tuple(head_ids):
        raise ValueError(
            f"the answer's first piece merged with the text before it in {text!r}; "
            "start the answer with a word (the template adds the space)"
        )
    response_start = len(head_ids)
    quality_index = len(ids) - 1 if scores_quality else None
    return EncodedPrompt(
        text=text, ids=tuple(ids), response_start=response_start, quality_index=quality_index
    )


def find_quality_index(ids: Sequence[int], level_ids: Sequence[int], *, response_start: int) -> int | None:
    """Find the quality position in a full answer (e.g. a generated one).

    Research choice: a one-stage answer may use a level word inside its
    description ("good sharpness"), so the verdict is taken to be the **last**
    level word of the answer; the quality position is the one just before it,
    whose logits chose it.

    Args:
        ids: Text-space ids of prompt + answer.
        level_ids: Ids of the level words (e.g. ``[tok.word_id(w) for w in LEVEL_WORDS]``).
        response_start: Index where the answer begins.

    Returns:
        The index before the last level word at or after ``response_start``,
        or None if the answer holds none.
    """
    levels = set(int(i) for i in level_ids)
    for index in range(len(ids) - 1, max(response_start, 1) - 1, -1):
        if int(ids[index]) in levels:
            return index - 1
    return None
