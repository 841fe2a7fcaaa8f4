"""Behaviour of the port on a random tiny model: hooks, routing, splicing, padding, decoding, dtypes."""

from __future__ import annotations

import pytest
import torch

from mechbiqa.model import IMAGE_TOKEN_INDEX as IMG
from mechbiqa.model import MPLUGOwl2
from mechbiqa.model.llm import Multiway, MultiwayRMSNorm
from mechbiqa_hooks import names, patch
from tests.conftest import randomize_

N_IMG = 5  # ModelConfig.tiny(): 4 queries + vit_eos


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def test_golden_hook_names(tiny_model):
    golden = ["hook_image_tokens", "llm.hook_modality", "vision.hook_out", "abstractor.hook_out",
              "llm.unembed.hook_out", "llm.ln_final.hook_normalized", "llm.ln_final.hook_scale"]
    for layer in range(2):
        for tower in ("llm", "vision"):
            golden += [f"{tower}.blocks.{layer}.hook_{h}" for h in
                       ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")]
            golden += [f"{tower}.blocks.{layer}.attn.hook_pattern", f"{tower}.blocks.{layer}.attn.hook_z"]
        golden += [f"llm.blocks.{layer}.attn.hook_{h}" for h in ("q", "k", "v", "attn_scores")]
        golden += [f"llm.blocks.{layer}.{ln}.hook_{h}" for ln in ("ln1", "ln2") for h in ("scale", "normalized")]
        golden += [f"llm.blocks.{layer}.mlp.hook_pre", f"llm.blocks.{layer}.mlp.hook_post"]
        golden += [f"abstractor.blocks.{layer}.hook_{h}" for h in ("resid_pre", "pattern", "resid_post")]
    assert sorted(tiny_model.hook_dict) == sorted(golden) == names.all_hook_names(tiny_model.cfg)


@torch.no_grad()
def test_hook_shapes(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8], [1, IMG, 3, 4, 5]])
    _, cache = tiny_model.run_with_cache(ids, images=pixels[:2])
    t = 5 - 1 + N_IMG
    assert cache[names.resid_post(1)].shape == (2, t, 32)
    assert cache[names.pattern(0)].shape == (2, 4, t, t)
    assert cache[names.attn(0, "q")].shape == (2, t, 4, 8)
    assert cache[names.IMAGE_TOKENS].shape == (2, N_IMG, 32)
    assert cache[names.pattern(1, "abstractor")].shape == (2, 2, 4, 4 + 5)
    assert cache[names.pattern(0, "vision")].shape == (2, 2, 5, 5)
    assert torch.equal(cache[names.MODALITY][0], torch.tensor([0, 0] + [1] * N_IMG + [0, 0]))


@torch.no_grad()
def test_identity_hooks_and_clean_patch_leave_logits_unchanged(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8, 3]])
    clean, cache = tiny_model.run_with_cache(ids, images=pixels[:1])
    identity = [(n, lambda act, hook: act) for n in tiny_model.hook_dict if n != names.MODALITY]
    assert torch.equal(tiny_model.run_with_hooks(ids, images=pixels[:1], fwd_hooks=identity).logits, clean.logits)
    image_positions = torch.arange(2, 2 + N_IMG)[None]
    hooks = [(names.resid_post(layer), patch.patch_hook(image_positions, cache[names.resid_post(layer)]))
             for layer in range(2)]
    assert torch.equal(tiny_model.run_with_hooks(ids, images=pixels[:1], fwd_hooks=hooks).logits, clean.logits)
    ablate = [(names.resid_post(0), patch.ablate_hook(image_positions, "zero"))]
    changed = tiny_model.run_with_hooks(ids, images=pixels[:1], fwd_hooks=ablate).logits
    assert (changed[0, -1] - clean.logits[0, -1]).abs().max() > 1e-3
    assert not tiny_model.hook_dict[names.resid_post(0)].fwd_hooks  # removed after use


