"""The language model: LLaMA-2 with modality-adaptive K/V projections and norms.

This is the "multiway" decoder of mPLUG-Owl2. Each layer has two copies of its
K and V projections and of its two RMSNorms, index 0 for text and 1 for image
positions, chosen per token by the modality indicator; the Q and O
projections, the MLP, the final norm and the unembedding are shared.

Reads: `config.LLMConfig`, `generation.KVCache`. Read by: `mplug_owl2.py`,
which splices image tokens into the embedded prompt and calls
`LLM.forward(inputs_embeds, modality, ...)`.

Every intermediate passes through a TransformerLens `HookPoint` whose module
path is its hook name (``llm.blocks.3.attn.hook_pattern`` ...). Numerics follow
transformers 4.31 as patched by the original code: RMSNorm statistics and the
attention softmax in float32, RoPE in the rotate-half form, eager attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mechbiqa.model.config import LLMConfig
from mechbiqa.model.generation import KVCache
from mechbiqa.model.precision import linear, matmul


class RMSNorm(nn.Module):
    """x / rms(x) * w, statistics in float32, weight applied in the input dtype."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]  1 / rms, float32
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """Normalise ``x``."""
        x32 = x.float()
        scale = self.hook_scale(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.hook_normalized(self.weight * (x32 * scale).to(x.dtype))


class _NormWeight(nn.Module):
    """One branch's RMSNorm gain (a module only so the key reads ``ln1.multiway.0.weight``)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))


class MultiwayRMSNorm(nn.Module):
    """RMSNorm whose gain is chosen per position by modality (0 text, 1 image).

    The statistics are per position, so this equals routing each position through
    its branch's RMSNorm; the hooks see the whole ``[batch, pos, ...]`` tensor.
    """

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([_NormWeight(d_model), _NormWeight(d_model)])
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]  1 / rms, float32
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"], modality: Int[Tensor, "batch pos"] | None) -> Tensor:
        """Normalise ``x`` with the gain of each position's modality."""
        x32 = x.float()
        scale = self.hook_scale(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
        text, image = (w.weight for w in self.multiway)
        gain = text if modality is None else torch.where(modality[..., None].bool(), image, text)
        return self.hook_normalized(gain * (x32 * scale).to(x.dtype))


class Multiway(nn.Module):
    """Two bias-free linear maps; each position goes through the one its modality selects.

    Only the positions of a modality are passed to its copy (gather, apply,
    scatter), as in the original; text-only inputs touch copy 0 alone.
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([nn.Linear(d_in, d_out, bias=False), nn.Linear(d_in, d_out, bias=False)])

    def forward(self, x: Tensor, modality: Int[Tensor, "batch pos"] | None) -> Tensor:
        """Apply copy ``modality[b, p]`` to ``x[b, p]``."""
        text, image = self.multiway
        if modality is None or not bool(modality.any()):
            return text(x)
        is_image = modality.bool()
        out_text, out_image = text(x[~is_image]), image(x[is_image])
        out = out_text.new_empty(*x.shape[:-1], out_text.shape[-1])
        out[~is_image] = out_text
        out[is_image] = out_image
        return out


def rotary_cos_sin(
    positions: Int[Tensor, "batch pos"], d_head: int, theta: float, dtype: torch.dtype
) -> tuple[Float[Tensor, "batch pos d_head"], Float[Tensor, "batch pos d_head"]]:
    """RoPE tables for the given position ids, computed in float32 then cast (as the original cache)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, device=positions.device, dtype=torch.int64).float() / d_head))
    freqs = positions.float()[..., None] * inv_freq  # [batch, pos, d_head/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Float[Tensor, "batch head pos d_head"], cos: Tensor, sin: Tensor) -> Tensor:
    """The rotate-half form: the first and second halves of ``d_head`` form the rotated pairs."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Causal self-attention with a shared Q/O and modality-specific K/V."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.d_head
        self.q_proj = nn.Linear(d, cfg.n_heads * dh, bias=False)
        self.k_proj = Multiway(d, cfg.n_kv_heads * dh)
        self.v_proj = Multiway(d, cfg.n_kv_heads * dh)
        self.o_proj = nn.Linear(cfg.n_heads * dh, d, bias=False)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]  after RoPE
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]  after RoPE, new positions only
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]  new positions only
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos]  masked, pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.float32_products = False  # 16-bit weights on a slow-16-bit CPU: see mechbiqa.model.precision
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]  pattern-weighted values

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        modality: Int[Tensor, "batch pos"] | None,
        cos: Tensor,
        sin: Tensor,
        key_mask: Tensor,
        layer: int,
        cache: KVCache | None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attend from the new positions to the cached and new ones."""
        cfg = self.cfg
        split = lambda t, n: rearrange(t, "b p (h d) -> b h p d", h=n)  # noqa: E731
        q = apply_rotary(split(self.q_proj(x), cfg.n_heads), cos, sin)
        k = apply_rotary(split(self.k_proj(x, modality), cfg.n_kv_heads), cos, sin)
        v = split(self.v_proj(x, modality), cfg.n_kv_heads)
        q = rearrange(self.hook_q(rearrange(q, "b h p d -> b p h d")), "b p h d -> b h p d")
        k = rearrange(self.hook_k(rearrange(k, "b h p d -> b p h d")), "b p h d -> b h p d")
        v = rearrange(self.hook_v(rearrange(v, "b h p d -> b p h d")), "b p h d -> b h p d")
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if cfg.n_kv_heads != cfg.n_heads:  # grouped-query attention: share each K/V head
            k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)

        n_new, n_all = q.shape[2], k.shape[2]
        scores = matmul(q, k.transpose(-1, -2), self.float32_products) / math.sqrt(cfg.d_head)
        causal = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(n_all - n_new)
        allowed = causal[None, None] & key_mask[:, None, None, :]
        scores = self.hook_attn_scores(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min))
        pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        z = self.hook_z(rearrange(matmul(pattern, v, self.float32_products), "b h p d -> b p h d"))
        return self.o_proj(rearrange(z, "b p h d -> b p (h d)"))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]  gate pre-activation
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]  silu(gate) * up

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:  # noqa: D102
        return self.down_proj(self.hook_post(F.silu(self.hook_pre(self.gate_proj(x))) * self.up_proj(x)))


