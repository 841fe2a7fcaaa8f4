"""The pair's companions: an RL (GRPO) and a Q-Scorer checkpoint trained from its one-stage checkpoint.

How it connects: the main job trains the one-stage / two-stage pair into a folder
(``one-stage/``, ``two-stage/``, ``results.json``); :func:`train_companions` adds
``rl/`` (:func:`mechbiqa.rl.finetune_checkpoint`: GRPO with the second paper's
human-annotation and self-consistency rewards) and ``q-scorer/`` (score tokens and
an MLP head, :mod:`mechbiqa.qscorer`), rates the pair's held-out test images with
each, and returns entries shaped like the pair's in ``results.json`` (``rl``,
``q_scorer``). Both are one-stage checkpoint directories, so
:func:`mechbiqa.checkpoint.open_checkpoint` opens them as raters (a Q-Scorer as a
:class:`~mechbiqa.qscorer.QScorerRater`) for the main job's per-checkpoint
analyses. :func:`write_conversion_error` turns the entries into
``conversion_error.json`` and its figure (:mod:`mechbiqa.analysis.conversion`);
:mod:`mechbiqa.reports_companions` renders the columns. Nothing here prints.

On a CPU given two threads or more, the two train side by side and then rate side by side
(with the one-stage checkpoint's ratings for the paired tests), one process each
(:mod:`mechbiqa.train.side_by_side`); on a GPU, one after the other.

Reuse and resumption, as the pair's training: each checkpoint is written with
:func:`mechbiqa.train.publish` (a link to its newest complete version); a finished
one trained with the same settings from the same one-stage version is reused; an
RL run that was killed resumes from its last checkpoint (every
``CompanionSettings.checkpoint_every`` steps) on the same trajectory. The rated
entries are kept in ``companions.json`` beside them and reused while the
checkpoints and settings are unchanged.

The comparison with the one-stage checkpoint it started from (``vs_one_stage``):
SRCC difference on the pair's test images (paired bootstrap,
:func:`mechbiqa.metrics.srcc_difference`), and on ``compare_samples`` of them the
per-image ROUGE-1 F1 of the descriptions against the references and the level hit
(sign-flip permutation tests, :func:`mechbiqa.analysis.findings.paired_permutation`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mechbiqa.qscorer import QScorerTrainConfig, ScoreTokenSpec
from mechbiqa.rl import RewardWeights, RLConfig
from mechbiqa.checkpoint import weight_bytes
from mechbiqa.sources import spread, spread_indices
from mechbiqa.train.side_by_side import Job, run_jobs

__all__ = [
    "COMPANION_MODES",
    "COMPANIONS",
    "COMPANION_DIRS",
    "RESULTS_FILE",
    "CompanionSettings",
    "train_companions",
    "companion_paths",
    "rated_entry",
    "write_conversion_error",
]

Companion = Literal["rl", "q_scorer"]
COMPANIONS: tuple[Companion, ...] = ("rl", "q_scorer")
COMPANION_DIRS: dict[str, str] = {"rl": "rl", "q_scorer": "q-scorer"}
COMPANION_MODES: tuple[str, ...] = tuple(COMPANION_DIRS.values())
"""Their mode names beside ``one-stage`` / ``two-stage`` (a results.json key with ``-`` for ``_``)."""
"""Key in results.json -> checkpoint directory inside the pair's folder."""
RESULTS_FILE = "companions.json"
"""The rated entries, kept beside the checkpoints (reused while checkpoints and settings are unchanged)."""


