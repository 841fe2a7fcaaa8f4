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
from mechbiqa.analysis.lens import LogitLens, lens_from_store
from mechbiqa.analysis.probes import RidgeConfig, ScoreHeadConfig
from mechbiqa.data import load_benchmark
from mechbiqa.metrics import iqa_metrics
from mechbiqa.pipeline import OneStageRater, TwoStageRater
from mechbiqa.scoring import level_ids
from mechbiqa.sources import load_rater
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
    # figures beside the store: <mode>.lens.png, <mode>.attention.png (one-stage: the two-stage row has no image)
    figures.lens_trajectories(lens, path.with_suffix(".lens.png"), title=f"Logit lens ({path.stem})")
    if has_image:
        figures.attention_heatmap(attr, path.with_suffix(".attention.png"),
                                  title=f"Attention of the quality position ({path.stem})")
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
        "image_mass_last_layer": float(last[role["image"]]),
        "description_mass_last_layer": float(last[role["description"]]),
        "top5_share": (float(attr.top_share.mean()), float(attr.top_share.std())) if has_image else None,
        "top5_jaccard": (attr.jaccard, attr.jaccard_chance) if has_image else None,
        "top5_consensus": attr.consensus.tolist() if has_image else None,
        "probes": probe_section(path, (lens_map, parts.tokenizer), str(parts.path), cfg, out),
    }


