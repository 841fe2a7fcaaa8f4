"""Starting points for training from scratch: the compact tokenizer, the DCT energy-bank initialisation, the compact model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mechbiqa.data.records import IQARecord
from mechbiqa.model.config import ModelConfig
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.prompts import (
    IMAGE_TAG,
    LEVEL_WORDS,
    QALIGN_ANSWER_PREFIX,
    get_template,
)
from mechbiqa.model.tokenizer import CompactTokenizer, Tokenizer, train_compact_tokenizer
from mechbiqa.pipeline import (
    ONE_STAGE_QUESTION,
    STAGE1_QUESTION,
    STAGE2_QUESTION,
    quality_sentence,
)


def compact_tokenizer(records: Sequence[IQARecord], vocab_size: int = 1024, template: str = "v1") -> CompactTokenizer:
    """A BPE tokenizer trained on the benchmark's text: system sentence, questions, descriptions, answers.

    Research choice: the tokenizer sees only training-split text (pass the
    train records), so a held-out description is read with the same vocabulary
    a real user's text would be.
    """
    tpl = get_template(template)
    fixed = [tpl.prompt(f"{IMAGE_TAG}\n{ONE_STAGE_QUESTION}"), tpl.prompt(f"{IMAGE_TAG}\n{STAGE1_QUESTION}"),
             tpl.prompt(STAGE2_QUESTION, QALIGN_ANSWER_PREFIX)]
    fixed += [quality_sentence(w) for w in LEVEL_WORDS]
    descriptions = [r.description for r in records if r.description]
    # Answers trained on verbatim (annotation files: reasoning and the file's own verdict sentence).
    descriptions += [r.meta["answer"] for r in records if r.meta.get("answer")]
    # The fixed strings occur in every example, so weight them like it: BPE then merges them into
    # few pieces and every sequence is shorter.
    texts = fixed * max(2, len(descriptions) // 4) + descriptions
    # Research choice: the BPE pre-tokenizer splits on spaces only, so "bad." would become one piece
    # and the model would never emit the level word's own piece, whose logit the Q-Align rule reads.
    # Training on text with punctuation set apart learns no letter+punctuation merges, so "bad."
    # encodes as "▁bad" "." -- as LLaMA's SentencePiece does.
    texts = [_PUNCTUATION.sub(r" \1", t) for t in texts]
    tokenizer = train_compact_tokenizer(texts, vocab_size)
    check_level_pieces(tokenizer)
    return tokenizer


_PUNCTUATION = re.compile(r"([.,;:!?])")


def check_level_pieces(tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer whose quality answer does not contain the level words' own pieces.

    Q-Align reads the logit of ``tokenizer.word_id(level)`` after "The quality
    of the image is"; training must teach that very piece.

    Raises:
        ValueError: Naming the level word whose piece is missing from its answer.
    """
    for word in LEVEL_WORDS:
        ids = tokenizer.encode(quality_sentence(word))
        if tokenizer.word_id(word) not in ids:
            pieces = [tokenizer.id_to_piece(i) for i in ids]
            raise ValueError(
                f"the tokenizer encodes {quality_sentence(word)!r} as {pieces}, without the piece of {word!r} "
                f"(id {tokenizer.word_id(word)}) that the Q-Align score reads; retrain it so that the level "
                "word and the full stop are separate pieces (compact_tokenizer does)"
            )


def dct_patch_basis(patch: int, n_filters: int) -> Tensor:
    """Orthonormal patch filters ``[n_filters, 3, patch, patch]``: opponent colour x 2-D DCT-II.

    Luminance (R+G+B) at every spatial frequency first, lowest frequency first,
    then the two chroma axes (R-G, R+G-2B) interleaved from the lowest
    frequency; filters beyond ``3 * patch**2`` are N(0, 0.02).
    """
    a = [math.sqrt((1 if u == 0 else 2) / patch) for u in range(patch)]
    x = torch.arange(patch, dtype=torch.float64)
    cos = torch.stack([a[u] * torch.cos(math.pi * (2 * x + 1) * u / (2 * patch)) for u in range(patch)])
    colours = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
    colours = colours / colours.norm(dim=1, keepdim=True)
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], max(f), f))
    order = [(0, f) for f in freqs] + [(c, f) for f in freqs for c in (1, 2)]
    filters = [colours[c][:, None, None] * torch.outer(cos[u], cos[v])[None] for c, (u, v) in order[:n_filters]]
    out = torch.stack(filters)
    if len(out) < n_filters:
        g = torch.Generator().manual_seed(0)
        extra = torch.randn(n_filters - len(out), 3, patch, patch, generator=g, dtype=torch.float64) * 0.02
        out = torch.cat([out, extra])
    return out.float()


