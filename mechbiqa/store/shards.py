"""Data-parallel recording under torchrun: every rank records one shard, rank 0 joins them.

Where it sits: `studies/cache_activations.py` (and anything else that records a
data set) hands `record_sharded` the whole sample list and a ``prepare``
callable that plans one part (`mechbiqa.store.record.plan_dataset`,
`plan_prompts`, or a rater's rating then `plan_prompts`). Without torchrun
(``WORLD_SIZE`` unset or 1) the same call records one store, unsharded.

Rank ``r`` of ``n`` records the contiguous part
``samples[r * N // n : (r + 1) * N // n]`` into ``<out>.shards/rank<r>-of-<n>.h5``;
rank 0 then joins the shards into ``<out>``, a store of HDF5 virtual datasets
(`mechbiqa.store.join.join_stores`; move the folder as a whole). The ranks talk
over a gloo process group (CPU and GPU runs alike: only small Python objects
travel), and every step below is collective, so that a rank that fails makes
every rank raise the same one-line error instead of leaving the others waiting
at a barrier:

1. agree (before any work): the store attributes of every rank (model
   identity and config, tokenizer, prompt, run settings, cache spec) are equal,
   and an existing shard from an earlier run can be resumed by this one;
2. prepare: each rank plans its part (for a rated store: rates its images);
3. layout: the plans' layouts are gathered and each rank widens its own to
   their union (per-sample prompts differ in length from shard to shard, and a
   joined store needs one layout);
4. open: each rank creates, resumes or reopens its shard (all must succeed);
5. record, then rank 0 joins.

With ``align`` set to the batch size the shards are whole batches of the
single-process run, so a 2-rank run equals a 1-rank run sample for sample
(tested under torchrun); what a rank computes before planning (a rater's
ratings, batched on its own part) may round differently.
"""

from __future__ import annotations

import atexit

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mechbiqa.store.errors import StoreError, StoreMismatchError
from mechbiqa.store.join import join_stores, shard_difference
from mechbiqa.store.record import RecordPlan, RecordResult, RetryPolicy
from mechbiqa.store.writer import StoreWriter, check_resumable

__all__ = ["RankGroup", "ShardedResult", "record_sharded", "shard_path", "shard_range"]

T = TypeVar("T")

# A rank waits at each collective step for the slowest one (a 7B shard can take hours); a rank
# that dies does not leave the others waiting this long, since torchrun stops them all.
_TIMEOUT = datetime.timedelta(hours=24)


def _leave_group() -> None:
    """Destroy the process group `RankGroup.from_env` joined, if it is still there (at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class RankGroup:
    """This process's place among the torchrun ranks (rank 0 of 1 without torchrun).

    Attributes:
        rank: This process's rank.
        world_size: Number of ranks.
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> RankGroup:
        """Join torchrun's process group (gloo) when ``WORLD_SIZE`` > 1, else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=_TIMEOUT)
            atexit.register(_leave_group)  # a group left to the interpreter's exit may abort the process
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank."""
        return self.world_size > 1

    def device(self, device: str) -> str:
        """``cuda`` means this rank's GPU (``cuda:<LOCAL_RANK>``) under torchrun; others unchanged."""
        if self.distributed and device.startswith("cuda") and ":" not in device:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank))}"
        return device

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def together(self, what: str, step: Callable[[], T], undo: Callable[[T], Any] | None = None) -> T:
        """Run ``step`` on every rank; if it raised on any, raise on all of them.

        A rank re-raises its own exception; the others call ``undo`` on what their step
        returned (e.g. close a writer) and raise a `StoreError` naming the first rank that
        failed and its one-line message. ``step`` must not itself use the group.
        """
        try:
            value, error = step(), None
        except Exception as exc:  # noqa: BLE001 (every rank must hear of it before anyone raises)
            value, error = None, exc
        reports = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, report) for r, report in enumerate(reports) if report is not None]
        if failed:
            if undo is not None:
                undo(value)  # type: ignore[arg-type]
            rank, report = failed[0]
            raise StoreError(f"rank {rank} of {self.world_size} could not {what}: {report}")
        return value  # type: ignore[return-value]


def shard_range(n: int, rank: int, world_size: int, align: int = 1) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous part of ``n`` samples.

    With ``align`` (the batch size) every part but the last is a whole number of batches,
    as long as every rank gets at least one batch: the ranks then record exactly the
    batches a single process would, so a 2-rank store equals a 1-rank one (and sampled
    answers, seeded per batch, are the same draws).
    """
    batches = -(-n // align)
    if align > 1 and batches >= world_size:
        lo, hi = rank * batches // world_size * align, (rank + 1) * batches // world_size * align
        return lo, min(hi, n)
    return rank * n // world_size, (rank + 1) * n // world_size


def shard_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where one rank's store goes: ``<out>.shards/rank<r>-of-<n>.h5``."""
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"rank{rank:05d}-of-{world_size:05d}.h5"


