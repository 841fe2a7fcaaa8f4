"""The recording loops: run a model batch by batch with a `Recorder` and write each batch into a store.

Where it sits: `mechbiqa.model.MPLUGOwl2` runs; `mechbiqa_hooks.record.Recorder`
keeps the selected rows of each hook; this module plans the store
(`mechbiqa.store.plan.plan_layout`), opens it (`mechbiqa.store.writer.StoreWriter`:
create, resume, retry failed rows) and writes one `BatchRows` per batch, so
memory stays flat in the number of samples. `studies/cache_activations.py` is
the command line; `mechbiqa.store.shards.record_sharded` runs the same plans on
every torchrun rank; `mechbiqa.analysis.capture.record_rater` records a rater's
own prompts through `record_prompts`.

Two loops, each in two steps (`plan_dataset` / `plan_prompts` return a
`RecordPlan`; `RecordPlan.open` checks the store accepts it, `RecordPlan.record`
does the work), and `record_dataset` / `record_prompts` doing both:

* `plan_dataset`: every sample is asked one shared prompt.

  - ``score``: one prompted forward per batch on a prompt that ends right before
    the level word (Q-Align's scorer prompt by default); the quality position is
    the last prompt token.
  - ``generate``: the model writes its answer with the KV cache (no hooks: the
    decode steps are not recorded), the quality position is found in the answer
    (`mechbiqa.model.prompts.find_quality_index`: the position before the last
    level word), then prompt + whole answer run once more, as one teacher-forced
    forward, with recording on. Research choice: the second forward costs one
    prefill per batch but gives every position of the answer (description,
    quality) from a single pass, identical in maths to what decoding computed;
    recording inside the decode loop would need the quality position before it
    is known.

* `plan_prompts`: samples that each carry their own scoring prompt
  (`PromptedSample`): prompts of any length, with one image or none (the
  text-only stage-2 prompt of a two-stage pair records zero image tokens), and
  their own token roles (e.g. `mechbiqa.pipeline.Rating.roles`, where the
  description in a stage-2 user turn has the ``description`` role). The store's
  shapes are planned from the longest prompt and the largest count of each role
  over all samples; a resumed run checks the rows it keeps hold the same prompts.

Batches are a fixed partition of the sample list (``batch_size`` rows each), so
a resumed or retried batch is computed exactly as in an uninterrupted run; what
one batch does is `mechbiqa.store.batches`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from torch import Tensor

from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.processor import ImageLoadError, ImageProcessor
from mechbiqa.model.prompts import (
    LEVEL_WORDS,
    QALIGN_ANSWER_PREFIX,
    QALIGN_QUESTION,
    EncodedPrompt,
    encode_prompt,
    get_template,
)
from mechbiqa.model.roles import TokenRoles, assign_roles
from mechbiqa.model.tokenizer import Tokenizer
from mechbiqa.store.batches import iter_batches, record_prompt_batch, record_shared_batch, spliced_ids
from mechbiqa.store.errors import StoreMismatchError
from mechbiqa.store.identity import store_attrs
from mechbiqa.store.layout import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_PENDING,
    BatchRows,
    SampleInfo,
    StoreLayout,
)
from mechbiqa.store.plan import plan_layout
from mechbiqa.store.spec import CacheSpec
from mechbiqa.store.writer import StoreWriter
from mechbiqa_hooks.record import Recorder

__all__ = [
    "PromptConfig",
    "PromptedSample",
    "RecordPlan",
    "RecordResult",
    "RetryPolicy",
    "RunConfig",
    "SampleSource",
    "iter_batches",
    "plan_dataset",
    "plan_prompts",
    "prompts_attrs",
    "prompted_roles",
    "record_dataset",
    "record_prompts",
]

RetryPolicy = Literal["auto"] | bool
"""Which failed rows of an existing store a run records again: ``"auto"`` those that would now
succeed (their image loads, their sample has a prompt), True all, False none."""


@dataclass(frozen=True, slots=True)
class PromptConfig:
    r"""The prompt every sample is asked (`mechbiqa.model.prompts.encode_prompt`).

    The default renders Q-Align's scorer prompt exactly
    (``"USER: How would you rate the quality of this image?\n<|image|>\nASSISTANT:
    The quality of the image is"``, one line).

    Attributes:
        template: A conversation template name (``qalign_scorer``, ``mplug_owl2``, ``v1`` ...).
        question: The user's question, without image tag.
        image_first: Put the image before the question (Q-Instruct) or after it (Q-Align).
        image_sep: Text between image tag and question.
        answer_prefix: In ``score`` mode, the answer text that leads to the level word
            (ignored when generating: the model writes the whole answer).
    """

    template: str = "qalign_scorer"
    question: str = QALIGN_QUESTION
    image_first: bool = False
    image_sep: str = "\n"
    answer_prefix: str = QALIGN_ANSWER_PREFIX

    def encode(self, tokenizer: Tokenizer, mode: Literal["score", "generate"]) -> EncodedPrompt:
        """Tokenize for a mode (``generate`` leaves the answer open)."""
        score = mode == "score"
        return encode_prompt(
            tokenizer,
            get_template(self.template),
            self.question,
            image_first=self.image_first,
            image_sep=self.image_sep,
            answer_prefix=self.answer_prefix if score else "",
            scores_quality=score,
        )


@dataclass(frozen=True, slots=True)
class RunConfig:
    """How a recording run proceeds. All of it must match when a run is resumed.

    Attributes:
        mode: ``"score"`` (one prompted forward) or ``"generate"`` (answer, then a recorded forward).
        batch_size: Samples per batch (also the commit unit of the store).
        max_new_tokens: Longest generated answer (``generate``).
        do_sample: Sample instead of greedy decoding (``generate``).
        temperature: Sampling temperature.
        top_k: Keep the k most likely tokens when sampling.
        top_p: Nucleus sampling threshold.
        seed: Seeds each batch's sampler from (seed, first sample of the batch), so a
            resumed run draws exactly what an uninterrupted one would.
    """

    mode: Literal["score", "generate"] = "score"
    batch_size: int = 8
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("score", "generate"):
            raise ValueError(f"RunConfig mode must be 'score' or 'generate'; got {self.mode!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1; got {self.batch_size}, {self.max_new_tokens}"
            )


@dataclass(frozen=True, slots=True)
class SampleSource:
    """One image to record (an `IQARecord` works too: anything with ``id`` and ``image_path``).

    Attributes:
        id: Unique id.
        image_path: The image file.
        label: The 0-1 rating, or None.
        record: Extra fields stored as JSON with the sample.
    """

    id: str
    image_path: str | Path
    label: float | None = None
    record: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PromptedSample:
    """One sample with its own prompt (`record_prompts`).

    Attributes:
        id: Unique id.
        prompt: The text-space prompt, with one image placeholder or none; for a scoring prompt
            ``prompt.quality_index`` is its last id (the position whose logits choose the level word).
        image_path: The image. Loaded only when the prompt has a placeholder; for a text-only
            prompt it is provenance (the image a stage-1 model described), or None.
        roles: Spliced token roles of the prompt; None: `assign_roles` from ``prompt``'s indices.
        label: The 0-1 rating, or None.
        record: Extra fields stored as JSON with the sample (the rating, the description ...).
        answer: Generated text kept in ``samples/answer`` (e.g. the description).
        error: Why the sample has no prompt (e.g. its image could not be read to rate it): it is
            stored as a failed sample with this reason (``ActivationStore.errors``); ``prompt`` is None.
    """

    id: str
    prompt: EncodedPrompt | None
    image_path: str | Path | None = None
    roles: TokenRoles | None = None
    label: float | None = None
    record: Mapping[str, Any] | None = None
    answer: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        """A sample has a prompt, or an error saying why not."""
        if (self.prompt is None) == (not self.error):
            raise ValueError(
                f"PromptedSample {self.id!r}: give a prompt, or prompt=None with the error that explains why"
            )


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What a run did.

    Attributes:
        path: The finished store.
        n_samples: Rows in the store.
        n_recorded: Samples recorded by this call (0 when the store was already complete).
        n_failed: Failed samples in the store (see `ActivationStore.errors`).
        resumed_from: The first sample this call recorded (0 for a fresh run).
        seconds: Wall time of this call.
    """

    path: Path
    n_samples: int
    n_recorded: int
    n_failed: int
    resumed_from: int
    seconds: float


def _sample_info(source: Any, prompt_text: str) -> SampleInfo:
    record: dict[str, Any] = {}
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        record = to_dict()
    elif getattr(source, "record", None):
        record = dict(source.record)
    label = getattr(source, "label", None)
    if label is None:
        label = getattr(source, "mos01", None)
    return SampleInfo(
        id=str(source.id),
        image_path=str(source.image_path),
        prompt=prompt_text,
        label=None if label is None else float(label),
        record=record,
    )


# ----------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RecordPlan:
    """A recording run, planned (every shape fixed) but not started.

    `open` checks that the store at ``path`` accepts it (creating it, or resuming or
    reopening an existing one) before any forward runs; `record` then records every
    pending batch. `mechbiqa.store.shards.record_sharded` widens the plans of all ranks to
    one layout (`widen`) between the two.

    Attributes:
        model: The model that runs.
        path: The store file.
        layout: Every shape (the store's own once `open` resumed a wider one).
        attrs: The store's provenance attributes (`mechbiqa.store.identity.store_attrs`).
        infos: One `SampleInfo` per row.
        batch_size: Samples per batch (the commit unit; batches are a fixed partition).
        record_batch: ``(recorder, layout, start, stop) -> BatchRows``: records one batch.
        retryable: ``row -> bool``: whether a failed row would now succeed (``"auto"`` retry).
        check_rows: ``(path, rows) -> None``: raises `StoreMismatchError` when the committed
            rows of an existing store hold other prompts than this run's (per-sample prompts).
    """

    model: MPLUGOwl2
    path: Path
    layout: StoreLayout
    attrs: dict[str, str]
    infos: list[SampleInfo]
    batch_size: int
    record_batch: Callable[[Recorder, StoreLayout, int, int], BatchRows]
    retryable: Callable[[int], bool]
    check_rows: Callable[[Path, np.ndarray], None] | None = None

    def widen(self, layout: StoreLayout) -> RecordPlan:
        """This plan with room for ``layout``'s rows too (`StoreLayout.union`; the sample count stays)."""
        return replace(self, layout=self.layout.union(layout.with_samples(self.layout.n_samples)))

    def open(
        self, *, overwrite: bool = False, fsync: bool = False, retry_failed: RetryPolicy = "auto"
    ) -> StoreWriter:
        """Create the store, or resume it, and reopen the failed rows that are to be retried.

        Args:
            overwrite: Delete an existing store and start again.
            fsync: Flush each batch to disk before committing it.
            retry_failed: Which failed rows to record again (`RetryPolicy`).

        Returns:
            The open writer (holding the store's lock); pass it to `record`, or close it.

        Raises:
            mechbiqa.store.StoreLockedError: Another process writes the store.
            mechbiqa.store.StoreMismatchError: The existing store was recorded differently.
        """
        writer = StoreWriter.open(
            self.path, self.layout, self.attrs, self.infos, overwrite=overwrite, fsync=fsync
        )
        try:
            _warn_environment(writer, self.attrs, self.path)
            if self.check_rows is not None and (writer.status == STATUS_OK).any():
                self.check_rows(writer.file, np.flatnonzero(writer.status == STATUS_OK))
            failed = writer.failed
            if retry_failed == "auto":
                failed = [int(i) for i in failed if self.retryable(int(i))]
            elif not retry_failed:
                failed = []
            writer.reopen(failed, self.infos)
        except BaseException:
            writer.close()
            raise
        return writer

    def record(self, writer: StoreWriter, progress: Callable[[int, int], None] | None = None) -> RecordResult:
        """Record every batch that holds a pending row, then finish the store.

        Args:
            writer: From `open` (closed when this returns or raises).
            progress: Called with ``(samples done, total)`` after each batch.
        """
        began = time.perf_counter()
        n = len(self.infos)
        try:
            pending = writer.pending
            batches = [
                (lo, hi)
                for lo, hi in iter_batches(n, self.batch_size)
                if (writer.status[lo:hi] == STATUS_PENDING).any()
            ]
            resumed_from = int(pending[0]) if len(pending) else n
            if progress is not None:
                progress(n - len(pending), n)
            recorder = Recorder(self.model, writer.layout)
            recorded, done = 0, n - len(pending)
            with recorder.attached():
                for lo, hi in batches:
                    todo = writer.status[lo:hi] == STATUS_PENDING
                    for part in _pending_parts(self.record_batch(recorder, writer.layout, lo, hi), todo):
                        writer.write(part)
                    recorded += int(todo.sum())
                    done += int(todo.sum())
                    if progress is not None:
                        progress(done, n)
            failed = int((writer.status == STATUS_FAILED).sum())
            final = writer.finish()
        finally:
            writer.close()
        return RecordResult(Path(final), n, recorded, failed, resumed_from, time.perf_counter() - began)

    def run(
        self,
        *,
        overwrite: bool = False,
        fsync: bool = False,
        retry_failed: RetryPolicy = "auto",
        progress: Callable[[int, int], None] | None = None,
    ) -> RecordResult:
        """`open`, then `record`."""
        return self.record(self.open(overwrite=overwrite, fsync=fsync, retry_failed=retry_failed), progress)


def _pending_parts(batch: BatchRows, todo: np.ndarray) -> Iterable[BatchRows]:
    """The contiguous runs of ``todo`` rows of a batch (all of it, unless failed rows are retried)."""
    if todo.all():
        yield batch
        return
    rows = np.flatnonzero(todo)
    for run in np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1):
        lo, hi = int(run[0]), int(run[-1]) + 1
        yield BatchRows(
            start=batch.start + lo,
            status=batch.status[lo:hi],
            rows={k: v[lo:hi] for k, v in batch.rows.items()},
            acts={k: v[:, lo:hi] for k, v in batch.acts.items()},
        )