def init_weights(model: MPLUGOwl2, seed: int = 0, patch_init: Literal["dct", "normal"] = "dct",
                 scheme: Literal["fan_in", "gpt2"] = "fan_in", energy_gain: float | None = 4.0,
                 pool_queries: bool = True) -> MPLUGOwl2:
    """Initialise a model for training from scratch.

    Weight matrices ~ N(0, 1/fan_in) (``scheme="fan_in"``; ``"gpt2"``: N(0, 0.02)),
    the output projection of every residual branch scaled by ``1/sqrt(2 L)``
    (L the layers of its tower), token embeddings, ``lm_head``, class token,
    positions and ``vit_eos`` N(0, 0.02), biases 0, norms 1.

    Research choices, each measured with a probe (vision tower + abstractor +
    linear heads predicting distortion type and severity, 600 steps, held-out photos):

    * ``fan_in``: at the compact widths (128-192) GPT-2's 0.02 leaves every
      pre-activation so small that the network starts almost linear and
      attention uniform; N(0, 1/fan_in) reached SRCC 0.43 in 200 steps where
      0.02 needed 400+ steps for 0.34.
    * The abstractor's ``query_embeds`` start at **zero**. Its first layer
      normalises the queries and starts its residual from them; a random start
      makes that residual a per-query constant that swamps the image (0.01% of
      the image tokens' variance came from the image), so the LLM first learns
      to ignore the image. From zero, ``LayerNorm(0) = 0``, the residual is
      what the queries read from the image (65% of the variance), and the 64
      queries still differ through their sin-cos positions.
    * ``patch_init="dct"``: the patch embedding starts as an orthonormal
      colour x DCT filter bank (:func:`dct_patch_basis`), so every vision token
      separates brightness, colour and each spatial frequency from the first
      step -- what blur, noise, compression and colour distortions change (a
      ridge regression on LayerNorm-ed DCT patch statistics alone reaches
      held-out SRCC 0.69 at 64 px). It is only an initialisation.
    * ``energy_gain`` (with ``"dct"``): the first vision block's MLP starts as a
      rectifier bank that replaces each DCT coefficient by its magnitude:
      hidden units ``k`` and ``d + k`` read ``+gain * x_k`` and ``-gain * x_k``,
      and ``fc2`` writes ``2 / gain * quick_gelu(-gain * x_k) ~ 2 relu(-x_k)``
      back to channel ``k``, so the stream leaves the block as ``|x_k|``, the
      local energy of every colour x frequency (the other hidden units start
      silent, ``fc2`` zero, and learn). Blur, noise, blocking and banding change
      these energies, not the coefficients' mean, and only a nonlinearity
      before pooling keeps them: a ridge regression from the untrained vision
      tower's mean output to the labels reaches held-out SRCC 0.65 with it,
      0.50 without.
    * ``pool_queries``: the abstractor's query projections start at zero, so
      every query attends uniformly and the 64 queries start as the image's
      average energies; a ridge on the abstractor's output reaches 0.59 (0.51
      with random query projections). Trained one-stage (1,200 steps of 16,
      960 test images of the held-out photos) the compact model reached SRCC
      0.62 with ``visual_lr_scale=0.1`` (0.51 at 1.0, 0.54 at 0.02); the
      earlier random-projection bank reached 0.36 in twice the steps.
    """
    g = torch.Generator().manual_seed(seed)
    residual_out = ("attn.out.weight", "mlp.fc2.weight", "out_proj.weight", "mlp.w2.weight",
                    "attn.o_proj.weight", "mlp.down_proj.weight")
    small = ("cls_token", "position_embedding", "vit_eos", "llm.embed.weight", "llm.unembed.weight")
    depth = {"vision": model.cfg.vision.n_layers, "abstractor": model.cfg.abstractor.n_layers,
             "llm": model.cfg.llm.n_layers}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("query_embeds"):
                p.zero_()
            elif name.endswith(small) or (p.ndim >= 2 and scheme == "gpt2"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.ndim >= 2:
                std = p[0].numel() ** -0.5
                if name.endswith(residual_out):
                    std /= math.sqrt(2 * depth[name.split(".")[0]])
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        if patch_init == "dct":
            weight = model.vision.embed.patch_embed.weight
            weight.copy_(dct_patch_basis(model.cfg.vision.patch_size, weight.shape[0]))
            if energy_gain and model.cfg.vision.d_mlp >= 2 * model.cfg.vision.d_model:
                d = model.cfg.vision.d_model
                mlp = model.vision.blocks[0].mlp
                eye = torch.eye(d)
                mlp.fc1.weight[:d] = eye * energy_gain
                mlp.fc1.weight[d : 2 * d] = -eye * energy_gain
                mlp.fc1.bias.zero_()
                mlp.fc2.weight.zero_()
                mlp.fc2.weight[:, d : 2 * d] = eye * (2 / energy_gain)  # x + 2 relu(-x) = |x|
        elif patch_init != "normal":
            raise ValueError(f"patch_init must be 'dct' or 'normal', got {patch_init!r}")
        if pool_queries:
            for block in model.abstractor.blocks:
                block.query.weight.zero_()
        if scheme not in ("fan_in", "gpt2"):
            raise ValueError(f"scheme must be 'fan_in' or 'gpt2', got {scheme!r}")
    return model


def build_compact_model(tokenizer: Tokenizer, image_size: int = 64, seed: int = 0) -> MPLUGOwl2:
    """A from-scratch compact model for a tokenizer (:meth:`ModelConfig.compact`, 65 image tokens)."""
    return init_weights(MPLUGOwl2(ModelConfig.compact(vocab_size=tokenizer.vocab_size, image_size=image_size)),
                        seed)
