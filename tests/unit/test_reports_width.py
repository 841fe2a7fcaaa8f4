"""Reports at 80 columns for a 4- and a 32-layer model: no line beyond 80, one line per layer row."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console

from mechbiqa import reports
from mechbiqa.analysis.attribution import attribute
from mechbiqa.analysis.lens import LogitLens, analyse_lens
from mechbiqa.analysis.paper_figures import Fig3Data, Fig6Data, Table1Row, table1_rows
from mechbiqa.analysis.patching import SweepResult
from mechbiqa.model.llm import RMSNorm, Unembed
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.model.roles import Role

D = 12


class Tokens:
    """Long token texts, so that a column that wrapped would show."""

    def decode(self, ids):
        return LEVEL_WORDS[ids[0]] if ids[0] < 5 else f"token{ids[0]}withalongname"


def render(renderable) -> list[str]:
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text().splitlines()


def body_rows(lines: list[str]) -> int:
    """Lines between a table's header rule (┡) and its bottom (└): one per row unless a row wrapped."""
    top = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┡"))
    bottom = next(i for i, line in enumerate(lines) if line.lstrip().startswith("└"))
    return bottom - top - 1


def check(table, n_rows: int) -> list[str]:
    lines = render(table)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    assert body_rows(lines) == n_rows, "\n".join(lines)
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("┏"))
    assert "…" not in lines[header + 1], "\n".join(lines)  # no column squeezed below its header
    return lines


def lens_result(n_layers: int, n_samples: int = 12):
    torch.manual_seed(n_layers)
    norm, unembed = RMSNorm(D, 1e-6), Unembed(D, D)
    resid = torch.randn(n_layers, n_samples, D) * 3
    return analyse_lens(LogitLens(norm, unembed), resid, [0, 1, 2, 3, 4], tokenizer=Tokens(), top_k=5)


@pytest.mark.parametrize("n_layers", [4, 32])
def test_lens_tables_fit_80_columns_one_line_per_layer(n_layers):
    result = lens_result(n_layers)
    lines = check(reports.lens_table(result), n_layers)
    assert any("…" in line for line in lines)  # the long top tokens are cut, not wrapped
    answers = reports.lens_answers_table(result)
    lines = check(answers, len(set(result.final.tolist())))
    # the sparkline has one character per layer and follows P(final) of each answer
    k = int(result.final[0])
    row = next(line for line in lines if line.lstrip("│ ").startswith(LEVEL_WORDS[k]))
    spark = "".join(c for c in row if c in reports._SPARK)
    path = result.by_answer[k][:, k]
    assert len(spark) == n_layers
    assert [reports._SPARK.index(c) for c in spark] == [int(np.clip(round(p * 7), 0, 7)) for p in path]


@pytest.mark.parametrize("n_layers", [4, 32])
def test_attribution_and_patching_tables_fit_80_columns(n_layers):
    rng = np.random.default_rng(0)
    n, heads, keys = 3, 32, 80
    roles = np.array(
        [[Role.BOS] + [Role.INSTRUCTION] * 4 + [Role.IMAGE] * 65 + [Role.DESCRIPTION] * 9 + [Role.QUALITY]]
        * n
    )
    image_index = np.where(roles == Role.IMAGE, np.cumsum(roles == Role.IMAGE, axis=1) - 1, -1)
    pattern = rng.random((n, n_layers, heads, keys))
    pattern /= pattern.sum(-1, keepdims=True)
    check(reports.attribution_table(attribute(pattern, roles, image_index, 65)), n_layers)
    tags, labels = [], []
    for site in ("resid", "kv"):
        for setter in ("zero", "mean"):
            for selection in ("dominant", "random", "least"):
                for layer in range(n_layers):
                    tags.append({"site": site, "setter": setter, "selection": selection, "layer": layer})
                    labels.append(f"{site}/{setter}/{selection}/L{layer}")
    n_configs, n_clean = len(tags), 4
    score = rng.random((n_configs, n_clean))
    answer = rng.integers(0, 5, (n_configs, n_clean))
    sweep = SweepResult(
        tuple(labels),
        tuple(tags),
        score,
        rng.normal(size=(n_configs, n_clean)),
        rng.random((n_configs, n_clean, 5)),
        answer,
        rng.random(n_clean),
        rng.normal(size=n_clean),
        rng.random((n_clean, 5)),
        rng.integers(0, 5, n_clean),
        n_configs,
    )
    lines = check(reports.patching_table(sweep), 12)
    # the largest change of the first row and its layer, as computed by hand
    effect = (score - sweep.clean_score[None]).reshape(12, n_layers, n_clean).mean(-1)
    at = int(np.argmax(np.abs(effect[0])))
    assert f"{effect[0, at]:+.3f}" in lines[next(i for i, x in enumerate(lines) if "resid/zero" in x)]
    assert f"L{at}" in lines[next(i for i, x in enumerate(lines) if "resid/zero" in x)]


