"""Rendering: results (dataclasses, arrays) -> rich renderables. Nothing is computed here.

Studies return results; these functions turn them into tables and bar rows that a
`rich.console.Console` prints. Keeping rendering apart lets tests check numbers
without parsing text, and lets a user re-render a saved result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
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


def lens_table(result: LensResult, title: str = "Logit lens at the quality position", top_k: int = 3) -> Table:
    """One row per layer: level distribution bars, answer, agreement, settled share, top tokens.

    The level distribution is the mean over samples; "agree" is the share of samples whose
    answer at the layer is their final one; "settled" the share whose answer never changes
    after the layer (◀ marks the median settle layer).

    Args:
        result: A `mechbiqa.analysis.lens.LensResult`.
        title: Table title.
        top_k: Top tokens shown per layer.
    """
    mean = result.mean_level_probs
    settled = [(result.settle <= layer).mean() for layer in result.layers]
    median = result.median_settle
    caption = Text.assemble(level_legend(), f"\n{len(result.sample_ids)} samples; level probabilities are the "
                            "softmax over the five level words; 'level mass' is their share of the full vocabulary")
    table = Table(title=title, caption=caption)
    for name, justify in (("layer", "right"), ("p(excellent..bad)", "left"), ("answer", "left"),
                          ("agree", "right"), ("settled", "right"), ("lvl mass", "right"), ("top tokens", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "top tokens")
    for i, layer in enumerate(result.layers):
        k = int(np.argmax(mean[i]))
        tokens = " ".join(f"{t.strip() or repr(t)}·{100 * p:.0f}%"
                          for t, p in zip(result.top_tokens[i][:top_k], result.top_probs[i][:top_k]))
        marker = " ◀" if layer == int(np.ceil(median)) else ""
        table.add_row(str(int(layer)), level_distribution(mean[i], width=15),
                      Text(result.level_words[k], style=LEVEL_COLOURS[k]), _pct(result.agreement[i], 0),
                      _pct(settled[i], 0) + marker, _pct(result.level_mass[i].mean(), 0), tokens or "—")
    return table


def lens_answers_table(result: LensResult, title: str = "Trajectories by final answer") -> Table:
    """One row per final answer that occurs: how many samples, their mean settle layer and answer changes."""
    table = Table(title=title)
    for name in ("final answer", "samples", "median settle", "mean changes", "p(final) per layer"):
        table.add_column(name, no_wrap=True)
    for k, word in enumerate(result.level_words):
        chosen = result.final == k
        if not chosen.any():
            continue
        path = " ".join(f"{p:.2f}" for p in result.by_answer[k][:, k])
        table.add_row(Text(word, style=LEVEL_COLOURS[k]), str(int(chosen.sum())),
                      f"{np.median(result.settle[chosen]):g}", f"{result.n_changes[chosen].mean():.2f}", path)
    return table


def attribution_table(result: AttributionResult, title: str = "Attention of the quality position by role") -> Table:
    """One row per layer: attention mass per role (mean over heads and samples) and the head most on the image.

    Args:
        result: A `mechbiqa.analysis.attribution.AttributionResult`.
        title: Table title.
    """
    from mechbiqa.model.roles import Role

    short = {Role.BOS: "bos", Role.INSTRUCTION: "instr", Role.IMAGE: "image", Role.DESCRIPTION: "descr",
             Role.QUALITY: "self", Role.OTHER: "other"}
    table = Table(title=title, caption="mass per role sums to 1 per layer and head; 'self' = the quality position; "
                                       "'image head' = the head that attends most to the image")
    table.add_column("layer", justify="right")
    for role in short.values():
        table.add_column(role, justify="right")
    table.add_column("", no_wrap=True, min_width=10)
    table.add_column("image head", justify="right", no_wrap=True)
    layer_mass = result.layer_mass()
    for i, layer in enumerate(result.layers):
        head = int(np.argmax(result.mass[i, :, Role.IMAGE]))
        table.add_row(str(int(layer)), *[_pct(layer_mass[i, r], 0) for r in short],
                      bar(layer_mass[i, Role.IMAGE], 10), f"h{head} {_pct(result.mass[i, head, Role.IMAGE], 0)}")
    return table


def dominant_tokens_table(result: AttributionResult, title: str = "Dominant image tokens") -> Table:
    """The consensus top-k image tokens: how often each is in a sample's top-k, and its mean attention."""
    mean_score = result.token_score.mean(0)
    caption = (f"top-{result.k} per sample by attention averaged over layers {list(result.score_layers)} and heads; "
               f"mean pairwise Jaccard {result.jaccard:.2f} (chance {result.jaccard_chance:.2f}); "
               f"the top-{result.k} take {_pct(float(result.top_share.mean()))} of the image attention")
    table = Table(title=title, caption=caption)
    for name in ("rank", "image index", "in top-k of", "mean attention", ""):
        table.add_column(name, justify="right" if name != "" else "left", no_wrap=True)
    peak = float(mean_score.max()) if mean_score.size and mean_score.max() > 0 else 1.0
    for rank, index in enumerate(result.consensus):
        table.add_row(str(rank + 1), str(int(index)), _pct(result.frequency[index]), f"{mean_score[index]:.4f}",
                      bar(mean_score[index] / peak, 16))
    return table


