"""Checkpoints that a kill at any instant cannot corrupt: :class:`State` and the versioned swap.

A checkpoint directory ``out/one-stage`` is a **symbolic link** to the newest
complete version beside it, ``out/.one-stage.v<time_ns>-<pid>``. Every write
(:func:`write_checkpoint`, :func:`publish`) fills a private directory
``out/.one-stage.writing-<pid>``, fsyncs every file, renames it to a new
version (atomic), fsyncs the parent, and then replaces the link with one
``os.replace`` of a fresh link (atomic): there is no instant at which
``out/one-stage`` is missing or half-written. Old versions are removed after
the swap. Readers (``load_pretrained``, ``read_info``, the raters) follow the
link like any directory.

A kill leaves at most a ``.writing-<pid>`` copy, a complete but unlinked
version, or old versions; :func:`recover` (called at the start of every run)
removes them, relinks the newest version if the link itself is missing, and
says what it removed. A directory written by an older mechbiqa (a real
directory, not a link) is read as it is and turned into a version at the next
write.

``MECHBIQA_CHECKPOINT_PAUSE=<phase>[@<step>]`` makes a write stop at one
phase (``writing``: half of the files are in the private copy; ``swap``: the
new version is complete, the link still names the old one; ``cleanup``: the
link names the new version, the old one is still there), touching the file
named by ``MECHBIQA_CHECKPOINT_PAUSE_FILE`` and sleeping, so a test can kill
the process at exactly that instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.load import save_pretrained
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.tokenizer import Tokenizer, load_tokenizer
from mechbiqa.pipeline import INFO_FILE, CheckpointModeError
from mechbiqa.train.config import TrainConfig

__all__ = [
    "STATE_FILE",
    "PAUSE_ENV",
    "PAUSE_FILE_ENV",
    "State",
    "publish",
    "recover",
    "write_checkpoint",
    "save_tokenizer",
    "read_or_write_tokenizer",
    "check_resume",
    "capture_rng",
    "restore_rng",
]

STATE_FILE = "training_state.pt"
"""The resumable part of a checkpoint directory."""

PAUSE_ENV = "MECHBIQA_CHECKPOINT_PAUSE"
"""``<phase>[@<step>]``: stop inside a checkpoint write (tests kill the process there)."""

PAUSE_FILE_ENV = "MECHBIQA_CHECKPOINT_PAUSE_FILE"
"""A file touched (with the step written in it) when the write stops at :data:`PAUSE_ENV`."""


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
        finished: Whether the run reached its last step.
        segments: ``[first_step, last_step]`` of every process that trained this run: a run
            resumed after a kill at step 3 of 6 has ``[[0, 3], [3, 6]]``.
    """

    step: int
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float | int]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    adapter: dict[str, Tensor] | None = None
    elapsed: float = 0.0
    finished: bool = False
    segments: list[list[int]] = field(default_factory=list)

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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------- the swap
_VERSION = re.compile(r"\.(?P<name>.+)\.v(?P<stamp>\d{19})-(?P<pid>\d+)$")
_PRIVATE = re.compile(r"\.(?P<name>.+)\.(?P<kind>writing|link|old)-(?P<pid>\d+)$")


def _versions(directory: Path) -> list[Path]:
    """Complete versions of ``directory`` beside it, oldest first."""
    if not directory.parent.is_dir():
        return []
    found = [(m["stamp"], p) for p in directory.parent.iterdir()
             if (m := _VERSION.match(p.name)) and m["name"] == directory.name]
    return [p for _, p in sorted(found)]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every directory to disk (fsync), deepest first."""
    for base, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(base))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def _pause(phase: str, step: int | None) -> None:
    """Stop here when :data:`PAUSE_ENV` names this phase (and step): the test hook for kills."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name != phase or (at and step != int(at)):
        return
    signal = os.environ.get(PAUSE_FILE_ENV)
    if signal:
        Path(signal).write_text(f"{phase} {step}\n")
    time.sleep(3600)