# ----------------------------------------------------------------------------- one shared prompt
def plan_dataset(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    samples: Sequence[Any],
    spec: CacheSpec,
    path: str | Path,
    *,
    prompt: PromptConfig = PromptConfig(),
    run: RunConfig = RunConfig(),
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
) -> RecordPlan:
    """Plan the recording of a data set under one shared prompt (nothing runs yet).

    Args:
        model: The model (eval mode, on its device and dtype).
        tokenizer: Its tokenizer.
        processor: Its image processor.
        samples: `IQARecord`s or `SampleSource`s (``id``, ``image_path``, optionally a label).
        spec: What to cache.
        path: The store file (``cache/<name>.h5``); ``<path>.partial`` while unfinished.
        prompt: The prompt.
        run: Mode, batch size, sampling.
        model_name: Where the model came from (stored, not compared on resume).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        load_image: ``sample -> [3, S, S]`` pixels, instead of ``processor.preprocess(sample.image_path)``
            (images already in memory; benchmarks). It may raise `ImageLoadError` for a bad sample.

    Raises:
        ValueError: The prompt does not hold exactly one image, or the spec names an unknown hook.
    """
    encoded = prompt.encode(tokenizer, run.mode)
    if encoded.n_images != 1:
        raise ValueError(f"the recorder expects one image per prompt; the prompt has {encoded.n_images}")
    prompt_roles = assign_roles(
        encoded.ids,
        response_start=encoded.response_start,
        quality_index=encoded.quality_index,
        n_image_tokens=model.cfg.n_image_tokens,
        bos_id=tokenizer.bos_id,
    )
    layout = plan_layout(model, spec, prompt_roles, len(samples), run)
    run_dict = asdict(run) | ({"shard": dict(shard)} if shard else {})
    shared = {"text": encoded.text, "ids": list(encoded.ids), "image_processor": asdict(processor)}
    attrs = store_attrs(model, tokenizer, model_name, spec, run_dict, asdict(prompt) | shared)
    infos = [_sample_info(s, encoded.text) for s in samples]
    load = load_image or (lambda sample: torch.from_numpy(processor.preprocess(Path(sample.image_path))))
    level_ids = [tokenizer.word_id(w) for w in LEVEL_WORDS]
    role_cache: dict[tuple[int, ...], tuple[TokenRoles, np.ndarray]] = {}
    offset = int(shard["start"]) if shard else 0

    def record_batch(recorder: Recorder, layout: StoreLayout, start: int, stop: int) -> BatchRows:
        chunk = samples[start:stop]
        return record_shared_batch(
            model,
            tokenizer,
            load,
            recorder,
            chunk,
            start,
            encoded,
            run,
            level_ids,
            layout,
            role_cache,
            offset,
        )

    def retryable(row: int) -> bool:
        return _loads(load, samples[row])

    return RecordPlan(model, Path(path), layout, attrs, infos, run.batch_size, record_batch, retryable)


