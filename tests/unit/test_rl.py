"""GRPO pieces against hand computations, and the loop as a real optimisation on the tiny model."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mechbiqa.model.prompts import LEVEL_WORDS, get_template
from mechbiqa.pipeline import task_prompt
from mechbiqa.rl import (
    RewardWeights,
    RLConfig,
    Sampled,
    answer_logprobs,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    kl_k3,
    level_hit,
    mos_closeness,
    paper_rewards,
    self_consistency,
    train_rl,
)
from mechbiqa.sources import tiny_random_model
from mechbiqa.train import Example


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=1e-4)
    std0 = math.sqrt((4 * 0.25) / 3)  # unbiased: sum of squared deviations / (n - 1)
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal
    std2 = math.sqrt((1 + 1 + 0 + 0) / 3)
    assert torch.allclose(adv[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (std2 + 1e-4))


def test_clipped_surrogate_by_hand():
    logp_old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, logp_old, adv, clip_eps=0.2)
    # rho=1.5, A=+1: min(1.5, 1.2) -> 1.2 (clipped); A=-1: min(-1.5, -1.2) -> -1.5
    # rho=0.5, A=+1: min(0.5, 0.8) -> 0.5;           A=-1: min(-0.5, -0.8) -> -0.8 (clipped)
    assert torch.allclose(loss[:, 0], torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped[:, 0].tolist() == [True, False, False, True]
    # the clipped branch carries no gradient
    logp = logp.clone().requires_grad_(True)
    clipped_surrogate(logp, logp_old, adv, 0.2)[0].sum().backward()
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0])


def test_k3_by_hand_and_unbiased_for_exact_kl():
    assert float(kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == pytest.approx(
        0.5 + math.log(2) - 1
    )
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, generator=g).double().softmax(0)
    q = torch.randn(7, generator=g).double().softmax(0)
    expectation = (p * kl_k3(p.log(), q.log())).sum()  # E_{x ~ p}[k3] over the whole support
    assert float(expectation) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-9)
    assert bool((kl_k3(p.log(), q.log()) >= 0).all())


def test_grpo_loss_averages_answer_tokens_only():
    logp = torch.log(torch.tensor([[0.9, 0.5, 0.5], [0.7, 0.4, 0.2]]))
    old = logp.clone()
    ref = torch.log(torch.tensor([[0.9, 0.25, 0.5], [0.7, 0.4, 0.1]]))
    mask = torch.tensor([[False, True, True], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    k3 = lambda a, b: b / a - math.log(b / a) - 1  # noqa: E731
    first = (-2.0 + 0.1 * k3(0.5, 0.25) - 2.0 + 0.1 * k3(0.5, 0.5)) / 2  # ratio 1: surrogate -A
    second = (1.0 + 0 + 1.0 + 0 + 1.0 + 0.1 * k3(0.2, 0.1)) / 3
    assert float(loss) == pytest.approx((first + second) / 2, rel=1e-6)
    assert stats["kl"] == pytest.approx((k3(0.5, 0.25) + k3(0.2, 0.1)) / 5, rel=1e-6)


def test_level_and_mos_rewards():
    assert (
        level_hit("good", "good") == 1.0 and level_hit("good", "bad") == 0.0 and level_hit(None, None) == 0.0
    )
    assert mos_closeness("good", 0.7) == pytest.approx(0.95)
    assert mos_closeness("bad", 0.9) == pytest.approx(0.1)
    assert mos_closeness(None, 0.5) == 0.0


# ------------------------------------------------------------------------------------------ on the tiny model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_random_model(0)


def _examples(folder: Path, n: int = 2) -> list[Example]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        out.append(
            Example(
                id=str(i), image=path, description="The image is sharp and clear.", level="good", score=0.7
            )
        )
    return out


def test_answer_logprobs_match_a_plain_forward(tiny):
    model, tok, proc = tiny
    prompt = task_prompt(tok, get_template("v1"), "one-stage").ids
    pixels = torch.randn(1, 3, proc.image_size, proc.image_size)
    answers = [[5, 300, 2], [301]]
    logp, mask = answer_logprobs(model, prompt, pixels, answers, tok.pad_id)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    for row, answer in enumerate(answers):  # one unpadded forward per answer, token by token
        ids = torch.tensor([list(prompt) + answer])
        full = model(ids, images=pixels).logits[0].log_softmax(-1)
        expected = [full[-len(answer) - 1 + t, a] for t, a in enumerate(answer)]
        assert torch.allclose(logp[row, mask[row]], torch.stack(expected), atol=1e-5)


def test_self_consistency_is_one_when_text_agrees_and_zero_when_forced_apart(tiny):
    model, tok, _ = tiny
    template = get_template("v1")
    answers = [
        Sampled(ids=(), text="", description="The image is sharp.", level="good"),
        Sampled(ids=(), text="", description="Blurry and noisy.", level="good"),
    ]
    image_calls = []

    def force(word):
        index = tok.word_id(word)

        def hook(logits, hook):  # [batch, pos, vocab]
            logits[..., index] += 100.0
            return logits

        return hook

    hooks = [("hook_image_tokens", lambda x, hook: image_calls.append(1))]  # [image, image_pos, d_llm]
    with model.hooks(fwd_hooks=[("llm.unembed.hook_out", force("good")), *hooks]):
        agree = self_consistency(model, tok, template, answers, label="good")
    with model.hooks(fwd_hooks=[("llm.unembed.hook_out", force("bad")), *hooks]):
        disagree = self_consistency(model, tok, template, answers, label="good")
    assert agree == ([1.0, 1.0], [1.0, 1.0])
    assert disagree == ([0.0, 0.0], [0.0, 0.0])
    assert not image_calls  # the text path never sees the image


def _target_probability(model, prompt, pixels, token):
    with torch.no_grad():
        return float(model(torch.tensor([list(prompt)]), images=pixels).logits[0, -1].softmax(-1)[token])


def test_a_reward_that_prefers_one_answer_raises_its_probability(tmp_path):
    examples = _examples(tmp_path / "img", n=1)
    cfg = RLConfig(
        steps=4,
        images_per_step=1,
        group_size=8,
        lr=3e-2,
        kl_beta=0.04,
        top_k=4,
        max_new_tokens=1,
        clip_norm=0.0,
        seed=0,
    )
    rises, starts = {}, {}
    for name, steps in (("prefers", 4), ("indifferent", 2)):
        model, tok, proc = tiny_random_model(0)
        prompt = task_prompt(tok, get_template("v1"), "one-stage").ids
        pixels = proc([examples[0].image])
        with torch.no_grad():
            target = int(model(torch.tensor([list(prompt)]), images=pixels).logits[0, -1].argmax())
        before = starts[name] = _target_probability(model, prompt, pixels, target)

        def reward(m, answers, example, name=name, target=target):
            values = [float(name == "prefers" and a.ids[0] == target) for a in answers]
            return values, {"hit": values}

        train_rl(
            model, tok, proc, examples, dataclasses.replace(cfg, steps=steps), reward_fn=reward
        )
        rises[name] = _target_probability(model, prompt, pixels, target) - before
    # the near-uniform tiny model starts at ~0.015 over 341 tokens; 4 steps of 8 answers reach ~0.16
    assert rises["prefers"] > 0.05 and rises["prefers"] > 3 * starts["prefers"], (rises, starts)
    assert abs(rises["indifferent"]) < 0.01, rises  # zero advantages, policy == reference: no gradient


def test_lora_policy_with_paper_rewards_keeps_the_base_and_disables_adapters_for_the_reference(tmp_path):
    import peft

    model, tok, proc = tiny_random_model(1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*llm\.blocks\.\d+\.mlp\.(up_proj|down_proj)"
    )
    model = peft.inject_adapter_in_model(config, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    examples = _examples(tmp_path / "img")
    steps = []
    cfg = RLConfig(steps=2, group_size=3, lr=1e-2, max_new_tokens=6, weights=RewardWeights(mos=1.0), seed=1)

    def reward(m, answers, example):  # the paper's rewards, plus the first token so that a group never ties
        total, parts = paper_rewards(
            m, answers, example, tokenizer=tok, template=get_template("v1"), weights=cfg.weights
        )
        return [t + 1e-3 * a.ids[0] for t, a in zip(total, answers, strict=True)], parts

    result = train_rl(model, tok, proc, examples, cfg, reward_fn=reward, progress=steps.append)
    assert len(result.history) == 2 and steps == result.history
    assert set(steps[0].parts) == {"level", "mos", "rouge", "consistency_answer", "consistency_label"}
    assert all(s.kl >= 0 for s in steps) and steps[0].kl == pytest.approx(0.0, abs=1e-6)  # B = 0 at the start
    state = model.state_dict()
    for k, v in base.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], v), k
    assert any(float(v.detach().abs().sum()) > 0 for k, v in state.items() if "lora_B" in k)


def test_paper_rewards_weighted_sum(tiny):
    model, tok, _ = tiny
    answers = [
        Sampled(ids=(), text="", description="The image is sharp and clear.", level="good"),
        Sampled(ids=(), text="", description="", level=None),
    ]
    example = Example(
        id="x", image=None, description="The image is sharp and clear.", level="good", score=0.7
    )
    weights = RewardWeights(level=1.0, mos=2.0, rouge=0.5, consistency_answer=0.0, consistency_label=0.0)
    total, parts = paper_rewards(
        model, answers, example, tokenizer=tok, template=get_template("v1"), weights=weights
    )
    assert parts["level"] == [1.0, 0.0] and parts["rouge"] == [pytest.approx(1.0), 0.0]
    assert total == pytest.approx([1.0 + 2 * 0.95 + 0.5, 0.0])
    assert set(parts) == {"level", "mos", "rouge"} and LEVEL_WORDS


def test_a_bfloat16_lora_policy_runs_and_returns_float32_logprobs(tmp_path):
    import peft

    model, tok, proc = tiny_random_model(2)
    model = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=r".*llm\.blocks\.\d+\.mlp\.up_proj"), model.to(torch.bfloat16)
    )
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    examples = _examples(tmp_path / "img", n=1)
    prompt = task_prompt(tok, get_template("v1"), "one-stage").ids
    logp, _ = answer_logprobs(model, prompt, proc([examples[0].image]), [[5, 6]], tok.pad_id)
    assert logp.dtype == torch.float32
    cfg = RLConfig(steps=1, images_per_step=1, group_size=3, max_new_tokens=3)
    result = train_rl(model, tok, proc, examples, cfg, reward_fn=lambda m, a, e: ([0.0, 1.0, 2.0], {}))
    assert result.history[0].kl == pytest.approx(0.0, abs=1e-6)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.dtype == torch.bfloat16 for p in lora_b)
    assert any(float(p.detach().abs().sum()) > 0 for p in lora_b)
