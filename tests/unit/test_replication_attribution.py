"""The main job's attribution analyses on tiny raters, each quantity against an independent computation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.special import log_softmax, softmax

from mechbiqa import outputs
from mechbiqa.analysis.lens import TunedLensTraining
from mechbiqa.analysis.replication import rated_store
from mechbiqa.analysis.replication_attribution import (
    IMAGE_VS_DESCRIPTION,
    AttributionSettings,
    attribution_analysis,
    image_vs_description,
    role_shares,
)
from mechbiqa.checkpoint import Checkpoint
from mechbiqa.model.prompts import LEVEL_WEIGHTS
from mechbiqa.model.roles import Role, batch_prompts
from mechbiqa.reports_attribution import attribution_report
from mechbiqa.scoring import level_ids
from mechbiqa.sources import tiny_raters
from mechbiqa.store import ActivationStore
from mechbiqa_hooks import names
from tests.studies.test_studies import make_images

SETTINGS = AttributionSettings(
    n_patch=3, lens_folds=2, lens_training=TunedLensTraining(steps=20, lr=3e-2, batch_size=None)
)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict:
    """Both tiny raters' stores of 4 images and their analyses (mode -> checkpoint, store, metrics ...)."""
    root = tmp_path_factory.mktemp("attribution_analysis")
    make_images(root / "images", 4)
    records = [
        SimpleNamespace(id=f"img{i}", image_path=str(root / "images" / f"img{i}.png"), label=i / 3)
        for i in range(4)
    ]
    out = {}
    for mode, rater in tiny_raters(0, max_new_tokens=3).items():
        store = rated_store(rater, records, root / f"{mode}.h5")
        checkpoint = Checkpoint.from_rater(rater)
        metrics, per_image = attribution_analysis(checkpoint, store, records, root / mode, SETTINGS)
        out[mode] = SimpleNamespace(
            checkpoint=checkpoint, store=store, metrics=metrics, per_image=per_image, records=records
        )
    return out


def test_role_shares_by_hand():
    rng = np.random.default_rng(0)
    by_role = rng.normal(size=(3, 2, 4, 6))
    by_role[2] = 0.0  # a sample with no attention write at all
    write, share = role_shares(by_role)
    for s in range(2):
        expected = [by_role[s, :, :, r].sum() for r in range(6)]
        np.testing.assert_allclose(write[s], expected)
        np.testing.assert_allclose(share[s], np.abs(expected) / np.abs(expected).sum())
    assert np.isnan(share[2]).all() and (write[2] == 0).all()


def test_the_store_holds_the_attribution_sites_and_is_reused(analysed):
    store = analysed["one-stage"].store
    with ActivationStore.open(store) as s:
        keys = set(s.keys)
    for key in (
        "attn.hook_z@quality",
        "hook_mlp_out@quality",
        "hook_resid_pre@quality",
        "attn.hook_v@all",
        "llm.ln_final.hook_scale@quality",
        "hook_resid_post@quality",
        "llm.unembed.hook_out@quality",
    ):
        assert any(k.endswith(key) for k in keys), key
    before = Path(store).stat().st_mtime_ns
    rater = analysed["one-stage"].checkpoint.rater
    assert rated_store(rater, analysed["one-stage"].records, store) == store
    assert Path(store).stat().st_mtime_ns == before  # finished, same model and images: not recorded again


