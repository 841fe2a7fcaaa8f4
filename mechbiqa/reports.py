"""Rendering: results (dataclasses, arrays) -> rich renderables. Nothing is computed here.

Studies return results; these functions turn them into tables and bar rows that a
`rich.console.Console` prints. Keeping rendering apart lets tests check numbers
without parsing text, and lets a user re-render a saved result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from mechbiqa.model.prompts import LEVEL_WORDS

if TYPE_CHECKING:
    from mechbiqa.analysis.attribution import AttributionResult
    from mechbiqa.analysis.evaluation import EvaluationResult
    from mechbiqa.analysis.instability import InstabilityResult
    from mechbiqa.analysis.lens import LensResult
    from mechbiqa.analysis.patching import SweepResult

LEVEL_COLOURS = ("green", "bright_green", "yellow", "orange3", "red")  # excellent .. bad
_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int = 20, style: str = "cyan") -> Text:
    """A horizontal bar of ``fraction`` in [0, 1] drawn with eighth-blocks."""
    fraction = float(np.clip(fraction, 0.0, 1.0))
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    return Text("█" * full + (_BLOCKS[rest] if rest else "") + " " * (width - full - (1 if rest else 0)), style=style)


def level_distribution(probs: Sequence[float], width: int = 20) -> Text:
    """One stacked bar of the five level probabilities, coloured excellent (green) to bad (red)."""
    out = Text()
    cells = np.round(np.asarray(probs, dtype=float) * width).astype(int)
    cells[int(np.argmax(probs))] += width - cells.sum()  # absorb rounding in the largest cell
    for n, colour in zip(cells, LEVEL_COLOURS):
        out.append("█" * max(int(n), 0), style=colour)
    return out


def level_legend() -> Text:
    """The colour key of `level_distribution`."""
    out = Text()
    for word, colour in zip(LEVEL_WORDS, LEVEL_COLOURS):
        out.append("█ ", style=colour).append(word + "  ")
    return out


_SPARK = "▁▂▃▄▅▆▇█"


def _buckets(values: Sequence[float] | Sequence[int] | np.ndarray, max_width: int) -> tuple[np.ndarray, int]:
    """``values`` averaged in consecutive groups so at most ``max_width`` remain, and the group size."""
    values = np.asarray(values, dtype=float)
    size = max(1, int(np.ceil(len(values) / max(max_width, 1))))
    if size == 1:
        return values, 1
    groups = [values[i : i + size] for i in range(0, len(values), size)]
    return np.array([np.nanmean(g) if np.isfinite(g).any() else np.nan for g in groups]), size


def sparkline(values: Sequence[float] | np.ndarray, lo: float = 0.0, hi: float = 1.0, max_width: int = 40,
              style: str = "cyan") -> Text:
    """One eighth-block character per value (per group of values beyond ``max_width``), ``lo``..``hi``.

    A layer table of a 32-layer model stays one line per row: the curve over layers is a
    sparkline instead of 32 numbers. NaN is a blank.
    """
    shown, _ = _buckets(values, max_width)
    out = Text(no_wrap=True, overflow="crop")
    span = hi - lo if hi > lo else 1.0
    for v in shown:
        if not np.isfinite(v):
            out.append(" ")
            continue
        out.append(_SPARK[int(np.clip(round((v - lo) / span * 7), 0, 7))], style=style)
    return out


def signed_sparkline(
    values: Sequence[float] | np.ndarray, scale: float, max_width: int = 40, dead: float = 0.01
) -> Text:
    """`sparkline` for signed values: height |value| / ``scale``; red below 0, green above, dim near 0."""
    shown, _ = _buckets(values, max_width)
    out = Text(no_wrap=True, overflow="crop")
    scale = scale if scale > 0 else 1.0
    for v in shown:
        if not np.isfinite(v):
            out.append(" ")
            continue
        style = "red" if v < -dead else "green" if v > dead else "dim"
        out.append(_SPARK[int(np.clip(round(abs(v) / scale * 7), 0, 7))], style=style)
    return out


def _clip(text: str, style: str = "") -> Text:
    """A cell that never wraps: cut with an ellipsis when its column is narrowed to fit the console."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _per(size: int) -> str:
    return "one character per layer" if size == 1 else f"one character per {size} layers (their mean)"


def ratings_table(names: Sequence[str], scores: np.ndarray, level_probs: np.ndarray, title: str = "") -> Table:
    """One row per image: score, predicted level and the level distribution."""
    table = Table(title=title or None, caption=level_legend())
    table.add_column("image")
    table.add_column("score (0-1)", justify="right")
    table.add_column("level")
    table.add_column("p(excellent .. bad)", no_wrap=True, min_width=20)
    for name, score, probs in zip(names, scores, level_probs):
        k = int(np.argmax(probs))
        table.add_row(name, f"{score:.3f}", Text(LEVEL_WORDS[k], style=LEVEL_COLOURS[k]), level_distribution(probs))
    return table


