"""The main job: a miniature replication of the reference paper, one-stage vs two-stage, on one command.

Question: on this run, do the paper's findings hold? (1) one-stage tuning reads
the quality word off a few image tokens, (2) its answer flips across layers and
(3) under sampling, while (4) two-stage tuning (image -> description, then
description -> quality, text only) grounds the answer in the description,
steadies it and rates better.

Method, in order (each step reuses what an earlier run left in ``cache/``):
  1. build the built-in benchmark (``cache/benchmark``);
  2. train or reuse the compact one-stage checkpoint and the two-stage pair
     (``cache/compact``; equal step budgets, stage budgets 2:1) and rate the test split;
     with ``--one-stage DIR --two-stage DIR`` (any pair, released layouts too) nothing is
     trained, and ``--dataset NAME=ROOT`` (or a ``.jsonl``) replaces the benchmark's test split;
  3. rate ``n_images`` test images with each and record every rating's own scoring
     prompt into one activation store per checkpoint, ``cache/replicate/<mode>.h5``
     (`mechbiqa.analysis.capture.record_rater`): the one-stage model's image + own
     description + "The quality of the image is", the two-stage pair's text-only stage-2
     prompt (no image tokens) recorded from the stage-2 model. A later run reuses a
     finished store of the same model and images; a killed one resumes;
  4. offline from those stores: logit lens (`lens_from_store`), attention attribution
     (`attribute_store`), and the probes (`mechbiqa.analysis.probe_data.analyse_probes`:
     ridge probes per layer with folds by reference photo, an MLP score head vs the
     Q-Align level-word score, the probe curve beside the lens curve);
  5. patching of the five dominant image tokens (one-stage only: no image token reaches
     the two-stage quality position), instability (5 answers x 3 seeds), grounding
     (image path vs own-description path, contradictions, ROUGE-1);
  6. the findings (`judge`): each a paired test over the images both checkpoints saw
     (`mechbiqa.analysis.findings`): sign-flip permutation tests of per-image
     instability, level accuracy, description share of the non-image attention, lens
     answer changes, contradictions, patching (dominant vs random, same images) and
     settle layer vs probe layer; paired bootstraps of SRCC differences. Held only when
     the test rejects "no difference" at 5% in the claimed direction;
  7. one comparison report: each metric for both checkpoints, the probe-vs-lens curves,
     and each finding with its test, effect (units), CI and p-value.

Output: the report on the terminal, ``cache/replicate/summary.json`` (metrics,
the per-image values the tests read, the findings), the stores and the JSON and
PNG files under ``cache/replicate/``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch

from mechbiqa import cli, figures, outputs
from mechbiqa.analysis.findings import Finding, decide, paired_bootstrap, paired_permutation, srcc_rows
from mechbiqa.analysis.per_image import aligned, instability_per_image
from mechbiqa.analysis.replication import (
    ProbeSettings,
    analyse_store,
    grounding_per_image,
    image_token_patching,
    rated_store,
    sampled_instability,
)
from mechbiqa.data import load_benchmark
from mechbiqa.metrics import iqa_metrics
from mechbiqa.sources import load_samples, open_source

REPO = Path(__file__).resolve().parents[1]


def _study(name: str) -> ModuleType:
    """Another study script of this folder, imported once (the studies are scripts, not a package)."""
    key = f"mechbiqa_study_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[key] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[key]


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
        train: Overrides of ``studies/train_pair.py``'s Config (tests shrink it).
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
        tp = _study("train_pair").Config.tiny(Path(tmp))
        return cls(cache=str(tmp), n_images=8, n_patch=2, n_instability=2, threads=1, probe_splits=2,
                   head_epochs=20,
                   train={k: getattr(tp, k) for k in ("image_size", "total_steps", "batch_size", "warmup_steps",
                                                       "vocab_size", "eval_every", "eval_samples", "test_samples",
                                                       "benchmark")})


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
    """

    metrics: dict[str, dict[str, Any]]
    findings: list[dict[str, Any]]
    seconds: dict[str, float]
    paths: dict[str, str]
    summary: str = ""
    untested: list[dict[str, Any]] = field(default_factory=list)


def _pick(records: list, n: int) -> list:
    """``n`` records spread evenly over the list (the test split is ordered by photo)."""
    if n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def _test_records(cfg: Config, cache: Path) -> list:
    """The test images: the built-in benchmark's test split, or ``--dataset``'s (all of it without splits)."""
    if cfg.dataset == "builtin":
        return [r for r in load_benchmark(cache / "benchmark").records if r.split == "test"]
    records = load_samples(cfg.dataset)
    test = [r for r in records if getattr(r, "split", None) == "test"]
    return test or records