@dataclass(frozen=True, slots=True)
class CompanionSettings:
    """How the companions are trained and rated (the defaults: the compact pair on 2 CPU cores).

    Attributes:
        rl: The GRPO run (budget measured on the compact model; see the module docstring).
        spec: The Q-Scorer's score tokens and MLP head.
        qscorer: The Q-Scorer's training run.
        companions: Which to train.
        annotations: A user's annotation files (Q-Pathway / Q-Instruct / Q-Reasoning conversation JSON, or
            ``{image id: text}``) whose reasoning joins the benchmark's descriptions as references of the
            RL's ROUGE reward and of the ROUGE-1 comparison (`mechbiqa.analysis.rouge.annotation_references`).
        test_samples: Rate this many of the pair's test images, spread over them (0: all of them). Rating
            dominates the cost: 960 images took 141 CPU-s (RL) and 190 CPU-s (Q-Scorer) on the compact model.
        compare_samples: Test images on which the one-stage checkpoint is rated again for the paired
            ROUGE-1 and level-hit tests (0: none).
        checkpoint_every: RL steps between resumable checkpoints (0: none).
        max_new_tokens: Longest generated answer when rating (the pair's raters: 48).
        batch_size: Images per forward when rating.
        device: ``cpu``, ``cuda`` ...
        dtype: Parameter dtype of training and rating.
        retrain: Train again even when finished checkpoints with these settings exist.
    """

    rl: RLConfig = field(
        default_factory=lambda: RLConfig(steps=20, images_per_step=2, group_size=4, lr=5e-5, kl_beta=0.04,
                                         max_new_tokens=40, weights=RewardWeights())  # fmt: skip
    )
    spec: ScoreTokenSpec = field(default_factory=lambda: ScoreTokenSpec(n_bins=5, d_hidden=64))
    qscorer: QScorerTrainConfig = field(default_factory=lambda: QScorerTrainConfig(steps=60, batch_size=16))
    companions: tuple[Companion, ...] = COMPANIONS
    annotations: tuple[str, ...] = ()
    test_samples: int = 480
    compare_samples: int = 160
    checkpoint_every: int = 5
    max_new_tokens: int = 48
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    retrain: bool = False

    def __post_init__(self) -> None:
        """Refuse unknown companions and negative counts."""
        unknown = [c for c in self.companions if c not in COMPANIONS]
        if unknown or not self.companions:
            raise ValueError(f"companions {self.companions!r}: choose from {COMPANIONS}")
        counts = (self.test_samples, self.compare_samples, self.checkpoint_every)
        if min(counts) < 0 or min(self.batch_size, self.max_new_tokens) < 1:
            raise ValueError("need test_samples, compare_samples, checkpoint_every >= 0 and "
                         "batch_size, max_new_tokens >= 1")

    @classmethod
    def tiny(cls) -> CompanionSettings:
        """Seconds-long runs on the tiny model (tests)."""
        return cls(rl=RLConfig(steps=1, images_per_step=1, group_size=2, max_new_tokens=3),
                   spec=ScoreTokenSpec(n_bins=5, d_hidden=8), qscorer=QScorerTrainConfig(steps=2, batch_size=2),
                   compare_samples=2, max_new_tokens=4, checkpoint_every=1, test_samples=4)

    def overrides(self) -> dict[str, Any]:
        """The fields as keyword arguments (``CompanionSettings(**s.overrides()) == s``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (as it reads back from JSON, so saved settings compare equal)."""
        from mechbiqa.outputs import jsonable

        return json.loads(json.dumps(jsonable(asdict(self))))


def companion_paths(pair_dir: str | Path) -> dict[str, Path]:
    """``{"rl": pair_dir/rl, "q_scorer": pair_dir/q-scorer}`` (what :func:`train_companions` writes)."""
    return {k: Path(pair_dir) / v for k, v in COMPANION_DIRS.items()}


# ----------------------------------------------------------------------------------------------- data
def _test_records(pair_dir: Path, bench: Any) -> list[Any]:
    """The images the pair rated (``results.json``'s one-stage ids, in order), else the test split."""
    results = pair_dir / "results.json"
    if results.is_file():
        saved = json.loads(results.read_text())
        ids = (saved.get("one_stage") or saved.get("two_stage") or {}).get("ids")
        if ids:
            by_id = bench.by_id
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise ValueError(
                    f"{results} rates images {missing[:3]} that the benchmark {bench.root} does not hold; "
                    "pass the benchmark the pair was trained on"
                )
            return [by_id[i] for i in ids]
    return bench.split("test")