# ----------------------------------------------------------------------------- study tables
# The tables below render the results of `mechbiqa.analysis` (lens, attribution, patching,
# instability, evaluation); the studies print them only when run as scripts.
def _pct(x: float, digits: int = 1) -> str:
    return "—" if not np.isfinite(x) else f"{100 * x:.{digits}f}%"


def _num(x: float, digits: int = 3) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def lens_table(
    result: LensResult, title: str = "Logit lens at the quality position", top_k: int = 3
) -> Table:
    """One row per layer: level distribution bar, answer, agreement, settled share, top tokens.

    The level distribution is the mean over samples; "agree" is the share of samples whose
    answer at the layer is their final one; "settled" the share whose answer never changes
    after the layer (◀ marks the median settle layer). Every row is one line at any width: the
    top tokens are cut with an ellipsis when the console is narrow (80 columns at 32 layers).

    Args:
        result: A `mechbiqa.analysis.lens.LensResult`.
        title: Table title.
        top_k: Top tokens shown per layer.
    """
    mean = result.mean_level_probs
    settled = [(result.settle <= layer).mean() for layer in result.layers]
    median = result.median_settle
    caption = Text.assemble(
        level_legend(),
        f"\n{len(result.sample_ids)} samples; p(level): softmax over the five level words, mean over "
        "samples; mass: the level words' share of the full vocabulary",
    )
    table = Table(title=title, caption=caption)
    for name, justify in (("layer", "right"), ("p(level)", "left"), ("answer", "left"), ("agree", "right"),
                          ("settled", "right"), ("mass", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    table.add_column("top tokens", justify="left", ratio=1)  # narrowed first; its cells cut, never wrap
    for i, layer in enumerate(result.layers):
        k = int(np.argmax(mean[i]))
        tokens = " ".join(
            f"{t.strip() or repr(t)}·{100 * p:.0f}%"
            for t, p in zip(result.top_tokens[i][:top_k], result.top_probs[i][:top_k], strict=True)
        )
        marker = "◀" if layer == int(np.ceil(median)) else " "
        table.add_row(
            str(int(layer)),
            level_distribution(mean[i].tolist(), width=10),
            Text(result.level_words[k], style=LEVEL_COLOURS[k]),
            _pct(result.agreement[i], 0),
            _pct(settled[i], 0) + marker,
            _pct(result.level_mass[i].mean(), 0),
            _clip(tokens or "—"),
        )
    return table


def lens_answers_table(result: LensResult, title: str = "Trajectories by final answer") -> Table:
    """One row per final answer that occurs: samples, median settle layer, answer changes, P(final) by layer.

    The probability of the final level along the layers is a sparkline (0 to 1), so a 32-layer
    model keeps one line per row in 80 columns; ``last`` is its value at the last layer.
    """
    _, size = _buckets(result.layers, 32)
    first, last = int(result.layers[0]), int(result.layers[-1])
    table = Table(title=title, caption=f"p(final): mean probability of the final level (0 to 1), layers "
                                       f"{first}..{last}, {_per(size)}")
    for name, justify in (("answer", "left"), ("n", "right"), ("settle", "right"), ("flips", "right"),
                          ("p(final) by layer", "left"), ("last", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for k, word in enumerate(result.level_words):
        chosen = result.final == k
        if not chosen.any():
            continue
        path = result.by_answer[k][:, k]
        table.add_row(
            Text(word, style=LEVEL_COLOURS[k]),
            str(int(chosen.sum())),
            f"{np.median(result.settle[chosen]):g}",
            f"{result.n_changes[chosen].mean():.2f}",
            sparkline(path, max_width=32, style=LEVEL_COLOURS[k]),
            f"{path[-1]:.2f}",
        )
    return table


def attribution_table(
    result: AttributionResult, title: str = "Attention of the quality position by role"
) -> Table:
    """One row per layer: attention mass per role (mean over heads, samples) and the head most on the image.

    Args:
        result: A `mechbiqa.analysis.attribution.AttributionResult`.
        title: Table title.
    """
    from mechbiqa.model.roles import Role

    short = {
        Role.BOS: "bos",
        Role.INSTRUCTION: "instr",
        Role.IMAGE: "image",
        Role.DESCRIPTION: "descr",
        Role.QUALITY: "self",
        Role.OTHER: "other",
    }
    table = Table(
        title=title,
        caption="mass per role sums to 1 per layer and head; 'self' = the quality position; "
        "'head' = the head that attends most to the image, and its image mass",
    )
    table.add_column("layer", justify="right", no_wrap=True)
    for role in short.values():
        table.add_column(role, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True, min_width=6)
    table.add_column("head", justify="right", no_wrap=True)
    layer_mass = result.layer_mass()
    for i, layer in enumerate(result.layers):
        head = int(np.argmax(result.mass[i, :, Role.IMAGE]))
        table.add_row(
            str(int(layer)),
            *[_pct(layer_mass[i, r], 0) for r in short],
            bar(layer_mass[i, Role.IMAGE], 6),
            f"h{head} {_pct(result.mass[i, head, Role.IMAGE], 0)}",
        )
    return table


def dominant_tokens_table(result: AttributionResult, title: str = "Dominant image tokens") -> Table:
    """The consensus top-k image tokens: how often each is in a sample's top-k, and its mean attention."""
    mean_score = result.token_score.mean(0)
    caption = (
        f"top-{result.k} per sample by attention averaged over layers {list(result.score_layers)} and heads; "
        f"mean pairwise Jaccard {result.jaccard:.2f} (chance {result.jaccard_chance:.2f}); "
        f"the top-{result.k} take {_pct(float(result.top_share.mean()))} of the image attention"
    )
    table = Table(title=title, caption=caption)
    for name in ("rank", "image index", "in top-k of", "mean attention", ""):
        table.add_column(name, justify="right" if name != "" else "left", no_wrap=True)
    peak = float(mean_score.max()) if mean_score.size and mean_score.max() > 0 else 1.0
    for rank, index in enumerate(result.consensus):
        table.add_row(
            str(rank + 1),
            str(int(index)),
            _pct(result.frequency[index]),
            f"{mean_score[index]:.4f}",
            bar(mean_score[index] / peak, 16),
        )
    return table


def patching_table(
    result: SweepResult, title: str = "Patching the image tokens: score change by layer"
) -> Table:
    """One row per (site, setter, selection): mean score change along the layers, its largest value, flips.

    The change per layer is a signed sparkline (height |Δscore| relative to the largest in the
    table; red lowers the score, green raises it), so any number of layers fits 80 columns;
    the numbers per layer are in the study's JSON.

    Args:
        result: A `mechbiqa.analysis.patching.SweepResult`.
        title: Table title.
    """
    keys, layers, effect = result.grid("score_effect", rows=("site", "setter", "selection"))
    _, _, diff = result.grid("logit_diff_effect", rows=("site", "setter", "selection"))
    _, _, flips = result.grid("flip_rate", rows=("site", "setter", "selection"))
    scale = float(np.nanmax(np.abs(effect))) if np.isfinite(effect).any() else 1.0
    _, size = _buckets(layers, 24)
    caption = (
        f"{result.score.shape[1]} image(s), {len(result.labels)} configurations in {result.n_forwards} "
        f"forwards; clean score {result.clean_score.mean():.3f}; Δ by layer: layers "
        f"{layers[0]}..{layers[-1]}, "
        f"{_per(size)}, full height = |Δscore| {scale:.3f}; largest: the change of largest size, its "
        "Δ(good−poor) and layer; flips: the highest answer flip rate and its layer"
    )
    table = Table(title=title, caption=caption)
    for name, justify in (("site/setter", "left"), ("tokens", "left"), ("Δ by layer", "left"),
                          ("largest", "right"), ("flips", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for row, key in enumerate(keys):
        site, setter, selection = (str(k) for k in key)
        e = effect[row]
        if not np.isfinite(e).any():
            table.add_row(_clip(f"{site}/{setter}"), _clip(selection), "", "—", "—")
            continue
        at = int(np.nanargmax(np.abs(e)))
        worst = int(np.nanargmax(np.where(np.isfinite(flips[row]), flips[row], -1)))
        style = "red" if e[at] < -0.01 else "green" if e[at] > 0.01 else ""
        table.add_row(
            _clip(f"{site}/{setter}"),
            _clip(selection),
            signed_sparkline(e, scale, max_width=24),
            Text(f"{e[at]:+.3f} {diff[row, at]:+.1f} L{layers[at]}", style=style),
            f"{_pct(flips[row, worst], 0)} L{layers[worst]}",
        )
    return table


def instability_table(result: InstabilityResult, title: str = "Instability of sampled answers") -> Table:
    """One row per session (seed), then mean ± std: instability ratio, level accuracy, majority-vote accuracy.

    Args:
        result: A `mechbiqa.analysis.instability.InstabilityResult`.
        title: Table title.
    """
    n_sessions, n_images, n_answers = result.levels.shape
    counts = result.level_counts()
    spread = ", ".join(f"{w} {c}" for w, c in zip([*LEVEL_WORDS, "none"], counts, strict=True))
    caption = (
        f"{n_images} images x {n_answers} answers per session; uniform random answers would give "
        f"{_pct(result.expected_uniform)}; answers without a level word: {_pct(result.not_level_rate)}; "
        "accuracy = answers at the label's level, majority = images whose most common level is it\n"
        f"answers per level: {spread}"
    )
    table = Table(title=title, caption=caption)
    for name in ("session", "seed", "unstable", "", "accuracy", "majority"):
        table.add_column(name, justify="right" if name not in ("", "session") else "left", no_wrap=True)
    seeds = result.seeds or tuple(range(n_sessions))
    for s in range(n_sessions):
        table.add_row(
            str(s),
            str(seeds[s]),
            _pct(result.ratio[s]),
            bar(result.ratio[s], 12, "red"),
            _pct(result.accuracy[s]),
            _pct(result.majority_accuracy[s]),
        )
    mean, std = result.ratio_mean_std
    acc, acc_std = result.accuracy_mean_std
    table.add_row(
        Text("mean±std", style="bold"),
        "",
        f"{_pct(mean)} ± {_pct(std)}",
        bar(mean, 12, "red"),
        f"{_pct(acc)} ± {_pct(acc_std)}" if np.isfinite(acc) else "—",
        "",
    )
    return table


def evaluation_table(result: EvaluationResult, title: str = "Quality evaluation") -> Table:
    """One row per data set (and pooled): SRCC, KRCC, PLCC raw and fitted, fitted RMSE, time per image.

    Args:
        result: A `mechbiqa.analysis.evaluation.EvaluationResult`.
        title: Table title.
    """
    caption = (
        f"{result.checkpoint}\nSRCC/KRCC/PLCC on raw scores; * = after the {result.fit} fit (RMSE in "
        "rating units); DMOS data sets negated so higher is better; n = rated/all images; "
        "ms/img = model time per image"
    )
    table = Table(title=title, caption=caption)
    for name in ("data set", "n", "SRCC", "KRCC", "PLCC", "PLCC*", "RMSE*", "ms/img", "flags"):
        table.add_column(
            name, justify="left" if name in ("data set", "flags") else "right", no_wrap=name != "flags"
        )
    for row in result.rows:
        m = row.metrics
        table.add_row(
            row.name,
            f"{m.n}/{row.n}" if m.n != row.n else str(row.n),
            _num(m.srcc),
            _num(m.krcc),
            _num(m.plcc_raw),
            _num(m.plcc_fitted),
            _num(m.rmse_fitted),
            _num(1000 * row.seconds_per_image, 1),
            ", ".join(m.flags),
        )
    return table


# ----------------------------------------------------------------------------- grounding, ROUGE-1, probes
# Tables of `mechbiqa.analysis.grounding`, `.rouge` and `.probes` (studies/grounding.py, studies/probes.py).
if TYPE_CHECKING:  # noqa: E402 (this section is appended; its types are only for annotations)
    from mechbiqa.analysis.grounding import GroundingResult
    from mechbiqa.analysis.probes import HeadComparison, ProbeCurve
    from mechbiqa.analysis.rouge import RougeResult


def grounding_table(
    results: dict[str, GroundingResult],
    rouge: dict[str, RougeResult] | None = None,
    title: str = "Grounding: image path vs the model's own description (text only)",
) -> Table:
    """One row per checkpoint: contradiction rate, agreement, description-verdict conflicts, ROUGE-1.

    Args:
        results: Checkpoint name -> `GroundingResult`.
        rouge: Checkpoint name -> `RougeResult` of its descriptions (optional).
        title: Table title.
    """
    caption = (
        "contradiction: image- and text-path levels differ by >= 1 level; agreement: SRCC of the two "
        "paths' scores; conflicts: severe description -> excellent/good, clean description -> "
        "poor/bad "
        "(share of all images; per class in brackets); ROUGE-1 F1 against the reference descriptions"
    )
    table = Table(title=title, caption=caption)
    for name in (
        "checkpoint",
        "n",
        "contradiction",
        "",
        "agreement SRCC",
        "level gap",
        "conflicts",
        "severe→good",
        "clean→bad",
        "SRCC image",
        "SRCC text",
        "ROUGE-1",
    ):
        table.add_column(name, justify="left" if name in ("checkpoint", "") else "right", no_wrap=True)
    for name, g in results.items():
        r = (rouge or {}).get(name)
        counts = g.severity_counts
        table.add_row(
            name,
            str(g.n),
            _pct(g.contradiction_rate),
            bar(g.contradiction_rate, 10, "red"),
            _num(g.agreement_srcc),
            _num(g.mean_level_gap, 2),
            _pct(g.conflict_rate),
            f"{g.conflict.count('severe->good')}/{counts['severe']} ({_pct(g.severe_to_good_rate, 0)})",
            f"{g.conflict.count('clean->bad')}/{counts['clean']} ({_pct(g.clean_to_bad_rate, 0)})",
            _num(g.srcc_image),
            _num(g.srcc_text),
            "—" if r is None else _num(r.mean_f1),
        )
    return table


def rouge_table(result: RougeResult, limit: int = 10, title: str = "ROUGE-1 per image") -> Table:
    """The lowest- and highest-scoring images (``limit`` of each) and the mean.

    Args:
        result: A `RougeResult`.
        limit: Rows shown at each end.
        title: Table title.
    """
    stem = "with" if result.use_stemmer else "without"
    table = Table(title=title, caption=f"rouge-score ROUGE-1, {stem} Porter stemming; {result.n} images")
    for name in ("image", "F1", "", "precision", "recall"):
        table.add_column(name, justify="left" if name in ("image", "") else "right", no_wrap=True)
    order = np.argsort(result.f1, kind="stable")
    shown = order if result.n <= 2 * limit else np.concatenate([order[:limit], order[-limit:]])
    for k, i in enumerate(shown):
        if result.n > 2 * limit and k == limit:
            table.add_row("…", "", "", "", "")
        table.add_row(
            result.ids[i] or str(i),
            _num(result.f1[i]),
            bar(result.f1[i], 10),
            _num(result.precision[i]),
            _num(result.recall[i]),
        )
    table.add_row(
        Text("mean", style="bold"),
        _num(result.mean_f1),
        bar(result.mean_f1, 10),
        _num(result.mean_precision),
        _num(result.mean_recall),
    )
    return table


def probe_table(
    curve: ProbeCurve,
    lens_srcc: np.ndarray | None = None,
    lens_agreement: np.ndarray | None = None,
    title: str = "Linear probes vs logit lens at the quality position",
) -> Table:
    """One row per layer: ridge-probe SRCC (and its shuffled-label control) beside the logit-lens curve.

    Args:
        curve: The `ProbeCurve`.
        lens_srcc: ``[layer]`` SRCC of the lens's Q-Align score in the same folds (optional).
        lens_agreement: ``[layer]`` share of lens answers equal to the final one (optional).
        title: Table title.
    """
    caption = (
        f"probe: SRCC of ridge probes, {curve.config.n_splits}-fold CV by reference photo ({curve.n_groups} "
        f"photos, {curve.n_samples} samples), within held-out folds; chance: the same with shuffled labels; "
        "alpha: median penalty (inner photo CV); lens: SRCC of the lens's Q-Align score, same folds; final: "
        f"lens answers equal to the final one; decodable = first layer at 90% of the best probe "
        f"({curve.decodable_layer()})"
    )
    table = Table(title=title, caption=caption)
    for name in ("layer", "probe", "", "chance", "alpha", "lens", "", "final"):
        table.add_column(name, justify="left" if name in ("layer", "") else "right", no_wrap=True)
    for i, layer in enumerate(curve.layers):
        lens = np.nan if lens_srcc is None else float(lens_srcc[i])
        table.add_row(
            str(layer),
            _num(curve.srcc[i]),
            bar(max(float(curve.srcc[i]), 0.0), 8, "cyan"),
            "—" if curve.control_srcc is None else _num(curve.control_srcc[i]),
            f"{np.median(curve.alphas[i]):.3g}",
            _num(lens),
            bar(max(lens, 0.0) if np.isfinite(lens) else 0.0, 8, "magenta"),
            "—" if lens_agreement is None else _pct(lens_agreement[i], 0),
        )
    return table


def score_head_table(
    comparisons: dict[str, HeadComparison], title: str = "Level-word score vs regression on held-out photos"
) -> Table:
    """One row per (checkpoint, scorer): SRCC and PLCC of the level-word score, MLP head and ridge probe.

    Args:
        comparisons: Checkpoint name -> `mechbiqa.analysis.probes.HeadComparison`.
        title: Table title.
    """
    caption = "same images for every scorer; PLCC raw and after the 4-parameter logistic"
    table = Table(title=title, caption=caption)
    for name in ("checkpoint", "scorer", "layer", "train / eval", "SRCC", "", "PLCC", "PLCC fitted"):
        left = name in ("checkpoint", "scorer", "")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)
    labels = {"level_word": "level words (Q-Align)", "mlp_head": "MLP head", "ridge": "ridge probe"}
    for name, c in comparisons.items():
        for key, m in c.metrics.items():
            layer = "final" if key == "level_word" else str(c.layer)
            table.add_row(
                name,
                labels.get(key, key),
                layer,
                f"{c.n_train} / {c.n_eval} ({c.eval_split})",
                _num(m["srcc"]),
                bar(max(m["srcc"], 0.0) if np.isfinite(m["srcc"]) else 0.0, 10),
                _num(m["plcc"]),
                _num(m["plcc_fitted"]),
            )
    return table


# ----------------------------------------------------------------------------- replication (studies/replicate.py)
def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return f"{v[0]:.3f} ± {v[1]:.3f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def comparison_report(metrics: dict, findings: list[dict], seconds: dict[str, float]):
    """One-stage vs two-stage side by side, the SRCCs per image set, then the findings (held or not).

    Every table fits an 80-column terminal, at any number of layers.
    """
    from rich.console import Group

    one, two = metrics["one-stage"], metrics["two-stage"]
    rows = [
        ("instability ratio (5 answers x 3 seeds)", one.get("instability"), two.get("instability")),
        ("level accuracy of sampled answers", one.get("accuracy"), two.get("accuracy")),
        ("attention on the image tokens", one.get("image_mass"), two.get("image_mass")),
        ("attention on the description", one.get("description_mass"), two.get("description_mass")),
        ("description share of non-image attention", one.get("description_share"),
         two.get("description_share")),
        ("share of image attention on the top 5", one.get("top5_share"), two.get("top5_share")),
        ("logit lens: answer changes across layers", one.get("lens_changes"), two.get("lens_changes")),
        ("logit lens: layer where the answer settles", one.get("lens_settle"), two.get("lens_settle")),
    ]
    if one.get("plcc") is not None or two.get("plcc") is not None:
        rows.insert(0, ("PLCC, test split", one.get("plcc"), two.get("plcc")))
    for selection in ("dominant", "random", "least"):
        p = one.get("patching", {}).get(selection)
        if p:
            rows.append((f"|Δ score| ablating {selection} 5 image tokens", p["abs_score_effect"], None))
            rows.append((f"answer flips ablating {selection} 5 tokens", p["flip_rate"], None))
    for key, label in (("contradiction_rate", "contradiction rate (image vs own text)"),
                       ("agreement_srcc", "agreement SRCC (image vs own text)"),
                       ("conflict_rate", "descriptions contradicting the verdict"),
                       ("rouge1_f1", "ROUGE-1 F1 of descriptions")):
        rows.append((label, one.get("grounding", {}).get(key), two.get("grounding", {}).get(key)))
    p1, p2 = one.get("probes") or {}, two.get("probes") or {}
    rows.append(("probes: best layer", p1.get("probe_best_layer"), p2.get("probe_best_layer")))
    rows.append(("probes: quality decodable from layer", p1.get("probe_decodable_layer"),
                 p2.get("probe_decodable_layer")))
    table = Table(title="one-stage vs two-stage (mean ± std where a spread exists)")
    table.add_column("metric")
    table.add_column("one-stage", justify="right", no_wrap=True)
    table.add_column("two-stage", justify="right", no_wrap=True)
    for label, a, b in rows:
        table.add_row(label, _value(a), _value(b))
    verdicts = [Text("\nthe paper's findings on this run (paired tests over images, two-sided, 5%)",
                     style="bold")]
    verdicts += [_finding_text(f) for f in findings]
    timing = Text("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), style="dim")
    return Group(table, *srcc_table(metrics), *paper_exhibits(metrics), *probe_lens_curves_tables(metrics),
                 *verdicts, timing)


def paper_exhibits(metrics: dict) -> list:
    """The paper's Table 1 and Fig. 6 (as tables) and where the figures are, from the main job's metrics.

    Reads ``metrics[mode]["table1"]`` (a `Table1Row.to_dict`) and ``metrics[mode]["paper_figures"]``
    (`mechbiqa.analysis.paper_figures.paper_figures`'s return value); nothing when neither is there.
    """
    from mechbiqa.analysis.paper_figures import Fig6Data, Table1Row

    out: list = []
    rows = [Table1Row.from_dict(m["table1"]) for m in metrics.values() if m.get("table1")]
    if rows:
        out.append(table1(rows))
    for mode, m in metrics.items():
        paper = m.get("paper_figures") or {}
        if paper.get("fig6"):
            title = f"Fig. 6 ({mode}): the argmax level of the samples labelled"
            out.append(fig6_table(Fig6Data.from_dict(paper["fig6"]), title=title))
        for name, path in (paper.get("files") or {}).items():
            out.append(Text(f"  {mode} {name}: {path}", style="dim", overflow="fold"))
    return out


def srcc_table(metrics: dict) -> list:
    """One SRCC per image set and scorer, for each rater with its sample count; then why two differ.

    Args:
        metrics: ``studies/replicate.py``'s metrics (`mechbiqa.analysis.srcc_splits.srcc_entries`
            reads what each rater recorded).

    Returns:
        The table and one line per difference (nothing when no SRCC was recorded).
    """
    from mechbiqa.analysis.srcc_splits import SCORERS, srcc_differences, srcc_entries

    entries = srcc_entries(metrics)
    if not entries:
        return []
    raters = list(dict.fromkeys(e.rater for e in entries))
    table = Table(title="SRCC against the label, per image set (n = images)",
                  caption="n: the images the SRCC is computed on; where two differ, the lines below "
                          "say why (with the smaller set's 95% bootstrap interval)")
    table.add_column("images")
    table.add_column("scorer")
    for rater in raters:
        table.add_column(rater, justify="right", no_wrap=True)
    for split, scorer in dict.fromkeys((e.split, e.scorer) for e in entries):
        found = {e.rater: e for e in entries if (e.split, e.scorer) == (split, scorer)}
        counts = {e.n or "?" for e in found.values()}
        shared = len(counts) == 1  # the usual case: every rater on the same images; n goes with the set
        cells = ["—" if rater not in found else _num(found[rater].srcc) if shared
                 else f"{_num(found[rater].srcc)} (n={found[rater].n or '?'})" for rater in raters]
        table.add_row(f"{split} (n={counts.pop()})" if shared else split, SCORERS[scorer], *cells)
    why = srcc_differences(entries)
    lines: list = [table]
    if why:
        lines.append(Text("why the SRCCs differ:", style="bold"))
        lines += [Padding(Text("• " + line), (0, 0, 0, 2)) for line in why]
    return lines


def _finding_text(f: dict) -> Text:
    """A finding in three short lines: verdict and claim; the test; effect (units), CI, p-value, n."""
    verdict = f.get("verdict") or {True: "held", False: "did not hold"}.get(f.get("held"), "inconclusive")
    style = {"held": "green", "did not hold": "red"}.get(verdict, "yellow")
    out = Text.assemble((f"[{verdict}] ", f"bold {style}"), f["finding"])
    if f.get("test"):
        out.append(f"\n    test: {f['test']}", style="dim")
    effect, ci, p_value = f.get("effect"), f.get("ci"), f.get("p_value")
    if effect is not None and np.isfinite(effect) and p_value is not None and np.isfinite(p_value):  # effect and units on one line, the uncertainty on the next (80 columns)
        contrast = f" ({f['contrast']})" if f.get("contrast") else ""
        out.append(f"\n    effect {effect:+.3g} {f.get('units', '')}".rstrip() + contrast)
        parts = []
        if ci is not None and all(v is not None and np.isfinite(v) for v in ci):
            parts.append(f"{100 * f.get('ci_level', 0.95):g}% CI [{ci[0]:+.3g}, {ci[1]:+.3g}]")
        if p_value is not None and np.isfinite(p_value):
            parts.append(f"p = {p_value:.3g}")
        parts.append(f"n = {f.get('n')} images")
        out.append("\n    " + ", ".join(parts))
    elif f.get("evidence"):
        out.append(f"\n    {f['evidence']}")
    return out


def probe_lens_curves_tables(metrics: dict) -> list[Table]:
    """Per checkpoint, one row per layer: ridge-probe SRCC beside the lens's SRCC, agreement and P(final).

    One narrow table per checkpoint (they stack in an 80-column terminal).

    Args:
        metrics: ``studies/replicate.py``'s metrics; each checkpoint's ``probes`` section
            (``layers``, ``probe_srcc``, ``lens_srcc``, ``lens_agreement``, ``lens_final_prob``).

    Returns:
        The tables, none for a checkpoint without probe curves.
    """
    caption = ("probe SRCC: ridge on the residual at the quality position, CV by reference photo; lens SRCC: "
               "Q-Align score read through the lens, same folds; agree: lens answer = final answer; "
               "P(final): lens probability of the final level")

    def at(values: list | None, i: int) -> float:
        return float("nan") if values is None or i >= len(values) or values[i] is None else float(values[i])

    tables = []
    modes = [m for m, v in metrics.items() if (v.get("probes") or {}).get("layers")]
    for k, m in enumerate(modes):
        pr = metrics[m]["probes"]
        table = Table(title=f"{m}: where quality is decodable (probes) vs where the words settle (logit lens)",
                      caption=caption if k == len(modes) - 1 else None)
        for name, justify in (("layer", "right"), ("probe SRCC", "right"), ("", "left"), ("lens SRCC", "right"),
                              ("agree", "right"), ("P(final)", "right")):
            table.add_column(name, justify=justify, no_wrap=True)
        for i, layer in enumerate(int(x) for x in pr["layers"]):
            probe = at(pr.get("probe_srcc"), i)
            table.add_row(str(layer), _num(probe), bar(max(probe, 0.0) if np.isfinite(probe) else 0.0, 20, "cyan"),
                          _num(at(pr.get("lens_srcc"), i)), _pct(at(pr.get("lens_agreement"), i), 0),
                          _num(at(pr.get("lens_final_prob"), i), 2))
        tables.append(table)
    return tables


# ----------------------------------------------------------------------------- the paper's exhibits
# Terminal forms of `mechbiqa.analysis.paper_figures` (the PNGs: `mechbiqa.figures`).
if TYPE_CHECKING:  # noqa: E402 (this section is appended; its types are only for annotations)
    from mechbiqa.analysis.paper_figures import Fig3Data, Fig6Data, Table1Row


def table1(rows: Sequence[Table1Row], title: str = "Table 1: instability of sampled answers") -> Table:
    """The paper's Table 1: one row per tuning, the instability ratio of each session, mean ± std, accuracy.

    Args:
        rows: `mechbiqa.analysis.paper_figures.table1_rows`.
        title: Table title.
    """
    n_sessions = max((len(r.sessions) for r in rows), default=0)
    sizes = {(r.n_images, r.n_answers) for r in rows}
    caption = "; ".join(f"{n} images x {a} answers per session" for n, a in sorted(sizes)) + (
        "; unstable: an answer whose level differs from its image's most common one, or no level word; "
        "std over sessions (ddof=1)")
    table = Table(title=title, caption=caption)
    table.add_column("method", no_wrap=True)
    for s in range(n_sessions):
        table.add_column(f"S{s + 1}", justify="right", no_wrap=True)
    table.add_column("mean ± std", justify="right", no_wrap=True)
    table.add_column("accuracy", justify="right", no_wrap=True)
    for r in rows:
        sessions = [_pct(x) for x in r.sessions] + [""] * (n_sessions - len(r.sessions))
        table.add_row(r.method, *sessions, f"{_pct(r.mean)} ± {_pct(r.std)}", _pct(r.accuracy))
    return table


def fig3_table(data: Fig3Data, title: str = "Fig. 3: top candidates per layer") -> Table:
    """One image's top-k candidate tokens per layer (full vocabulary) and its level-word answer.

    Candidates are cut with an ellipsis rather than wrapped, so each layer stays one line.
    """
    label = "" if not np.isfinite(data.label) else f", label {data.label:.2f}"
    table = Table(title=title, caption=f"sample {data.sample_id}{label} ({data.choice}); answer: the level "
                                       "word argmax (softmax over the five level words)")
    table.add_column("layer", justify="right", no_wrap=True)
    for j in range(data.top_probs.shape[1]):
        table.add_column(f"top {j + 1}", ratio=1)
    table.add_column("answer", no_wrap=True)
    for i, layer in enumerate(data.layers):
        cells = [_clip(f"{(t.strip() or f'#{int(data.top_ids[i, j])}')}·{100 * data.top_probs[i, j]:.0f}%",
                       "bold" if t.strip() in LEVEL_WORDS else "")
                 for j, t in enumerate(data.top_tokens[i])]
        k = LEVEL_WORDS.index(data.answer[i])
        table.add_row(str(int(layer)), *cells, Text(data.answer[i], style=LEVEL_COLOURS[k]))
    return table


def fig6_table(data: Fig6Data, title: str = "Fig. 6: the argmax level of the samples labelled") -> Table:
    """Per last layer, the share of the samples labelled ``data.label`` whose argmax is each level."""
    table = Table(title=f"{title} '{data.label}' (n={len(data.sample_ids)})",
                  caption="argmax over the five level words at each layer")
    table.add_column("layer", justify="right", no_wrap=True)
    for k, word in enumerate(LEVEL_WORDS):
        table.add_column(Text(word, style=LEVEL_COLOURS[k]), justify="right", no_wrap=True)
    for i, layer in enumerate(data.layers):
        table.add_row(str(int(layer)), *[_pct(v, 0) for v in data.frequency[i]])
    return table