def main(cfg: Config) -> Result:
    """Run every step; write ``replicate/summary.json``."""
    torch.set_num_threads(cfg.threads)
    cache = Path(cfg.cache)
    out = cache / "replicate"
    out.mkdir(parents=True, exist_ok=True)
    outputs.write_config(out, cfg)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    given = cfg.one_stage is not None and cfg.two_stage is not None
    pair = {} if given else train_or_reuse(cfg, cache)
    lap("benchmark + training")
    paths = ({"one-stage": cfg.one_stage, "two-stage": cfg.two_stage} if given
             else {"one-stage": pair["paths"]["one-stage"], "two-stage": pair["paths"]["two-stage"]})
    records = _test_records(cfg, cache)
    test = _pick(records, cfg.n_images)

    probes = ProbeSettings(cfg.probe_splits, cfg.probe_shuffles, cfg.head_epochs, cfg.device)
    metrics: dict[str, dict[str, Any]] = {}
    for mode, path in paths.items():
        checkpoint = open_source(path, dtype=cfg.dtype, device=cfg.device)  # loaded once per mode
        rater = checkpoint.rater
        store = rated_store(rater, test, out / f"{mode}.h5", cfg.store_dtype)
        lap(f"rate + record store ({mode})")
        m = analyse_store(store, rater, probes, out / f"probes-{mode}")
        subset = iqa_metrics(np.array(m["scores"]), np.array(m["mos"]), on_invalid="flag")
        m["srcc_subset"] = subset.srcc
        held_out = pair.get("one_stage" if mode == "one-stage" else "two_stage") or {}
        m["srcc"] = held_out.get("srcc", subset.srcc)
        m["plcc"], m["level_acc"] = held_out.get("plcc", subset.plcc_raw), held_out.get("level_acc")
        lap(f"lens, attribution, probes from the store ({mode})")
        sampled = _pick(test, cfg.n_instability)
        inst = sampled_instability(checkpoint, sampled)
        m["instability"], m["accuracy"] = inst.ratio_mean_std, inst.accuracy_mean_std
        m["sessions"] = len(inst.ratio)
        per_image = instability_per_image(inst.levels, inst.label_levels, inst.unstable)
        m["per_image"]["instability"] = {"ids": [str(r.id) for r in sampled], **per_image}
        lap(f"instability ({mode})")
        m["grounding"], m["per_image"]["grounding"] = grounding_per_image(rater, test)
        lap(f"grounding ({mode})")
        if mode == "one-stage":  # the two-stage quality position sees no image token: nothing to patch
            patched = image_token_patching(checkpoint, _pick(test, cfg.n_patch), out)
            m["patching"], m["per_image"]["patching"] = patched
            lap("patching")
        metrics[mode] = m

    curves = {mode: m["probes"] for mode, m in metrics.items() if "layers" in (m.get("probes") or {})}
    if curves:
        figures.probe_lens_curves(curves, out / "probe_lens_curves.png")
    judged = judge(metrics)
    tested = [f for f in judged if "undefined" not in f["evidence"]]
    result = Result(metrics=metrics, findings=tested, seconds=seconds, paths=paths,
                    summary=str(out / "summary.json"), untested=[f for f in judged if f not in tested])
    outputs.write_json(out / "summary.json", result, indent=2)
    return result


def train_or_reuse(cfg: Config, cache: Path) -> dict[str, Any]:
    """``studies/train_pair.py``'s results: read back when both checkpoints and their test ratings exist.

    Rating the whole test split takes minutes; a second replication reuses it (``--retrain`` redoes all).
    """
    train_pair = _study("train_pair")
    pair = Path(cfg.model) if cfg.model else cache / "compact"
    tp = replace(train_pair.Config(out_dir=pair, benchmark_dir=cache / "benchmark",
                                   threads=cfg.threads, retrain=cfg.retrain), **cfg.train)
    results = tp.out_dir / "results.json"
    if not cfg.retrain and results.is_file():
        saved = _nan_for_null(json.loads(results.read_text()))
        steps1, steps2 = train_pair.T.split_budget(tp.total_steps)
        finished = (
            train_pair._finished(tp.out_dir / "one-stage", tp.train_config("one-stage", None, tp.total_steps))
            and train_pair._finished(tp.out_dir / "two-stage" / "stage1", tp.train_config("two-stage", 1, steps1))
        )
        if finished and saved.get("config") == train_pair._jsonable(asdict(tp)) and saved.get("two_stage"):
            return saved
    return train_pair.main(tp).to_dict()


