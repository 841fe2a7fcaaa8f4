"""studies/train_pair.py killed with SIGKILL (inside the checkpoint swap, and at random moments) resumes exactly.

Each kill is a real ``python studies/train_pair.py`` process. The reference is
the same command run without interruption. After a kill the test checks that
it landed mid-way (0 < committed steps < total), then reruns the command and
checks that the resumed run started at the committed step, that its per-step
losses equal the uninterrupted run's, that the weights are equal, and that
nothing but the link and its one version is left beside the checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mechbiqa import train as T
from mechbiqa.data import BenchmarkConfig, build_benchmark
from mechbiqa.model import load_pretrained
from tests.conftest import REPO

SCRIPT = REPO / "studies" / "train_pair.py"
TOTAL = 6


@pytest.fixture(scope="module")
def qalign(tmp_path_factory) -> tuple[Path, Path]:
    """A Q-Align-style training JSON (KonIQ scale, 0-100) over the tiny benchmark's images."""
    root = tmp_path_factory.mktemp("qalign")
    bench = build_benchmark(BenchmarkConfig.tiny(image_size=28), root / "images")
    entries = []
    for r in bench.records:
        entries.append({
            "id": f"{r.id}->{100 * r.mos01:.4f}",
            "image": str(r.image_path.relative_to(root / "images")),
            "conversations": [{"from": "human", "value": "How would you rate the quality of this image?\n<|image|>"},
                              {"from": "gpt", "value": f"The quality of the image is {r.level_word}."}],
        })
    path = root / "train_koniq_tiny.json"
    path.write_text(json.dumps(entries))
    return path, root / "images"


def argv(out: Path, data: tuple[Path, Path], every: int = 2) -> list[str]:
    path, images = data
    return ["--out-dir", str(out), "--qalign-json", str(path), "--image-root", str(images), "--image-size", "28",
            "--total-steps", str(TOTAL), "--batch-size", "4", "--warmup-steps", "1", "--vocab-size", "400",
            "--eval-every", "0", "--eval-samples", "2", "--test-samples", "2", "--threads", "1",
            "--modes", "one-stage", "--checkpoint-every", str(every), "--checkpoint-seconds", "0"]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **env})


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def committed(out: Path) -> int:
    return T.State.load(out / "one-stage").step


def beside(out: Path) -> list[str]:
    """What lies beside the checkpoint link (its own name included)."""
    return sorted(p.name for p in out.iterdir() if "one-stage" in p.name)


@pytest.fixture(scope="module")
def reference(qalign, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "pair"
    run(argv(out, qalign))
    return out


def check_resumed(out: Path, reference: Path, stopped_at: int) -> None:
    ref, got = T.State.load(reference / "one-stage"), T.State.load(out / "one-stage")
    assert got.finished and got.step == TOTAL
    assert got.segments[-1] == [stopped_at, TOTAL], got.segments  # the rerun started where the kill left it
    assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]
    a, b = load_pretrained(reference / "one-stage").state_dict(), load_pretrained(out / "one-stage").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    link = out / "one-stage"
    assert link.is_symlink() and beside(out) == sorted(["one-stage", os.readlink(link)])
    assert not [p for p in out.iterdir() if ".writing-" in p.name or ".link-" in p.name]
    assert json.loads((out / "results.json").read_text())["one_stage"]["n"] == 2


def test_kill_inside_the_checkpoint_swap_resumes_on_the_same_loss_curve(qalign, reference, tmp_path):
    out = tmp_path / "pair"
    signal_file = tmp_path / "paused"
    # Stop at step 4's checkpoint: its version is complete, the link still names step 2's.
    proc = start(argv(out, qalign), {T.PAUSE_ENV: "swap@4", T.PAUSE_FILE_ENV: str(signal_file)})
    wait_for(signal_file.exists, proc, "the pause inside the swap")
    kill(proc)
    stopped_at = committed(out)
    assert 0 < stopped_at < TOTAL and stopped_at == 2
    assert len([n for n in beside(out) if ".v" in n]) == 2  # the linked version and the unlinked one
    run(argv(out, qalign))
    check_resumed(out, reference, stopped_at)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["writing", "cleanup"])
def test_kill_at_other_phases_of_the_write(qalign, reference, tmp_path, phase):
    out = tmp_path / "pair"
    signal_file = tmp_path / "paused"
    proc = start(argv(out, qalign), {T.PAUSE_ENV: f"{phase}@4", T.PAUSE_FILE_ENV: str(signal_file)})
    wait_for(signal_file.exists, proc, f"the pause at {phase}")
    kill(proc)
    stopped_at = committed(out)
    # "writing": half a private copy, step 2 committed; "cleanup": step 4 linked, step 2 not yet removed.
    assert stopped_at == (2 if phase == "writing" else 4)
    leftovers = [n for n in beside(out) if ".writing-" in n or ".v" in n]
    assert len(leftovers) == 2
    run(argv(out, qalign))
    check_resumed(out, reference, stopped_at)