@dataclass(frozen=True)
class ShardedResult:
    """What a (possibly sharded) recording wrote.

    Attributes:
        store: The whole store: the joined file under torchrun (written by rank 0, readable
            by every rank once `record_sharded` returns), else the store itself.
        shard: This rank's own store (``store`` without torchrun).
        record: This rank's `RecordResult`.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    store: Path
    shard: Path
    record: RecordResult
    rank: int = 0
    world_size: int = 1


def _shared(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k != "environment"}


def _agree(every: Sequence[Mapping[str, Any]]) -> None:
    """Refuse ranks that would record shards that cannot be joined (another model, spec, run ...)."""
    for rank, other in enumerate(every[1:], start=1):
        difference = shard_difference(every[0], other)
        if difference is not None:
            raise StoreMismatchError(
                f"torchrun ranks 0 and {rank} would record different stores ({difference}); give every "
                "rank the same model, data set, spec and settings"
            )


def record_sharded(
    out: str | Path,
    samples: Sequence[Any],
    prepare: Callable[[Sequence[Any], Path, dict[str, int] | None], RecordPlan],
    *,
    attrs: Callable[[dict[str, int] | None], Mapping[str, Any]] | None = None,
    group: RankGroup | None = None,
    overwrite: bool = False,
    fsync: bool = False,
    retry_failed: RetryPolicy = "auto",
    progress: Callable[[int, int], None] | None = None,
    on_open: Callable[[], None] | None = None,
    align: int = 1,
) -> ShardedResult:
    """Record ``samples`` into ``out``: one shard per torchrun rank and a joined store, or one store.

    Args:
        out: The store file.
        samples: The whole sample list (every rank passes the same one).
        prepare: ``(part, path, shard) -> RecordPlan``: plan one rank's part into ``path``;
            ``shard`` is ``{"rank", "world_size", "start", "stop"}`` (None without torchrun).
        attrs: ``shard -> attributes``: the store attributes a part's plan will have
            (`mechbiqa.store.record.prompts_attrs`), for a costly ``prepare`` (it rates images):
            they are agreed and checked against an existing shard before it runs. None: they
            are agreed after ``prepare``.
        group: The ranks (default `RankGroup.from_env`).
        overwrite: Start again, deleting existing shards.
        fsync: Flush each batch to disk before committing it.
        retry_failed: Which failed rows of existing shards to record again.
        progress: ``(done, total)`` of this rank's part after each batch.
        on_open: Called on rank 0 once every rank's store accepted the run, before any
            batch is recorded (write a config sidecar there: it then always describes the store).
        align: The batch size: shards start at whole batches (`shard_range`).

    Returns:
        A `ShardedResult`.

    Raises:
        mechbiqa.store.StoreMismatchError: The ranks disagree, or an existing store was
            recorded differently (on every rank, with the rank that found it).
        mechbiqa.store.StoreLockedError: Another process writes a shard.
    """
    group = group or RankGroup.from_env()
    out = Path(out)
    shard, path, part = None, out, samples
    if group.distributed:
        lo, hi = shard_range(len(samples), group.rank, group.world_size, align)
        shard = {"rank": group.rank, "world_size": group.world_size, "start": lo, "stop": hi}
        part, path = samples[lo:hi], shard_path(out, group.rank, group.world_size)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Each step runs locally inside `together` (no collective inside a step, so that a rank
    # failing half-way cannot leave the others in a mismatched collective).
    if attrs is not None:  # 1. before the costly part
        mine = group.together("describe its store", lambda: attrs(shard))
        every = group.gather(_shared(mine))

        def check_early() -> None:
            _agree(every)
            if not overwrite:
                check_resumable(path, mine, ids=[str(s.id) for s in part])

        group.together("agree on the store before recording", check_early)
    plan = group.together("plan its part", lambda: prepare(part, path, shard))  # 2.
    if attrs is None:
        every = group.gather(_shared(plan.attrs))
        group.together("agree on the store before recording", lambda: _agree(every))
    layouts = group.gather(plan.layout)  # 3. one layout for all shards
    plan = group.together("agree on the layout", lambda: plan.widen(layouts[0].union(*layouts[1:])))
    writer: StoreWriter = group.together(  # 4.
        "open its store",
        lambda: plan.open(overwrite=overwrite, fsync=fsync, retry_failed=retry_failed),
        undo=lambda w: w.close(),
    )
    opened = group.gather(writer.layout.with_samples(0))  # a resumed shard keeps its own layout

    def accept() -> None:
        if any(layout != opened[0] for layout in opened):
            raise StoreMismatchError(
                f"the existing shards in {shard_path(out, 0, group.world_size).parent} were planned with "
                "different layouts (an earlier run's ratings differ from this one's); pass overwrite to "
                "record them again"
            )
        if on_open is not None and group.rank == 0:
            on_open()

    try:
        group.together("accept the run", accept)
    except BaseException:
        writer.close()
        raise
    result = group.together("record its part", lambda: plan.record(writer, progress))  # 5.
    if group.distributed:
        shards = [shard_path(out, r, group.world_size) for r in range(group.world_size)]
        group.together("join the shards", lambda: join_stores(shards, out) if group.rank == 0 else None)
    return ShardedResult(out, path, result, group.rank, group.world_size)
