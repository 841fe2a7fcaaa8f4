"""The vision tower: a CLIP-style ViT (ViT-L/14 at 448 px in the released model).

pixels ``[batch, 3, S, S]`` -> patch conv (no bias) -> prepend the class token
-> add learned positions -> ``ln_pre`` -> pre-norm blocks -> ``ln_post`` on
every token. The output, class token included, is what `abstractor.py` reads.

The fused ``qkv`` projection keeps the original per-head layout: output feature
``h * 3 * d_head + j * d_head + d`` is part ``j`` (q, k, v) of head ``h``, so
checkpoints load without reshuffling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mechbiqa.model.config import VisionConfig
from mechbiqa.model.precision import matmul


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), CLIP's activation."""
    return x * torch.sigmoid(1.702 * x)


class VisionEmbed(nn.Module):
    """Patchify, prepend the class token, add positions, normalise."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.patch_embed = nn.Conv2d(3, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_model))
        self.ln_pre = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Float[Tensor, "batch 3 S S"]) -> Float[Tensor, "batch token d_model"]:  # noqa: D102
        patches = rearrange(self.patch_embed(pixels), "b d h w -> b (h w) d")  # row-major: token = row * grid + col
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)
        return self.ln_pre(x)


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused, per-head-interleaved qkv."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.hook_pattern = HookPoint()  # [batch, head, query_token, key_token]
        self.float32_products = False  # 16-bit weights on a slow-16-bit CPU: see mechbiqa.model.precision
        self.hook_z = HookPoint()  # [batch, token, head, d_head]

    def forward(self, x: Float[Tensor, "batch token d_model"]) -> Float[Tensor, "batch token d_model"]:  # noqa: D102
        q, k, v = rearrange(self.qkv(x), "b t (h j d) -> j b h t d", h=self.n_heads, j=3)
        scores = matmul(q, k.transpose(-1, -2), self.float32_products) * self.d_head**-0.5
        pattern = self.hook_pattern(F.softmax(scores, dim=-1))  # in the activation dtype, as the original
        z = self.hook_z(rearrange(matmul(pattern, v, self.float32_products), "b h t d -> b t h d"))
        return self.out(rearrange(z, "b t h d -> b t (h d)"))


class VisionMLP(nn.Module):
    """fc2(quick_gelu(fc1(x)))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, token, d_model]
        self.hook_attn_out = HookPoint()  # [batch, token, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, token, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, token, d_model]
        self.hook_resid_post = HookPoint()  # [batch, token, d_model]

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class VisionTower(nn.Module):
    """pixels -> ``ln_post``-ed tokens (class token first)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = VisionEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_post = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.hook_out = HookPoint()  # [batch, token, d_model]  what the abstractor reads

    def forward(
        self, pixels: Float[Tensor, "batch 3 S S"], output_hidden_states: bool = False
    ) -> tuple[Float[Tensor, "batch token d_model"], tuple[Tensor, ...] | None]:
        """Return the normed tokens and, if asked, the embeddings + each block's raw output."""
        size = self.cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ValueError(
                f"images must be a float tensor [n, 3, {size}, {size}] for this checkpoint, got "
                f"{list(pixels.shape)}; preprocess them with the checkpoint's ImageProcessor"
            )
        x = self.embed(pixels.to(self.embed.patch_embed.weight.dtype))
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        out = self.hook_out(self.ln_post(x))
        return out, (tuple(hidden) if output_hidden_states else None)
