"""Smoke test and benchmark at real scale: every study on a checkpoint with the released 7B shapes.

Question: does every study run on a researcher's checkpoint (8.2 B parameters, bf16,
sharded safetensors under the original key names, the LLaMA-2 tokenizer) on this
machine, and what does each cost in time and peak memory?

Method: write a random checkpoint with the released shapes
(`mechbiqa.model.synthetic.write_random_checkpoint`, ``ModelConfig.llama2_7b()``, reused
when present), a two-stage pair made of it (stage 1 and stage 2 the same weights: the
pipeline, not the numbers, is under test), a few images laid out as KonIQ-10k releases
them (``1024x768/`` + ``koniq10k_scores_and_distributions.csv``), a Q-Pathway-style
annotation file; then run each study as its own process with ``--model``, ``--dtype``
and ``--device``, as a user would, and read its wall time and peak memory (the
process's peak resident set from ``wait4``; on CUDA also the peak allocated by torch).
The values are random, so the outputs mean nothing; a study that fails prints its
last lines and the table marks it.

Output: a table of study, status, seconds, peak RSS (GB), peak GPU (GB); ``smoke_7b.json``
in ``--out``. This is what to run first on a new GPU machine::

    python studies/smoke_7b.py --device cuda --dtype bfloat16
    python studies/smoke_7b.py --tokenizer /models/one-align/tokenizer.model --only score_images logit_lens

Not part of the test suite (16 GB on disk, minutes per study on a CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechbiqa import cli, outputs

REPO = Path(__file__).resolve().parents[1]
NAME = "smoke_7b"

# Runs a study as __main__ and, at exit, writes its own peak GPU memory (the RSS peak comes from wait4).
_WRAPPER = """
import atexit, json, os, runpy, sys
def _peak():
    out = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = range(torch.cuda.device_count())
        out["gpu_peak_bytes"] = max(torch.cuda.max_memory_allocated(d) for d in devices)
    with open(os.environ["MECHBIQA_PEAK_FILE"], "w") as f:
        json.dump(out, f)
atexit.register(_peak)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@dataclass(frozen=True)
class Config:
    """A smoke run.

    Attributes:
        out: Working folder: the checkpoint, the data, every study's output.
        tokenizer: The LLaMA-2 SentencePiece ``tokenizer.model`` copied into the checkpoint (any released
            mPLUG-Owl2 / Q-Align checkpoint has one); None: ``../shared/fixtures/llama2_tokenizer.model``
            beside the repository when present.
        dtype: Model dtype of every study.
        device: ``cpu`` or ``cuda``.
        n_images: Images in the KonIQ-shaped data set.
        only: Run only these studies (names as in the table); empty: all.
        timeout: Seconds per study before it is stopped.
    """

    out: str = str(REPO / "cache" / "smoke-7b")
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    device: str = "cpu"
    n_images: int = 2
    only: tuple[str, ...] = ()
    timeout: int = 1800

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is written."""
        cli.check_common(self)
        if self.n_images < 2:
            raise ValueError(
                f"--n-images must be at least 2 (got {self.n_images}): patching needs a second image"
            )


@dataclass
class Step:
    """One study's outcome."""

    name: str
    status: str
    seconds: float
    rss_gb: float
    gpu_gb: float | None
    tail: str = ""


@dataclass
class Result:
    """Every step, and where the table was written."""

    steps: list[Step] = field(default_factory=list)
    path: Path | None = None


def _tokenizer(cfg: Config) -> Path:
    path = (
        Path(cfg.tokenizer)
        if cfg.tokenizer
        else REPO.parent / "shared" / "fixtures" / "llama2_tokenizer.model"
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.model at {path}: pass --tokenizer with a LLaMA-2 tokenizer.model"
        )
    return path


def prepare(cfg: Config) -> dict[str, Path]:
    """The checkpoint, a two-stage pair of it, a KonIQ-shaped data set, an annotation file (reused if present)."""
    import numpy as np
    from PIL import Image

    from mechbiqa.model.config import ModelConfig
    from mechbiqa.model.synthetic import write_random_checkpoint

    out = Path(cfg.out)
    ckpt = write_random_checkpoint(out / "checkpoint", ModelConfig.llama2_7b(), _tokenizer(cfg))
    pair = out / "pair"
    for stage in (
        "stage1",
        "stage2",
    ):  # a two-stage pair in the layout train_pair writes, sharing the weights
        (pair / stage).mkdir(parents=True, exist_ok=True)
        for f in ckpt.iterdir():
            link = pair / stage / f.name
            if not link.exists():
                link.symlink_to(f)
    (pair / "mechbiqa.json").write_text(json.dumps({"mode": "two-stage", "template": "mplug_owl2"}) + "\n")
    koniq = out / "koniq10k"
    (koniq / "1024x768").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore"]
    for i in range(cfg.n_images):
        name = f"{1000000 + i}.jpg"
        if not (koniq / "1024x768" / name).is_file():
            pixels = (rng.uniform(0, 255, (768, 1024, 3))).astype("uint8")
            Image.fromarray(pixels).save(koniq / "1024x768" / name, quality=60 + 10 * i)
        rows.append(f"{name},0,1,2,1,0,4,{2.5 + 0.5 * i:.2f},0.5,{40 + 10 * i:.2f}")
    (koniq / "koniq10k_scores_and_distributions.csv").write_text("\n".join(rows) + "\n")
    annotations = out / "q_pathway.json"
    annotations.write_text(
        json.dumps(
            [
                {
                    "id": str(i),
                    "image": f"{1000000 + i}.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nHow is the quality of this image?"},
                        {
                            "from": "gpt",
                            "value": "The image is noisy and the details are lost. "
                            f"Thus, the quality of the image is {('poor', 'fair')[i % 2]}.",
                        },
                    ],
                }
                for i in range(cfg.n_images)
            ],
            indent=1,
        )
        + "\n"
    )
    return {"checkpoint": ckpt, "pair": pair, "koniq": koniq, "annotations": annotations}


