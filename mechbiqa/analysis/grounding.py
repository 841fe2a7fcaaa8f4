"""Grounding / self-consistency: does a rater's quality word follow from its own description?

Where it sits (DESIGN.md, "Grounding / self-consistency"): `mechbiqa.pipeline`
turns a checkpoint into a rater that describes an image and reads the level
word after the description. This module asks every rater two questions about
the same image and compares the answers:

* the **image path**: the quality the rater gives with the image in front of
  it (a one-stage checkpoint's own answer: image + its description + "The
  quality of the image is");
* the **text path**: the quality read from the rater's own generated
  description fed back as text only, in the stage-2 prompt of
  `mechbiqa.pipeline` (description + question in the user turn, no image).

Which model answers each path (`rate_paths`):

* one-stage checkpoint: image path = its answer (`OneStageRater.rate`); text
  path = the same model on the stage-2 prompt, no image;
* two-stage pair: image path = the stage-2 model on the stage-2 prompt with
  the image added; text path = its answer (`TwoStageRater.rate`: stage 2 reads
  the stage-1 description, no image).

Research choice: in both rows the two paths differ only by the presence of
the image (and, for one-stage, the prompt that frames the description), so a
disagreement says the verdict depends on something the description does not
carry. A real checkpoint (Q-Instruct, One-Align) is rated as one-stage.

`grounding` then measures (pure numpy, so tests can force either path):

* **contradiction rate**: the share of images whose two argmax levels differ
  by one level or more;
* **agreement SRCC**: Spearman correlation of the two paths' Q-Align scores;
* **description-verdict conflicts**: descriptions of severe degradation whose
  final word is "excellent"/"good", and descriptions of a clean image whose
  final word is "poor"/"bad". Severity is read from the text by a
  `SeverityLexicon` (documented there; built from the adjectives of the
  benchmark's own describer, `mechbiqa.data.descriptions`).

`studies/grounding.py` runs it per checkpoint with ROUGE-1 (`mechbiqa.analysis.rouge`);
`mechbiqa.reports.grounding_table` renders it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mechbiqa.data.descriptions import SEVERITY_ADJECTIVES
from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS, QALIGN_ANSWER_PREFIX, encode_prompt

if TYPE_CHECKING:
    from torch import Tensor

    from mechbiqa.checkpoint import Checkpoint
    from mechbiqa.pipeline import OneStageRater, TwoStageRater

__all__ = [
    "QALIGN_WEIGHTS",
    "Severity",
    "SeverityLexicon",
    "GroundingPaths",
    "GroundingResult",
    "grounding",
    "level_index",
    "rate_paths",
    "text_path_probs",
    "image_path_probs",
]

QALIGN_WEIGHTS = np.asarray(LEVEL_WEIGHTS)
"""Q-Align's 0-1 level weights, excellent .. bad (`mechbiqa.model.prompts.LEVEL_WEIGHTS`)."""

Severity = Literal["severe", "mild", "clean", "unknown"]

# Level indices (excellent=0 .. bad=4) that contradict a severe / a clean description.
_GOOD_LEVELS = (0, 1)  # excellent, good
_BAD_LEVELS = (3, 4)  # poor, bad


def level_index(word: str) -> int:
    """Index of a level word in `LEVEL_WORDS` (excellent=0 .. bad=4)."""
    try:
        return LEVEL_WORDS.index(word.strip().lower())
    except ValueError:
        raise ValueError(f"{word!r} is not a level word; expected one of {LEVEL_WORDS}") from None


# --------------------------------------------------------------------------- severity of a description
# Head nouns of the benchmark describer's distortion names (the last word of each noun phrase,
# e.g. "defocus blur", "JPEG compression", "salt-and-pepper noise") plus generic ones a real
# model writes ("artifacts", "distortion").
_DEFAULT_HEADS = (
    "blur",
    "blurring",
    "blurriness",
    "bleeding",
    "fringing",
    "quantization",
    "fading",
    "oversaturation",
    "compression",
    "noise",
    "smear",
    "overexposure",
    "underexposure",
    "shift",
    "jitter",
    "displacement",
    "pixelation",
    "banding",
    "blocking",
    "oversharpening",
    "change",
    "artifacts",
    "artefacts",
    "distortion",
    "distortions",
    "degradation",
)
_DEFAULT_CLEAN_CUES = ("clean", "crisp", "noise-free", "no visible", "sharp", "clear")


