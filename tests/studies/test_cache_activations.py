"""studies/cache_activations.py end to end: bad images, resume, real kill -9 trials, torchrun (2 ranks)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa.store import ActivationStore, StoreLockedError, StoreMismatchError, StoreWriter, partial_path
from studies import cache_activations as study
from tests.conftest import REPO

SCRIPT = REPO / "studies" / "cache_activations.py"

ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # same threads as this process: bitwise equality needs it


def make_images(folder: Path, n: int, *, bad: bool = True) -> Path:
    """``n`` random RGB images plus a grayscale, a CMYK, a corrupt and a truncated one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24 + i % 7, 28, 3), dtype=np.uint8)).save(
            folder / f"img{i:03d}.png"
        )
    if bad:
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(folder / "gray.png")
        Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), mode="CMYK").save(
            folder / "cmyk.jpg"
        )
        (folder / "corrupt.png").write_bytes(
            b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8))
        )
        whole = (folder / "img000.png").read_bytes()
        (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--tiny-random",
        "--dataset",
        "--spec",
        "--out",
        "--batch-size",
        "--dtype",
        "--device",
        "--mode",
        "--overwrite",
    ):
        assert option in text


def test_runs_end_to_end_records_bad_images_and_resumes(tmp_path):
    make_images(tmp_path / "images", 6)
    cfg = study.Config.tiny(tmp_path)
    result = study.main(cfg)
    assert result.store.exists() and (tmp_path / "tiny.h5.config.json").exists()
    errors = dict(result.errors)
    assert set(errors) == {"corrupt.png", "truncated.png"}
    assert "corrupt" in errors["truncated.png"] or "truncated" in errors["truncated.png"]
    with ActivationStore.open(result.store) as store:
        assert (
            store.n_samples == 10 and len(store.valid) == 8
        )  # grayscale and CMYK are converted and recorded
        assert {"gray.png", "cmyk.jpg"} <= set(store.ids())
        resid = store.get("llm.blocks.{l}.hook_resid_post", "image")
        assert resid.shape[:2] == (8, 2) and np.isfinite(resid).all() and resid.std() > 0
    again = study.main(cfg)
    assert again.record.n_recorded == 0 and again.n_valid == 8


def test_missing_image_in_a_record_list_is_an_error_row(tmp_path):
    from mechbiqa.data.records import IQARecord, records_to_jsonl

    images = make_images(tmp_path / "images", 3, bad=False)
    records = [
        IQARecord(id=p.stem, image_path=p, score=3.0, scale=(1.0, 5.0)) for p in sorted(images.iterdir())
    ]
    records.append(IQARecord(id="gone", image_path=images / "gone.png", score=2.0, scale=(1.0, 5.0)))
    records_to_jsonl(records, tmp_path / "set.jsonl", relative_to=tmp_path)
    result = study.main(study.Config.tiny(tmp_path, dataset=str(tmp_path / "set.jsonl")))
    assert [e[0] for e in result.errors] == ["gone"] and "no such file" in result.errors[0][1]
    with ActivationStore.open(result.store) as store:
        assert np.allclose(store.labels(), 0.5) and store.records(samples=[0])[0]["score"] == 3.0


def test_second_writer_is_refused_with_a_clear_error(tmp_path):
    make_images(tmp_path / "images", 2, bad=False)
    cfg = study.Config.tiny(tmp_path)
    lock_holder = __import__("filelock").FileLock(cfg.out + ".lock", timeout=0)
    with lock_holder:
        with pytest.raises(StoreLockedError, match="being written by another process"):
            study.main(cfg)
    assert StoreWriter is not None


# ----------------------------------------------------------------------------- kill -9
def _command(images: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--tiny-random",
        "--dataset",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--mode",
        "generate",
        "--sample",
        "--seed",
        "7",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]


def _config(images: Path, out: Path) -> study.Config:
    """The same run as `_command`, in this process."""
    return study.Config(
        tiny_random=True,
        dataset=str(images),
        out=str(out),
        batch_size=2,
        mode="generate",
        do_sample=True,
        seed=7,
        max_new_tokens=4,
        progress=False,
    )