def test_decision_and_role_writes_match_a_hooked_forward(analysed):
    """Independent: values zeroed outside a role, one layer at a time; the model's own attention gives its z."""
    run = analysed["one-stage"]
    dla = run.metrics["dla"]
    assert dla["sum_error"] < 1e-4 and dla["direction"] == "score"
    model, tokenizer = run.checkpoint.model, run.checkpoint.tokenizer
    ids = level_ids(tokenizer)
    w = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)
    c = w - w.mean()
    with ActivationStore.open(run.store) as store:
        rows = store.valid[store.counts("quality") > 0]
        logits = store.get("llm.unembed.hook_out", "quality", samples=rows)[:, 0][:, ids]
        image_path = store.image_paths(rows[:1])[0]
        sample_id = store.ids(rows[:1])[0]
    np.testing.assert_allclose(
        run.per_image["dla"]["decision"], logits.astype(np.float64) @ c.numpy(), atol=1e-5
    )

    rating = run.checkpoint.rate([image_path])[0]
    batch = batch_prompts(
        [rating.prompt],
        roles=[rating.roles],
        pad_id=tokenizer.pad_id,
        n_image_tokens=model.cfg.n_image_tokens,
        bos_id=tokenizer.bos_id,
    )
    role = torch.from_numpy(batch.stacked("role")[0].astype(np.int64))
    pixels = run.checkpoint.pixels([image_path])
    n_layers = model.cfg.llm.n_layers
    kept: dict[str, torch.Tensor] = {}

    def keep(x, hook):  # [batch, pos, ...] at the quality position (the last column)
        kept[hook.name] = x[0, -1].double()

    def forward(hooks):
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(batch.input_ids, images=pixels, attention_mask=batch.attention_mask)

    forward([(names.resid_post(n_layers - 1), keep)])
    final = kept[names.resid_post(n_layers - 1)]
    scale = torch.rsqrt(final.pow(2).mean() + model.llm.ln_final.eps)
    u = (
        (c @ model.llm.unembed.weight.detach().double()[ids])
        * model.llm.ln_final.weight.detach().double()
        * scale
    )
    position = run.per_image["dla"]["ids"].index(sample_id)
    for label, wanted in (("image", Role.IMAGE), ("description", Role.DESCRIPTION)):
        total = 0.0
        for layer in range(n_layers):

            def only_role(v, hook, wanted=wanted):  # [batch, pos, kv_head, d_head]
                return v * (role == int(wanted)).to(v.dtype)[None, :, None, None]

            z_name = f"llm.blocks.{layer}.attn.hook_z"
            forward([(f"llm.blocks.{layer}.attn.hook_v", only_role), (z_name, keep)])
            out = model.llm.blocks[layer].attn.o_proj.weight.detach().double() @ kept[z_name].flatten()
            total += float(out @ u)
        assert run.per_image["dla"][f"{label}_write"][position] == pytest.approx(total, abs=1e-5)
    assert abs(run.per_image["dla"]["image_write"][position]) > 1e-6


def test_top_heads_rank_the_mean_absolute_contribution(analysed):
    heads = analysed["one-stage"].metrics["dla"]["top_heads"]
    sizes = [h["mean_abs"] for h in heads]
    assert sizes == sorted(sizes, reverse=True) and len(heads) == SETTINGS.top_heads
    assert all(h["mean_abs"] >= abs(h["mean"]) - 1e-12 for h in heads)
    first = heads[0]
    assert sum(first["by_role"].values()) == pytest.approx(
        first["mean"], abs=1e-6
    )  # the split sums to the head


