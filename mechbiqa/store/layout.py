"""Every shape in a store (`StoreLayout`), the rows a batch writes (`BatchRows`), and the file's constants.

Where it sits: `mechbiqa.store.plan.plan_layout` resolves a `mechbiqa.store.spec.CacheSpec`
against a model into a `StoreLayout`; `mechbiqa.store.writer.StoreWriter` allocates it and
writes `BatchRows` into it; `mechbiqa.store.reader.ActivationStore` reads it back from the
file's ``layout`` attribute. Layouts of the shards of one torchrun run are made equal with
`StoreLayout.union` before any shard is written (`mechbiqa.store.shards`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa.store.errors import SchemaVersionError, StoreError, StoreKeyError, StoreMismatchError
from mechbiqa.store.spec import is_image_space

__all__ = [
    "ERROR_BYTES",
    "IDENTITY_ATTRS",
    "SCHEMA_VERSION",
    "STATUS_FAILED",
    "STATUS_OK",
    "STATUS_PENDING",
    "ArraySpec",
    "BatchRows",
    "SampleInfo",
    "StoreLayout",
    "check_schema",
    "describe_difference",
    "dumps",
    "encode_text",
    "partial_path",
]

SCHEMA_VERSION = 2
"""Bumped whenever the file layout changes; readers refuse other versions by name.

