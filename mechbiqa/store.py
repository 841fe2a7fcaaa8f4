"""The activation store: one self-describing HDF5 file of cached activations, written crash-safely.

Where it sits (DESIGN.md, "The data path"): `mechbiqa_hooks.record` runs the
model with hooks and hands this module one batch of rows at a time
(`StoreWriter.write`); the studies open the finished file without the model
(`ActivationStore.open`) and read arrays by hook, layer, role selection and
sample. `mechbiqa_hooks.cache` turns one sample back into a TransformerLens
`ActivationCache`. `studies/cache_activations.py` is the command line.

What gets cached is a `CacheSpec`: a tuple of `Site`s, each a hook name (with
``{l}`` for "every layer") and a selection of positions, either a token role
(``"quality"``, ``"image"``, ``"description"`` ...; `mechbiqa.model.roles`),
``"all"`` positions or the ``"last"`` one. Along the hook's position axis (the
query axis of an attention pattern) only the selected positions are kept.

File layout (schema version `SCHEMA_VERSION`)::

    attrs                    schema_version, mechbiqa_version, git_sha, created_utc, and JSON:
                             model_config, model_identity, tokenizer, prompt, run, cache_spec, layout
    samples/id|image_path|prompt|record   [sample]  strings (record: the IQARecord as JSON)
    samples/label            [sample]  float64, the 0-1 rating (NaN when unrated)
    samples/status           [sample]  int8: 0 pending, 1 recorded, 2 failed (the commit record)
    samples/error            [sample]  S256, why a sample failed (the errors table)
    samples/answer           [sample]  S<n>, the generated answer (UTF-8; empty when scoring)
    samples/n_positions      [sample]  int32, length of the spliced sequence
    samples/n_images         [sample]  int8, images in the recorded prompt (0: text only, e.g. a
                             two-stage pair's stage-2 prompt; image_path then names the image the
                             description came from, which the recorded forward never saw)
    tokens/ids|role|image_index  [sample, max_pos]  spliced ids (-200 image, -1 pad), Role, index in image
    select/<sel>/positions   [sample, capacity]  int32 positions of the selection, -1 where unused
    select/<sel>/count       [sample]  int32 number of selected positions
    acts/<hook>@<sel>        [layer, sample, *shape]  e.g. [layer, sample, pos, d_model]

Every sample carries its own prompt (``samples/prompt``, ``tokens/*``): one
shared prompt (`mechbiqa_hooks.record.record_dataset`) or one per sample, of
any length, with or without an image (`mechbiqa_hooks.record.record_prompts`,
e.g. a one-stage model's own description followed by the quality sentence, or
the text-only stage-2 prompt of a two-stage pair). Ragged rows are padded,
with a length array beside them: positions are
unpadded sequence coordinates (0 = BOS) everywhere, a selection is padded to
its capacity (1 for ``quality``, n_image_tokens for ``image``, the longest
possible otherwise) with ``select/<sel>/count`` valid entries, and the key
axis of an attention row is padded to ``max_pos`` with ``samples/n_positions``
valid keys. Padding is zero. This keeps every array dense (``[sample, layer,
pos, d]`` reads without offsets arithmetic) at the price of storage for
padding, which is small for the default selections.

Layout choice: every dataset is **contiguous, layer-major** (``[layer,
sample, ...]`` in C order) and allocated at creation. "One layer, all samples"
is then one sequential read, the fastest a file can give, and "one sample, all
layers" is ``n_layers`` reads of one contiguous row each (the two access
patterns that chunking (1, 1, pos, d) serves, measured in
``studies/bench_cache.py``). No compression: it writes 8-40x slower for
1.0-1.17x gain (reference/toolchain.md).

Crash safety (a run killed with ``kill -9`` at any moment resumes to the
bitwise result of an uninterrupted run):

1. The file is created in full (all metadata, all datasets allocated, sample
   table written) as ``<store>.partial.tmp`` and renamed to ``<store>.partial``.
2. While recording, HDF5 metadata is never touched: rows are written with
   ``pwrite`` at the byte offsets of the contiguous datasets, so a kill can
   only leave some rows half-written, never a broken file.
3. A batch writes its activations and rows first and its ``samples/status``
   bytes last; a sample counts as recorded only once its status is nonzero.
   A resumed run restarts at the first pending batch and rewrites it whole.
4. When every sample is recorded the file is renamed to ``<store>``: a file
   under the final name is never half-written. `ActivationStore.open` also
   opens a ``.partial`` file and then shows only the committed samples.

One writer per store: `StoreWriter` holds ``<store>.lock`` (filelock) and a
second writer is refused with `StoreLockedError`. A resumed run must match
the stored model identity, config, tokenizer, prompt, spec, layout, run
settings and sample list, else `StoreMismatchError` names what differs.
`join_stores` joins stores written in parallel (one per torchrun rank) into
one file of HDF5 virtual datasets.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np

from mechbiqa.model.roles import ROLE_LABELS, TokenRoles

__all__ = [
    "SCHEMA_VERSION",
    "SELECTIONS",
    "PRESETS",
    "ActivationStore",
    "ArraySpec",
    "BatchRows",
    "CacheSpec",
    "SampleInfo",
    "SchemaVersionError",
    "Site",
    "StoreError",
    "StoreInfo",
    "StoreLayout",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "join_stores",
    "partial_path",
]

SCHEMA_VERSION = 2
"""Bumped whenever the file layout changes; readers refuse other versions by name.