def record_dataset(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor,
    samples: Sequence[Any],
    spec: CacheSpec,
    path: str | Path,
    *,
    prompt: PromptConfig = PromptConfig(),
    run: RunConfig = RunConfig(),
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
    retry_failed: RetryPolicy = "auto",
) -> RecordResult:
    """Record a data set into a store; resume it if it was interrupted; retry rows that failed.

    Args:
        model: The model (eval mode, on its device and dtype).
        tokenizer: Its tokenizer.
        processor: Its image processor.
        samples: `IQARecord`s or `SampleSource`s (``id``, ``image_path``, optionally a label).
        spec: What to cache.
        path: The store file (``cache/<name>.h5``); ``<path>.partial`` while unfinished.
        prompt: The prompt.
        run: Mode, batch size, sampling.
        model_name: Where the model came from (stored, not compared on resume).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        load_image: ``sample -> [3, S, S]`` pixels instead of ``processor.preprocess(sample.image_path)``.
        overwrite: Start again even if a store exists.
        fsync: Flush each batch to disk before committing it (power-loss safety).
        progress: Called with ``(samples done, total)`` after each batch.
        retry_failed: Which failed rows of an existing store to record again (default: those whose
            image now loads; `RetryPolicy`).

    Returns:
        A `RecordResult`.

    Raises:
        mechbiqa.store.StoreLockedError: Another process writes the store.
        mechbiqa.store.StoreMismatchError: The existing store was recorded differently.
    """
    plan = plan_dataset(model, tokenizer, processor, samples, spec, path, prompt=prompt, run=run,
                        model_name=model_name, shard=shard, load_image=load_image)  # fmt: skip
    return plan.run(overwrite=overwrite, fsync=fsync, retry_failed=retry_failed, progress=progress)


