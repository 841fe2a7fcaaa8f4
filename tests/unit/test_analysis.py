"""mechbiqa.analysis on hand-made arrays and the tiny random model.

Lens, attribution, patching, instability, evaluation.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from mechbiqa_hooks import names

from mechbiqa.analysis.attribution import (
    attention_heatmap,
    attribute,
    expected_random_jaccard,
    mean_pairwise_jaccard,
    role_mass,
    top_image_tokens,
)
from mechbiqa.analysis.evaluation import ALL, aligned_target, evaluate_by_dataset
from mechbiqa.analysis.instability import (
    NOT_A_LEVEL,
    SamplingConfig,
    answer_levels,
    expected_uniform_instability,
    instability_ratio,
    sample_answers,
    sample_answers_independently,
    summarise_instability,
    unstable_counts,
)
from mechbiqa.analysis.lens import LogitLens, analyse_lens, settle_layers
from mechbiqa.analysis.patching import (
    Configuration,
    Edit,
    Readout,
    Setter,
    gather_activations,
    image_token_grid,
    read_quality,
    sweep,
)
from mechbiqa.model.config import IMAGE_TOKEN_INDEX
from mechbiqa.model.roles import Role

LEVELS = (10, 11, 12, 13, 14)  # stand-in level-word ids of the tiny model's 128-token vocabulary
IMAGE_AT = 3  # text index of the image placeholder in `prompt`


@pytest.fixture
def prompt(tiny_model):
    """Three prompts of 9 text ids with one image each, and their images."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 120, (3, 9), generator=g)
    ids[:, 0] = 1
    ids[:, IMAGE_AT] = IMAGE_TOKEN_INDEX
    size = tiny_model.cfg.vision.image_size
    return ids, torch.randn(3, 3, size, size, generator=g)


def image_positions(model, n: int) -> torch.Tensor:
    return torch.arange(IMAGE_AT, IMAGE_AT + model.cfg.n_image_tokens).expand(n, -1)


# ----------------------------------------------------------------------------- lens
def test_logit_lens_at_the_last_layer_is_the_models_own_logits(tiny_model, prompt):
    ids, pixels = prompt
    out, cache = tiny_model.run_with_cache(ids, images=pixels)
    n_layers = tiny_model.cfg.llm.n_layers
    resid = torch.stack(
        [cache[names.resid_post(layer)][:, -1] for layer in range(n_layers)]
    )  # [layer, sample, d]
    lens = LogitLens.from_model(tiny_model)
    torch.testing.assert_close(lens(resid[-1], n_layers - 1), out.logits[:, -1], atol=1e-5, rtol=1e-5)
    result = analyse_lens(lens, resid, LEVELS, tokenizer=None, top_k=3)
    own = out.logits[:, -1][:, list(LEVELS)].softmax(-1).detach().numpy()
    np.testing.assert_allclose(result.level_probs[-1], own, atol=1e-5)
    assert (result.final == own.argmax(-1)).all() and result.agreement[-1] == 1.0
    assert result.level_probs.shape == (n_layers, 3, 5) and np.allclose(result.level_probs.sum(-1), 1)
    assert (
        result.top_ids.shape == (n_layers, 3) and (result.top_probs[:, :-1] >= result.top_probs[:, 1:]).all()
    )


def test_logit_lens_from_checkpoint_reads_only_norm_and_head(tiny_model, prompt, tmp_path):
    from mechbiqa.model.load import save_pretrained

    save_pretrained(tiny_model, tmp_path / "ckpt")
    resid = torch.randn(4, tiny_model.cfg.llm.d_model)
    torch.testing.assert_close(
        LogitLens.from_checkpoint(tmp_path / "ckpt")(resid, 0), LogitLens.from_model(tiny_model)(resid, 0)
    )


def test_settle_layer_is_the_layer_after_the_last_change():
    answer = np.array([[3, 1, 1, 0], [1, 1, 2, 0], [1, 3, 1, 0], [1, 1, 1, 0]])  # [layer, sample]
    settle, changes = settle_layers(answer, np.array([4, 5, 6, 7]))
    assert settle.tolist() == [5, 7, 6, 4] and changes.tolist() == [1, 2, 2, 0]


