r"""Training: one-stage and two-stage checkpoints of mPLUG-Owl2, compact or real (LoRA).

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

from mechbiqa.model.load import load_pretrained
from mechbiqa.model.tokenizer import load_tokenizer
from mechbiqa.pipeline import read_info
from mechbiqa.train.checkpoint import STATE_FILE, State
from mechbiqa.train.config import TrainConfig, learning_rate, split_budget
from mechbiqa.train.data import (
    IGNORE_INDEX,
    EncodedExample,
    Example,
    TrainingDataError,
    check_example,
    collate,
    encode_example,
    examples_from_records,
    label_smoothed_nll,
)
from mechbiqa.train.evaluation import evaluate
from mechbiqa.train.init import (
    build_compact_model,
    check_level_pieces,
    compact_tokenizer,
    dct_patch_basis,
    init_weights,
)
from mechbiqa.train.loop import TrainEvent, TrainResult, cpu_has_bf16, load_trained, train, train_two_stage

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
    "check_level_pieces",
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
    "load_trained",
    "read_info",
    "load_pretrained",
    "load_tokenizer",
]
