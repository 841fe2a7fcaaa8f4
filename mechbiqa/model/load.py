"""Checkpoint directories in the original Hugging Face layout: read and write.

A directory holds ``config.json`` and the weights under the original key names
(``model.layers.0.self_attn.k_proj.multiway.1.weight`` ...), as one
``model.safetensors`` / ``pytorch_model.bin`` or as shards listed in an
``*.index.json``. `load_pretrained` builds `MPLUGOwl2` on the meta device, maps
every key to this package's module path with one explicit table, checks names
and shapes, and assigns the tensors already cast to the requested dtype, so a
7B checkpoint never exists as an fp32 copy in memory. `save_pretrained` writes
the same layout back, so checkpoints trained here load like any released one.

Ignored when loading: ``rotary_emb.inv_freq`` (RoPE is computed from the config).
The abstractor's sin-cos tables are loaded when present (to keep any rounding
the checkpoint carries) and recomputed when absent.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mechbiqa.model.abstractor import patch_positions, query_positions
from mechbiqa.model.config import ModelConfig
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.precision import half_matmuls_are_slow, upcast_matmuls
from mechbiqa.model.tokenizer import Tokenizer, load_tokenizer

# Original key prefix or component -> ours. Applied component-wise in order, once each.
_PREFIXES = [
    ("model.vision_model.embeddings.pre_layernorm.", "vision.embed.ln_pre."),
    ("model.vision_model.embeddings.", "vision.embed."),
    ("model.vision_model.encoder.layers.", "vision.blocks."),
    ("model.vision_model.post_layernorm.", "vision.ln_post."),
    ("model.visual_abstractor.encoder.layers.", "abstractor.blocks."),
    ("model.visual_abstractor.", "abstractor."),
    ("model.layers.", "llm.blocks."),
    ("model.embed_tokens.", "llm.embed."),
    ("model.norm.", "llm.ln_final."),
    ("lm_head.", "llm.unembed."),
]
_INFIXES = [  # inside a block, after the layer number
    (".input_layernorm.", ".ln1."),
    (".post_attention_layernorm.", ".ln2."),
    (".self_attn.query_key_value.", ".attn.qkv."),
    (".self_attn.dense.", ".attn.out."),
    (".self_attn.", ".attn."),
    (".crossattention.attention.", "."),
    (".crossattention.output.", "."),
    (".crossattention.", "."),
]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
RECOMPUTABLE_SUFFIXES = ("q_pos_embed", "k_pos_embed")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as mPLUG-Owl2."""


def to_ours(key: str) -> str:
    """Map an original state-dict key to this package's module path."""
    for theirs, ours in _PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
            break
    for theirs, ours in _INFIXES:
        key = key.replace(theirs, ours)
    return key


