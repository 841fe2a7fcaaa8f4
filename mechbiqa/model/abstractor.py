"""The visual abstractor: 64 learned queries distil the vision tokens into 65 LLM-width rows.

Each layer lets the queries attend to themselves and to every vision token
(one concatenated key/value sequence), then applies a SwiGLU MLP with a
LayerNorm inside. After the last layer, ``visual_fc`` projects to the LLM
width and the learned ``vit_eos`` row is appended, giving
``n_queries + 1`` image tokens (65 in the released model), which
`mplug_owl2.py` splices into the prompt.

Two details matter numerically (see the fact sheet): ``norm1``, ``normk`` and
``norm2`` use LayerNorm's default eps 1e-5 (only ``ffn_ln`` uses the config's
eps), and the attention residual starts from the *normed* queries.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mechbiqa.model.config import AbstractorConfig
from mechbiqa.model.precision import matmul

_TORCH_LAYERNORM_EPS = 1e-5  # what the original gets by building these norms without an eps


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Rows ``[sin(p w_0..w_{D/2-1}), cos(p w_0..)]`` with ``w_i = 10000^(-i/(D/2))``, in float32 as the original."""
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def query_positions(n_queries: int, dim: int) -> Tensor:
    """``q_pos_embed``: the 1-D table over query indices 0..n-1."""
    return torch.from_numpy(sincos_1d(dim, np.arange(n_queries, dtype=np.float32)).astype(np.float32))


def patch_positions(grid: int, dim: int) -> Tensor:
    """``k_pos_embed``: a zero row for the class token, then per patch ``[table(col), table(row)]``."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)  # raster order: patch = row * grid + col
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    table = np.concatenate([np.zeros([1, dim]), table], axis=0)  # float64 zeros, as the original
    return torch.from_numpy(table.astype(np.float32))


class AbstractorMLP(nn.Module):
    """w2(ffn_ln(silu(w1 x) * w3 x))."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.ffn_ln = nn.LayerNorm(cfg.d_mlp, eps=cfg.layer_norm_eps)
        self.w2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorBlock(nn.Module):
    """Queries attend to [queries; image tokens], then an MLP."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=_TORCH_LAYERNORM_EPS)
        self.normk = nn.LayerNorm(cfg.d_model, eps=_TORCH_LAYERNORM_EPS)
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)
        self.register_buffer("q_pos_embed", query_positions(cfg.n_queries, cfg.d_model))
        self.register_buffer("k_pos_embed", patch_positions(cfg.grid_size, cfg.d_model))
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=_TORCH_LAYERNORM_EPS)
        self.mlp = AbstractorMLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, query, d_model]
        self.hook_pattern = HookPoint()  # [batch, head, query, query + image_token]
        self.float32_products = False  # 16-bit weights on a slow-16-bit CPU: see mechbiqa.model.precision
        self.hook_resid_post = HookPoint()  # [batch, query, d_model]

    def forward(
        self, queries: Float[Tensor, "batch query d_model"], image: Float[Tensor, "batch token d_model"]
    ) -> Float[Tensor, "batch query d_model"]:
        """One cross-attention layer; ``image`` is the same tensor in every layer."""
        queries = self.hook_resid_pre(queries)
        qn = self.norm1(queries)
        kv = torch.cat([qn, self.normk(image)], dim=1)
        pos = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).to(kv.dtype)
        split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.n_heads)  # noqa: E731
        q = split(self.query(qn + self.q_pos_embed.to(qn.dtype)))
        k = split(self.key(kv + pos))
        v = split(self.value(kv))  # no position term on the values
        scores = matmul(q, k.transpose(-1, -2), self.float32_products) / math.sqrt(self.d_head)
        pattern = self.hook_pattern(F.softmax(scores, dim=-1))
        ctx = rearrange(matmul(pattern, v, self.float32_products), "b h t d -> b t (h d)")
        h = qn + self.out_proj(ctx)  # the residual starts from the normed queries
        return self.hook_resid_post(h + self.mlp(self.norm2(h)))


class Abstractor(nn.Module):
    """Vision tokens -> ``n_queries + 1`` rows in the LLM's width."""

    def __init__(self, cfg: AbstractorConfig, d_llm: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.n_queries, cfg.d_model))
        self.blocks = nn.ModuleList([AbstractorBlock(cfg) for _ in range(cfg.n_layers)])
        self.visual_fc = nn.Linear(cfg.d_model, d_llm)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, d_llm))
        self.hook_out = HookPoint()  # [batch, query + 1, d_llm]

    def forward(self, image: Float[Tensor, "batch token d_model"]) -> Float[Tensor, "batch image_pos d_llm"]:
        """Distil ``image`` into the rows the LLM sees."""
        x = self.query_embeds.to(image.dtype).expand(image.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, image)
        x = self.visual_fc(x)
        eos = self.vit_eos.to(x.dtype).expand(x.shape[0], -1, -1)
        return self.hook_out(torch.cat([x, eos], dim=1))