History: 1 = one prompt with one image per sample; 2 adds ``samples/n_images`` (per-sample
prompts, text-only samples with zero image tokens)."""

ERROR_BYTES = 256
"""Width of ``samples/error`` (reasons are cut to it at a UTF-8 boundary)."""

STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2
"""``samples/status``: not recorded yet, recorded, failed (the reason is in ``samples/error``)."""

IDENTITY_ATTRS = (
    "schema_version",
    "model_config",
    "model_identity",
    "tokenizer",
    "prompt",
    "run",
    "cache_spec",
    "layout",
)
"""The attributes a resumed run must match (JSON strings or scalars; ``layout`` may be wider)."""

_SIZED_DIMS = ("pos", "key_pos")  # axes whose size comes from a capacity or max_pos, not from the model


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """The stored form of one site, resolved against a model.

    Attributes:
        key: ``"<hook template>@<select>"`` (the dataset ``acts/<key>``).
        hook: The hook template.
        select: The selection.
        layers: The stored layers, in dataset order; ``()`` for a hook without layers.
        shape: One sample's array at one layer, e.g. ``(1, 4096)`` or ``(32, 1, 700)``.
        dims: Names of ``shape``'s axes, e.g. ``("pos", "d_model")``.
    """

    key: str
    hook: str
    select: str
    layers: tuple[int, ...]
    shape: tuple[int, ...]
    dims: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        object.__setattr__(self, "dims", tuple(self.dims))
        if len(self.shape) != len(self.dims):
            raise ValueError(
                f"ArraySpec {self.key}: shape {self.shape} and dims {self.dims} differ in length"
            )

    @property
    def n_layer_slots(self) -> int:
        """Size of the dataset's leading axis (1 for a hook without layers)."""
        return max(1, len(self.layers))

    @property
    def image_side(self) -> bool:
        """Whether the hook lives on the image side (one row per image, no text positions)."""
        return is_image_space(self.hook)

    def resized(self, capacity: int, max_pos: int) -> ArraySpec:
        """The same array with ``capacity`` selected positions and ``max_pos`` keys."""
        sizes = {"pos": capacity, "key_pos": max_pos}
        shape = tuple(sizes.get(d, s) for d, s in zip(self.dims, self.shape, strict=True))
        return ArraySpec(self.key, self.hook, self.select, self.layers, shape, self.dims)


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """Every shape in a store, fixed when it is created.

    Attributes:
        n_samples: Rows of every per-sample dataset.
        max_pos: The longest spliced sequence a sample may have (prompt + generated answer).
        capacities: ``(selection, capacity)`` pairs: how many positions each selection keeps.
        arrays: One `ArraySpec` per site.
        answer_bytes: Width of ``samples/answer``.
        dtype: Activation dtype (``"float16"`` / ``"float32"``).
    """

    n_samples: int
    max_pos: int
    capacities: tuple[tuple[str, int], ...]
    arrays: tuple[ArraySpec, ...]
    answer_bytes: int = 1
    dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacities", tuple((str(s), int(c)) for s, c in self.capacities))
        object.__setattr__(self, "arrays", tuple(self.arrays))
        if self.n_samples < 0 or self.max_pos < 1 or self.answer_bytes < 1:
            raise ValueError(
                f"StoreLayout: bad sizes n_samples={self.n_samples} max_pos={self.max_pos} "
                f"answer_bytes={self.answer_bytes}"
            )
        missing = {a.select for a in self.arrays} - set(self.capacity)
        if missing:
            raise ValueError(f"StoreLayout: no capacity for selection(s) {sorted(missing)}")

    @property
    def capacity(self) -> dict[str, int]:
        """Capacity by selection."""
        return dict(self.capacities)

    def array(self, key: str) -> ArraySpec:
        """The `ArraySpec` of a key."""
        for a in self.arrays:
            if a.key == key:
                return a
        raise StoreKeyError(f"no array {key!r} in this store; stored: {[a.key for a in self.arrays]}")

    def row_datasets(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The raw-written per-sample datasets other than activations: name -> (dtype, row shape)."""
        rows = {
            "samples/status": ("i1", ()),
            "samples/error": (f"S{ERROR_BYTES}", ()),
            "samples/answer": (f"S{self.answer_bytes}", ()),
            "samples/n_positions": ("<i4", ()),
            "samples/n_images": ("i1", ()),
            "tokens/ids": ("<i4", (self.max_pos,)),
            "tokens/role": ("i1", (self.max_pos,)),
            "tokens/image_index": ("<i2", (self.max_pos,)),
        }
        for select, cap in self.capacities:
            rows[f"select/{select}/positions"] = ("<i4", (cap,))
            rows[f"select/{select}/count"] = ("<i4", ())
        return rows

    def with_samples(self, n: int) -> StoreLayout:
        """The same layout for ``n`` samples."""
        return StoreLayout(n, self.max_pos, self.capacities, self.arrays, self.answer_bytes, self.dtype)

    def union(self, *others: StoreLayout) -> StoreLayout:
        """The smallest layout that each of these fits in (this one's ``n_samples``).

        Per-sample prompts plan their layout from their own lengths and role counts: the
        shards of one run, or a resumed run whose prompts changed where rows failed, widen
        to the longest ``max_pos``, the largest capacity of each selection and the widest
        answer. Everything else must be equal.

        Raises:
            StoreMismatchError: The layouts hold other arrays, selections or dtypes (another
                spec or another model); the message names the first difference.
        """

        def frame(layout: StoreLayout) -> dict[str, Any]:
            arrays = {
                a.key: (
                    a.layers,
                    a.dims,
                    [None if d in _SIZED_DIMS else s for d, s in zip(a.dims, a.shape, strict=True)],
                )
                for a in layout.arrays
            }
            return {"dtype": layout.dtype, "selections": [s for s, _ in layout.capacities], "arrays": arrays}

        mine = frame(self)
        for other in others:
            theirs = frame(other)
            if theirs != mine:
                what = next(k for k in mine if theirs[k] != mine[k])
                if what == "arrays":
                    keys = sorted(set(mine["arrays"]) | set(theirs["arrays"]))
                    what = next(k for k in keys if mine["arrays"].get(k) != theirs["arrays"].get(k))
                    detail = f"array {what}: {mine['arrays'].get(what)} vs {theirs['arrays'].get(what)}"
                else:
                    detail = f"{what}: {mine[what]} vs {theirs[what]}"
                raise StoreMismatchError(
                    f"layouts differ ({detail}): they were planned from another cache spec or another model"
                )
        layouts = (self, *others)
        max_pos = max(x.max_pos for x in layouts)
        capacity = {s: max(x.capacity[s] for x in layouts) for s, _ in self.capacities}
        arrays = tuple(a.resized(capacity[a.select], max_pos) for a in self.arrays)
        answer_bytes = max(x.answer_bytes for x in layouts)
        return StoreLayout(self.n_samples, max_pos, tuple(capacity.items()), arrays, answer_bytes, self.dtype)

    def covers(self, other: StoreLayout) -> bool:
        """Whether ``other``'s rows fit in this layout (same arrays, each size at least as large)."""
        try:
            return self.union(other) == self
        except StoreMismatchError:
            return False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "n_samples": self.n_samples,
            "max_pos": self.max_pos,
            "capacities": [list(c) for c in self.capacities],
            "arrays": [asdict(a) for a in self.arrays],
            "answer_bytes": self.answer_bytes,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        """Inverse of `to_dict`."""
        arrays = tuple(
            ArraySpec(
                **{**a, "layers": tuple(a["layers"]), "shape": tuple(a["shape"]), "dims": tuple(a["dims"])}
            )
            for a in d["arrays"]
        )
        return cls(
            d["n_samples"],
            d["max_pos"],
            tuple(tuple(c) for c in d["capacities"]),
            arrays,
            d["answer_bytes"],
            d["dtype"],
        )


@dataclass(frozen=True, slots=True)
class SampleInfo:
    """What is known about a sample before it is recorded (written when the store is created).

    Attributes:
        id: Unique id (e.g. the IQARecord's).
        image_path: The image file.
        prompt: The prompt text.
        label: The 0-1 rating, or None.
        record: Everything else, JSON-ready (e.g. ``IQARecord.to_dict()``).
    """

    id: str
    image_path: str
    prompt: str = ""
    label: float | None = None
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class BatchRows:
    """One batch, ready to write: rows ``start .. start + len(status)`` of every dataset.

    Attributes:
        start: The first sample index.
        status: ``[batch]`` int8, `STATUS_OK` or `STATUS_FAILED` (never pending).
        rows: Every dataset of `StoreLayout.row_datasets` except ``samples/status``: ``[batch, ...]``.
        acts: Every array key: ``[layer, batch, *shape]``.
    """

    start: int
    status: np.ndarray
    rows: dict[str, np.ndarray]
    acts: dict[str, np.ndarray]


def partial_path(path: str | Path) -> Path:
    """``<store>.partial``: where a store lives until its last sample is recorded."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def encode_text(text: str, width: int) -> bytes:
    """UTF-8 bytes of ``text`` cut to ``width`` at a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= width:
        return data
    return data[:width].decode("utf-8", errors="ignore").encode("utf-8")


def package_version() -> str:
    """The installed mechbiqa version."""
    from mechbiqa import __version__

    return __version__


def dumps(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): the form attributes are stored and compared in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def describe_difference(name: str, old: Any, new: Any) -> str:
    """``"layout differs (max_pos 12 -> 13)"``: one attribute's difference, short enough for one line."""

    def short(value: Any) -> str:
        text = value if isinstance(value, str) else dumps(value)
        return text if len(text) <= 160 else text[:157] + "..."

    try:
        a, b = json.loads(old), json.loads(new)
    except (TypeError, ValueError):
        return f"{name}: store has {short(old)}, this run has {short(new)}"
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        parts = [f"{k} {short(a.get(k))} -> {short(b.get(k))}" for k in keys[:4]]
        return f"{name} differs ({'; '.join(parts)}{'; ...' if len(keys) > 4 else ''})"
    return f"{name}: store has {short(a)}, this run has {short(b)}"


def check_schema(path: Path, attrs: Mapping[str, Any]) -> int:
    """The schema version of a file's attributes; raises unless it is `SCHEMA_VERSION`."""
    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(
            f"{path} is an HDF5 file but not a mechbiqa activation store (no schema_version attribute)"
        )
    if int(version) != SCHEMA_VERSION:
        age = "an older" if int(version) < SCHEMA_VERSION else "a newer"
        raise SchemaVersionError(
            f"{path} has store schema version {int(version)}, but this mechbiqa ({package_version()}) reads "
            f"version {SCHEMA_VERSION} ({age} layout): read it with the mechbiqa that wrote it "
            f"(mechbiqa_version={attrs.get('mechbiqa_version')!r}), or record it again "
            "(studies/cache_activations.py --overwrite)"
        )
    return int(version)