def _kill_after(command: list[str], watch: Path, delay: float | None) -> tuple[bool, float | None]:
    """Start the run; ``delay`` s after ``<watch>.partial`` appears, kill -9 it (None: let it finish).

    Returns:
        Whether it was killed, and for a run that finished, the seconds from the
        ``.partial`` file appearing to the finished store appearing (None otherwise).
    """
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    appeared = finished = None
    killed = False
    while proc.poll() is None:
        now = time.perf_counter()
        if appeared is None and (partial_path(watch).exists() or watch.exists()):
            appeared = now
        if finished is None and watch.exists():
            finished = now
        if delay is not None and appeared is not None and now >= appeared + delay:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    _, err = proc.communicate()
    # a run that finished recorded the good images and exits 1 for the bad ones (partial success)
    if not killed and (proc.returncode != 1 or b"Traceback" in err):
        raise AssertionError(f"caching run failed (exit {proc.returncode}):\n{err.decode()[-3000:]}")
    span = None if killed or appeared is None else (finished or time.perf_counter()) - appeared
    return killed, span


def kill_trials(
    tmp_path: Path,
    n_trials: int,
    n_images: int,
    seed: int = 0,
    calibrate: bool = False,
    min_mid_run: int = 0,
) -> list[dict]:
    """An uninterrupted run, then runs killed (kill -9, separate process) at random moments and resumed.

    The kill comes a uniform random time after the store file appears, over the
    span an uninterrupted run takes to record (measured on a separate-process run
    when ``calibrate``, and updated by every run that finished before its kill).
    Every resumed store must equal the uninterrupted one bit for bit
    (`ActivationStore.digest`).

    Kill timing depends on the machine's load, so trials go on past ``n_trials``
    (up to twice as many) until ``min_mid_run`` of them were killed with some
    samples committed and some not.
    """
    images = make_images(tmp_path / "images", n_images)
    reference = study.main(_config(images, tmp_path / "reference.h5"))
    with ActivationStore.open(reference.store) as store:
        expected = store.digest()
        assert len(store.valid) == n_images + 2
    window = reference.record.seconds
    if calibrate:  # an uninterrupted run in its own process: its span, and its digest equals this process's
        _, span = _kill_after(
            _command(images, tmp_path / "calibration.h5"), tmp_path / "calibration.h5", None
        )
        window = span or window
        with ActivationStore.open(tmp_path / "calibration.h5") as store:
            assert store.digest() == expected
    rng = random.Random(seed)
    results = []
    trial = 0
    while trial < n_trials or (
        sum(r["committed_at_kill"] is not None for r in results) < min_mid_run and trial < 2 * n_trials
    ):
        out = tmp_path / f"trial{trial}.h5"
        delay = rng.uniform(0.0, window)
        killed, span = _kill_after(_command(images, out), out, delay)
        window = span or window
        committed = None
        if partial_path(out).exists():  # a killed store opens, showing its committed samples
            with ActivationStore.open(out) as partial:
                committed = int((partial.status != 0).sum())
                assert not partial.complete and len(partial.valid) <= committed
        resumed = study.main(_config(images, out))  # a new run of the same command resumes it
        with ActivationStore.open(out) as store:
            digest = store.digest()
            assert store.complete and len(store.valid) == n_images + 2
        results.append(
            {
                "trial": trial,
                "delay_s": round(delay, 3),
                "killed": killed,
                "committed_at_kill": committed,
                "resumed_from": resumed.record.resumed_from,
                "equal": digest == expected,
            }
        )
        out.unlink()
        trial += 1
    assert all(r["equal"] for r in results), results
    return results


def test_kill_9_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    results = kill_trials(tmp_path, n_trials=2, n_images=24, seed=1)
    assert len(results) == 2


@pytest.mark.slow
def test_twenty_kill_trials(tmp_path):
    """The issue's bar: 20 random kill -9 trials, each resumed, equal an uninterrupted run."""
    results = kill_trials(tmp_path, n_trials=20, n_images=40, seed=2, calibrate=True, min_mid_run=10)
    mid_run = [r for r in results if r["committed_at_kill"] is not None]
    assert len(mid_run) >= 10, results
    print("\n".join(map(str, results)))


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_gloo_ranks_write_shards_and_a_joined_store(tmp_path):
    images = make_images(tmp_path / "images", 10)
    out = tmp_path / "joined.h5"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        "--tiny-random",
        "--dataset",
        str(images),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--no-progress",
    ]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    # every rank finished and rank 0 joined; the two bad images make it a partial success (exit 1)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "failed corrupt.png" in done.stdout and "failed truncated.png" in done.stdout
    shards = sorted((tmp_path / "joined.h5.shards").glob("*.h5"))
    assert [s.name for s in shards] == ["rank00000-of-00002.h5", "rank00001-of-00002.h5"]
    single = study.main(study.Config.tiny(tmp_path, out=str(tmp_path / "single.h5"), batch_size=3))
    with ActivationStore.open(out) as joined, ActivationStore.open(single.store) as one:
        assert joined.ids("all") == one.ids("all") and joined.n_samples == 14
        assert [e.id for e in joined.errors()] == [e.id for e in one.errors()]
        for key in one.keys:
            hook, select = key.split("@")
            np.testing.assert_allclose(joined.get(hook, select), one.get(hook, select), atol=1e-3)
        np.testing.assert_array_equal(joined.roles(), one.roles())


