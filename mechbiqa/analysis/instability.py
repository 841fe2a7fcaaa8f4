"""Instability of sampled answers: the same image asked several times, how often does the level change?

Where it sits: `studies/instability.py` loads a model (`mechbiqa.model.load`),
asks it about each image several times with `sample_answers`, turns every
answer into a level with `answer_levels`, and summarises with
`summarise_instability`; `mechbiqa.reports.instability_table` renders the
result. The definitions are DESIGN.md's ("Instability ratio", the paper's
Table 1):

* per image, ``n`` sampled answers; an answer is **unstable** when its level
  differs from that image's most common level, or when it holds no level word;
* ratio = unstable answers / all answers, per session; sessions differ only in
  their seed; report mean +- std over sessions;
* level accuracy: the fraction of answers whose level is the image's label level.

Sampling shares the prompt: each image's prompt is prefilled once
(`MPLUGOwl2.prefill`), the cache is repeated for the ``sessions x answers``
continuations (`KVCache.repeat_interleave`), and all of them decode together.
Every continuation draws from its own random stream, seeded from (session
seed, image, answer): an answer does not depend on how answers are batched, so
the shared-prefill path and independent generations draw the same tokens
(`studies/bench_instability.py` checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from math import factorial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbiqa.model.generation import KVCache
from mechbiqa.model.prompts import LEVEL_WORDS, EncodedPrompt
from mechbiqa.model.roles import batch_prompts
from mechbiqa.scoring import level_ids

if TYPE_CHECKING:
    from mechbiqa.checkpoint import Checkpoint
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.pipeline import ImageInput

__all__ = [
    "NOT_A_LEVEL",
    "InstabilityResult",
    "SamplingConfig",
    "answer_levels",
    "SampledAnswers",
    "continue_rows",
    "sample_checkpoint",
    "expected_uniform_instability",
    "instability_ratio",
    "row_seed",
    "sample_answers",
    "session_generators",
    "sample_answers_independently",
    "summarise_instability",
    "unstable_counts",
]

NOT_A_LEVEL = -1
"""The level of an answer that holds no level word."""


# ----------------------------------------------------------------------------- the ratio
def unstable_counts(levels: Int[np.ndarray, "image answer"]) -> Int[np.ndarray, " image"]:
    """Unstable answers per image: those not at the image's most common level (non-level answers included).

    With ties for the most common level, any of them gives the same count (``n - max count``).
    """
    levels = np.asarray(levels)
    n_levels = max(len(LEVEL_WORDS), int(levels.max(initial=0)) + 1)
    counts = np.stack([(levels == lv).sum(-1) for lv in range(n_levels)], axis=-1)  # [image, level]
    return levels.shape[-1] - counts.max(-1)


def instability_ratio(levels: Int[np.ndarray, "image answer"]) -> float:
    """Unstable answers / all answers (DESIGN.md, "Instability ratio")."""
    levels = np.asarray(levels)
    if levels.size == 0:
        raise ValueError("instability_ratio got no answers")
    return float(unstable_counts(levels).sum() / levels.size)


def expected_uniform_instability(
    n_answers: int, n_levels: int = len(LEVEL_WORDS), p_not_level: float = 0.0
) -> float:
    """Expected ratio when answers are independent: no level word with ``p_not_level``, else a uniform level.

    Exact: ``1 - E[max level count] / n``, the expectation over the multinomial outcomes of the
    ``n`` answers across ``n_levels + 1`` categories (the last = no level word).
    """
    if n_answers < 1 or n_levels < 1 or not 0.0 <= p_not_level <= 1.0:
        raise ValueError("need n_answers >= 1, n_levels >= 1 and 0 <= p_not_level <= 1")
    p = [(1.0 - p_not_level) / n_levels] * n_levels + [p_not_level]
    expected_max = 0.0
    for counts in product(range(n_answers + 1), repeat=n_levels):
        rest = n_answers - sum(counts)
        if rest < 0:
            continue
        full = (*counts, rest)
        prob = factorial(n_answers)
        for c, q in zip(full, p, strict=True):
            prob *= q**c / factorial(c)
        expected_max += prob * max(counts)
    return 1.0 - expected_max / n_answers


def answer_levels(
    new_tokens: Int[Tensor, "row new"] | np.ndarray,
    level_ids: Sequence[int],
    eos_token_id: int | None = None,
) -> Int[np.ndarray, " row"]:
    """The level of each generated answer: its **last** level word (before EOS), else `NOT_A_LEVEL`.

    Research choice, as `mechbiqa.model.prompts.find_quality_index`: a one-stage answer may use a
    level word inside its description ("good sharpness"), so the verdict is the last one.
    """
    tokens = np.asarray(new_tokens.cpu() if isinstance(new_tokens, Tensor) else new_tokens)
    lookup = {int(t): i for i, t in enumerate(level_ids)}
    out = np.full(tokens.shape[0], NOT_A_LEVEL, dtype=np.int64)
    for r, row in enumerate(tokens):
        for token in row:
            token = int(token)
            if eos_token_id is not None and token == eos_token_id:
                break
            if token in lookup:
                out[r] = lookup[token]
    return out


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """How answers are drawn.

    Attributes:
        n_answers: Answers per image per session (the paper's 5).
        seeds: One seed per session (the paper's 3 sessions).
        max_new_tokens: Longest answer.
        do_sample: Sample (else greedy: every answer equal, instability 0 by construction).
        temperature: Sampling temperature.
        top_k: Keep the k most likely tokens.
        top_p: Nucleus threshold.
    """

    n_answers: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 48
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.n_answers < 1 or not self.seeds or self.max_new_tokens < 1:
            raise ValueError("SamplingConfig needs n_answers >= 1, at least one seed and max_new_tokens >= 1")


def row_seed(session_seed: int, image: int, answer: int) -> int:
    """The seed of one continuation, from (session seed, image number in the data set, answer number)."""
    return int(np.random.SeedSequence([int(session_seed), int(image), int(answer)]).generate_state(1)[0])


def session_generators(
    sampling: SamplingConfig,
    images: Sequence[int],
    device: torch.device | str = "cpu",
) -> list[torch.Generator]:
    """A generator per (image, session, answer), in that nesting order: `sample_answers`' rows."""
    return [
        torch.Generator(device=device).manual_seed(row_seed(seed, image, a))
        for image in images
        for seed in sampling.seeds
        for a in range(sampling.n_answers)
    ]


@torch.no_grad()
def sample_answers(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "image text_pos"],
    images: Float[Tensor, "image 3 S S"] | None,
    sampling: SamplingConfig,
    *,
    image_numbers: Sequence[int] | None = None,
    eos_token_id: int | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> Int[Tensor, "session image answer new"]:
    """Sample ``sessions x answers`` continuations per image from one shared prefill of its prompt.

    Args:
        model: The model (eval mode).
        input_ids: ``[image, text_pos]`` prompts of equal length (one prompt for all images).
        images: ``[image, 3, S, S]`` preprocessed images.
        sampling: Answers, seeds, decoding settings.
        image_numbers: Each image's number in the whole data set (seeds the draws; default
            ``0..``): pass it when images come in batches, so a batch split draws the same.
        eos_token_id: Stop a row at EOS (then padded with the model's pad id).
        generators: The row generators (default `session_generators`); pass them to continue
            their streams afterwards.

    Returns:
        ``[session, image, answer, new]`` generated ids.
    """
    n_images = input_ids.shape[0]
    numbers = list(range(n_images)) if image_numbers is None else [int(i) for i in image_numbers]
    device = model.device
    cache = model.prefill(input_ids.to(device), None if images is None else images.to(device, model.dtype))
    # row = image * (sessions * answers) + session * answers + answer: the order of session_generators
    n_rows = len(sampling.seeds) * sampling.n_answers
    cache = cache.repeat_interleave(n_rows)
    rows = session_generators(sampling, numbers, device) if generators is None else list(generators)
    tokens = continue_rows(model, input_ids.repeat_interleave(n_rows, dim=0), cache, sampling, rows,
                           eos_token_id=eos_token_id)
    return tokens.reshape(n_images, len(sampling.seeds), sampling.n_answers, -1).transpose(0, 1)


def continue_rows(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "row text_pos"],
    cache: KVCache,
    sampling: SamplingConfig,
    generators: Sequence[torch.Generator],
    *,
    eos_token_id: int | None = None,
) -> Int[Tensor, "row new"]:
    """The new ids `MPLUGOwl2.generate` draws after a prefill cache (on CPU), row ``r`` from ``generators[r]``.

    The generators advance in place: a later call (stage 2 of a pair) continues their streams.
    """
    out = model.generate(
        input_ids.to(model.device),
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=list(generators) if sampling.do_sample else None,
        eos_token_id=eos_token_id,
        past_key_values=cache,
    )
    return out[:, input_ids.shape[1] :].cpu()


@torch.no_grad()
def sample_answers_independently(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "image text_pos"],
    images: Float[Tensor, "image 3 S S"] | None,
    sampling: SamplingConfig,
    *,
    image_numbers: Sequence[int] | None = None,
    eos_token_id: int | None = None,
) -> Int[Tensor, "session image answer new"]:
    """The reference path of `sample_answers`: one full `MPLUGOwl2.generate` (prompt included) per answer.

    Same seeds, same draws: the baseline of ``studies/bench_instability.py``.
    """
    n_images = input_ids.shape[0]
    numbers = list(range(n_images)) if image_numbers is None else [int(i) for i in image_numbers]
    generators = iter(session_generators(sampling, numbers, model.device))
    rows = []
    for i in range(n_images):
        for _ in range(len(sampling.seeds) * sampling.n_answers):
            out = model.generate(
                input_ids[i : i + 1].to(model.device),
                images=None if images is None else images[i : i + 1].to(model.device, model.dtype),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sampling.do_sample,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                generator=next(generators),
                eos_token_id=eos_token_id,
            )
            rows.append(out[0, input_ids.shape[1] :].cpu())
    width = max(len(r) for r in rows)
    pad = model.cfg.llm.pad_token_id
    tokens = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])
    return tokens.reshape(n_images, len(sampling.seeds), sampling.n_answers, -1).transpose(0, 1)


