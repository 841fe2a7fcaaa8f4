"""``studies/score_images.py`` with files that cannot be read, and with any kind of checkpoint.

A run with some unreadable files rates the others exactly as if they had been
rated alone, names each bad file (rendered output and ``ratings.json``) and
exits non-zero; a run where no file can be read ends with one line. The exit
codes are read from real processes (`mechbiqa.cli.run` sets them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa import cli

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOLERANCE = 1e-5  # batched against alone; the tiny model's scores of different images differ by ~1e-4


def score_images(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "studies" / "score_images.py"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def gray16_to_rgb8(values: np.ndarray) -> np.ndarray:
    """The 8-bit reading of a 16-bit grayscale image, by hand: v * 255 / 65535, rounded, replicated."""
    gray = np.floor(values.astype(np.float64) * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Path]:
    """Two good PNGs, a 16-bit grayscale PNG, and four files that cannot be read."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = {}
    for i in range(2):
        files[f"good{i}"] = root / f"good{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 30, 3), dtype=np.uint8)).save(files[f"good{i}"])
    gray = rng.integers(0, 65536, (26, 32), dtype=np.uint16)
    files["gray16"] = root / "gray16.png"
    Image.fromarray(gray).save(files["gray16"])
    assert Image.open(files["gray16"]).mode == "I;16"
    files["gray16_by_hand"] = root / "by_hand" / "gray16_as_rgb8.png"
    files["gray16_by_hand"].parent.mkdir()
    Image.fromarray(gray16_to_rgb8(gray)).save(files["gray16_by_hand"])
    files["corrupt"] = root / "corrupt.png"
    files["corrupt"].write_bytes(files["good0"].read_bytes()[:80])  # a truncated PNG
    files["text"] = root / "notes.png"
    files["text"].write_text("not an image\n")
    nan = np.full((8, 8), 100.0, dtype=np.float32)
    nan[2, 3] = np.nan
    files["nan_float"] = root / "nan.tif"  # mode F with a NaN: no 8-bit reading
    Image.fromarray(nan, mode="F").save(files["nan_float"])
    files["missing"] = root / "missing.png"
    return files


GOOD = ("good0", "good1", "gray16")
BAD = {
    "corrupt": "corrupt or truncated",
    "text": "not a recognised image format",
    "nan_float": "NaN",
    "missing": "no such file",
}


@pytest.fixture(scope="module")
def alone(folder) -> dict[str, float]:
    """Each good image rated on its own by the tiny random model, in this process, as the study used to."""
    from mechbiqa.scoring import rate_images
    from mechbiqa.sources import tiny_random_model

    model, tokenizer, processor = tiny_random_model(0)
    names = [*GOOD, "gray16_by_hand"]
    return {name: float(rate_images(model, tokenizer, processor([folder[name]])).scores[0]) for name in names}


def test_the_readable_files_are_rated_as_alone_and_each_bad_one_is_named(folder, alone, tmp_path):
    order = ("good0", "corrupt", "gray16", "text", "missing", "good1", "nan_float")
    done = score_images("--tiny-random", "--out", str(tmp_path / "out"), *(str(folder[k]) for k in order))
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "ratings.json").read_text())
    rated = {Path(e["image"]).name: e for e in report["images"] if "error" not in e}
    failed = {Path(e["image"]).name: e["error"] for e in report["images"] if "error" in e}
    assert list(rated) == [folder[k].name for k in ("good0", "gray16", "good1")]  # input order
    assert set(failed) == {folder[k].name for k in BAD}
    for key, reason in BAD.items():
        assert reason in failed[folder[key].name]
        assert f"{folder[key]}: {failed[folder[key].name]}" in done.stdout  # path and reason, one line
    for key in GOOD:
        entry = rated[folder[key].name]
        assert abs(entry["score_0to1"] - alone[key]) < TOLERANCE, key
        assert np.isclose(sum(entry["level_probs"]), 1.0) and folder[key].name in done.stdout


