"""Record ragged per-sample prompts with `record_sharded` (run under torchrun by test_cache_activations).

Usage: ``python sharded_prompts.py IMAGES_DIR OUT.h5`` (one process: one store; torchrun: shards + join).
The prompts differ in length and in their count of description tokens, and so do the answers, so
each rank's own plan would give another layout: the ranks must agree one before recording.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mechbiqa.model.prompts import EncodedPrompt
from mechbiqa.sources import tiny_random_model
from mechbiqa.store import CacheSpec
from mechbiqa.store.record import PromptConfig, PromptedSample, plan_prompts
from mechbiqa.store.shards import record_sharded

SPEC = "default; llm.blocks.{l}.hook_resid_post@description; llm.blocks.{l}.attn.hook_pattern@all:1"


def samples(images: Path, tokenizer) -> list[PromptedSample]:
    """Seven prompts: rank 1's part (the last four) holds the longest one and rank 0's the longest answer."""
    base = PromptConfig().encode(tokenizer, "score")
    ids = list(base.ids)
    out = []
    for i, extra in enumerate((0, 1, 2, 5, 0, 1, 2)):
        long = ids[:-1] + tokenizer.encode(" sharp and clear" * extra) + ids[-1:]
        text_only = i == 4  # the image dropped: a stage-2 style prompt
        if text_only:
            long = [t for t in long if t >= 0]
        prompt = EncodedPrompt(
            tokenizer.decode(long), tuple(long), base.response_start - text_only, len(long) - 1
        )
        image = images / f"img{i:03d}.png"
        out.append(
            PromptedSample(f"s{i}", prompt, image, label=i / 7, answer="an answer" * (8 if i == 1 else 1))
        )
    return out


def main(images: Path, out: Path) -> None:
    """Record the samples into ``out`` (shards and a joined store under torchrun)."""
    model, tokenizer, processor = tiny_random_model(0)
    spec = CacheSpec.parse(SPEC, dtype="float32")

    def prepare(part, path, shard):  # noqa: D103
        return plan_prompts(model, tokenizer, processor, part, spec, path, batch_size=2, shard=shard)

    record_sharded(out, samples(images, tokenizer), prepare)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