History: 1 = one prompt with one image per sample; 2 adds ``samples/n_images`` (per-sample
prompts, text-only samples with zero image tokens)."""

SELECTIONS: tuple[str, ...] = tuple(r for r in ROLE_LABELS if r != "pad") + ("all", "last")
"""Position selections: a role label, ``"all"`` positions, or the ``"last"`` real one."""

ERROR_BYTES = 256
"""Width of ``samples/error`` (reasons are cut to it at a UTF-8 boundary)."""

STATUS_PENDING, STATUS_OK, STATUS_FAILED = 0, 1, 2

_LAYER = re.compile(r"^(?P<head>.+\.blocks\.)(?P<layer>\d+|\{l\})(?P<tail>\..+)$")
_VOLATILE_ATTRS = ("created_utc", "git_sha")  # provenance that differs between otherwise equal runs
# attrs a resumed run must match exactly (JSON strings or scalars)
_IDENTITY_ATTRS = (
    "schema_version",
    "model_config",
    "model_identity",
    "tokenizer",
    "prompt",
    "run",
    "cache_spec",
    "layout",
)


# ----------------------------------------------------------------------------- errors
class StoreError(RuntimeError):
    """A store cannot be created, resumed or read; the message says why and what to do."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class StoreMismatchError(StoreError):
    """A store was made by another model, config, spec or sample list than the one at hand."""


class SchemaVersionError(StoreError):
    """A store was written with another schema version than this mechbiqa reads."""


# ----------------------------------------------------------------------------- spec
def split_layer(hook: str) -> tuple[str, int | None]:
    """``"llm.blocks.3.hook_resid_post"`` -> (``"llm.blocks.{l}.hook_resid_post"``, 3).

    A template stays a template (layer None); a hook outside the blocks is returned as is.
    """
    match = _LAYER.match(hook)
    if match is None:
        return hook, None
    template = f"{match['head']}{{l}}{match['tail']}"
    return template, None if match["layer"] == "{l}" else int(match["layer"])


@dataclass(frozen=True, slots=True)
class Site:
    """One thing to cache: a hook, which of its positions, at which layers.

    Attributes:
        hook: A hook name (`mechbiqa_hooks.names`). ``{l}`` in place of the layer
            means every layer in ``layers``; a concrete layer (``llm.blocks.3...``)
            is turned into the template with ``layers=(3,)``.
        select: Positions kept on the hook's position axis (the query axis of an
            attention pattern): a role label (``"quality"``, ``"image"``, ...),
            ``"all"`` or ``"last"``. Hooks of the vision side (``vision.*``,
            ``abstractor.*``, ``hook_image_tokens``) have no text positions and
            take ``"all"``.
        layers: The layers of a ``{l}`` hook; None means every layer of the model.
    """

    hook: str
    select: str = "quality"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"Site {self.hook!r}: select={self.select!r} is not one of {SELECTIONS}")
        template, layer = split_layer(self.hook)
        layers = self.layers
        if layer is not None:
            if layers is not None and tuple(layers) != (layer,):
                raise ValueError(
                    f"Site {self.hook!r} names layer {layer} and also layers={layers}; "
                    "use the template 'blocks.{l}' with layers=..., or the concrete name alone"
                )
            layers = (layer,)
        if layers is not None:
            if "{l}" not in template:
                raise ValueError(f"Site {self.hook!r} has no layer, so layers={layers} does not apply")
            if any(int(x) < 0 for x in layers) or not layers:
                raise ValueError(
                    f"Site {self.hook!r}: layers must be non-negative layer numbers; got {layers}"
                )
            layers = tuple(sorted({int(x) for x in layers}))
        object.__setattr__(self, "hook", template)
        object.__setattr__(self, "layers", layers)
        if is_image_space(template) and self.select != "all":
            raise ValueError(
                f"Site {template!r} is an image-side hook without text positions; use select='all'"
            )

    @property
    def key(self) -> str:
        """``"<hook template>@<select>"``: the dataset name under ``acts/``."""
        return f"{self.hook}@{self.select}"

    @property
    def has_layers(self) -> bool:
        """Whether the hook is per layer (its name holds ``{l}``)."""
        return "{l}" in self.hook

    def __str__(self) -> str:
        layers = "" if self.layers is None else ":" + ",".join(map(str, self.layers))
        return f"{self.hook}@{self.select}{layers}"


def is_image_space(hook: str) -> bool:
    """Whether a hook lives on the image side (batch = images, no text positions)."""
    return hook.startswith(("vision.", "abstractor.")) or hook == "hook_image_tokens"


_RESID = "llm.blocks.{l}.hook_resid_post"
_PATTERN = "llm.blocks.{l}.attn.hook_pattern"
_LOGITS = "llm.unembed.hook_out"

PRESETS: dict[str, tuple[Site, ...]] = {
    # Everything the studies read: the logit lens and probes (residual at the quality
    # position), the dominant image tokens (residuals at the image positions), attention
    # attribution by role (the quality row of every layer and head over all keys), the score.
    "default": (
        Site(_RESID, "quality"),
        Site(_RESID, "image"),
        Site(_PATTERN, "quality"),
        Site(_LOGITS, "quality"),
    ),
    # The light one for a 7B model over thousands of images (~2 MB per sample in fp16):
    # no image residuals, which are 17 MB per sample at 32 layers x 65 tokens x 4096.
    "quality": (Site(_RESID, "quality"), Site(_PATTERN, "quality"), Site(_LOGITS, "quality")),
    # default plus full attention maps of every layer (large: heads x pos x pos per layer).
    "full-attention": (
        Site(_RESID, "quality"),
        Site(_RESID, "image"),
        Site(_PATTERN, "all"),
        Site(_LOGITS, "quality"),
    ),
}
"""Named cache specs (``CacheSpec.preset(name)``)."""

