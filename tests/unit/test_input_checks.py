"""Inputs checked where they enter the model: token ids before the embedding, pixels before the vision."""

from __future__ import annotations

import pytest
import torch

from mechbiqa.model.checks import check_pixels, check_token_ids
from mechbiqa.model.config import IMAGE_TOKEN_INDEX


def _inputs(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 7, IMAGE_TOKEN_INDEX, 9, 11], [1, 6, 8, IMAGE_TOKEN_INDEX, 10, 12]])
    return ids, torch.randn(2, 3, size, size, generator=g)


def test_check_token_ids_names_bad_ids_and_positions():
    check_token_ids(torch.tensor([[0, 5, IMAGE_TOKEN_INDEX, 127]]), 128)  # all valid
    with pytest.raises(ValueError, match=r"-1 at \(0, 1\), 128 at \(1, 2\); valid ids are 0\.\.127 and -200"):
        check_token_ids(torch.tensor([[3, -1, 4], [5, 6, 128]]), 128)
    with pytest.raises(ValueError, match=r"-100 at \(0,\).*\(and 2 more\)"):
        check_token_ids(torch.tensor([-100] * 7), 128)


def test_model_refuses_bad_ids_instead_of_embedding_them(tiny_model):
    ids, pixels = _inputs(tiny_model)
    vocab = tiny_model.cfg.llm.vocab_size
    with torch.no_grad():
        reference = tiny_model(ids, pixels).logits
        for bad in (-1, -100, vocab, vocab + 5):
            broken = ids.clone()
            broken[1, 4] = bad
            with pytest.raises(ValueError, match=rf"{bad} at \(1, 4\)"):
                tiny_model(broken, pixels)
        torch.testing.assert_close(tiny_model(ids, pixels).logits, reference)  # valid ids still run
        # the cached decoding step checks its ids too
        out = tiny_model(ids, pixels, use_cache=True)
        with pytest.raises(ValueError, match=rf"{vocab} at \(0, 0\)"):
            tiny_model(torch.tensor([[vocab], [3]]), past_key_values=out.past_key_values)


def test_model_refuses_non_finite_pixels(tiny_model):
    ids, pixels = _inputs(tiny_model, seed=1)
    pixels[1, 0, 2, 3] = float("nan")
    pixels[1, 2, 0, 0] = float("inf")
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"1 NaN and 1 infinite value\(s\), in image\(s\) \[1\]"),
    ):
        tiny_model(ids, pixels)
    check_pixels(torch.zeros(1, 3, 4, 4))  # finite: nothing raised