def to_original(key: str) -> str:
    """Inverse of `to_ours`."""
    if key.startswith("vision.blocks."):
        key = key.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm.")
        key = key.replace(".attn.qkv.", ".self_attn.query_key_value.").replace(".attn.out.", ".self_attn.dense.")
    elif key.startswith("llm.blocks."):
        key = key.replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm.")
        key = key.replace(".attn.", ".self_attn.")
    elif key.startswith("abstractor.blocks."):
        head, rest = key.split(".", 3)[:3], key.split(".", 3)[3]
        first = rest.split(".")[0]
        if first in ("query", "key", "value", "q_pos_embed", "k_pos_embed"):
            rest = "crossattention.attention." + rest
        elif first in ("out_proj", "norm2", "mlp"):
            rest = "crossattention.output." + rest
        else:
            rest = "crossattention." + rest
        key = ".".join(head) + "." + rest
    for theirs, ours in _PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"no original name for {key!r}")


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors first, shards via their index."""
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a shard index (expected a JSON object with 'weight_map'): {e}")
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shards that are not in {directory}: {missing}")
            return files
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    # Loosely named files: keep those whose keys look like mPLUG-Owl2 weights (a directory
    # may also hold inputs, outputs or adapters in safetensors).
    loose = [f for f in sorted(directory.glob("*.safetensors")) if _looks_like_weights(f)]
    loose = loose or sorted(directory.glob("*.bin"))
    if loose:
        return loose
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors, pytorch_model.bin, or shards with "
        f"{' or '.join(INDEX_FILES)}"
    )


def _looks_like_weights(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(("model.", "lm_head.")) for k in f.keys())  # noqa: SIM118
    except Exception:  # an unreadable file is reported when it is read
        return True


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (original key, tensor) from safetensors or pickle-free ``torch.load`` files, one at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        yield key, f.get_tensor(key)
            except Exception as e:  # safetensors raises its own error types for bad headers
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        else:
            try:
                # memory-mapped when the file is in the zip format torch.save writes since 1.6; a legacy
                # (non-zip) file cannot be mapped and is read whole, still without running any pickle code
                mmap = zipfile.is_zipfile(path)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except Exception as e:
                raise CheckpointError(_torch_load_error(path, e)) from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
            yield from state.items()


def _torch_load_error(path: Path, error: Exception) -> str:
    """What a refused ``torch.load(weights_only=True)`` means, in one sentence with the fix.

    torch's own message (several paragraphs) suggests ``weights_only=False``, which would run
    whatever code the file carries; it is condensed to its cause here.
    """
    text = str(error)
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
    if found:
        return (
            f"{path} holds Python objects besides tensors (it would call {found.group(1)} when loaded), so it "
            "is not loaded: its code would run. Use a copy from a trusted source in safetensors format, or "
            "re-save only its tensors (torch.save of a dict of tensors) where you trust it"
        )
    found = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(?:\n|$)", text)
    detail = found.group(1).strip() if found else " ".join(text.split()) or type(error).__name__
    return (
        f"{path} is not a readable PyTorch state dict ({detail}): the file is corrupt or truncated, or not "
        "written by torch.save; download or copy it again"
    )


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> MPLUGOwl2:
    """Load an mPLUG-Owl2 checkpoint directory (original layout) into `MPLUGOwl2`.

    Args:
        path: a directory with ``config.json`` and safetensors or ``.bin`` weights
            (single file or sharded).
        dtype: parameter dtype (float32, bfloat16 or float16); each tensor is cast as it is read. On a CPU
            without 16-bit matrix units the linear layers multiply in float32 (`mechbiqa.model.precision`).
        device: where the parameters live.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: missing config, unreadable weights, or keys that are missing,
            unexpected or of the wrong shape (each named).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: pass the checkpoint directory (config.json + weights)")
    cfg = ModelConfig.from_json(directory)
    with torch.device("meta"):
        model = MPLUGOwl2(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for key, tensor in iter_tensors(find_weight_files(directory)):
        if key.endswith(IGNORED_SUFFIXES):
            continue
        ours = to_ours(key)
        if ours not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            wrong_shape.append(f"{key}: checkpoint {list(tensor.shape)} vs config {list(expected[ours].shape)}")
            continue
        loaded[ours] = tensor.to(device=device, dtype=dtype)
    missing = [to_original(k) for k in expected if k not in loaded and not k.endswith(RECOMPUTABLE_SUFFIXES)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): {_preview(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{directory} does not match its config.json as an mPLUG-Owl2 checkpoint: " + "; ".join(problems)
            + ". Keys must use the original names (see mechbiqa.model.load.to_original)."
        )
    for i, block in enumerate(model.abstractor.blocks):
        for name, table in (("q_pos_embed", query_positions(cfg.abstractor.n_queries, cfg.abstractor.d_model)),
                            ("k_pos_embed", patch_positions(cfg.abstractor.grid_size, cfg.abstractor.d_model))):
            key = f"abstractor.blocks.{i}.{name}"
            if key not in loaded:
                loaded[key] = table.to(device=device, dtype=dtype)
    model.load_state_dict(loaded, strict=True, assign=True)
    if dtype in (torch.bfloat16, torch.float16) and half_matmuls_are_slow(device):
        upcast_matmuls(model)  # 16-bit weights, float32 products: emulated 16-bit products are 7x slower here
    return model.eval()


def save_pretrained(model: MPLUGOwl2, path: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and the weights under the original key names.

    Args:
        model: the model to save.
        path: the directory (created if needed).
        max_shard_bytes: split into ``model-0000k-of-0000n.safetensors`` shards with an index
            when the weights exceed this size.

    Returns:
        The directory.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.to_json(directory / "config.json")
    state = {to_original(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if max_shard_bytes is None or sum(t.numel() * t.element_size() for t in state.values()) <= max_shard_bytes:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return directory


@dataclass(frozen=True)
class Components:
    """A checkpoint directory's model with the tokenizer and image processor saved beside it."""

    model: MPLUGOwl2
    tokenizer: Tokenizer
    processor: ImageProcessor
    path: Path


def load_components(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Components:
    """`load_pretrained` plus ``load_tokenizer`` and ``ImageProcessor.from_pretrained`` on the same directory.

    Real checkpoints pad images to a square when their config says
    ``image_aspect_ratio: "pad"`` (One-Align, Q-Instruct training); compact
    checkpoints written here always do. The processor's size follows the vision tower.
    """
    directory = Path(path)
    model = load_pretrained(directory, dtype=dtype, device=device)
    tokenizer = load_tokenizer(directory)
    hf = json.loads((directory / "config.json").read_text())
    processor = ImageProcessor.from_pretrained(directory, pad_to_square=hf.get("image_aspect_ratio", "pad") == "pad")
    if processor.image_size != model.cfg.vision.image_size:
        raise CheckpointError(
            f"{directory}: preprocessor_config.json resizes to {processor.image_size} px but the vision tower "
            f"takes {model.cfg.vision.image_size} px; fix preprocessor_config.json"
        )
    return Components(model=model, tokenizer=tokenizer, processor=processor, path=directory)


def _preview(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
