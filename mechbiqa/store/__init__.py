"""The activation store: one self-describing HDF5 file of cached activations, written crash-safely.

Where it sits (DESIGN.md, "The data path"): the recording drivers
(`mechbiqa.store.record`: `record_dataset`, `record_prompts`) run the model with
the recorder's hooks (`mechbiqa_hooks.record.Recorder`) and hand the writer one
batch of rows at a time (`StoreWriter.write`); the studies open the finished
file without the model (`ActivationStore.open`) and read arrays by hook, layer,
role selection and sample. `mechbiqa_hooks.cache` turns one sample back into a
TransformerLens `ActivationCache`. `studies/cache_activations.py` is the
command line.

The package, one file per concern (at run time a file imports only those above
it; `identity`, `plan`, `batches`, `record` and `shards` run the model, the
rest read and write files without it, and this module re-exports their public
names)::

    errors    StoreError and its kinds
    spec      Site, CacheSpec, PRESETS: what to cache
    layout    StoreLayout, ArraySpec, BatchRows, SampleInfo: every shape, fixed at creation
    writer    StoreWriter: create, resume, reopen failed rows, write batches, finish
    reader    ActivationStore: read without the model
    join      join_stores: one virtual store over the shards of a torchrun run
    identity  model_identity, tokenizer_identity: what a store was recorded from
    plan      plan_layout: a CacheSpec resolved against a model and prompts
    batches   one batch: load images, run the recorded forward, fill the rows
    record    record_dataset, record_prompts: the recording loops (plan, open, record)
    shards    record_sharded: torchrun ranks agree, record one shard each, rank 0 joins

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
the stored model identity, config, tokenizer, prompt, spec, run settings and
sample list, and its rows must fit the stored layout, else
`StoreMismatchError` names what differs. Failed rows (an unreadable image)
are retried by a later run once they can succeed (`StoreWriter.reopen`).
`join_stores` joins stores written in parallel (one per torchrun rank) into
one file of HDF5 virtual datasets.
"""

from __future__ import annotations

from mechbiqa.store.errors import (
    SchemaVersionError,
    StoreError,
    StoreKeyError,
    StoreLockedError,
    StoreMismatchError,
)
from mechbiqa.store.join import join_stores, shard_difference
from mechbiqa.store.layout import (
    ERROR_BYTES,
    SCHEMA_VERSION,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    ArraySpec,
    BatchRows,
    SampleInfo,
    StoreLayout,
    encode_text,
    partial_path,
)
from mechbiqa.store.reader import ActivationStore, ErrorRow, SampleSelector, StoreInfo
from mechbiqa.store.spec import PRESETS, SELECTIONS, CacheSpec, Site, is_image_space, split_layer
from mechbiqa.store.writer import StoreWriter, check_resumable

__all__ = [
    "ERROR_BYTES",
    "PRESETS",
    "SCHEMA_VERSION",
    "SELECTIONS",
    "STATUS_FAILED",
    "STATUS_OK",
    "STATUS_PENDING",
    "ActivationStore",
    "ArraySpec",
    "BatchRows",
    "CacheSpec",
    "ErrorRow",
    "SampleInfo",
    "SampleSelector",
    "SchemaVersionError",
    "Site",
    "StoreError",
    "StoreInfo",
    "StoreKeyError",
    "StoreLayout",
    "StoreLockedError",
    "StoreMismatchError",
    "StoreWriter",
    "check_resumable",
    "encode_text",
    "is_image_space",
    "join_stores",
    "partial_path",
    "shard_difference",
    "split_layer",
]