def _one_stage_scores(pair_dir: Path) -> dict[str, Any] | None:
    """The pair's one-stage test entry (ids, scores, labels), or None."""
    results = pair_dir / "results.json"
    if not results.is_file():
        return None
    entry = json.loads(results.read_text()).get("one_stage")
    return entry if entry and entry.get("scores") else None


# ----------------------------------------------------------------------------------------------- rating
def rated_entry(ratings: Sequence[Any], records: Sequence[Any]) -> dict[str, Any]:
    """Test metrics of one checkpoint's ratings, keyed as the pair's entries in ``results.json``.

    The pair's own metrics (`mechbiqa.train.pair.rating_metrics`: ``n``, ``srcc``, ``plcc``, ``plcc_fitted``,
    ``krcc``, ``level_acc``, ``family_rate``, ``examples``, ``ids``, ``scores``, ``labels``), plus
    ``levels`` and ``descriptions``; Q-Scorer ratings add ``regressed`` / ``token_scores`` with their
    SRCC and PLCC and ``emitted_rate``.
    """
    from mechbiqa.metrics import iqa_metrics
    from mechbiqa.train.pair import rating_metrics

    descriptions = [r.description for r in ratings]
    out = rating_metrics(ratings, records, descriptions)
    if ratings and hasattr(ratings[0], "regressed"):
        for key, attr in (("regressed", "regressed"), ("token", "token_score")):
            values = np.array([getattr(r, attr) for r in ratings], dtype=float)
            sub = iqa_metrics(values, np.asarray(out["labels"]), on_invalid="flag")
            out[f"srcc_{key}"], out[f"plcc_{key}"] = sub.srcc, sub.plcc_raw
            out["regressed" if key == "regressed" else "token_scores"] = values.tolist()
        out["emitted_rate"] = float(np.mean([r.emitted for r in ratings]))
    out["levels"] = [r.level for r in ratings]
    out["descriptions"] = descriptions
    return out


def _compare(
    entry: dict[str, Any],
    one_stage: dict[str, Any] | None,
    baseline: list[Any] | None,
    subset: list[int],
    records: Sequence[Any],
    references: list[tuple[str, ...]],
) -> dict[str, Any]:
    """The companion against the one-stage checkpoint on the same images (module docstring)."""
    from mechbiqa.analysis.findings import paired_permutation
    from mechbiqa.analysis.rouge import rouge1
    from mechbiqa.metrics import srcc_difference

    out: dict[str, Any] = {}
    at = {i: k for k, i in enumerate((one_stage or {}).get("ids", []))}
    if one_stage is not None and all(i in at for i in entry["ids"]):  # the pair's scores of the same images
        before = [one_stage["scores"][at[i]] for i in entry["ids"]]
        diff, low, high = srcc_difference(before, entry["scores"], entry["labels"])
        out["srcc"] = {"difference": diff, "ci95": [low, high], "n": len(entry["ids"]),
                       "test": "paired bootstrap over images (companion - one-stage)"}  # fmt: skip
    if baseline is not None and subset:
        labels = [records[i].level_word for i in subset]
        hit_one = np.array([r.level == w for r, w in zip(baseline, labels, strict=True)], dtype=float)
        hit_new = np.array([entry["levels"][i] == w for i, w in zip(subset, labels, strict=True)],
                           dtype=float)  # fmt: skip
        out["level_hit"] = asdict(paired_permutation(hit_one, hit_new, units="share of images"))
        refs = [references[i] for i in subset]
        if all(refs):
            ids = [str(records[i].id) for i in subset]
            one = rouge1([r.description for r in baseline], list(refs), ids=ids)
            new = rouge1([entry["descriptions"][i] for i in subset], list(refs), ids=ids)
            out["rouge1_f1"] = {"one_stage": one.mean_f1, "companion": new.mean_f1,
                                **asdict(paired_permutation(one.f1, new.f1, units="ROUGE-1 F1"))}  # fmt: skip
            entry["rouge1_f1"] = new.mean_f1
    return out


