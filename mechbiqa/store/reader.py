"""`ActivationStore`: read a store without the model, by hook, layer, selection and sample.

Where it sits: the offline studies (logit lens, attention attribution, probes) open a
store written by `mechbiqa.store.writer.StoreWriter` (or a joined one,
`mechbiqa.store.join.join_stores`) and read arrays; `mechbiqa_hooks.cache` turns one
sample back into a TransformerLens ``ActivationCache``. A reader that also holds a
model checks it is the one the store was recorded from (`ActivationStore.check_identity`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mechbiqa.model.roles import TokenRoles
from mechbiqa.store.errors import StoreError, StoreKeyError, StoreMismatchError
from mechbiqa.store.layout import (
    STATUS_FAILED,
    STATUS_OK,
    ArraySpec,
    StoreLayout,
    check_schema,
    partial_path,
)
from mechbiqa.store.spec import CacheSpec, split_layer
from mechbiqa_hooks import names

__all__ = ["ActivationStore", "ErrorRow", "SampleSelector", "StoreInfo"]

VOLATILE_ATTRS = ("created_utc", "git_sha")
"""Provenance that differs between otherwise equal runs (left out of `ActivationStore.digest`)."""


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
        model: Where the model came from (a checkpoint directory, ``tiny-random(seed=N)``, "").
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
    model: str = ""

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
            model=text("model"),
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
        check_schema(path, file.attrs)
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
            raise StoreKeyError(f"no sample {sample_id!r} in {self.path}") from None

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
            raise StoreKeyError(
                f"selection {select!r} is not in this store; stored: {sorted(self.layout.capacity)}"
            )
        return self.layout.capacity[select]

    # ------------------------------------------------------------ activations
    def spec_of(self, hook: str | Callable[[Any], str], select: str = "quality") -> ArraySpec:
        """The `ArraySpec` of a hook (name, template or name builder) and selection."""
        template, _ = split_layer(hook(names.EACH) if callable(hook) else hook)
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
        name = hook(names.EACH) if callable(hook) else hook
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
                raise StoreKeyError(
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

    def check_identity(self, model_identity: Mapping[str, Any], model: str = "") -> None:
        """Refuse to analyse a store with another model than the one it was recorded from.

        Compares the keys both identities hold (`mechbiqa.store.identity.model_identity`: the
        weight fingerprint, dtype, parameter count, read-out fingerprint).

        Args:
            model_identity: The given model's identity.
            model: Where the given model came from (named in the message).

        Raises:
            StoreMismatchError: One line naming the store, both models and the fix.
        """
        stored = self.info.model_identity
        keys = sorted(k for k in set(stored) & set(model_identity) if stored[k] != model_identity[k])
        if keys:
            given = f"{model} " if model else ""
            raise StoreMismatchError(
                f"{self.path} was recorded from model {self.info.model or '?'} (fingerprint "
                f"{stored.get('fingerprint', '?')}), not from the given model {given}(fingerprint "
                f"{model_identity.get('fingerprint', '?')}; {', '.join(keys)} differ): analyse it with the "
                "model it was recorded from, or record it again with this one "
                "(studies/cache_activations.py --overwrite)"
            )

    def digest(self) -> str:
        """SHA-256 of every dataset and attribute but creation time and commit for equality checks."""
        sha = hashlib.sha256()
        for key in sorted(self._file.attrs):
            if key not in VOLATILE_ATTRS and key != "shards":
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
