"""Data parallel training: two real processes (torchrun, gloo) take the same steps as one with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mechbiqa import train as T
from mechbiqa.model import load_pretrained
from mechbiqa.pipeline import read_info
from tests.unit import train_worker

WORKER = Path(train_worker.__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> None:
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(WORKER), *args],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_processes_take_the_steps_of_one(tmp_path):
    bench = tmp_path / "bench"
    one = train_worker.run(bench, tmp_path / "one")
    launch(str(bench), str(tmp_path / "two"))
    info = read_info(tmp_path / "two").data
    assert info["processes"] == 2 and read_info(tmp_path / "one").data["processes"] == 1
    two = T.State.load(tmp_path / "two")
    assert two.finished and two.step == 3 == len(one.losses)
    # The same global batches: the same answer tokens per step, the same losses, the same weights.
    assert [h["tokens"] for h in two.history] == [h["tokens"] for h in one.history]
    np.testing.assert_allclose([h["loss"] for h in two.history], one.losses, rtol=1e-5)
    a, b = load_pretrained(tmp_path / "one").state_dict(), load_pretrained(tmp_path / "two").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
    # Training moved the weights (so equality is not that of two untouched models).
    start = train_worker.setup(bench)[2].state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3


@pytest.mark.slow
def test_two_processes_train_the_same_lora_adapters(tmp_path):
    pytest.importorskip("peft")
    bench = tmp_path / "bench"
    train_worker.run(bench, tmp_path / "base")
    one = train_worker.run(bench, tmp_path / "one", lora_from=str(tmp_path / "base"))
    launch(str(bench), str(tmp_path / "two"), "--lora-from", str(tmp_path / "base"))
    two = T.State.load(tmp_path / "two")
    assert two.adapter and all("lora_" in k for k in two.adapter)
    np.testing.assert_allclose([h["loss"] for h in two.history], one.losses, rtol=1e-5)
    a, b = load_pretrained(tmp_path / "one").state_dict(), load_pretrained(tmp_path / "two").state_dict()
    base = load_pretrained(tmp_path / "base").state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the merged adapters changed the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