def _nan_for_null(saved: dict[str, Any]) -> dict[str, Any]:
    """results.json writes NaN metrics as null (strict JSON); read them back as NaN."""
    for key in ("one_stage", "two_stage"):
        metrics = saved.get(key) or {}
        for name in ("srcc", "plcc", "plcc_fitted", "krcc", "level_acc", "family_rate", "family_rate_distorted"):
            if name in metrics and metrics[name] is None:
                metrics[name] = math.nan
    comparison = saved.get("comparison") or {}
    if comparison.get("ci95"):
        comparison["ci95"] = [math.nan if v is None else v for v in comparison["ci95"]]
    return saved


def judge(m: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finding of the paper decided by a paired test over the images both checkpoints saw.

    ``m[mode]["per_image"]`` holds blocks ``{"ids": [...], quantity: [...]}`` (`analyse_store`,
    `main`); a quantity is compared on the image ids both blocks share. Held: the test rejects "no
    difference" at 5% in the claimed direction (`mechbiqa.analysis.findings.decide`). A finding
    whose data are missing is left out; one that only one checkpoint can have compares like with like.
    """
    one, two = m["one-stage"].get("per_image", {}), m["two-stage"].get("per_image", {})
    out: list[Finding] = []
    contrast: dict[str, str] = {}  # claim -> what the effect is the difference of

    def paired(claim: str, block: str, key: str, direction: Literal["greater", "less"], units: str) -> None:
        if key in one.get(block, {}) and key in two.get(block, {}):
            a, b = aligned(one[block], two[block], key)
            out.append(decide(claim, paired_permutation(a, b, units=units), direction))

    if "store" in one and "store" in two:
        (a, b), (y, _) = (aligned(one["store"], two["store"], k) for k in ("score", "mos"))
        out.append(decide("Two-stage tuning rates better than one-stage (SRCC against the label).",
                          paired_bootstrap(srcc_rows, a, b, y, units="SRCC"), "greater"))
    paired("Two-stage answers are more stable under sampling (paper: 22% -> 12%).", "instability",
           "instability", "less", "unstable answers per session")
    paired("Two-stage answers hit the label's level more often (paper: 52.5% -> 61.2%).", "instability",
           "accuracy", "greater", "share of answers")
    paired("The two-stage quality token gives the description a larger share of its non-image attention "
           "than the one-stage one.", "attention", "description_share", "greater", "share of non-image mass")
    patch = one.get("patching", {})
    if "dominant" in patch and "random" in patch:  # one-stage only: the two-stage prompt has no image token
        claim = ("Ablating the five dominant image tokens moves the one-stage score more than five "
                 "random ones.")
        contrast[claim] = "dominant - random, same images"
        test = paired_permutation(patch["random"], patch["dominant"], units="|delta score|")
        out.append(decide(claim, test, "greater"))
    paired("One-stage answers flip more across intermediate layers (logit lens).",
           "lens", "changes", "less", "answer changes")
    paired("Two-stage answers contradict the model's own description less often.", "grounding",
           "contradiction", "less", "share of images")
    for mode in ("one-stage", "two-stage"):  # Q-Scorer: head vs level words on the same held-out images
        head = (m[mode].get("probes") or {}).get("per_image") or {}
        if "mlp_head" in head and "level_word" in head:
            claim = (f"A regression head on the quality position's hidden state rates better than the "
                     f"level words (Q-Scorer; {mode}).")
            contrast[claim] = "MLP head - level words, same held-out images"
            test = paired_bootstrap(srcc_rows, head["level_word"], head["mlp_head"], head["mos"],
                                    units="SRCC")
            out.append(decide(claim, test, "greater"))
    decodable = (m["one-stage"].get("probes") or {}).get("probe_decodable_layer")
    if decodable is not None and "settle" in one.get("lens", {}):
        settle = np.asarray(one["lens"]["settle"], dtype=float)
        claim = (f"In the one-stage model quality is linearly decodable (probe, layer {decodable}) "
                 "before the layer where each image's answer settles (logit lens).")
        contrast[claim] = "settle layer - probe layer"
        test = paired_permutation(np.full_like(settle, decodable), settle, units="layers")
        out.append(decide(claim, test, "greater"))
    undefined = "untestable on these images: the statistic is undefined (a constant score has no SRCC)"
    def defined(f: Finding) -> bool:
        r = f.result
        return r is not None and bool(np.isfinite([r.effect, r.p_value, *r.ci]).all())

    return [f.to_dict() | {"contrast": contrast.get(f.claim, "two-stage - one-stage")}
            | ({} if defined(f) else {"evidence": undefined}) for f in out]


def render(result: Result, console: Any) -> None:
    """The comparison report and where the summary is."""
    from mechbiqa.reports import comparison_report

    console.print(comparison_report(result.metrics, result.findings + result.untested, result.seconds))
    console.print(f"summary: {result.summary}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
