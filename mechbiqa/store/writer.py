"""`StoreWriter`: creates a store in full, then writes it batch by batch with raw ``pwrite``s.

Where it sits: the recording drivers (`mechbiqa.store.record`) open one writer per
store (one per torchrun rank, `mechbiqa.store.shards`) and hand it one `BatchRows`
per batch. How a kill at any moment leaves a resumable file is the list in
`mechbiqa.store` ("Crash safety"); the comments below point at its steps.

Retrying failed rows (`StoreWriter.reopen`): a sample whose image could not be read
is committed as failed (status 2, with its reason). Once the image is fixed, a run
reopens those rows: the store goes back to ``<store>.partial`` (a rename, so the
final name never holds pending rows), the rows' status returns to pending, and the
run records them like any pending row. When a row's sample description changes too
(a rated store: the image now has a description and a prompt), the new strings are
written into a copy of the file, which then replaces ``.partial`` in one rename.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np

from mechbiqa.store.errors import StoreError, StoreLockedError, StoreMismatchError
from mechbiqa.store.layout import (
    IDENTITY_ATTRS,
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_PENDING,
    BatchRows,
    SampleInfo,
    StoreLayout,
    check_schema,
    describe_difference,
    dumps,
    package_version,
    partial_path,
)

__all__ = ["StoreWriter", "attribute_problems", "check_resumable", "fsync_dir", "git_sha"]


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


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse a directory fsync)."""
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
            layout: Every shape (`mechbiqa.store.plan.plan_layout` makes it). An existing store
                whose layout covers it (`StoreLayout.covers`: per-sample prompts that need less
                room than the store has) is resumed with its own layout.
            attrs: JSON-ready run description; the keys of `IDENTITY_ATTRS` that are
                present must match on resume (model_config, model_identity, tokenizer,
                prompt, run, cache_spec; layout and schema_version are added here).
            samples: One `SampleInfo` per row, in order.
            overwrite: Delete an existing store (finished or not) and start again.
            fsync: ``fdatasync`` before and after each commit (survives power loss,
                not only a killed process; slower on real disks).

        Returns:
            The writer; `complete` is already True when the store was finished before. Its
            `layout` is the store's: on resume it may be wider than ``layout`` (which must fit).

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
                "layout": dumps(layout.to_dict()),
            }
            partial = partial_path(path)
            tmp = partial.with_name(partial.name + ".tmp")
            if overwrite:
                for p in (path, partial, tmp):
                    p.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)  # a creation (or a reopen) that was killed half-way
            if path.exists():  # a reopen killed between its two renames: the finished file is the store
                partial.unlink(missing_ok=True)
            existing = path if path.exists() else partial if partial.exists() else None
            if existing is None:
                cls._create(tmp, layout, full_attrs, samples)
                os.replace(tmp, partial)
                fsync_dir(partial.parent)
                existing = partial
            layout, status, offsets, stored = cls._check_existing(existing, full_attrs, samples, layout)
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
            f.attrs["mechbiqa_version"] = package_version()
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
                data=np.array([dumps(dict(s.record)) for s in samples], dtype=object),
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
                ds.attrs["dims"] = dumps(["layer", "sample", *spec.dims])
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())

    @staticmethod
    def _check_existing(
        path: Path, attrs: Mapping[str, Any], samples: Sequence[SampleInfo], layout: StoreLayout
    ) -> tuple[StoreLayout, np.ndarray, dict[str, int], dict[str, Any]]:
        try:
            f = h5py.File(path, "r")
        except OSError as error:
            raise StoreError(
                f"cannot open {path} to resume it ({error}); delete it (or pass overwrite) to start again"
            ) from None
        with f:
            check_schema(path, f.attrs)
            stored = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
            problems = attribute_problems(stored, attrs, layout)
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
            # a resumed run may need less room than the store has (per-sample prompts): keep the store's
            layout = StoreLayout.from_dict(json.loads(stored["layout"]))
            offsets = {}
            for name in layout.row_datasets():
                offsets[name] = f[name].id.get_offset()
            for spec in layout.arrays:
                offsets[f"acts/{spec.key}"] = f[f"acts/{spec.key}"].id.get_offset()
            status = f["samples/status"][:].astype(np.int8)
        if any(v is None for v in offsets.values()):
            raise StoreError(
                f"{path} has datasets without a fixed offset (not written by StoreWriter); delete it"
            )
        return layout, status, offsets, stored

    # ----------------------------------------------------------------- state
    @property
    def complete(self) -> bool:
        """Whether every sample is recorded (the store may still be ``.partial`` until `finish`)."""
        return bool((self.status != STATUS_PENDING).all())

    @property
    def file(self) -> Path:
        """The file on disk: ``<store>.partial`` while rows are pending, the store itself once finished."""
        return self.path if self.path.exists() else partial_path(self.path)

    @property
    def failed(self) -> np.ndarray:
        """Rows committed as failed (their reason is in ``samples/error``)."""
        return np.flatnonzero(self.status == STATUS_FAILED)

    @property
    def pending(self) -> np.ndarray:
        """Rows not recorded yet."""
        return np.flatnonzero(self.status == STATUS_PENDING)

    @property
    def first_pending(self) -> int:
        """The first sample not yet recorded (``n_samples`` when none)."""
        pending = np.flatnonzero(self.status == STATUS_PENDING)
        return int(pending[0]) if len(pending) else self.layout.n_samples

    # ----------------------------------------------------------------- retry
    def reopen(self, rows: Sequence[int], samples: Sequence[SampleInfo]) -> None:
        """Turn failed rows back into pending ones, so that this run records them again.

        A finished store first goes back to ``<store>.partial`` (one rename): the final name
        never holds pending rows. Rows whose `SampleInfo` changed (e.g. a rated store, whose
        failed image now has a description and a prompt) get their new strings in a copy of the
        file that replaces ``.partial`` in one rename; otherwise only status bytes are written.
        A kill at any moment leaves either the old file or the reopened one.

        Args:
            rows: Failed rows to retry (others are refused).
            samples: One `SampleInfo` per row of the store (the run's, as given to `open`).

        Raises:
            ValueError: A row is not a failed one.
        """
        rows = sorted({int(i) for i in rows})
        if not rows:
            return
        not_failed = [i for i in rows if self.status[i] != STATUS_FAILED]
        if not_failed:
            raise ValueError(
                f"rows {not_failed[:5]} of {self.path} are not failed ones; only failed rows reopen"
            )
        partial = partial_path(self.path)
        current = self.path if self.path.exists() else partial
        changed = self._changed_infos(current, rows, samples)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if changed:
            tmp = partial.with_name(partial.name + ".tmp")
            shutil.copyfile(current, tmp)
            with h5py.File(tmp, "r+") as f:  # a copy: a kill here leaves the store as it was
                for i in changed:
                    s = samples[i]
                    f["samples/image_path"][i] = str(s.image_path)
                    f["samples/prompt"][i] = s.prompt
                    f["samples/record"][i] = dumps(dict(s.record))
                    f["samples/label"][i] = math.nan if s.label is None else float(s.label)
                status = f["samples/status"]
                for i in rows:
                    status[i] = STATUS_PENDING
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, partial)
            if current == self.path:
                self.path.unlink()
            fsync_dir(partial.parent)
        else:
            if current == self.path:
                os.replace(self.path, partial)  # the final name never holds pending rows
                fsync_dir(partial.parent)
            fd = os.open(partial, os.O_WRONLY)
            try:
                for i in rows:
                    _pwrite_all(
                        fd, np.array([STATUS_PENDING], dtype=np.int8), self._offsets["samples/status"] + i
                    )
                if self._fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        self.status[rows] = STATUS_PENDING
        self._fd = os.open(partial, os.O_WRONLY)

    @staticmethod
    def _changed_infos(path: Path, rows: Sequence[int], samples: Sequence[SampleInfo]) -> list[int]:
        """The rows whose stored image path, prompt, record or label differ from ``samples``."""
        changed = []
        with h5py.File(path, "r") as f:
            for i in rows:
                s = samples[i]
                stored_label = float(f["samples/label"][i])
                label = math.nan if s.label is None else float(s.label)
                same = (
                    _text(f["samples/image_path"][i]) == str(s.image_path)
                    and _text(f["samples/prompt"][i]) == s.prompt
                    and _text(f["samples/record"][i]) == dumps(dict(s.record))
                    and (stored_label == label or (math.isnan(stored_label) and math.isnan(label)))
                )
                if not same:
                    changed.append(i)
        return changed

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
            fsync_dir(self.path.parent)
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


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def attribute_problems(
    stored: Mapping[str, Any], attrs: Mapping[str, Any], layout: StoreLayout | None
) -> list[str]:
    """What differs between a store's attributes and a run's (`IDENTITY_ATTRS`), one phrase each.

    ``layout`` (the run's planned layout, or None to skip it) must fit in the stored one.
    """
    problems = []
    for key in IDENTITY_ATTRS:
        if key in ("schema_version", "layout") or key not in attrs:
            continue
        value = stored.get(key)
        if str(value) != str(attrs[key]):
            problems.append(describe_difference(key, value, attrs[key]))
    if layout is not None and "layout" in stored:
        have = StoreLayout.from_dict(json.loads(stored["layout"]))
        if not have.covers(layout.with_samples(have.n_samples)):
            problems.append(describe_difference("layout", stored["layout"], dumps(layout.to_dict())))
    return problems


