"""The training loop: Eq. 2, answer-only labels, text-only stage 2, resume, learning, checkpoints, refusals."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechbiqa import train as T
from mechbiqa.data import BenchmarkConfig, build_benchmark
from mechbiqa.model import ModelConfig, MPLUGOwl2, load_pretrained
from mechbiqa.model.prompts import LEVEL_WORDS, get_template
from mechbiqa.model.roles import Role
from mechbiqa.pipeline import (
    CheckpointModeError,
    OneStageRater,
    TwoStageRater,
    load_rater,
    match_description,
    quality_sentence,
    read_info,
    scoring_prompt,
)

V1 = get_template("v1")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_benchmark(BenchmarkConfig.tiny(image_size=28), tmp_path_factory.mktemp("bench") / "b")


@pytest.fixture(scope="module")
def tok(bench):
    return T.compact_tokenizer(bench.split("train"), vocab_size=400)


def tiny_model(tok, seed: int = 0) -> MPLUGOwl2:
    cfg = ModelConfig.tiny()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
    return T.init_weights(MPLUGOwl2(cfg), seed)


def fast(**changes) -> T.TrainConfig:
    base = dict(steps=4, batch_size=4, warmup_steps=1, eval_every=0, eval_samples=4, max_new_tokens=4, lr=3e-3)
    base.update(changes)
    return T.TrainConfig(**base)


# ------------------------------------------------------------------------------------------ loss
def test_loss_equals_a_hand_computation_of_eq2():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 4, -100, -100]])
    eps = 0.1
    loss, n = T.label_smoothed_nll(logits, labels, eps)
    # By hand: position t predicts label t+1; three answer tokens.
    terms = []
    for b, t, y in [(0, 1, 3), (0, 2, 1), (1, 0, 4)]:
        z = logits[b, t].tolist()
        log_z = math.log(sum(math.exp(v) for v in z))
        logp = [v - log_z for v in z]
        terms.append((1 - eps) * -logp[y] + eps * sum(-lp for lp in logp) / 5)
    assert n == 3
    assert float(loss) == pytest.approx(sum(terms) / 3, rel=1e-6)
    # eps = 0 is the plain NLL; torch's label smoothing is the same formula.
    keep = labels[:, 1:] != -100
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], label_smoothing=eps)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)


def test_collate_pads_text_right_and_spliced_labels_left():
    a = T.EncodedExample(ids=(1, -200, 5, 6), labels=(-100, -100, -100, 6), n_images=1)
    b = T.EncodedExample(ids=(1, 7, 8), labels=(-100, 7, 8), n_images=0)
    ids, mask, labels = T.collate([a, b], pad_id=0, n_image_tokens=3)
    # By hand: text ids right-padded with pad_id; labels in the spliced space (the placeholder becomes 3
    # ignored positions), left-padded with IGNORE_INDEX as the model left-pads its spliced rows.
    assert ids.tolist() == [[1, -200, 5, 6], [1, 7, 8, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, -100, -100, -100, 6], [-100, -100, -100, -100, 7, 8]]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long


def test_a_padded_batch_has_the_loss_of_its_rows_alone(tok, bench):
    ex = T.examples_from_records(bench.split("train")[:3], "one-stage")
    enc = [T.encode_example(tok, V1, "one-stage", e) for e in ex]
    enc[1] = T.EncodedExample(enc[1].ids[:-3], enc[1].labels[:-3], enc[1].n_images)  # unequal lengths
    model = tiny_model(tok).eval()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids, mask, labels = T.collate(enc, tok.pad_id, model.cfg.n_image_tokens)
        batch = T.label_smoothed_nll(model(ids, images=pixels, attention_mask=mask).logits, labels,
                                     reduction="sum")[0]
        alone = 0.0
        for i, e in enumerate(enc):
            ids, mask, labels = T.collate([e], tok.pad_id, model.cfg.n_image_tokens)
            assert bool(mask.all())  # one row: no padding
            alone += float(T.label_smoothed_nll(model(ids, images=pixels[i : i + 1], attention_mask=mask).logits,
                                                labels, reduction="sum")[0])
    assert float(batch) == pytest.approx(alone, rel=1e-4)


def test_answer_only_logits_give_the_full_logits_loss_and_gradients(tok, bench):
    """Training unembeds only the rows that predict an answer token; loss and every gradient are unchanged."""
    ex = T.examples_from_records(bench.split("train")[:3], "one-stage")
    enc = [T.encode_example(tok, V1, "one-stage", e) for e in ex]
    enc[2] = T.EncodedExample(enc[2].ids[:-2], enc[2].labels[:-2], enc[2].n_images)  # padding in the batch
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for select in (False, True):
        model = tiny_model(tok)
        ids, mask, labels = T.collate(enc, tok.pad_id, model.cfg.n_image_tokens)
        at = T.predicting_positions(labels) if select else None
        logits = model(ids, images=pixels, attention_mask=mask, logits_at=at).logits
        # by hand: the selected rows are those t with labels[:, t + 1] an answer token
        assert logits.shape[0] == (int((labels[:, 1:] != T.IGNORE_INDEX).sum()) if select else len(enc))
        loss, _ = T.label_smoothed_nll(logits, labels, 0.1, reduction="sum")
        loss.backward()
        losses.append(float(loss))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    with pytest.raises(ValueError, match="predicting_positions"):
        T.label_smoothed_nll(torch.zeros(2, tok.vocab_size), labels)


def test_only_answer_tokens_carry_loss(tok, bench):
    ex = T.examples_from_records(bench.split("train")[:2], "one-stage")
    enc = [T.encode_example(tok, V1, "one-stage", e) for e in ex]
    for e, x in zip(enc, ex):
        answer = [label for label in e.labels if label != T.IGNORE_INDEX]
        assert answer == tok.encode(f"{x.description} {quality_sentence(x.level)}") + [tok.eos_id]
        assert e.ids[-len(answer):] == tuple(answer)
        assert set(e.labels[: len(e.ids) - len(answer)]) == {T.IGNORE_INDEX}
    model = tiny_model(tok)
    ids, mask, labels = T.collate(enc, tok.pad_id, model.cfg.n_image_tokens)
    pixels = torch.randn(2, 3, 28, 28)
    logits = model(ids, images=pixels, attention_mask=mask).logits.detach().requires_grad_(True)
    assert logits.shape[:2] == labels.shape
    loss, n = T.label_smoothed_nll(logits, labels, 0.1)
    loss.backward()
    carries = logits.grad.abs().sum(-1) > 0  # [batch, pos]: positions whose logits get gradient
    expected = torch.zeros_like(carries)
    expected[:, :-1] = labels[:, 1:] != T.IGNORE_INDEX
    assert torch.equal(carries, expected)
    assert n == sum(len([x for x in e.labels if x != T.IGNORE_INDEX]) for e in enc)


def test_stage2_sees_no_image_tokens(tok, bench, tmp_path, monkeypatch):
    ex = T.examples_from_records(bench.split("train")[:4], "stage2")
    enc = [T.encode_example(tok, V1, "stage2", e) for e in ex]
    assert all(e.n_images == 0 and -200 not in e.ids for e in enc)
    model = tiny_model(tok)
    seen = []
    model.llm.hook_modality.add_hook(lambda x, hook: seen.append(int(x.sum())))

    def refuse(*args, **kwargs):
        raise AssertionError("stage 2 ran the vision tower")

    monkeypatch.setattr(model, "encode_images", refuse)
    T.train(fast(mode="two-stage", stage=2, steps=2), tmp_path / "s2", ex, model=model, tokenizer=tok)
    assert seen and set(seen) == {0}


# ------------------------------------------------------------------------------------------ schedule
def test_schedule_and_budget():
    cfg = fast(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [T.learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert T.split_budget(900) == (600, 300) and sum(T.split_budget(10)) == 10
    assert T.TrainConfig().betas == (0.9, 0.98) and T.TrainConfig().adam_eps == 1e-6
    assert T.TrainConfig().label_smoothing == 0.1


# ------------------------------------------------------------------------------------------ initialisation
def test_init_makes_the_first_vision_block_a_dct_energy_bank_and_the_queries_pool():
    cfg = ModelConfig.compact(vocab_size=64)
    model = T.init_weights(MPLUGOwl2(cfg), seed=0)
    block, d = model.vision.blocks[0], cfg.vision.d_model
    # The patch embedding is the orthonormal colour x DCT bank: W W^T = I over the filters.
    w = model.vision.embed.patch_embed.weight.flatten(1)
    torch.testing.assert_close(w @ w.T, torch.eye(d), atol=1e-5, rtol=0)
    # The block's MLP maps a normalised token to |token| - token, so the stream leaves it as |token|.
    x = torch.nn.functional.layer_norm(torch.randn(5, 7, d), (d,))
    with torch.no_grad():
        out = x + block.mlp(block.ln2(x))
    # quick_gelu is a soft rectifier: the error is 2|x| sigmoid(-1.702 * 4 |x|), at most 0.083 (|x| = 0.18).
    u = torch.linspace(0, 3, 3001)
    bound = (2 * u * torch.sigmoid(-1.702 * 4 * u)).max()
    assert 0.08 < bound < 0.085
    assert (out - x.abs()).abs().max() <= bound + 1e-4
    # Zero query projections: every query attends uniformly over the keys.
    patterns = {}
    handle = model.abstractor.blocks[0].hook_pattern.add_hook(lambda t, hook: patterns.setdefault("p", t))
    with torch.no_grad():
        model.abstractor(torch.randn(2, cfg.vision.n_tokens, d))
    model.reset_hooks()
    p = patterns["p"]
    torch.testing.assert_close(p, torch.full_like(p, 1.0 / p.shape[-1]))


# ------------------------------------------------------------------------------------------ runs
def test_resumed_run_equals_uninterrupted(tok, bench, tmp_path):
    ex = T.examples_from_records(bench.split("train"), "one-stage")
    cfg = fast(steps=6, checkpoint_every=2)
    whole = T.train(cfg, tmp_path / "whole", ex, model=tiny_model(tok), tokenizer=tok)
    T.train(cfg, tmp_path / "cut", ex, model=tiny_model(tok), tokenizer=tok, stop_after=3)
    assert read_info(tmp_path / "cut").step == 3 and not read_info(tmp_path / "cut").data["finished"]
    # A fresh model would differ: resuming must ignore it and read the checkpoint.
    resumed = T.train(cfg, tmp_path / "cut", ex, model=tiny_model(tok, seed=9), tokenizer=tok)
    assert resumed.losses == whole.losses
    a, b = load_pretrained(tmp_path / "whole").state_dict(), load_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_keeps_the_steps_taken_and_the_run_resumes_on_the_same_curve(tok, bench, tmp_path):
    """SIGINT at step 2 (no periodic checkpoints): step 2 is written, then the run stops; a rerun goes on."""
    import os
    import signal

    ex = T.examples_from_records(bench.split("train"), "one-stage")
    cfg = fast(steps=6, checkpoint_every=0, checkpoint_seconds=0)
    whole = T.train(cfg, tmp_path / "whole", ex, model=tiny_model(tok), tokenizer=tok)

    def interrupt(event):
        if event.kind == "step" and event.step == 2:  # inside the loop, after step 2's update
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2; checkpoint written"):
        T.train(cfg, tmp_path / "cut", ex, model=tiny_model(tok), tokenizer=tok, progress=interrupt)
    assert read_info(tmp_path / "cut").step == 2 and not read_info(tmp_path / "cut").data["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone
    resumed = T.train(cfg, tmp_path / "cut", ex, model=tiny_model(tok, seed=9), tokenizer=tok)
    assert resumed.losses == whole.losses


def test_ctrl_c_during_the_last_step_saves_the_finished_run_and_still_stops(tok, bench, tmp_path):
    """An interrupt that lands in the last step is not dropped: the finished checkpoint is written, then it stops."""
    import os
    import signal

    ex = T.examples_from_records(bench.split("train"), "one-stage")
    cfg = fast(steps=3, checkpoint_every=0, checkpoint_seconds=0)

    def interrupt(event):
        if event.kind == "step" and event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="during the last step; the finished checkpoint is written"):
        T.train(cfg, tmp_path / "end", ex, model=tiny_model(tok), tokenizer=tok, progress=interrupt)
    assert read_info(tmp_path / "end").step == 3 and read_info(tmp_path / "end").data["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_retrain_starts_again_and_a_finished_run_is_returned_as_it_is(tok, bench, tmp_path):
    ex = T.examples_from_records(bench.split("train"), "stage2")
    cfg = fast(mode="two-stage", stage=2, steps=3)
    first = T.train(cfg, tmp_path / "r", ex, model=tiny_model(tok), tokenizer=tok)
    events = []
    again = T.train(cfg, tmp_path / "r", ex, model=tiny_model(tok, seed=9), tokenizer=tok, progress=events.append)
    assert not [e for e in events if e.kind in ("step", "checkpoint")] and again.losses == first.losses
    with pytest.raises(ValueError, match="lr differ.*--retrain"):
        T.train(cfg.replace(lr=1e-2), tmp_path / "r", ex, model=tiny_model(tok), tokenizer=tok)
    events.clear()
    fresh = T.train(cfg.replace(lr=1e-2), tmp_path / "r", ex, model=tiny_model(tok, seed=9), tokenizer=tok,
                    progress=events.append, fresh=True)
    assert len([e for e in events if e.kind == "step"]) == 3 and fresh.losses != first.losses
    state = T.State.load(tmp_path / "r")
    assert state.segments == [[0, 3]] and state.config["lr"] == 1e-2 and len(state.history) == 3


def test_time_based_checkpoints(tok, bench, tmp_path):
    ex = T.examples_from_records(bench.split("train"), "stage2")
    events = []
    # Any interval shorter than a step checkpoints after every step; none by step count.
    T.train(fast(mode="two-stage", stage=2, steps=3, checkpoint_every=0, checkpoint_seconds=1e-9), tmp_path / "t",
            ex, model=tiny_model(tok), tokenizer=tok, progress=events.append)
    assert [e.step for e in events if e.kind == "checkpoint"] == [1, 2, 3]
    events.clear()
    T.train(fast(mode="two-stage", stage=2, steps=3, checkpoint_every=0, checkpoint_seconds=0), tmp_path / "u",
            ex, model=tiny_model(tok), tokenizer=tok, progress=events.append)
    assert [e.step for e in events if e.kind == "checkpoint"] == [3]


def test_tiny_run_lowers_held_out_loss_and_reloads_with_equal_logits(tok, bench, tmp_path):
    train_ex = T.examples_from_records(bench.split("train"), "stage2")
    held = T.examples_from_records(bench.split("val") + bench.split("test"), "stage2")
    model = tiny_model(tok)
    before = T.evaluate(model, tok, None, "stage2", held)["loss"]
    result = T.train(fast(mode="two-stage", stage=2, steps=30, batch_size=8, lr=1e-2, eval_samples=0), tmp_path / "c",
                     train_ex, held, model=model, tokenizer=tok)
    assert result.metrics["loss"] < before - 0.5
    # The checkpoint is in the original layout and reloads bit for bit.
    reloaded = load_pretrained(tmp_path / "c")
    ids = torch.tensor([scoring_prompt(tok, V1, "stage2", held[0].description).ids])
    model.eval()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "mechbiqa.json", T.STATE_FILE):
        assert (tmp_path / "c" / name).is_file()
    info = read_info(tmp_path / "c")
    assert (info.mode, info.stage, info.step) == ("two-stage", 2, 30) and info.data["metrics"]["loss"] < before


def test_two_stage_pair_and_raters(tok, bench, tmp_path):
    train_rec, held = bench.split("train"), bench.split("val")
    one = T.train(fast(eval_samples=3), tmp_path / "one", T.examples_from_records(train_rec, "one-stage"),
                  T.examples_from_records(held, "one-stage"), model=tiny_model(tok), tokenizer=tok)
    assert {"srcc", "level_acc", "family_rate", "loss"} <= set(one.metrics)
    s1, s2 = T.train_two_stage(fast(mode="two-stage", stage=1, steps=2, eval_samples=3),
                               fast(mode="two-stage", stage=2, steps=1, eval_samples=3), tmp_path / "pair",
                               train_rec, held, model=tiny_model(tok), tokenizer=tok)
    assert read_info(tmp_path / "pair" / "stage2").data["parent"] == str(tmp_path / "pair" / "stage1")
    assert "family_rate" in s1.metrics and "srcc" in s2.metrics
    images = [r.image_path for r in held[:3]]
    for rater, kind in ((load_rater(tmp_path / "one"), OneStageRater), (load_rater(tmp_path / "pair"), TwoStageRater)):
        assert isinstance(rater, kind)
        rater.max_new_tokens = 4
        ratings = rater.rate(images)
        for r in ratings:
            assert r.prompt.quality_index == len(r.prompt.ids) - 1
            assert r.roles.quality_position == len(r.roles) - 1
            assert 0 <= r.score <= 1 and r.level in LEVEL_WORDS and r.level_logits.shape == (5,)
            if r.description_span:
                start, end = r.description_span
                described = np.isin(r.roles.source_index, np.arange(start, end))
                assert set(r.roles.role[described]) == {Role.DESCRIPTION}
        two_stage = kind is TwoStageRater
        assert all((Role.IMAGE in r.roles.role) != two_stage for r in ratings)
    # A stage-2 prompt's description (user turn) gets the description role.
    r = TwoStageRater.from_pretrained(tmp_path / "pair").rate_descriptions([held[1].description])[0]
    text = tok.decode([r.prompt.ids[i] for i in range(*r.description_span)])
    assert text == held[1].description


# ------------------------------------------------------------------------------------------ refusals
def test_bad_inputs_are_refused_by_name(tok, bench, tmp_path):
    record = bench.split("train")[0]
    no_word = T.Example(id="x", image=record.image_path, description="Sharp.", level=None)
    with pytest.raises(T.TrainingDataError, match="answer without a quality word"):
        T.check_example(no_word, "one-stage")
    with pytest.raises(T.TrainingDataError, match="answer without a quality word"):
        T.encode_example(tok, V1, "stage2", dataclasses.replace(no_word, level="splendid"))
    T.check_example(no_word, "stage1")  # stage 1 needs no level word
    with pytest.raises(T.TrainingDataError, match="empty description"):
        T.check_example(dataclasses.replace(no_word, description="  ", level="good"), "stage2")
    with pytest.raises(T.TrainingDataError, match="empty description"):
        T.examples_from_records([dataclasses.replace(record, description="")], "stage1")
    with pytest.raises(T.TrainingDataError, match="no image"):
        T.check_example(dataclasses.replace(no_word, image=None), "stage1")

    ex = T.examples_from_records(bench.split("train"), "one-stage")
    T.train(fast(steps=1), tmp_path / "one", ex, model=tiny_model(tok), tokenizer=tok)
    # Stage 2 must start from a stage-1 checkpoint.
    with pytest.raises(CheckpointModeError, match="one-stage checkpoint"):
        T.train(fast(mode="two-stage", stage=2, steps=1, init_from=str(tmp_path / "one")), tmp_path / "s2",
                T.examples_from_records(bench.split("train"), "stage2"))
    # Resuming into a directory of another mode.
    with pytest.raises(CheckpointModeError, match="one-stage run"):
        T.train(fast(mode="two-stage", stage=1, steps=1), tmp_path / "one",
                T.examples_from_records(bench.split("train"), "stage1"), model=tiny_model(tok), tokenizer=tok)
    with pytest.raises(ValueError, match="steps differ"):
        T.train(fast(steps=2), tmp_path / "one", ex, model=tiny_model(tok), tokenizer=tok)
    # Raters refuse checkpoints of the other mode.
    with pytest.raises(CheckpointModeError):
        TwoStageRater.from_pretrained(tmp_path / "one")
    with pytest.raises(CheckpointModeError):
        T.load_trained(tmp_path / "one", "two-stage", 1)
    with pytest.raises(ValueError, match="stage"):
        T.TrainConfig(mode="two-stage")


# ------------------------------------------------------------------------------------------ text
def test_tokenizer_keeps_level_pieces_and_descriptions_are_matched(tok, bench):
    T.check_level_pieces(tok)
    for word in LEVEL_WORDS:
        assert tok.word_id(word) in tok.encode(quality_sentence(word))
    for r in bench.split("test")[:12]:
        m = match_description(r.description, bench.config.distortions)
        assert (m.distortion, m.level) == (r.distortion, r.level) and m.similarity == 1.0


def test_lora_trains_adapters_and_exports_merged_weights(tok, bench, tmp_path):
    pytest.importorskip("peft")
    ex = T.examples_from_records(bench.split("train"), "stage2")
    base = tiny_model(tok)
    T.train(fast(mode="two-stage", stage=2, steps=1), tmp_path / "base", ex, model=base, tokenizer=tok)
    cfg = fast(mode="two-stage", stage=2, steps=3, lora_rank=4, lr=5e-2, init_from=str(tmp_path / "base"))
    # init_from is a stage-2 checkpoint: a stage-2 run needs stage 1 there.
    with pytest.raises(CheckpointModeError):
        T.train(cfg, tmp_path / "lora", ex)
    T.train(fast(mode="two-stage", stage=1, steps=1), tmp_path / "s1", T.examples_from_records(bench.split("train"),
            "stage1"), model=tiny_model(tok), tokenizer=tok)
    cfg = cfg.replace(init_from=str(tmp_path / "s1"), checkpoint_every=1)
    # Interrupted: the checkpoint holds the adapters only (no 7B-sized weights), and no merged export.
    T.train(cfg, tmp_path / "lora", ex, stop_after=2)
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    assert read_info(tmp_path / "lora").data["weights"] == "adapters" and T.State.load(tmp_path / "lora").step == 2
    result = T.train(cfg, tmp_path / "lora", ex)
    assert read_info(tmp_path / "lora").data["weights"] == "full"
    state = T.State.load(tmp_path / "lora")
    assert state.adapter and all("lora_" in k for k in state.adapter)
    merged, start = load_pretrained(tmp_path / "lora"), load_pretrained(tmp_path / "s1")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert changed and all(k.startswith("llm.blocks.") for k in changed)
    assert len(result.losses) == 3