def test_lens_splits_trajectories_by_final_answer():
    class Fixed(LogitLens):  # residuals already are logits over a 6-token vocabulary
        def __init__(self) -> None:
            pass

        def logits(self, resid, layer):
            return resid

    resid = torch.full((3, 4, 6), -5.0)
    resid[:, :2, 1] = 5.0  # samples 0, 1 say "good" at every layer
    resid[0, 2:, 1] = 5.0  # samples 2, 3 start at "good", then say "poor"
    resid[1:, 2:, 3] = 5.0
    result = analyse_lens(Fixed(), resid, [0, 1, 2, 3, 4])
    assert result.final.tolist() == [1, 1, 3, 3] and result.settle.tolist() == [0, 0, 1, 1]
    assert result.n_by_answer.tolist() == [0, 2, 0, 2, 0] and np.isnan(result.by_answer[0]).all()
    assert result.by_answer[3][0, 1] > 0.9 and result.by_answer[3][2, 3] > 0.9
    np.testing.assert_allclose(result.agreement, [0.5, 1.0, 1.0])


# ----------------------------------------------------------------------------- attribution
def _rows(rng, n_samples=4, n_layers=3, n_heads=2, n_keys=12):
    pattern = rng.random((n_samples, n_layers, n_heads, n_keys))
    return pattern / pattern.sum(-1, keepdims=True)


def test_attention_mass_per_role_sums_to_one_and_matches_a_loop():
    rng = np.random.default_rng(0)
    pattern = _rows(rng)
    roles = np.array(
        [Role.BOS, *[Role.INSTRUCTION] * 2, *[Role.IMAGE] * 5, *[Role.DESCRIPTION] * 3, Role.QUALITY]
    )
    roles = np.tile(roles, (4, 1))
    mass = role_mass(pattern, roles)
    np.testing.assert_allclose(mass.sum(-1), 1.0)
    np.testing.assert_allclose(mass[..., Role.IMAGE], pattern[..., 3:8].sum(-1))
    np.testing.assert_allclose(mass[..., Role.QUALITY], pattern[..., -1])
    assert (mass[..., Role.PAD] == 0).all()


def test_top_tokens_consistency_and_heatmap():
    rng = np.random.default_rng(1)
    n_image = 6
    pattern = _rows(rng, n_samples=5, n_keys=2 + n_image) * 0.01
    pattern[..., 2 + 4] += 1.0  # image token 4 dominates in every sample
    pattern[:3, ..., 2 + 1] += 0.5  # token 1 in three of them
    roles = np.tile([Role.BOS, Role.INSTRUCTION, *[Role.IMAGE] * n_image], (5, 1))
    roles[4, -1] = Role.PAD  # a shorter sample: its last position does not count
    pattern[4, ..., -1] = 0
    pattern /= pattern.sum(-1, keepdims=True)
    image_index = np.where(roles == Role.IMAGE, np.arange(-2, n_image), -1)
    result = attribute(pattern, roles, image_index, n_image, k=2)
    assert (result.top[:, 0] == 4).all() and (result.top[:3, 1] == 1).all()
    assert result.consensus.tolist() == [4, 1] and result.frequency[4] == 1.0 and result.frequency[1] >= 0.6
    assert 0 < result.jaccard <= 1 and result.jaccard > result.jaccard_chance
    assert set(result.least[0]).isdisjoint(result.top[0])
    np.testing.assert_allclose(result.layer_mass().sum(-1), 1.0)
    heat, heat_roles = attention_heatmap(pattern, roles)
    np.testing.assert_allclose(heat[:, 0], pattern[:, :, :, 0].mean((0, 2)))
    np.testing.assert_allclose(heat[:, -1], pattern[:4, :, :, -1].mean((0, 2)))  # four samples reach it
    assert heat_roles.tolist() == [Role.BOS, Role.INSTRUCTION, *[Role.IMAGE] * n_image]


