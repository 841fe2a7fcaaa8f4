"""mPLUG-Owl2 end to end: encode images, splice them into the prompt, run the multiway LLM.

    image ─► vision (vision.py) ─► abstractor (abstractor.py) ─► 65 rows per image ─► hook_image_tokens
    ids with -200 placeholders ─► embed ─► splice image rows + modality indicator ─► llm (llm.py) ─► logits

`MPLUGOwl2` is a TransformerLens `HookedRootModule`: every `HookPoint` below it
is reachable by its module path (``llm.blocks.0.hook_resid_post``), and
``run_with_cache`` / ``run_with_hooks`` / ``hooks()`` work on it directly.
`load.py` builds it from a checkpoint directory; `mechbiqa_hooks` records and
patches its hook points.

Batching (a deliberate departure from the original). The original prepends
ones to the attention mask when it splices, which is only right for
right-padded or unpadded batches, and refuses unequal spliced lengths at
inference. Here every row is spliced from its real tokens only (those with
``attention_mask == 1``) and the spliced rows are **left-padded** to a common
length. Position ids count real tokens only (``cumsum(mask) - 1``) and padded
keys are masked, so padding never changes a row's logits at its real positions,
and the last column is every row's last real token, where the quality word is
read. The spliced mask is returned with the outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from mechbiqa.model.abstractor import Abstractor
from mechbiqa.model.checks import check_pixels, check_token_ids
from mechbiqa.model.config import IMAGE_TOKEN_INDEX, ModelConfig
from mechbiqa.model.generation import KVCache, select_next_token
from mechbiqa.model.llm import LLM
from mechbiqa.model.vision import VisionTower

if TYPE_CHECKING:
    from mechbiqa.model.roles import PromptBatch


@dataclass
class ModelOutput:
    """What a forward pass returns (tensors in the spliced sequence space).

    Attributes:
        logits: ``[batch, pos, vocab]``.
        hidden_states: transformers convention, ``n_layers + 1`` entries
            (0 = spliced embeddings, i = output of layer i-1, last = after ``ln_final``).
        attention_mask: ``[batch, past + pos]`` long, 1 at real positions.
        modality: ``[batch, pos]`` long, 1 at image positions.
        position_ids: ``[batch, pos]``.
        past_key_values: the cache, when ``use_cache`` was set.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None
    attention_mask: Tensor
    modality: Tensor
    position_ids: Tensor
    past_key_values: KVCache | None = None


@dataclass
class Spliced:
    """A prompt batch as the LLM reads it (`MPLUGOwl2.prepare`).

    Attributes:
        embeds: ``[batch, pos, d_model]`` spliced embeddings, rows left-padded.
        modality: ``[batch, pos]`` long, 1 at image positions.
        mask: ``[batch, pos]`` bool, True at real positions.
        positions: ``[batch, pos]`` RoPE position ids.
    """

    embeds: Tensor
    modality: Tensor
    mask: Tensor
    positions: Tensor


