"""The one forward path: padded prompt batches, resuming from a layer, per-row sampling."""

from __future__ import annotations

import pytest
import torch

from mechbiqa.model.generation import KVCache, select_next_token
from mechbiqa.model.prompts import EncodedPrompt
from mechbiqa.model.roles import Role, batch_prompts, pad_ids
from mechbiqa.sources import tiny_random_model
from mechbiqa_hooks import names

IMAGE = -200


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, processor = tiny_random_model(3)
    return model, tokenizer


def _prompts() -> list[EncodedPrompt]:
    """Ragged prompts: image rows and text-only rows, the image at different places."""
    rows = [
        (1, 40, IMAGE, 41, 42, 43, 44),
        (1, 50, 51, 52),  # text only
        (1, IMAGE, 60, 61, 62, 63, 64, 65, 66),
        (1, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79),  # text only, longest text
        (1, 80, 81, IMAGE, 82),
    ]
    return [EncodedPrompt(text="", ids=r, response_start=len(r) - 1, quality_index=len(r) - 1) for r in rows]


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _llm_slices(name: str, act: torch.Tensor, row: int, n: int) -> torch.Tensor:
    """The real part of one row of a left-padded LLM activation (``n`` real positions)."""
    a = act[row]
    if name.endswith(("hook_pattern", "hook_attn_scores")):  # [head, query, key]
        return a[:, -n:, -n:]
    return a[-n:]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_prompt_alone_at_every_hook(tiny, side):
    model, tokenizer = tiny
    prompts = _prompts()
    pixels = _pixels(sum(p.n_images for p in prompts), model.cfg.vision.image_size)
    batch = batch_prompts(
        prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens, side=side
    )
    assert batch.input_ids.shape == (5, 11) and batch.length == max(11, 8 + model.cfg.n_image_tokens)
    if side == "left":
        assert int(batch.attention_mask[1, 0]) == 0 and int(batch.attention_mask[1, -1]) == 1
    with torch.no_grad():
        ((_, _, out),) = list(model.forward_batches(batch, pixels, batch_size=8))
        _, whole = model.run_with_cache(batch.input_ids, images=pixels, attention_mask=batch.attention_mask)
    image_at = 0
    compared = set()
    for i, prompt in enumerate(prompts):
        n_img = prompt.n_images
        with torch.no_grad():
            _, alone = model.run_with_cache(
                torch.tensor([prompt.ids]), images=pixels[image_at : image_at + n_img] if n_img else None
            )
        n = len(batch.roles[i].unpadded())
        # The roles say where the row sits: its real positions are the last n columns.
        assert (batch.roles[i].role[: batch.length - n] == Role.PAD).all()
        assert batch.quality[i] == batch.length - 1
        for name, act in alone.items():
            if not name.startswith("llm."):
                continue
            compared.add(name)
            torch.testing.assert_close(
                _llm_slices(name, whole[name], i, n), act[0], atol=2e-5, rtol=1e-4, msg=f"{name}, row {i}"
            )
        torch.testing.assert_close(
            out.logits[i, -n:],
            model(
                torch.tensor([prompt.ids]), images=pixels[image_at : image_at + n_img] if n_img else None
            ).logits[0],
            atol=2e-5,
            rtol=1e-4,
        )
        image_at += n_img
    for name in ("hook_image_tokens", names.VISION_OUT):  # image encodings do not depend on the prompt rows
        torch.testing.assert_close(
            whole[name],
            model.run_with_cache(
                batch.input_ids[[0, 2, 4]], images=pixels, attention_mask=batch.attention_mask[[0, 2, 4]]
            )[1][name],
        )
    assert names.resid_pre(0) in compared and names.pattern(model.cfg.llm.n_layers - 1) in compared


