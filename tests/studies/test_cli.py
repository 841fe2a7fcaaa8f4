"""The command line every study shares (`mechbiqa.cli`) and the strict-JSON writer (`mechbiqa.outputs`).

The parser is derived from each study's Config: it must give back the Config it
was built from, show the common options, refuse bad values with one line and a
non-zero exit (a real process: that is where the behaviour lives), and load
models in the dtype it is asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from PIL import Image

from mechbiqa import cli, outputs
from mechbiqa.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted(p.stem for p in (REPO / "studies").glob("*.py") if p.stem != "__init__")
MODEL_LOADING = (
    "attribution_patching",
    "cache_activations",
    "conversion_error",
    "direct_logit_attribution",
    "evaluate_quality",
    "grounding",
    "instability",
    "patch_image_tokens",
    "probes",
    "replicate",
    "score_images",
    "train_pair",
    "train_qscorer",
    "train_rl",
)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def study(name: str):
    return importlib.import_module(f"studies.{name}")


def make_images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (28, 30, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "studies" / f"{name}.py"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


# ----------------------------------------------------------------------------- every study's parser
def test_every_study_script_is_covered():
    assert set(MODEL_LOADING) <= set(STUDIES) and len(STUDIES) >= 15


@pytest.mark.parametrize("name", STUDIES)
def test_the_parser_round_trips_the_config(name):
    config = study(name).Config
    default = config()
    assert cli.parse(config, []) == default  # nothing given: the Config's own defaults
    argv = cli.to_argv(default)  # every option spelled out, as --help shows the defaults
    assert cli.parse(config, argv) == default
    assert study(name).parse_args(argv) == default
    # and a value that is not the default comes back too
    for option in cli.options(config):
        if option.kind is int and isinstance(option.default, int) and option.container is None:
            changed = cli.parse(config, [option.flag, str(option.default + 1)])
            assert cli.value_of(changed, option.flag) == option.default + 1
            break


@pytest.mark.parametrize("name", STUDIES)
def test_help_shows_each_option_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--debug" in text
    for option in cli.options(study(name).Config):
        assert option.flag in text


@pytest.mark.parametrize("name", MODEL_LOADING)
def test_model_loading_studies_offer_model_dtype_device(name, capsys):
    with pytest.raises(SystemExit):
        study(name).parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--dtype", "--device"):
        assert flag in text, (name, flag)
    assert "bfloat16" in text
    dtype = cli.parse(study(name).Config, ["--dtype", "bfloat16", "--device", "cuda:1"])
    assert cli.value_of(dtype, "--dtype") == "bfloat16" and cli.value_of(dtype, "--device") == "cuda:1"


def test_common_options_are_spelled_and_constrained_the_same_everywhere():
    for name in STUDIES:
        for o in cli.options(study(name).Config):
            if o.flag == "--dtype":
                assert set(o.choices) == {"float32", "bfloat16", "float16"}, name
            if o.flag == "--split":
                assert set(o.choices) == {"train", "val", "test"} and o.none == "all", name
    for name in STUDIES:
        flags = {o.flag for o in cli.options(study(name).Config)}
        assert not flags & {"--out-dir", "--model-dtype", "--param-dtype", "--checkpoints"}, name


# ----------------------------------------------------------------------------- the derivation rules
@dataclass(frozen=True)
class Inner:
    """A nested library config.

    Attributes:
        seeds: Session seeds.
        seed: Clashes with the outer seed.
        greedy: A switch.
    """

    seeds: tuple[int, ...] = (0, 1)
    seed: int = 3
    greedy: bool = False


@dataclass(frozen=True)
class Toy:
    """A toy.

    Attributes:
        images: Files to rate.
        model: A checkpoint
            directory (a second line of help).
        split: One split.
        limit: First N.
        mode: How to run.
        out_dir: Where (spelled --out).
        progress: Show a bar.
        inner: The nested one.
        seed: The outer seed.
        ratio: A float or none.
        overrides: Not on the command line.
    """

    images: tuple[str, ...] = field(default=(), metadata=cli.meta(positional=True))
    model: str | None = None
    split: str | None = "test"
    limit: int | None = None
    mode: Literal["score", "generate"] = "score"
    out_dir: Path = field(default=Path("x"), metadata=cli.meta(flag="--out", aliases=("--out-dir",)))
    progress: bool = True
    inner: Inner = Inner()
    seed: int = 0
    ratio: float | None = 0.5
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the shared options."""
        cli.check_common(self)