@dataclass(frozen=True)
class SampledAnswers:
    """Every sampled answer of a checkpoint, as levels (and the first images' texts).

    Attributes:
        levels: ``[session, image, answer]`` level index of each final answer (`NOT_A_LEVEL` = none).
        texts: For the first images, ``[session][answer]`` final answer texts.
        prompt: The prompt answers were drawn from with the image.
        mode: ``"one-stage"``, ``"two-stage"`` or ``"prompted"`` (a released or random model
            asked Q-Align's question).
    """

    levels: np.ndarray
    texts: list[list[list[str]]]
    prompt: EncodedPrompt
    mode: str


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def sample_checkpoint(
    checkpoint: Checkpoint,
    images: Sequence[ImageInput] | Tensor,
    sampling: SamplingConfig,
    *,
    batch_images: int = 8,
    n_texts: int = 20,
) -> SampledAnswers:
    """Sample ``sessions x answers`` answers per image from any checkpoint and read their levels.

    One-stage and released checkpoints answer with the image (`Checkpoint.sample_prompt`); a
    two-stage pair's stage 1 samples a description and its stage 2 (text only) samples the
    quality sentence from it, each row's random stream continuing from stage 1.

    Args:
        checkpoint: An opened checkpoint (`mechbiqa.checkpoint.open_checkpoint`).
        images: Paths, PIL images or preprocessed pixels, preprocessed ``batch_images`` at a time.
        sampling: Answers, seeds, decoding settings.
        batch_images: Images prefilled together.
        n_texts: Images whose answer texts are kept.
    """
    first = checkpoint.describer
    final = checkpoint.scorer
    prompt = checkpoint.sample_prompt()
    two_stage = checkpoint.kind == "two-stage"
    words = level_ids(final.tokenizer)
    n, n_seeds, n_answers = len(images), len(sampling.seeds), sampling.n_answers
    levels = np.full((n_seeds, n, n_answers), NOT_A_LEVEL, dtype=np.int64)
    texts: list[list[list[str]]] = []
    for start in range(0, n, max(1, batch_images)):
        chunk = images[start : start + batch_images]
        pixels = checkpoint.pixels(chunk)
        numbers = list(range(start, start + len(pixels)))
        generators = session_generators(sampling, numbers, first.model.device)
        tokens = sample_answers(first.model, torch.tensor([prompt.ids] * len(pixels)), pixels, sampling,
                                image_numbers=numbers, eos_token_id=first.tokenizer.eos_id,
                                generators=generators)  # [session, image, answer, new]
        if two_stage:  # stage 2 rates each sampled description, text only, its stream continuing
            rows = tokens.transpose(0, 1).reshape(len(pixels) * n_seeds * n_answers, -1).tolist()
            descriptions = [first.tokenizer.decode(_cut(r, first.tokenizer.eos_id)).strip() for r in rows]
            batch = batch_prompts(
                [checkpoint.stage2_prompt(d) for d in descriptions],
                pad_id=final.tokenizer.pad_id,
                n_image_tokens=final.model.cfg.n_image_tokens,
                bos_id=final.tokenizer.bos_id,
            )
            ids = batch.input_ids.to(final.model.device)
            cache = final.model.prefill(ids, attention_mask=batch.attention_mask.to(final.model.device))
            eos = final.tokenizer.eos_id
            answer = continue_rows(final.model, ids, cache, sampling, generators, eos_token_id=eos)
            tokens = answer.reshape(len(pixels), n_seeds, n_answers, -1).transpose(0, 1)
        eos = final.tokenizer.eos_id
        flat = tokens.reshape(-1, tokens.shape[-1])
        found = answer_levels(flat, words, eos).reshape(n_seeds, len(pixels), n_answers)
        levels[:, start : start + len(pixels)] = found
        for i in range(min(len(pixels), max(0, n_texts - start))):
            texts.append([[final.tokenizer.decode(_cut(tokens[s, i, a].tolist(), eos)).strip()
                           for a in range(n_answers)] for s in range(n_seeds)])
    mode = "prompted" if checkpoint.kind == "released" else checkpoint.kind
    return SampledAnswers(levels=levels, texts=texts, prompt=prompt, mode=mode)


