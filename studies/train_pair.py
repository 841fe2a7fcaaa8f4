"""Train (or reuse) the one-stage and two-stage checkpoints, and measure both on held-out photos.

Question: does tuning in two stages (stage 1: image -> description of visual
attributes; stage 2: text only, description -> quality) give a quality answer
as good as one-stage tuning (image -> description and quality in one answer),
with the same total budget?

Method: build (or reuse) the built-in benchmark; train a small BPE tokenizer
on its training text; train the compact mPLUG-Owl2 from scratch in each mode
with `mechbiqa.train` (label-smoothed NLL on answer tokens, AdamW (0.9, 0.98),
warm-up + cosine); the two-stage pair gets stage budgets 2:1 and the
one-stage baseline the same total number of steps. Then, on the held-out test
photos, rate every image with `mechbiqa.pipeline` (one-stage: generate the
answer, read the level logits after its description; two-stage: stage 1
describes, stage 2 rates the description alone) and report SRCC/PLCC of the
Q-Align score against the label, level accuracy, and how often the generated
descriptions name the right distortion family.

Output (``--out``, default ``cache/compact``): ``one-stage/``,
``two-stage/stage1/``, ``two-stage/stage2/`` (checkpoint directories in the
original layout, each with ``mechbiqa.json``), ``tokenizer/`` and
``results.json`` (the numbers printed). Finished checkpoints trained with the
same settings are reused; an interrupted run resumes.

    python studies/train_pair.py                      # the compact pair, on CPU
    python studies/train_pair.py --model /models/mplug-owl2-llama2-7b --lora-rank 64 \\
        --device cuda --precision bf16 --dtype bfloat16 --batch-size 8 --grad-accum 4 \\
        --lr 2e-4 --total-steps 1500 --warmup-steps 50 --out cache/pair-7b
"""

from __future__ import annotations

import os

# Research-irrelevant but decisive on a shared CPU: OpenMP threads that spin while
# waiting burn the cores other processes need (we measured 10x slower steps on a loaded
# 2-core machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field, fields  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mechbiqa import cli, outputs  # noqa: E402
from mechbiqa import train as T  # noqa: E402
from mechbiqa.data import BenchmarkConfig, IQARecord, build_benchmark  # noqa: E402
from mechbiqa.data.annotations import read_annotations, split_holdout  # noqa: E402
from mechbiqa.data.loaders import load_dataset  # noqa: E402
from mechbiqa.metrics import srcc_difference  # noqa: E402
from mechbiqa.model.prompts import LEVEL_WORDS  # noqa: E402
from mechbiqa.pipeline import OneStageRater, TwoStageRater, match_description, read_info  # noqa: E402