def probe_section(path: Path, read_out: Any, model: str, cfg: Config, out: Path) -> dict[str, Any]:
    """`studies/probes.py` on a store: probe and lens curves per layer, MLP head vs level words.

    Research choice: folds group the crops of one reference photo; with fewer than 3 photos
    among the stored images (the tiny benchmark) there is nothing to hold out by photo, and
    each image is its own group (the JSON says which: ``grouping``).
    """
    probes = _study("probes")
    data = probes.data_from_store(path, model, read_out=read_out)
    grouping = "photo"
    if len(np.unique(data.groups.astype(str))) < 3:
        data, grouping = replace(data, groups=np.asarray(data.ids)), "image (fewer than 3 photos)"
    n_groups = len(np.unique(data.groups.astype(str)))
    if n_groups < 3:
        return {"skipped": f"{n_groups} labelled images: the probes need at least 3"}
    pcfg = probes.Config(store=str(path), out=str(out), n_shuffles=cfg.probe_shuffles, device=cfg.device,
                         ridge=RidgeConfig(n_splits=min(cfg.probe_splits, n_groups), inner_splits=min(3, n_groups - 1)),
                         head=ScoreHeadConfig(epochs=cfg.head_epochs))
    result = probes.main(pcfg, data=data)
    probs = np.asarray(data.lens_probs)  # [layer, sample, level]
    final = probs[-1].argmax(-1)
    return result.summary() | {
        "grouping": grouping, "n_groups": n_groups, "n_samples": len(data.ids),
        "lens_level_probs": probs.mean(1).tolist(),  # [layer, level] excellent .. bad
        "lens_final_prob": np.take_along_axis(probs, final[None, :, None], 2)[..., 0].mean(1).tolist(),
        "files": {k: str(v) for k, v in result.files.items()},
    }


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

    pair = train_or_reuse(cfg, cache)
    lap("benchmark + training")
    paths = {"one-stage": pair["paths"]["one-stage"], "two-stage": pair["paths"]["two-stage"]}
    bench = load_benchmark(cache / "benchmark")
    test = _pick([r for r in bench.records if r.split == "test"], cfg.n_images)

    metrics: dict[str, dict[str, Any]] = {}
    for mode, path in paths.items():
        rater = load_rater(path, dtype=cfg.dtype, device=cfg.device)
        store = _rated_store(rater, test, out / f"{mode}.h5", cfg)
        lap(f"rate + record store ({mode})")
        m = analyse_store(store, rater, cfg, out / f"probes-{mode}")
        held_out = pair["one_stage" if mode == "one-stage" else "two_stage"]
        m["srcc"], m["plcc"], m["level_acc"] = held_out["srcc"], held_out.get("plcc"), held_out.get("level_acc")
        subset = iqa_metrics(np.array(m["scores"]), np.array(m["mos"]), on_invalid="flag")
        m["srcc_subset"] = subset.srcc
        if mode == "two-stage" and (pair.get("comparison") or {}).get("ci95"):
            m["srcc_diff_ci"] = pair["comparison"]["ci95"]
        metrics[mode] = m
        lap(f"lens, attribution, probes from the store ({mode})")

    patch = _study("patch_image_tokens")
    manifest = str(cache / "benchmark" / "manifest.jsonl")
    sweep = patch.main(patch.Config(model=paths["one-stage"], limit=cfg.n_patch, out=str(out / "patching"),
                                    device=cfg.device, dtype=cfg.dtype, dataset=manifest))
    metrics["one-stage"]["patching"] = _patching_effects(sweep.sweep)
    lap("patching")

    inst = _study("instability")
    for mode, path in paths.items():
        r = inst.main(inst.Config(model=path, limit=cfg.n_instability, out=str(out / f"instability-{mode}"),
                                  device=cfg.device, dtype=cfg.dtype, dataset=manifest))
        metrics[mode]["instability"] = r.instability.ratio_mean_std
        metrics[mode]["accuracy"] = r.instability.accuracy_mean_std
        metrics[mode]["sessions"] = len(r.instability.ratio)
        lap(f"instability ({mode})")

    grounding = _study("grounding")
    g = grounding.main(grounding.Config(checkpoints=tuple(f"{mode}={path}" for mode, path in paths.items()),
                                        limit=cfg.n_images, out=str(out / "grounding"), device=cfg.device,
                                        dtype=cfg.dtype, dataset=manifest))
    for mode, summary in g.summary().items():
        metrics[mode]["grounding"] = summary
    lap("grounding")

    curves = {mode: m["probes"] for mode, m in metrics.items() if "layers" in (m.get("probes") or {})}
    if curves:
        figures.probe_lens_curves(curves, out / "probe_lens_curves.png")
    findings = judge(metrics)
    result = Result(metrics=metrics, findings=findings, seconds=seconds, paths=paths,
                    summary=str(out / "summary.json"))
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
    """One plain sentence per finding of the paper, and whether it held on this run."""
    one, two = m["one-stage"], m["two-stage"]
    out = []

    def add(finding: str, held: bool | None, evidence: str, *values: float) -> None:
        # NaN anywhere (e.g. a checkpoint that never names a level) leaves the finding undecided
        if any(not np.isfinite(v) for v in values):
            held = None
        out.append({"finding": finding, "held": None if held is None else bool(held), "evidence": evidence})

    ci = two.get("srcc_diff_ci")  # paired bootstrap 95% interval of SRCC(two) - SRCC(one)
    if ci:
        # held only when the interval excludes zero; an interval around zero is no evidence either way
        held = True if ci[0] > 0 else False if ci[1] < 0 else None
        add("Two-stage tuning rates better than one-stage (SRCC on the test split).", held,
            f"SRCC {one['srcc']:.3f} (one-stage) vs {two['srcc']:.3f} (two-stage); difference 95% CI "
            f"[{ci[0]:+.3f}, {ci[1]:+.3f}]", one["srcc"], two["srcc"], *ci)
    else:
        add("Two-stage tuning rates better than one-stage (SRCC on the test split).",
            two["srcc"] > one["srcc"], f"SRCC {one['srcc']:.3f} (one-stage) vs {two['srcc']:.3f} (two-stage)",
            one["srcc"], two["srcc"])
    def beyond_noise(a: tuple[float, float], b: tuple[float, float]) -> bool:
        # session means +- their spread: decided only when the difference of the means exceeds two standard
        # errors; a mean over n sessions has standard error std / sqrt(n)
        n = min(one.get("sessions", 3), two.get("sessions", 3))
        return abs(b[0] - a[0]) > 2 * np.sqrt((a[1] ** 2 + b[1] ** 2) / max(n, 1))

    ins1, ins2 = one.get("instability"), two.get("instability")
    if ins1 and ins2:
        add("Two-stage answers are more stable under sampling (paper: 22% -> 12%).",
            (ins2[0] < ins1[0]) if beyond_noise(ins1, ins2) else None,
            f"instability {100 * ins1[0]:.1f}% +- {100 * ins1[1]:.1f} vs {100 * ins2[0]:.1f}% +- {100 * ins2[1]:.1f}")
    acc1, acc2 = one.get("accuracy"), two.get("accuracy")
    if acc1 and acc2:
        add("Two-stage answers hit the label's level more often (paper: 52.5% -> 61.2%).",
            (acc2[0] > acc1[0]) if beyond_noise(acc1, acc2) else None,
            f"level accuracy {100 * acc1[0]:.1f}% +- {100 * acc1[1]:.1f} vs {100 * acc2[0]:.1f}% +- "
            f"{100 * acc2[1]:.1f}")
    add("The one-stage quality token attends to image tokens; the two-stage one to the description.",
        one["image_mass"][0] > two["image_mass"][0] and two["description_mass"][0] > one["description_mass"][0],
        f"image mass {one['image_mass'][0]:.3f} vs {two['image_mass'][0]:.3f}; description mass "
        f"{one['description_mass'][0]:.3f} vs {two['description_mass'][0]:.3f}")
    if one.get("top5_jaccard"):
        jac, chance = one["top5_jaccard"]
        add("A few dominant image tokens recur across images (one-stage top-5 overlap above chance).", jac > 1.5 * chance,
            f"mean pairwise Jaccard {jac:.3f} vs chance {chance:.3f}; top-5 take {100 * one['top5_share'][0]:.1f}% "
            "of the image attention")
    patching = one.get("patching", {})
    if "dominant" in patching and "random" in patching:
        top, rnd = patching["dominant"]["abs_score_effect"][0], patching["random"]["abs_score_effect"][0]
        # below 0.01 on the 0-1 score neither ablation does anything worth ranking
        add("Ablating the five dominant image tokens moves the one-stage score more than five random ones.",
            (top > rnd) if max(top, rnd) >= 0.01 else None,
            f"mean |delta score| {top:.4f} (top-5) vs {rnd:.4f} (random-5)", top, rnd)
    add("One-stage answers flip more across intermediate layers (logit lens).",
        one["lens_changes"][0] > two["lens_changes"][0],
        f"answer changes across layers {one['lens_changes'][0]:.2f} vs {two['lens_changes'][0]:.2f}")
    g1, g2 = one.get("grounding", {}), two.get("grounding", {})
    if "contradiction_rate" in g1 and "contradiction_rate" in g2:
        add("Two-stage answers contradict the model's own description less often.",
            g2["contradiction_rate"] < g1["contradiction_rate"],
            f"contradiction rate {g1['contradiction_rate']:.3f} vs {g2['contradiction_rate']:.3f}")
    # the companion papers' questions, from the probes of each checkpoint's store
    heads = {mode: _head_srcc(m) for mode, m in (("one-stage", one), ("two-stage", two))}
    if all(h is not None for h in heads.values()):
        (h1, w1), (h2, w2) = heads["one-stage"], heads["two-stage"]
        add("A regression head on the quality position's hidden state rates better than the level words "
            "(Q-Scorer), for both checkpoints.", h1 > w1 and h2 > w2,
            f"SRCC MLP head vs level words on held-out photos: {h1:.3f} vs {w1:.3f} (one-stage), "
            f"{h2:.3f} vs {w2:.3f} (two-stage)", h1, w1, h2, w2)
    p1 = one.get("probes") or {}
    if p1.get("probe_decodable_layer") is not None and p1.get("lens_settle_median") is not None:
        dec, settle = p1["probe_decodable_layer"], p1["lens_settle_median"]
        add("In the one-stage model quality is linearly decodable at an earlier layer than the one where "
            "its answer settles (probes vs logit lens).", dec < settle,
            f"probe reaches 90% of its best SRCC at layer {dec}; the lens answer settles at median layer {settle:g}",
            float(dec), float(settle))
    return out


def _head_srcc(m: dict[str, Any]) -> tuple[float, float] | None:
    """(MLP head SRCC, level-word SRCC) on the same held-out images, or None without probes."""
    metrics = ((m.get("probes") or {}).get("score_head") or {}).get("metrics") or {}
    if "mlp_head" not in metrics or "level_word" not in metrics:
        return None
    as_float = lambda v: float("nan") if v is None else float(v)  # noqa: E731  (JSON null = NaN)
    return as_float(metrics["mlp_head"]["srcc"]), as_float(metrics["level_word"]["srcc"])


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
