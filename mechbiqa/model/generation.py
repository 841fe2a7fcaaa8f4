"""Key/value cache and next-token selection, shared by the LLM and the composite model.

`KVCache` holds, per LLM layer, the keys (after RoPE) and values of every
position seen so far, together with the key mask and the next position id of
every row. It is what `llm.py` reads and extends and what
`mplug_owl2.MPLUGOwl2.generate` threads through decoding steps. A prompt's
cache can be repeated for many samples (`repeat_interleave`), which is how the
instability study draws 15 answers from one prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys/values per layer: each ``[batch, kv_head, past, d_head]``; mask ``[batch, past]``."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    mask: Tensor | None = None  # bool, True at real (non-padding) positions
    next_position: Tensor | None = None  # long [batch]: the position id of the next token
    last_logits: Tensor | None = None  # [batch, vocab]: logits at the last position seen (set by prefill)

    def __len__(self) -> int:
        """Number of cached positions."""
        return 0 if self.mask is None else self.mask.shape[1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's ``k``/``v`` for ``layer``; return the full keys/values."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def select(self, rows: Tensor | None = None, end: int | None = None) -> KVCache:
        """A new cache holding some rows and the first ``end`` positions (for resuming a forward).

        Args:
            rows: ``[k]`` batch rows to keep (repeats allowed); None keeps all.
            end: keep positions ``0..end-1``; None keeps all.
        """
        cut = lambda t: (t if rows is None else t[rows.to(t.device)])[..., :end, :]  # noqa: E731
        return KVCache(
            keys=[cut(k) for k in self.keys],
            values=[cut(v) for v in self.values],
            mask=None if self.mask is None else (self.mask if rows is None else self.mask[rows])[:, :end],
            next_position=None,
            last_logits=None,
        )

    def repeat_interleave(self, n: int) -> KVCache:
        """A new cache whose row ``b * n + i`` is a copy of row ``b`` (for many samples of one prompt)."""
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return KVCache(
            keys=[rep(k) for k in self.keys],
            values=[rep(v) for v in self.values],
            mask=None if self.mask is None else rep(self.mask),
            next_position=None if self.next_position is None else rep(self.next_position),
            last_logits=None if self.last_logits is None else rep(self.last_logits),
        )


def select_next_token(
    logits: Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Greedy argmax, or a draw from the tempered, top-k / nucleus-truncated softmax.

    Args:
        logits: ``[batch, vocab]`` next-token logits.
        do_sample: draw instead of taking the argmax.
        temperature: divides the logits before the softmax (sampling only).
        top_k: keep the ``k`` largest logits.
        top_p: keep the smallest set of tokens whose probability reaches ``p``.
        generator: the random stream; the same seed gives the same draws. A sequence holds one
            generator per row: row ``r`` then draws from ``generator[r]`` alone, so its tokens do
            not depend on the rows beside it.

    Returns:
        ``[batch]`` long token ids.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
    if generator is not None and not isinstance(generator, torch.Generator):
        if len(generator) != logits.shape[0]:
            raise ValueError(f"{len(generator)} generators for {logits.shape[0]} rows: pass one per row")
        return torch.cat([
            select_next_token(logits[r : r + 1], do_sample=True, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=g)
            for r, g in enumerate(generator)
        ])  # fmt: skip
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_scores.softmax(-1) >= top_p  # keep the token that crosses p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
