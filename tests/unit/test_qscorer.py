"""Q-Scorer: score tokens, row initialisation, training, and a save / reload through load_pretrained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mechbiqa.finetune_io import write_checkpoint
from mechbiqa.model.load import load_pretrained
from mechbiqa.model.tokenizer import SentencePieceTokenizer, load_tokenizer
from mechbiqa.qscorer import (
    QScorerTrainConfig,
    ScoreTokenSpec,
    add_score_tokens,
    bin_level,
    bin_value,
    finetune_qscorer,
    load_qscorer,
    qscorer_answer,
    qscorer_from_checkpoint,
    save_qscorer,
    score_bin,
    score_token_ids,
    train_qscorer,
)
from mechbiqa.sources import tiny_random_model
from mechbiqa.train import Example
from tests.conftest import LLAMA_TOKENIZER, require


def test_bins_and_their_levels():
    assert [score_bin(x, 5) for x in (0.0, 0.19, 0.2, 0.5, 0.99, 1.0)] == [0, 0, 1, 2, 4, 4]
    assert [bin_value(k, 5) for k in range(5)] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    assert [bin_level(k, 5) for k in range(5)] == ["bad", "poor", "fair", "good", "excellent"]
    assert [bin_level(k, 10) for k in (0, 1, 2, 9)] == ["bad", "bad", "poor", "excellent"]
    assert qscorer_answer("Sharp.", "good", 0.75, 5) == "Sharp. The quality of the image is good.<score_3>"


def test_score_tokens_in_the_llama_tokenizer_survive_a_save(tmp_path):
    base = SentencePieceTokenizer(require(LLAMA_TOKENIZER))
    spec = ScoreTokenSpec(n_bins=7)
    tok = add_score_tokens(base, spec)
    assert score_token_ids(tok, spec) == list(range(32000, 32007))
    text = "The quality of the image is good.<score_3>"
    assert tok.encode(text) == base.encode("The quality of the image is good.") + [32003]
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="already has"):
        add_score_tokens(tok, spec)


@pytest.fixture(scope="module")
def one_stage(tmp_path_factory):
    """A tiny random model saved as a one-stage checkpoint, and four rated images."""
    root = tmp_path_factory.mktemp("qscorer")
    model, tok, proc = tiny_random_model(3)
    write_checkpoint(root / "one-stage", model, tok, proc, {"mode": "one-stage", "template": "v1"})
    rng = np.random.default_rng(0)
    examples = []
    for i, mos in enumerate((0.1, 0.35, 0.6, 0.9)):
        path = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        level = ["bad", "poor", "fair", "good", "excellent"][score_bin(mos, 5)]
        examples.append(
            Example(id=str(i), image=path, description="The image is sharp.", level=level, score=mos)
        )
    return root, examples


def test_new_rows_start_as_the_level_words(one_stage):
    root, _ = one_stage
    spec = ScoreTokenSpec(n_bins=5, d_hidden=16)
    model, _, tok, _ = qscorer_from_checkpoint(root / "one-stage", spec)
    old = load_pretrained(root / "one-stage")
    assert model.cfg.llm.vocab_size == old.cfg.llm.vocab_size + 5
    for k, i in enumerate(score_token_ids(tok, spec)):
        word = tok.word_id(bin_level(k, 5))
        assert torch.equal(model.llm.embed.weight[i], old.llm.embed.weight[word])
        assert torch.equal(model.llm.unembed.weight[i], old.llm.unembed.weight[word])
    n = old.cfg.llm.vocab_size
    assert torch.equal(model.llm.unembed.weight[:n], old.llm.unembed.weight)


def test_train_save_reload_gives_equal_outputs(one_stage, tmp_path):
    root, examples = one_stage
    spec = ScoreTokenSpec(n_bins=5, d_hidden=16, lam=1.0)
    model, head, tok, proc = qscorer_from_checkpoint(root / "one-stage", spec, seed=0)
    cfg = QScorerTrainConfig(steps=8, batch_size=4, lr=3e-3, head_lr=1e-2, label_smoothing=0.0)
    history = train_qscorer(model, head, tok, proc, examples, spec, cfg)
    first, last = history[0], history[-1]
    assert last["ce"] < 0.7 * first["ce"] and last["mse"] < first["mse"], (first, last)

    out = save_qscorer(tmp_path / "qs", model, head, tok, proc, spec)
    info = json.loads((out / "mechbiqa.json").read_text())
    assert info["mode"] == "one-stage" and info["score_head"]["n_bins"] == 5
    reloaded = load_pretrained(out)  # the plain loader reads a Q-Scorer checkpoint like any other
    ids = torch.tensor([[1, 5, 300, *score_token_ids(tok, spec)]])
    pixels = proc([examples[0].image])
    ids = torch.cat([ids[:, :1], torch.tensor([[-200]]), ids[:, 1:]], dim=1)
    assert torch.allclose(
        reloaded(ids, images=pixels).logits, model.eval()(ids, images=pixels).logits, atol=1e-6
    )

    scorer = load_qscorer(out, max_new_tokens=4)
    assert scorer.components.tokenizer.encode("good.<score_2>") == tok.encode("good.<score_2>")
    images = [e.image for e in examples]
    again = scorer.rate(images)
    scorer.components = scorer.components.__class__(model=model, tokenizer=tok, processor=proc, path=out)
    head.eval()
    scorer.head = head
    before = scorer.rate(images)
    assert [(q.token, q.answer, q.emitted) for q in again] == [(q.token, q.answer, q.emitted) for q in before]
    assert [q.regressed for q in again] == pytest.approx([q.regressed for q in before], abs=1e-5)
    assert all(q.token == spec.pieces[q.bin] and q.token_score == bin_value(q.bin, 5) for q in again)


def test_lora_qscorer_trains_the_new_rows_and_writes_merged_weights(one_stage, tmp_path):
    root, examples = one_stage
    spec = ScoreTokenSpec(n_bins=5, d_hidden=8)
    cfg = QScorerTrainConfig(steps=2, batch_size=2, lr=1e-2)
    history = finetune_qscorer(root / "one-stage", tmp_path / "qs", examples, spec, cfg, lora_rank=2)
    assert len(history) == 2
    start, _, tok, _ = qscorer_from_checkpoint(root / "one-stage", spec)
    trained = load_pretrained(tmp_path / "qs")  # merged: no adapter keys, the plain loader reads it
    ids = score_token_ids(tok, spec)
    assert not torch.equal(trained.llm.embed.weight[ids], start.llm.embed.weight[ids])
    block = "llm.blocks.0.mlp.up_proj.weight"
    assert not torch.equal(trained.state_dict()[block], start.state_dict()[block])  # the LoRA delta, merged
    # the vision tower is frozen under LoRA
    assert torch.equal(trained.vision.embed.patch_embed.weight, start.vision.embed.patch_embed.weight)
