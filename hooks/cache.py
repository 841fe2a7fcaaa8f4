"""One stored sample as a TransformerLens `ActivationCache`.

`mechbiqa.store.ActivationStore` holds the selected positions of each hook for
many samples; this turns one sample's arrays back into the ``{hook name:
tensor}`` form TransformerLens analysis code expects, with a batch axis of 1:
``cache["llm.blocks.3.hook_resid_post"]`` is ``[1, pos, d_model]`` where ``pos``
runs over the selection's positions (``store.positions(select)`` says which),
and an attention row is ``[1, head, pos, key_pos]`` over the sample's real keys.
With ``strip_prefix="llm."`` the names become TL's own (``blocks.3.hook_resid_post``),
so ``cache["resid_post", 3]`` works.
"""

from __future__ import annotations

import numpy as np
import torch
from transformer_lens import ActivationCache

from mechbiqa.store import ActivationStore

__all__ = ["to_activation_cache"]


def to_activation_cache(
    store: ActivationStore,
    sample: int,
    select: str = "quality",
    *,
    strip_prefix: str | None = None,
    model: object | None = None,
) -> ActivationCache:
    """Every array stored under one selection, for one sample, as an `ActivationCache`.

    Args:
        store: An open store.
        sample: The sample's row (``store.index_of(id)`` finds it).
        select: The selection (``"quality"``, ``"image"``, ``"all"`` ...).
        strip_prefix: Drop this prefix from hook names (``"llm."`` gives TL's names).
        model: Passed to `ActivationCache` (helpers such as ``accumulated_resid`` need one).

    Returns:
        The cache; positions beyond the selection's count and keys beyond the
        sequence are cut off.

    Raises:
        KeyError: Nothing is stored under ``select``.
    """
    arrays = [a for a in store.layout.arrays if a.select == select]
    if not arrays:
        raise KeyError(f"nothing stored under selection {select!r}; stored: {store.keys}")
    count = int(store.counts(select, samples=sample)) if select in store.layout.capacity else None
    n_keys = int(store.n_positions(samples=sample))
    out: dict[str, torch.Tensor] = {}
    for spec in arrays:
        for layer in spec.layers or (None,):
            name = spec.hook if layer is None else spec.hook.replace("{l}", str(layer))
            data = (
                store.get(spec.hook, select, layers=layer, samples=sample)
                if layer is not None
                else store.get(spec.hook, select, samples=sample)
            )
            index = [slice(None)] * data.ndim
            if "pos" in spec.dims and count is not None:
                index[spec.dims.index("pos")] = slice(0, count)
            if "key_pos" in spec.dims:
                index[spec.dims.index("key_pos")] = slice(0, n_keys)
            if strip_prefix and name.startswith(strip_prefix):
                name = name[len(strip_prefix) :]
            out[name] = torch.from_numpy(np.ascontiguousarray(data[tuple(index)]))[None]
    return ActivationCache(out, model, has_batch_dim=True)
