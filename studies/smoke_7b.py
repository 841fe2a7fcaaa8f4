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
last lines and the table marks it. The costly sweeps are cut to what shows that they
run: patching and the activation-patching check at the last two layers (a patch at
layer l recomputes layers l to 31 only), the tuned lens for 20 steps, 8 new tokens.

Output: a table of study, status, seconds, peak RSS (GB), peak GPU (GB); ``smoke_7b.json``
in ``--out``. This is what to run first on a new GPU machine::

    python studies/smoke_7b.py --device cuda --dtype bfloat16
    python studies/smoke_7b.py --tokenizer /models/one-align/tokenizer.model --only score_images logit_lens

Not part of the test suite (16 GB on disk, minutes per study on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechbiqa import cli, outputs
from mechbiqa.benchmarking import Step, run_measured, shared_weights_pair
from mechbiqa.model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
NAME = "smoke_7b"


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
    """The checkpoint, a two-stage pair of it, a KonIQ-shaped data set, an annotation file (reused)."""
    from mechbiqa.data.synthetic import write_koniq_like, write_qpathway_like
    from mechbiqa.model.synthetic import write_random_checkpoint

    out = Path(cfg.out)
    ckpt = write_random_checkpoint(out / "checkpoint", ModelConfig.llama2_7b(), _tokenizer(cfg))
    return {
        "checkpoint": ckpt,
        "pair": shared_weights_pair(ckpt, out / "pair"),
        "koniq": write_koniq_like(out / "koniq10k", cfg.n_images),
        "annotations": write_qpathway_like(out / "q_pathway.json", cfg.n_images),
    }


def commands(cfg: Config, paths: dict[str, Path]) -> dict[str, list[str]]:
    """Each study's command line, with the common options; the store feeds the offline studies."""
    out = Path(cfg.out) / "runs"
    ckpt = str(paths["checkpoint"])
    device = ["--dtype", cfg.dtype, "--device", cfg.device]
    model = ["--model", ckpt, *device]
    data = ["--dataset", f"koniq10k={paths['koniq']}", "--split", "all", "--limit", str(cfg.n_images)]
    store = out / "rated.h5"
    images = sorted(str(p) for p in (paths["koniq"] / "1024x768").iterdir())[: cfg.n_images]
    short = ["--max-new-tokens", "8"]  # descriptions: the pipeline is under test, not their length
    depth = ModelConfig.llama2_7b().llm.n_layers
    late = [str(depth - 2), str(depth - 1)]
    args = {
        "score_images": [*model, *short],
        "cache_activations": [*model, *data, "--mode", "rated", *short, "--overwrite"],
        "logit_lens": ["--store", str(store), "--model", ckpt],
        "attention_attribution": ["--store", str(store)],
        "tuned_lens": ["--store", str(store), "--model", ckpt, "--steps", "20"],
        # a patch at layer l recomputes layers l..31 only: the last layers keep the sweep to minutes on a CPU
        "patch_image_tokens": [*model, *data, "--layers", *late, "--sites", "resid", "kv",
                               "--setters", "zero"],
        "direct_logit_attribution": [*model, *data],
        "attribution_patching": [*model, *data, "--validate-layers", *late],
        "instability": [*model, *data, "--n-answers", "2", "--seeds", "0", *short],
        "evaluate_quality": [*model, *data],
        "conversion_error": [*model, *data, *short],
        "grounding": ["--model", f"two-stage={paths['pair']}", *device, *data, *short],
    }
    outs = {name: str(out / name) for name in args} | {"cache_activations": str(store)}
    extra = {"score_images": images}
    return {name: [f"{name}.py", *a, "--out", outs[name], *extra.get(name, [])] for name, a in args.items()}


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
        script = REPO / "studies" / argv[0]
        result.steps.append(run_measured(name, script, argv[1:], Path(cfg.out) / "runs", cfg.timeout))
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