def test_jaccard_helpers():
    assert mean_pairwise_jaccard(np.array([[0, 1], [0, 1], [0, 1]])) == 1.0
    assert mean_pairwise_jaccard(np.array([[0, 1], [2, 3]])) == 0.0
    n, k = 6, 2  # enumerate every pair of 2-subsets
    subsets = [set(s) for s in itertools.combinations(range(n), k)]
    exact = np.mean([len(a & b) / len(a | b) for a in subsets for b in subsets])
    assert expected_random_jaccard(n, k) == pytest.approx(exact)
    assert top_image_tokens(np.array([[0.1, 0.3, 0.3, 0.0]]), 2).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="k=5"):
        top_image_tokens(np.zeros((1, 4)), 5)


# ----------------------------------------------------------------------------- patching
def test_clean_patch_changes_nothing_and_zeroing_the_image_changes_the_score(tiny_model, prompt):
    ids, pixels = prompt
    positions = image_positions(tiny_model, 3)
    layers = range(tiny_model.cfg.llm.n_layers)
    hooks = (
        [names.resid_pre(layer) for layer in layers]
        + [names.attn(layer, "k") for layer in layers]
        + [names.attn(layer, "v") for layer in layers]
    )
    acts = gather_activations(tiny_model, ids, pixels, hooks, positions)
    all_tokens = {"all": torch.arange(tiny_model.cfg.n_image_tokens).expand(3, -1)}
    clean_into_clean = image_token_grid(
        positions,
        all_tokens,
        layers,
        sites=("resid", "kv"),
        setters=("source",),
        image_acts=acts,
        source_of=torch.arange(3),
    )
    readout = Readout(LEVELS)
    result = sweep(tiny_model, ids, pixels, clean_into_clean, readout)
    np.testing.assert_allclose(
        result.score, np.broadcast_to(result.clean_score, result.score.shape), atol=1e-6
    )
    assert not result.flipped.any()
    zeroed = sweep(
        tiny_model, ids, pixels, image_token_grid(positions, all_tokens, [0], setters=("zero",)), readout
    )
    assert (np.abs(zeroed.score_effect) > 1e-4).all()
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())  # every hook removed


def test_batched_sweep_equals_one_forward_per_configuration(tiny_model, prompt):
    ids, pixels = prompt
    positions = image_positions(tiny_model, 3)
    layers = range(tiny_model.cfg.llm.n_layers)
    hooks = [
        h.replace("{l}", str(layer))
        for layer in layers
        for h in ("llm.blocks.{l}.hook_resid_pre", "llm.blocks.{l}.attn.hook_k", "llm.blocks.{l}.attn.hook_v")
    ]
    acts = gather_activations(tiny_model, ids, pixels, hooks, positions)
    selections = {"first": torch.tensor([[0, 1]] * 3), "per_image": torch.tensor([[2, 4], [3, 0], [1, 2]])}
    configs = image_token_grid(
        positions,
        selections,
        layers,
        sites=("resid", "kv"),
        image_acts=acts,
        source_of=torch.tensor([2, 0, 1]),
    )
    readout = Readout(LEVELS)
    batched = sweep(tiny_model, ids, pixels, configs, readout, batch_size=1000, forward_cost=1e9)
    single = sweep(tiny_model, ids, pixels, configs, readout, batch_size=3, share_prefix=False)
    # rows start from the clean run at their layer: one forward per layer, and the clean run
    assert batched.n_forwards == len(layers) + 1 and single.n_forwards == len(configs) + 1
    split = sweep(
        tiny_model, ids, pixels, configs, readout, batch_size=5, forward_cost=0.0
    )  # a chunk per start
    assert split.n_forwards > batched.n_forwards
    np.testing.assert_allclose(split.score, single.score, atol=1e-6)
    np.testing.assert_allclose(batched.score, single.score, atol=1e-6)
    np.testing.assert_allclose(batched.logit_diff, single.logit_diff, atol=1e-5)
    assert (batched.answer == single.answer).all()
    # each row's own edits only: a configuration run alone gives the same numbers
    alone = sweep(tiny_model, ids, pixels, configs[5:6], readout)
    np.testing.assert_allclose(alone.score[0], batched.score[5], atol=1e-6)
    keys, cols, grid = batched.grid("score_effect", rows=("site", "selection", "setter"))
    assert len(keys) == 2 * 2 * 3 and cols == list(layers) and np.isfinite(grid).all()


