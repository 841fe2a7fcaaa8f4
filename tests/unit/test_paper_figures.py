"""The paper's Figs. 3, 5, 6 and Table 1 from a tiny hand-written store, against hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechbiqa.analysis.lens import LogitLens
from mechbiqa.analysis.paper_figures import (
    fig3_top_candidates,
    fig5_role_aligned_attention,
    fig6_level_frequency,
    label_levels,
    paper_figures,
    role_runs,
    table1_rows,
)
from mechbiqa.model.llm import RMSNorm, Unembed
from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.model.roles import Role
from mechbiqa.store import (
    STATUS_OK,
    ActivationStore,
    ArraySpec,
    BatchRows,
    CacheSpec,
    SampleInfo,
    StoreLayout,
    StoreWriter,
)

N_LAYERS, D, HEADS, N_IMAGE, MAX_POS = 4, 8, 2, 4, 20
B, INS, M, S, Q, OTH = (
    int(Role.BOS),
    int(Role.INSTRUCTION),
    int(Role.IMAGE),
    int(Role.DESCRIPTION),
    int(Role.QUALITY),
    int(Role.OTHER),
)
DESCRIPTION_LENGTHS = (3, 5, 4, 3)
LEVEL_IDS = [0, 1, 2, 3, 4]  # the level words are tokens 0..4 of an 8-token vocabulary


def roles_of(n_description: int) -> list[int]:
    """bos, 2 instruction, 4 image, 1 instruction, the description, 2 other, the quality position."""
    return [B, INS, INS, *[M] * N_IMAGE, INS, *[S] * n_description, OTH, OTH, Q]


class Tokens:
    def decode(self, ids):
        return {0: "excellent", 1: "good", 2: "fair", 3: "poor", 4: "bad"}.get(ids[0], f"t{ids[0]}")


def identity_lens() -> LogitLens:
    """RMSNorm with unit weight and the identity unembedding: logits = x / rms(x)."""
    norm, unembed = RMSNorm(D, 1e-6), Unembed(D, D)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        unembed.weight.copy_(torch.eye(D))
    return LogitLens(norm, unembed)


def write(path, labels, records, resid, pattern, lengths=DESCRIPTION_LENGTHS):
    n = len(lengths)
    arrays = (
        ArraySpec(
            "llm.blocks.{l}.hook_resid_post@quality",
            "llm.blocks.{l}.hook_resid_post",
            "quality",
            tuple(range(N_LAYERS)),
            (1, D),
            ("pos", "d_model"),
        ),
        ArraySpec(
            "llm.blocks.{l}.attn.hook_pattern@quality",
            "llm.blocks.{l}.attn.hook_pattern",
            "quality",
            tuple(range(N_LAYERS)),
            (HEADS, 1, MAX_POS),
            ("head", "pos", "key_pos"),
        ),
    )
    layout = StoreLayout(
        n, MAX_POS, (("image", N_IMAGE), ("quality", 1)), arrays, answer_bytes=8, dtype="float32"
    )
    attrs = {
        "model_config": "{}",
        "model_identity": "{}",
        "tokenizer": "{}",
        "prompt": "{}",
        "run": "{}",
        "cache_spec": json.dumps(CacheSpec.default("float32").to_dict()),
    }
    infos = [SampleInfo(f"s{i}", f"/img/{i}.png", "p", label=labels[i], record=records[i]) for i in range(n)]
    rows = {
        name: np.zeros((n, *shape), dtype=dtype)
        for name, (dtype, shape) in layout.row_datasets().items()
        if name != "samples/status"
    }
    rows["tokens/role"][:] = int(Role.PAD)
    rows["tokens/image_index"][:] = -1
    for i, length in enumerate(lengths):
        roles = roles_of(length)
        rows["tokens/role"][i, : len(roles)] = roles
        rows["tokens/image_index"][i, 3 : 3 + N_IMAGE] = np.arange(N_IMAGE)
        rows["samples/n_positions"][i] = len(roles)
        rows["samples/n_images"][i] = 1
        rows["select/quality/positions"][i, 0] = len(roles) - 1
        rows["select/quality/count"][i] = 1
    acts = {
        "llm.blocks.{l}.hook_resid_post@quality": resid.transpose(1, 0, 2)[:, :, None].astype(np.float32),
        "llm.blocks.{l}.attn.hook_pattern@quality": pattern.transpose(1, 0, 2, 3)[:, :, :, None].astype(
            np.float32
        ),
    }
    with StoreWriter.open(path, layout, attrs, infos) as writer:
        writer.write(BatchRows(0, np.full(n, STATUS_OK, dtype=np.int8), rows, acts))
        writer.finish()
    return path


def random_pattern(rng, lengths=DESCRIPTION_LENGTHS):
    """``[sample, layer, head, key]`` rows that sum to 1 over each sample's real keys."""
    pattern = np.zeros((len(lengths), N_LAYERS, HEADS, MAX_POS))
    for i, length in enumerate(lengths):
        n = len(roles_of(length))
        p = rng.random((N_LAYERS, HEADS, n))
        pattern[i, :, :, :n] = p / p.sum(-1, keepdims=True)
    return pattern


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    resid = rng.normal(size=(len(DESCRIPTION_LENGTHS), N_LAYERS, D))
    # samples 0 and 2 are 'poor' (a record's level word, a 0-1 label in the poor bin); 1 is 'good', 3 'bad'
    labels = [0.9, 0.7, 0.3, 0.1]
    records = [{"level_word": "poor"}, {}, {}, {"level_word": "bad"}]
    # sample 2: argmax over the level words 'good' (1) at layers 0, 2, 'poor' (3) at 1, 3: three changes
    resid[2, :, :5] = [[0, 3, 0, 1, 0], [0, 1, 0, 3, 0], [0, 3, 0, 1, 0], [0, 1, 0, 3, 0]]
    resid[0, :, :5] = [[5, 0, 0, 0, 0], [0, 0, 0, 0, 5], [0, 0, 0, 5, 0], [0, 0, 0, 5, 0]]
    resid[[1, 3], :, :5] = 0
    resid[[1, 3], :, 2] = 4  # always 'fair': no change
    pattern = random_pattern(rng)
    return write(tmp_path / "s.h5", labels, records, resid, pattern), resid, pattern


