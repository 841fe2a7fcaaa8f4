"""The main job's findings on hand-made per-image values: each decided by its paired test."""

from __future__ import annotations

import numpy as np
from scipy import stats

from mechbiqa.analysis import judge as judging

IDS = [f"img{i}" for i in range(20)]


def judge():
    return judging.judge


def per_image(shift: float, rng: np.random.Generator, spread: float = 0.05) -> dict:
    """One checkpoint's per-image blocks: ``shift`` moves every quantity in the two-stage direction."""
    noise = lambda: rng.normal(0, spread, len(IDS))  # noqa: E731
    mos = np.linspace(0, 1, len(IDS))
    block = lambda **kw: {"ids": IDS, **kw}  # noqa: E731
    return {
        "store": block(score=mos * shift + rng.normal(0, 1, len(IDS)) * (1 - shift), mos=mos),
        "instability": block(instability=0.5 - 0.3 * shift + noise(), accuracy=0.3 + 0.3 * shift + noise()),
        "attention": block(description_share=0.2 + 0.5 * shift + noise()),
        "lens": block(changes=3.0 - 2 * shift + noise(), settle=np.full(len(IDS), 5.0)),
        "grounding": block(contradiction=0.6 - 0.5 * shift + noise()),
    }


def verdicts(one: dict, two: dict) -> dict[str, str]:
    found = judge()({"one-stage": {"per_image": one}, "two-stage": {"per_image": two}})
    for f in found:
        assert f["test"] and np.isfinite(f["p_value"]), f
        assert (f["verdict"] == "held") == (f["held"] is True)
    return {f["finding"].split(" (")[0].split(" than")[0]: f["verdict"] for f in found}


def test_a_clear_difference_holds_and_a_reversed_one_does_not():
    rng = np.random.default_rng(0)
    one, two = per_image(0.0, rng), per_image(1.0, rng)
    held = verdicts(one, two)
    assert len(held) == 6 and set(held.values()) == {"held"}, held
    reversed_ = verdicts(two, one)
    assert set(reversed_.values()) == {"did not hold"}, reversed_


def test_a_difference_inside_its_spread_is_inconclusive():
    rng = np.random.default_rng(1)
    one, two = per_image(0.0, rng, spread=1.0), per_image(0.02, rng, spread=1.0)
    # the same images: the paired test sees a shift far below the per-image noise
    assert stats.ttest_rel(one["instability"]["instability"], two["instability"]["instability"]).pvalue > 0.05
    out = verdicts(one, two)
    assert out["Two-stage answers are more stable under sampling"] == "inconclusive", out


def test_the_attention_finding_is_undecided_when_the_shares_are_equal():
    share = {"ids": IDS, "description_share": np.linspace(0.1, 0.9, len(IDS))}
    found = judge()({"one-stage": {"per_image": {"attention": share}},
                     "two-stage": {"per_image": {"attention": dict(share, ids=IDS[::-1],
                                                                  description_share=share["description_share"][::-1])}}})
    (f,) = found
    assert "non-image attention" in f["finding"]
    assert f["verdict"] == "inconclusive" and f["held"] is None and f["effect"] == 0.0 and f["p_value"] == 1.0


def test_patching_and_probe_findings_use_the_one_stage_values_alone():
    rng = np.random.default_rng(2)
    dominant, random_ = 0.2 + rng.normal(0, 0.01, 20), 0.05 + rng.normal(0, 0.01, 20)
    one = {"patching": {"ids": IDS, "dominant": dominant, "random": random_},
           "lens": {"ids": IDS, "changes": np.ones(20), "settle": np.full(20, 6.0)}}
    m = {"one-stage": {"per_image": one, "probes": {"probe_decodable_layer": 2}},
         "two-stage": {"per_image": {}}}
    by_test = {f["finding"].split(" ")[0]: f for f in judge()(m)}
    assert by_test["Ablating"]["verdict"] == "held" and by_test["Ablating"]["units"] == "|delta score|"
    assert by_test["In"]["verdict"] == "held" and by_test["In"]["effect"] == 4.0
    one["patching"] = {"ids": IDS, "dominant": random_, "random": dominant}
    assert {f["finding"].split(" ")[0]: f["verdict"] for f in judge()(m)}["Ablating"] == "did not hold"


def test_the_report_names_each_test_with_its_effect_and_fits_80_columns():
    from rich.console import Console

    from mechbiqa.reports import comparison_report

    rng = np.random.default_rng(3)
    found = judge()({"one-stage": {"per_image": per_image(0.0, rng)},
                     "two-stage": {"per_image": per_image(1.0, rng)}})
    console = Console(record=True, width=80)
    console.print(comparison_report({"one-stage": {}, "two-stage": {}}, found, {"training": 1.0}))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    for f in found:
        assert f"p = {f['p_value']:.3g}" in text and f"effect {f['effect']:+.3g}" in text
    assert text.count("test: paired sign-flip permutation test") == 5 and "test: paired bootstrap" in text
    assert "unstable answers per session" in text and "[held]" in text


def test_a_finding_with_an_undefined_statistic_is_set_apart():
    rng = np.random.default_rng(4)
    one, two = per_image(0.0, rng), per_image(1.0, rng)
    one["store"]["score"] = np.full(len(IDS), 0.5)  # a constant score has no SRCC
    two["store"]["score"] = np.full(len(IDS), 0.5)
    found = judge()({"one-stage": {"per_image": one}, "two-stage": {"per_image": two}})
    tested, untested = judging.split_untested(found)
    assert len(tested) + len(untested) == len(found) == 6
    (f,) = untested
    assert "SRCC" in f["finding"] and f["evidence"] == judging.UNDEFINED and f["verdict"] == "inconclusive"
    assert all(np.isfinite([g["effect"], g["p_value"], *g["ci"]]).all() for g in tested)