def test_rated_mode_records_each_images_own_scoring_prompt(tmp_path):
    from mechbiqa.model.roles import Role
    from studies import logit_lens

    make_images(tmp_path / "images", 5)
    cfg = study.Config.tiny(tmp_path, mode="rated", store_dtype="float32", max_new_tokens=6)
    result = study.main(cfg)
    assert {e[0] for e in result.errors} == {"corrupt.png", "truncated.png"}  # not rated: error rows
    with ActivationStore.open(result.store) as store:
        assert store.info.prompt["per_sample"] and store.info.run["mode"] == "prompts"
        assert len(store.valid) == 7 and (store.n_images(store.valid) == 1).all()
        ratings = [r["rating"] for r in store.records()]
        assert all(r["mode"] == "one-stage" for r in ratings)
        for i in store.valid:  # each prompt ends at its own quality position, after its own description
            n = int(store.n_positions(samples=int(i)))
            roles = store.roles(samples=int(i))
            assert roles[n - 1] == int(Role.QUALITY) and (roles[:n] == int(Role.IMAGE)).sum() == 5
            assert store.prompts(samples=int(i))[0].endswith("The quality of the image is")
    lens = logit_lens.main(logit_lens.Config.tiny(tmp_path))  # offline, from the lens of tiny-random(seed=0)
    assert lens.lens.last_layer_error < 1e-5 and lens.lens.agreement[-1] == 1.0
    # the lens's last layer is the rating's own answer
    with ActivationStore.open(result.store) as store:
        levels = [r["rating"]["level"] for r in store.records()]
    assert [lens.lens.level_words[k] for k in lens.lens.final] == levels


