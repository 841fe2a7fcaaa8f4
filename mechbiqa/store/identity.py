"""What a store was recorded from: the model's and tokenizer's fingerprints, and the run's provenance.

Where it sits: the recording drivers (`mechbiqa.store.record`) write these into
the store's attributes (`store_attrs`); a resumed run, the shards of a torchrun
run (`mechbiqa.store.shards`) and any reader that brings a model
(`mechbiqa.store.reader.ActivationStore.check_identity`, the logit lens's
`readout_fingerprint` check) compare them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.store.spec import CacheSpec

__all__ = ["environment", "model_identity", "readout_fingerprint", "store_attrs", "tokenizer_identity"]


def model_identity(model: MPLUGOwl2) -> dict[str, Any]:
    """A fingerprint of the weights: name, shape, dtype and a strided sample of every tensor.

    Cheap even at 7B (a few thousand values per tensor), and it tells two
    checkpoints of the same architecture apart. Resuming a store needs it equal.
    """
    sha = hashlib.sha256()
    n_params = 0
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            n_params += flat.numel()
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float32).numpy()
            sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            sha.update(sample.tobytes())
    return {
        "fingerprint": sha.hexdigest()[:32],
        "dtype": str(model.dtype).removeprefix("torch."),
        "n_params": n_params,
        "readout": readout_fingerprint(model.llm.ln_final.weight, model.llm.unembed.weight, model.dtype),
    }


def readout_fingerprint(norm: Tensor, unembed: Tensor, dtype: torch.dtype) -> str:
    """A fingerprint of a model's read-out (final norm and ``lm_head`` weights) in ``dtype``.

    What an offline lens holds of a model (`mechbiqa.analysis.lens.LogitLens.from_checkpoint`
    reads only these two tensors): it lets a lens be checked against the store's model without
    the rest of the weights. The values are cast to the dtype the store was recorded in first,
    so a lens read in float32 from the checkpoint of a bfloat16 run fingerprints the same.
    """
    sha = hashlib.sha256()
    with torch.no_grad():
        for tensor in (norm, unembed):
            flat = tensor.detach().reshape(-1).to(dtype)
            step = max(1, flat.numel() // 4096)
            sha.update(f"{tuple(tensor.shape)}".encode())
            sha.update(flat[::step][:4096].to("cpu", torch.float32).numpy().tobytes())
    return sha.hexdigest()[:32]


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """Kind, vocabulary size and a hash of every piece."""
    sha = hashlib.sha256()
    for i in range(tokenizer.vocab_size):
        sha.update(tokenizer.id_to_piece(i).encode("utf-8", errors="replace") + b"\x00")
    return {
        "kind": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "fingerprint": sha.hexdigest()[:32],
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }


def environment(model: MPLUGOwl2) -> dict[str, Any]:
    """What decides float rounding besides the inputs: torch, threads, device (provenance, not identity)."""
    device = model.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": name}


def store_attrs(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    model_name: str,
    spec: CacheSpec,
    run: dict[str, Any],
    prompt: dict[str, Any],
) -> dict[str, str]:
    """The store's provenance attributes (compared on resume; ``model`` and ``environment`` are not)."""
    return {
        "model": model_name,
        "model_config": json.dumps(model.cfg.to_dict(), sort_keys=True),
        "model_identity": json.dumps(model_identity(model), sort_keys=True),
        "tokenizer": json.dumps(tokenizer_identity(tokenizer), sort_keys=True),
        "prompt": json.dumps(prompt, sort_keys=True),
        "run": json.dumps(run, sort_keys=True),
        "cache_spec": json.dumps(spec.to_dict(), sort_keys=True),
        "environment": json.dumps(environment(model), sort_keys=True),
    }
