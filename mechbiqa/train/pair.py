"""The one-stage / two-stage pair: train (or resume, or reuse) each checkpoint, rate the held-out test images.

How it connects: `PairConfig` is the study's configuration (``studies/train_pair.py``
derives its command line from it, `mechbiqa.cli`); `pair_data` reads the training,
validation and test records (the built-in benchmark of `mechbiqa.data`, or annotation files
read by `mechbiqa.data.annotations`) and the compact tokenizer; each entry of `TRAINERS`
trains one checkpoint with `mechbiqa.train.train` / `train_two_stage` and rates the test
images with its `mechbiqa.pipeline` rater; `train_pair` runs the requested entries,
compares them (paired bootstrap of the SRCC difference, `mechbiqa.metrics.srcc_difference`)
and writes ``results.json``; `train_or_reuse` reads that file back when the finished
checkpoints and the same settings are there (``studies/replicate.py``). Nothing here prints.

``results.json`` holds one entry per checkpoint under its mode's key with ``_`` for ``-``
(``one_stage``, ``two_stage``: the test metrics, or null when not trained), then
``train_seconds``, ``eval_seconds``, ``paths`` (mode -> directory), ``config`` and
``comparison``. Another checkpoint joins by a `Trainer` in `TRAINERS` under its mode name
(its training, its rating, and how to tell that it is finished); `PairResult` keeps any
entry it is given.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mechbiqa import cli, outputs
from mechbiqa.data import BenchmarkConfig, IQARecord, build_benchmark
from mechbiqa.data.annotations import AnnotationError, read_annotations, split_holdout
from mechbiqa.data.loaders import load_dataset
from mechbiqa.metrics import srcc_difference
from mechbiqa.model.prompts import LEVEL_WORDS, TEMPLATES
from mechbiqa.pipeline import OneStageRater, TwoStageRater, match_description, read_info
from mechbiqa.sources import COMPACT, DEFAULT_BENCHMARK
from mechbiqa.train.checkpoint import read_or_write_tokenizer
from mechbiqa.train.config import TrainConfig, split_budget
from mechbiqa.train.data import examples_from_records
from mechbiqa.train.distributed import is_main_process, main_process_first
from mechbiqa.train.init import build_compact_model, compact_tokenizer
from mechbiqa.train.loop import TrainEvent, train, train_two_stage
from mechbiqa.train.side_by_side import Job, run_side_by_side, worth_it

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.model.tokenizer import Tokenizer

__all__ = ["PairConfig", "PairData", "PairResult", "add_entries", "Trained", "Trainer", "TRAINERS", "AnnotationWarning",
           "pair_data", "is_finished", "rating_metrics", "pick_test", "train_pair", "read_results",
           "train_or_reuse", "entry_key"]

Progress = Callable[[TrainEvent], None]

METRIC_NAMES = ("srcc", "plcc", "plcc_fitted", "krcc", "level_acc", "family_rate", "family_rate_distorted")
"""Metrics of an entry that are NaN when undefined (written as null in strict JSON)."""


@dataclass(frozen=True, slots=True)
class PairConfig:
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
        template: Conversation template of the training prompts; None: ``mplug_owl2`` for the compact
            model (the inference template: no system sentence, so ~35 fewer tokens per example and ~25%
            less compute per step), ``v1`` for a released checkpoint (its own training recipe).
        parallel: On a CPU, train the requested checkpoints side by side, one process each with an equal
            share of ``threads`` (`mechbiqa.train.side_by_side`: a compact step uses two threads poorly, so the
            pair ends sooner); ``--no-parallel``: one after the other with every thread. A GPU run or one
            launched as several processes trains them one after the other.
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
        default=COMPACT,
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
    test_samples: int = 480
    retrain: bool = False
    checkpoint_every: int = 100
    checkpoint_seconds: float = 600.0
    modes: tuple[Literal["one-stage", "two-stage"], ...] = ("one-stage", "two-stage")
    init_from: str | None = field(default=None, metadata=cli.meta(flag="--model", aliases=("--init-from",)))
    lora_rank: int | None = None
    template: str | None = None
    parallel: bool = True
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
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(f"--template {self.template}: unknown; choose from {', '.join(sorted(TEMPLATES))}")

    @classmethod
    def tiny(cls, out_dir: Path) -> PairConfig:
        """A seconds-long end-to-end run (tests): tiny benchmark, a few steps."""
        return cls(out_dir=out_dir / "pair", benchmark_dir=out_dir / "benchmark", image_size=28, total_steps=6,
                   batch_size=4, warmup_steps=1, vocab_size=400, eval_every=0, eval_samples=4, test_samples=6,
                   threads=1, benchmark={"photos": ("astronaut", "chelsea", "coffee", "rocket"), "crops_per_photo": 1,
                                         "distortions": ("gaussian_blur", "white_noise", "jpeg"),
                                         "split_fractions": (0.5, 0.25, 0.25)})

    def train_config(self, mode: str, stage: int | None, steps: int) -> TrainConfig:
        """The `TrainConfig` of one checkpoint."""
        warmup = self.warmup_steps if stage != 2 else max(1, self.warmup_steps // 3)
        return TrainConfig(
            mode=mode, stage=stage, steps=steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
            visual_lr_scale=self.visual_lr_scale if self.init_from is None else 1.0,
            warmup_steps=min(warmup, max(0, steps - 1)), label_smoothing=self.label_smoothing, seed=self.seed,
            eval_every=self.eval_every, eval_samples=self.eval_samples, device=self.device,
            checkpoint_every=self.checkpoint_every, checkpoint_seconds=self.checkpoint_seconds,
            precision=self.precision, param_dtype=self.param_dtype, lora_rank=self.lora_rank,
            init_from=self.init_from if stage != 2 else None, max_new_tokens=48 if self.init_from is None else 128,
            augment="dihedral" if self.init_from is None else "none", cache_images=self.init_from is None,
            template=self.template or ("mplug_owl2" if self.init_from is None else "v1"),
        )  # fmt: skip


class AnnotationWarning(UserWarning):
    """Annotation entries that a requested mode cannot train on (named in the message)."""


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class PairData:
    """What every checkpoint of a run trains and is measured on.

    Attributes:
        train: Mode -> training records.
        val: Mode -> validation records.
        test: The held-out test records (all of them; `pick_test` chooses the rated ones).
        info: A description of the data (``{"data": ...}``), written into each checkpoint's ``mechbiqa.json``.
        tokenizer: The compact tokenizer (None when training starts from ``init_from``).
        image_size: The compact model's image side.
        seed: Seed of the compact model's initialisation.
    """

    train: dict[str, list[IQARecord]]
    val: dict[str, list[IQARecord]]
    test: list[IQARecord]
    info: dict[str, Any]
    tokenizer: Tokenizer | None
    image_size: int = 64
    seed: int = 0

    def model(self) -> MPLUGOwl2 | None:
        """A fresh compact model for the tokenizer (None when training starts from a checkpoint)."""
        return None if self.tokenizer is None else build_compact_model(self.tokenizer, self.image_size, self.seed)


def _records(cfg: PairConfig) -> tuple[dict[str, list[IQARecord]], dict[str, list[IQARecord]], list[IQARecord],
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
        if not test:  # refused now, not after training, when the rating finds nothing to rate
            n = len({r.image_path for r in common})
            raise AnnotationError(
                f"{', '.join(str(f) for f in files)}: {n} image(s) usable by every requested mode "
                f"({', '.join(cfg.modes)}), too few to hold one out as the test set: give at least 3")
        held = {r.image_path for r in test}
        train_, val, _ = split_holdout([r for r in everything if r.image_path not in held], seed=cfg.seed,
                                       test_fraction=0, max_val=cfg.eval_samples or None)
        trains = {m: [r for r in train_ if key(r) in ok[m]] for m in cfg.modes}
        vals = {m: [r for r in val if key(r) in ok[m]] for m in cfg.modes}
        for mode, bad in rejected.items():
            if bad:
                shown = "; ".join(str(b) for b in bad[:5])
                warnings.warn(f"{len(bad)} of {len(found.records) + len(found.rejected)} annotation entries cannot "
                              f"train {mode} and are left out: {shown}{' ...' if len(bad) > 5 else ''} (all of "
                              "them are listed in each checkpoint's mechbiqa.json)", AnnotationWarning, stacklevel=3)
        info = {"data": {"annotations": [str(f) for f in files], "image_root": str(cfg.image_root),
                         "n": {m: {"train": len(trains[m]), "val": len(vals[m])} for m in cfg.modes},
                         "n_test": len(test),
                         "rejected": {m: [str(b) for b in bad] for m, bad in rejected.items()}}}
        return trains, vals, test, info
    bench_cfg = BenchmarkConfig(**{"image_size": cfg.image_size, "crops_per_photo": cfg.crops_per_photo,
                                   **cfg.benchmark})
    root = cfg.benchmark_dir
    if root is None:
        # The default benchmark directory holds the default build; another config gets its own.
        default = bench_cfg == BenchmarkConfig()
        root = DEFAULT_BENCHMARK if default else DEFAULT_BENCHMARK.with_name(
            f"benchmark-{bench_cfg.image_size}px-{bench_cfg.crops_per_photo}c")
    bench = build_benchmark(bench_cfg, root, workers=cfg.threads)  # photos rendered side by side
    info = {"data": {"benchmark": str(root), "fingerprint": bench.fingerprint}}
    return ({m: bench.split("train") for m in cfg.modes}, {m: bench.split("val") for m in cfg.modes},
            bench.split("test"), info)


def pair_data(cfg: PairConfig) -> PairData:
    """The records of every requested mode and the compact tokenizer, checked before anything trains.

    The tokenizer is trained on the training text of every mode and written atomically to
    ``<out_dir>/tokenizer``; a half-written one (an older version killed mid-write) is rewritten, unless
    checkpoints trained with it are there (then the error names the directory).

    Raises:
        AnnotationError: A requested mode that no annotation file can serve.
        ValueError: Annotation files without ``image_root``, a scores data set without its folder.
    """
    trains, vals, test, info = _records(cfg)
    tokenizer = None
    if cfg.init_from is None:
        text = list({id(r): r for m in cfg.modes for r in trains[m]}.values())
        in_use = any((cfg.out_dir / mode).exists() for mode in TRAINERS)
        tokenizer = read_or_write_tokenizer(cfg.out_dir / "tokenizer",
                                            lambda: compact_tokenizer(text, cfg.vocab_size),
                                            rewrite=cfg.retrain, in_use=in_use and not cfg.retrain)
    return PairData(trains, vals, test, info, tokenizer, cfg.image_size, cfg.seed)


def pick_test(records: Sequence[IQARecord], n: int) -> list[IQARecord]:
    """``n`` test records drawn at random with a fixed seed (all of them when ``n`` is 0 or too many)."""
    if not n or n >= len(records):
        return list(records)
    return [records[i] for i in sorted(np.random.default_rng(1).choice(len(records), n, replace=False))]


def is_finished(path: Path, tc: TrainConfig) -> bool:
    """Whether ``path`` holds a finished checkpoint trained with ``tc``."""
    try:
        info = read_info(path)
    except FileNotFoundError:
        return False
    return bool(info.data.get("finished")) and info.data.get("train_config") == tc.to_dict()


# ------------------------------------------------------------------------------------------------ evaluation
def rating_metrics(ratings: Sequence[Any], records: Sequence[IQARecord], descriptions: Sequence[str]
                 ) -> dict[str, Any]:
    """Test metrics of one checkpoint's ratings (Q-Align score vs label) and descriptions.

    Args:
        ratings: One `mechbiqa.pipeline.Rating` per record (``score``, ``level``).
        records: The rated records.
        descriptions: The descriptions the ratings read (for the distortion-family rate).

    Returns:
        ``n``, ``srcc``, ``plcc`` (raw), ``plcc_fitted``, ``krcc``, ``level_acc``, on the benchmark
        ``family_rate`` and ``family_rate_distorted``, six ``examples``, and the ``ids``, ``scores``
        and ``labels`` the comparison reads.
    """
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


# ------------------------------------------------------------------------------------------------ trainers
@dataclass(frozen=True)
class Trained:
    """One checkpoint after training.

    Attributes:
        path: Its directory (a pair's parent folder).
        seconds: Training wall time by name (``one-stage``; ``stage1``, ``stage2``, ``two-stage``).
    """

    path: Path
    seconds: dict[str, float]


@dataclass(frozen=True)
class Trainer:
    """How one entry of ``results.json`` is made.

    Attributes:
        train: ``(cfg, data, progress) -> Trained``: train (or resume, or return as it is) the checkpoint
            in its folder under ``cfg.out_dir``.
        rate: ``(path, records) -> (ratings, descriptions)``: rate the test records with the trained
            checkpoint; the descriptions are those the ratings read.
        finished: ``cfg -> bool``: whether the checkpoint is there, finished, with ``cfg``'s settings.
    """

    train: Callable[[PairConfig, PairData, Progress | None], Trained]
    rate: Callable[[Path, list[IQARecord]], tuple[list[Any], list[str]]]
    finished: Callable[[PairConfig], bool]


def _train_one_stage(cfg: PairConfig, data: PairData, progress: Progress | None) -> Trained:
    # `train` resumes an interrupted run and returns a finished one as it is (same settings);
    # --retrain starts again from step 0.
    path = cfg.out_dir / "one-stage"
    done = train(cfg.train_config("one-stage", None, cfg.total_steps), path,
                 examples_from_records(data.train["one-stage"], "one-stage"),
                 examples_from_records(data.val["one-stage"], "one-stage"), model=data.model(),
                 tokenizer=data.tokenizer, progress=progress, extra_info=data.info, fresh=cfg.retrain)
    return Trained(path, {"one-stage": done.elapsed})


def _rate_one_stage(path: Path, records: list[IQARecord]) -> tuple[list[Any], list[str]]:
    ratings = OneStageRater.from_pretrained(path).rate([r.image_path for r in records])
    return ratings, [r.description for r in ratings]


def _two_stage_configs(cfg: PairConfig) -> tuple[TrainConfig, TrainConfig]:
    steps1, steps2 = split_budget(cfg.total_steps)
    return cfg.train_config("two-stage", 1, steps1), cfg.train_config("two-stage", 2, steps2)


def _train_two_stage(cfg: PairConfig, data: PairData, progress: Progress | None) -> Trained:
    parent = cfg.out_dir / "two-stage"
    first, second = train_two_stage(*_two_stage_configs(cfg), parent, data.train["two-stage"],
                                    data.val["two-stage"], model=data.model(), tokenizer=data.tokenizer,
                                    progress=progress, extra_info=data.info, fresh=cfg.retrain)
    return Trained(parent, {"stage1": first.elapsed, "stage2": second.elapsed,
                            "two-stage": first.elapsed + second.elapsed})


def _rate_two_stage(path: Path, records: list[IQARecord]) -> tuple[list[Any], list[str]]:
    rater = TwoStageRater.from_pretrained(path)
    descriptions = rater.describe([r.image_path for r in records])
    return rater.rate_descriptions(descriptions), descriptions


def _two_stage_finished(cfg: PairConfig) -> bool:
    tc1, tc2 = _two_stage_configs(cfg)
    parent = cfg.out_dir / "two-stage"  # stage 2 starts from stage 1 (`train_two_stage` sets its init_from)
    return (is_finished(parent / "stage1", tc1)
            and is_finished(parent / "stage2", tc2.replace(init_from=str(parent / "stage1"))))


def _one_stage_finished(cfg: PairConfig) -> bool:
    return is_finished(cfg.out_dir / "one-stage", cfg.train_config("one-stage", None, cfg.total_steps))


TRAINERS: dict[str, Trainer] = {
    "one-stage": Trainer(_train_one_stage, _rate_one_stage, _one_stage_finished),
    "two-stage": Trainer(_train_two_stage, _rate_two_stage, _two_stage_finished),
}
"""Mode -> its `Trainer`, in training order (a checkpoint trained from another's comes after it)."""


def entry_key(mode: str) -> str:
    """The key of a mode's entry in ``results.json`` (``one-stage`` -> ``one_stage``)."""
    return mode.replace("-", "_")


# ------------------------------------------------------------------------------------------------ results
_FIXED = ("train_seconds", "eval_seconds", "paths", "config", "comparison")


@dataclass
class PairResult:
    """What a run of the pair found (``results.json``).

    Attributes:
        entries: Entry key (`entry_key`: ``one_stage``, ``two_stage``, ...) -> test metrics of that
            checkpoint (`rating_metrics`; a pair's are those of the chained stages), None where it was
            not trained or not rated.
        train_seconds: Wall time of each training run (``one-stage``, ``stage1``, ``stage2``, ``two-stage``).
        eval_seconds: Wall time of each test evaluation, by mode.
        paths: Mode -> checkpoint directory.
        config: The run's config (JSON-ready).
        comparison: Two-stage minus one-stage test SRCC on the same images, with a paired bootstrap 95%
            interval (``srcc_two_minus_one``, ``ci95``, ``n``); None unless both were rated.
    """

    entries: dict[str, dict[str, Any] | None]
    train_seconds: dict[str, float]
    eval_seconds: dict[str, float]
    paths: dict[str, str]
    config: dict[str, Any]
    comparison: dict[str, Any] | None = None

    @property
    def one_stage(self) -> dict[str, Any] | None:
        """Test metrics of the one-stage checkpoint."""
        return self.entries.get("one_stage")

    @property
    def two_stage(self) -> dict[str, Any] | None:
        """Test metrics of the chained two-stage pair."""
        return self.entries.get("two_stage")

    def entry(self, mode: str) -> dict[str, Any] | None:
        """Test metrics of a mode's checkpoint (None when absent)."""
        return self.entries.get(entry_key(mode))

    def to_dict(self) -> dict[str, Any]:
        """The ``results.json`` layout: each entry under its key, then the fixed fields."""
        return {**self.entries, **{name: getattr(self, name) for name in _FIXED}}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> PairResult:
        """Read ``results.json`` back; metrics written as null (NaN in strict JSON) come back as NaN."""
        entries = {k: v for k, v in saved.items() if k not in _FIXED}
        for metrics in entries.values():
            for name in METRIC_NAMES:
                if metrics and name in metrics and metrics[name] is None:
                    metrics[name] = float("nan")
        comparison = saved.get("comparison")
        if comparison and comparison.get("ci95"):
            comparison["ci95"] = [float("nan") if v is None else v for v in comparison["ci95"]]
        return cls(entries=entries, train_seconds=saved.get("train_seconds", {}),
                   eval_seconds=saved.get("eval_seconds", {}), paths=saved.get("paths", {}),
                   config=saved.get("config", {}), comparison=comparison)


def read_results(out_dir: Path) -> PairResult | None:
    """``<out_dir>/results.json`` as a `PairResult`, or None when there is none."""
    import json

    path = Path(out_dir) / "results.json"
    return PairResult.from_dict(json.loads(path.read_text())) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ the run
def side_by_side(cfg: PairConfig) -> bool:
    """Whether `train_pair` trains the requested checkpoints side by side (``--parallel``, on a CPU, one process
    launched, at least two threads and two checkpoints)."""
    return cfg.parallel and worth_it(cfg.device, cfg.threads, len(set(cfg.modes)))


def _train_and_rate(cfg: PairConfig, mode: str, data: PairData, test: list[IQARecord], rates: bool,
                    progress: Progress | None = None) -> tuple[Trained, dict[str, Any] | None, float | None]:
    """Train (or resume, or reuse) one checkpoint, then rate ``test`` with it (``rates``); its entry and seconds."""
    trainer = TRAINERS[mode]
    trained = trainer.train(cfg, data, progress)
    if not rates:
        return trained, None, None
    start = time.perf_counter()
    ratings, descriptions = trainer.rate(trained.path, test)
    return trained, rating_metrics(ratings, test, descriptions), time.perf_counter() - start


def _train_and_rate_apart(cfg: PairConfig, mode: str, rates: bool, progress: Progress | None = None
                          ) -> tuple[Trained, dict[str, Any] | None, float | None]:
    """`_train_and_rate` in a process of its own: the data read again (a second, built already; its warnings
    were shown by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        data = pair_data(cfg)
    return _train_and_rate(cfg, mode, data, pick_test(data.test, cfg.test_samples), rates, progress)


def train_pair(cfg: PairConfig, progress: Progress | None = None) -> PairResult:
    """Train (or resume, or reuse) each requested checkpoint, rate the test photos with it, write ``results.json``.

    Under ``accelerate launch`` / ``torchrun`` every process trains its share of each batch; the main
    process alone prepares the data and tokenizer (the others wait, then read them), rates the test
    photos and writes ``results.json``.

    Args:
        cfg: The run.
        progress: Called with every `TrainEvent` of every training run.
    """
    torch.set_num_threads(cfg.threads)
    # Every requested mode's training settings are built (and so checked) before anything trains: a
    # two-stage budget too small to split is refused now, not after the one-stage run.
    if "one-stage" in cfg.modes:
        cfg.train_config("one-stage", None, cfg.total_steps)
    if "two-stage" in cfg.modes:
        _two_stage_configs(cfg)
    with main_process_first():
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        data = pair_data(cfg)
    rates = is_main_process()
    test = pick_test(data.test, cfg.test_samples)
    result = PairResult(entries={entry_key(m): None for m in TRAINERS}, train_seconds={}, eval_seconds={},
                        paths={}, config=outputs.jsonable(asdict(cfg)))
    modes = [mode for mode in TRAINERS if mode in cfg.modes]
    if side_by_side(cfg):  # one process per checkpoint, the threads shared out
        done = run_side_by_side([Job(mode, _train_and_rate_apart, (cfg, mode, rates)) for mode in modes],
                                cfg.threads, progress)
    else:
        done = {mode: _train_and_rate(cfg, mode, data, test, rates, progress=progress) for mode in modes}
    for mode in modes:
        trained, entry, seconds = done[mode]
        result.train_seconds.update(trained.seconds)
        result.paths[mode] = str(trained.path)
        if rates:
            result.entries[entry_key(mode)], result.eval_seconds[mode] = entry, seconds
    one, two = result.one_stage, result.two_stage
    if one is not None and two is not None:
        diff, low, high = srcc_difference(one["scores"], two["scores"], one["labels"])
        result.comparison = {"srcc_two_minus_one": diff, "ci95": [low, high], "n": len(test)}
    if rates:
        outputs.write_json(cfg.out_dir / "results.json", result.to_dict(), indent=2)
    return result


def train_or_reuse(cfg: PairConfig, progress: Progress | None = None) -> PairResult:
    """`train_pair`'s results, read back when every requested checkpoint is finished with the same settings.

    Rating the whole test split takes minutes; a second call reuses ``results.json`` when it was written
    with the same config (``parallel`` aside: it only schedules the runs), holds an entry for every
    requested mode, and each checkpoint is finished with the settings ``cfg`` gives (``retrain`` redoes all).
    """
    if not cfg.retrain:
        saved = read_results(cfg.out_dir)
        same = saved is not None and _what_trains(saved.config) == _what_trains(outputs.jsonable(asdict(cfg)))
        if same and all(saved.entry(m) and TRAINERS[m].finished(cfg) for m in cfg.modes):
            return saved
    return train_pair(cfg, progress)


def _what_trains(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config less what only schedules the runs (side by side or one after the other)."""
    return {k: v for k, v in config.items() if k != "parallel"}


def add_entries(out_dir: Path, entries: dict[str, dict[str, Any]]) -> PairResult:
    """Add (or replace) entries of ``<out_dir>/results.json``, e.g. the companions' ``rl`` and ``q_scorer``.

    The pair's own entries, seconds and config are kept, so `train_or_reuse` still recognises the run.

    Raises:
        FileNotFoundError: There is no ``results.json`` yet (train the pair first).
    """
    saved = read_results(out_dir)
    if saved is None:
        raise FileNotFoundError(f"no results.json in {out_dir}: train the pair there first")
    before = outputs.dumps(saved.to_dict())
    saved.entries.update(entries)
    saved.paths.update({key.replace("_", "-"): e["path"] for key, e in entries.items() if e and "path" in e})
    if outputs.dumps(saved.to_dict()) != before:  # unchanged (a reused run): the file is left as it is
        outputs.write_json(Path(out_dir) / "results.json", saved.to_dict(), indent=2)
    return saved
