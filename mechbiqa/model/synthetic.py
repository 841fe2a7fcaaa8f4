"""Random checkpoint directories with any config's shapes, written the way the released ones are.

What a researcher runs first on a new machine is the real path at real scale:
a 7B checkpoint in bf16, sharded safetensors under the original key names, a
SentencePiece tokenizer, a ``preprocessor_config.json``. `write_random_checkpoint`
writes exactly that layout from a `ModelConfig` (``ModelConfig.llama2_7b()`` for the
released shapes) without ever holding the model: each tensor is drawn, cast and
written shard by shard, so a 16 GB bf16 checkpoint needs about one shard of memory.
`mechbiqa.model.load.load_pretrained` then reads it memory-mapped like a released one;
`studies/smoke_7b.py` runs every study on it.

The values are random (normal with std ``1/sqrt(fan_in)`` for matrices, ones for norm
weights, zeros for biases), so the outputs mean nothing; shapes, key names, dtypes
and file layout are the released ones, including the ``rotary_emb.inv_freq`` buffers
the original code saves and the abstractor's sin-cos position tables.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mechbiqa.model.config import ModelConfig
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor

__all__ = ["original_shapes", "write_random_checkpoint"]


def original_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a released checkpoint with this config's shapes, in the model's order.

    Built on the meta device (no memory); includes the per-layer ``rotary_emb.inv_freq``
    buffers the original code writes and the loader ignores.
    """
    from mechbiqa.model.load import to_original  # load imports this module's neighbours; keep the cycle out

    with torch.device("meta"):
        model = MPLUGOwl2(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        shapes[to_original(key)] = tuple(tensor.shape)
        if key.endswith("attn.o_proj.weight") and key.startswith("llm.blocks."):
            layer = key.split(".")[2]
            shapes[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = (cfg.llm.d_head // 2,)
    return shapes


def _draw(key: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """One tensor: normal / sqrt(fan_in) for weights, ones for norm scales, zeros for biases."""
    if key.endswith("inv_freq"):
        d = 2 * shape[0]
        return (1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(dtype)
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape, dtype=dtype)
    fan_in = shape[-1] if len(shape) == 2 else math.prod(shape[1:])
    return (torch.randn(shape, generator=generator) / math.sqrt(max(fan_in, 1))).to(dtype)


def write_random_checkpoint(
    path: str | Path,
    cfg: ModelConfig,
    tokenizer_model: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2_000_000_000,
    seed: int = 0,
) -> Path:
    """Write a random checkpoint directory in the released layout.

    Args:
        path: The directory (created; a finished one is left as it is, see Returns).
        cfg: The shapes (``ModelConfig.llama2_7b()`` for the released 7B).
        tokenizer_model: A SentencePiece ``tokenizer.model`` (the LLaMA-2 one for 7B),
            copied into the directory; its vocabulary must fit ``cfg.llm.vocab_size``.
        dtype: The stored dtype (bf16 like the released checkpoints).
        max_shard_bytes: Shard size; shards are ``model-0000k-of-0000n.safetensors`` with
            ``model.safetensors.index.json``.
        seed: Seed of the values.

    Returns:
        The directory. ``model.safetensors.index.json`` is written last, so a directory that
        has it is complete and is reused as it is (delete it to write a new one).
    """
    directory = Path(path)
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        return directory
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise FileNotFoundError(
            f"no SentencePiece model at {tokenizer_model}: pass the tokenizer.model of a LLaMA-2 checkpoint"
        )
    directory.mkdir(parents=True, exist_ok=True)
    shapes = original_shapes(cfg)
    element = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * element
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {key: _draw(key, shapes[key], generator, dtype) for key in keys}
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del shard
    hf = cfg.to_hf_dict()
    hf.update({"torch_dtype": str(dtype).removeprefix("torch."), "image_aspect_ratio": "pad"})
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    ImageProcessor(image_size=cfg.vision.image_size).save_pretrained(directory)
    shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
    total = sum(math.prod(s) * element for s in shapes.values())
    tmp = index_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    tmp.replace(index_file)
    return directory