def test_sweep_matches_a_plain_hooked_forward(tiny_model, prompt):
    ids, pixels = prompt
    positions = torch.tensor([IMAGE_AT + 1, IMAGE_AT + 2])
    config = Configuration("zero two", (Edit(names.resid_pre(1), positions, Setter.zero()),))
    result = sweep(tiny_model, ids, pixels, [config], Readout(LEVELS))

    def zero(activation, hook):
        activation = activation.clone()
        activation[:, positions] = 0
        return activation

    logits = tiny_model.run_with_hooks(ids, images=pixels, fwd_hooks=[(names.resid_pre(1), zero)]).logits[
        :, -1
    ]
    score, diff, _, answer = read_quality(logits.detach(), Readout(LEVELS))
    np.testing.assert_allclose(result.score[0], score, atol=1e-6)
    np.testing.assert_allclose(result.logit_diff[0], diff, atol=1e-5)


def test_patching_refuses_bad_configurations(tiny_model, prompt):
    ids, pixels = prompt
    with pytest.raises(KeyError, match="llm.blocks.9.hook_resid_pre"):
        sweep(
            tiny_model,
            ids,
            pixels,
            [Configuration("x", (Edit("llm.blocks.9.hook_resid_pre", [3], Setter.zero()),))],
            Readout(LEVELS),
        )
    with pytest.raises(ValueError, match="needs values"):
        Setter("mean")
    with pytest.raises(ValueError, match="must start with"):
        Edit(names.resid_pre(0), torch.tensor([3, 4]), Setter.mean(torch.zeros(3, 8)))
    with pytest.raises(ValueError, match="source_of"):
        image_token_grid(
            image_positions(tiny_model, 3),
            {"a": torch.zeros(3, 1, dtype=torch.long)},
            [0],
            setters=("source",),
        )


# ----------------------------------------------------------------------------- instability
def test_instability_ratio_by_hand():
    levels = np.array(
        [
            [1, 1, 1, 1, 1],  # stable
            [1, 1, 3, 3, 1],  # two off the mode
            [0, 1, 2, 3, 4],  # four off (ties: any mode)
            [2, 2, NOT_A_LEVEL, 2, NOT_A_LEVEL],
        ]
    )  # no level word counts as unstable
    assert unstable_counts(levels).tolist() == [0, 2, 4, 2]
    assert instability_ratio(levels) == pytest.approx(8 / 20)
    assert instability_ratio(np.full((3, 5), NOT_A_LEVEL)) == 1.0


def test_uniform_random_answers_match_the_expectation():
    assert expected_uniform_instability(1) == 0.0
    assert expected_uniform_instability(2) == pytest.approx(1 - (2 * 0.2 + 0.8) / 2)
    rng = np.random.default_rng(0)
    for n_answers, p_none in ((5, 0.0), (3, 0.3)):
        draws = rng.integers(0, 5, (40000, n_answers))
        draws[rng.random(draws.shape) < p_none] = NOT_A_LEVEL
        assert instability_ratio(draws) == pytest.approx(
            expected_uniform_instability(n_answers, 5, p_none), abs=0.01
        )


def test_summary_accuracy_and_sessions():
    levels = np.array([[[1, 1, 2], [0, 0, 0]], [[1, 1, 1], [0, 4, 0]]])  # [session, image, answer]
    result = summarise_instability(levels, np.array([1, -1]), seeds=(3, 4))
    np.testing.assert_allclose(result.ratio, [1 / 6, 1 / 6])
    np.testing.assert_allclose(result.accuracy, [2 / 3, 1.0])  # only image 0 is labelled
    np.testing.assert_allclose(result.majority_accuracy, [1.0, 1.0])
    mean, std = result.ratio_mean_std
    assert mean == pytest.approx(1 / 6) and std == 0.0 and result.to_dict()["seeds"] == [3, 4]


def test_answer_levels_take_the_last_level_word_before_eos():
    tokens = np.array(
        [
            [5, 11, 6, 13, 2, 10],  # good ... poor, EOS, then excellent after EOS
            [5, 6, 7, 8, 9, 9],
            [14, 2, 0, 0, 0, 0],
        ]
    )
    assert answer_levels(tokens, LEVELS, eos_token_id=2).tolist() == [3, NOT_A_LEVEL, 4]