class MPLUGOwl2(HookedRootModule):
    """The composite model (vision tower, visual abstractor, modality-adaptive LLaMA)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.abstractor = Abstractor(cfg.abstractor, cfg.llm.d_model)
        self.llm = LLM(cfg.llm)
        self.hook_image_tokens = HookPoint()  # [image, image_pos, d_llm]  the rows spliced into the prompt
        self.setup()

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.llm.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.llm.embed.weight.dtype

    # ------------------------------------------------------------------ parts
    def encode_images(self, pixels: Float[Tensor, "image 3 S S"]) -> Float[Tensor, "image image_pos d_llm"]:
        """Vision tower then abstractor: ``n_queries + 1`` LLM-width rows per image (through the hook)."""
        return self.hook_image_tokens(self.image_rows(pixels))

    def image_rows(self, pixels: Float[Tensor, "image 3 S S"]) -> Float[Tensor, "image image_pos d_llm"]:
        """`encode_images` before ``hook_image_tokens``: pass them to ``forward(image_tokens=...)``.

        Encoding once and running many forwards from the rows is how a patching sweep avoids
        re-encoding each image; the hook still fires in each of those forwards.
        """
        check_pixels(pixels)
        tokens, _ = self.vision(pixels)
        return self.abstractor(tokens)

    def splice(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        image_tokens: Float[Tensor, "image image_pos d_llm"] | None,
        attention_mask: Int[Tensor, "batch text_pos"] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Replace each -200 by the next image's rows; left-pad the rows to one length.

        Images are consumed in placeholder order: row 0 left to right, then row 1, ...

        Returns:
            ``inputs_embeds [batch, pos, d]``, ``modality [batch, pos]`` (long),
            ``mask [batch, pos]`` (bool, True at real positions).
        """
        check_token_ids(input_ids, self.cfg.llm.vocab_size)
        n_placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        n_images = 0 if image_tokens is None else image_tokens.shape[0]
        if n_placeholders != n_images:
            if n_placeholders == 0:
                fix = "put the <|image|> placeholder in the prompt (tokenize_prompt turns it into -200)"
            elif n_images == 0:
                fix = "pass the images, or remove the placeholders for a text-only prompt"
            else:
                fix = "give one image per placeholder, in placeholder order"
            raise ValueError(f"{n_placeholders} image placeholder(s) (-200) in input_ids but {n_images} image(s): {fix}")
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        text_embeds = self.llm.embed(input_ids.clamp(min=0))
        rows, modalities = [], []
        next_image = 0
        for b in range(input_ids.shape[0]):
            ids, emb = input_ids[b][real[b]], text_embeds[b][real[b]]
            pieces, kinds = [], []
            start = 0
            for p in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                pieces += [emb[start:p], image_tokens[next_image].to(emb.dtype)]  # type: ignore[index]
                kinds += [torch.zeros(p - start, dtype=torch.long), torch.ones(image_tokens.shape[1], dtype=torch.long)]  # type: ignore[union-attr]
                next_image, start = next_image + 1, p + 1
            pieces.append(emb[start:])
            kinds.append(torch.zeros(len(ids) - start, dtype=torch.long))
            rows.append(torch.cat(pieces))
            modalities.append(torch.cat(kinds))
        length = max(len(r) for r in rows)
        batch, d = len(rows), text_embeds.shape[-1]
        embeds = text_embeds.new_zeros(batch, length, d)
        modality = torch.zeros(batch, length, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
        for b, (row, kind) in enumerate(zip(rows, modalities)):
            embeds[b, length - len(row):] = row
            modality[b, length - len(row):] = kind.to(input_ids.device)
            mask[b, length - len(row):] = True
        return embeds, modality, mask

    # ---------------------------------------------------------------- forward
    def prepare(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        image_tokens: Float[Tensor, "image image_pos d_llm"] | None,
        attention_mask: Int[Tensor, "batch text_pos"] | None = None,
    ) -> Spliced:
        """The LLM's inputs for a prompt batch: spliced embeddings, modality, mask and position ids.

        The one place the position rule lives: a position id counts the real tokens before it
        (``cumsum(mask) - 1``, padding clamped to 0). ``image_tokens`` are the encoded rows
        (after ``hook_image_tokens``).
        """
        embeds, modality, mask = self.splice(input_ids, image_tokens, attention_mask)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return Spliced(embeds, modality, mask, positions)

    def forward(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        images: Float[Tensor, "image 3 S S"] | None = None,
        attention_mask: Int[Tensor, "batch mask_pos"] | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        *,
        image_tokens: Float[Tensor, "image image_pos d_llm"] | None = None,
        logits_at: int | Tensor | None = None,
    ) -> ModelOutput:
        """Logits for a batch of prompts with their images (``images=None`` for text only).

        Args:
            input_ids: token ids with -200 where an image goes.
            images: ``[n_images, 3, S, S]`` preprocessed pixels, consumed in placeholder order.
            attention_mask: 1 at real tokens, 0 at padding (any side); None means all real.
            past_key_values: a cache from an earlier call; ``input_ids`` are then the new
                tokens only. Images are ignored when the new tokens hold no placeholder, as in
                the original decoding loop; a given mask may cover the new tokens or all positions.
            use_cache: return (and extend) a `KVCache`.
            output_hidden_states: return the transformers-convention hidden states.
            image_tokens: instead of ``images``, rows of `image_rows` (encoded once elsewhere);
                ``hook_image_tokens`` fires on them here.
            logits_at: unembed only this column (logits ``[batch, 1, vocab]``); -1 is every row's
                last real token, where the quality word is read. A bool ``[batch, pos]`` mask over the
                spliced positions unembeds only those (logits ``[n, vocab]``; training's answer tokens).
        """
        cache = past_key_values
        if cache is not None and len(cache) > 0:
            if bool((input_ids == IMAGE_TOKEN_INDEX).any()):
                raise ValueError("image placeholders after the prefill are not supported: put images in the prompt")
            check_token_ids(input_ids, self.cfg.llm.vocab_size)
            embeds = self.llm.embed(input_ids)
            modality = torch.zeros_like(input_ids)
            new = input_ids.shape[1]
            if attention_mask is None:
                new_mask = torch.ones_like(input_ids, dtype=torch.bool)
            elif attention_mask.shape[1] == len(cache) + new:
                new_mask = attention_mask[:, -new:].bool()
            else:
                new_mask = attention_mask.bool()
            positions = cache.next_position[:, None] + new_mask.long().cumsum(-1) - 1  # type: ignore[index]
            key_mask = torch.cat([cache.mask, new_mask], dim=1)  # type: ignore[list-item]
        else:
            if image_tokens is not None:
                if images is not None:
                    raise ValueError("pass images or image_tokens, not both")
                rows = self.hook_image_tokens(image_tokens.to(self.device))
            else:
                rows = None if images is None else self.encode_images(images.to(self.device))
            spliced = self.prepare(input_ids, rows, attention_mask)
            embeds, modality = spliced.embeds, spliced.modality
            positions, key_mask = spliced.positions, spliced.mask
            if use_cache or cache is not None:
                cache = KVCache() if cache is None else cache
        logits, hidden = self.llm(embeds, modality, positions, key_mask, cache, output_hidden_states,
                                  logits_at=logits_at)
        if cache is not None:
            cache.mask = key_mask
            cache.next_position = positions[:, -1] + 1
        return ModelOutput(
            logits=logits,
            hidden_states=hidden,
            attention_mask=key_mask.long(),
            modality=modality,
            position_ids=positions,
            past_key_values=cache,
        )

    def forward_batches(
        self,
        batch: PromptBatch,
        pixels: Float[Tensor, "image 3 S S"] | None = None,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> Iterator[tuple[slice, PromptBatch, ModelOutput]]:
        """Run a padded prompt batch in sub-batches of at most ``batch_size`` rows.

        Args:
            batch: Prompts padded by `mechbiqa.model.roles.batch_prompts`.
            pixels: One image per placeholder of the batch, in prompt order (None: text only).
            batch_size: Rows per forward.
            **kwargs: Passed to `forward` (``logits_at=-1`` reads every row's last token).

        Yields:
            ``(rows, sub_batch, output)`` per forward: hooks attached around the loop fire
            before each yield, so the loop body sees what they kept.
        """
        for rows, sub in batch.split(batch_size):
            images = sub.pixels(pixels)
            yield rows, sub, self.forward(
                sub.input_ids.to(self.device),
                images=None if images is None else images.to(self.device, self.dtype),
                attention_mask=sub.attention_mask.to(self.device),
                **kwargs,
            )

    def run_from(
        self,
        clean: ModelOutput,
        layer: int,
        start: int = 0,
        rows: Int[Tensor, " k"] | None = None,
        logits_at: int | None = None,
    ) -> Float[Tensor, "k pos vocab"]:
        """Resume a recorded forward at block ``layer``, position ``start``: the logits of its positions.

        ``clean`` must come from ``forward(..., use_cache=True, output_hidden_states=True)``. Rows
        start from its residual entering ``layer`` at positions ``start..`` and attend to its keys
        and values of positions ``< start``: with no edits this equals the full forward (causal
        attention: nothing below ``layer`` or before ``start`` depends on what follows). Hooks on
        blocks ``>= layer`` fire on the recomputed positions only.

        Args:
            clean: The recorded forward.
            layer: The first block to run.
            start: The first spliced position to recompute.
            rows: Batch rows of ``clean`` to resume (repeats allowed); None: all.
            logits_at: Unembed only this column (absolute, or negative from the end).

        Returns:
            ``[k, pos - start, vocab]`` logits, or ``[k, 1, vocab]`` with ``logits_at``.
        """
        if clean.hidden_states is None or clean.past_key_values is None:
            raise ValueError("run_from needs a forward run with use_cache=True and output_hidden_states=True")
        length = clean.attention_mask.shape[1]
        if not 0 <= layer < len(self.llm.blocks):
            raise ValueError(f"layer={layer} is outside 0..{len(self.llm.blocks) - 1} (the LLM's blocks)")
        if not 0 <= start < length:
            raise ValueError(f"start={start} is outside 0..{length - 1} (the recorded positions)")
        rows = torch.arange(clean.attention_mask.shape[0]) if rows is None else rows
        rows = rows.to(self.device)
        at = None if logits_at is None else logits_at % length - start
        if at is not None and at < 0:
            raise ValueError(f"logits_at={logits_at} lies before start={start}: not recomputed")
        cache = clean.past_key_values.select(rows, start)
        logits, _ = self.llm(
            clean.hidden_states[layer][rows, start:],
            clean.modality[rows, start:],
            clean.position_ids[rows, start:],
            clean.attention_mask[rows].bool(),
            cache,
            start_layer=layer,
            logits_at=at,
        )
        return logits

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        images: Float[Tensor, "image 3 S S"] | None = None,
        attention_mask: Int[Tensor, "batch text_pos"] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        eos_token_id: int | None = None,
        past_key_values: KVCache | None = None,
    ) -> Int[Tensor, "batch text_pos_plus_new"]:
        """Decode with a KV cache; return ``input_ids`` followed by the new ids.

        Greedy by default; ``do_sample=True`` draws from ``generator`` (seeded draws
        repeat exactly): one for the batch, or a list with one per row, so that a row's
        answer does not depend on the rows decoded beside it (the generators advance in
        place: a later call continues their streams). With ``eos_token_id`` set, a row
        that emits it is padded with ``pad_token_id`` afterwards and decoding stops once every row has; without it,
        exactly ``max_new_tokens`` are produced. ``past_key_values`` may hold an already
        prefilled prompt cache (then ``input_ids`` are only returned, not re-run, and the
        first new token is chosen from ``last_logits`` of that prefill: pass a cache made by
        `prefill`).
        """
        if past_key_values is None:
            out = self.forward(input_ids, images=images, attention_mask=attention_mask, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        else:
            cache, logits = past_key_values, past_key_values.last_logits
            if logits is None or logits.shape[0] != input_ids.shape[0]:
                raise ValueError("past_key_values must come from prefill() and match input_ids' batch "
                                 "(repeat both with repeat_interleave for several samples per prompt)")
        assert cache is not None and logits is not None
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = select_next_token(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator)
            token = torch.where(done, torch.full_like(token, self.cfg.llm.pad_token_id), token)
            new_tokens.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = self.forward(token[:, None], past_key_values=cache).logits[:, -1]
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        images: Float[Tensor, "image 3 S S"] | None = None,
        attention_mask: Int[Tensor, "batch text_pos"] | None = None,
    ) -> KVCache:
        """Run the prompt once; the returned cache also carries the last position's logits.

        ``generate(ids, past_key_values=cache.repeat_interleave(n))`` then draws ``n``
        continuations per prompt without re-running it.
        """
        out = self.forward(input_ids, images=images, attention_mask=attention_mask, use_cache=True)
        cache = out.past_key_values
        assert cache is not None
        cache.last_logits = out.logits[:, -1]
        return cache
