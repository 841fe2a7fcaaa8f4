"""Fault trials of the studies as a user runs them: real processes, relative paths, one-line refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def study(name: str, *args: str, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``studies/<name>.py`` in its own process from ``cwd``."""
    return subprocess.run([sys.executable, str(REPO / "studies" / f"{name}.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kwargs)  # fmt: skip


def assert_one_line(done: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """The run was refused with exit ``code`` and one line on stderr naming ``needles``; return the line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 28, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# ----------------------------------------------------------------------------- a store read with another model
def test_tuned_lens_refuses_a_model_other_than_the_stores(tmp_path):
    from mechbiqa.model.load import save_pretrained
    from mechbiqa.sources import tiny_random_model
    from studies import cache_activations

    images(tmp_path / "images", 4)
    cache_activations.main(cache_activations.Config.tiny(tmp_path))  # tiny-random(seed=0) into tiny.h5
    model, tokenizer, processor = tiny_random_model(1)  # the same widths, other weights
    other = tmp_path / "other model"
    save_pretrained(model, other)
    tokenizer.save(other)
    processor.save_pretrained(other)
    done = study("tuned_lens", "--store", "tiny.h5", "--model", "other model", "--steps", "2", cwd=tmp_path)
    assert_one_line(done, "tiny.h5 was recorded from model tiny-random(seed=0)", "another model", "--model")
    assert not (tmp_path / "tiny.tuned_lens").exists()
    done = study("tuned_lens", "--store", "tiny.h5", "--steps", "2", cwd=tmp_path)  # the store's own model
    assert done.returncode == 0, done.stderr[-3000:]
    lens = study("logit_lens", "--store", "tiny.h5", "--model", "other model", "--tuned-lens", "tiny.tuned_lens",
                 cwd=tmp_path)  # fmt: skip
    assert_one_line(lens, "another model")
