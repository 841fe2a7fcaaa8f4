"""studies/build_benchmark.py runs end to end on a tiny config (warnings as errors) and writes its files."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import warnings
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "studies" / "build_benchmark.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("build_benchmark_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_main_tiny_writes_summary_and_contact_sheet(study, tmp_path):
    from rich.console import Console

    cfg = study.Config.tiny(tmp_path / "bench")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = study.main(cfg)
    assert result.n_images == 4 * (1 + 5 * len(cfg.distortions)) and not result.reused
    assert result.contact_sheet.is_file() and result.contact_sheet.stat().st_size > 1000
    summary = json.loads(result.summary_json.read_text())
    assert summary["check"]["measure"] == "gmsd" and summary["check"]["n"] > 0
    assert sum(result.images_per_split.values()) == result.n_images
    console = Console(file=io.StringIO(), width=120)
    study.render(result, console)
    text = console.file.getvalue()
    assert "Independent check" in text and "gaussian_blur" in text
    assert study.main(cfg).reused


def test_help_and_flags(study, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--image-size" in capsys.readouterr().out
    cfg = study.parse_args(["--image-size", "64", "--photos", "astronaut", "coffee", "chelsea"])
    assert cfg.image_size == 64 and cfg.photos == ("astronaut", "coffee", "chelsea")
    assert cfg.benchmark_config().image_size == 64