def patching_table(result: SweepResult, title: str = "Patching the image tokens: score change / flip rate") -> Table:
    """One row per (site, setter, selection), one column per layer: mean score change and answer flip rate.

    Args:
        result: A `mechbiqa.analysis.patching.SweepResult`.
        title: Table title.
    """
    keys, layers, effect = result.grid("score_effect", rows=("site", "setter", "selection"))
    _, _, diff = result.grid("logit_diff_effect", rows=("site", "setter", "selection"))
    _, _, flips = result.grid("flip_rate", rows=("site", "setter", "selection"))
    caption = (f"{result.score.shape[1]} image(s), {len(result.labels)} configurations in {result.n_forwards} "
               f"forwards; clean score {result.clean_score.mean():.3f}; cell = Δscore / Δ(good−poor) / flips")
    table = Table(title=title, caption=caption)
    for name in ("site", "setter", "tokens"):
        table.add_column(name)
    for layer in layers:
        table.add_column(f"L{layer}", justify="right", no_wrap=True)
    for row, key in enumerate(keys):
        cells = []
        for col in range(len(layers)):
            e = effect[row, col]
            if not np.isfinite(e):
                cells.append(Text("—"))
                continue
            style = "red" if e < -0.01 else "green" if e > 0.01 else ""
            cells.append(Text(f"{e:+.3f} / {diff[row, col]:+.2f} / {_pct(flips[row, col])}", style=style))
        table.add_row(*(str(k) for k in key), *cells)
    return table


def instability_table(result: InstabilityResult, title: str = "Instability of sampled answers") -> Table:
    """One row per session (seed), then mean ± std: instability ratio, level accuracy, majority-vote accuracy.

    Args:
        result: A `mechbiqa.analysis.instability.InstabilityResult`.
        title: Table title.
    """
    n_sessions, n_images, n_answers = result.levels.shape
    counts = result.level_counts()
    spread = ", ".join(f"{w} {c}" for w, c in zip([*LEVEL_WORDS, "none"], counts))
    caption = (f"{n_images} images x {n_answers} answers per session; uniform random answers would give "
               f"{_pct(result.expected_uniform)}; answers without a level word: {_pct(result.not_level_rate)}; "
               "accuracy = answers at the label's level, majority = images whose most common level is it\n"
               f"answers per level: {spread}")
    table = Table(title=title, caption=caption)
    for name in ("session", "seed", "unstable", "", "accuracy", "majority"):
        table.add_column(name, justify="right" if name not in ("", "session") else "left", no_wrap=True)
    seeds = result.seeds or tuple(range(n_sessions))
    for s in range(n_sessions):
        table.add_row(str(s), str(seeds[s]), _pct(result.ratio[s]), bar(result.ratio[s], 12, "red"),
                      _pct(result.accuracy[s]), _pct(result.majority_accuracy[s]))
    mean, std = result.ratio_mean_std
    acc, acc_std = result.accuracy_mean_std
    table.add_row(Text("mean±std", style="bold"), "", f"{_pct(mean)} ± {_pct(std)}", bar(mean, 12, "red"),
                  f"{_pct(acc)} ± {_pct(acc_std)}" if np.isfinite(acc) else "—", "")
    return table


def evaluation_table(result: EvaluationResult, title: str = "Quality evaluation") -> Table:
    """One row per data set (and pooled): SRCC, KRCC, PLCC raw and fitted, fitted RMSE, time per image.

    Args:
        result: A `mechbiqa.analysis.evaluation.EvaluationResult`.
        title: Table title.
    """
    caption = (f"{result.checkpoint}\nSRCC/KRCC on raw scores; PLCC raw and after the {result.fit} fit "
               "(RMSE after the fit, in rating units); DMOS data sets negated so higher is better")
    table = Table(title=title, caption=caption)
    for name in ("data set", "n", "SRCC", "KRCC", "PLCC raw", "PLCC fitted", "RMSE fitted", "ms / image", "flags"):
        table.add_column(name, justify="left" if name in ("data set", "flags") else "right", no_wrap=name != "flags")
    for row in result.rows:
        m = row.metrics
        table.add_row(row.name, str(row.n), _num(m.srcc), _num(m.krcc), _num(m.plcc_raw), _num(m.plcc_fitted),
                      _num(m.rmse_fitted), _num(1000 * row.seconds_per_image, 1), ", ".join(m.flags))
    return table
