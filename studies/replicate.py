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
  3. rate ``n_images`` test images with each and record every rating's own scoring
     prompt into one activation store per checkpoint, ``cache/replicate/<mode>.h5``
     (`mechbiqa.analysis.capture.record_rater`): the one-stage model's image + own
     description + "The quality of the image is", the two-stage pair's text-only stage-2
     prompt (no image tokens) recorded from the stage-2 model. Every layer's residual and
     attention row at the quality position, the image tokens' residuals and the logits.
     A later run reuses a finished store of the same model and images; a killed one resumes;
  4. offline from those stores: logit lens (`lens_from_store`), attention attribution
     (`attribute_store`), and the probes (`studies/probes.py`: ridge probes per layer with
     cross-validation by reference photo, an MLP score head vs the Q-Align level-word score,
     the probe curve beside the lens curve);
  5. patching of the five dominant image tokens (one-stage: the two-stage quality
     position sees no image token), instability (5 answers x 3 seeds), quality evaluation,
     grounding (image path vs own-description path, contradiction rates, ROUGE-1);
  6. one comparison report: each metric for both checkpoints, with its spread, the
     probe-vs-lens layer curves, and a plain sentence per finding saying whether it held.

Output: the report on the terminal, ``cache/replicate/summary.json``, the
stores and the studies' JSON and PNG files under ``cache/replicate/``.
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
from mechbiqa.analysis.attribution import attribute_store
from mechbiqa.analysis.capture import record_rater, scoring_components
from mechbiqa.analysis.findings import Finding, decide, paired_bootstrap, paired_permutation, srcc_rows
from mechbiqa.analysis.grounding import grounding, rate_paths
from mechbiqa.analysis.instability import (
    InstabilityResult,
    SamplingConfig,
    sample_checkpoint,
    summarise_instability,
)
from mechbiqa.analysis.lens import LogitLens, lens_from_store
from mechbiqa.analysis.patching import patch_image_tokens
from mechbiqa.analysis.per_image import aligned, instability_per_image, non_image_share, patching_per_image
from mechbiqa.analysis.probe_data import ProbeRun, analyse_probes, data_from_store
from mechbiqa.analysis.probes import RidgeConfig, ScoreHeadConfig
from mechbiqa.analysis.rouge import rouge1
from mechbiqa.checkpoint import Checkpoint
from mechbiqa.data import load_benchmark
from mechbiqa.metrics import iqa_metrics
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.pipeline import OneStageRater, TwoStageRater
from mechbiqa.scoring import level_ids
from mechbiqa.sources import load_rater, load_samples, open_source
from mechbiqa.store import ActivationStore, CacheSpec, StoreError

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
        findings: One dict per finding (sentence, held, evidence).
        seconds: Wall time per step.
        paths: Mode -> checkpoint path.
        summary: Where ``summary.json`` was written.
    """

    metrics: dict[str, dict[str, Any]]
    findings: list[dict[str, Any]]
    seconds: dict[str, float]
    paths: dict[str, str]
    summary: str = ""


def _pick(records: list, n: int) -> list:
    """``n`` records spread evenly over the list (the test split is ordered by photo)."""
    if n >= len(records):
        return list(records)
    return [records[i] for i in np.linspace(0, len(records) - 1, n).round().astype(int)]


def _rated_store(rater: OneStageRater | TwoStageRater, records: list, path: Path, cfg: Config) -> Path:
    """The checkpoint's store of ``records``: reused when finished for the same model and images.

    Otherwise the images are rated and their scoring prompts recorded; an interrupted store
    (``.partial``) resumes when the ratings give the same prompts, and a store made by another
    model, other images or an older schema is recorded again.
    """
    from mechbiqa_hooks.record import model_identity

    model = scoring_components(rater).model
    spec = CacheSpec.default(cfg.store_dtype)
    try:
        with ActivationStore.open(path) as store:
            store.check_identity(model_identity(model))
            if store.complete and store.ids("all") == [str(r.id) for r in records] and store.info.spec == spec:
                return path
    except (FileNotFoundError, StoreError):
        pass
    try:
        return record_rater(rater, records, path, spec).path
    except StoreError:  # another model, images or schema: start again
        return record_rater(rater, records, path, spec, overwrite=True).path


def analyse_store(path: Path, rater: OneStageRater | TwoStageRater, cfg: Config, out: Path) -> dict[str, Any]:
    """Logit lens, attention attribution and probes of one checkpoint's store (offline: no forward pass).

    The lens reads the scoring model's final norm and lm_head, and must reproduce the logits
    the store holds at the last layer.
    """
    parts = scoring_components(rater)
    lens_map = LogitLens.from_model(parts.model)
    with ActivationStore.open(path) as store:
        lens = lens_from_store(store, lens_map, level_ids(parts.tokenizer), tokenizer=parts.tokenizer)
        # the two-stage store is text only: its role masses are measured, its image tokens are none
        attr = attribute_store(store, k=5, require_image=False)
        rows = store.valid[store.counts("quality") > 0]
        has_image = bool((store.n_images(rows) > 0).any())
        scores = [r["rating"]["score"] for r in store.records(rows)]
        mos = store.labels(rows).tolist()
        ids = store.ids(rows)
    # figures beside the store: <mode>.lens.png, <mode>.attention.png (one-stage: the two-stage row has no image)
    figures.lens_trajectories(lens, path.with_suffix(".lens.png"), title=f"Logit lens ({path.stem})")
    if has_image:
        figures.attention_heatmap(attr, path.with_suffix(".attention.png"),
                                  title=f"Attention of the quality position ({path.stem})")
    share = non_image_share(attr.mass_per_sample, attr.role_labels)  # [sample]
    last = attr.mass[-1].mean(0)  # [role], last layer, mean over heads
    overall = attr.mass.mean((0, 1))  # mean over layers and heads
    role = {label: i for i, label in enumerate(attr.role_labels)}
    return {
        "store": str(path), "scores": scores, "mos": mos,
        "lens_changes": (float(lens.n_changes.mean()), float(lens.n_changes.std())),
        "lens_settle": (float(lens.settle.mean()), float(lens.settle.std())),
        "lens_agreement": lens.agreement.tolist(),
        "lens_last_layer_error": lens.last_layer_error,
        "image_mass": (float(overall[role["image"]]), float(attr.mass_per_sample[..., role["image"]].mean(1).std())),
        "description_mass": (float(overall[role["description"]]),
                             float(attr.mass_per_sample[..., role["description"]].mean(1).std())),
        "description_share": (float(np.nanmean(share)), float(np.nanstd(share))) if np.isfinite(share).any()
        else None,
        "image_mass_last_layer": float(last[role["image"]]),
        "description_mass_last_layer": float(last[role["description"]]),
        "top5_share": (float(attr.top_share.mean()), float(attr.top_share.std())) if has_image else None,
        "top5_jaccard": (attr.jaccard, attr.jaccard_chance) if has_image else None,
        "top5_consensus": attr.consensus.tolist() if has_image else None,
        "probes": probe_section(path, (lens_map, parts.tokenizer), str(parts.path), cfg, out),
        "per_image": {
            "store": {"ids": ids, "score": scores, "mos": mos},
            "lens": {"ids": list(lens.sample_ids), "changes": lens.n_changes, "settle": lens.settle},
            "attention": {"ids": list(attr.sample_ids),
                          "description_share": share},
        },
    }


def probe_section(path: Path, read_out: Any, model: str, cfg: Config, out: Path) -> dict[str, Any]:
    """The probes of a store (`analyse_probes`): probe and lens curves per layer, MLP head vs level words.

    Research choice: folds group the crops of one reference photo; with fewer than 3 photos
    among the stored images (the tiny benchmark) there is nothing to hold out by photo, and
    each image is its own group (the JSON says which: ``grouping``).
    """
    data = data_from_store(path, model, read_out=read_out)
    grouping = "photo"
    if len(np.unique(data.groups.astype(str))) < 3:
        data, grouping = replace(data, groups=np.asarray(data.ids)), "image (fewer than 3 photos)"
    n_groups = len(np.unique(data.groups.astype(str)))
    if n_groups < 3:
        return {"skipped": f"{n_groups} labelled images: the probes need at least 3"}
    ridge = RidgeConfig(n_splits=min(cfg.probe_splits, n_groups), inner_splits=min(3, n_groups - 1))
    result = analyse_probes(data, ProbeRun(ridge=ridge, n_shuffles=cfg.probe_shuffles, device=cfg.device,
                                           head=ScoreHeadConfig(epochs=cfg.head_epochs)))
    files = {"json": outputs.write_json(out / "probes.json", result.to_dict()),
             "head": result.head.save(out / "score_head")}
    probs = np.asarray(data.lens_probs)  # [layer, sample, level]
    final = probs[-1].argmax(-1)
    head = result.comparison
    mos = dict(zip(map(str, data.ids), np.asarray(data.mos, dtype=float), strict=True))
    return result.summary() | {
        "per_image": {"ids": list(head.eval_ids), "mos": [mos[str(i)] for i in head.eval_ids],
                      **{k: np.asarray(v, dtype=float) for k, v in head.predictions.items()}},
        "grouping": grouping, "n_groups": n_groups, "n_samples": len(data.ids),
        "lens_level_probs": probs.mean(1).tolist(),  # [layer, level] excellent .. bad
        "lens_final_prob": np.take_along_axis(probs, final[None, :, None], 2)[..., 0].mean(1).tolist(),
        "files": {k: str(v) for k, v in files.items()},
    }


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

    metrics: dict[str, dict[str, Any]] = {}
    for mode, path in paths.items():
        rater = load_rater(path, dtype=cfg.dtype, device=cfg.device)
        store = _rated_store(rater, test, out / f"{mode}.h5", cfg)
        lap(f"rate + record store ({mode})")
        m = analyse_store(store, rater, cfg, out / f"probes-{mode}")
        subset = iqa_metrics(np.array(m["scores"]), np.array(m["mos"]), on_invalid="flag")
        m["srcc_subset"] = subset.srcc
        held_out = pair.get("one_stage" if mode == "one-stage" else "two_stage") or {}
        m["srcc"] = held_out.get("srcc", subset.srcc)
        m["plcc"], m["level_acc"] = held_out.get("plcc", subset.plcc), held_out.get("level_acc")
        lap(f"lens, attribution, probes from the store ({mode})")
        inst = _instability(path, _pick(test, cfg.n_instability), cfg)
        m["instability"], m["accuracy"] = inst.ratio_mean_std, inst.accuracy_mean_std
        m["sessions"] = len(inst.ratio)
        m["per_image"]["instability"] = {"ids": [str(r.id) for r in _pick(test, cfg.n_instability)],
                                         **instability_per_image(inst.levels, inst.label_levels,
                                                                 inst.unstable)}
        lap(f"instability ({mode})")
        m["grounding"], m["per_image"]["grounding"] = _grounding(rater, test)
        lap(f"grounding ({mode})")
        metrics[mode] = m

    picked = _pick(test, cfg.n_patch)
    sweep = patch_image_tokens(open_source(paths["one-stage"], dtype=cfg.dtype, device=cfg.device),
                               [r.image_path for r in picked], k=5, batch_size=64).sweep
    metrics["one-stage"]["patching"] = _patching_effects(sweep)
    metrics["one-stage"]["per_image"]["patching"] = {
        "ids": [str(r.id) for r in picked],
        **{s: patching_per_image(sweep.score_effect, sweep.tags, s) for s in ("dominant", "random")}}
    figures.patching_effects(sweep, out / "patching.png", selections=("dominant", "random", "least", "all"))
    lap("patching")

    curves = {mode: m["probes"] for mode, m in metrics.items() if "layers" in (m.get("probes") or {})}
    if curves:
        figures.probe_lens_curves(curves, out / "probe_lens_curves.png")
    findings = judge(metrics)
    result = Result(metrics=metrics, findings=findings, seconds=seconds, paths=paths,
                    summary=str(out / "summary.json"))
    outputs.write_json(out / "summary.json", result, indent=2)
    return result


def _instability(path: str, records: list, cfg: Config) -> InstabilityResult:
    """5 sampled answers x 3 seeded sessions per image (`sample_checkpoint`), their levels summarised."""
    sampling = SamplingConfig(max_new_tokens=64)
    sampled = sample_checkpoint(open_source(path, dtype=cfg.dtype, device=cfg.device),
                                [r.image_path for r in records], sampling, batch_images=8)
    labels = [LEVEL_WORDS.index(r.level_word) if getattr(r, "level_word", None) in LEVEL_WORDS else -1
              for r in records]
    return summarise_instability(sampled.levels, np.array(labels), sampling.seeds)


def _grounding(rater: Any, records: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """Image path vs own-description path (`rate_paths`, `grounding`), ROUGE-1: summary, per-image flags."""
    ids = [str(r.id) for r in records]
    with torch.no_grad():
        paths = rate_paths(rater, Checkpoint.from_rater(rater).processor([r.image_path for r in records]),
                           batch_size=32)
    mos = [getattr(r, "mos01", None) for r in records]
    g = grounding(paths.image_probs, paths.text_probs, paths.descriptions, final_levels=paths.final_levels,
                  ids=ids, mos=None if None in mos else np.asarray(mos, dtype=float))
    refs = [getattr(r, "description", None) for r in records]
    rouge = rouge1(list(paths.descriptions), refs, ids=ids) if all(refs) else None
    summary = g.summary() | {"mode": paths.mode, "rouge1_f1": None if rouge is None else rouge.mean_f1}
    return summary, {"ids": ids, "contradiction": np.asarray(g.contradiction, dtype=float)}


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


def _patching_effects(sweep) -> dict[str, Any]:
    """Mean |change of the Q-Align score| and flip rate per selection, over layers, sites and setters."""
    out = {}
    for selection in sorted({t["selection"] for t in sweep.tags}):
        rows = [i for i, t in enumerate(sweep.tags) if t["selection"] == selection]
        effect = np.abs(sweep.score_effect[rows])
        flips = sweep.flipped[rows]
        out[selection] = {"abs_score_effect": (float(effect.mean()), float(effect.std())),
                          "flip_rate": float(flips.mean())}
    return out


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
    return [f.to_dict() | {"contrast": contrast.get(f.claim, "two-stage - one-stage")} for f in out]


def render(result: Result, console: Any) -> None:
    """The comparison report and where the summary is."""
    from mechbiqa.reports import comparison_report

    console.print(comparison_report(result.metrics, result.findings, result.seconds))
    console.print(f"summary: {result.summary}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