_DTYPES = ("float16", "float32")


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Which activations a recording run keeps, and in which dtype.

    Attributes:
        sites: The sites; two sites may not share a hook and a selection.
        dtype: ``"float16"`` (half the size; LLaMA residuals stay well inside its range)
            or ``"float32"``. bfloat16 models are cast (HDF5 has no bfloat16).
    """

    sites: tuple[Site, ...]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        sites = tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        if not sites:
            raise ValueError("CacheSpec has no sites; give at least one, or use CacheSpec.preset('default')")
        if self.dtype not in _DTYPES:
            raise ValueError(f"CacheSpec dtype {self.dtype!r} is not one of {_DTYPES}")
        keys = [s.key for s in sites]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"CacheSpec lists {repeated} more than once; merge their layers into one Site")

    @classmethod
    def preset(cls, name: str = "default", dtype: str = "float16") -> CacheSpec:
        """A named spec from `PRESETS`."""
        if name not in PRESETS:
            raise KeyError(f"unknown cache spec preset {name!r}; known: {sorted(PRESETS)}")
        return cls(PRESETS[name], dtype)

    @classmethod
    def default(cls, dtype: str = "float16") -> CacheSpec:
        """`PRESETS["default"]`: quality and image residuals, quality attention rows, quality logits."""
        return cls.preset("default", dtype)

    @classmethod
    def parse(cls, text: str, dtype: str = "float16") -> CacheSpec:
        """Parse ``"default; llm.blocks.{l}.hook_attn_out@quality:0,2; llm.unembed.hook_out@last"``.

        Items are separated by ``;`` (or whitespace); each is a preset name or
        ``HOOK[@SELECT][:LAYERS]`` with LAYERS like ``0,2,5-7``; SELECT defaults to quality.
        """
        sites: list[Site] = []
        for item in re.split(r"[;\s]+", text.strip()):
            if not item:
                continue
            if item in PRESETS:
                sites += [s for s in PRESETS[item] if s.key not in {t.key for t in sites}]
                continue
            match = re.fullmatch(r"(?P<hook>[^@:]+)(@(?P<select>[a-z]+))?(:(?P<layers>[\d,\-]+))?", item)
            if match is None:
                raise ValueError(
                    f"cannot parse cache site {item!r}; write HOOK[@SELECT][:LAYERS], "
                    "e.g. 'llm.blocks.{l}.hook_resid_post@image:0-3'"
                )
            layers = None
            if match["layers"]:
                layers = []
                for part in match["layers"].split(","):
                    lo, _, hi = part.partition("-")
                    layers += list(range(int(lo), int(hi or lo) + 1))
            sites.append(Site(match["hook"], match["select"] or "quality", tuple(layers) if layers else None))
        return cls(tuple(sites), dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "dtype": self.dtype,
            "sites": [
                {"hook": s.hook, "select": s.select, "layers": None if s.layers is None else list(s.layers)}
                for s in self.sites
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheSpec:
        """Inverse of `to_dict`."""
        sites = tuple(
            Site(s["hook"], s["select"], None if s["layers"] is None else tuple(s["layers"]))
            for s in d["sites"]
        )
        return cls(sites, d["dtype"])

    def __str__(self) -> str:
        return "; ".join(map(str, self.sites))


# ----------------------------------------------------------------------------- layout
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
        raise KeyError(f"no array {key!r} in this store; stored: {[a.key for a in self.arrays]}")

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


def git_sha() -> str:
    """The commit of the mechbiqa source tree, or "" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _package_version() -> str:
    from mechbiqa import __version__

    return __version__


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _describe_difference(name: str, old: Any, new: Any) -> str:
    def short(value: Any) -> str:
        text = value if isinstance(value, str) else _dumps(value)
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


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _contiguous_dcpl() -> h5py.h5p.PropDCID:
    # Contiguous, allocated at creation, never filled: the file gets holes (zeros)
    # and every dataset has a fixed byte offset for the raw writes.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _check_schema(path: Path, attrs: Mapping[str, Any]) -> int:
    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(
            f"{path} is an HDF5 file but not a mechbiqa activation store (no schema_version attribute)"
        )
    if int(version) != SCHEMA_VERSION:
        age = "an older" if int(version) < SCHEMA_VERSION else "a newer"
        raise SchemaVersionError(
            f"{path} has store schema version {int(version)}, but this mechbiqa ({_package_version()}) reads "
            f"version {SCHEMA_VERSION} ({age} layout): read it with the mechbiqa that wrote it "
            f"(mechbiqa_version={attrs.get('mechbiqa_version')!r}), or record it again "
            "(studies/cache_activations.py --overwrite)"
        )
    return int(version)