# ----------------------------------------------------------------------------------------------- training
def _version(path: Path) -> str:
    """What identifies a published checkpoint's content: its version directory's name."""
    return path.resolve().name


def _train_rl(one: Path, out: Path, examples: list[Any], refs: dict[str, tuple[str, ...]],
              settings: CompanionSettings, progress: Callable[[str, Any], None] | None) -> float:
    """GRPO into ``out`` (reused or resumed: `mechbiqa.rl.finetune_checkpoint`); seconds spent."""
    from mechbiqa.rl import finetune_checkpoint
    from mechbiqa.sources import torch_dtype

    start = time.perf_counter()
    finetune_checkpoint(
        one, out, examples, settings.rl, device=settings.device, dtype=torch_dtype(settings.dtype),
        progress=None if progress is None else (lambda s: progress("rl", s)), references=refs,
        checkpoint_every=settings.checkpoint_every, fresh=settings.retrain,
        extra_info={"parent_version": _version(one), "companion": "rl", "n_examples": len(examples),
                    "annotations": list(settings.annotations)},
    )  # fmt: skip
    return time.perf_counter() - start


def _train_qscorer(one: Path, out: Path, examples: list[Any], settings: CompanionSettings,
                   progress: Callable[[str, Any], None] | None) -> float:
    """A Q-Scorer into ``out``, reused when finished with the same settings; seconds spent."""
    from mechbiqa.pipeline import read_info
    from mechbiqa.qscorer import qscorer_from_checkpoint, save_qscorer, train_qscorer
    from mechbiqa.sources import torch_dtype
    from mechbiqa.train import publish, recover

    start = time.perf_counter()
    expected = {"parent": str(one), "parent_version": _version(one), "finished": True,
                "qscorer_config": settings.to_dict()["qscorer"], "n_examples": len(examples)}  # fmt: skip
    recover(out)
    if not settings.retrain:
        try:
            info = read_info(out).data
        except FileNotFoundError:
            info = {}
        head = {k: info.get("score_head", {}).get(k) for k in ("n_bins", "d_hidden", "site", "lam")}
        if all(info.get(k) == v for k, v in expected.items()) and head == asdict(settings.spec):
            return 0.0
    dtype = torch_dtype(settings.dtype)
    model, head_module, tokenizer, processor = qscorer_from_checkpoint(
        one, settings.spec, seed=settings.qscorer.seed, dtype=dtype, device=settings.device
    )
    report = None if progress is None else (lambda r: progress("q_scorer", r))
    history = train_qscorer(
        model, head_module, tokenizer, processor, examples, settings.spec, settings.qscorer, progress=report
    )
    template = read_info(one).template
    extra = {**expected, "step": settings.qscorer.steps, "qscorer_history": history}
    publish(out, lambda d: save_qscorer(d, model, head_module, tokenizer, processor, settings.spec,
                                        template=template, extra_info=extra))  # fmt: skip
    return time.perf_counter() - start


def _prepared(pair_dir: Path, benchmark_dir: str | Path, settings: CompanionSettings
              ) -> tuple[list[Any], dict[str, tuple[str, ...]], list[Any], list[tuple[str, ...]]]:
    """What the runs read: the training examples, their references by image id, the test records and theirs."""
    from mechbiqa.analysis.rouge import annotation_references, references_with
    from mechbiqa.data import load_benchmark
    from mechbiqa.train import examples_from_records

    bench = load_benchmark(benchmark_dir)
    train = [r for r in bench.split("train") if r.mos01 is not None]
    test = _test_records(pair_dir, bench)
    if settings.test_samples:
        test = spread(test, settings.test_samples)
    extra = annotation_references(settings.annotations) if settings.annotations else None
    train_refs = dict(zip((r.id for r in train), references_with(train, extra), strict=True))
    return examples_from_records(train, "one-stage"), train_refs, test, references_with(test, extra)


