"""The random checkpoint writer: the released 7B key list, and a tiny directory that loads like a released one."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from mechbiqa.model import ModelConfig
from mechbiqa.model.load import load_components, load_pretrained
from mechbiqa.model.synthetic import original_shapes, write_random_checkpoint
from tests.conftest import LLAMA_TOKENIZER, SHARED_FIXTURES, require

REFERENCE_KEYS = SHARED_FIXTURES.parent / "reference" / "mplug_owl2_7b_keys.txt"


def test_7b_keys_and_shapes_equal_the_released_list() -> None:
    rows = [line.split("\t") for line in require(REFERENCE_KEYS).read_text().splitlines() if line.strip()]
    released = {key: tuple(json.loads(shape)) for key, shape in rows}
    assert len(released) == 894
    assert original_shapes(ModelConfig.llama2_7b()) == released


def test_tiny_random_checkpoint_loads_sharded_in_bf16(tmp_path) -> None:
    tiny = ModelConfig.tiny()
    cfg = replace(tiny, llm=replace(tiny.llm, vocab_size=32000))  # the LLaMA-2 tokenizer's ids
    directory = write_random_checkpoint(tmp_path / "ckpt", cfg, require(LLAMA_TOKENIZER), max_shard_bytes=2_000_000)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((directory / s).is_file() for s in shards)
    model = load_pretrained(directory, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    norms = [p for n, p in model.named_parameters() if n.endswith("ln_final.weight")]
    assert torch.equal(norms[0], torch.ones_like(norms[0]))
    parts = load_components(directory, dtype=torch.float32)
    ids = torch.tensor([parts.tokenizer.encode("The quality of the image is")])
    logits = parts.model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.llm.vocab_size) and torch.isfinite(logits).all()
    # a finished directory is reused as it is
    stamp = (directory / shards[0]).stat().st_mtime_ns
    write_random_checkpoint(directory, cfg, LLAMA_TOKENIZER, max_shard_bytes=2_000_000)
    assert (directory / shards[0]).stat().st_mtime_ns == stamp
