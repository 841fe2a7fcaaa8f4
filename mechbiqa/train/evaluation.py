"""Held-out evaluation during training: teacher-forced loss plus the task's own metrics (SRCC, level accuracy, family naming)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import (
    LEVEL_WEIGHTS,
    LEVEL_WORDS,
    get_template,
)
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.pipeline import (
    Task,
    generate_answers,
    match_description,
    score_prompts,
    scoring_prompt,
    split_answer,
    task_prompt,
)
from mechbiqa.train.data import Example, collate, encode_example, label_smoothed_nll


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
    scores = probs @ np.asarray(LEVEL_WEIGHTS)
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