# ----------------------------------------------------------------------------- torchrun: every mode
def torchrun(tmp_path: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A real ``torchrun --nproc_per_node 2`` run of the study (gloo, CPU)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    command = [*run, "--tiny-random", "--dataset", str(images), "--out", str(out), "--no-progress", *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def assert_same_store(a: Path, b: Path, atol: float) -> None:
    """Every dataset equal element by element (floats to ``atol``: other batches round differently)."""
    import h5py

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names: list[str] = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        other: list[str] = []
        fb.visititems(lambda n, o: other.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(other)
        for name in names:
            x, y = fa[name][()], fb[name][()]
            assert x.shape == y.shape, name
            if name == "samples/record":  # JSON: the rating's floats come from other batches
                for r, s in zip(x, y, strict=True):
                    r, s = json.loads(r), json.loads(s)
                    if "rating" in r:
                        np.testing.assert_allclose(
                            r["rating"].pop("level_probs"), s["rating"].pop("level_probs"), atol=atol
                        )
                        assert abs(r["rating"].pop("score") - s["rating"].pop("score")) < atol
                    assert r == s, name
            elif x.dtype.kind == "f":  # a float16 store may round float32 values that differ in their last
                # bits to neighbouring float16 values: one unit in the last place, at most 2**-10 of the value
                rtol = 2.0**-10 if x.dtype == np.float16 else 1e-7
                np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)
        for key in ("model_identity", "model_config", "tokenizer", "prompt", "cache_spec", "layout", "run"):
            assert fa.attrs[key] == fb.attrs[key], key


@pytest.mark.slow  # ~50 s on 2 shared cores (two torch imports per run)
@pytest.mark.parametrize("mode", ["rated", "generate"])
def test_torchrun_two_ranks_equal_one_process(tmp_path, mode):
    """Rated mode (each image's own prompt) and generate mode (sampled answers) under torchrun."""
    images = make_images(tmp_path / "images", 9)
    out = tmp_path / "joined.h5"
    extra = ["--mode", mode, "--batch-size", "3", "--max-new-tokens", "6", "--dtype", "float32"]
    sample = ["--sample", "--seed", "3"] if mode == "generate" else []
    done = torchrun(tmp_path, images, out, *extra, *sample)
    # the two bad files among them are named once, after the join, and make the run exit 1
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stdout.count("failed corrupt.png") == 1 and done.stdout.count("failed truncated.png") == 1
    options = {"do_sample": True, "seed": 3} if mode == "generate" else {}
    single = study.main(
        study.Config.tiny(
            tmp_path,
            out=str(tmp_path / "one.h5"),
            mode=mode,
            batch_size=3,
            max_new_tokens=6,
            dtype="float32",
            **options,
        )  # fmt: skip
    )
    assert_same_store(out, single.store, atol=1e-4)
    with ActivationStore.open(out) as joined, ActivationStore.open(single.store) as one:
        assert joined.n_samples == 13 and len(joined.info.shards) == 2
        assert joined.ids("all") == one.ids("all") and joined.prompts("all") == one.prompts("all")
        assert joined.answers("all") == one.answers("all") and joined.errors() == one.errors()
        np.testing.assert_array_equal(joined.roles("all"), one.roles("all"))
        np.testing.assert_array_equal(joined.token_ids("all"), one.token_ids("all"))
    config = json.loads((tmp_path / "joined.h5.config.json").read_text())
    assert config["mode"] == mode


@pytest.mark.slow  # ~90 s on 2 shared cores
def test_torchrun_ranks_agree_one_layout_for_ragged_prompts(tmp_path):
    """Each rank's prompts would plan another layout; the joined store equals one process's."""
    images = make_images(tmp_path / "images", 7, bad=False)
    script = Path(__file__).with_name("sharded_prompts.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    done = subprocess.run([*command, str(images), str(tmp_path / "joined.h5")], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(images), str(tmp_path / "one.h5")], env=ENV,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    shards = sorted((tmp_path / "joined.h5.shards").glob("*.h5"))
    with ActivationStore.open(shards[0]) as first, ActivationStore.open(shards[1]) as second:
        # rank 0 alone would plan a shorter max_pos, rank 1 a narrower answer: both got the union
        assert first.layout.max_pos == second.layout.max_pos > int(first.n_positions().max())
        assert first.layout.answer_bytes == second.layout.answer_bytes > len(second.answers()[0])
    assert_same_store(tmp_path / "joined.h5", tmp_path / "one.h5", atol=1e-5)
    with ActivationStore.open(tmp_path / "joined.h5") as joined:
        assert (
            joined.n_images().tolist() == [1, 1, 1, 1, 0, 1, 1]
            and len(set(joined.n_positions().tolist())) == 5
        )


@pytest.mark.slow  # ~40 s on 2 shared cores
def test_torchrun_ranks_refuse_together_before_any_work(tmp_path):
    """Rank 1's shard was recorded with another spec: both ranks stop before rating, with one message."""
    from mechbiqa.store.shards import shard_path

    images = make_images(tmp_path / "images", 4, bad=False)
    out = tmp_path / "joined.h5"
    theirs = shard_path(out, 1, 2)
    study.main(study.Config.tiny(tmp_path, out=str(theirs), spec="quality", mode="rated", max_new_tokens=2))
    done = torchrun(tmp_path, images, out, "--mode", "rated", "--max-new-tokens", "2")
    assert done.returncode != 0
    assert "cannot append to it" in done.stderr and "cache_spec differs" in done.stderr
    assert "rank 1 of 2 could not agree on the store before recording" in done.stderr  # rank 0's error
    assert not shard_path(out, 0, 2).exists() and not partial_path(shard_path(out, 0, 2)).exists()
    assert not out.exists() and not (tmp_path / "joined.h5.config.json").exists()


# ----------------------------------------------------------------------------- reliability
def test_a_refused_run_leaves_the_config_sidecar_alone(tmp_path):
    make_images(tmp_path / "images", 2, bad=False)
    cfg = study.Config.tiny(tmp_path, spec="quality")
    study.main(cfg)
    sidecar = tmp_path / "tiny.h5.config.json"
    assert json.loads(sidecar.read_text())["spec"] == "quality"
    with pytest.raises(StoreMismatchError, match="cache_spec differs.*overwrite"):
        study.main(study.Config.tiny(tmp_path, spec="default"))
    assert json.loads(sidecar.read_text())["spec"] == "quality"  # still the spec the store holds
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fixed_image_is_retried_by_a_rerun(tmp_path):
    images = make_images(tmp_path / "images", 4)
    cfg = study.Config.tiny(tmp_path)
    first = study.main(cfg)
    assert {e[0] for e in first.errors} == {"corrupt.png", "truncated.png"}
    (images / "truncated.png").write_bytes((images / "img001.png").read_bytes())  # fixed
    again = study.main(cfg)
    assert again.record.n_recorded == 1 and [e[0] for e in again.errors] == ["corrupt.png"]
    with ActivationStore.open(again.store) as store:
        row = store.index_of("truncated.png")
        assert store.complete and row in store.valid
        np.testing.assert_array_equal(
            store.get("llm.blocks.{l}.hook_resid_post", samples=row),
            store.get("llm.blocks.{l}.hook_resid_post", samples=store.index_of("img001.png")),
        )


def test_partial_success_exits_non_zero_and_a_rerun_retries_only_the_fixed_images(tmp_path):
    """A real run: the good images recorded, the bad ones named, exit 1; fixed, a rerun records just them."""
    images = make_images(tmp_path / "images", 2)
    out = tmp_path / "part.h5"
    command = [sys.executable, str(SCRIPT), "--tiny-random", "--dataset", "images", "--out", "part.h5",
               "--no-progress"]  # relative paths, run from the folder holding them
    first = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert "failed corrupt.png" in first.stdout and "failed truncated.png" in first.stdout
    assert "4 valid" in first.stdout and "retry" in first.stdout
    for bad in ("corrupt.png", "truncated.png"):
        (images / bad).write_bytes((images / "img001.png").read_bytes())
    again = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recorded 2 samples" in again.stdout and "6 valid" in again.stdout
    with ActivationStore.open(out) as store:
        assert store.complete and not store.errors() and len(store.valid) == 6


def test_errors_are_ordinary_exceptions_with_one_line_messages(tmp_path):
    make_images(tmp_path / "images", 1, bad=False)
    with pytest.raises(ValueError, match="cannot parse cache site") as info:
        study.main(study.Config.tiny(tmp_path, spec="llm.blocks.{l}.hook_resid_post@quality:x"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot cache hook 'llm.nowhere'") as info:
        study.main(study.Config.tiny(tmp_path, spec="llm.nowhere@all"))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not 'builtin', a folder of images"):
        study.main(study.Config.tiny(tmp_path, dataset=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="no config.json at .*needs the original config.json"):
        study.main(
            study.Config(model=str(tmp_path), dataset=str(tmp_path / "images"), out=str(tmp_path / "m.h5"))
        )


@pytest.mark.slow  # ~60 s on 2 shared cores
def test_torchrun_rated_mode_of_a_two_stage_pair_trained_on_annotations_equals_one_process(tmp_path):
    """A compact pair trained on a Q-Pathway-style file: stage 1 describes, stage 2 rates, under 2 ranks."""
    import dataclasses

    from mechbiqa import train as T
    from mechbiqa.data.annotations import read_annotations
    from mechbiqa.model import ModelConfig, MPLUGOwl2

    images = make_images(tmp_path / "images" / "spaq_koniq", 7, bad=False)
    levels = ["poor", "fair", "good"]
    reasons = ["The sky is noisy.", "The edges are soft and blurred.", "Colours are vivid and sharp."]
    entries = [{"id": p.stem, "image": f"spaq_koniq/{p.name}", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the quality of this image."},
        {"from": "gpt", "value": f"{reasons[i % 3]} Thus, the quality of the image is {levels[i % 3]}."}]}
        for i, p in enumerate(sorted(images.glob("*.png")))]
    (tmp_path / "cleaned_labels.json").write_text(json.dumps(entries))
    found = read_annotations([tmp_path / "cleaned_labels.json"], tmp_path / "images")
    records, _ = found.for_mode("two-stage")
    tok = T.compact_tokenizer(records, vocab_size=300)
    cfg = ModelConfig.tiny()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
    model = T.init_weights(MPLUGOwl2(cfg), 0)
    base = dict(steps=2, batch_size=2, warmup_steps=1, eval_every=0, eval_samples=0, max_new_tokens=4)
    T.train_two_stage(T.TrainConfig(mode="two-stage", stage=1, **base),
                      T.TrainConfig(mode="two-stage", stage=2, **{**base, "steps": 1}), tmp_path / "pair",
                      records, model=model, tokenizer=tok)
    extra = ["--model", str(tmp_path / "pair"), "--mode", "rated", "--batch-size", "2",
             "--max-new-tokens", "6", "--dtype", "float32"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    common = ["--dataset", str(images), "--no-progress", *extra]
    done = subprocess.run([*run, *common, "--out", str(tmp_path / "two.h5")], env=ENV, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), *common, "--out", str(tmp_path / "one.h5")], env=ENV,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_store(tmp_path / "two.h5", tmp_path / "one.h5", atol=1e-4)
    with ActivationStore.open(tmp_path / "two.h5") as joined:
        assert joined.n_samples == 7 and len(joined.info.shards) == 2
