"""The recorder: hooks that keep the selected rows of each cached hook while the model runs.

Where it sits: `mechbiqa.model.MPLUGOwl2` exposes TransformerLens `HookPoint`s
(names in `mechbiqa_hooks.names`); `Recorder` attaches one small hook per
(array, layer) of a store layout through ``model.hooks(...)`` (removed in a
``finally``), and each hook keeps only the selected positions of its tensor
(the quality row, the image tokens ...), already cast to the stored dtype. The
recording loops that feed it batches and write what it returns into a store
are `mechbiqa.store.record` (`record_dataset`, `record_prompts`); the layout
it reads (`mechbiqa.store.layout.StoreLayout`: which arrays, selections,
capacities) comes from `mechbiqa.store.plan.plan_layout`. This module needs
only the model: the layout is read through its attributes.

Positions are stored in unpadded sequence coordinates (0 = BOS): the recorder
undoes the model's left padding, for the position axis and for the key axis of
attention rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.roles import Role, TokenRoles

if TYPE_CHECKING:
    from mechbiqa.store.layout import ArraySpec, StoreLayout

__all__ = ["PaddedRows", "Recorder"]

# The recording loops used to live here; code that imports them from this module is forwarded.
_MOVED = {
    "PromptConfig": "mechbiqa.store.record",
    "PromptedSample": "mechbiqa.store.record",
    "RecordResult": "mechbiqa.store.record",
    "RunConfig": "mechbiqa.store.record",
    "SampleSource": "mechbiqa.store.record",
    "record_dataset": "mechbiqa.store.record",
    "record_prompts": "mechbiqa.store.record",
    "model_identity": "mechbiqa.store.identity",
    "tokenizer_identity": "mechbiqa.store.identity",
    "plan_layout": "mechbiqa.store.plan",
}


def __getattr__(name: str) -> Any:
    """Forward the names that moved to `mechbiqa.store` (imported on first use: no import cycle)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class PaddedRows:
    """One batch as the recorded forward sees it: left-padded text ids and each row's own roles."""

    input_ids: Tensor  # [batch, text_pos] left-padded
    attention_mask: Tensor  # [batch, text_pos]
    roles: list[TokenRoles]  # per row, unpadded
    text_ids: list[list[int]]  # per row, text-space ids


@dataclass
class _BatchState:
    """Per-batch index tensors the hooks read (set by `Recorder.record`, None between batches)."""

    arange: Tensor  # [batch]
    index: dict[str, Tensor]  # select -> [batch, cap] columns in the padded batch
    valid: dict[str, Tensor]  # select -> [batch, cap] bool
    all_valid: dict[str, bool]  # select -> every entry valid (no masking needed)
    key_index: Tensor  # [batch, key] padded column of each unpadded key
    key_valid: Tensor  # [batch, key] bool
    captured: dict[str, list[Tensor | None]]  # key -> one tensor per layer slot
    image_rows: Tensor | None = None  # [image] row of each image when not every row has one


