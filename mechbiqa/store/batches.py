"""One batch of a recording run: load its images, run the recorded forward, fill every row of the store.

Where it sits: the recording loops (`mechbiqa.store.record`) call `record_shared_batch`
(one shared prompt: score, or generate then re-run) or `record_prompt_batch` (a prompt per
sample) once per batch of the fixed partition (`iter_batches`); each returns the
`mechbiqa.store.layout.BatchRows` that `mechbiqa.store.writer.StoreWriter.write` commits.
A sample whose image cannot be read becomes an error row (status failed, with its reason);
the others are left-padded into one forward (`record_rows`) whose hooks
(`mechbiqa_hooks.record.Recorder`) keep the selected positions in unpadded coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.config import IMAGE_TOKEN_INDEX
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageLoadError
from mechbiqa.model.prompts import EncodedPrompt, find_quality_index
from mechbiqa.model.roles import Role, TokenRoles, assign_roles, pad_ids
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.store.layout import ERROR_BYTES, STATUS_FAILED, STATUS_OK, BatchRows, StoreLayout, encode_text
from mechbiqa_hooks.record import PaddedRows, Recorder

if TYPE_CHECKING:
    from mechbiqa.store.record import PromptedSample, RunConfig

__all__ = [
    "batch_seed",
    "empty_rows",
    "iter_batches",
    "load_pixels",
    "record_prompt_batch",
    "record_rows",
    "record_shared_batch",
    "spliced_ids",
    "texts_to_record",
]

_PAD_ID = -1  # spliced-space id stored at padding positions


def batch_seed(seed: int, start: int) -> int:
    """The sampler seed of the batch starting at sample ``start`` (same seed, same draws)."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, dtype=np.uint64)[0] >> 1)


def spliced_ids(text_ids: Sequence[int], roles: TokenRoles) -> np.ndarray:
    """Text-space ids in spliced coordinates (``-200`` at each of an image's positions)."""
    ids = np.asarray(text_ids, dtype=np.int64)[roles.source_index]
    ids[roles.role == Role.IMAGE] = IMAGE_TOKEN_INDEX
    return ids


def load_pixels(
    load: Callable[[Any], Tensor], chunk: Sequence[Any], needs_image: Sequence[bool] | None = None
) -> tuple[np.ndarray, list[str], list[Tensor]]:
    """Load the images of a batch: status and error per sample, pixels of the loaded ones in order.

    Samples that need no image (``needs_image`` False) count as loaded without being read.
    """
    n = len(chunk)
    status = np.full(n, STATUS_OK, dtype=np.int8)
    errors = [""] * n
    pixels = []
    for i, sample in enumerate(chunk):
        if needs_image is not None and not needs_image[i]:
            continue
        try:
            pixels.append(load(sample))
        except ImageLoadError as error:
            status[i], errors[i] = STATUS_FAILED, error.reason
        except (OSError, ValueError) as error:  # anything else PIL raises on a bad file
            status[i], errors[i] = STATUS_FAILED, f"{type(error).__name__}: {error}"
    return status, errors, pixels


