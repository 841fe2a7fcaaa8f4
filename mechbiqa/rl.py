"""GRPO-style RL fine-tuning of a one-stage rater (the second paper; DESIGN.md, "RL fine-tuning").

How it connects: the policy is a one-stage checkpoint (:mod:`mechbiqa.train`)
loaded with :func:`~mechbiqa.model.load.load_components`, optionally with LoRA
adapters (peft); answers are sampled with :meth:`MPLUGOwl2.generate` from the
one-stage prompt of :mod:`mechbiqa.pipeline`; the result is written back as a
one-stage checkpoint by :func:`mechbiqa.finetune_io.write_checkpoint`.

The method, per step:

1. for each of ``images_per_step`` images draw a *group* of ``G`` answers
   (temperature sampling from a seeded generator: a function of ``(seed, step)``);
2. score each answer with the rewards below, weighted and summed: ``r_i``;
3. advantage within the group: ``A_i = (r_i - mean(r)) / (std(r) + eps)``
   (:func:`group_advantages`; ``std`` is the unbiased sample std, as TRL);
4. per answer token ``t``, ratio ``rho = exp(logp - logp_old)``, the clipped
   surrogate ``-min(rho A, clip(rho, 1 - e, 1 + e) A)`` (:func:`clipped_surrogate`)
   plus ``beta`` times the k3 estimator of KL(policy || reference),
   ``exp(d) - d - 1`` with ``d = logp_ref - logp`` (Schulman's unbiased,
   non-negative estimator; :func:`kl_k3`); mean over each answer's tokens, then
   over answers (:func:`grpo_loss`). Only answer tokens (their ``</s>``
   included) carry loss. The reference is the frozen starting model: the same
   model with its adapters disabled under LoRA, else a frozen copy.

Rewards (each a small function of one answer, :func:`paper_rewards` combines them):

* human annotation: :func:`level_hit` (the answer's level word equals the
  label's) or :func:`mos_closeness` (``1 - |level value - MOS|`` on 0-1), and
  :func:`rouge_rewards` (ROUGE-1 F1 of the answer's reasoning against the
  reference description, :func:`mechbiqa.analysis.rouge.rouge1`);
* self-consistency (:func:`self_consistency`): the *same* model reads only its
  own description, as text, in the stage-2 prompt of :mod:`mechbiqa.pipeline`
  (no image), and its level word is compared with the image answer's level
  (``consistency_answer``) and with the label (``consistency_label``).

Why not TRL's ``GRPOTrainer`` (trl is installed): it drives an HF
``PreTrainedModel`` through ``generate(**inputs)`` and a ``processing_class``,
and reads completion log-probs by aligning ``logits[:, -n:]`` with
``input_ids``. mPLUG-Owl2 here is a ``HookedRootModule`` that replaces each
``-200`` placeholder by 65 image rows and left-pads the spliced rows, so
logits and ``input_ids`` do not share positions, and its tokenizer is not an
HF tokenizer. The self-consistency reward also needs the policy itself
inside the reward. So the loop below is our own: short, with the three pieces
of arithmetic as separately tested functions.

Research choices: the model stays in eval mode (no dropout) while sampling and
while computing the loss, so with one inner step ``logp_old = logp.detach()``
and the ratio is exactly 1 (GRPO's default, ``mu = 1``); ``inner_steps > 1``
reuses the samples with a frozen ``logp_old``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechbiqa.analysis.rouge import rouge1
from mechbiqa.finetune_io import core_model, lora_layers
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS, ConversationTemplate, get_template
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.pipeline import score_prompts, scoring_prompt, split_answer, task_prompt
from mechbiqa.train import Example

__all__ = [
    "RewardWeights",
    "RLConfig",
    "Sampled",
    "RLStep",
    "RLResult",
    "RLState",
    "group_advantages",
    "clipped_surrogate",
    "kl_k3",
    "grpo_loss",
    "answer_logprobs",
    "sample_answers",
    "level_hit",
    "mos_closeness",
    "rouge_rewards",
    "text_path_levels",
    "self_consistency",
    "paper_rewards",
    "train_rl",
]


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True, slots=True)
class RewardWeights:
    """Weight of each reward in ``r_i`` (0 switches one off, and skips its computation).

    Attributes:
        level: :func:`level_hit` (the answer's level equals the label's).
        mos: :func:`mos_closeness` (1 - |level value - MOS|, 0-1).
        rouge: :func:`rouge_rewards` (ROUGE-1 F1 of the reasoning vs the reference description).
        consistency_answer: text-only rating of the answer's own description equals the answer's level.
        consistency_label: text-only rating of the answer's own description equals the label.
    """

    level: float = 1.0
    mos: float = 0.0
    rouge: float = 0.5
    consistency_answer: float = 0.5
    consistency_label: float = 0.5

    def __post_init__(self) -> None:
        """Refuse negative weights."""
        for name in self.__slots__:
            if getattr(self, name) < 0:
                raise ValueError(f"reward weight {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class RLConfig:
    """One GRPO run.

    Attributes:
        steps: Optimizer steps.
        images_per_step: Groups (images) per step.
        group_size: Sampled answers per image (G).
        lr: AdamW learning rate (no decay: the KL term keeps the policy near the reference).
        clip_eps: Ratio clip (PPO's epsilon).
        kl_beta: Weight of the k3 KL penalty.
        adv_eps: ``eps`` in ``(r - mean) / (std + eps)``.
        inner_steps: Gradient steps on each batch of samples (GRPO's mu).
        temperature: Sampling temperature.
        top_k: Sample from the ``k`` most likely tokens (None: all).
        max_new_tokens: Longest sampled answer.
        clip_norm: Gradient-norm clip (0: none).
        template: Conversation template (`finetune_checkpoint` sets the checkpoint's own).
        autocast: ``"bfloat16"``/``"float16"`` to run forwards under autocast (GPU, LoRA on a bf16
            model); None: in the model's own dtype. Log-probs are always float32.
        weights: The reward weights.
        seed: Seeds the image order and every sampling generator.
    """

    steps: int = 50
    images_per_step: int = 2
    group_size: int = 4
    lr: float = 1e-5
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    adv_eps: float = 1e-4
    inner_steps: int = 1
    temperature: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 48
    clip_norm: float = 1.0
    template: str = "v1"
    autocast: str | None = None
    weights: RewardWeights = field(default_factory=RewardWeights)
    seed: int = 0

    def __post_init__(self) -> None:
        """Validate (no side effects)."""
        for name in ("steps", "images_per_step", "inner_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (advantages compare answers), got {self.group_size}"
            )
        if self.lr <= 0 or self.clip_eps <= 0 or self.kl_beta < 0 or self.temperature <= 0:
            raise ValueError("need lr > 0, clip_eps > 0, kl_beta >= 0 and temperature > 0")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast must be None, 'bfloat16' or 'float16', got {self.autocast!r}")
        get_template(self.template)


# --------------------------------------------------------------------------------------------- arithmetic
def group_advantages(
    rewards: Float[Tensor, "group sample"], eps: float = 1e-4
) -> Float[Tensor, "group sample"]:
    """``(r - mean) / (std + eps)`` within each group (row); std is the unbiased sample std."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must be [group, sample] with at least 2 samples, got {tuple(rewards.shape)}"
        )
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def clipped_surrogate(
    logp: Float[Tensor, "sample token"],
    logp_old: Float[Tensor, "sample token"],
    advantages: Float[Tensor, " sample"],
    clip_eps: float,
) -> tuple[Float[Tensor, "sample token"], Bool[Tensor, "sample token"]]:
    """Per token ``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with ``rho = exp(logp - logp_old)``.

    Returns:
        The per-token loss, and where the clipped branch was the smaller one (clip fraction).
    """
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    plain, clipped = ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(plain, clipped), clipped < plain


def kl_k3(logp: Float[Tensor, "*shape"], logp_ref: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1``, ``d = logp_ref - logp``."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(
    logp: Float[Tensor, "sample token"],
    logp_old: Float[Tensor, "sample token"],
    logp_ref: Float[Tensor, "sample token"],
    advantages: Float[Tensor, " sample"],
    mask: Bool[Tensor, "sample token"],
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO's objective: ``1/G sum_i 1/|o_i| sum_t [surrogate + beta * k3]`` over answer tokens only.

    Returns:
        The loss (scalar) and statistics: ``kl`` (mean per token), ``clip_frac``, ``surrogate``.
    """
    surrogate, clipped = clipped_surrogate(logp, logp_old, advantages, clip_eps)
    kl = kl_k3(logp, logp_ref)
    m = mask.to(logp.dtype)
    per_answer = ((surrogate + beta * kl) * m).sum(1) / m.sum(1).clamp(min=1.0)
    n = m.sum().clamp(min=1.0)
    kl_d, m_d = kl.detach(), m.detach()
    stats = {
        "kl": float((kl_d * m_d).sum() / n),
        "clip_frac": float((clipped.to(m.dtype) * m_d).sum() / n),
        "surrogate": float((surrogate.detach() * m_d).sum() / n),
    }
    return per_answer.mean(), stats


# --------------------------------------------------------------------------------------------- model pieces
def answer_logprobs(
    model: MPLUGOwl2,
    prompt_ids: Sequence[int],
    pixels: Float[Tensor, "1 3 S S"] | None,
    answers: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[Float[Tensor, "sample token"], Bool[Tensor, "sample token"]]:
    """Log-probabilities of each answer's tokens after one prompt (+ its image), float32.

    The model left-pads its spliced rows, so every row's last real token is the
    last column: answer tokens are right-aligned in the returned ``[sample,
    longest answer]`` window, with ``mask`` True at real answer tokens.
    """
    longest = max(len(a) for a in answers)
    if longest == 0:
        raise ValueError("every answer is empty: sample with max_new_tokens >= 1")
    rows = [list(prompt_ids) + list(a) for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    targets = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        if answer:
            targets[i, longest - len(answer) :] = torch.tensor(list(answer))
            mask[i, longest - len(answer) :] = True
    device = model.device
    images = None if pixels is None else pixels.to(device, model.dtype).expand(len(rows), -1, -1, -1)
    logits = model(ids.to(device), images=images, attention_mask=attention.to(device)).logits
    window = logits[:, -longest - 1 : -1].float().log_softmax(-1)  # [sample, token, vocab]
    logp = window.gather(-1, targets.to(device)[..., None]).squeeze(-1)
    return logp * mask.to(device), mask.to(device)


@torch.no_grad()
def sample_answers(
    model: MPLUGOwl2,
    prompt_ids: Sequence[int],
    pixels: Float[Tensor, "1 3 S S"] | None,
    n: int,
    *,
    generator: torch.Generator,
    eos_id: int,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> list[list[int]]:
    """``n`` sampled answers to one prompt (one prefill, repeated), each cut after its ``</s>``."""
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    images = None if pixels is None else pixels.to(model.device, model.dtype)
    cache = model.prefill(ids, images=images).repeat_interleave(n)
    out = model.generate(
        ids.repeat(n, 1),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        generator=generator,
        eos_token_id=eos_id,
    )
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        answers.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return answers


@dataclass(frozen=True, slots=True)
class Sampled:
    """One sampled answer: its ids (``</s>`` included when emitted), text, and the parts the rewards read."""

    ids: tuple[int, ...]
    text: str
    description: str
    level: str | None

    @classmethod
    def from_ids(cls, ids: Sequence[int], tokenizer: Tokenizer) -> Sampled:
        """Decode and split (:func:`mechbiqa.pipeline.split_answer`)."""
        text = tokenizer.decode([i for i in ids if i != tokenizer.eos_id]).strip()
        description, level = split_answer(text)
        return cls(ids=tuple(ids), text=text, description=description, level=level)


# --------------------------------------------------------------------------------------------- rewards
def level_hit(level: str | None, label: str | None) -> float:
    """1 when the answer's level word is the label's, else 0 (also when either is missing)."""
    return float(level is not None and level == label)


def mos_closeness(level: str | None, mos01: float | None) -> float:
    """``1 - |value(level) - MOS|`` on 0-1 (Q-Align's `LEVEL_WEIGHTS`); 0 without a level or MOS."""
    if level is None or mos01 is None:
        return 0.0
    return 1.0 - abs(LEVEL_WEIGHTS[LEVEL_WORDS.index(level)] - float(mos01))


def rouge_rewards(descriptions: Sequence[str], reference: str | Sequence[str] | None) -> list[float]:
    """ROUGE-1 F1 of each description against the reference description(s) (0 without any).

    With several references (the benchmark's description and a user's annotations,
    :func:`mechbiqa.analysis.rouge.references_with`) the best-matching one counts, as in
    :func:`mechbiqa.analysis.rouge.rouge1`.
    """
    refs = [reference] if isinstance(reference, str) else [r for r in (reference or ()) if r]
    if not refs or not descriptions:
        return [0.0] * len(descriptions)
    refs_arg = refs[0] if len(refs) == 1 else tuple(refs)
    return rouge1(list(descriptions), [refs_arg] * len(descriptions)).f1.tolist()


@torch.no_grad()
def text_path_levels(
    model: MPLUGOwl2, tokenizer: Tokenizer, template: ConversationTemplate, descriptions: Sequence[str]
) -> list[str]:
    """The level word the model gives each description read as text only (the stage-2 prompt, no image)."""
    prompts = [scoring_prompt(tokenizer, template, "stage2", d) for d in descriptions]
    logits = score_prompts(model, tokenizer, prompts, None)
    return [LEVEL_WORDS[int(i)] for i in logits.argmax(1)]


def self_consistency(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    template: ConversationTemplate,
    answers: Sequence[Sampled],
    label: str | None,
) -> tuple[list[float], list[float]]:
    """Whether the text-only rating of each answer's own description agrees with the answer and the label.

    Returns:
        ``(vs_answer, vs_label)``: 1.0 / 0.0 per answer (an answer without a level word never agrees).
    """
    text = text_path_levels(model, tokenizer, template, [a.description for a in answers])
    vs_answer = [level_hit(t, a.level) for t, a in zip(text, answers, strict=True)]
    return vs_answer, [level_hit(t, label) for t in text]


def paper_rewards(
    model: MPLUGOwl2,
    answers: Sequence[Sampled],
    example: Example,
    *,
    tokenizer: Tokenizer,
    template: ConversationTemplate,
    weights: RewardWeights,
    references: Sequence[str] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of the paper's rewards for one group, and each part (only those with weight > 0).

    ``example.level`` is the label's level word, ``example.score`` its MOS on 0-1,
    ``example.description`` the reference description; ``references`` replaces it with several
    (the benchmark's and a user's annotations: the best-matching one counts).
    """
    parts: dict[str, list[float]] = {}
    if weights.level:
        parts["level"] = [level_hit(a.level, example.level) for a in answers]
    if weights.mos:
        parts["mos"] = [mos_closeness(a.level, example.score) for a in answers]
    if weights.rouge:
        refs = references if references is not None else example.description
        parts["rouge"] = rouge_rewards([a.description for a in answers], refs)
    if weights.consistency_answer or weights.consistency_label:
        parts["consistency_answer"], parts["consistency_label"] = self_consistency(
            model, tokenizer, template, answers, example.level
        )
    total = np.zeros(len(answers))
    for name, values in parts.items():
        total += getattr(weights, name) * np.asarray(values)
    return total.tolist(), parts


# --------------------------------------------------------------------------------------------- the loop
RewardFn = Callable[[MPLUGOwl2, Sequence[Sampled], Example], tuple[list[float], dict[str, list[float]]]]


@dataclass(frozen=True)
class RLStep:
    """One step's record: mean reward (and per part), loss, KL, clip fraction, seconds."""

    step: int
    reward: float
    parts: dict[str, float]
    loss: float
    kl: float
    clip_frac: float
    seconds: float


@dataclass
class RLResult:
    """What :func:`train_rl` did (the model is trained in place)."""

    config: RLConfig
    history: list[RLStep] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of a step."""
        return float(np.mean([h.seconds for h in self.history])) if self.history else float("nan")


@dataclass(frozen=True)
class RLState:
    """Where a run stopped: steps done, the optimizer's state, the steps' records (resume with it)."""

    step: int
    optimizer: dict[str, Any] = field(default_factory=dict)
    history: tuple[RLStep, ...] = ()


@contextlib.contextmanager
def _adapters_off(model: nn.Module) -> Iterator[None]:
    layers = lora_layers(model)
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def train_rl(
    model: nn.Module,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    examples: Sequence[Example],
    cfg: RLConfig,
    *,
    reference: MPLUGOwl2 | None = None,
    reward_fn: RewardFn | None = None,
    progress: Callable[[RLStep], None] | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
    resume: RLState | None = None,
    checkpoint: Callable[[RLState], None] | None = None,
    checkpoint_every: int = 0,
) -> RLResult:
    """GRPO on one-stage answers, in place (trainable parameters: those with ``requires_grad``).

    Args:
        model: The policy: an `MPLUGOwl2` (a one-stage checkpoint), with peft LoRA adapters
            injected or as a ``PeftModel``, in the dtype it should run in.
        tokenizer: Its tokenizer.
        processor: Its image processor.
        examples: Images with labels (``level``, ``score`` on 0-1, reference ``description``).
        cfg: The run's configuration.
        reference: The frozen reference; None: the model with adapters disabled if it has
            LoRA adapters, else a frozen copy made here.
        reward_fn: ``(model, answers, example) -> (rewards, parts)``; None: :func:`paper_rewards`.
        progress: Called with each step's :class:`RLStep`.
        references: Example id -> reference descriptions for the ROUGE reward (the benchmark's and
            a user's annotations, :func:`mechbiqa.analysis.rouge.references_with`); an id not in it,
            or None: the example's own description.
        resume: Continue a run from this state (the model must hold the weights of that step, and
            ``reference`` must be the starting model): the same steps follow as without the stop,
            since samples and image order are functions of ``(seed, step)``.
        checkpoint: Called with the state every ``checkpoint_every`` steps (not after the last).
        checkpoint_every: Steps between calls of ``checkpoint`` (0: never).
    """
    core = core_model(model)
    core.eval()
    template = get_template(cfg.template)
    if reference is None and not lora_layers(core):
        if resume is not None and resume.step:
            raise ValueError("resuming needs the starting model as `reference` (the KL anchor of the run)")
        reference = copy.deepcopy(core).requires_grad_(False)
    reward_fn = reward_fn or (
        lambda m, a, e: paper_rewards(m, a, e, tokenizer=tokenizer, template=template, weights=cfg.weights,
                                      references=None if references is None else references.get(e.id))
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (requires_grad); unfreeze them or add adapters"
        )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    if resume is not None and resume.optimizer:
        optimizer.load_state_dict(resume.optimizer)
    device = core.device

    def autocast() -> contextlib.AbstractContextManager:
        return (
            torch.autocast(device.type, dtype=getattr(torch, cfg.autocast))
            if cfg.autocast
            else contextlib.nullcontext()
        )

    prompt = task_prompt(tokenizer, template, "one-stage").ids
    pixels: dict[int, Tensor] = {}  # preprocessed as first drawn: a run sees steps * images_per_step images
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    result = RLResult(config=cfg, history=list(resume.history) if resume is not None else [])
    for step in range(resume.step if resume is not None else 0, cfg.steps):
        t0 = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        picks = [order[(step * cfg.images_per_step + j) % len(order)] for j in range(cfg.images_per_step)]
        groups, rewards, parts = [], [], {}
        for i in picks:
            if i not in pixels:
                pixels[i] = processor([examples[i].image])
            image = pixels[i]
            with autocast():
                ids = sample_answers(
                    core,
                    prompt,
                    image,
                    cfg.group_size,
                    generator=generator,
                    eos_id=tokenizer.eos_id,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                )
                answers = [Sampled.from_ids(a, tokenizer) for a in ids]
                total, part = reward_fn(core, answers, examples[i])
            groups.append((image, ids))
            rewards.append(total)
            for k, v in part.items():
                parts.setdefault(k, []).extend(v)
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32), cfg.adv_eps).to(device)
        with torch.no_grad(), autocast():
            with _adapters_off(core) if reference is None else contextlib.nullcontext():
                refs = [
                    answer_logprobs(
                        core if reference is None else reference, prompt, im, a, tokenizer.pad_id
                    )[0]
                    for im, a in groups
                ]
            olds = (
                [answer_logprobs(core, prompt, im, a, tokenizer.pad_id)[0] for im, a in groups]
                if cfg.inner_steps > 1
                else None
            )
        for _ in range(cfg.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            loss_sum, stats = 0.0, {"kl": 0.0, "clip_frac": 0.0}
            for g, (image, ids) in enumerate(groups):
                with autocast():
                    logp, mask = answer_logprobs(core, prompt, image, ids, tokenizer.pad_id)
                old = logp.detach() if olds is None else olds[g]
                loss, st = grpo_loss(logp, old, refs[g], advantages[g], mask, cfg.clip_eps, cfg.kl_beta)
                (loss / len(groups)).backward()
                loss_sum += float(loss.detach()) / len(groups)
                for k in stats:
                    stats[k] += st[k] / len(groups)
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            optimizer.step()
        record = RLStep(
            step=step + 1,
            reward=float(np.mean(rewards)),
            parts={k: float(np.mean(v)) for k, v in parts.items()},
            loss=loss_sum,
            kl=stats["kl"],
            clip_frac=stats["clip_frac"],
            seconds=time.perf_counter() - t0,
        )
        result.history.append(record)
        if progress is not None:
            progress(record)
        done = step + 1
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < cfg.steps:
            checkpoint(RLState(step=done, optimizer=optimizer.state_dict(), history=tuple(result.history)))
    optimizer.zero_grad(set_to_none=True)
    return result


RL_STATE_FILE = "rl_state.pt"
"""Beside the weights of an unfinished RL checkpoint: steps done, optimizer state, step records."""


def rl_info(
    cfg: RLConfig,
    result: RLResult,
    parent: str | None,
    template: str,
    *,
    finished: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``mechbiqa.json`` of an RL checkpoint: a one-stage checkpoint with its RL provenance."""
    from dataclasses import asdict

    return {
        "format": 1,
        "mode": "one-stage",
        "stage": None,
        "task": "one-stage",
        "template": template,
        "step": len(result.history),
        "finished": finished,
        "parent": parent,
        "rl_config": asdict(cfg),
        "rl_history": [asdict(h) for h in result.history],
        **(extra or {}),
    }


__all__ += ["rl_info", "RewardFn", "RL_STATE_FILE"]


def _saved_run(out_dir: Path, expected: dict[str, Any]) -> tuple[dict[str, Any], RLState | None] | None:
    """A run in ``out_dir`` started with the same settings: its info and (unfinished) state, else None."""
    from mechbiqa.pipeline import read_info

    try:
        info = read_info(out_dir).data
    except FileNotFoundError:
        return None
    if any(info.get(k) != v for k, v in expected.items()):
        return None
    if info.get("finished"):
        return info, None
    state_file = out_dir / RL_STATE_FILE
    if not state_file.is_file():
        return None
    raw = torch.load(state_file, map_location="cpu", weights_only=True)
    history = tuple(RLStep(**h) for h in raw["history"])
    return info, RLState(step=int(raw["step"]), optimizer=raw["optimizer"], history=history)


def finetune_checkpoint(
    init_from: str | Path,
    out_dir: str | Path,
    examples: Sequence[Example],
    cfg: RLConfig,
    *,
    lora_rank: int | None = None,
    lora_targets: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[RLStep], None] | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
    checkpoint_every: int = 0,
    extra_info: dict[str, Any] | None = None,
    fresh: bool = False,
    reward_fn: RewardFn | None = None,
) -> RLResult:
    """GRPO from a one-stage checkpoint directory into ``out_dir`` (a one-stage checkpoint again).

    ``out_dir`` is written as the training loop writes its checkpoints
    (:func:`mechbiqa.train.publish`: a link to its newest complete version, so a kill at any
    instant leaves the last one). A finished run with the same settings (``rl_config``, parent,
    ``extra_info``) is returned as it is, without training; an unfinished one (full fine-tuning
    with ``checkpoint_every``) resumes from its last checkpoint on the same trajectory.

    Args:
        init_from: The one-stage checkpoint (refused if it is of another mode).
        out_dir: Where the fine-tuned checkpoint is written (LoRA merged).
        examples: Images with labels (``mechbiqa.train.examples_from_records(records, "one-stage")``).
        cfg: The run.
        lora_rank: LoRA rank on the LLM's projections (peft); None: full fine-tuning.
        lora_targets: Regex of module names that get adapters (default: mechbiqa.train's).
        device: Where to train.
        dtype: Parameter dtype (``torch.bfloat16`` for 7B with LoRA on a GPU).
        progress: Called with each step.
        references: Example id -> reference descriptions of the ROUGE reward (see `train_rl`).
        checkpoint_every: Steps between resumable checkpoints (0: none; full fine-tuning only).
        extra_info: More fields of ``mechbiqa.json`` that must match for a run to be reused.
        fresh: Train from the start even when a run with the same settings is there.
        reward_fn: Replaces :func:`paper_rewards` (see `train_rl`; name it in ``extra_info``, since
            only the settings there decide whether a saved run is the same).
    """
    from mechbiqa.finetune_io import add_lora, write_checkpoint
    from mechbiqa.model.load import load_components
    from mechbiqa.pipeline import expect_checkpoint
    from mechbiqa.train import publish, recover

    if checkpoint_every and lora_rank is not None:
        raise ValueError(
            "checkpoint_every resumes full fine-tuning only; pass checkpoint_every=0 with lora_rank"
        )
    info = expect_checkpoint(init_from, "one-stage")
    from dataclasses import asdict, replace

    cfg = replace(cfg, template=info.template)  # the checkpoint's own prompts, whatever cfg's default says
    out_dir = Path(out_dir)
    recover(out_dir)

    expected = {"parent": str(init_from), "rl_config": _as_json(asdict(cfg)),
                **_as_json(extra_info or {})}  # fmt: skip
    saved = None if fresh else _saved_run(out_dir, expected)
    if saved is not None and saved[1] is None:  # finished with the same settings
        return RLResult(config=cfg, history=[RLStep(**h) for h in saved[0]["rl_history"]])
    state = None if saved is None else saved[1]
    comps = load_components(out_dir if state is not None else init_from, dtype=dtype, device=device)
    model: nn.Module = comps.model
    reference = None
    if state is not None:
        reference = load_components(init_from, dtype=dtype, device=device).model.requires_grad_(False)
    if lora_rank is not None:
        model = add_lora(model, lora_rank, lora_targets)

    def write(result: RLResult, finished: bool, rl_state: RLState | None) -> None:
        meta = rl_info(cfg, result, str(init_from), info.template, finished=finished, extra=extra_info)

        def fill(directory: Path) -> None:
            write_checkpoint(directory, model, comps.tokenizer, comps.processor, meta)
            if rl_state is not None:
                torch.save({"step": rl_state.step, "optimizer": rl_state.optimizer,
                            "history": [asdict(h) for h in rl_state.history]}, directory / RL_STATE_FILE)

        publish(out_dir, fill, step=len(result.history))

    def save(rl_state: RLState) -> None:
        write(RLResult(config=cfg, history=list(rl_state.history)), False, rl_state)

    result = train_rl(model, comps.tokenizer, comps.processor, examples, cfg, reference=reference,
                      reward_fn=reward_fn, progress=progress, references=references, resume=state,
                      checkpoint=save, checkpoint_every=checkpoint_every)  # fmt: skip
    write(result, True, None)
    return result


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so saved settings compare equal."""
    import json

    from mechbiqa.outputs import jsonable

    return json.loads(json.dumps(jsonable(value)))


__all__ += ["finetune_checkpoint"]
