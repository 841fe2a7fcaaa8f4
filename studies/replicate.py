"""The main job: a miniature replication of the reference paper, one-stage vs two-stage, on one command.

Question: on this run, do the paper's findings hold? (1) one-stage tuning reads
the quality word off a few image tokens, (2) its answer flips across layers and
(3) under sampling, while (4) two-stage tuning (image -> description, then
description -> quality, text only) grounds the answer in the description,
steadies it and rates better.

Method, in order (each step reuses what an earlier run left in ``cache/``):
  1. build the built-in benchmark (``cache/benchmark``);
  2. train or reuse the compact one-stage checkpoint and the two-stage pair
     (``cache/compact``; equal step budgets, stage budgets 2:1) and rate the test split
     (`mechbiqa.train.train_or_reuse`; on a CPU the two train side by side, as then the
     companions' RL and Q-Scorer checkpoints do: `mechbiqa.train.side_by_side`);
     with ``--one-stage DIR --two-stage DIR`` (any pair, released layouts too) nothing is
     trained, and ``--dataset NAME=ROOT`` (or a ``.jsonl``) replaces the benchmark's test split;
  3-5. for each checkpoint (`mechbiqa.analysis.checkpoint_analysis.analyse_checkpoint`; on a CPU
     two checkpoints side by side, one process each, the threads shared out):
  3. rate ``n_images`` test images with each and record every rating's own scoring
     prompt into one activation store per checkpoint, ``cache/replicate/<mode>.h5``
     (`mechbiqa.analysis.capture.record_rater`): the one-stage model's image + own
     description + "The quality of the image is", the two-stage pair's text-only stage-2
     prompt (no image tokens) recorded from the stage-2 model. A later run reuses a
     finished store of the same model and images; a killed one resumes;
  4. offline from those stores: logit lens (`lens_from_store`), attention attribution
     (`attribute_store`), and the probes (`mechbiqa.analysis.probe_data.analyse_probes`:
     ridge probes per layer with folds by reference photo, an MLP score head vs the
     Q-Align level-word score, the probe curve beside the lens curve); then
     (`mechbiqa.analysis.replication_attribution`) direct logit attribution of the decision
     by head and by source role, a tuned lens cross-fitted on the store beside the logit
     lens, and attribution patching of every image position and layer checked against
     activation patching;
  5. patching of the five dominant image tokens (one-stage only: no image token reaches
     the two-stage quality position), instability (5 answers x 3 seeds), grounding
     (image path vs own-description path, contradictions, ROUGE-1);
  6. the findings (`mechbiqa.analysis.judge`): each a paired test over the images both checkpoints saw
     (`mechbiqa.analysis.findings`): sign-flip permutation tests of per-image
     instability, level accuracy, description share of the non-image attention, lens
     answer changes, contradictions, patching (dominant vs random, same images) and
     settle layer vs probe layer, the decision's write from image vs description tokens
     (one-stage); paired bootstraps of SRCC differences. Held only when
     the test rejects "no difference" at 5% in the claimed direction;
  7. one comparison report: each metric for both checkpoints, the probe-vs-lens curves,
     and each finding with its test, effect (units), CI and p-value.

Output: the report on the terminal, ``cache/replicate/summary.json`` (metrics,
the per-image values the tests read, the findings), the stores and the JSON and
PNG files under ``cache/replicate/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from mechbiqa import cli, figures, outputs
from mechbiqa.analysis.checkpoint_analysis import CheckpointAnalysis, analyse_checkpoint
from mechbiqa.analysis.judge import judge, split_untested
from mechbiqa.analysis.replication import ProbeSettings, rating_summary
from mechbiqa.checkpoint import weight_bytes
from mechbiqa.sources import REPO, load_test_split, spread
from mechbiqa.train import PairConfig, add_entries, train_or_reuse
from mechbiqa.train.companions import (
    COMPANION_MODES,
    CompanionSettings,
    train_companions,
    write_conversion_error,
)
from mechbiqa.train.side_by_side import Job, run_jobs


@dataclass(frozen=True)
class Config:
    """The replication's knobs; the defaults are the embedded default run.

    Attributes:
        cache: Where everything lands.
        n_images: Test images for the lens, attribution and grounding (spread over the test photos).
        n_patch: Test images for the patching sweep.
        n_instability: Test images for the instability study (x 5 answers x 3 seeds).
        threads: torch CPU threads.
        retrain: Train the compact pair again even when finished checkpoints exist.
        train: Overrides of the pair's `mechbiqa.train.PairConfig` (tests shrink it).
        one_stage: A one-stage checkpoint to compare (with ``two_stage``: no training happens).
        two_stage: A two-stage pair folder (``stage1/``, ``stage2/``; released layouts welcome).
        dataset: The test images: ``builtin`` (the benchmark ``<cache>/benchmark``, trained on when
            training), a ``.jsonl`` of records, or ``NAME=ROOT`` (its test split, else all of it).
        model: Folder of the compact pair (``studies/train_pair.py --out``: ``one-stage/``,
            ``two-stage/``): reused when trained with the same settings, else trained there;
            None: ``<cache>/compact``.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Dtype the checkpoints are loaded in for rating, patching, sampling and grounding.
        store_dtype: Activation dtype of the stores (float32: the compact model's stores are small).
        probe_splits: Outer folds (by reference photo) of the ridge probes, at most one per photo.
        probe_shuffles: Shuffled-label fits per layer (the probes' chance curve).
        head_epochs: Training epochs of the MLP score head.
        companions: Also train (from the one-stage checkpoint) and compare the companion papers'
            checkpoints: RL with annotation and self-consistency rewards, and Q-Scorer's score tokens.
        parallel: On a CPU with two threads or more, run independent work side by side, one process
            each, the threads shared out (`mechbiqa.train.side_by_side`): the pair's two trainings, the
            companions' two, then the checkpoints' analyses two at a time. ``--no-parallel``: one after
            the other with every thread (a training run's thread count then stays fixed, so its loss
            curve is bitwise repeatable).
        companion: Overrides of their `mechbiqa.train.companions.CompanionSettings` (tests shrink it).
        attribution: Overrides of `mechbiqa.analysis.replication_attribution.AttributionSettings`; the
            attribution patching is checked against activation patching on the pair, not the companions.
    """

    cache: str = str(REPO / "cache")
    n_images: int = 256
    n_patch: int = 32
    n_instability: int = 48
    threads: int = 2
    retrain: bool = False
    train: dict[str, Any] = field(default_factory=dict)
    one_stage: str | None = None
    two_stage: str | None = None
    dataset: str = "builtin"
    model: str | None = field(default=None, metadata=cli.meta(check=False))
    device: str = "cpu"
    dtype: str = "float32"
    store_dtype: Literal["float16", "float32"] = "float32"
    probe_splits: int = 5
    probe_shuffles: int = 1
    head_epochs: int = 200
    companions: bool = True
    parallel: bool = True
    companion: dict[str, Any] = field(default_factory=dict)
    attribution: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if (self.one_stage is None) != (self.two_stage is None):
            raise ValueError("--one-stage and --two-stage go together: pass both, or neither to train")
        for name in ("n_images", "n_instability", "threads", "head_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: pass at least 1")
        if self.n_patch < 2:
            raise ValueError(f"--n-patch {self.n_patch}: patching needs at least 2 images")
        if self.probe_splits < 2 or self.probe_shuffles < 0:
            raise ValueError(f"--probe-splits {self.probe_splits}, --probe-shuffles {self.probe_shuffles}: "
                             "pass at least 2 folds and 0 or more shuffles")

    @classmethod
    def tiny(cls, tmp: str | Path) -> Config:
        """Seconds-long: the tiny benchmark and a few training steps."""
        tp = PairConfig.tiny(Path(tmp))
        shrunk = ("image_size", "total_steps", "batch_size", "warmup_steps", "vocab_size", "eval_every",
                  "eval_samples", "test_samples", "benchmark")
        return cls(cache=str(tmp), n_images=8, n_patch=2, n_instability=2, threads=1, probe_splits=2,
                   head_epochs=20, train={k: getattr(tp, k) for k in shrunk},
                   companion=CompanionSettings.tiny().overrides(), attribution={"n_patch": 2})


@dataclass
class Result:
    """The comparison: ``metrics[name][mode]`` = (value, spread or None), and the findings.

    Attributes:
        metrics: Metric name -> mode -> value.
        findings: One dict per tested finding (`Finding.to_dict`: claim, verdict, test, effect,
            units, ci, p_value, n, and ``contrast``: what the effect is the difference of).
        seconds: Wall time per step.
        paths: Mode -> checkpoint path.
        summary: Where ``summary.json`` was written.
        untested: Findings whose test is undefined on this run's images (e.g. a constant score
            has no SRCC): inconclusive, with the reason in ``evidence``.
        trained: ``results.json`` of the compact checkpoints (empty for a given pair).
        conversion: ``conversion_error.json``: label-approximation and restoration errors.
    """

    metrics: dict[str, dict[str, Any]]
    findings: list[dict[str, Any]]
    seconds: dict[str, float]
    paths: dict[str, str]
    summary: str = ""
    untested: list[dict[str, Any]] = field(default_factory=list)
    trained: dict[str, Any] = field(default_factory=dict)
    conversion: dict[str, Any] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Run every step; write ``replicate/summary.json``."""
    torch.set_num_threads(cfg.threads)
    cache, out = Path(cfg.cache), Path(cfg.cache) / "replicate"
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_config(out, cfg)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = round(time.perf_counter() - clock, 1), time.perf_counter()

    # 1-2. the checkpoints, mode -> path: given, or trained (or reused) with their whole-test-split ratings
    if cfg.one_stage is not None and cfg.two_stage is not None:
        paths, pair, conversion = {"one-stage": cfg.one_stage, "two-stage": cfg.two_stage}, None, {}
    else:
        pair_dir, conversion = Path(cfg.model) if cfg.model else cache / "compact", {}
        trains = PairConfig(out_dir=pair_dir, benchmark_dir=cache / "benchmark", threads=cfg.threads,
                            retrain=cfg.retrain, parallel=cfg.parallel)
        pair = train_or_reuse(replace(trains, **cfg.train))
        if cfg.companions:  # the companion papers' checkpoints, from the one-stage one: RL and Q-Scorer
            settings = CompanionSettings(**{"device": cfg.device, **cfg.companion})
            companions = train_companions(pair_dir, cache / "benchmark", settings,
                                          threads=cfg.threads if cfg.parallel else 1)
            pair = add_entries(pair_dir, companions)
            conversion = write_conversion_error(pair.to_dict(), out)
        paths = dict(pair.paths)
    lap("benchmark + training")
    test = spread(load_test_split(cfg.dataset, cache / "benchmark"), cfg.n_images)

    # 3-5. each checkpoint's analyses; on a CPU side by side, two at a time, the threads shared out
    probes = ProbeSettings(cfg.probe_splits, cfg.probe_shuffles, cfg.head_epochs, cfg.device)
    how = CheckpointAnalysis(str(out), cfg.dtype, cfg.device, cfg.store_dtype, probes, cfg.n_instability,
                             cfg.n_patch, cfg.attribution)
    jobs = [Job(mode, analyse_checkpoint, (mode, path, test, replace(how, companion=mode in COMPANION_MODES)))
            for mode, path in paths.items()]  # fmt: skip
    analysed = run_jobs(jobs, cfg.threads, device=cfg.device, parallel=cfg.parallel,
                        each_bytes=max(weight_bytes(path) for path in paths.values()))  # 7B: one at a time
    metrics: dict[str, dict[str, Any]] = {}
    for mode, (m, steps) in analysed.items():
        m.update(rating_summary(m["scores"], m["mos"], pair and pair.entry(mode)))  # whole split if rated
        m["test_split"] = pair.entry(mode) if pair else None  # its own SRCC on the whole test split
        metrics[mode] = m
        seconds.update(steps)
    lap(f"analyses of {len(jobs)} checkpoints (wall)")

    # 6-7. the findings, each by its paired test; the probe-vs-lens curves
    curves = {mode: m["probes"] for mode, m in metrics.items() if "layers" in (m.get("probes") or {})}
    if curves:
        figures.probe_lens_curves(curves, out / "probe_lens_curves.png")
    tested, untested = split_untested(judge(metrics))
    result = Result(metrics=metrics, findings=tested, seconds=seconds, paths=paths,
                    summary=str(out / "summary.json"), untested=untested,
                    trained=pair.to_dict() if pair else {}, conversion=conversion)
    outputs.write_json(out / "summary.json", result, indent=2)
    return result


def render(result: Result, console: Any) -> None:
    """The comparison report and where the summary is."""
    from mechbiqa.reports import comparison_report
    from mechbiqa.reports_attribution import attribution_report
    from mechbiqa.reports_companions import companion_table, conversion_error_table

    console.print(comparison_report(result.metrics, result.findings + result.untested, result.seconds))
    if any(key in result.trained for key in ("rl", "q_scorer")):
        console.print(companion_table(result.trained))
    if result.conversion:
        console.print(conversion_error_table(result.conversion))
    attributed = {mode: m["attribution"] for mode, m in result.metrics.items() if "attribution" in m}
    if attributed:
        console.print(attribution_report(attributed))
    console.print(f"summary: {result.summary}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