class Block(nn.Module):
    """One decoder layer: pre-norm attention then pre-norm MLP, norms chosen by modality."""

    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln1 = MultiwayRMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = MultiwayRMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Tensor, modality: Tensor | None, cos: Tensor, sin: Tensor, key_mask: Tensor,
                cache: KVCache | None) -> Tensor:
        """x -> x + attn(ln1(x)) -> (.) + mlp(ln2(.))."""
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(x, modality), modality, cos, sin, key_mask,
                                                self.layer, cache))
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(x, modality)))
        return self.hook_resid_post(x + mlp_out)


class Unembed(nn.Linear):
    """``lm_head``: a bias-free linear map to vocabulary logits (not tied to the embedding)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.hook_out = HookPoint()  # [batch, pos, vocab]; [n, vocab] where the caller selects positions
        self.float32_products = False  # 16-bit weights on a slow-16-bit CPU: see mechbiqa.model.precision

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.hook_out(linear(x, self.weight, None, self.float32_products))


class LLM(nn.Module):
    """Embedding, the multiway decoder layers, final norm and unembedding."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_modality = HookPoint()  # [batch, pos]  0 = text, 1 = image
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.unembed = Unembed(cfg.d_model, cfg.vocab_size)

    def forward(
        self,
        inputs_embeds: Float[Tensor, "batch pos d_model"],
        modality: Int[Tensor, "batch pos"] | None,
        positions: Int[Tensor, "batch pos"],
        key_mask: Tensor,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        *,
        start_layer: int = 0,
        logits_at: int | Tensor | None = None,
    ) -> tuple[Float[Tensor, "batch out_pos vocab"] | Float[Tensor, "n vocab"], tuple[Tensor, ...] | None]:
        """Run the decoder on already-embedded (and image-spliced) inputs, or resume it from a layer.

        Args:
            inputs_embeds: the spliced embeddings of the new positions; with ``start_layer=l``, the
                residual stream entering layer ``l`` (``hook_resid_pre`` of block ``l``).
            modality: the per-position branch (0 text, 1 image); None means all text.
            positions: RoPE position ids of the new positions.
            key_mask: bool ``[batch, past + pos]``, True where a key may be attended.
            cache: extended in place with this call's keys and values. When resuming from layer
                ``l`` it must hold, for every layer ``>= l``, the keys/values of the ``past``
                positions before the new ones (`KVCache.select` cuts a recorded one).
            output_hidden_states: also return the transformers-convention tuple
                (index 0 = embeddings, i = output of layer i-1, last = after ``ln_final``);
                resumed from layer ``l``, index 0 is the residual entering layer ``l``.
            start_layer: the first block to run (the blocks below are skipped, their hooks silent).
            logits_at: unembed only this column of the new positions (logits ``[batch, 1, vocab]``),
                or, a bool ``[batch, pos]`` mask, only the selected positions (logits ``[n, vocab]`` in
                row-major order: training reads only the answer's); None unembeds every position.

        Returns:
            logits and, if asked, the hidden states.
        """
        if not 0 <= start_layer <= len(self.blocks):
            raise ValueError(f"start_layer={start_layer} is outside 0..{len(self.blocks)} (the LLM's layers)")
        if modality is not None and start_layer == 0:
            modality = self.hook_modality(modality)
        cos, sin = rotary_cos_sin(positions, self.cfg.d_head, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        hidden: list[Tensor] = [x]
        for block in self.blocks[start_layer:]:
            x = block(x, modality, cos, sin, key_mask, cache)
            hidden.append(x)
        x = self.ln_final(x)  # every position: its hook (and the hidden states) keep the sequence's shape
        if logits_at is None:
            logits = self.unembed(x)
        elif isinstance(logits_at, Tensor):  # the vocabulary-wide product is the costly part: only the read rows
            logits = self.unembed(x[logits_at])
        else:
            at = logits_at % x.shape[1]
            logits = self.unembed(x[:, at : at + 1])
        if not output_hidden_states:
            return logits, None
        hidden[-1] = x  # transformers convention: the last entry is after the final norm
        return logits, tuple(hidden)