def _forced(levels_only: bool, favourite: int = 11):
    """A logit hook: only the level words (all equal), or the favourite level word far ahead."""

    def hook(logits, hook):
        if levels_only:
            out = torch.full_like(logits, -1e4)
            out[..., list(LEVELS)] = 0.0
            return out
        logits = logits.clone()
        logits[..., favourite] += 1e3
        return logits

    return hook


def test_greedy_decoding_is_stable_and_uniform_sampling_matches_its_expectation(tiny_model):
    size = tiny_model.cfg.vision.image_size
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(20, 120, (16, 7), generator=g)
    ids[:, 0], ids[:, 2] = 1, IMAGE_TOKEN_INDEX
    pixels = torch.randn(16, 3, size, size, generator=g)
    with tiny_model.hooks(fwd_hooks=[(names.LOGITS, _forced(levels_only=False))]):
        greedy = sample_answers(
            tiny_model, ids[:4], pixels[:4], SamplingConfig(max_new_tokens=2, do_sample=False)
        )
    levels = answer_levels(greedy.reshape(-1, 2), LEVELS).reshape(3, 4, 5)
    assert summarise_instability(levels).ratio.tolist() == [0.0, 0.0, 0.0]
    with tiny_model.hooks(fwd_hooks=[(names.LOGITS, _forced(levels_only=True))]):
        drawn = sample_answers(tiny_model, ids, pixels, SamplingConfig(max_new_tokens=1))
    levels = answer_levels(drawn.reshape(-1, 1), LEVELS).reshape(3, 16, 5)
    result = summarise_instability(levels)
    assert result.not_level_rate == 0.0
    assert result.ratio_mean_std[0] == pytest.approx(result.expected_uniform, abs=0.1)  # ~4 standard errors


def test_shared_prefill_draws_the_same_tokens_as_independent_generations(tiny_model, prompt):
    ids, pixels = prompt
    sampling = SamplingConfig(n_answers=2, seeds=(0, 7), max_new_tokens=4, temperature=1.5)
    shared = sample_answers(tiny_model, ids, pixels, sampling, image_numbers=[5, 6, 7])
    alone = sample_answers_independently(tiny_model, ids, pixels, sampling, image_numbers=[5, 6, 7])
    assert shared.shape == (2, 3, 2, 4) and torch.equal(shared, alone)
    # a batch split draws the same: image numbers, not batch rows, seed the streams
    part = sample_answers(tiny_model, ids[1:], pixels[1:], sampling, image_numbers=[6, 7])
    assert torch.equal(part, shared[:, 1:])
    assert not torch.equal(shared[0], shared[1])  # sessions differ


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_per_dataset_and_pooled():
    rng = np.random.default_rng(0)
    mos = rng.random(40)
    pred = mos + 0.1 * rng.random(40)
    groups = ["a"] * 20 + ["b"] * 20
    target = mos.copy()
    target[3] = np.nan  # an unrated image is left out
    result = evaluate_by_dataset(pred, target, groups, {"a": 2.0, "b": 4.0})
    assert [r.name for r in result.rows] == ["a", "b", ALL]
    assert result.row("a").metrics.n == 19 and result.row(ALL).metrics.n == 39
    assert result.row("b").metrics.srcc > 0.9 and result.row("a").seconds_per_image == pytest.approx(0.1)
    assert result.row(ALL).seconds_per_image == pytest.approx(6.0 / 40)
    few = evaluate_by_dataset([0.1, 0.2], [1.0, 2.0], ["c", "c"])
    assert "too_few" in few.rows[0].metrics.flags and len(few.rows) == 1
    assert aligned_target(3.0, False) == -3.0 and np.isnan(aligned_target(None, True))


def test_benchmark_timer_alternates_the_two_methods_and_keeps_their_outputs():
    from mechbiqa.benchmarking import interleaved_best

    calls: list[str] = []
    seconds_a, out_a, seconds_b, out_b = interleaved_best(
        lambda: calls.append("a") or "A", lambda: calls.append("b") or "B", repeats=3
    )
    assert calls == ["a", "b"] * 3  # alternating: a load spike hits both alike
    assert (out_a, out_b) == ("A", "B") and 0 <= seconds_a < 1 and 0 <= seconds_b < 1