@torch.no_grad()
def test_multiway_routing_equals_a_per_token_loop(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8, 3]])
    out, cache = tiny_model.run_with_cache(ids, images=pixels[:1])
    block = tiny_model.llm.blocks[0]
    x, modality = cache[names.resid_pre(0)][0], out.modality[0]
    for p in range(x.shape[0]):
        m = int(modality[p])
        k_ref = block.attn.k_proj.multiway[m](block.ln1.multiway[m].weight * (x[p] * torch.rsqrt(x[p].pow(2).mean() + 1e-6)))
        k_ours = cache[names.attn(0, "k")][0, p].flatten()
        # k is stored after RoPE: undo nothing, compare at position 0 only where RoPE is the identity
        if p == 0:
            assert torch.allclose(k_ours, k_ref, atol=1e-5)
        v_ours = cache[names.attn(0, "v")][0, p].flatten()
        assert torch.allclose(v_ours, block.attn.v_proj.multiway[m](block.ln1.multiway[m].weight * (
            x[p] * torch.rsqrt(x[p].pow(2).mean() + 1e-6))), atol=1e-5)
    lin = Multiway(6, 3)
    randomize_(lin)
    xs, mod = torch.randn(2, 4, 6), torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    loop = torch.stack([torch.stack([lin.multiway[int(mod[b, p])](xs[b, p]) for p in range(4)]) for b in range(2)])
    assert torch.allclose(lin(xs, mod), loop, atol=1e-6)
    norm = randomize_(MultiwayRMSNorm(6, 1e-6), seed=3)
    ref = torch.stack([torch.stack([norm.multiway[int(mod[b, p])].weight * xs[b, p] * torch.rsqrt(
        xs[b, p].pow(2).mean() + 1e-6) for p in range(4)]) for b in range(2)])
    assert torch.allclose(norm(xs, mod), ref, atol=1e-6)


@torch.no_grad()
def test_two_images_in_one_sequence_take_images_in_order(tiny_model, pixels):
    ids = torch.tensor([[1, IMG, 5, IMG, 6], [1, 7, 8, IMG, 9]])
    out, cache = tiny_model.run_with_cache(ids, images=pixels)
    image_rows = cache[names.IMAGE_TOKENS]
    emb = cache[names.resid_pre(0)]
    assert torch.equal(emb[0, 1:1 + N_IMG], image_rows[0])
    assert torch.equal(emb[0, 2 + N_IMG:2 + 2 * N_IMG], image_rows[1])
    # row 1 is shorter (one image): 13 vs 9 spliced positions, left-padded by 4; its image is the third
    pad = (5 - 2 + 2 * N_IMG) - (5 - 1 + N_IMG)
    assert torch.equal(out.attention_mask[1, :pad], torch.zeros(pad, dtype=torch.long))
    assert torch.equal(emb[1, pad + 3:pad + 3 + N_IMG], image_rows[2])
    alone = tiny_model(ids[1:], images=pixels[2:]).logits
    assert torch.allclose(out.logits[1, pad:], alone[0], atol=1e-5)


@torch.no_grad()
def test_padding_does_not_change_real_positions(tiny_model, pixels):
    short = torch.tensor([[1, IMG, 5, 6]])
    long = torch.tensor([[1, 9, 10, IMG, 11, 12, 13, 14]])
    ref_short = tiny_model(short, images=pixels[:1]).logits[0]
    ref_long = tiny_model(long, images=pixels[1:2]).logits[0]
    for side in ("left", "right"):
        pad = torch.zeros(1, 4, dtype=torch.long)
        padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
        mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 4)], 1) if side == "left" else torch.cat(
            [torch.ones(1, 4), torch.zeros(1, 4)], 1)
        batch = torch.cat([padded, long])
        out = tiny_model(batch, images=pixels[:2], attention_mask=torch.cat([mask, torch.ones(1, 8)]).long())
        n_short = ref_short.shape[0]
        assert torch.allclose(out.logits[0, -n_short:], ref_short, atol=1e-5), side
        assert torch.allclose(out.logits[1], ref_long, atol=1e-5), side
        assert int(out.attention_mask[0].sum()) == n_short