def test_lens_kl_by_hand_and_cross_fitted_tuned_lens(analysed):
    run = analysed["one-stage"]
    lens = run.metrics["tuned_lens"]
    model = run.checkpoint.model
    with ActivationStore.open(run.store) as store:
        rows = store.valid[store.counts("quality") > 0]
        resid = store.get("llm.blocks.{l}.hook_resid_post", "quality", samples=rows)[:, :, 0].astype(
            np.float64
        )
    w_norm = model.llm.ln_final.weight.detach().double().numpy()
    w_u = model.llm.unembed.weight.detach().double().numpy()
    logits = (resid / np.sqrt((resid**2).mean(-1, keepdims=True) + model.llm.ln_final.eps) * w_norm) @ w_u.T
    final = log_softmax(logits[:, -1], -1)
    expected = [
        (softmax(logits[:, -1], -1) * (final - log_softmax(logits[:, i], -1))).sum(-1).mean()
        for i in range(logits.shape[1])
    ]
    np.testing.assert_allclose(lens["kl"]["logit"], expected, rtol=1e-3, atol=1e-6)
    kl_tuned, kl_logit = np.asarray(lens["kl"]["tuned"]), np.asarray(lens["kl"]["logit"])
    assert kl_tuned[-1] == pytest.approx(0.0, abs=1e-7)  # the last layer is the model's own read-out
    assert lens["tuned_below_logit"] == bool((kl_tuned[:-1] < kl_logit[:-1]).all())
    assert lens["folds"] == 2 and lens["n_images"] == len(rows)
    np.testing.assert_allclose(np.asarray(lens["level_probs"]["tuned"]).sum(-1), 1.0, atol=1e-6)
    assert len(run.per_image["tuned_lens"]["settle"]) == len(rows)
    # the checkpoint's own read-out was not touched by the lens training
    assert model.llm.unembed.weight.requires_grad == model.llm.ln_final.weight.requires_grad


def test_attribution_patching_check_and_most_attended_tokens(analysed):
    run = analysed["one-stage"]
    ap = run.metrics["attribution_patching"]
    assert ap["n_images"] == 3 and ap["reference"] == "source"
    assert ap["corr"]["resid"] > 0.8 and ap["corr"]["kv"] > 0.8  # measured 0.96, 0.99 on these images
    assert ap["top_overlap"] == len(set(ap["top_positions"]) & set(ap["most_attended"])) / SETTINGS.k
    # independent: the quality row of every layer's attention from a hooked forward of the same prompts
    model, tokenizer = run.checkpoint.model, run.checkpoint.tokenizer
    chosen = [r for r in run.records if str(r.id) in run.per_image["attribution_patching"]["ids"]]
    pixels = run.checkpoint.pixels([r.image_path for r in chosen])
    ratings = run.checkpoint.rate(pixels)
    batch = batch_prompts(
        [r.prompt for r in ratings],
        roles=[r.roles for r in ratings],
        pad_id=tokenizer.pad_id,
        n_image_tokens=model.cfg.n_image_tokens,
        bos_id=tokenizer.bos_id,
    )
    rows: list[torch.Tensor] = []

    def keep(pattern, hook):  # [batch, head, query, key]
        rows.append(pattern[:, :, -1])

    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(names.pattern(x), keep) for x in range(model.cfg.llm.n_layers)]),
    ):
        model(batch.input_ids, images=pixels, attention_mask=batch.attention_mask)
    positions = batch.image_positions(0)
    attention = torch.stack(rows, 1).mean((1, 2))  # [image, key]
    per_token = torch.stack([attention[i, positions[i]] for i in range(len(chosen))]).mean(0)
    assert (
        ap["most_attended"] == torch.argsort(per_token, descending=True, stable=True)[: SETTINGS.k].tolist()
    )
    assert Path(ap["figure"]).is_file()


def test_two_stage_reads_no_image_and_is_not_patched(analysed):
    run = analysed["two-stage"]
    assert (
        run.metrics["attribution_patching"] is None
        and "text only" in run.metrics["attribution_patching_skipped"]
    )
    shares = run.per_image["dla"]
    assert (np.asarray(shares["image_share"]) == 0).all() and (
        np.asarray(shares["description_share"]) > 0
    ).any()
    assert run.metrics["dla"]["sum_error"] < 1e-4
    assert "attribution_patching" not in run.per_image


def test_the_image_vs_description_finding():
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(12)]
    description = rng.uniform(0.1, 0.3, 12)
    held = image_vs_description(
        {"ids": ids, "image_share": description + 0.3, "description_share": description}
    )
    assert held.claim == IMAGE_VS_DESCRIPTION and held.verdict == "held"
    assert held.result.effect == pytest.approx(0.3) and held.result.p_value < 0.05
    reverse = image_vs_description(
        {"ids": ids, "image_share": description - 0.1, "description_share": description}
    )
    assert reverse.verdict == "did not hold"
    noise = rng.normal(0, 0.1, 12)
    noise -= noise.mean()
    flat = image_vs_description(
        {"ids": ids, "image_share": description + noise, "description_share": description}
    )
    assert flat.verdict == "inconclusive"
    assert image_vs_description({"ids": ids}) is None and image_vs_description(None) is None


