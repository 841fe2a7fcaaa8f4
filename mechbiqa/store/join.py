"""`join_stores`: one store of HDF5 virtual datasets over the stores that torchrun ranks wrote.

Where it sits: `mechbiqa.store.shards.record_sharded` has every rank write its part
of a data set into its own store (a shard) and rank 0 join them; the joined file
holds no data, only virtual datasets that read the shards, so
`mechbiqa.store.reader.ActivationStore` reads it like any store. What must agree
between shards is `shard_difference`'s business: everything that describes what
was recorded (model, tokenizer, spec, prompt, run settings, layout); what
legitimately differs per shard is only its rows (sample count, its range in the
run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py

from mechbiqa.store.errors import StoreError
from mechbiqa.store.layout import (
    IDENTITY_ATTRS,
    StoreLayout,
    check_schema,
    describe_difference,
    dumps,
    partial_path,
)
from mechbiqa.store.writer import fsync_dir

__all__ = ["join_stores", "shard_difference"]


def _shared(key: str, value: Any) -> str:
    """An attribute without its per-shard part: the layout's sample count, the run's shard range."""
    if value is None:
        return "None"
    if key == "layout":
        return dumps(StoreLayout.from_dict(json.loads(value)).with_samples(0).to_dict())
    if key == "run":
        return dumps({k: v for k, v in json.loads(value).items() if k != "shard"})
    return str(value)


def shard_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """What differs between two shards' attributes beyond their own rows, or None.

    Compared: `IDENTITY_ATTRS` (schema, model config and identity, tokenizer, prompt, run
    settings, cache spec, layout), without the sample count and the shard's range.
    """
    for key in IDENTITY_ATTRS:
        x, y = _shared(key, a.get(key)), _shared(key, b.get(key))
        if x != y:
            return describe_difference(key, x, y)
    return None


def join_stores(shards: Sequence[str | Path], out: str | Path) -> Path:
    """Join finished stores (e.g. one per torchrun rank) into one store of virtual datasets.

    The joined file holds no data: each dataset is an HDF5 virtual dataset over the
    shards, concatenated along the sample axis in the order given. Shard paths are
    stored relative to the joined file's folder, so the folder can be moved whole.

    Args:
        shards: Finished stores with the same model, spec and layout (but n_samples).
        out: The joined file (written to a temporary name, then renamed).

    Returns:
        ``out``.

    Raises:
        StoreError: A shard is unfinished, or the shards differ (named).
    """
    out = Path(out)
    infos, counts = [], []
    for shard in shards:
        shard = Path(shard)
        if not shard.exists():
            raise StoreError(
                f"cannot join {shard}: it does not exist"
                + (" (only its .partial does: finish that run first)" if partial_path(shard).exists() else "")
            )
        with h5py.File(shard, "r") as f:
            check_schema(shard, f.attrs)
            infos.append({k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
            counts.append(int(f["samples/status"].shape[0]))
    if not infos:
        raise ValueError("join_stores got no shards")
    first = infos[0]
    base_layout = StoreLayout.from_dict(json.loads(first["layout"]))
    for shard, info in zip(shards[1:], infos[1:], strict=True):
        difference = shard_difference(first, info)
        if difference is not None:
            raise StoreError(
                f"cannot join {shards[0]} and {shard}: {difference}; shards of one store must be recorded "
                "by one run (mechbiqa.store.shards.record_sharded agrees the layout across ranks)"
            )
    total = sum(counts)
    layout = base_layout.with_samples(total)
    tmp = out.with_name(out.name + ".tmp")
    rel = [os.path.relpath(Path(s).resolve(), out.resolve().parent) for s in shards]
    with h5py.File(shards[0], "r") as f0, h5py.File(tmp, "w") as f:
        for key, value in f0.attrs.items():
            f.attrs[key] = value
        f.attrs["layout"] = dumps(layout.to_dict())
        run = json.loads(first.get("run", "{}"))
        run.pop("shard", None)
        f.attrs["run"] = json.dumps(run, sort_keys=True)  # the form store_attrs writes
        ranges, start = [], 0
        for path, n in zip(rel, counts, strict=True):
            ranges.append({"path": path, "start": start, "stop": start + n})
            start += n
        f.attrs["shards"] = dumps(ranges)
        datasets: list[str] = []
        f0.visititems(lambda n, o: datasets.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in datasets:
            src = f0[name]
            axis = 1 if name.startswith("acts/") else 0
            shape = list(src.shape)
            shape[axis] = total
            vlayout = h5py.VirtualLayout(shape=tuple(shape), dtype=src.dtype)
            for path, r in zip(rel, ranges, strict=True):
                n = r["stop"] - r["start"]
                src_shape = list(src.shape)
                src_shape[axis] = n
                index = [slice(None)] * len(shape)
                index[axis] = slice(r["start"], r["stop"])
                vlayout[tuple(index)] = h5py.VirtualSource(path, name, shape=tuple(src_shape))
            ds = f.create_virtual_dataset(name, vlayout, fillvalue=None)
            for key, value in src.attrs.items():
                ds.attrs[key] = value
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out