def test_derivation_rules():
    flags = {o.flag: o for o in cli.options(Toy)}
    assert list(flags) == [
        "images", "--model", "--split", "--limit", "--mode", "--out", "--progress", "--seeds",
        "--inner-seed", "--greedy", "--seed", "--ratio",
    ]  # fmt: skip
    assert flags["--model"].help == "A checkpoint directory (a second line of help)."
    assert flags["--mode"].choices == ("score", "generate") and flags["--split"].none == "all"
    got = cli.parse(
        Toy,
        ["a.png", "b.png", "--split", "all", "--limit", "3", "--mode", "generate", "--out-dir", "y",
         "--no-progress", "--seeds", "5", "--seeds", "6", "--inner-seed", "9", "--greedy", "--seed", "1",
         "--ratio", "none"],
    )  # fmt: skip
    assert got == Toy(
        images=("a.png", "b.png"), split=None, limit=3, mode="generate", out_dir=Path("y"), progress=False,
        inner=Inner(seeds=(5, 6), seed=9, greedy=True), seed=1, ratio=None,
    )  # fmt: skip
    assert isinstance(got.out_dir, Path) and isinstance(got.inner.seeds, tuple)
    for bad, message in (
        (["--mode", "other"], "invalid choice: 'other'"),
        (["--limit", "x"], "invalid int value: 'x'"),
        (["--split", "dev"], "invalid choice: 'dev'"),
        (["--overrides", "{}"], "unrecognized arguments"),
        (["--dtype", "float32"], "unrecognized arguments"),
    ):
        with pytest.raises(UsageError, match=message):
            cli.parse(Toy, bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "-2"], "--limit -2: keep at least 1 sample"),
        (["--limit", "0"], "--limit 0: keep at least 1 sample"),
    ],
)
def test_common_ranges_are_checked_in_post_init(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.parse(Toy, argv)
    with pytest.raises(ValueError, match=message):
        Toy(limit=int(argv[1]))  # the same check when the Config is built in Python


@pytest.mark.parametrize("name", ["cache_activations", "evaluate_quality", "patch_image_tokens", "grounding"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_size_below_one_is_refused_by_every_study(name, value):
    with pytest.raises(ValueError, match=f"--batch-size {value}: pass at least 1"):
        study(name).parse_args(["--batch-size", value])


# ----------------------------------------------------------------------------- one error surface
def test_run_turns_an_expected_error_into_one_line(capsys):
    def main(cfg):
        raise FileNotFoundError(f"no store at {cfg.model}; record one with studies/cache_activations.py")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, Toy, argv=["--model", "."])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no store at .; record one" in err[0] and "Traceback" not in err[0]


def test_run_reports_a_command_line_that_does_not_parse_as_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda cfg: pytest.fail("ran"), Toy, argv=["--limit", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --limit: invalid int value: 'x'" in err[0] and "--help" in err[0]


def test_run_keeps_the_traceback_of_a_bug_and_with_debug():
    def bug(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(bug, Toy, argv=[])

    def refused(cfg):
        raise KeyError("no such hook")

    with pytest.raises(KeyError):
        cli.run(refused, Toy, argv=["--debug"])


def test_paths_and_specs_are_refused_before_a_model_is_loaded(tmp_path, monkeypatch, capsys):
    from mechbiqa import sources

    cache = study("cache_activations")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(sources, "load_model", no_loading)
    monkeypatch.setattr(sources, "load_raters", no_loading)
    for argv, message in (
        (["--model", str(tmp_path / "missing")], "is not a directory"),
        (["--tiny-random", "--dataset", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--tiny-random", "--dataset", f"koniq10k={tmp_path / 'nowhere'}"], "does not exist"),
        (["--tiny-random", "--spec", "llm.blocks.{l}.hook_resid_post@nowhere"], "nowhere"),
        (["--tiny-random", "--limit", "-2"], "--limit -2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(cache.main, cache.Config, cache.render, argv=[*argv, "--out", str(tmp_path / "a.h5")])
        assert exit_info.value.code == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("cache_activations", ("--tiny-random", "--limit", "-2"), "--limit -2"),
        ("patch_image_tokens", ("--tiny-random", "--batch-size", "0"), "--batch-size 0"),
        ("evaluate_quality", ("--tiny-random", "--batch-size", "-1"), "--batch-size -1"),
    ],
)
def test_a_refused_argument_ends_the_process_with_one_line(name, args, message, tmp_path):
    done = run_script(name, *args, "--out", str(tmp_path / "out"))
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_debug_shows_the_traceback(tmp_path):
    args = ("--tiny-random", "--limit", "-2", "--debug", "--out", str(tmp_path / "a"))
    done = run_script("cache_activations", *args)
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: --limit -2" in done.stderr


# ----------------------------------------------------------------------------- dtype and device reach loaders
def _checkpoint(folder: Path, mode: str = "one-stage", stage: int | None = None) -> Path:
    """A directory a loader accepts as a checkpoint up to reading its weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "mechbiqa.json").write_text(json.dumps({"mode": mode, "stage": stage}))
    return folder


class _Loaded(Exception):
    pass


def _rated(images: Path) -> list:
    """The images as records with a MOS and a description (what the RL, Q-Scorer and MOS studies read)."""
    from mechbiqa.data.records import IQARecord

    return [
        IQARecord(id=p.stem, image_path=p, score=2.0 + i, scale=(1.0, 5.0), level_word="fair",
                  description="The image is sharp.")
        for i, p in enumerate(sorted(images.glob("*.png")))
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("score_images", lambda ckpt, images: {"model": ckpt, "images": (str(images / "img0.png"),)}),
        ("cache_activations", lambda ckpt, images: {"model": ckpt, "dataset": str(images)}),
        ("patch_image_tokens", lambda ckpt, images: {"model": ckpt, "dataset": str(images), "split": None}),
        ("instability", lambda ckpt, images: {"model": ckpt, "dataset": str(images), "split": None}),
        ("evaluate_quality", lambda ckpt, images: {"model": ckpt, "datasets": (str(images),), "split": None}),
        ("grounding", lambda ckpt, images: {"checkpoints": (ckpt,), "dataset": str(images), "split": None}),
        ("probes", lambda ckpt, images: {"checkpoint": ckpt, "dataset": str(images)}),
        (
            "direct_logit_attribution",
            lambda ckpt, images: {"model": ckpt, "dataset": str(images), "split": None},
        ),
        ("attribution_patching", lambda ckpt, images: {"model": ckpt, "dataset": str(images), "split": None}),
        ("conversion_error", lambda ckpt, images: {"model": ckpt, "dataset": "rated"}),
        ("train_rl", lambda ckpt, images: {"init_from": ckpt, "dataset": "rated"}),
        ("train_qscorer", lambda ckpt, images: {"init_from": ckpt, "dataset": "rated"}),
    ],
)
def test_each_study_loads_its_model_in_the_asked_dtype_and_device(name, make, tmp_path, monkeypatch):
    from mechbiqa.model import load

    seen = []

    def spy(path, dtype=torch.float32, device="cpu"):
        seen.append((dtype, str(device)))
        raise _Loaded

    monkeypatch.setattr(load, "load_pretrained", spy)
    ckpt = str(_checkpoint(tmp_path / "ckpt"))
    images = make_images(tmp_path / "images")
    module = study(name)
    cfg = module.Config(**make(ckpt, images), dtype="bfloat16", device="cpu", out=str(tmp_path / "o"))
    if getattr(cfg, "dataset", None) == "rated":  # studies that need a MOS per image read these records
        monkeypatch.setattr(module, "load_samples", lambda *args: _rated(images))
    with pytest.raises(_Loaded):
        module.main(cfg)
    assert seen == [(torch.bfloat16, "cpu")]


def test_a_two_stage_pair_loads_in_the_asked_dtype(tmp_path):
    from mechbiqa.model.load import save_pretrained
    from mechbiqa.pipeline import TwoStageRater
    from mechbiqa.sources import load_rater, tiny_random_model

    for stage in (1, 2):
        model, tokenizer, processor = tiny_random_model(stage)
        folder = tmp_path / "pair" / f"stage{stage}"
        save_pretrained(model, folder)
        tokenizer.save(folder)
        processor.save_pretrained(folder)
        (folder / "mechbiqa.json").write_text(json.dumps({"mode": "two-stage", "stage": stage}))
    rater = load_rater(tmp_path / "pair", dtype="bfloat16", device="cpu", max_new_tokens=3)
    assert isinstance(rater, TwoStageRater) and rater.max_new_tokens == 3
    for part in (rater.stage1, rater.stage2):
        assert {p.dtype for p in part.model.parameters()} == {torch.bfloat16}
    reference = tiny_random_model(1)[0].state_dict()  # the weights are the saved ones, cast
    loaded = rater.stage1.model.state_dict()
    for key in reference:
        assert torch.equal(loaded[key], reference[key].to(torch.bfloat16)), key
    with pytest.raises(ValueError, match="choose float32, bfloat16 or float16"):
        load_rater(tmp_path / "pair", dtype="float64")


# ----------------------------------------------------------------------------- strict JSON
def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_jsonable_writes_nan_and_infinities_as_null(tmp_path):
    @dataclass(frozen=True)
    class Row:
        score: float
        path: Path

    value = {
        "nan": float("nan"),
        "inf": -math.inf,
        "array": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "scalar": np.float32(0.25),
        "int": np.int64(3),
        "tensor": torch.tensor([0.5, float("nan")]),
        "rows": (Row(float("nan"), Path("a/b")),),
        1: {"nested": [np.nan, "text", None, True]},
    }
    path = outputs.write_json(tmp_path / "x.json", value)
    got = _strict(path.read_text())
    assert got == {
        "nan": None,
        "inf": None,
        "array": [[1.0, None], [None, 2.0]],
        "scalar": 0.25,
        "int": 3,
        "tensor": [0.5, None],
        "rows": [{"score": None, "path": "a/b"}],
        "1": {"nested": [None, "text", None, True]},
    }
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary file, renamed into place


def test_write_config_round_trips_a_study_config(tmp_path):
    module = study("instability")
    cfg = module.Config()
    data = _strict(outputs.write_config(tmp_path, cfg).read_text())
    assert (tmp_path / "config.json").is_file()
    assert data["sampling"]["seeds"] == list(cfg.sampling.seeds) and data["dtype"] == "float32"
    assert dataclasses.replace(cfg) == cfg


def test_a_study_with_nan_metrics_writes_strict_json(tmp_path):
    module = study("evaluate_quality")
    make_images(tmp_path / "images", 6)
    result = module.main(module.Config.tiny(tmp_path))
    row = result.evaluation.rows[0]
    assert math.isnan(row.metrics.srcc)  # unrated images: the metrics are NaN, flagged
    data = _strict(result.files["json"].read_text())
    assert data["rows"][0]["srcc"] is None and data["rows"][0]["name"] == row.name == "images"
    assert all(image["target"] is None for image in data["images"])
    assert _strict(result.files["config"].read_text())["limit"] == 6