@dataclass(frozen=True)
class SeverityLexicon:
    """Reads how severe the degradation a description reports is, from its words.

    Rule (documented, tested over every phrasing the benchmark can produce):

    1. Find every severity adjective that qualifies a degradation noun: the
       adjective, then at most two words, then a head noun ("severe motion
       blur", "heavy JPEG compression"). An adjective elsewhere does not count
       (the benchmark's effect clause "colors ... look too strong" is not a
       severity). The **largest** severity found is the description's.
    2. Severity 3-4 is ``"severe"``, 0 is ``"clean"``, 1-2 ``"mild"``.
    3. With no such adjective, a clean cue ("clean", "crisp", "no visible",
       ...) makes it ``"clean"``; otherwise ``"unknown"`` (not counted).

    The default adjectives are those of `mechbiqa.data.descriptions.SEVERITY_ADJECTIVES`,
    whose groups 0-4 the benchmark assigns from KADID's mean rating of the
    (type, level) cell: group 3 ("strong", "heavy", "marked") means a KADID
    rating below 2.8 of 5 and group 4 ("severe", "extreme", "overwhelming")
    below 2.0, i.e. labels in the poor/bad bins, so "good" after them is a
    contradiction. Group 0 ("barely visible", "faint") means 4.3 or above.
    For free text of a real model, pass a lexicon with its own words.

    Attributes:
        adjectives: Adjectives (phrases allowed) per severity 0..4.
        heads: Nouns that name a degradation.
        clean_cues: Phrases that describe an undistorted image.
    """

    adjectives: tuple[tuple[str, ...], ...] = SEVERITY_ADJECTIVES
    heads: tuple[str, ...] = _DEFAULT_HEADS
    clean_cues: tuple[str, ...] = _DEFAULT_CLEAN_CUES
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _clean: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _group: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Compile the adjective and cue patterns."""
        if len(self.adjectives) != 5:
            raise ValueError(
                f"SeverityLexicon needs adjectives for severities 0..4 (5 groups); got {len(self.adjectives)}"
            )
        group = {" ".join(a.lower().split()): s for s, words in enumerate(self.adjectives) for a in words}
        heads = "|".join(re.escape(h) for h in sorted(self.heads, key=len, reverse=True))
        # Longest adjective first, so "very slight" (severity 0) is read whole, not as "slight" (1).
        words = "|".join(re.escape(a).replace(r"\ ", r"\s+") for a in sorted(group, key=len, reverse=True))
        pattern = rf"\b(?P<adj>{words})(?=\s+(?:[\w-]+\s+){{0,2}}?(?:{heads})\b)"
        cues = "|".join(re.escape(c) for c in self.clean_cues)
        object.__setattr__(self, "_group", group)
        object.__setattr__(self, "_pattern", re.compile(pattern, re.IGNORECASE))
        object.__setattr__(self, "_clean", re.compile(rf"\b(?:{cues})\b", re.IGNORECASE))

    def level(self, text: str) -> int | None:
        """The largest severity (0-4) an adjective assigns to a degradation noun, or None."""
        found = [self._group[" ".join(m["adj"].lower().split())] for m in self._pattern.finditer(text)]
        return max(found) if found else None

    def classify(self, text: str) -> Severity:
        """``"severe"``, ``"mild"``, ``"clean"`` or ``"unknown"`` (see the class docstring)."""
        level = self.level(text)
        if level is None:
            return "clean" if self._clean.search(text) else "unknown"
        return "severe" if level >= 3 else "clean" if level == 0 else "mild"


# --------------------------------------------------------------------------- the measurement
@dataclass(frozen=True)
class GroundingResult:
    """Image path vs text path for one rater.

    Attributes:
        ids: Image ids.
        image_probs: ``[image, 5]`` level probabilities of the image path (excellent .. bad).
        text_probs: ``[image, 5]`` level probabilities of the text path.
        image_levels: ``[image]`` argmax level index of the image path.
        text_levels: ``[image]`` argmax level index of the text path.
        final_levels: ``[image]`` the level index the rater reports as its answer.
        descriptions: The generated descriptions.
        severity: The `SeverityLexicon` class of each description.
        contradiction: ``[image]`` bool, the paths' levels differ by one or more.
        conflict: ``[image]`` ``"severe->good"``, ``"clean->bad"`` or ``""``.
        contradiction_rate: Mean of ``contradiction``.
        agreement_srcc: SRCC of the two paths' Q-Align scores (NaN if one is constant).
        mean_level_gap: Mean absolute difference of the two argmax levels.
        confusion: ``[5, 5]`` counts, rows image-path level, columns text-path level.
        conflict_rate: Share of all images whose description contradicts the final word.
        severe_to_good_rate: Share of "severe" descriptions ending in excellent/good (NaN if none).
        clean_to_bad_rate: Share of "clean" descriptions ending in poor/bad (NaN if none).
        srcc_image: SRCC of the image path's score with MOS (NaN without MOS).
        srcc_text: SRCC of the text path's score with MOS (NaN without MOS).
        mos: ``[image]`` the 0-1 ratings, or None.
    """

    ids: tuple[str, ...]
    image_probs: np.ndarray
    text_probs: np.ndarray
    image_levels: np.ndarray
    text_levels: np.ndarray
    final_levels: np.ndarray
    descriptions: tuple[str, ...]
    severity: tuple[str, ...]
    contradiction: np.ndarray
    conflict: tuple[str, ...]
    contradiction_rate: float
    agreement_srcc: float
    mean_level_gap: float
    confusion: np.ndarray
    conflict_rate: float
    severe_to_good_rate: float
    clean_to_bad_rate: float
    srcc_image: float
    srcc_text: float
    mos: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of images."""
        return len(self.ids)

    @property
    def image_scores(self) -> np.ndarray:
        """``[image]`` Q-Align 0-1 score of the image path."""
        return self.image_probs @ QALIGN_WEIGHTS

    @property
    def text_scores(self) -> np.ndarray:
        """``[image]`` Q-Align 0-1 score of the text path."""
        return self.text_probs @ QALIGN_WEIGHTS

    @property
    def severity_counts(self) -> dict[str, int]:
        """Descriptions per severity class."""
        return {s: self.severity.count(s) for s in ("severe", "mild", "clean", "unknown")}

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what the comparison report prints)."""
        return {
            "n": self.n,
            "contradiction_rate": self.contradiction_rate,
            "agreement_srcc": self.agreement_srcc,
            "mean_level_gap": self.mean_level_gap,
            "conflict_rate": self.conflict_rate,
            "severe_to_good_rate": self.severe_to_good_rate,
            "clean_to_bad_rate": self.clean_to_bad_rate,
            "n_severe_to_good": self.conflict.count("severe->good"),
            "n_clean_to_bad": self.conflict.count("clean->bad"),
            "severity_counts": self.severity_counts,
            "srcc_image": self.srcc_image,
            "srcc_text": self.srcc_text,
        }

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """JSON-ready dict: `summary`, the confusion matrix and (optionally) per-image rows."""
        out = self.summary() | {"level_words": list(LEVEL_WORDS), "confusion": self.confusion.tolist()}
        if per_image:
            image_scores, text_scores = self.image_scores, self.text_scores
            out["per_image"] = [
                {
                    "id": self.ids[i],
                    "description": self.descriptions[i],
                    "severity": self.severity[i],
                    "image_level": LEVEL_WORDS[int(self.image_levels[i])],
                    "text_level": LEVEL_WORDS[int(self.text_levels[i])],
                    "final_level": LEVEL_WORDS[int(self.final_levels[i])],
                    "image_score": float(image_scores[i]),
                    "text_score": float(text_scores[i]),
                    "contradiction": bool(self.contradiction[i]),
                    "conflict": self.conflict[i],
                    "mos": None if self.mos is None else float(self.mos[i]),
                }
                for i in range(self.n)
            ]
        return out


def _safe_srcc(a: np.ndarray, b: np.ndarray) -> float:
    from mechbiqa.metrics import srcc

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")  # undefined: a constant path (or too few images) has no rank correlation
    return srcc(a[ok], b[ok])


def _as_probs(values: Any, name: str, n: int | None) -> np.ndarray:
    probs = np.asarray(values, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(LEVEL_WORDS):
        raise ValueError(
            f"{name} must be [image, {len(LEVEL_WORDS)}] level probabilities (excellent .. bad); "
            f"got shape {probs.shape}"
        )
    if n is not None and probs.shape[0] != n:
        raise ValueError(f"{name} has {probs.shape[0]} rows for {n} images")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or not np.allclose(probs.sum(1), 1.0, atol=1e-4):
        raise ValueError(
            f"{name} rows must be probability vectors (non-negative, summing to 1); "
            "pass softmax(level logits), e.g. mechbiqa.scoring.level_probs"
        )
    return probs


def grounding(
    image_probs: np.ndarray,
    text_probs: np.ndarray,
    descriptions: Sequence[str],
    *,
    final_levels: Sequence[int] | np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    mos: Sequence[float] | np.ndarray | None = None,
    lexicon: SeverityLexicon | None = None,
) -> GroundingResult:
    """Compare the image path with the text path, and each description with the final word.

    Args:
        image_probs: ``[image, 5]`` level probabilities (excellent .. bad) of the image path.
        text_probs: ``[image, 5]`` level probabilities of the text path.
        descriptions: The generated description of each image.
        final_levels: The level index the rater answers with (default: the image path's argmax).
        ids: Image ids (default ``"0"``, ``"1"`` ...).
        mos: 0-1 ratings for the paths' SRCC with MOS (optional).
        lexicon: Reads the severity of a description (default `SeverityLexicon()`).

    Returns:
        A `GroundingResult`.
    """
    image = _as_probs(image_probs, "image_probs", None)
    n = image.shape[0]
    text = _as_probs(text_probs, "text_probs", n)
    if len(descriptions) != n:
        raise ValueError(f"{len(descriptions)} descriptions for {n} images")
    ids = tuple(str(i) for i in (ids if ids is not None else range(n)))
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
    image_levels, text_levels = image.argmax(1), text.argmax(1)
    final = image_levels if final_levels is None else np.asarray(final_levels, dtype=np.int64)
    if final.shape != (n,) or np.any((final < 0) | (final >= len(LEVEL_WORDS))):
        raise ValueError(f"final_levels must be {n} level indices in 0..{len(LEVEL_WORDS) - 1}")
    lexicon = lexicon or SeverityLexicon()
    severity = tuple(lexicon.classify(d) for d in descriptions)
    conflict = tuple(
        "severe->good"
        if s == "severe" and f in _GOOD_LEVELS
        else "clean->bad"
        if s == "clean" and f in _BAD_LEVELS
        else ""
        for s, f in zip(severity, final.tolist(), strict=True)
    )
    gap = np.abs(image_levels - text_levels)
    contradiction = gap >= 1
    confusion = np.zeros((5, 5), dtype=np.int64)
    np.add.at(confusion, (image_levels, text_levels), 1)
    image_scores, text_scores = image @ QALIGN_WEIGHTS, text @ QALIGN_WEIGHTS
    n_severe, n_clean = severity.count("severe"), severity.count("clean")
    mos_arr = None if mos is None else np.asarray(mos, dtype=np.float64)
    if mos_arr is not None and mos_arr.shape != (n,):
        raise ValueError(f"mos has shape {mos_arr.shape}; expected ({n},)")
    nan = float("nan")
    return GroundingResult(
        ids=ids,
        image_probs=image,
        text_probs=text,
        image_levels=image_levels,
        text_levels=text_levels,
        final_levels=final,
        descriptions=tuple(descriptions),
        severity=severity,
        contradiction=contradiction,
        conflict=conflict,
        contradiction_rate=float(contradiction.mean()) if n else nan,
        agreement_srcc=_safe_srcc(image_scores, text_scores),
        mean_level_gap=float(gap.mean()) if n else nan,
        confusion=confusion,
        conflict_rate=float(np.mean([c != "" for c in conflict])) if n else nan,
        severe_to_good_rate=conflict.count("severe->good") / n_severe if n_severe else nan,
        clean_to_bad_rate=conflict.count("clean->bad") / n_clean if n_clean else nan,
        srcc_image=nan if mos_arr is None else _safe_srcc(image_scores, mos_arr),
        srcc_text=nan if mos_arr is None else _safe_srcc(text_scores, mos_arr),
        mos=mos_arr,
    )


# --------------------------------------------------------------------------- running the two paths
@dataclass(frozen=True)
class GroundingPaths:
    """What a rater said about a set of images along both paths.

    Attributes:
        mode: ``"one-stage"`` or ``"two-stage"``.
        descriptions: The generated descriptions (one-stage: the answer before "The quality of the image is").
        answers: The full generated answers.
        image_probs: ``[image, 5]`` level probabilities with the image.
        text_probs: ``[image, 5]`` level probabilities from the description alone.
        final_levels: ``[image]`` the level index the rater answers with (one-stage: the verdict its
            answer wrote, else the image path's argmax; two-stage: the text path, stage 2's answer).
    """

    mode: str
    descriptions: tuple[str, ...]
    answers: tuple[str, ...]
    image_probs: np.ndarray
    text_probs: np.ndarray
    final_levels: np.ndarray


def _probs(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(-1).double().numpy()


def text_path_probs(
    components: Any, template: Any, descriptions: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """Level probabilities of each description read as text only (the stage-2 prompt, no image).

    Args:
        components: `mechbiqa.model.load.Components` of the model that reads the text.
        template: Its `ConversationTemplate`.
        descriptions: The descriptions.
        batch_size: Prompts per forward.

    Returns:
        ``[image, 5]`` probabilities, excellent .. bad.
    """
    from mechbiqa.pipeline import score_prompts, scoring_prompt

    prompts = [scoring_prompt(components.tokenizer, template, "stage2", d) for d in descriptions]
    return _probs(score_prompts(components.model, components.tokenizer, prompts, None, batch_size=batch_size))


def image_path_probs(
    components: Any, template: Any, descriptions: Sequence[str], pixels: Tensor, batch_size: int = 64
) -> np.ndarray:
    """Level probabilities of the stage-2 prompt with the image added before the description.

    The image path of a two-stage pair: the same words stage 2 reads, plus the image
    (tag first, then a newline, as in every mechbiqa training prompt).
    """
    from mechbiqa.pipeline import score_prompts, user_turn

    prompts = [
        encode_prompt(
            components.tokenizer,
            template,
            user_turn("stage2", d)[0],
            image_first=True,
            n_images=1,
            image_sep="\n",
            answer_prefix=QALIGN_ANSWER_PREFIX,
        )
        for d in descriptions
    ]
    return _probs(
        score_prompts(components.model, components.tokenizer, prompts, pixels, batch_size=batch_size)
    )


@torch.no_grad()
def rate_paths(
    rater: OneStageRater | TwoStageRater | Checkpoint, pixels: Tensor, batch_size: int = 64
) -> GroundingPaths:
    """Describe each image and read the quality along both paths (see the module docstring's table).

    Args:
        rater: A `mechbiqa.pipeline.OneStageRater` or `TwoStageRater`, or an opened
            `mechbiqa.checkpoint.Checkpoint` (its rater).
        pixels: ``[image, 3, S, S]`` preprocessed images (``rater``'s processor).
        batch_size: Images per forward.

    Returns:
        A `GroundingPaths`.
    """
    from mechbiqa.checkpoint import Checkpoint
    from mechbiqa.pipeline import OneStageRater, TwoStageRater, split_answer

    if isinstance(rater, Checkpoint):
        rater = rater.rater
    if isinstance(rater, OneStageRater):
        ratings = rater.rate(pixels, batch_size=batch_size)
        descriptions = [r.description for r in ratings]
        image = np.stack([r.level_probs for r in ratings]).astype(np.float64)
        text = text_path_probs(rater.components, rater.template, descriptions, batch_size)
        # The final word is the verdict the answer itself wrote, where it wrote one (greedy decoding
        # makes it the image path's argmax unless re-tokenising the description changed it).
        verdicts = [split_answer(r.answer)[1] for r in ratings]
        final = np.asarray(
            [level_index(v) if v else k for v, k in zip(verdicts, image.argmax(1), strict=True)]
        )
    elif isinstance(rater, TwoStageRater):
        descriptions = rater.describe(pixels, batch_size=batch_size)
        ratings = rater.rate_descriptions(descriptions, batch_size=batch_size)
        text = np.stack([r.level_probs for r in ratings]).astype(np.float64)
        image = image_path_probs(rater.stage2, rater.template, descriptions, pixels, batch_size)
        final = text.argmax(1)
    else:
        raise TypeError(
            f"rate_paths needs a OneStageRater or TwoStageRater (mechbiqa.pipeline), "
            f"got {type(rater).__name__}"
        )
    return GroundingPaths(
        mode=rater.mode,
        descriptions=tuple(descriptions),
        answers=tuple(r.answer for r in ratings),
        image_probs=image,
        text_probs=text,
        final_levels=np.asarray(final, dtype=np.int64),
    )
