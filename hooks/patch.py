"""Hook functions that overwrite activations at chosen positions: patch, zero- or mean-ablate.

One generic setter, `set_positions`, does the work: it writes ``values`` into
an activation at the given positions along the position axis, per batch row.
Everything else builds the ``values`` (a clean cache, zeros, a mean) and hands
them to it. Use the results with the model's TransformerLens hook machinery:

    with model.hooks(fwd_hooks=[(names.resid_post(l), patch_hook(positions, source))]):
        logits = model(ids, images=pixels).logits

Position indices are in the spliced sequence (select them by token role, never
by a hard-coded number).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

HookFn = Callable[[Tensor, HookPoint], Tensor]


def set_positions(
    activation: Float[Tensor, "batch pos *rest"],
    positions: Int[Tensor, "batch k"],
    values: Float[Tensor, "batch k *rest"] | Float[Tensor, "k *rest"],
    pos_dim: int = 1,
) -> Tensor:
    """Return ``activation`` with ``activation[b, positions[b, i]] = values[b, i]`` along ``pos_dim``.

    ``values`` without a batch axis is broadcast over the batch. Works for residuals
    ``[batch, pos, d]``, per-head tensors ``[batch, pos, head, d_head]`` and, with
    ``pos_dim=2``, attention rows ``[batch, head, pos, key]``.
    """
    act = activation.movedim(pos_dim, 1).clone()
    vals = values.to(act.dtype)
    if vals.ndim == act.ndim - 1:
        vals = vals.expand(act.shape[0], *vals.shape)
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    act[rows, positions.to(act.device)] = vals
    return act.movedim(1, pos_dim)


def gather_positions(activation: Tensor, positions: Int[Tensor, "batch k"], pos_dim: int = 1) -> Tensor:
    """``activation[b, positions[b]]`` along ``pos_dim``, moved to axis 1: ``[batch, k, *rest]``."""
    act = activation.movedim(pos_dim, 1)
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    return act[rows, positions.to(act.device)]


def patch_hook(positions: Int[Tensor, "batch k"], source: Tensor, pos_dim: int = 1) -> HookFn:
    """Write the ``source`` activation (a whole other run, same shape) at ``positions``."""

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        return set_positions(activation, positions, gather_positions(source, positions, pos_dim), pos_dim)

    return hook


def ablate_hook(
    positions: Int[Tensor, "batch k"],
    mode: Literal["zero", "mean"] = "zero",
    mean: Tensor | None = None,
    pos_dim: int = 1,
) -> HookFn:
    """Zero-ablate, or mean-ablate (``mean`` broadcast to each chosen position), at ``positions``."""
    if mode == "mean" and mean is None:
        raise ValueError("mean ablation needs the mean activation (e.g. over a reference set of images)")

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        k = positions.shape[-1]
        if mode == "zero":
            fill = torch.zeros((k, *activation.movedim(pos_dim, 1).shape[2:]), dtype=activation.dtype,
                               device=activation.device)
        else:
            assert mean is not None
            fill = mean.to(activation.device)
            fill = fill.expand(k, *fill.shape[-(activation.ndim - 2):]) if fill.ndim == activation.ndim - 2 else fill
        return set_positions(activation, positions, fill, pos_dim)

    return hook


def scatter_hook(writes: Sequence[tuple[int, Tensor, Tensor, Tensor | None]]) -> HookFn:
    """One hook that writes at (batch row, position) pairs: given values, or zeros.

    Each write is ``(pos_dim, rows [n], positions [n], values [n, *rest] or None for zeros)``;
    ``activation.movedim(pos_dim, 1)[rows[i], positions[i]] = values[i]``. This is how a batched
    sweep applies every row's own edits with one indexed assignment per hook
    (`mechbiqa.analysis.patching.sweep`).
    """
    writes = list(writes)

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        out = activation.clone()
        for pos_dim, rows, positions, values in writes:
            view = out.movedim(pos_dim, 1)  # a view: writes land in `out`
            rows, positions = rows.to(out.device), positions.to(out.device)
            if values is None:
                view[rows, positions] = 0
            else:
                view[rows, positions] = values.to(out.device, out.dtype)
        return out

    return hook