@pytest.mark.parametrize("n_layers", [4, 32])
def test_comparison_report_fits_80_columns_and_explains_the_srccs(n_layers):
    rng = np.random.default_rng(1)
    test_ids = [f"img{i}" for i in range(60)]
    labels = rng.random(60)
    scores = labels + rng.normal(0, 0.3, 60)  # the whole test split
    stored = list(range(0, 60, 3))  # every third image, rated alike
    held = stored[:8]
    metrics = {}
    for mode in ("one-stage", "two-stage", "rl", "q-scorer"):  # the main job's four raters side by side
        probes = {
            "layers": list(range(n_layers)),
            "probe_srcc": list(rng.random(n_layers)),
            "lens_srcc": list(rng.random(n_layers)),
            "lens_agreement": list(rng.random(n_layers)),
            "lens_final_prob": list(rng.random(n_layers)),
            "probe_best_layer": 3,
            "per_image": {
                "ids": [test_ids[i] for i in held],
                "mos": labels[held],
                "level_word": scores[held],
                "mlp_head": labels[held] + rng.normal(0, 0.1, 8),
                "ridge": labels[held] + rng.normal(0, 0.2, 8),
            },
        }
        metrics[mode] = {
            "test_split": {"n": 60, "srcc": None, "ids": test_ids, "scores": scores, "labels": labels},
            "per_image": {
                "store": {
                    "ids": [test_ids[i] for i in stored],
                    "score": scores[stored],
                    "mos": labels[stored],
                }
            },
            "probes": probes,
            "instability": (0.2, 0.01),
            "image_mass": (0.1, 0.0),
            "table1": Table1Row(mode, (0.2, 0.3, 0.25), 0.25, 0.05, 0.5, 20, 5).to_dict(),
            "paper_figures": {
                "fig6": Fig6Data(
                    "poor", np.arange(n_layers - 3, n_layers), np.array([[0, 1, 0, 1, 0]] * 3), ("a", "b")
                ).to_dict(),
                "files": {"fig3": f"/cache/replicate/paper-{mode}/fig3_candidates.png"},
            },
        }
    from scipy.stats import spearmanr

    from mechbiqa.analysis.srcc_splits import srcc_entries

    entries = srcc_entries(metrics)
    by = {(e.rater, e.split, e.scorer): e for e in entries}
    assert len(entries) == 4 * 5
    assert by["one-stage", "test split", "level_word"].srcc == pytest.approx(spearmanr(scores, labels)[0])
    assert by["one-stage", "stored subset", "level_word"].n == 20
    assert by["two-stage", "held-out photos", "ridge"].n == 8
    group = reports.comparison_report(metrics, [], {"training": 1.0})
    lines = render(group)
    assert max(map(len, lines)) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert "(n=60)" in text and "(n=20)" in text and "(n=8)" in text and "why the SRCCs differ" in text
    srcc_rows = [x for x in lines if x.startswith("│ test split")]  # one row, every rater whole
    assert len(srcc_rows) == 1 and "…" not in srcc_rows[0], "\n".join(lines)
    assert all(f"{by[m, 'test split', 'level_word'].srcc:.3f}" in srcc_rows[0] for m in metrics)
    assert "the 20 are a subset of the 60" in text.replace("\n  ", " ") or "subset of" in text
    assert "rated alike on the shared images" in " ".join(x.strip() for x in lines)
    for table in reports.probe_lens_curves_tables(metrics):
        check(table, n_layers)
    exhibits = reports.paper_exhibits(metrics)
    check(exhibits[0], len(metrics))  # Table 1: one row per tuning
    assert "25.0% ± 5.0%" in text and "Table 1" in text and "paper-two-stage/fig3_candidates.png" in text
    check(exhibits[1], 3)  # Fig. 6 over the last 3 layers
    assert "50%" in "\n".join(render(exhibits[1]))