def test_split_sub_batches_equal_the_whole_batch(tiny):
    model, tokenizer = tiny
    prompts = _prompts()
    pixels = _pixels(3, model.cfg.vision.image_size, 1)
    batch = batch_prompts(prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens)
    with torch.no_grad():
        whole = model(batch.input_ids, images=pixels, attention_mask=batch.attention_mask).logits[:, -1]
        parts = [
            (rows, sub, out.logits[:, 0])
            for rows, sub, out in model.forward_batches(batch, pixels, 2, logits_at=-1)
        ]
    assert [sub.first_image for _, sub, _ in parts] == [0, 1, 2]
    torch.testing.assert_close(torch.cat([p for _, _, p in parts]), whole, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one image per placeholder"):
        list(model.forward_batches(batch, pixels[:2], 8))


def test_pad_ids_by_hand():
    ids, mask = pad_ids([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_ids([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises((ValueError, TypeError), match="side"):  # TypeError: the annotation's check, under pytest
        pad_ids([[1]], 0, side="middle")  # type: ignore[arg-type]


def test_resuming_from_every_layer_with_the_clean_cache_equals_the_full_forward(tiny):
    model, tokenizer = tiny
    prompts = _prompts()
    pixels = _pixels(3, model.cfg.vision.image_size, 2)
    batch = batch_prompts(prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens)
    with torch.no_grad():
        clean = model(
            batch.input_ids,
            images=pixels,
            attention_mask=batch.attention_mask,
            use_cache=True,
            output_hidden_states=True,
        )
        length = clean.logits.shape[1]
        for layer in range(model.cfg.llm.n_layers):
            for start in (0, 3, length - 7, length - 1):
                out = model.run_from(clean, layer, start)
                torch.testing.assert_close(out, clean.logits[:, start:], atol=2e-5, rtol=1e-4)
            rows = torch.tensor([4, 1, 1])
            last = model.run_from(clean, layer, length - 9, rows=rows, logits_at=-1)
            torch.testing.assert_close(last[:, 0], clean.logits[rows, -1], atol=2e-5, rtol=1e-4)
        # Hooks of the blocks it runs see the recomputed positions only, and the clean values there.
        seen = {}
        layer, start = (
            model.cfg.llm.n_layers - 2,
            length - 5,
        )  # (the last entry of hidden_states is normalised)
        with model.hooks(fwd_hooks=[(names.resid_post(layer), lambda a, hook: seen.update(x=a.clone()))]):
            model.run_from(clean, layer, start)
        torch.testing.assert_close(seen["x"], clean.hidden_states[layer + 1][:, start:], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="use_cache"):
        model.run_from(model(batch.input_ids, images=pixels, attention_mask=batch.attention_mask), 0)
    with pytest.raises(ValueError, match="outside"):
        model.run_from(clean, model.cfg.llm.n_layers)


# --------------------------------------------------------------------------- sampling
def _old_decode(model, cache: KVCache, generators, *, max_new_tokens, temperature, top_k, top_p, eos):
    """The decoding loop of the former ``analysis.instability.decode`` (one stream per row), copied."""
    logits = cache.last_logits
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    pad = model.cfg.llm.pad_token_id
    new = []
    for step in range(max_new_tokens):
        token = torch.cat([
            select_next_token(logits[r : r + 1], do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=g)
            for r, g in enumerate(generators)
        ])  # fmt: skip
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        if eos is not None:
            done |= token == eos
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model(token[:, None], past_key_values=cache).logits[:, -1]
    return torch.stack(new, dim=1)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0, top_k=None, top_p=None, eos=None),
        dict(temperature=0.7, top_k=20, top_p=0.9, eos=5),
    ],
)
def test_generate_with_a_generator_per_row_equals_the_former_per_row_decoder(tiny, settings):
    model, tokenizer = tiny
    prompts = [p for p in _prompts() if p.n_images == 1][:2]
    pixels = _pixels(2, model.cfg.vision.image_size, 3)
    batch = batch_prompts(prompts, pad_id=tokenizer.pad_id, n_image_tokens=model.cfg.n_image_tokens)
    seeds = [11, 12, 13, 21, 22, 23]
    with torch.no_grad():
        cache = model.prefill(batch.input_ids, pixels, batch.attention_mask)
        ref = _old_decode(
            model,
            cache.repeat_interleave(3),
            [torch.Generator().manual_seed(s) for s in seeds],
            max_new_tokens=8,
            **settings,
        )
        cache = model.prefill(batch.input_ids, pixels, batch.attention_mask)
        ids = batch.input_ids.repeat_interleave(3, dim=0)
        out = model.generate(
            ids,
            max_new_tokens=8,
            do_sample=True,
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            eos_token_id=settings["eos"],
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            past_key_values=cache.repeat_interleave(3),
        )
    assert torch.equal(out[:, ids.shape[1] :], ref)
    assert len({tuple(r) for r in ref.tolist()}) > 1  # the rows really draw differently
    # A row's draws do not depend on its neighbours: row 4 alone, its own seed, the same tokens.
    with torch.no_grad():
        alone = model.generate(
            batch.input_ids[1:2],
            pixels[1:2],
            batch.attention_mask[1:2],
            max_new_tokens=8,
            do_sample=True,
            temperature=settings["temperature"],
            top_k=settings["top_k"],
            top_p=settings["top_p"],
            eos_token_id=settings["eos"],
            generator=[torch.Generator().manual_seed(seeds[4])],
        )
    new = alone[0, batch.input_ids.shape[1] :]
    assert torch.equal(new, ref[4, : len(new)])
    with pytest.raises(ValueError, match="one per row"):
        model.generate(
            batch.input_ids,
            pixels,
            batch.attention_mask,
            do_sample=True,
            max_new_tokens=1,
            generator=[torch.Generator()],
        )