def record_rows(
    tokenizer: Tokenizer,
    recorder: Recorder,
    layout: StoreLayout,
    n: int,
    ok: Sequence[int],
    text_ids: Sequence[Sequence[int]],
    roles: Sequence[TokenRoles],
    spliced: Sequence[np.ndarray],
    answers: Sequence[str],
    images: Tensor | None,
    rows_out: dict[str, np.ndarray],
    image_rows: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Left-pad the rows that loaded, run the recorded forward, fill their rows of the tables.

    Args:
        n: Samples in the batch (``ok`` are the rows recorded; the others stay zero).
        images: Pixels in placeholder order (one per row of ``image_rows``, or per row).
        image_rows: Rows (indices into ``ok``) that hold an image, when not all do.

    Returns:
        ``{key: [layer, n, *shape]}``.
    """
    acts: dict[str, np.ndarray] = {}
    if len(ok) < n:
        acts = {a.key: np.zeros((a.n_layer_slots, n, *a.shape), dtype=layout.dtype) for a in layout.arrays}
    if not ok:
        return acts
    input_ids, mask = pad_ids(text_ids, tokenizer.pad_id, side="left")  # the model splices real tokens only
    selections = recorder.selections(roles)
    recorded, _ = recorder.record(
        PaddedRows(input_ids, mask, list(roles), [list(t) for t in text_ids]), images, selections, image_rows
    )
    if len(ok) == n:
        acts = recorded
    else:
        rows_ok = np.asarray(ok)
        for key, value in recorded.items():
            acts[key][:, rows_ok] = value
    for b, (i, r, ids) in enumerate(zip(ok, roles, spliced, strict=True)):
        m = len(r)
        rows_out["samples/n_positions"][i] = m
        rows_out["samples/n_images"][i] = r.n_images
        rows_out["tokens/ids"][i, :m] = ids
        rows_out["tokens/role"][i, :m] = r.role
        rows_out["tokens/image_index"][i, :m] = r.image_index
        rows_out["samples/answer"][i] = encode_text(answers[b], layout.answer_bytes)
        for select, table in selections.items():
            rows_out[f"select/{select}/positions"][i] = table[b]
            rows_out[f"select/{select}/count"][i] = int((table[b] >= 0).sum())
    return acts


def record_shared_batch(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    load: Callable[[Any], Tensor],
    recorder: Recorder,
    chunk: Sequence[Any],
    start: int,
    encoded: EncodedPrompt,
    run: RunConfig,
    level_ids: list[int],
    layout: StoreLayout,
    role_cache: dict[tuple[int, ...], tuple[TokenRoles, np.ndarray]],
    seed_offset: int = 0,
) -> BatchRows:
    """Load, run and record one batch of the shared prompt; failed images become error rows.

    A generated batch draws from ``(run.seed, seed_offset + start)``: ``seed_offset`` is the
    shard's first sample, so that a sample's draws do not depend on which rank records it.
    """
    n = len(chunk)
    status, errors, pixels = load_pixels(load, chunk)
    ok = [i for i in range(n) if status[i] == STATUS_OK]
    rows_out = empty_rows(layout, n)
    acts: dict[str, np.ndarray] = {}
    if ok:
        images = torch.stack(pixels)
        text_ids, answers = texts_to_record(
            model, tokenizer, images, encoded, run, seed_offset + start, len(ok)
        )
        roles, spliced = [], []
        for ids in text_ids:  # in score mode every row is the same prompt: roles are computed once
            key = tuple(ids)
            if key not in role_cache:
                quality = (
                    encoded.quality_index
                    if run.mode == "score"
                    else find_quality_index(ids, level_ids, response_start=encoded.response_start)
                )
                r = assign_roles(
                    ids,
                    response_start=encoded.response_start,
                    quality_index=quality,
                    n_image_tokens=model.cfg.n_image_tokens,
                    bos_id=tokenizer.bos_id,
                )
                role_cache[key] = (r, spliced_ids(ids, r))
                if len(role_cache) > 4096:  # generated answers are all different: keep the cache small
                    role_cache.pop(next(iter(role_cache)))
            roles.append(role_cache[key][0])
            spliced.append(role_cache[key][1])
        acts = record_rows(
            tokenizer, recorder, layout, n, ok, text_ids, roles, spliced, answers, images, rows_out
        )
    else:
        acts = {a.key: np.zeros((a.n_layer_slots, n, *a.shape), dtype=layout.dtype) for a in layout.arrays}
    for i, reason in enumerate(errors):
        rows_out["samples/error"][i] = encode_text(reason, ERROR_BYTES)
    return BatchRows(start=start, status=status, rows=rows_out, acts=acts)


def record_prompt_batch(
    tokenizer: Tokenizer,
    load: Callable[[Any], Tensor],
    recorder: Recorder,
    chunk: Sequence[PromptedSample],
    roles: Sequence[TokenRoles | None],
    start: int,
    layout: StoreLayout,
) -> BatchRows:
    """Load the images that the batch's prompts hold, run and record; failed images become error rows."""
    n = len(chunk)
    needs = [s.prompt is not None and s.prompt.n_images > 0 for s in chunk]
    status, errors, pixels = load_pixels(load, chunk, needs)
    for i, sample in enumerate(chunk):
        if sample.prompt is None:  # failed before recording (e.g. its image could not be rated)
            status[i], errors[i] = STATUS_FAILED, sample.error
    ok = [i for i in range(n) if status[i] == STATUS_OK]
    rows_out = empty_rows(layout, n)
    text_ids = [list(chunk[i].prompt.ids) for i in ok]
    kept = [roles[i] for i in ok]
    image_rows = [b for b, i in enumerate(ok) if needs[i]]
    acts = record_rows(
        tokenizer,
        recorder,
        layout,
        n,
        ok,
        text_ids,
        kept,
        [spliced_ids(t, r) for t, r in zip(text_ids, kept, strict=True)],
        [chunk[i].answer for i in ok],
        torch.stack(pixels) if pixels else None,
        rows_out,
        None if len(image_rows) == len(ok) else image_rows,
    )
    for i, reason in enumerate(errors):
        rows_out["samples/error"][i] = encode_text(reason, ERROR_BYTES)
    return BatchRows(start=start, status=status, rows=rows_out, acts=acts)


def empty_rows(layout: StoreLayout, n: int) -> dict[str, np.ndarray]:
    """Every row dataset of ``n`` samples, at its padding value (``-1`` ids and positions, PAD roles)."""
    rows = {}
    for name, (dtype, row) in layout.row_datasets().items():
        if name == "samples/status":
            continue
        fill = {"tokens/ids": _PAD_ID, "tokens/role": int(Role.PAD), "tokens/image_index": -1}.get(name, 0)
        if name.endswith("/positions"):
            fill = -1
        rows[name] = np.full((n, *row), fill, dtype=np.dtype(dtype))
    return rows


def texts_to_record(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    images: Tensor,
    encoded: EncodedPrompt,
    run: RunConfig,
    start: int,
    n: int,
) -> tuple[list[list[int]], list[str]]:
    """Text-space ids of each row to record, and the generated answers ("" when scoring)."""
    prompt_ids = list(encoded.ids)
    if run.mode == "score":
        return [prompt_ids] * n, [""] * n
    device = model.device
    generator = torch.Generator(device=device).manual_seed(batch_seed(run.seed, start))
    ids = torch.tensor([prompt_ids] * n, device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            images=images.to(device, model.dtype),
            max_new_tokens=run.max_new_tokens,
            do_sample=run.do_sample,
            temperature=run.temperature,
            top_k=run.top_k,
            top_p=run.top_p,
            generator=generator,
            eos_token_id=tokenizer.eos_id,
        )
    texts, answers = [], []
    for row in out[:, len(prompt_ids) :].tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id) + 1]
        texts.append(prompt_ids + row)
        answers.append(tokenizer.decode(row))
    return texts, answers


def iter_batches(n: int, batch_size: int, first: int = 0) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` of the batches from the one holding ``first`` on (the fixed partition)."""
    start = first - first % batch_size
    while start < n:
        yield start, min(n, start + batch_size)
        start += batch_size