class Recorder:
    """Hooks that keep the selected rows of each site during a forward.

    Build once per run from the layout; `record` runs one batch and returns
    ``{key: [layer, batch, *shape]}`` numpy arrays. The hooks are attached
    through TransformerLens' ``hooks()`` context (removed in a ``finally``):
    per call of `record`, or once for a whole run with ``with recorder.attached():``
    (cheaper: no attach/detach per batch). Between `record` calls the hooks do
    nothing (generation runs inside the same context unrecorded), and nothing is
    kept from one batch to the next.
    """

    def __init__(self, model: MPLUGOwl2, layout: StoreLayout) -> None:  # noqa: D107
        self.model = model
        self.layout = layout
        self.torch_dtype = getattr(torch, layout.dtype)
        self._state: _BatchState | None = None
        self._attached = False
        self._hooks: list[tuple[str, Callable]] = []
        for spec in layout.arrays:
            for slot, layer in enumerate(spec.layers or (None,)):
                name = spec.hook if layer is None else spec.hook.replace("{l}", str(layer))
                self._hooks.append((name, self._hook(spec, slot)))

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        """Keep the hooks attached for several `record` calls."""
        if self._attached:
            yield self
            return
        with self.model.hooks(fwd_hooks=self._hooks):
            self._attached = True
            try:
                yield self
            finally:
                self._attached = False

    def selections(self, roles: Sequence[TokenRoles]) -> dict[str, np.ndarray]:
        """``{select: [batch, capacity]}`` unpadded positions (-1 where unused)."""
        out = {}
        for select, cap in self.layout.capacities:
            table = np.full((len(roles), cap), -1, dtype=np.int32)
            for b, r in enumerate(roles):
                if select == "all":
                    pos = np.arange(len(r))
                elif select == "last":
                    pos = np.array([len(r) - 1])
                else:
                    pos = r.positions(Role[select.upper()])
                if len(pos) > cap:
                    raise ValueError(
                        f"selection {select!r} has {len(pos)} positions in a sample but room for {cap}; "
                        "is the prompt the one the store was planned with?"
                    )
                table[b, : len(pos)] = pos
            out[select] = table
        return out

    def record(
        self,
        rows: PaddedRows,
        pixels: Tensor | None,
        selections: dict[str, np.ndarray] | None = None,
        image_rows: Sequence[int] | None = None,
    ) -> tuple[dict[str, np.ndarray], Tensor]:
        """Run one recorded forward.

        Args:
            rows: The batch (left-padded ids, mask, roles of each row).
            pixels: ``[image, 3, S, S]`` images in placeholder order: one per row, or one per
                row of ``image_rows``; None when no row has an image.
            selections: `selections` of ``rows.roles`` when the caller has them already.
            image_rows: The rows that hold an image, when not all do (text-only rows get zeros
                in image-side arrays).

        Returns:
            ``({key: [layer, batch, *shape]}, logits [batch, pos, vocab])``.
        """
        model, layout = self.model, self.layout
        device = model.device
        lengths = torch.tensor([len(r) for r in rows.roles], device=device)
        length = int(lengths.max())
        if length > layout.max_pos:
            raise ValueError(f"a sequence of {length} positions exceeds the store's max_pos {layout.max_pos}")
        pad = length - lengths  # [batch] left padding of each spliced row
        index, valid, all_valid = {}, {}, {}
        for select, table in (selections if selections is not None else self.selections(rows.roles)).items():
            t = torch.from_numpy(table).to(device).long()
            valid[select] = t >= 0  # [batch, cap]
            all_valid[select] = bool((table >= 0).all())
            index[select] = (t.clamp(min=0) + pad[:, None]).clamp(
                max=length - 1
            )  # columns in the padded batch
        self._state = _BatchState(
            arange=torch.arange(len(rows.roles), device=device),
            index=index,
            valid=valid,
            all_valid=all_valid,
            key_index=(pad[:, None] + torch.arange(length, device=device)).clamp(max=length - 1),
            key_valid=torch.arange(length, device=device)[None, :] < lengths[:, None],
            captured={a.key: [None] * a.n_layer_slots for a in layout.arrays},
            image_rows=None
            if image_rows is None
            else torch.as_tensor(list(image_rows), device=device).long(),
        )
        images = None if pixels is None or not len(pixels) else pixels.to(device, model.dtype)
        try:
            with torch.inference_mode(), self.attached():
                out = model(
                    rows.input_ids.to(device), images=images, attention_mask=rows.attention_mask.to(device)
                )
            captured = self._state.captured
        finally:
            self._state = None
        if images is None:  # no image in the batch: the image-side hooks had nothing to see
            for a in layout.arrays:
                if a.image_side:
                    empty = torch.zeros((len(rows.roles), *a.shape), dtype=self.torch_dtype)
                    captured[a.key] = [empty] * a.n_layer_slots
        missing = [k for k, v in captured.items() if any(x is None for x in v)]
        if missing:
            raise RuntimeError(f"hooks for {missing} did not fire; are the hook names right for this model?")
        arrays = {k: torch.stack(v).cpu().numpy() for k, v in captured.items()}  # type: ignore[arg-type]
        return arrays, out.logits

    def _hook(self, spec: ArraySpec, slot: int) -> Callable:
        dtype, max_pos, key, select = self.torch_dtype, self.layout.max_pos, spec.key, spec.select
        if spec.image_side:

            def keep_image(x: Tensor, hook: Any) -> None:
                state = self._state
                if state is None:
                    return
                x = x.detach().to(dtype)
                if state.image_rows is not None:  # text-only rows keep zeros
                    out = torch.zeros((len(state.arange), *x.shape[1:]), dtype=dtype, device=x.device)
                    out[state.image_rows] = x
                    x = out
                state.captured[key][slot] = x

            return keep_image
        if spec.dims[:1] == ("head",):  # attention pattern / scores [batch, head, q, k]

            def keep_rows(x: Tensor, hook: Any) -> None:
                state = self._state
                if state is None:
                    return
                rows = x[state.arange[:, None], :, state.index[select]].transpose(
                    1, 2
                )  # [batch, head, cap, key]
                b, h, c, k = rows.shape
                rows = torch.gather(
                    rows, 3, state.key_index[:, None, None, :].expand(b, h, c, k)
                )  # unpad keys
                keep = state.valid[select][:, None, :, None] & state.key_valid[:, None, None, :]
                out = torch.zeros(b, h, c, max_pos, dtype=dtype, device=x.device)
                out[..., :k] = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=x.device))
                state.captured[key][slot] = out

            return keep_rows

        def keep_positions(x: Tensor, hook: Any) -> None:
            state = self._state
            if state is None:
                return
            sel = x[state.arange[:, None], state.index[select]].to(dtype)  # [batch, cap, *feature]
            if not state.all_valid[select]:
                ok = state.valid[select]
                sel = torch.where(
                    ok.view(*ok.shape, *([1] * (sel.ndim - 2))),
                    sel,
                    torch.zeros((), dtype=sel.dtype, device=x.device),
                )
            state.captured[key][slot] = sel

        return keep_positions