def test_role_runs_split_a_sequence_into_runs_of_one_role():
    assert role_runs(np.array(roles_of(2))) == [
        (B, 0, 1),
        (INS, 1, 3),
        (M, 3, 7),
        (INS, 7, 8),
        (S, 8, 10),
        (OTH, 10, 12),
        (Q, 12, 13),
    ]


def test_fig3_is_the_top_candidates_of_one_image_by_hand(store):
    path, resid, _ = store
    with ActivationStore.open(path) as s:
        data = fig3_top_candidates(s, identity_lens(), LEVEL_IDS, k=4, tokenizer=Tokens())
        given = fig3_top_candidates(s, identity_lens(), LEVEL_IDS, sample="s0", k=2)
    assert data.sample_id == "s2" and data.choice.startswith("most answer changes")  # 3 changes, the most
    assert data.answer == ("good", "poor", "good", "poor")
    for layer in range(N_LAYERS):
        x = resid[2, layer]
        logits = x / np.sqrt((x**2).mean() + 1e-6)
        probs = np.exp(logits) / np.exp(logits).sum()
        order = np.argsort(-probs)[:4]
        assert data.top_ids[layer].tolist() == order.tolist()
        np.testing.assert_allclose(data.top_probs[layer], probs[order], rtol=1e-5)
        level = np.exp(logits[:5]) / np.exp(logits[:5]).sum()
        np.testing.assert_allclose(data.level_probs[layer], level, rtol=1e-5)
        assert data.top_tokens[layer] == tuple(Tokens().decode([int(t)]) for t in order)
    assert given.sample_id == "s0" and given.top_probs.shape == (N_LAYERS, 2) and given.choice == "given"
    assert given.answer == ("excellent", "bad", "poor", "poor")
    with ActivationStore.open(path) as s, pytest.raises(LookupError, match="nope"):
        fig3_top_candidates(s, identity_lens(), LEVEL_IDS, sample="nope")


def test_fig5_aligns_by_role_and_bins_the_descriptions_by_hand(store):
    path, _, pattern = store
    with ActivationStore.open(path) as s:
        data = fig5_role_aligned_attention(s, bins=16)
    mean = pattern.mean(2)  # [sample, layer, key] over heads
    # columns: bos 1, instruction 2, image 4, instruction 1, description min(16, 3) = 3 bins, other 2,
    # quality 1
    assert [(g["role"], g["stop"] - g["start"]) for g in data.segments] == [
        ("bos", 1),
        ("instruction", 2),
        ("image", 4),
        ("instruction", 1),
        ("description", 3),
        ("other", 2),
        ("quality", 1),
    ]
    assert data.segments[4]["align"] == "relative, 3 bins" and data.segments[2]["align"] == "image index"
    # by hand: description tokens of each sample in the 3 bins (floor(j * 3 / n))
    bins = {3: [[0], [1], [2]], 4: [[0, 1], [2], [3]], 5: [[0, 1], [2, 3], [4]]}
    expected = []
    for i, n in enumerate(DESCRIPTION_LENGTHS):
        row = mean[i]
        fixed = [row[:, k] for k in range(8)]  # bos, instruction x2, image x4, instruction
        described = [row[:, [8 + j for j in b]].mean(-1) for b in bins[n]]
        tail = [row[:, 8 + n + k] for k in range(3)]  # other x2, quality
        expected.append(np.stack(fixed + described + tail, axis=-1))
    np.testing.assert_allclose(data.heat, np.mean(expected, axis=0), rtol=1e-6)
    assert data.n_excluded == 0 and data.heat.shape == (N_LAYERS, 14)
    assert list(data.column_roles[8:11]) == [S] * 3 and data.column_roles[-1] == Q


