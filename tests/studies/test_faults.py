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


# ----------------------------------------------------------------------------- numeric options
def _study_configs():
    import importlib

    from tests.studies.test_cli import STUDIES

    return [(name, importlib.import_module(f"studies.{name}").Config) for name in STUDIES]


def test_every_numeric_option_refuses_values_outside_its_range_and_nan():
    import dataclasses

    from mechbiqa import cli

    checked = 0
    for name, config in _study_configs():
        for o in cli.options(config):
            if o.kind not in (int, float) or o.choices is not None or o.positional:
                continue
            count = o.nargs if isinstance(o.nargs, int) else 1
            bounds = cli.RANGES.get(o.flag)
            bad = ["nan", "inf"] if o.kind is float else []
            if bounds is not None and bounds.low is not None:
                bad.append(str(bounds.low - 1 if o.kind is int else bounds.low - 0.5))
            if bounds is not None and bounds.high is not None:
                bad.append(str(bounds.high + 1 if o.kind is int else bounds.high + 0.5))
            for value in bad:
                try:
                    cli.parse(config, [o.flag, *[value] * count])
                except ValueError as error:
                    assert o.flag in str(error) and "\n" not in str(error), (name, o.flag, error)
                    checked += 1
                else:
                    raise AssertionError(f"{name} {o.flag} {value} was accepted")
            assert o.default is dataclasses.MISSING or o.default is None or bounds is None or all(
                bounds.admits(v) for v in (o.default if isinstance(o.default, tuple | list) else (o.default,))
            ), (name, o.flag)
    assert checked > 150


def test_the_issues_nonsense_arguments_end_in_one_line_before_any_model_loads(tmp_path):
    cases = [
        ("train_pair", ["--lr", "nan"], "--lr nan: pass a finite number"),
        ("train_pair", ["--image-size", "1000000000000"], "--image-size 1000000000000: pass at least 1"),
        ("train_pair", ["--threads", "0"], "--threads 0"),
        ("train_pair", ["--checkpoint-seconds", "-1"], "--checkpoint-seconds -1.0"),
        ("score_images", ["--seed", "-1", "--tiny-random", "x.png"], "--seed -1: pass at least 0"),
        ("cache_activations", ["--tiny-random", "--mode", "generate", "--max-new-tokens", "1000000000000"],
         "--max-new-tokens 1000000000000"),
        ("instability", ["--temperature", "-1"], "--temperature -1.0: pass a value above 0"),
        ("instability", ["--top-p", "2"], "--top-p 2.0"),
    ]
    for name, args, needle in cases:
        started = time.perf_counter()
        done = study(name, *args, cwd=tmp_path)
        assert_one_line(done, needle)
        assert time.perf_counter() - started < 60
    assert not list(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- interrupts
TOTAL_IMAGES = 400  # enough that the interrupt lands mid-run on an idle machine too


def committed_rows(partial: Path) -> int:
    """Rows committed so far in a store being written (the writer only ``pwrite``s status bytes between open and finish)."""
    import h5py

    try:
        with h5py.File(partial, "r") as f:
            return int((f["samples/status"][:] != 0).sum())
    except (OSError, KeyError):  # not created yet, or still being laid out
        return 0


def test_an_interrupt_ends_in_one_line_and_the_rerun_resumes_even_when_sigint_was_inherited_ignored(tmp_path):
    """A shell starts ``cmd &`` with SIGINT ignored; ``kill -INT`` must still stop the run cleanly."""
    images(tmp_path / "images", TOTAL_IMAGES)
    command = [sys.executable, str(REPO / "studies" / "cache_activations.py"), "--tiny-random", "--dataset", "images",
               "--out", "s.h5", "--batch-size", "1", "--no-progress"]  # fmt: skip

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ignore_sigint)  # fmt: skip
    from mechbiqa.store import ActivationStore, partial_path

    partial = partial_path(tmp_path / "s.h5")
    deadline = time.monotonic() + 240
    while committed_rows(partial) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # interrupt once a row is in: a fixed delay lands before the first commit on a slow machine
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == [
        "cache_activations.py: error: interrupted; rerun the same command to resume (or start again)"
    ]
    with ActivationStore.open(tmp_path / "s.h5") as store:
        committed = int((store.status != 0).sum())
    assert 0 < committed < TOTAL_IMAGES  # landed mid-way
    again = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at sample {committed}" in again.stdout and f"{TOTAL_IMAGES} valid" in again.stdout


# ----------------------------------------------------------------------------- paths
def test_a_file_where_a_folder_is_needed_is_said_in_words(tmp_path):
    (tmp_path / "taken").write_text("")
    images(tmp_path / "images", 1)
    score = study("score_images", "--tiny-random", "images/img0.png", "--out", "taken", cwd=tmp_path)
    assert_one_line(score, "'taken' exists and is not a folder; move it away or pass another path")
    cache = study("cache_activations", "--tiny-random", "--dataset", "images", "--out", "taken/s.h5",
                  "--no-progress", cwd=tmp_path)  # fmt: skip
    assert_one_line(cache, "'taken' exists and is not a folder")


def test_operating_system_errors_name_the_path_and_the_fix():
    import errno

    from mechbiqa.errors import one_line

    said = one_line(PermissionError(errno.EACCES, "Permission denied", "/data/out"))
    assert said == "permission denied on '/data/out'; pass a path you may write (or read), or fix its permissions"
    assert one_line(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the device of")
    assert one_line(NotADirectoryError(errno.ENOTDIR, "Not a directory", "a/b")).startswith("a part of 'a/b' is a file")
    # a library message that already says what to do is kept as it is
    assert one_line(FileNotFoundError("no config.json at x; pass a checkpoint")) == "no config.json at x; pass a checkpoint"