def test_srcc_of_a_subset_rated_differently_is_said_so():
    from mechbiqa.analysis.srcc_splits import srcc_differences, srcc_entries

    labels = np.linspace(0, 1, 30)
    ids = [str(i) for i in range(30)]
    m = {
        "one-stage": {
            "test_split": {"ids": ids, "scores": labels**2, "labels": labels},
            "per_image": {"store": {"ids": ids[:10], "score": 1 - labels[:10], "mos": labels[:10]}},
        }
    }
    [why] = srcc_differences(srcc_entries(m))
    assert "rated differently" in why and "subset of the 30" in why and "n=10" in why and "n=30" in why
    # the legacy metrics: one number, count unknown, said so
    [why] = srcc_differences(
        srcc_entries(
            {
                "r": {
                    "srcc": 0.6,
                    "srcc_subset": 0.9,
                    "per_image": {"store": m["one-stage"]["per_image"]["store"]},
                }
            }
        )
    )
    assert "n not recorded" in why and "which ones was not recorded" in why


@pytest.mark.parametrize("n_layers", [4, 32])
def test_paper_exhibit_tables_fit_80_columns(n_layers):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(5), n_layers)
    fig3 = Fig3Data(
        "img0",
        0.3,
        np.arange(n_layers),
        rng.integers(0, 400, (n_layers, 4)),
        tuple(tuple(Tokens().decode([int(t)]) for t in rng.integers(0, 400, 4)) for _ in range(n_layers)),
        rng.random((n_layers, 4)),
        probs,
        tuple(LEVEL_WORDS[k] for k in probs.argmax(-1)),
    )
    check(reports.fig3_table(fig3), n_layers)
    last = min(8, n_layers)
    fig6 = Fig6Data("poor", np.arange(n_layers - last, n_layers), rng.integers(0, 3, (last, 5)), ("a", "b"))
    check(reports.fig6_table(fig6), last)

    class Inst:
        def __init__(self, ratio):
            self.ratio, self.accuracy, self.levels = (
                np.array(ratio),
                np.array([0.5, 0.6, 0.7]),
                np.zeros((3, 10, 5)),
            )

    lines = check(
        reports.table1(
            table1_rows({"one-stage": Inst([0.2, 0.25, 0.21]), "two-stage": Inst([0.1, 0.12, 0.14])})
        ),
        2,
    )
    row = next(line for line in lines if "two-stage" in line)
    assert "10.0%" in row and "12.0% ± 2.0%" in row and "60.0%" in row


def test_bootstrap_srcc_equals_a_loop_of_scipy_spearman():
    from scipy.stats import spearmanr

    from mechbiqa.analysis.srcc_splits import bootstrap_srcc

    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 6, 25).astype(float), rng.random(25)  # ties in x
    low, high = bootstrap_srcc(x, y, draws=200, seed=3)
    index = np.random.default_rng(3).integers(0, 25, (200, 25))
    values = np.array([spearmanr(x[i], y[i])[0] for i in index])
    assert (low, high) == pytest.approx(tuple(np.percentile(values[np.isfinite(values)], [2.5, 97.5])))


@pytest.mark.parametrize("n_layers", [4, 32])
def test_probe_and_instability_tables_fit_80_columns(n_layers):
    from mechbiqa.analysis.instability import summarise_instability
    from mechbiqa.analysis.probes import ProbeCurve

    rng = np.random.default_rng(4)
    curve = ProbeCurve(np.arange(n_layers), rng.random(n_layers) - 0.2, rng.random(n_layers),
                       rng.random(n_layers), rng.random((n_layers, 5)), 10.0 ** rng.integers(-3, 4, (n_layers, 5)),
                       rng.random((n_layers, 30)), rng.random(n_layers) * 0.1, 30, 6)
    lines = check(reports.probe_table(curve, rng.random(n_layers), rng.random(n_layers)), n_layers)
    assert f"{curve.srcc[0]:.3f}" in lines[next(i for i, x in enumerate(lines) if x.startswith("│ 0 "))]
    levels = rng.integers(0, 6, (3, 20, 5))
    check(reports.instability_table(summarise_instability(levels, rng.integers(0, 5, 20), (0, 1, 2))), 4)