@torch.no_grad()
def test_batched_generation_with_padding_equals_one_by_one(tiny_model, pixels):
    a = torch.tensor([[1, IMG, 5, 6]])
    b = torch.tensor([[1, 9, 10, IMG, 11, 12]])
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), a], 1), b])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    together = tiny_model.generate(batch, images=pixels[:2], attention_mask=mask, max_new_tokens=5)
    assert torch.equal(together[0, -5:], tiny_model.generate(a, images=pixels[:1], max_new_tokens=5)[0, -5:])
    assert torch.equal(together[1, -5:], tiny_model.generate(b, images=pixels[1:2], max_new_tokens=5)[0, -5:])


@torch.no_grad()
def test_kv_cache_decode_equals_full_recompute(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8]])
    out = tiny_model.generate(ids, images=pixels[:1], max_new_tokens=6)
    full = tiny_model(out[:, :-1], images=pixels[:1]).logits
    assert torch.equal(full[0, -6:].argmax(-1), out[0, -6:])


@torch.no_grad()
def test_seeded_sampling_repeats_and_shared_prefill_matches(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8]])
    draw = lambda seed: tiny_model.generate(  # noqa: E731
        ids, images=pixels[:1], max_new_tokens=6, do_sample=True, temperature=1.5,
        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert any(not torch.equal(draw(3), draw(s)) for s in range(4, 9))
    cache = tiny_model.prefill(ids, images=pixels[:1]).repeat_interleave(4)
    shared = tiny_model.generate(ids.repeat(4, 1), past_key_values=cache, max_new_tokens=6, do_sample=True,
                                 temperature=1.5, generator=torch.Generator().manual_seed(3))
    separate = tiny_model.generate(ids.repeat(4, 1), images=pixels[:1].repeat(4, 1, 1, 1), max_new_tokens=6,
                                   do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(shared, separate)


@torch.no_grad()
def test_eos_stops_rows(tiny_model, pixels):
    ids = torch.tensor([[1, 9, IMG, 7, 8]])
    first = int(tiny_model.generate(ids, images=pixels[:1], max_new_tokens=1)[0, -1])
    out = tiny_model.generate(ids, images=pixels[:1], max_new_tokens=8, eos_token_id=first)
    assert out.shape[1] == ids.shape[1] + 1


@pytest.mark.parametrize(
    ("ids", "n_images", "message"),
    [
        ([[1, 5, 6]], 1, "put the <|image|> placeholder"),
        ([[1, IMG, 6]], 0, "pass the images"),
        ([[1, IMG, 6, IMG]], 1, "one image per placeholder"),
    ],
)
def test_placeholder_image_mismatch_is_refused(tiny_model, pixels, ids, n_images, message):
    with pytest.raises(ValueError, match="placeholder") as err:
        tiny_model(torch.tensor(ids), images=pixels[:n_images] if n_images else None)
    assert message in str(err.value)


def test_wrong_image_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"\[n, 3, 28, 28\]"):
        tiny_model(torch.tensor([[1, IMG]]), images=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_close_to_fp32(tiny_model, pixels, dtype):
    ids = torch.tensor([[1, 9, IMG, 7, 8]])
    ref = tiny_model(ids, images=pixels[:1]).logits
    half = MPLUGOwl2(tiny_model.cfg)
    half.load_state_dict(tiny_model.state_dict())
    half = half.to(dtype).eval()
    out = half(ids, images=pixels[:1].to(dtype))
    assert out.logits.dtype == dtype
    assert (out.logits.float() - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps ~3 digits
    assert half.generate(ids, images=pixels[:1], max_new_tokens=3).shape == (1, 8)