# ----------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class InstabilityResult:
    """Instability and level accuracy over sessions.

    Attributes:
        levels: ``[session, image, answer]`` level index of each answer (`NOT_A_LEVEL` = none).
        label_levels: ``[image]`` the label's level index (-1 when unknown).
        ratio: ``[session]`` instability ratio.
        unstable: ``[session, image]`` unstable answers per image.
        accuracy: ``[session]`` fraction of answers at the label level (NaN without labels).
        majority_accuracy: ``[session]`` fraction of images whose most common level is the label's.
        not_level_rate: Fraction of all answers without a level word.
        expected_uniform: The ratio expected from answers drawn uniformly over the levels
            (the chance level, `expected_uniform_instability`).
        seeds: The session seeds.
    """

    levels: np.ndarray
    label_levels: np.ndarray
    ratio: np.ndarray
    unstable: np.ndarray
    accuracy: np.ndarray
    majority_accuracy: np.ndarray
    not_level_rate: float
    expected_uniform: float
    seeds: tuple[int, ...]

    @staticmethod
    def _spread(values: np.ndarray) -> tuple[float, float]:
        # sample std (ddof=1) over sessions: the sessions are draws of the same experiment
        values = values[np.isfinite(values)]
        if not len(values):
            return float("nan"), float("nan")
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    @property
    def ratio_mean_std(self) -> tuple[float, float]:
        """Mean and sample std (ddof=1) of the ratio over sessions."""
        return self._spread(self.ratio)

    @property
    def accuracy_mean_std(self) -> tuple[float, float]:
        """Mean and sample std of the level accuracy over sessions."""
        return self._spread(self.accuracy)

    def level_counts(self) -> np.ndarray:
        """``[level + 1]`` answers per level over all sessions, the last entry = no level word."""
        flat = self.levels.ravel()
        return np.array(
            [(flat == lv).sum() for lv in range(len(LEVEL_WORDS))] + [(flat == NOT_A_LEVEL).sum()]
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        mean, std = self.ratio_mean_std
        acc, acc_std = self.accuracy_mean_std
        nan = lambda x: None if not np.isfinite(x) else float(x)  # noqa: E731
        return {
            "ratio": self.ratio.tolist(),
            "ratio_mean": mean,
            "ratio_std": std,
            "accuracy": [nan(a) for a in self.accuracy],
            "accuracy_mean": nan(acc),
            "accuracy_std": nan(acc_std),
            "majority_accuracy": [nan(a) for a in self.majority_accuracy],
            "not_level_rate": self.not_level_rate,
            "expected_uniform": self.expected_uniform,
            "seeds": list(self.seeds),
            "level_counts": dict(zip([*LEVEL_WORDS, "none"], self.level_counts().tolist(), strict=True)),
            "levels": self.levels.tolist(),
            "label_levels": self.label_levels.tolist(),
        }


def summarise_instability(
    levels: Int[np.ndarray, "session image answer"],
    label_levels: Int[np.ndarray, " image"] | None = None,
    seeds: Sequence[int] | None = None,
) -> InstabilityResult:
    """Ratio per session, accuracy against the labels, chance level.

    Args:
        levels: ``[session, image, answer]`` level indices (`answer_levels`).
        label_levels: ``[image]`` label level indices, -1 where unknown (None: no labels).
        seeds: The session seeds (for the record).
    """
    levels = np.asarray(levels, dtype=np.int64)
    if levels.ndim != 3 or levels.size == 0:
        raise ValueError(
            f"levels must be a non-empty [session, image, answer] array; got shape {levels.shape}"
        )
    n_sessions, n_images, n_answers = levels.shape
    labels = (
        np.full(n_images, -1, dtype=np.int64) if label_levels is None else np.asarray(label_levels, np.int64)
    )
    if labels.shape != (n_images,):
        raise ValueError(f"label_levels has shape {labels.shape}; expected ({n_images},)")
    known = labels >= 0
    accuracy = np.full(n_sessions, np.nan)
    majority = np.full(n_sessions, np.nan)
    for s in range(n_sessions):
        if known.any():
            accuracy[s] = (levels[s, known] == labels[known, None]).mean()
            counts = np.stack([(levels[s] == lv).sum(-1) for lv in range(len(LEVEL_WORDS))], -1)
            mode = np.where(counts.max(-1) > 0, counts.argmax(-1), NOT_A_LEVEL)
            majority[s] = (mode[known] == labels[known]).mean()
    return InstabilityResult(
        levels=levels,
        label_levels=labels,
        ratio=np.array([instability_ratio(levels[s]) for s in range(n_sessions)]),
        unstable=np.stack([unstable_counts(levels[s]) for s in range(n_sessions)]),
        accuracy=accuracy,
        majority_accuracy=majority,
        not_level_rate=float((levels == NOT_A_LEVEL).mean()),
        expected_uniform=expected_uniform_instability(n_answers),
        seeds=tuple(seeds) if seeds is not None else (),
    )
