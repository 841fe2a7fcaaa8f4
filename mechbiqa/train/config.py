"""The configuration of one training run: :class:`TrainConfig`, the step budget and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from mechbiqa.model.prompts import (
    get_template,
)
from mechbiqa.pipeline import (
    Mode,
    Task,
)

_DEFAULT_LORA_TARGETS = (
    r".*llm\.blocks\.\d+\.(attn\.(q_proj|o_proj|k_proj\.multiway\.\d|v_proj\.multiway\.\d)"
    r"|mlp\.(gate_proj|up_proj|down_proj))"
)


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
        checkpoint_every: Steps between resumable checkpoints (0: none by step count).
        checkpoint_seconds: Seconds between resumable checkpoints (0: none by time). With both
            at 0 a run checkpoints only at its end, and a kill loses it all.
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
    checkpoint_every: int = 100
    checkpoint_seconds: float | int = 600.0
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
        if self.checkpoint_every < 0 or self.checkpoint_seconds < 0:
            raise ValueError("checkpoint_every and checkpoint_seconds must be >= 0 (0: off)")
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


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step (nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - low)