def _metrics(n_layers: int, patching: bool) -> dict:
    rng = np.random.default_rng(n_layers)
    roles = {
        r: {"write": (0.1, 0.05), "share": (0.2, 0.1)}
        for r in ("bos", "instruction", "image", "description", "quality")
    }
    lens = {
        "layers": list(range(n_layers)),
        "n_images": 256,
        "folds": 4,
        "steps": 100,
        "train_seconds": 3.21,
        "kl": {"logit": rng.uniform(0, 5, n_layers), "tuned": rng.uniform(0, 0.01, n_layers)},
        "tuned_below_logit": True,
        "agreement": {"logit": rng.uniform(0, 1, n_layers), "tuned": rng.uniform(0, 1, n_layers)},
        "p_final": {"logit": rng.uniform(0, 1, n_layers), "tuned": rng.uniform(0, 1, n_layers)},
        "changes": {"logit": (1.25, 0.5), "tuned": (0.5, 0.25)},
        "settle": {"logit": (20.0, 3.0), "tuned": (9.0, 2.0)},
    }
    heads = [
        {
            "layer": 31,
            "head": 17 + i,
            "mean": -1.234,
            "mean_abs": 1.5,
            "share_of_head_writes": 0.12,
            "by_role": {"image": 0.5, "description": -0.25},
        }
        for i in range(5)
    ]
    dla = {
        "direction": "score",
        "n_images": 256,
        "sum_error": 3.1e-6,
        "decision": (1.0, 0.5),
        "embed": 0.01,
        "attn_total": (0.5, 0.2),
        "mlp_total": (0.4, 0.1),
        "top_heads": heads,
        "roles": roles,
    }
    ap = None
    if patching:
        ap = {
            "metric": "logit_diff",
            "reference": "source",
            "sites": ["resid", "kv"],
            "corr": {"resid": 0.912, "kv": 0.834},
            "corr_pooled": 0.877,
            "top_positions": [64, 12, 3, 40, 41],
            "most_attended": [64, 63, 0, 1, 2],
            "top_overlap": 0.2,
            "overlap": (0.35, 0.15),
            "overlap_chance": 5 / 65,
            "peaks": {
                "resid": {"layer": 12, "token": 64, "effect": 1.0},
                "kv": {"layer": 30, "token": 12, "effect": -0.5},
            },
        }
    return {"dla": dla, "tuned_lens": lens, "attribution_patching": ap}


def test_the_report_fits_80_columns_with_32_layers_and_four_checkpoints(analysed):
    metrics = {
        "one-stage": _metrics(32, True),
        "two-stage": _metrics(32, False),
        "rl-grpo": _metrics(32, False),
        "q-scorer": _metrics(32, True),
    }
    texts = []
    for given in (metrics, json.loads(outputs.dumps(metrics))):  # as returned and as read from summary.json
        console = Console(record=True, width=80)
        console.print(attribution_report(given))
        texts.append(console.export_text())
    text = texts[0]
    assert texts[1] == text
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert text.count("tuned lens vs logit lens") == 4
    kl = metrics["q-scorer"]["tuned_lens"]["kl"]["logit"]
    assert f"{kl[31]:.3g}" in text and "L31.H21" in text and "0.912" in text and "64 12 3 40 41" in text
    assert "3.1e-06" in text and "0.20 ± 0.10" in text
    # and the real tiny analyses render too
    console = Console(record=True, width=80)
    console.print(attribution_report({m: r.metrics for m, r in analysed.items()}))
    assert max(map(len, console.export_text().splitlines())) <= 80