def _train_one(name: Companion, one: Path, out: Path, examples: list[Any], refs: dict[str, tuple[str, ...]],
               settings: CompanionSettings, progress: Callable[[Any], None] | None = None) -> float:
    """Train (or reuse, or resume) one companion into ``out``; seconds spent. Events go out as
    ``progress((name, record))`` (one argument, as from a side-by-side job)."""
    report = None if progress is None else (lambda n, r: progress((n, r)))
    if name == "rl":
        return _train_rl(one, out, examples, refs, settings, report)
    return _train_qscorer(one, out, examples, settings, report)


def _rate(name: str, path: Path, images: list[Any], settings: CompanionSettings,
          progress: Callable[[Any], None] | None = None) -> tuple[list[Any], float]:
    """Rate ``images`` with the checkpoint at ``path``: the ratings and the seconds taken (opening included)."""
    from mechbiqa.checkpoint import open_checkpoint

    if progress is not None:
        progress((name, "rating"))
    start = time.perf_counter()
    rater = open_checkpoint(path, dtype=settings.dtype, device=settings.device,
                            max_new_tokens=settings.max_new_tokens).rater  # fmt: skip
    with torch.no_grad():
        ratings = rater.rate(images, batch_size=settings.batch_size)
    return ratings, time.perf_counter() - start