def publish(directory: str | Path, fill: Callable[[Path], None], *, step: int | None = None) -> Path:
    """Make ``directory`` a link to a new, complete version that ``fill`` writes; no instant without one.

    Args:
        directory: The path readers use (becomes a symbolic link).
        fill: Writes the content into the empty private directory it is given.
        step: Training step, only for the :data:`PAUSE_ENV` hook.

    Returns:
        The new version's path.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = parent / f".{directory.name}.writing-{pid}"
    _remove(tmp)
    tmp.mkdir()
    fill(tmp)
    _fsync_tree(tmp)
    version = parent / f".{directory.name}.v{time.time_ns():019d}-{pid}"
    os.rename(tmp, version)
    _pause("swap", step)
    if directory.exists() and not directory.is_symlink():
        # A directory written by an older mechbiqa: make it the oldest version so the link can take its name.
        os.rename(directory, parent / f".{directory.name}.v{0:019d}-{pid}")
    link = parent / f".{directory.name}.link-{pid}"
    _remove(link)
    os.symlink(version.name, link)
    os.replace(link, directory)
    _fsync_dir(parent)
    _pause("cleanup", step)
    for old in _versions(directory):
        if old != version:
            _remove(old)
    return version


def recover(directory: str | Path) -> list[Path]:
    """Remove what a killed write left beside ``directory``; relink the newest version if the link is gone.

    Private copies of live processes are left alone.

    Returns:
        The paths removed (empty when the directory was clean).
    """
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    removed = []
    for p in directory.parent.iterdir():
        m = _PRIVATE.match(p.name)
        if m and m["name"] == directory.name and (m["kind"] == "old" or not _alive(int(m["pid"]))):
            _remove(p)
            removed.append(p)
    versions = _versions(directory)
    if directory.is_symlink() and not directory.exists():
        directory.unlink()  # dangling: its version was removed by hand
        removed.append(directory)
    # Compared as resolved paths: a relative ``directory`` must not make its own live version look stale.
    current = directory.resolve() if directory.is_symlink() else None
    if not directory.exists() and versions:
        current = versions[-1].resolve()
        link = directory.parent / f".{directory.name}.link-{os.getpid()}"
        _remove(link)
        os.symlink(current.name, link)
        os.replace(link, directory)
        _fsync_dir(directory.parent)
    for v in versions:
        if v.resolve() != current:
            _remove(v)
            removed.append(v)
    return removed


def write_checkpoint(directory: Path, model: MPLUGOwl2 | None, tokenizer: Tokenizer, processor: ImageProcessor,
                     info: dict[str, Any], state: State | None, max_shard_bytes: int | None = None) -> Path:
    """Publish a checkpoint: model (None: adapters only, in the state), tokenizer, processor, info, state."""

    def fill(tmp: Path) -> None:
        if model is not None:
            save_pretrained(model, tmp, max_shard_bytes=max_shard_bytes)
        tokenizer.save(tmp)
        _pause("writing", info.get("step"))
        processor.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        if state is not None:
            state.save(tmp)

    return publish(directory, fill, step=info.get("step"))


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write a tokenizer directory atomically (the same versioned swap as checkpoints)."""
    return publish(directory, tokenizer.save)


def read_or_write_tokenizer(directory: str | Path, make: Callable[[], Tokenizer], *, rewrite: bool = False,
                            in_use: bool = False) -> Tokenizer:
    """The tokenizer in ``directory``, made (and written atomically) when absent, unreadable or ``rewrite``.

    Args:
        directory: The tokenizer directory.
        make: Builds the tokenizer (e.g. trains the compact BPE on the training text).
        rewrite: Make and write it even if one is there.
        in_use: Checkpoints trained with the directory's tokenizer exist; an unreadable one is then
            refused instead of silently replaced by a new one.

    Raises:
        ValueError: The directory cannot be read and checkpoints depend on it (the message names it).
    """
    directory = Path(directory)
    recover(directory)
    if directory.exists() and not rewrite:
        try:
            return load_tokenizer(directory)
        except Exception as err:  # noqa: BLE001 - any failure to read means a half-written directory
            if in_use:
                raise ValueError(
                    f"the tokenizer directory {directory} cannot be read ({type(err).__name__}: {err}); it was "
                    "half-written, and checkpoints trained with it are beside it. Delete it and retrain "
                    "(--retrain), or restore it from a checkpoint directory's tokenizer files"
                ) from err
    tokenizer = make()
    save_tokenizer(tokenizer, directory)
    return tokenizer


def check_resume(saved: dict[str, Any], cfg: TrainConfig, directory: Path) -> None:
    """Refuse to resume a run of another mode, stage or training config (names the differing fields)."""
    old = TrainConfig.from_dict(saved)
    if (old.mode, old.stage) != (cfg.mode, cfg.stage):
        found = old.mode if old.stage is None else f"{old.mode} stage {old.stage}"
        wanted = cfg.mode if cfg.stage is None else f"{cfg.mode} stage {cfg.stage}"
        raise CheckpointModeError(
            f"{directory} holds a {found} run, but this run is {wanted}; use another out_dir or the same mode"
        )
    free = {"eval_every", "eval_samples", "checkpoint_every", "checkpoint_seconds", "max_new_tokens", "device",
            "cache_images"}
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in free
              and getattr(old, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(
            f"{directory} holds a run with a different config ({', '.join(differ)} differ); resume with the same "
            "TrainConfig, train into a new out_dir, or start again (train(..., fresh=True), --retrain)"
        )


# --------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """torch, numpy, Python (and CUDA) RNG states, as tensors and plain values ``torch.load`` accepts."""
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
    """Inverse of :func:`capture_rng`."""
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