def check_resumable(
    path: str | Path,
    attrs: Mapping[str, Any],
    layout: StoreLayout | None = None,
    ids: Sequence[str] | None = None,
) -> None:
    """Refuse, before any work, a run that could not resume the store at ``path`` (if there is one).

    Compares `IDENTITY_ATTRS` (the layout only when given) and the sample ids (when given)
    with the finished store or its ``.partial`` file; nothing is opened for writing.

    Raises:
        StoreMismatchError: Each difference named, with the fix.
        SchemaVersionError: The store has another schema version.
    """
    path = Path(path)
    existing = path if path.exists() else partial_path(path) if partial_path(path).exists() else None
    if existing is None:
        return
    try:
        f = h5py.File(existing, "r")
    except OSError as error:
        raise StoreError(
            f"cannot open {existing} to resume it ({error}); delete it (or pass overwrite) to start again"
        ) from None
    with f:
        check_schema(existing, f.attrs)
        stored = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        stored_ids = [_text(x) for x in f["samples/id"][:]] if ids is not None else None
    problems = attribute_problems(stored, attrs, layout)
    if ids is not None and stored_ids != list(ids):
        problems.append(f"sample list differs ({len(stored_ids or [])} stored, {len(ids)} now)")
    if problems:
        raise StoreMismatchError(
            f"{existing} was recorded with another setup, so this run cannot append to it: "
            + "; ".join(problems)
            + ". Write to another path, or pass overwrite to replace it."
        )
