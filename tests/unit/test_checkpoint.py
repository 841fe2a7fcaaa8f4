"""The checkpoint swap: a link to complete versions, leftovers of killed writes removed, tokenizers written whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mechbiqa.data import BenchmarkConfig, build_benchmark
from mechbiqa.model.tokenizer import load_tokenizer
from mechbiqa.train import compact_tokenizer, publish, read_or_write_tokenizer, recover


def write(text: str):
    def fill(tmp: Path) -> None:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text * 2)

    return fill


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def listing(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_publish_swaps_a_link_and_removes_the_old_version(tmp_path):
    target = tmp_path / "ckpt"
    first = publish(target, write("one"))
    assert target.is_symlink() and os.readlink(target) == first.name and (target / "a.txt").read_text() == "one"
    second = publish(target, write("two"))
    assert os.readlink(target) == second.name and (target / "sub" / "b.txt").read_text() == "twotwo"
    assert listing(tmp_path) == sorted(["ckpt", second.name])  # the first version is gone
    assert recover(target) == []


def test_recover_removes_what_killed_writes_left(tmp_path):
    target = tmp_path / "ckpt"
    current = publish(target, write("one"))
    dead = dead_pid()
    partial = tmp_path / f".ckpt.writing-{dead}"  # killed mid-write
    partial.mkdir()
    (partial / "a.txt").write_text("half")
    unlinked = tmp_path / f".ckpt.v{0:019d}-{dead}"  # complete, killed before the link swap
    unlinked.mkdir()
    stray_link = tmp_path / f".ckpt.link-{dead}"
    os.symlink(current.name, stray_link)
    legacy = tmp_path / f".ckpt.old-{dead}"  # the older write's copy
    legacy.mkdir()
    live = tmp_path / f".ckpt.writing-{os.getpid()}"  # a live writer's copy is left alone
    live.mkdir()
    other = tmp_path / f".other.writing-{dead}"  # another checkpoint's leftovers are not ours
    other.mkdir()
    removed = recover(target)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (partial, unlinked, stray_link, legacy))
    assert listing(tmp_path) == sorted(["ckpt", current.name, live.name, other.name])
    assert (target / "a.txt").read_text() == "one"


@pytest.mark.parametrize("how", ["relative", "through a linked folder"])
def test_recover_keeps_the_live_version_whatever_path_names_it(tmp_path, monkeypatch, how):
    """A checkpoint named by a relative path (``--out cache/compact``) or through a linked parent is still
    the live one: recover removes nothing, and the next run reuses it instead of retraining."""
    (tmp_path / "real").mkdir()
    live = publish(tmp_path / "real" / "ckpt", write("one"))
    if how == "relative":
        monkeypatch.chdir(tmp_path)
        target = Path("real") / "ckpt"
    else:
        os.symlink(tmp_path / "real", tmp_path / "alias")
        target = tmp_path / "alias" / "ckpt"
    assert recover(target) == []
    assert listing(tmp_path / "real") == sorted(["ckpt", live.name]) and (target / "a.txt").read_text() == "one"
    second = publish(target, write("two"))  # a later write through the same path still swaps cleanly
    assert listing(tmp_path / "real") == sorted(["ckpt", second.name]) and recover(target) == []


def test_recover_relinks_the_newest_version_when_the_link_is_gone(tmp_path):
    target = tmp_path / "ckpt"
    old = publish(target, write("one"))
    newer = tmp_path / f".ckpt.v{int(old.name.split('.v')[1].split('-')[0]) + 1:019d}-{dead_pid()}"
    newer.mkdir()
    (newer / "a.txt").write_text("two")
    target.unlink()  # a kill between the old link's removal and the new one cannot happen; simulate it anyway
    removed = recover(target)
    assert [p.name for p in removed] == [old.name]
    assert os.readlink(target) == newer.name and (target / "a.txt").read_text() == "two"


def test_a_directory_of_an_older_version_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("legacy")
    version = publish(target, write("new"))
    assert target.is_symlink() and listing(tmp_path) == sorted(["ckpt", version.name])
    assert (target / "a.txt").read_text() == "new"


def test_half_written_tokenizer_is_rewritten_or_named(tmp_path):
    bench = build_benchmark(BenchmarkConfig.tiny(image_size=28), tmp_path / "bench")
    made = []

    def make():
        made.append(1)
        return compact_tokenizer(bench.split("train"), vocab_size=400)

    directory = tmp_path / "tokenizer"
    tok = read_or_write_tokenizer(directory, make)
    assert len(made) == 1 and directory.is_symlink()
    assert read_or_write_tokenizer(directory, make).encode("good") == tok.encode("good") and len(made) == 1
    # An older version killed mid-write left a real directory with a truncated file.
    directory.unlink()
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    (directory / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=f"tokenizer directory {directory} cannot be read"):
        read_or_write_tokenizer(directory, make, in_use=True)
    again = read_or_write_tokenizer(directory, make)
    assert len(made) == 2 and load_tokenizer(directory).encode("poor") == again.encode("poor") == tok.encode("poor")