# ----------------------------------------------------------------------------- a prompt per sample
def plan_prompts(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor | None,
    samples: Sequence[PromptedSample],
    spec: CacheSpec,
    path: str | Path,
    *,
    batch_size: int = 8,
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
) -> RecordPlan:
    """Plan the recording of samples that each carry their own prompt (nothing runs yet).

    One teacher-forced forward per batch over the given prompts (nothing is generated): a
    one-stage model's scoring prompt (image, its own description, "The quality of the image
    is"), or a two-stage pair's text-only stage-2 prompt (zero image tokens; the image-side
    arrays of such a sample are zero and ``samples/n_images`` is 0). Batches may mix both.

    Args:
        model: The model whose prompts these are.
        tokenizer: Its tokenizer (pad id, identity).
        processor: Its image processor; None when no prompt holds an image (or with ``load_image``).
        samples: One `PromptedSample` per row.
        spec: What to cache (positions by role: ``quality`` is each prompt's own quality position).
        path: The store file.
        batch_size: Samples per batch (the commit unit).
        model_name: Where the model came from (a checkpoint directory: studies read the lens from it).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        load_image: ``sample -> [3, S, S]`` pixels instead of ``processor.preprocess(sample.image_path)``.

    Raises:
        ValueError: No sample at all, a prompt with several images, roles that do not fit their
            prompt, or an image prompt without an image to load (each named by sample id).
    """
    if not samples:
        raise ValueError("record_prompts got no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    roles = [prompted_roles(s, model.cfg.n_image_tokens, tokenizer.bos_id) for s in samples]
    known = [r for r in roles if r is not None]
    if not known:
        raise ValueError(f"none of the {len(samples)} samples has a prompt; first error: {samples[0].error}")
    with_image = [s for s in samples if s.prompt is not None and s.prompt.n_images]
    if with_image and load_image is None:
        if processor is None:
            raise ValueError(
                f"sample {with_image[0].id!r} has an image in its prompt, but no processor "
                "(or load_image) was given"
            )
        lost = [s.id for s in with_image if s.image_path is None]
        if lost:
            raise ValueError(f"samples {lost[:5]} have an image in their prompt but no image_path")
    run = RunConfig(mode="score", batch_size=batch_size)
    layout = plan_layout(model, spec, known, len(samples), run)
    answer_bytes = max([len(s.answer.encode("utf-8")) for s in samples] + [1])
    layout = replace(layout, answer_bytes=answer_bytes)
    attrs = prompts_attrs(
        model, tokenizer, processor, spec, batch_size=batch_size, model_name=model_name, shard=shard
    )
    infos = [
        SampleInfo(
            id=str(s.id),
            image_path="" if s.image_path is None else str(s.image_path),
            prompt="" if s.prompt is None else s.prompt.text,
            label=None if s.label is None else float(s.label),
            record=dict(s.record or {}),
        )
        for s in samples
    ]

    def load_from_path(sample: PromptedSample) -> Tensor:
        return torch.from_numpy(processor.preprocess(Path(sample.image_path)))  # type: ignore[union-attr]

    load = load_image or load_from_path

    def record_batch(recorder: Recorder, layout: StoreLayout, lo: int, hi: int) -> BatchRows:
        return record_prompt_batch(tokenizer, load, recorder, samples[lo:hi], roles[lo:hi], lo, layout)

    def retryable(row: int) -> bool:
        sample = samples[row]
        return sample.prompt is not None and (not sample.prompt.n_images or _loads(load, sample))

    def check_rows(file: Path, rows: np.ndarray) -> None:
        _check_prompts(file, rows, samples, roles)

    return RecordPlan(
        model, Path(path), layout, attrs, infos, batch_size, record_batch, retryable, check_rows
    )


def prompts_attrs(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor | None,
    spec: CacheSpec,
    *,
    batch_size: int = 8,
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """The store attributes of `plan_prompts` (known before the prompts are: a rater's are costly).

    The prompts themselves are per-sample rows (``samples/prompt``, ``tokens/*``), checked row
    by row when a store is resumed; the ``prompt`` attribute holds what all samples share.
    """
    run = {"mode": "prompts", "batch_size": batch_size} | ({"shard": dict(shard)} if shard else {})
    prompt = {"per_sample": True, "image_processor": None if processor is None else asdict(processor)}
    return store_attrs(model, tokenizer, model_name, spec, run, prompt)


def record_prompts(
    model: MPLUGOwl2,
    tokenizer: Tokenizer,
    processor: ImageProcessor | None,
    samples: Sequence[PromptedSample],
    spec: CacheSpec,
    path: str | Path,
    *,
    batch_size: int = 8,
    model_name: str = "",
    shard: Mapping[str, int] | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    progress: Callable[[int, int], None] | None = None,
    load_image: Callable[[Any], Tensor] | None = None,
    retry_failed: RetryPolicy = "auto",
) -> RecordResult:
    """Record samples that each carry their own prompt; resume the store; retry rows that failed.

    Args:
        model: The model whose prompts these are.
        tokenizer: Its tokenizer (pad id, identity).
        processor: Its image processor; None when no prompt holds an image (or with ``load_image``).
        samples: One `PromptedSample` per row (see `plan_prompts`).
        spec: What to cache (positions by role: ``quality`` is each prompt's own quality position).
        path: The store file.
        batch_size: Samples per batch (the commit unit).
        model_name: Where the model came from (a checkpoint directory: studies read the lens from it).
        shard: ``{"rank", "world_size", "start", "stop"}`` when this is one rank's part.
        load_image: ``sample -> [3, S, S]`` pixels instead of ``processor.preprocess(sample.image_path)``.
        overwrite: Start again even if a store exists.
        fsync: Flush each batch to disk before committing it.
        progress: Called with ``(samples done, total)`` after each batch.
        retry_failed: Which failed rows of an existing store to record again (default: those that
            now have a prompt whose image loads; `RetryPolicy`).

    Returns:
        A `RecordResult`.

    Raises:
        mechbiqa.store.StoreMismatchError: The existing store holds other prompts or another model.
    """
    plan = plan_prompts(model, tokenizer, processor, samples, spec, path, batch_size=batch_size,
                        model_name=model_name, shard=shard, load_image=load_image)  # fmt: skip
    return plan.run(overwrite=overwrite, fsync=fsync, retry_failed=retry_failed, progress=progress)


def _check_prompts(
    file: Path, rows: np.ndarray, samples: Sequence[PromptedSample], roles: Sequence[TokenRoles | None]
) -> None:
    """Refuse to append to a store whose committed rows hold other prompts than ``samples``."""
    with h5py.File(file, "r") as f:
        n_positions = f["samples/n_positions"][:]
        ids, role, index = (f[name][:] for name in ("tokens/ids", "tokens/role", "tokens/image_index"))
    for i in rows.tolist():
        r, prompt = roles[i], samples[i].prompt
        n = int(n_positions[i])
        same = (
            r is not None
            and prompt is not None
            and n == len(r)
            and np.array_equal(ids[i, :n], spliced_ids(prompt.ids, r))
            and np.array_equal(role[i, :n], r.role)
            and np.array_equal(index[i, :n], r.image_index)
        )
        if not same:
            raise StoreMismatchError(
                f"{file} holds another prompt for sample {samples[i].id!r} (row {i}) than this run gives it "
                "(other ratings: another model, or sampled answers), so this run cannot append to it. "
                "Write to another path, or pass overwrite to replace it."
            )


def _loads(load: Callable[[Any], Tensor], sample: Any) -> bool:
    """Whether a sample's image loads now (a failed row is retried only then)."""
    try:
        load(sample)
    except (ImageLoadError, OSError, ValueError):
        return False
    return True


def prompted_roles(sample: PromptedSample, n_image_tokens: int, bos_id: int) -> TokenRoles | None:
    """The spliced roles of a `PromptedSample` (its own, or `assign_roles` of its prompt), checked.

    Returns None for a sample without a prompt (an error row).

    Raises:
        ValueError: The prompt holds more than one image, or the roles do not fit the prompt.
    """
    prompt = sample.prompt
    if prompt is None:
        return None
    if prompt.n_images > 1:
        raise ValueError(
            f"sample {sample.id!r}: its prompt holds {prompt.n_images} images; record_prompts takes "
            "one image per prompt, or none (text only)"
        )
    roles = sample.roles
    if roles is None:
        roles = assign_roles(
            prompt.ids,
            response_start=prompt.response_start,
            quality_index=prompt.quality_index,
            n_image_tokens=n_image_tokens,
            bos_id=bos_id,
        )
    spliced = len(prompt.ids) + prompt.n_images * (n_image_tokens - 1)
    if len(roles) != spliced or roles.n_images != prompt.n_images:
        raise ValueError(
            f"sample {sample.id!r}: {len(roles)} roles with {roles.n_images} image(s) for a prompt of "
            f"{spliced} spliced positions with {prompt.n_images}; pass the roles of this prompt "
            f"({n_image_tokens} tokens per image), or none"
        )
    return roles


def _warn_environment(writer: StoreWriter, attrs: Mapping[str, Any], path: str | Path) -> None:
    stored_env = writer.stored_attrs.get("environment")
    if stored_env is not None and stored_env != attrs["environment"] and not writer.complete:
        warnings.warn(
            f"resuming {path} in another environment ({stored_env} -> {attrs['environment']}): the "
            "rows recorded now equal an uninterrupted run up to float rounding, not bit for bit "
            "(matmul results depend on the thread count and hardware)",
            stacklevel=3,
        )