def commands(cfg: Config, paths: dict[str, Path]) -> dict[str, list[str]]:
    """Each study's command line, with the common options; the store feeds the offline studies."""
    out = Path(cfg.out) / "runs"
    ckpt = str(paths["checkpoint"])
    model = ["--model", ckpt, "--dtype", cfg.dtype, "--device", cfg.device]
    data = ["--dataset", f"koniq10k={paths['koniq']}", "--split", "all", "--limit", str(cfg.n_images)]
    store = out / "rated.h5"
    short = ["--max-new-tokens", "8"]  # descriptions: the pipeline is under test, not their length
    images = sorted(str(p) for p in (paths["koniq"] / "1024x768").iterdir())[: cfg.n_images]
    return {
        "score_images": ["score_images.py", *model, *short, "--out", str(out / "score_images"), *images],
        "cache_activations": [
            "cache_activations.py",
            *model,
            *data,
            "--mode",
            "rated",
            *short,
            "--overwrite",
            "--out",
            str(store),
        ],
        "logit_lens": [
            "logit_lens.py",
            "--store",
            str(store),
            "--model",
            ckpt,
            "--out",
            str(out / "logit_lens"),
        ],
        "attention_attribution": [
            "attention_attribution.py",
            "--store",
            str(store),
            "--out",
            str(out / "attention_attribution"),
        ],
        "tuned_lens": [
            "tuned_lens.py",
            "--store",
            str(store),
            "--model",
            ckpt,
            "--out",
            str(out / "tuned_lens"),
        ],
        "patch_image_tokens": [
            "patch_image_tokens.py",
            *model,
            *data,
            "--out",
            str(out / "patch_image_tokens"),
        ],
        "direct_logit_attribution": [
            "direct_logit_attribution.py",
            *model,
            *data,
            "--out",
            str(out / "direct_logit_attribution"),
        ],
        "attribution_patching": [
            "attribution_patching.py",
            *model,
            *data,
            "--out",
            str(out / "attribution_patching"),
        ],
        "instability": [
            "instability.py",
            *model,
            *data,
            "--n-answers",
            "2",
            "--seeds",
            "0",
            "--max-new-tokens",
            "8",
            "--out",
            str(out / "instability"),
        ],
        "evaluate_quality": ["evaluate_quality.py", *model, *data, "--out", str(out / "evaluate_quality")],
        "conversion_error": ["conversion_error.py", *model, *data, *short, "--out", str(out / "conversion_error")],
        "grounding": [
            "grounding.py",
            "--model",
            f"two-stage={paths['pair']}",
            "--dtype",
            cfg.dtype,
            "--device",
            cfg.device,
            *data,
            "--max-new-tokens",
            "8",
            "--out",
            str(out / "grounding"),
        ],
    }


def run_step(name: str, argv: list[str], cfg: Config) -> Step:
    """Run one study in its own process; its wall time, peak RSS (``wait4``) and peak GPU memory."""
    runs = Path(cfg.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    peak_file, log_file = runs / f"{name}.peak.json", runs / f"{name}.log"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "MECHBIQA_PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(REPO / "studies" / argv[0]), *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        status, usage = "timeout", None
        while time.perf_counter() - start < cfg.timeout:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(code)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
                break
            time.sleep(0.2)
        else:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
    seconds = time.perf_counter() - start
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports kilobytes
    gpu = json.loads(peak_file.read_text()).get("gpu_peak_bytes") if peak_file.is_file() else None
    tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-6:]) if status != "ok" else ""
    return Step(name, status, seconds, rss_gb, None if gpu is None else gpu / 1e9, tail)


def main(cfg: Config) -> Result:
    """Prepare the checkpoint and data, then run every study once."""
    paths = prepare(cfg)
    steps = commands(cfg, paths)
    unknown = set(cfg.only) - set(steps)
    if unknown:
        raise ValueError(f"--only names unknown studies {sorted(unknown)}; known: {sorted(steps)}")
    result = Result(path=Path(cfg.out) / f"{NAME}.json")
    for name, argv in steps.items():
        if cfg.only and name not in cfg.only:
            continue
        result.steps.append(run_step(name, argv, cfg))
        # the table so far, after every study: a stopped run still tells what it measured
        outputs.write_json(result.path, {"config": cfg, "steps": [vars(s) for s in result.steps]})
    return result


def render(result: Result, console: Any) -> None:
    """The table: study, status, seconds, peak memory."""
    from rich.table import Table

    table = Table(title="every study on a random checkpoint with the released 7B shapes")
    for column in ("study", "status", "seconds", "peak RSS GB", "peak GPU GB"):
        table.add_column(column, justify="left" if column in ("study", "status") else "right")
    for s in result.steps:
        table.add_row(
            s.name,
            s.status,
            f"{s.seconds:.1f}",
            f"{s.rss_gb:.1f}",
            "-" if s.gpu_gb is None else f"{s.gpu_gb:.1f}",
        )
    console.print(table)
    for s in result.steps:
        if s.tail:
            console.print(f"[red]{s.name}[/red]:\n{s.tail}")
    console.print(f"table: {result.path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