# ----------------------------------------------------------------------------- writer
class StoreWriter:
    """Writes one store, batch by batch, so that a kill at any moment loses at most the batch in flight.

    Open with `StoreWriter.open` (creates, or resumes a ``.partial`` file after
    checking it matches); call `write` once per batch (in order), then `finish`.
    Nothing but raw ``pwrite`` touches the file between `open` and `finish`.
    """

    def __init__(  # noqa: D107  (use StoreWriter.open)
        self,
        path: Path,
        layout: StoreLayout,
        status: np.ndarray,
        offsets: dict[str, int],
        lock: filelock.BaseFileLock,
        fsync: bool,
    ) -> None:
        self.path = path
        self.layout = layout
        self.status = status  # [sample] int8, kept in step with the file
        self._offsets = offsets
        self._lock = lock
        self._fsync = fsync
        self.stored_attrs: dict[str, Any] = {}  # the attributes the file had when opened (filled by `open`)
        self._fd: int | None = None if self.complete else os.open(partial_path(path), os.O_WRONLY)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | Path,
        layout: StoreLayout,
        attrs: Mapping[str, Any],
        samples: Sequence[SampleInfo],
        *,
        overwrite: bool = False,
        fsync: bool = False,
    ) -> StoreWriter:
        """Create a store, or resume the unfinished one at ``path``.

        Args:
            path: The final file name (``cache/activations.h5``).
            layout: Every shape (`mechbiqa_hooks.record.plan_layout` makes it).
            attrs: JSON-ready run description; the keys of `_IDENTITY_ATTRS` that are
                present must match on resume (model_config, model_identity, tokenizer,
                prompt, run, cache_spec; layout and schema_version are added here).
            samples: One `SampleInfo` per row, in order.
            overwrite: Delete an existing store (finished or not) and start again.
            fsync: ``fdatasync`` before and after each commit (survives power loss,
                not only a killed process; slower on real disks).

        Returns:
            The writer; `complete` is already True when the store was finished before.

        Raises:
            StoreLockedError: Another process writes this store.
            StoreMismatchError: The existing store was made differently (each difference named).
            SchemaVersionError: The existing store has another schema version.
        """
        path = Path(path)
        if len(samples) != layout.n_samples:
            raise ValueError(f"{len(samples)} samples but the layout has n_samples={layout.n_samples}")
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"sample ids must be unique; repeated: {repeated}")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path) + ".lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise StoreLockedError(
                f"{path} is being written by another process (it holds {path}.lock); wait for that run to "
                "finish or stop it, or write to another path. A lock left by a killed process frees itself."
            ) from None
        try:
            full_attrs = {
                **{k: v for k, v in attrs.items()},
                "schema_version": SCHEMA_VERSION,
                "layout": _dumps(layout.to_dict()),
            }
            partial = partial_path(path)
            tmp = partial.with_name(partial.name + ".tmp")
            if overwrite:
                for p in (path, partial, tmp):
                    p.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)  # a creation that was killed half-way
            existing = path if path.exists() else partial if partial.exists() else None
            if existing is None:
                cls._create(tmp, layout, full_attrs, samples)
                os.replace(tmp, partial)
                _fsync_dir(partial.parent)
                existing = partial
            status, offsets, stored = cls._check_existing(existing, full_attrs, samples, layout)
            writer = cls(path, layout, status, offsets, lock, fsync)
            writer.stored_attrs = stored
            return writer
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _create(
        tmp: Path, layout: StoreLayout, attrs: Mapping[str, Any], samples: Sequence[SampleInfo]
    ) -> None:
        n = layout.n_samples
        string = h5py.string_dtype("utf-8")
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, int | float) else str(value)
            f.attrs["mechbiqa_version"] = _package_version()
            f.attrs["git_sha"] = git_sha()
            f.attrs["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            )
            f.create_dataset("samples/id", data=np.array([s.id for s in samples], dtype=object), dtype=string)
            f.create_dataset(
                "samples/image_path",
                data=np.array([str(s.image_path) for s in samples], dtype=object),
                dtype=string,
            )
            f.create_dataset(
                "samples/prompt", data=np.array([s.prompt for s in samples], dtype=object), dtype=string
            )
            f.create_dataset(
                "samples/record",
                data=np.array([_dumps(dict(s.record)) for s in samples], dtype=object),
                dtype=string,
            )
            f.create_dataset(
                "samples/label",
                data=np.array(
                    [math.nan if s.label is None else float(s.label) for s in samples], dtype="<f8"
                ),
            )
            for name, (dtype, row) in layout.row_datasets().items():
                f.create_dataset(name, shape=(n, *row), dtype=dtype, dcpl=_contiguous_dcpl())
            for spec in layout.arrays:
                ds = f.create_dataset(
                    f"acts/{spec.key}",
                    shape=(spec.n_layer_slots, n, *spec.shape),
                    dtype=np.dtype(layout.dtype).newbyteorder("<"),
                    dcpl=_contiguous_dcpl(),
                )
                ds.attrs["layers"] = np.asarray(spec.layers, dtype="<i4")
                ds.attrs["dims"] = _dumps(["layer", "sample", *spec.dims])
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())

    @staticmethod
    def _check_existing(
        path: Path, attrs: Mapping[str, Any], samples: Sequence[SampleInfo], layout: StoreLayout
    ) -> tuple[np.ndarray, dict[str, int], dict[str, Any]]:
        try:
            f = h5py.File(path, "r")
        except OSError as error:
            raise StoreError(
                f"cannot open {path} to resume it ({error}); delete it (or pass overwrite) to start again"
            ) from None
        with f:
            _check_schema(path, f.attrs)
            problems = []
            for key in _IDENTITY_ATTRS:
                if key in attrs and key != "schema_version":
                    stored = f.attrs.get(key)
                    stored = stored if not isinstance(stored, bytes) else stored.decode()
                    if str(stored) != str(attrs[key]):
                        problems.append(_describe_difference(key, stored, attrs[key]))
            stored_ids = [x.decode() if isinstance(x, bytes) else x for x in f["samples/id"][:]]
            ids = [s.id for s in samples]
            if stored_ids != ids:
                first = next(
                    (i for i, (a, b) in enumerate(zip(stored_ids, ids, strict=False)) if a != b),
                    min(len(ids), len(stored_ids)),
                )
                problems.append(
                    f"sample list differs ({len(stored_ids)} stored, {len(ids)} now; first difference "
                    f"at row {first})"
                )
            if problems:
                raise StoreMismatchError(
                    f"{path} was recorded with another setup, so this run cannot append to it: "
                    + "; ".join(problems)
                    + ". Write to another path, or pass overwrite to replace it."
                )
            offsets = {}
            for name in layout.row_datasets():
                offsets[name] = f[name].id.get_offset()
            for spec in layout.arrays:
                offsets[f"acts/{spec.key}"] = f[f"acts/{spec.key}"].id.get_offset()
            status = f["samples/status"][:].astype(np.int8)
            stored = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        if any(v is None for v in offsets.values()):
            raise StoreError(
                f"{path} has datasets without a fixed offset (not written by StoreWriter); delete it"
            )
        return status, offsets, stored

    # ----------------------------------------------------------------- state
    @property
    def complete(self) -> bool:
        """Whether every sample is recorded (the store may still be ``.partial`` until `finish`)."""
        return bool((self.status != STATUS_PENDING).all())

    @property
    def first_pending(self) -> int:
        """The first sample not yet recorded (``n_samples`` when none)."""
        pending = np.flatnonzero(self.status == STATUS_PENDING)
        return int(pending[0]) if len(pending) else self.layout.n_samples

    # ----------------------------------------------------------------- write
    def write(self, batch: BatchRows) -> None:
        """Write one batch: activations and rows first, its status bytes last (the commit).

        Raises:
            ValueError: A missing array, or a shape or dtype that does not fit the layout.
        """
        if self._fd is None:
            raise StoreError(f"{self.path} is finished or closed; open a new StoreWriter to write again")
        n = len(batch.status)
        start, layout = batch.start, self.layout
        if not 0 <= start <= start + n <= layout.n_samples:
            raise ValueError(f"batch rows {start}..{start + n} are outside 0..{layout.n_samples}")
        if np.any(batch.status == STATUS_PENDING):
            raise ValueError("a written batch must mark every sample recorded (1) or failed (2)")
        act_dtype = np.dtype(layout.dtype).newbyteorder("<")
        for spec in layout.arrays:
            data = batch.acts.get(spec.key)
            expected = (spec.n_layer_slots, n, *spec.shape)
            if data is None or tuple(data.shape) != expected:
                got = None if data is None else tuple(data.shape)
                raise ValueError(f"activations {spec.key!r}: expected shape {expected}, got {got}")
            data = np.ascontiguousarray(data, dtype=act_dtype)
            row_bytes = math.prod(spec.shape) * act_dtype.itemsize
            base = self._offsets[f"acts/{spec.key}"]
            for slot in range(spec.n_layer_slots):
                _pwrite_all(self._fd, data[slot], base + (slot * layout.n_samples + start) * row_bytes)
        for name, (dtype, row) in layout.row_datasets().items():
            if name == "samples/status":
                continue
            data = batch.rows.get(name)
            if data is None or tuple(data.shape) != (n, *row):
                got = None if data is None else tuple(data.shape)
                raise ValueError(f"rows {name!r}: expected shape {(n, *row)}, got {got}")
            np_dtype = np.dtype(dtype)
            _pwrite_all(
                self._fd,
                np.asarray(data, dtype=np_dtype),
                self._offsets[name] + start * np_dtype.itemsize * math.prod(row),
            )
        if self._fsync:
            os.fdatasync(self._fd)
        status = np.asarray(batch.status, dtype=np.int8)
        _pwrite_all(self._fd, status, self._offsets["samples/status"] + start)
        if self._fsync:
            os.fdatasync(self._fd)
        self.status[start : start + n] = status

    def finish(self) -> Path:
        """Rename the finished ``.partial`` file to its final name and release the lock.

        Raises:
            StoreError: If samples are still pending.
        """
        if not self.complete:
            raise StoreError(
                f"{self.path}: {int((self.status == STATUS_PENDING).sum())} samples are not recorded "
                "yet; record them (resume the run) before finishing"
            )
        partial = partial_path(self.path)
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if partial.exists():
            os.replace(partial, self.path)
            _fsync_dir(self.path.parent)
        self.close()
        return self.path

    def close(self) -> None:
        """Stop writing (the store stays resumable) and release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock.is_locked:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class StoreInfo:
    """A store's description (its file attributes, parsed).

    Attributes:
        schema_version: The layout version.
        mechbiqa_version: The package version that wrote it.
        git_sha: The source commit that wrote it ("" outside git).
        created_utc: When it was created.
        model_config: The model config (original ``config.json`` form).
        model_identity: Name, weight fingerprint and dtype of the model.
        tokenizer: Tokenizer kind and fingerprint.
        prompt: The prompt template and text.
        run: Mode, batch size, seed, generation settings.
        spec: The `CacheSpec` (None if the writer gave none).
        layout: The `StoreLayout`.
        shards: For a joined store, the shard files and their sample ranges.
    """

    schema_version: int
    mechbiqa_version: str
    git_sha: str
    created_utc: str
    model_config: dict[str, Any]
    model_identity: dict[str, Any]
    tokenizer: dict[str, Any]
    prompt: dict[str, Any]
    run: dict[str, Any]
    spec: CacheSpec | None
    layout: StoreLayout
    shards: list[dict[str, Any]]

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreInfo:
        """Parse HDF5 attributes."""

        def text(key: str, default: str = "") -> str:
            value = attrs.get(key, default)
            return value.decode() if isinstance(value, bytes) else str(value)

        def obj(key: str, default: Any) -> Any:
            return json.loads(text(key)) if key in attrs else default

        return cls(
            schema_version=int(attrs["schema_version"]),
            mechbiqa_version=text("mechbiqa_version"),
            git_sha=text("git_sha"),
            created_utc=text("created_utc"),
            model_config=obj("model_config", {}),
            model_identity=obj("model_identity", {}),
            tokenizer=obj("tokenizer", {}),
            prompt=obj("prompt", {}),
            run=obj("run", {}),
            spec=CacheSpec.from_dict(spec) if (spec := obj("cache_spec", None)) else None,
            layout=StoreLayout.from_dict(obj("layout", None)),
            shards=obj("shards", []),
        )


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """A sample that could not be recorded."""

    index: int
    id: str
    image_path: str
    reason: str


SampleSelector = None | int | slice | str | Sequence[int] | np.ndarray


class ActivationStore:
    """Read a store without the model: arrays by hook, layer, selection and sample.

    ::

        with ActivationStore.open("cache/activations.h5") as store:
            resid = store.get(names.resid_post, "quality")            # [sample, layer, 1, d_model]
            rows = store.get("llm.blocks.{l}.attn.hook_pattern")      # [sample, layer, head, 1, key_pos]
            roles = store.roles()                                     # [sample, max_pos] Role values

    By default the sample axis holds the *valid* samples (recorded, not failed),
    in store order (`valid`); pass ``samples="all"`` for every row.
    """

    def __init__(self, file: h5py.File, path: Path, complete: bool) -> None:  # noqa: D107
        self._file = file
        self.path = path
        self.complete = complete
        _check_schema(path, file.attrs)
        self.info = StoreInfo.from_attrs(file.attrs)
        self.layout = self.info.layout
        self.status = file["samples/status"][:].astype(np.int8)

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        """Open a finished store, or the ``.partial`` file of an unfinished one (committed samples only).

        Raises:
            FileNotFoundError: Neither file exists.
            SchemaVersionError: The store was written with another schema version.
        """
        path = Path(path)
        candidates = [(path, True), (partial_path(path), False)]
        if path.name.endswith(".partial"):
            candidates = [(path, False)]
        for candidate, complete in candidates:
            if candidate.exists():
                try:
                    file = h5py.File(candidate, "r")
                except OSError as error:
                    raise StoreError(f"{candidate} is not a readable HDF5 file ({error})") from None
                try:
                    return cls(file, candidate, complete)
                except BaseException:
                    file.close()
                    raise
        raise FileNotFoundError(
            f"no activation store at {path} (nor {partial_path(path).name}); "
            "record one with studies/cache_activations.py --out " + str(path)
        )

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial, {int((self.status != 0).sum())} committed"
        return (
            f"ActivationStore({str(self.path)!r}, {self.n_samples} samples ({state}), "
            f"{len(self.valid)} valid, arrays={self.keys})"
        )

    # ------------------------------------------------------------ samples
    @property
    def n_samples(self) -> int:
        """Rows in the store (pending and failed ones included)."""
        return self.layout.n_samples

    @property
    def valid(self) -> np.ndarray:
        """Indices of the samples recorded without error (the default sample axis)."""
        return np.flatnonzero(self.status == STATUS_OK)

    @property
    def keys(self) -> list[str]:
        """Stored array keys, ``"<hook template>@<select>"``."""
        return [a.key for a in self.layout.arrays]

    def _strings(self, name: str, samples: SampleSelector) -> list[str]:
        index = self._index(samples)
        values = self._file[name][:][index] if not isinstance(index, slice) else self._file[name][index]
        return [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in np.atleast_1d(values)
        ]

    def ids(self, samples: SampleSelector = None) -> list[str]:
        """Sample ids."""
        return self._strings("samples/id", samples)

    def image_paths(self, samples: SampleSelector = None) -> list[str]:
        """Image paths."""
        return self._strings("samples/image_path", samples)

    def prompts(self, samples: SampleSelector = None) -> list[str]:
        """Prompt texts."""
        return self._strings("samples/prompt", samples)

    def answers(self, samples: SampleSelector = None) -> list[str]:
        """Generated answers ("" when the run scored a fixed prompt)."""
        return [a.rstrip("\x00") for a in self._strings("samples/answer", samples)]

    def records(self, samples: SampleSelector = None) -> list[dict[str, Any]]:
        """The sample records (IQARecord fields) as dicts."""
        return [json.loads(r) for r in self._strings("samples/record", samples)]

    def labels(self, samples: SampleSelector = None) -> np.ndarray | np.generic:
        """``[sample]`` 0-1 ratings (NaN where unrated)."""
        return self._rows("samples/label", samples)

    def index_of(self, sample_id: str) -> int:
        """Row of a sample id."""
        ids = self.ids("all")
        try:
            return ids.index(sample_id)
        except ValueError:
            raise KeyError(f"no sample {sample_id!r} in {self.path}") from None

    def errors(self) -> list[ErrorRow]:
        """The errors table: every sample that failed, with the reason."""
        failed = np.flatnonzero(self.status == STATUS_FAILED)
        if not len(failed):
            return []
        reasons = self._file["samples/error"][:][failed]
        return [
            ErrorRow(int(i), s, p, r.decode("utf-8", errors="replace").rstrip("\x00"))
            for i, s, p, r in zip(failed, self.ids(failed), self.image_paths(failed), reasons, strict=True)
        ]

    # ------------------------------------------------------------ tokens
    def n_positions(self, samples: SampleSelector = None) -> np.ndarray | np.generic:
        """``[sample]`` length of each spliced sequence."""
        return self._rows("samples/n_positions", samples)

    def n_images(self, samples: SampleSelector = None) -> np.ndarray | np.generic:
        """``[sample]`` images in each recorded prompt (0 for a text-only prompt)."""
        return self._rows("samples/n_images", samples)

    def roles(self, samples: SampleSelector = None) -> np.ndarray:
        """``[sample, max_pos]`` `Role` values (PAD beyond each sequence)."""
        return self._rows("tokens/role", samples)

    def token_ids(self, samples: SampleSelector = None) -> np.ndarray:
        """``[sample, max_pos]`` spliced-space token ids (-200 at image positions, -1 padding)."""
        return self._rows("tokens/ids", samples)

    def image_index(self, samples: SampleSelector = None) -> np.ndarray:
        """``[sample, max_pos]`` index inside the image (-1 elsewhere)."""
        return self._rows("tokens/image_index", samples)

    def token_roles(self, sample: int) -> TokenRoles:
        """The `TokenRoles` of one sample (unpadded; source_index is not stored and set to -1)."""
        n = int(self._file["samples/n_positions"][sample])
        role = self._file["tokens/role"][sample, :n]
        image_index = self._file["tokens/image_index"][sample, :n]
        number = np.where(image_index >= 0, 0, -1).astype(np.int16)
        return TokenRoles(
            role=role,
            image_index=image_index,
            image_number=number,
            source_index=np.full(n, -1, dtype=np.int32),
        )

    def positions(self, select: str, samples: SampleSelector = None) -> np.ndarray:
        """``[sample, capacity]`` positions a selection kept (-1 where unused)."""
        self._capacity(select)
        return self._rows(f"select/{select}/positions", samples)

    def counts(self, select: str, samples: SampleSelector = None) -> np.ndarray | np.generic:
        """``[sample]`` number of positions a selection kept."""
        self._capacity(select)
        return self._rows(f"select/{select}/count", samples)

    def _capacity(self, select: str) -> int:
        if select not in self.layout.capacity:
            raise KeyError(
                f"selection {select!r} is not in this store; stored: {sorted(self.layout.capacity)}"
            )
        return self.layout.capacity[select]

    # ------------------------------------------------------------ activations
    def spec_of(self, hook: str | Callable[[Any], str], select: str = "quality") -> ArraySpec:
        """The `ArraySpec` of a hook (name, template or name builder) and selection."""
        template, _ = split_layer(hook("{l}") if callable(hook) else hook)
        return self.layout.array(f"{template}@{select}")

    def dims(self, hook: str | Callable[[Any], str], select: str = "quality") -> tuple[str, ...]:
        """Axis names of `get`'s result for all layers, e.g. ``("sample", "layer", "pos", "d_model")``."""
        spec = self.spec_of(hook, select)
        return ("sample", "layer", *spec.dims) if spec.layers else ("sample", *spec.dims)

    def get(
        self,
        hook: str | Callable[[Any], str],
        select: str = "quality",
        *,
        layers: int | Sequence[int] | None = None,
        samples: SampleSelector = None,
    ) -> np.ndarray:
        """Read activations.

        Args:
            hook: ``"llm.blocks.{l}.hook_resid_post"``, a concrete name
                (``"llm.blocks.3.hook_resid_post"`` = that layer), or a name builder
                (``names.resid_post``).
            select: The selection it was stored under.
            layers: One layer (its axis is dropped), several, or None (every stored layer).
            samples: None (the `valid` samples), ``"all"``, an index, a slice or indices.

        Returns:
            ``[sample, layer, *shape]`` (see `dims`), without the layer axis for one layer
            or a hook without layers, without the sample axis for one integer sample.
            Rows of failed or pending samples are zeros/undefined: use `valid`.
        """
        name = hook("{l}") if callable(hook) else hook
        template, concrete = split_layer(name)
        if concrete is not None:
            if layers is not None:
                raise ValueError(f"{name!r} already names layer {concrete}; drop layers= or use the template")
            layers = concrete
        spec = self.layout.array(f"{template}@{select}")
        ds = self._file[f"acts/{spec.key}"]
        if not spec.layers:
            if layers is not None:
                raise ValueError(f"{template!r} has no layers; call get() without layers=")
            return self._take(ds, 0, samples)
        single = isinstance(layers, int | np.integer)
        wanted = (
            [int(layers)] if single else list(spec.layers) if layers is None else [int(x) for x in layers]
        )
        slots = []
        for layer in wanted:
            if layer not in spec.layers:
                raise KeyError(
                    f"layer {layer} of {spec.key} is not stored; stored layers: {list(spec.layers)}"
                )
            slots.append(spec.layers.index(layer))
        if single:
            return self._take(ds, slots[0], samples)
        index = self._index(samples)
        if slots == list(range(spec.n_layer_slots)) and isinstance(index, slice) and index == slice(None):
            return np.moveaxis(ds[...], 0, 1)
        return np.stack(
            [self._take(ds, s, samples) for s in slots], axis=1 if not isinstance(index, int) else 0
        )

    def iter_layers(
        self, hook: str | Callable[[Any], str], select: str = "quality", samples: SampleSelector = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(layer, [sample, *shape])`` one layer at a time (memory of one layer)."""
        spec = self.spec_of(hook, select)
        for layer in spec.layers:
            yield layer, self.get(spec.hook, select, layers=layer, samples=samples)

    # ------------------------------------------------------------ helpers
    def _index(self, samples: SampleSelector) -> slice | int | np.ndarray:
        if samples is None:
            valid = self.valid
            if len(valid) == self.n_samples:
                return slice(None)
            return valid
        if isinstance(samples, str):
            if samples != "all":
                raise ValueError(
                    f"samples={samples!r}: pass None (valid samples), 'all', an index, a slice or indices"
                )
            return slice(None)
        if isinstance(samples, slice | int | np.integer):
            return samples if isinstance(samples, slice) else int(samples)
        return np.asarray(samples, dtype=np.int64)

    def _take(self, ds: h5py.Dataset, slot: int | None, samples: SampleSelector) -> np.ndarray | np.generic:
        index = self._index(samples)
        lead = () if slot is None else (slot,)
        if isinstance(index, slice | int):
            return ds[(*lead, index)]
        if len(index) == 0:
            shape = ds.shape[len(lead) :]
            return np.zeros((0, *shape[1:]), dtype=ds.dtype)
        lo, hi = int(index.min()), int(index.max()) + 1
        # One contiguous read of the covering range, then numpy indexing: far faster than
        # h5py point selection for the usual "most samples" case.
        if hi - lo <= 4 * len(index):
            return ds[(*lead, slice(lo, hi))][index - lo]
        order = np.argsort(index)
        out = np.empty((len(index), *ds.shape[len(lead) + 1 :]), dtype=ds.dtype)
        for i in order:
            out[i] = ds[(*lead, int(index[i]))]
        return out

    def _rows(self, name: str, samples: SampleSelector) -> np.ndarray | np.generic:
        return self._take(self._file[name], None, samples)

    def check_identity(self, model_identity: Mapping[str, Any]) -> None:
        """Refuse a store made by another model.

        Raises:
            StoreMismatchError: naming the stored and the given identity.
        """
        stored = self.info.model_identity
        keys = sorted(k for k in set(stored) | set(model_identity) if stored.get(k) != model_identity.get(k))
        if keys:
            raise StoreMismatchError(
                f"{self.path} was recorded from model {stored.get('name', '?')!r} "
                f"(fingerprint {stored.get('fingerprint', '?')}), not from this one "
                f"({model_identity.get('name', '?')!r}, "
                f"fingerprint {model_identity.get('fingerprint', '?')}); "
                f"differences: {keys}. Analyse it with the model it was recorded from, or record it again."
            )

    def digest(self) -> str:
        """SHA-256 of every dataset and attribute but creation time and commit for equality checks."""
        sha = hashlib.sha256()
        for key in sorted(self._file.attrs):
            if key not in _VOLATILE_ATTRS and key != "shards":
                sha.update(f"{key}={self._file.attrs[key]}".encode())
        names: list[str] = []
        self._file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in sorted(names):
            ds = self._file[name]
            sha.update(f"{name}:{ds.dtype}:{ds.shape}".encode())
            if ds.ndim and ds.shape[0] > 1 and ds.nbytes > 1 << 26:
                for i in range(ds.shape[0]):
                    sha.update(np.ascontiguousarray(ds[i]).tobytes())
            else:
                data = ds[()]
                if data.dtype == object:
                    data = np.array([x if isinstance(x, bytes) else str(x).encode() for x in np.ravel(data)])
                sha.update(np.ascontiguousarray(data).tobytes())
        return sha.hexdigest()


# ----------------------------------------------------------------------------- join
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
            _check_schema(shard, f.attrs)
            infos.append({k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()})
            counts.append(int(f["samples/status"].shape[0]))
    if not infos:
        raise ValueError("join_stores got no shards")
    first = infos[0]
    base_layout = StoreLayout.from_dict(json.loads(first["layout"]))
    for shard, info in zip(shards[1:], infos[1:], strict=True):
        for key in _IDENTITY_ATTRS:
            a, b = first.get(key), info.get(key)
            if key == "layout":
                a = _dumps(StoreLayout.from_dict(json.loads(a)).with_samples(0).to_dict())
                b = _dumps(StoreLayout.from_dict(json.loads(b)).with_samples(0).to_dict())
            if key == "run":  # the shard's own rank and range may differ
                a, b = (_dumps({k: v for k, v in json.loads(x).items() if k != "shard"}) for x in (a, b))
            if str(a) != str(b):
                raise StoreError(f"cannot join {shards[0]} and {shard}: " + _describe_difference(key, a, b))
    total = sum(counts)
    layout = base_layout.with_samples(total)
    tmp = out.with_name(out.name + ".tmp")
    rel = [os.path.relpath(Path(s).resolve(), out.resolve().parent) for s in shards]
    with h5py.File(shards[0], "r") as f0, h5py.File(tmp, "w") as f:
        for key, value in f0.attrs.items():
            f.attrs[key] = value
        f.attrs["layout"] = _dumps(layout.to_dict())
        run = json.loads(first.get("run", "{}"))
        run.pop("shard", None)
        f.attrs["run"] = _dumps(run)
        ranges, start = [], 0
        for path, n in zip(rel, counts, strict=True):
            ranges.append({"path": path, "start": start, "stop": start + n})
            start += n
        f.attrs["shards"] = _dumps(ranges)
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
    _fsync_dir(out.parent)
    return out