@dataclass(frozen=True, slots=True)
class Config:
    """What to train and how to measure it.

    Attributes:
        out_dir: Where the checkpoints, tokenizer and ``results.json`` go (``--out``).
        benchmark_dir: The built-in benchmark (built there if absent); None: ``cache/benchmark`` when
            the benchmark config is the default one, else ``cache/benchmark-<size>px-<crops>c``.
        image_size: Benchmark image side and vision-tower input (compact model).
        crops_per_photo: Benchmark crops per reference photo (more crops, more content to generalise from).
        total_steps: One-stage steps; the two-stage pair splits the same total 2:1.
        batch_size: Examples per micro-batch.
        grad_accum: Micro-batches per step.
        lr: Peak learning rate.
        visual_lr_scale: Learning-rate multiplier of the vision tower and abstractor (compact runs; a
            real checkpoint trains at 1.0). At 0.1 the energy-bank initialisation (see
            ``mechbiqa.train.init_weights``) is refined rather than overwritten: held-out SRCC 0.63 vs 0.51
            at 1.0 (one-stage, 1,200 steps).
        warmup_steps: Warm-up steps (stage 2 uses a third of them).
        label_smoothing: Eq. 2's epsilon.
        vocab_size: Compact tokenizer size (BPE stops early once every word is one piece).
        seed: Seed of initialisation and data order.
        threads: torch CPU threads.
        eval_every: Steps between held-out evaluations during training.
        eval_samples: Validation images per evaluation.
        test_samples: Test images rated at the end (0: all).
        retrain: Train again from step 0 even when (finished or interrupted) checkpoints are there.
        checkpoint_every: Steps between resumable checkpoints (0: none by step count).
        checkpoint_seconds: Seconds between resumable checkpoints (0: none by time); a killed run
            resumes from the last one on the same loss curve.
        modes: Which checkpoints to train: ``one-stage``, ``two-stage`` or both.
        init_from: Start from this checkpoint (``--model``) instead of a compact model from scratch
            (real models).
        lora_rank: LoRA rank (real models; needs peft).
        device: ``auto``, ``cpu``, ``cuda``.
        precision: ``auto``, ``fp32``, ``bf16``, ``fp16``.
        param_dtype: Weight dtype (``--dtype``; ``bfloat16`` for 7B).
        qalign_json: Train on a Q-Align / Q-Pathway style JSON instead of the benchmark (as --annotations).
        qinstruct_json: Or a Q-Instruct conversation JSON (as --annotations).
        image_root: Folder the annotation files' image paths are relative to.
        annotations: Annotation files to train on instead of the benchmark, several at once: Q-Pathway /
            Q-Instruct reasoning that ends with a verdict (both modes), Q-Align verdicts (one-stage only);
            see ``mechbiqa.data.annotations``. 10% of the images every mode can use are the test set, 5%
            of the rest validation.
        scores_dataset: A rated dataset (``koniq10k``, ``kadid10k``, ...; ``mechbiqa.data.loaders``) whose MOS
            gives the level and score of annotation entries with the same image file name.
        scores_root: That dataset's folder.
        benchmark: Overrides of the benchmark config (tests pass a tiny one).
    """

    out_dir: Path = field(  # where the studies look for the pair
        default=Path(__file__).resolve().parents[1] / "cache" / "compact",
        metadata=cli.meta(flag="--out", aliases=("--out-dir",)),
    )
    benchmark_dir: Path | None = None
    image_size: int = 64
    crops_per_photo: int = 12
    total_steps: int = 1200
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    visual_lr_scale: float = 0.1
    warmup_steps: int = 30
    label_smoothing: float = 0.1
    vocab_size: int = 2048
    seed: int = 0
    threads: int = 2
    eval_every: int = 600
    eval_samples: int = 160
    test_samples: int = 960
    retrain: bool = False
    checkpoint_every: int = 100
    checkpoint_seconds: float = 600.0
    modes: tuple[Literal["one-stage", "two-stage"], ...] = ("one-stage", "two-stage")
    init_from: str | None = field(default=None, metadata=cli.meta(flag="--model", aliases=("--init-from",)))
    lora_rank: int | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    param_dtype: str = field(default="float32", metadata=cli.meta(flag="--dtype", aliases=("--param-dtype",)))
    qalign_json: Path | None = None
    qinstruct_json: Path | None = None
    image_root: Path | None = None
    annotations: tuple[str, ...] = ()
    scores_dataset: str | None = None
    scores_root: Path | None = None
    benchmark: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if not self.modes:
            raise ValueError("--modes: train one-stage and/or two-stage")
        if self.total_steps < 1 or self.grad_accum < 1:
            raise ValueError(
                f"--total-steps {self.total_steps}, --grad-accum {self.grad_accum}: pass at least 1 each"
            )
        if (self.qalign_json or self.qinstruct_json) and self.image_root is None:
            raise ValueError("--image-root is needed with --qalign-json / --qinstruct-json")

    @classmethod
    def tiny(cls, out_dir: Path) -> Config:
        """A seconds-long end-to-end run (tests): tiny benchmark, a few steps."""
        return cls(out_dir=out_dir / "pair", benchmark_dir=out_dir / "benchmark", image_size=28, total_steps=6,
                   batch_size=4, warmup_steps=1, vocab_size=400, eval_every=0, eval_samples=4, test_samples=6,
                   threads=1, benchmark={"photos": ("astronaut", "chelsea", "coffee", "rocket"), "crops_per_photo": 1,
                                         "distortions": ("gaussian_blur", "white_noise", "jpeg"),
                                         "split_fractions": (0.5, 0.25, 0.25)})

    def train_config(self, mode: str, stage: int | None, steps: int) -> T.TrainConfig:
        """The `TrainConfig` of one checkpoint."""
        warmup = self.warmup_steps if stage != 2 else max(1, self.warmup_steps // 3)
        return T.TrainConfig(
            mode=mode, stage=stage, steps=steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
            visual_lr_scale=self.visual_lr_scale if self.init_from is None else 1.0,
            warmup_steps=min(warmup, max(0, steps - 1)), label_smoothing=self.label_smoothing, seed=self.seed,
            eval_every=self.eval_every, eval_samples=self.eval_samples, device=self.device,
            checkpoint_every=self.checkpoint_every, checkpoint_seconds=self.checkpoint_seconds,
            precision=self.precision, param_dtype=self.param_dtype, lora_rank=self.lora_rank,
            init_from=self.init_from if stage != 2 else None, max_new_tokens=48 if self.init_from is None else 128,
            augment="dihedral" if self.init_from is None else "none", cache_images=self.init_from is None,
        )  # fmt: skip


@dataclass
class PairResult:
    """What the study found.

    Attributes:
        one_stage: Test metrics of the one-stage checkpoint (srcc, plcc, level_acc, family_rate, ...).
        two_stage: Test metrics of the chained pair, plus the stage-1 description metrics.
        train_seconds: Wall time of each training run (``one-stage``, ``stage1``, ``stage2``).
        eval_seconds: Wall time of each test evaluation.
        paths: Where the checkpoints are.
        config: The study config.
        comparison: Two-stage minus one-stage test SRCC on the same images, with a paired bootstrap 95%
            interval (``srcc_two_minus_one``, ``ci95``, ``n``); None unless both were rated.
    """

    one_stage: dict[str, Any] | None
    two_stage: dict[str, Any] | None
    train_seconds: dict[str, float]
    eval_seconds: dict[str, float]
    paths: dict[str, str]
    config: dict[str, Any]
    comparison: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return asdict(self)


# ------------------------------------------------------------------------------------------------ data
def _records(cfg: Config) -> tuple[dict[str, list[IQARecord]], dict[str, list[IQARecord]], list[IQARecord],
                                   dict[str, Any]]:
    """Training and validation records of each mode, the test records, and a description of the data.

    Annotation files are read and checked for every requested mode before anything trains: the entries a
    mode cannot use are counted and named (file, index, reason) in a warning and in ``mechbiqa.json``, and
    a mode no file can serve (two-stage on Q-Align verdicts) is refused here. Validation is a split of the
    training images; the test images are held out from both and rated by every mode.
    """
    files = [Path(p) for p in (*cfg.annotations, cfg.qalign_json, cfg.qinstruct_json) if p]
    if files:
        if cfg.image_root is None:
            raise ValueError("--image-root is needed with --annotations (the folder the entries' images are in)")
        scores = None
        if cfg.scores_dataset:
            if cfg.scores_root is None:
                raise ValueError("--scores-dataset needs --scores-root (the dataset's folder)")
            scores = load_dataset(cfg.scores_dataset, cfg.scores_root)
        found = read_annotations(files, cfg.image_root, scores=scores)
        usable, rejected = {}, {}
        for mode in cfg.modes:
            usable[mode], rejected[mode] = found.for_mode(mode)
        def key(r: IQARecord) -> tuple[str, int]:
            return r.meta["source"], r.meta["index"]

        ok = {m: {key(r) for r in usable[m]} for m in cfg.modes}
        everything = [r for r in found.records if any(key(r) in ok[m] for m in cfg.modes)]
        # The test images are drawn from those every mode can use, so both rate the same images.
        common = [r for r in everything if all(key(r) in ok[m] for m in cfg.modes)]
        test = split_holdout(common, seed=cfg.seed, val_fraction=0)[2]
        held = {r.image_path for r in test}
        train, val, _ = split_holdout([r for r in everything if r.image_path not in held], seed=cfg.seed,
                                      test_fraction=0, max_val=cfg.eval_samples or None)
        trains = {m: [r for r in train if key(r) in ok[m]] for m in cfg.modes}
        vals = {m: [r for r in val if key(r) in ok[m]] for m in cfg.modes}
        for mode, bad in rejected.items():
            if bad:
                shown = "; ".join(str(b) for b in bad[:5])
                warnings.warn(f"{len(bad)} of {len(found.records) + len(found.rejected)} annotation entries cannot "
                              f"train {mode} and are left out: {shown}{' ...' if len(bad) > 5 else ''} (all of "
                              "them are listed in each checkpoint's mechbiqa.json)", AnnotationWarning, stacklevel=2)
        info = {"data": {"annotations": [str(f) for f in files], "image_root": str(cfg.image_root),
                         "n": {m: {"train": len(trains[m]), "val": len(vals[m])} for m in cfg.modes},
                         "n_test": len(test),
                         "rejected": {m: [str(b) for b in bad] for m, bad in rejected.items()}}}
        return trains, vals, test, info
    bench_cfg = BenchmarkConfig(**{"image_size": cfg.image_size, "crops_per_photo": cfg.crops_per_photo,
                                   **cfg.benchmark})
    root = cfg.benchmark_dir
    if root is None:
        cache = Path(__file__).resolve().parents[1] / "cache"
        # The default benchmark directory holds the default build; another config gets its own.
        default = bench_cfg == BenchmarkConfig()
        root = cache / ("benchmark" if default else f"benchmark-{bench_cfg.image_size}px-{bench_cfg.crops_per_photo}c")
    bench = build_benchmark(bench_cfg, root)
    info = {"data": {"benchmark": str(root), "fingerprint": bench.fingerprint}}
    modes = ("one-stage", "two-stage")
    return ({m: bench.split("train") for m in modes}, {m: bench.split("val") for m in modes}, bench.split("test"),
            info)


class AnnotationWarning(UserWarning):
    """Annotation entries that a requested mode cannot train on (named in the message)."""


def _tokenizer(cfg: Config, train: list[IQARecord]):
    if cfg.init_from is not None:
        return None
    # Written atomically; a half-written one (an older version killed mid-write) is rewritten, unless
    # checkpoints trained with it are there (then the error names the directory).
    in_use = any((cfg.out_dir / name).exists() for name in ("one-stage", "two-stage"))
    return T.read_or_write_tokenizer(cfg.out_dir / "tokenizer", lambda: T.compact_tokenizer(train, cfg.vocab_size),
                                     rewrite=cfg.retrain, in_use=in_use and not cfg.retrain)


def _finished(path: Path, tc: T.TrainConfig) -> bool:
    """Whether ``path`` holds a finished checkpoint trained with ``tc`` (studies/replicate.py asks)."""
    try:
        info = read_info(path)
    except FileNotFoundError:
        return False
    return bool(info.data.get("finished")) and info.data.get("train_config") == tc.to_dict()


# ------------------------------------------------------------------------------------------------ evaluation
def _test_metrics(ratings, records: list[IQARecord], descriptions: list[str]) -> dict[str, Any]:
    from mechbiqa.data import DISTORTIONS
    from mechbiqa.metrics import iqa_metrics

    scores = np.array([r.score for r in ratings])
    # An annotation entry without a MOS is labelled by its level word (excellent 1 ... bad 0).
    mos = np.array([x.mos01 if x.mos01 is not None else 1 - LEVEL_WORDS.index(x.level_word) / 4 for x in records])
    m = iqa_metrics(scores, mos, on_invalid="flag")
    out: dict[str, Any] = {"n": len(records), "srcc": m.srcc, "plcc": m.plcc_raw, "plcc_fitted": m.plcc_fitted,
                           "krcc": m.krcc, "level_acc": float(np.mean([r.level == x.level_word
                                                                         for r, x in zip(ratings, records)]))}
    if all(x.distortion for x in records):
        fam = [match_description(d).family == ("pristine" if x.distortion == "pristine"
                                               else DISTORTIONS[x.distortion].group)
               for d, x in zip(descriptions, records)]
        distorted = [f for f, x in zip(fam, records) if x.distortion != "pristine"]
        out["family_rate"] = float(np.mean(fam))
        out["family_rate_distorted"] = float(np.mean(distorted)) if distorted else float("nan")
    out["examples"] = [{"id": x.id, "label": x.level_word, "description": d, "rated": r.level}
                       for d, x, r in list(zip(descriptions, records, ratings))[:6]]
    out["ids"] = [x.id for x in records]
    out["scores"] = scores.tolist()
    out["labels"] = mos.tolist()
    return out


def _pick(records: list[IQARecord], n: int) -> list[IQARecord]:
    if not n or n >= len(records):
        return records
    return [records[i] for i in sorted(np.random.default_rng(1).choice(len(records), n, replace=False))]


# ------------------------------------------------------------------------------------------------ main
def main(cfg: Config, progress=None) -> PairResult:
    """Train (or resume, or reuse) both checkpoints, rate the test photos with each, write ``results.json``.

    Under ``accelerate launch`` / ``torchrun`` every process trains its share of each batch; the main
    process alone prepares the data and tokenizer (the others wait, then read them), rates the test
    photos and writes ``results.json``.
    """
    torch.set_num_threads(cfg.threads)
    with T.main_process_first():
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        trains, vals, test, data_info = _records(cfg)
        tokenizer = _tokenizer(cfg, list({id(r): r for m in cfg.modes for r in trains[m]}.values()))
    rates = T.is_main_process()
    test = _pick(test, cfg.test_samples)
    train_seconds: dict[str, float] = {}
    eval_seconds: dict[str, float] = {}
    paths: dict[str, str] = {}

    def model():
        return None if tokenizer is None else T.build_compact_model(tokenizer, cfg.image_size, cfg.seed)

    # T.train resumes an interrupted run and returns a finished one as it is (same settings);
    # --retrain starts again from step 0.
    one_result = two_result = None
    if "one-stage" in cfg.modes:
        path = cfg.out_dir / "one-stage"
        tc = cfg.train_config("one-stage", None, cfg.total_steps)
        done = T.train(tc, path, T.examples_from_records(trains["one-stage"], "one-stage"),
                       T.examples_from_records(vals["one-stage"], "one-stage"), model=model(),
                       tokenizer=tokenizer, progress=progress, extra_info=data_info, fresh=cfg.retrain)
        train_seconds["one-stage"] = done.elapsed
        paths["one-stage"] = str(path)
        if rates:
            start = time.perf_counter()
            ratings = OneStageRater.from_pretrained(path).rate([r.image_path for r in test])
            one_result = _test_metrics(ratings, test, [r.description for r in ratings])
            eval_seconds["one-stage"] = time.perf_counter() - start

    if "two-stage" in cfg.modes:
        parent = cfg.out_dir / "two-stage"
        steps1, steps2 = T.split_budget(cfg.total_steps)
        tc1, tc2 = cfg.train_config("two-stage", 1, steps1), cfg.train_config("two-stage", 2, steps2)
        first, second = T.train_two_stage(tc1, tc2, parent, trains["two-stage"], vals["two-stage"], model=model(),
                                          tokenizer=tokenizer, progress=progress, extra_info=data_info,
                                          fresh=cfg.retrain)
        train_seconds["stage1"], train_seconds["stage2"] = first.elapsed, second.elapsed
        train_seconds["two-stage"] = first.elapsed + second.elapsed
        paths["two-stage"] = str(parent)
        if rates:
            start = time.perf_counter()
            rater = TwoStageRater.from_pretrained(parent)
            descriptions = rater.describe([r.image_path for r in test])
            ratings = rater.rate_descriptions(descriptions)
            two_result = _test_metrics(ratings, test, descriptions)
            eval_seconds["two-stage"] = time.perf_counter() - start

    comparison = None
    if one_result is not None and two_result is not None:
        diff, low, high = srcc_difference(one_result["scores"], two_result["scores"], one_result["labels"])
        comparison = {"srcc_two_minus_one": diff, "ci95": [low, high], "n": len(test)}
    result = PairResult(one_stage=one_result, two_stage=two_result, train_seconds=train_seconds,
                        eval_seconds=eval_seconds, paths=paths, config=_jsonable(asdict(cfg)), comparison=comparison)
    if rates:
        outputs.write_json(cfg.out_dir / "results.json", result.to_dict(), indent=2)
    return result


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return outputs.jsonable(d)


# ------------------------------------------------------------------------------------------------ display
class Display:
    """A rich progress display of the training runs (the only printing of this study)."""

    def __init__(self) -> None:  # noqa: D107
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console)
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: T.TrainEvent) -> None:  # noqa: D102
        if event.kind == "start":
            if not self.progress.live.is_started:
                self.progress.start()
            self.tasks[event.label] = self.progress.add_task(event.label, total=event.steps, completed=event.step,
                                                             status="")
        task = self.tasks.get(event.label)
        if task is None:
            return
        if event.kind == "step":
            self.progress.update(task, completed=event.step,
                                 status=f"loss {event.loss:.3f}  lr {event.lr:.1e}  |g| {event.grad_norm:.2f}")
        elif event.kind == "eval" and event.metrics:
            m = event.metrics
            shown = "  ".join(f"{k} {m[k]:.3f}" for k in ("loss", "srcc", "level_acc", "family_rate") if k in m)
            self.progress.console.print(f"[bold]{event.label}[/] step {event.step}: {shown}")
        elif event.kind == "done":
            self.progress.update(task, completed=event.step)

    def stop(self) -> None:  # noqa: D102
        if self.progress.live.is_started:
            self.progress.stop()

    def report(self, result: PairResult) -> None:
        """The final table."""
        render(result, self.console)


