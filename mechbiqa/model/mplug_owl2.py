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

from dataclasses import dataclass

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
        """Vision tower then abstractor: ``n_queries + 1`` LLM-width rows per image."""
        check_pixels(pixels)
        tokens, _ = self.vision(pixels)
        return self.hook_image_tokens(self.abstractor(tokens))

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
    def forward(
        self,
        input_ids: Int[Tensor, "batch text_pos"],
        images: Float[Tensor, "image 3 S S"] | None = None,
        attention_mask: Int[Tensor, "batch mask_pos"] | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
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
            image_tokens = None if images is None else self.encode_images(images.to(self.device))
            embeds, modality, new_mask = self.splice(input_ids, image_tokens, attention_mask)
            positions = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
            key_mask = new_mask
            if use_cache or cache is not None:
                cache = KVCache() if cache is None else cache
        logits, hidden = self.llm(embeds, modality, positions, key_mask, cache, output_hidden_states)
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
        generator: torch.Generator | None = None,
        eos_token_id: int | None = None,
        past_key_values: KVCache | None = None,
    ) -> Int[Tensor, "batch text_pos_plus_new"]:
        """Decode with a KV cache; return ``input_ids`` followed by the new ids.

        Greedy by default; ``do_sample=True`` draws from ``generator`` (seeded draws
        repeat exactly). With ``eos_token_id`` set, a row that emits it is padded with
        ``pad_token_id`` afterwards and decoding stops once every row has; without it,
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
