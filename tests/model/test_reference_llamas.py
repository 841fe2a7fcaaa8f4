"""The text-only path against two independent LLaMA implementations on the same weights.

With ``images=None`` every position takes the text branch (``multiway.0``), so the
LLM must equal a plain LLaMA holding those weights: transformers' own
``LlamaForCausalLM`` (eager attention) and TransformerLens' native LLaMA bridge.
Compared layer by layer, not only at the logits.
"""

from __future__ import annotations

import pytest
import torch

from mechbiqa.model import MPLUGOwl2
from mechbiqa_hooks import names

ATOL = 2e-5


def text_branch(model: MPLUGOwl2) -> dict[str, torch.Tensor]:
    """Our LLM's text-branch weights, by role."""
    sd = model.llm.state_dict()
    out = {"embed": sd["embed.weight"], "norm": sd["ln_final.weight"], "lm_head": sd["unembed.weight"]}
    for layer in range(model.cfg.llm.n_layers):
        p = f"blocks.{layer}."
        out |= {
            f"{layer}.q": sd[p + "attn.q_proj.weight"], f"{layer}.k": sd[p + "attn.k_proj.multiway.0.weight"],
            f"{layer}.v": sd[p + "attn.v_proj.multiway.0.weight"], f"{layer}.o": sd[p + "attn.o_proj.weight"],
            f"{layer}.ln1": sd[p + "ln1.multiway.0.weight"], f"{layer}.ln2": sd[p + "ln2.multiway.0.weight"],
            f"{layer}.gate": sd[p + "mlp.gate_proj.weight"], f"{layer}.up": sd[p + "mlp.up_proj.weight"],
            f"{layer}.down": sd[p + "mlp.down_proj.weight"],
        }
    return out


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.tensor([[1, 17, 93, 5, 64, 101, 33, 2, 9, 120, 44, 71]])


@torch.no_grad()
def test_equals_transformers_llama(tiny_model, ids):
    transformers = pytest.importorskip("transformers")
    c = tiny_model.cfg.llm
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings, attention_bias=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    w = text_branch(tiny_model)
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"], "lm_head.weight": w["lm_head"]}
    for layer in range(c.n_layers):
        p = f"model.layers.{layer}."
        sd |= {p + "self_attn.q_proj.weight": w[f"{layer}.q"], p + "self_attn.k_proj.weight": w[f"{layer}.k"],
               p + "self_attn.v_proj.weight": w[f"{layer}.v"], p + "self_attn.o_proj.weight": w[f"{layer}.o"],
               p + "input_layernorm.weight": w[f"{layer}.ln1"], p + "post_attention_layernorm.weight": w[f"{layer}.ln2"],
               p + "mlp.gate_proj.weight": w[f"{layer}.gate"], p + "mlp.up_proj.weight": w[f"{layer}.up"],
               p + "mlp.down_proj.weight": w[f"{layer}.down"]}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ref = hf(ids, output_hidden_states=True)
    ours = tiny_model(ids, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        assert (a - b).abs().max() < ATOL, f"hidden state {i}"
    assert (ours.logits - ref.logits).abs().max() < ATOL


def to_adjacent_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1).

    TransformerLens' native rotary rotates adjacent pairs; permuting q and k rows alike
    leaves every attention score unchanged.
    """
    d_head = w.shape[0] // n_heads
    half = torch.arange(d_head // 2)
    order = torch.stack([half, half + d_head // 2], dim=1).flatten()
    return w.view(n_heads, d_head, -1)[:, order].reshape_as(w)


@torch.no_grad()
def test_equals_transformerlens_llama(tiny_model, ids):
    tl = pytest.importorskip("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    c = tiny_model.cfg.llm
    bridge = TransformerBridge.boot_native(tl.TransformerBridgeConfig(
        d_model=c.d_model, d_head=c.d_head, n_heads=c.n_heads, n_layers=c.n_layers, n_ctx=c.max_position_embeddings,
        d_vocab=c.vocab_size, d_mlp=c.d_mlp, n_key_value_heads=c.n_kv_heads, normalization_type="RMS",
        final_rms=True, positional_embedding_type="rotary", rotary_dim=c.d_head, rotary_base=c.rope_theta,
        gated_mlp=True, act_fn="silu", eps=c.rms_norm_eps,
    ))
    w = text_branch(tiny_model)
    sd = {k: torch.zeros_like(v) for k, v in bridge.state_dict().items() if k.endswith(".bias")}
    sd |= {"embed.weight": w["embed"], "ln_final.weight": w["norm"], "unembed.weight": w["lm_head"]}
    for layer in range(c.n_layers):
        p = f"blocks.{layer}."
        sd |= {p + "attn.q.weight": to_adjacent_pairs(w[f"{layer}.q"], c.n_heads),
               p + "attn.k.weight": to_adjacent_pairs(w[f"{layer}.k"], c.n_kv_heads),
               p + "attn.v.weight": w[f"{layer}.v"], p + "attn.o.weight": w[f"{layer}.o"],
               p + "ln1.weight": w[f"{layer}.ln1"], p + "ln2.weight": w[f"{layer}.ln2"],
               p + "mlp.gate.weight": w[f"{layer}.gate"], p + "mlp.in.weight": w[f"{layer}.up"],
               p + "mlp.out.weight": w[f"{layer}.down"]}
    bridge.load_state_dict(sd, strict=True)
    ref_logits, ref_cache = bridge.run_with_cache(ids)
    ours_logits, ours_cache = tiny_model.run_with_cache(ids)
    for layer in range(c.n_layers):
        ref = ref_cache[f"blocks.{layer}.hook_resid_post"]
        assert (ours_cache[names.resid_post(layer)] - ref).abs().max() < ATOL, f"resid_post {layer}"
        ref_pattern = ref_cache[f"blocks.{layer}.attn.hook_pattern"]
        assert (ours_cache[names.pattern(layer)] - ref_pattern).abs().max() < ATOL, f"pattern {layer}"
    assert (ours_logits.logits - ref_logits).abs().max() < ATOL