def render(result: PairResult, console: Any) -> None:
    """The final table: test metrics of each checkpoint, the SRCC difference, example descriptions."""
    from rich.table import Table

    table = Table(title="held-out test photos (Q-Align score vs label)")
    for column in ("checkpoint", "train s", "eval s", "SRCC", "PLCC", "level acc", "family named"):
        table.add_column(column, justify="right" if column != "checkpoint" else "left")
    for name, metrics in (("one-stage", result.one_stage), ("two-stage", result.two_stage)):
        if metrics is None:
            continue
        seconds = result.train_seconds.get(name, float("nan"))
        table.add_row(name, f"{seconds:.0f}", f"{result.eval_seconds.get(name, float('nan')):.0f}",
                      f"{metrics['srcc']:.3f}", f"{metrics['plcc']:.3f}", f"{metrics['level_acc']:.3f}",
                      f"{metrics.get('family_rate', float('nan')):.3f}")
    console.print(table)
    if result.comparison:
        c = result.comparison
        console.print(f"two-stage minus one-stage SRCC: {c['srcc_two_minus_one']:+.3f}, paired bootstrap 95% "
                      f"interval [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] over {c['n']} test images")
    if "stage1" in result.train_seconds:
        console.print(f"two-stage: stage 1 {result.train_seconds['stage1']:.0f} s, "
                      f"stage 2 {result.train_seconds['stage2']:.0f} s")
    for name, metrics in (("one-stage", result.one_stage), ("two-stage", result.two_stage)):
        for ex in (metrics or {}).get("examples", [])[:3]:
            console.print(f"[dim]{name} {ex['id']} ({ex['label']} -> {ex['rated']}): {ex['description']}[/]")
    console.print(f"results: {Path(result.config['out_dir']) / 'results.json'}")


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


def main_with_display(cfg: Config) -> PairResult:
    """`main` with a rich progress display of the training runs."""
    display = Display()
    try:
        return main(cfg, progress=display)
    finally:
        display.stop()


if __name__ == "__main__":
    cli.run(main_with_display, Config, render)