def test_fig5_leaves_out_a_sample_of_another_layout(tmp_path):
    rng = np.random.default_rng(1)
    lengths = (3, 3, 3)
    pattern = random_pattern(rng, lengths)
    path = write(tmp_path / "s.h5", [0.5] * 3, [{}] * 3, rng.normal(size=(3, N_LAYERS, D)), pattern, lengths)
    import h5py

    with h5py.File(path, "r+") as f:  # sample 2's description becomes 'other': another run layout
        roles = f["tokens/role"][2]
        roles[roles == S] = OTH
        f["tokens/role"][2] = roles
    with ActivationStore.open(path) as s:
        data = fig5_role_aligned_attention(s)
    assert data.n_excluded == 1 and data.sample_ids == ("s0", "s1")
    # every run has one length: columns are positions, the mean of the two samples exactly
    np.testing.assert_allclose(data.heat, pattern[:2].mean(2).mean(0)[:, : len(roles_of(3))], rtol=1e-6)


def test_fig6_counts_the_argmax_level_of_the_poor_samples_over_the_last_layers(store):
    path, _, _ = store
    with ActivationStore.open(path) as s:
        assert label_levels(s, s.valid).tolist() == [
            3,
            1,
            3,
            4,
        ]  # record word, bins of 0.7 / 0.3, record word
        data = fig6_level_frequency(s, identity_lens(), LEVEL_IDS, label="poor", last=3)
        everything = fig6_level_frequency(s, identity_lens(), LEVEL_IDS, label="fair", last=10)
    assert data.sample_ids == ("s0", "s2") and data.layers.tolist() == [1, 2, 3]
    # by hand: layer 1 s0 bad, s2 poor; layer 2 s0 poor, s2 good; layer 3 both poor
    expected = np.zeros((3, 5), dtype=int)
    expected[0, [4, 3]] = 1
    expected[1, [3, 1]] = 1
    expected[2, 3] = 2
    np.testing.assert_array_equal(data.counts, expected)
    np.testing.assert_allclose(data.frequency, expected / 2)
    assert (
        everything.sample_ids == ()
        and everything.counts.sum() == 0
        and everything.layers.tolist() == [0, 1, 2, 3]
    )
    assert np.isnan(everything.frequency).all()


def test_table1_rows_hold_each_session_and_the_sample_std():
    from mechbiqa.analysis.instability import summarise_instability

    levels = np.array(
        [[[1, 1, 1], [2, 3, 2]], [[1, 1, 1], [2, 2, 2]], [[0, 1, 1], [2, 2, 2]]]
    )  # [session, img, ans]
    result = summarise_instability(levels, np.array([1, 2]), (0, 1, 2))
    [row] = table1_rows({"one-stage": result})
    # by hand: unstable answers per session / 6 answers: 1/6, 0, 1/6
    assert row.sessions == pytest.approx((1 / 6, 0.0, 1 / 6))
    assert row.mean == pytest.approx(1 / 9) and row.std == pytest.approx(np.std([1 / 6, 0, 1 / 6], ddof=1))
    assert row.accuracy == pytest.approx(np.mean([5 / 6, 1.0, 5 / 6])) and (row.n_images, row.n_answers) == (
        2,
        3,
    )


def test_paper_figures_writes_the_pngs_and_strict_json(store, tmp_path):
    path, _, _ = store
    data = paper_figures(path, tmp_path / "out", read_out=(identity_lens(), TokenizerWithLevels()), last=2)
    for name in ("fig3", "fig5", "fig6", "json"):
        assert (tmp_path / "out").joinpath(data["files"][name]).stat().st_size > 1000, name
    saved = json.loads((tmp_path / "out" / "paper_figures.json").read_text())
    assert saved["fig6"]["counts"] == [[0, 1, 0, 1, 0], [0, 0, 0, 2, 0]] and saved["table1"] is None
    assert saved["fig3"]["sample_id"] == "s2" and len(saved["fig5"]["heat"]) == N_LAYERS


class TokenizerWithLevels(Tokens):
    """What `mechbiqa.scoring.level_ids` needs: each level word encodes to its one token."""

    def word_id(self, word):
        return LEVEL_WORDS.index(word)


def test_table1_row_and_fig6_survive_strict_json():
    from mechbiqa.analysis.paper_figures import Fig6Data, Table1Row
    from mechbiqa.outputs import dumps

    row = Table1Row("two-stage", (0.1, 0.2), 0.15, 0.07, float("nan"), 10, 5)
    back = Table1Row.from_dict(json.loads(dumps(row.to_dict())))
    assert back.sessions == row.sessions and np.isnan(back.accuracy) and back.n_images == 10
    fig6 = Fig6Data("poor", np.array([6, 7]), np.array([[0, 1, 0, 1, 0], [0, 0, 0, 2, 0]]), ("a", "b"))
    again = Fig6Data.from_dict(json.loads(dumps(fig6.to_dict())))
    np.testing.assert_array_equal(again.frequency, fig6.frequency)
    assert again.sample_ids == ("a", "b")
