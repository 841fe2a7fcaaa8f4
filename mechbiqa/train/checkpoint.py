"""The resumable part of a run (:class:`State`) and the checkpoint write."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.load import save_pretrained
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.pipeline import (
    INFO_FILE,
    CheckpointModeError,
)
from mechbiqa.train.config import TrainConfig
from mechbiqa.train.lora import plain_model

STATE_FILE = "training_state.pt"
"""The resumable part of a checkpoint directory."""


@dataclass
class State:
    """The resumable part of a checkpoint (tuned-lens style: a dataclass that saves and loads itself).

    Attributes:
        step: Optimizer steps taken.
        config: The run's configuration (as a dict).
        optimizer: ``optimizer.state_dict()``.
        scaler: ``GradScaler.state_dict()`` (fp16), or None.
        rng: torch, CUDA, numpy and Python RNG states.
        history: One dict per step: step, loss, lr, grad_norm, tokens, seconds.
        evals: One dict per evaluation.
        adapter: LoRA weights by module path (None: full weights live in ``model.safetensors``).
        elapsed: Training seconds so far (evaluation included).
    """

    step: int
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Tensor] | None = None
    elapsed: float = 0.0

    def save(self, directory: str | Path) -> Path:
        """Write ``training_state.pt`` into a directory."""
        path = Path(directory) / STATE_FILE
        torch.save(dataclasses.asdict(self), path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> State:
        """Read ``training_state.pt`` from a checkpoint directory.

        Raises:
            FileNotFoundError: If there is none (the directory is a finished export, not resumable).
        """
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {directory} holds no resumable training state")
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**data)


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": random.getstate()[0], "internal": list(random.getstate()[1]),
                   "gauss": random.getstate()[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(directory: Path, model: MPLUGOwl2, tokenizer: Tokenizer, processor: ImageProcessor,
                      info: dict[str, Any], state: State | None, max_shard_bytes: int | None) -> None:
    """Write a complete checkpoint next to ``directory`` and swap it in, so a kill never leaves half of one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.writing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(plain_model(model), tmp, max_shard_bytes=max_shard_bytes)
    tokenizer.save(tmp)
    processor.save_pretrained(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    if state is not None:
        state.save(tmp)
    old = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def check_resume(saved: dict[str, Any], cfg: TrainConfig, directory: Path) -> None:
    old = TrainConfig.from_dict(saved)
    if (old.mode, old.stage) != (cfg.mode, cfg.stage):
        found = old.mode if old.stage is None else f"{old.mode} stage {old.stage}"
        wanted = cfg.mode if cfg.stage is None else f"{cfg.mode} stage {cfg.stage}"
        raise CheckpointModeError(
            f"{directory} holds a {found} run, but this run is {wanted}; use another out_dir or the same mode"
        )
    free = {"eval_every", "eval_samples", "checkpoint_every", "max_new_tokens", "device", "cache_images"}
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in free
              and getattr(old, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(
            f"{directory} holds a run with a different config ({', '.join(differ)} differ); resume with the same "
            "TrainConfig, or train into a new out_dir"
        )
