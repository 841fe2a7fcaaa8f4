"""One process of a data-parallel test run (launched by ``torchrun`` from test_train_distributed.py).

Usage: ``train_worker.py BENCH_DIR OUT_DIR [--lora-from CHECKPOINT]``. Trains the
tiny model on the tiny benchmark with :data:`CONFIG`; every process of the
launch runs this same file, and :func:`mechbiqa.train.train` splits the batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from mechbiqa import train as T
from mechbiqa.data import BenchmarkConfig, build_benchmark
from mechbiqa.model import ModelConfig, MPLUGOwl2

CONFIG = T.TrainConfig(steps=3, batch_size=4, grad_accum=2, warmup_steps=1, lr=3e-3, eval_every=0, eval_samples=0,
                       checkpoint_every=2, checkpoint_seconds=0, precision="fp32", augment="dihedral", device="cpu")


def setup(bench_dir: Path):
    """Examples, tokenizer and a fresh tiny model, identical in every process."""
    bench = build_benchmark(BenchmarkConfig.tiny(image_size=28), bench_dir)
    tokenizer = T.compact_tokenizer(bench.split("train"), vocab_size=400)
    cfg = ModelConfig.tiny()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tokenizer.vocab_size))
    return T.examples_from_records(bench.split("train"), "one-stage"), tokenizer, T.init_weights(MPLUGOwl2(cfg), 0)


def run(bench_dir: Path, out_dir: Path, lora_from: str | None = None) -> T.TrainResult:
    """Train :data:`CONFIG` (LoRA from ``lora_from`` if given) into ``out_dir``."""
    examples, tokenizer, model = setup(bench_dir)
    if lora_from is not None:
        cfg = CONFIG.replace(lora_rank=4, lora_dropout=0.0, lr=5e-2, init_from=lora_from)
        return T.train(cfg, out_dir, examples)
    return T.train(CONFIG, out_dir, examples, model=model, tokenizer=tokenizer)


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    lora = args[args.index("--lora-from") + 1] if "--lora-from" in args else None
    run(Path(args[0]), Path(args[1]), lora)
