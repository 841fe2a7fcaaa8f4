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
``studies/train_pair.py`` drives :func:`train_pair` from the command line; nothing here prints.

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

The files: :mod:`~mechbiqa.train.config` (:class:`TrainConfig`, schedule,
budget), :mod:`~mechbiqa.train.data` (examples, encoding, collation, Eq. 2,
data order), :mod:`~mechbiqa.train.init` (compact tokenizer and model, DCT
init), :mod:`~mechbiqa.train.evaluation`, :mod:`~mechbiqa.train.checkpoint`
(:class:`State`, the versioned swap), :mod:`~mechbiqa.train.lora`,
:mod:`~mechbiqa.train.distributed`, :mod:`~mechbiqa.train.loop`
(:func:`train`, :func:`train_two_stage`) and :mod:`~mechbiqa.train.pair` (:func:`train_pair`:
the one-stage / two-stage pair trained, rated on the test split and compared in ``results.json``;
:func:`train_or_reuse`).

A checkpoint directory is a link to its newest complete version and holds the
model (``config.json``, ``model.safetensors``), tokenizer, processor,
``mechbiqa.json`` (mode, stage, template, training config, metrics) and
``training_state.pt`` (:class:`State`: step, optimizer, scaler, RNG states,
loss history, evaluations, LoRA adapters, the steps of every process that
trained it). Checkpoints are written every ``checkpoint_every`` steps and
``checkpoint_seconds`` seconds; a kill at any instant, even inside a write,
leaves the last complete one, and the rerun resumes on the uninterrupted loss
curve (data order and augmentation are pure functions of (seed, step)).

Real 7B checkpoints, LoRA (``pip install 'mechbiqa[lora,dist]'``), on one GPU::

    python studies/train_pair.py --init-from /models/mplug-owl2-llama2-7b --lora-rank 64 \\
        --device cuda --precision bf16 --param-dtype bfloat16 --batch-size 8 --grad-accum 4 \\
        --lr 2e-4 --total-steps 1500 --out-dir cache/pair-7b [--annotations q-pathway.json --image-root imgs/]

or data parallel on eight (``--batch-size`` is the global micro-batch; the run
takes the same steps as on one GPU and resumes exactly)::

    accelerate launch --multi_gpu --num_processes 8 studies/train_pair.py --init-from ... \\
        --lora-rank 64 --device cuda --precision bf16 --param-dtype bfloat16 --batch-size 64 ...

Full fine-tuning beyond one GPU: ``accelerate launch --use_fsdp
--fsdp_use_orig_params true --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
--fsdp_transformer_layer_cls_to_wrap Block ...`` or ``--use_deepspeed
--deepspeed_config_file zero2.json`` (untested here; no evaluation during
training, and no resume: see :mod:`~mechbiqa.train.distributed`). On CPUs,
``torchrun --nproc_per_node 2 studies/train_pair.py ...`` (gloo).

LoRA adapters go on the LLM's attention and MLP projections (both multiway
branches of K/V); checkpoints before the end hold the adapters only, and the
final ``model.safetensors`` holds the weights merged once with peft's
``merge_and_unload``.
"""

from mechbiqa.model.load import load_pretrained
from mechbiqa.model.tokenizer import load_tokenizer
from mechbiqa.pipeline import read_info
from mechbiqa.train.checkpoint import (
    PAUSE_ENV,
    PAUSE_FILE_ENV,
    STATE_FILE,
    State,
    publish,
    read_or_write_tokenizer,
    recover,
    save_tokenizer,
)
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
    predicting_positions,
)
from mechbiqa.train.distributed import Processes, is_main_process, main_process_first
from mechbiqa.train.evaluation import evaluate
from mechbiqa.train.init import (
    build_compact_model,
    check_level_pieces,
    compact_tokenizer,
    dct_patch_basis,
    init_weights,
)
from mechbiqa.train.loop import TrainEvent, TrainResult, cpu_has_bf16, load_trained, train, train_two_stage
from mechbiqa.train.pair import (
    TRAINERS,
    AnnotationWarning,
    PairConfig,
    PairData,
    PairResult,
    Trained,
    Trainer,
    add_entries,
    pair_data,
    read_results,
    train_or_reuse,
    train_pair,
)

__all__ = [
    "add_entries",
    "IGNORE_INDEX",
    "STATE_FILE",
    "PAUSE_ENV",
    "PAUSE_FILE_ENV",
    "TrainConfig",
    "TrainingDataError",
    "Example",
    "examples_from_records",
    "check_example",
    "EncodedExample",
    "encode_example",
    "collate",
    "label_smoothed_nll",
    "predicting_positions",
    "learning_rate",
    "split_budget",
    "compact_tokenizer",
    "check_level_pieces",
    "build_compact_model",
    "init_weights",
    "cpu_has_bf16",
    "dct_patch_basis",
    "State",
    "publish",
    "recover",
    "save_tokenizer",
    "read_or_write_tokenizer",
    "TrainEvent",
    "TrainResult",
    "evaluate",
    "Processes",
    "is_main_process",
    "main_process_first",
    "train",
    "train_two_stage",
    "load_trained",
    "PairConfig",
    "PairData",
    "PairResult",
    "Trained",
    "Trainer",
    "TRAINERS",
    "AnnotationWarning",
    "pair_data",
    "train_pair",
    "train_or_reuse",
    "read_results",
    "read_info",
    "load_pretrained",
    "load_tokenizer",
]