def test_a_16_bit_grayscale_png_is_rated_as_its_hand_made_8_bit_reading(folder, alone):
    assert abs(alone["gray16"] - alone["gray16_by_hand"]) < TOLERANCE
    from mechbiqa.sources import open_source

    # the original's Image.open(path).convert("RGB") clips 16-bit values at 255 (almost white):
    # that reading must give another score, or the comparison above could not fail (rated here by
    # the checkpoint object the study uses, one image at a time)
    clipped = Image.open(folder["gray16"]).convert("RGB")
    checkpoint = open_source(tiny_random=True, seed=0)
    score = checkpoint.rate([clipped], batch_size=1)[0].score
    assert abs(checkpoint.rate([folder["gray16_by_hand"]], batch_size=1)[0].score - alone["gray16"]) < TOLERANCE
    assert abs(score - alone["gray16"]) > 10 * TOLERANCE


def test_all_readable_files_exit_zero_with_the_same_scores(folder, alone, tmp_path):
    done = score_images("--tiny-random", "--batch-size", "2", "--out", str(tmp_path / "out"),
                        *(str(folder[k]) for k in GOOD))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "could not be read" not in done.stdout and done.stderr == ""
    report = json.loads((tmp_path / "out" / "ratings.json").read_text())
    assert [Path(e["image"]).name for e in report["images"]] == [folder[k].name for k in GOOD]
    for key, entry in zip(GOOD, report["images"], strict=True):
        assert abs(entry["score_0to1"] - alone[key]) < TOLERANCE, key


def test_no_readable_file_ends_with_one_line_and_rates_nothing(folder, tmp_path):
    bad = [str(folder[k]) for k in BAD]
    done = score_images("--tiny-random", "--out", str(tmp_path / "out"), *bad)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"none of the {len(bad)} image file(s) could be read" in lines[0]
    assert str(folder["corrupt"]) in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_negative_batch_size_is_refused_before_anything_runs(folder, tmp_path, capsys):
    from studies import score_images as study

    argv = ["--tiny-random", "--batch-size", "-1", "--out", str(tmp_path / "out"), str(folder["good0"])]
    with pytest.raises(SystemExit) as stop:
        cli.run(study.main, study.Config, study.render, argv=argv)
    captured = capsys.readouterr()
    assert stop.value.code == 1 and captured.out == ""
    assert "--batch-size -1: pass at least 1" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_two_stage_pair_rates_as_its_pipeline(folder, tmp_path):
    from mechbiqa.model.load import save_pretrained
    from mechbiqa.sources import tiny_random_model, tiny_raters
    from studies import score_images as study

    for stage in (1, 2):  # the stages of tiny_raters(0)["two-stage"], saved as a trained pair
        model, tokenizer, processor = tiny_random_model(stage)
        part = tmp_path / "pair" / f"stage{stage}"
        save_pretrained(model, part)
        tokenizer.save(part)
        processor.save_pretrained(part)
        info = {"mode": "two-stage", "stage": stage, "template": "v1"}
        (part / "mechbiqa.json").write_text(json.dumps(info))
    images = (str(folder["good0"]), str(folder["missing"]), str(folder["good1"]))
    pair, out = str(tmp_path / "pair"), str(tmp_path / "out")
    cfg = study.Config(images=images, model=pair, max_new_tokens=3, out=out)
    result = study.main(cfg)
    expected = tiny_raters(0, max_new_tokens=3)["two-stage"].rate([folder["good0"], folder["good1"]])
    assert result.exit_code == 1 and [f.path for f in result.failures] == [folder["missing"]]
    np.testing.assert_allclose(result.ratings.scores, [r.score for r in expected], atol=TOLERANCE)
    report = json.loads(result.file.read_text())
    assert report["kind"] == "two-stage"
    assert [e.get("description") for e in report["images"][:2]] == [r.description for r in expected]


# ----------------------------------------------------------------------------- cli.run's exit code
@dataclass(frozen=True)
class _Config:
    """A study's options.

    Attributes:
        code: The exit code the result carries.
    """

    code: int = 0


@dataclass(frozen=True)
class _Result:
    exit_code: int


def test_run_exits_with_the_results_exit_code_after_rendering():
    rendered = []

    def main(config: _Config) -> _Result:
        return _Result(config.code)

    def render(result: _Result, console) -> None:
        rendered.append(result)

    assert cli.run(main, _Config, render, argv=[]) == _Result(0) and rendered == [_Result(0)]
    with pytest.raises(SystemExit) as stop:
        cli.run(main, _Config, render, argv=["--code", "3"])
    assert stop.value.code == 3 and rendered[-1] == _Result(3)
    assert cli.run(lambda c: "no exit code", _Config, argv=[]) == "no exit code"