@pytest.mark.slow
def test_kills_at_random_moments(qalign, reference, tmp_path):
    rng = random.Random(0)
    landed = 0
    for trial in range(6):
        out = tmp_path / f"pair{trial}"
        proc = start(argv(out, qalign, every=1), {})
        # Once training has started (the first checkpoint is linked), kill after a random delay.
        wait_for(lambda out=out: (out / "one-stage").exists(), proc, "the first checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            continue  # finished before the kill: nothing to resume
        kill(proc)
        stopped_at = committed(out)
        if not 0 < stopped_at < TOTAL:
            continue
        landed += 1
        run(argv(out, qalign, every=1))
        check_resumed(out, reference, stopped_at)
    assert landed >= 2, "no kill landed mid-way; the run is too fast for these delays"


@pytest.mark.slow
def test_ctrl_c_without_periodic_checkpoints_keeps_the_steps_taken(qalign, reference, tmp_path):
    """SIGINT mid-training (launched as a shell's background job: SIGINT inherited ignored): one line
    naming the step its checkpoint kept, exit 130; the rerun starts there and ends on the same curve."""
    early, late = 0.0, 8.0  # the delay after the tokenizer appears, searched until an interrupt lands mid-run
    for trial in range(10):
        delay = (early + late) / 2
        out = tmp_path / f"pair{trial}"
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv(out, qalign, every=0)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        wait_for(lambda out=out: (out / "tokenizer").exists(), proc, "the tokenizer")
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        # the whole run ended before the interrupt (0), or it landed as the interpreter exited, when Python
        # has put SIGINT's default action back (-SIGINT, silent, the work all written): try earlier
        if proc.returncode == 0 or (proc.returncode == -signal.SIGINT and not err and (out / "results.json").exists()):
            assert committed(out) == TOTAL, err[-3000:]
            late = delay
            continue
        assert proc.returncode == 130 and len(lines) == 1, err[-3000:]
        if "interrupted at step" not in lines[0]:  # before the first step, or once the last one had begun
            ended = (out / "one-stage").exists() and committed(out) == TOTAL
            early, late = (early, delay) if ended else (delay, late)
            continue
        stopped_at = committed(out)
        assert 0 < stopped_at < TOTAL and f"interrupted at step {stopped_at}; checkpoint written" in lines[0]
        run(argv(out, qalign, every=0))
        check_resumed(out, reference, stopped_at)
        return
    raise AssertionError("no interrupt landed during training")


# ----------------------------------------------------------------------------- side by side (one process per mode)
SIDE_BY_SIDE = """
import sys
from dataclasses import replace
from pathlib import Path
from mechbiqa import cli
from mechbiqa.train import PairConfig, train_pair
if __name__ == "__main__":  # the side-by-side processes are spawned: they import this file again
    cfg = replace(PairConfig.tiny(Path(sys.argv[1])), threads=2, total_steps=60, checkpoint_every=10,
                  checkpoint_seconds=0)
    cli.run(lambda _: train_pair(cfg), PairConfig, None, argv=[])
"""


@pytest.mark.slow
def test_ctrl_c_side_by_side_stops_both_runs_at_a_checkpoint_and_the_rerun_resumes_both(tmp_path):
    """SIGINT to the parent (its jobs lead their own process groups) reaches each run once: each writes its
    checkpoint and stops, one line names both, exit 130; the rerun resumes each and ends on the reference curve."""
    runner = tmp_path / "side_by_side.py"
    runner.write_text(SIDE_BY_SIDE)
    command = [sys.executable, str(runner)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*command, str(tmp_path / "reference")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen([*command, str(out)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    pair = out / "pair"
    wait_for(lambda: (pair / "one-stage").exists() and (pair / "two-stage" / "stage1").exists(), proc,
             "both runs' first checkpoints")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, err[-3000:]
    one = T.State.load(pair / "one-stage")
    assert 0 < one.step < 60 and f"one-stage: interrupted at step {one.step}; checkpoint written" in lines[0]
    assert "two-stage: interrupted" in lines[0]
    again = subprocess.run([*command, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = tmp_path / "reference" / "pair"
    for sub in ("one-stage", "two-stage/stage1", "two-stage/stage2"):
        ref, got = T.State.load(reference / sub), T.State.load(pair / sub)
        assert got.finished and got.step == ref.step
        # the thread count changes when the other run ends, so rounding differs and grows over the steps (1e-4
        # by step 55); a wrong resume (other batches, a fresh optimizer) moves a step's loss by far more than 1e-3
        assert [h["loss"] for h in got.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-3)
    assert T.State.load(pair / "one-stage").segments[0][1] == one.step  # resumed where the interrupt left it