def train_companions(
    pair_dir: str | Path,
    benchmark_dir: str | Path,
    settings: CompanionSettings | None = None,
    *,
    progress: Callable[[str, Any], None] | None = None,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Train (or reuse, or resume) ``pair_dir/rl`` and ``pair_dir/q-scorer``, rate the test images with each.

    Args:
        pair_dir: The pair's folder: ``one-stage/`` (the start of both), ``results.json`` (its test ids and
            one-stage scores, for the same images and the comparison; optional).
        benchmark_dir: The built-in benchmark the pair was trained on (train split: RL and Q-Scorer data;
            test split: rating).
        settings: The runs; None: :class:`CompanionSettings` ().
        progress: Called as ``progress(name, record)`` with each training step's record
            (`mechbiqa.rl.RLStep` or the Q-Scorer's step dict) and ``progress(name, "rating")``.
        threads: With 2 or more on a CPU, the companions train (and then rate) side by side, one process
            each with its share of these threads (`mechbiqa.train.side_by_side`); 1: one after the other
            in this process, on its own threads.

    Returns:
        ``{"rl": entry, "q_scorer": entry}`` for ``results.json``: each :func:`rated_entry`'s metrics
        plus ``path``, ``train_seconds``, ``eval_seconds`` and ``vs_one_stage`` (the comparison), as
        JSON reads them back (an undefined metric, e.g. the SRCC of a constant score, is None).

    Raises:
        FileNotFoundError: ``pair_dir/one-stage`` is not a checkpoint, or the benchmark is missing.
    """
    from mechbiqa.outputs import write_json

    settings = settings or CompanionSettings()
    pair_dir = Path(pair_dir)
    one = pair_dir / "one-stage"
    if not (one / "config.json").is_file():
        raise FileNotFoundError(f"no one-stage checkpoint at {one}: train the pair there first")
    examples, train_refs, test, test_refs = _prepared(pair_dir, benchmark_dir, settings)
    paths = companion_paths(pair_dir)
    emit = None if progress is None else (lambda event: progress(*event))
    weights = weight_bytes(one)  # training holds 4x: weights, gradients, AdamW's two moments
    seconds = run_jobs([Job(c, _train_one, (c, one, paths[c], examples, train_refs, settings))
                        for c in settings.companions], threads, emit, device=settings.device,
                       each_bytes=4 * weights)  # fmt: skip

    cache_file = pair_dir / RESULTS_FILE
    key = {"settings": settings.to_dict(), "one_stage": _version(one), "ids": [r.id for r in test],
           "versions": {c: _version(paths[c]) for c in settings.companions}}  # fmt: skip
    if cache_file.is_file() and not settings.retrain:
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return {c: cached["entries"][c] for c in settings.companions}

    subset = spread_indices(len(test), settings.compare_samples) if settings.compare_samples else []
    images = [r.image_path for r in test]
    jobs = [Job(c, _rate, (c, paths[c], images, settings)) for c in settings.companions]
    if subset:  # the one-stage checkpoint again on a few, for the paired ROUGE-1 and level-hit tests
        jobs.insert(0, Job("one-stage", _rate, ("one-stage", one, [images[i] for i in subset], settings)))
    rated = run_jobs(jobs, threads, emit, device=settings.device, each_bytes=weights)
    baseline = rated["one-stage"][0] if subset else None
    one_stage = _one_stage_scores(pair_dir)
    entries: dict[str, dict[str, Any]] = {}
    for name in settings.companions:
        ratings, eval_seconds = rated[name]
        entry = rated_entry(ratings, test)
        entry["eval_seconds"] = eval_seconds
        entry["train_seconds"] = seconds[name]
        entry["path"] = str(paths[name])
        entry["vs_one_stage"] = _compare(entry, one_stage, baseline, subset, test, test_refs)
        entries[name] = entry
    write_json(cache_file, {"key": key, "entries": entries}, indent=1)
    return json.loads(cache_file.read_text())["entries"]  # as a reuse returns them: undefined metrics null


# ----------------------------------------------------------------------------------------------- conversion
def write_conversion_error(
    results: Mapping[str, Any],
    out_dir: str | Path,
    *,
    restore: Literal["qalign", "centre"] = "qalign",
) -> dict[str, Any]:
    """``conversion_error.json`` and ``conversion_error.png`` of the test images, from results.json's entries.

    Label approximation (MOS -> level -> restored score), the restoration error of each checkpoint's
    Q-Align score (``one_stage``, ``two_stage``, ``rl``, ``q_scorer``: those present, on the images all
    of them rated) and the score-token regressor's (the Q-Scorer's ``regressed``), on 0-1
    (`mechbiqa.analysis.conversion.conversion_table`).

    Args:
        results: ``results.json`` with the companions' entries added (``entry["ids"]``, ``["scores"]``,
            ``["labels"]``; ``q_scorer["regressed"]``).
        out_dir: Where the two files go.
        restore: How a level is restored (``qalign`` values or bin ``centre`` s).

    Returns:
        The JSON written (``files`` names the two paths).

    Raises:
        ValueError: No entry has scores, or entries disagree on an image's label.
    """
    from mechbiqa.analysis.conversion import conversion_table
    from mechbiqa.outputs import write_json
    from mechbiqa.reports_companions import conversion_figure

    names = ("one_stage", "two_stage", "rl", "q_scorer")
    entries = {n: results[n] for n in names
               if isinstance(results.get(n), Mapping) and results[n].get("scores")}  # fmt: skip
    if not entries:
        raise ValueError("no entry of results.json has test scores; train and rate the pair first")
    common = set.intersection(*(set(e["ids"]) for e in entries.values()))
    ids = [i for i in next(iter(entries.values()))["ids"] if i in common]

    def column(entry: Mapping[str, Any], key: str) -> np.ndarray:
        at = {i: k for k, i in enumerate(entry["ids"])}
        return np.array([entry[key][at[i]] for i in ids], dtype=float)

    labels = [column(e, "labels") for e in entries.values()]
    if any(not np.allclose(lab, labels[0]) for lab in labels):
        raise ValueError("results.json's entries give an image different labels; rate all on one benchmark")
    qalign = {n: column(e, "scores") for n, e in entries.items()}
    regressed = {"q_scorer_regressed": column(entries["q_scorer"], "regressed")} \
        if "regressed" in entries.get("q_scorer", {}) else {}  # fmt: skip
    table = conversion_table(labels[0], qalign, regressed, ids=ids, restore=restore)
    out = Path(out_dir)
    payload = {**table.to_dict(), "files": {"json": str(out / "conversion_error.json"),
                                            "figure": str(out / "conversion_error.png")}}  # fmt: skip
    write_json(out / "conversion_error.json", payload, indent=1)
    conversion_figure(table, out / "conversion_error.png")
    return payload
