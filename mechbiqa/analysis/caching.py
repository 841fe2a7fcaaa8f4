"""Caching a data set into a store, by rank: the planners `record_sharded` calls, and what the run left.

`studies/cache_activations.py` records either a model over a prompt (`model_planner`: Q-Align's
scorer prompt, or a generated answer re-run, `mechbiqa.store.record.plan_dataset`) or a rater's own
scoring prompt (`rater_planner`: `mechbiqa.analysis.capture.plan_rater`). Each planner returns the
``prepare(part, path, shard)`` and ``attrs(shard)`` callbacks of `mechbiqa.store.shards.record_sharded`;
`cache_sharded` runs it and reads the store it wrote into a `CacheRun`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechbiqa.analysis.capture import plan_rater, rater_attrs
from mechbiqa.store import ActivationStore, CacheSpec
from mechbiqa.store.record import PromptConfig, RecordResult, RunConfig, plan_dataset
from mechbiqa.store.shards import RankGroup, record_sharded

Prepare = Callable[[Sequence[Any], Path, "dict[str, int] | None"], Any]
Attrs = Callable[["dict[str, int] | None"], Mapping[str, Any]]


@dataclass(frozen=True)
class CacheRun:
    """What a caching run wrote.

    Attributes:
        store: The store path (the joined file under torchrun, on rank 0).
        record: This process's `RecordResult`.
        n_valid: Samples recorded without error (whole store).
        errors: ``(id, reason)`` of the failed samples.
        rank: This process's rank (0 without torchrun).
        world_size: Number of ranks.
    """

    store: Path
    record: RecordResult
    n_valid: int
    errors: list[tuple[str, str]]
    rank: int = 0
    world_size: int = 1

    @property
    def exit_code(self) -> int:
        """1 when some sample failed (the others are recorded), else 0 (`mechbiqa.cli.run` exits with it).

        Under torchrun only rank 0 (which reports the whole store, after the join) says so: a
        worker that exits non-zero first would make torchrun stop rank 0 before it joins.
        """
        return 1 if self.errors and self.rank == 0 else 0


def model_planner(
    model: Any, tokenizer: Any, processor: Any, spec: CacheSpec, run: RunConfig, model_name: str
) -> tuple[Prepare, None]:
    """Record ``model`` over Q-Align's scorer prompt (``run.mode``: scored, or answered then re-run)."""

    def prepare(part: Sequence[Any], path: Path, shard: dict[str, int] | None) -> Any:
        return plan_dataset(model, tokenizer, processor, part, spec, path, prompt=PromptConfig(), run=run,
                            model_name=model_name, shard=shard)  # fmt: skip

    return prepare, None


def rater_planner(
    rater: Any, spec: CacheSpec, batch_size: int, model_name: str | None
) -> tuple[Prepare, Attrs]:
    """Let ``rater`` rate each image and record the prompt its quality word was read after.

    The attributes are known before the (costly) rating, so every rank checks them first.
    """

    def prepare(part: Sequence[Any], path: Path, shard: dict[str, int] | None) -> Any:
        return plan_rater(rater, part, path, spec, batch_size=batch_size, shard=shard, model_name=model_name)

    def attrs(shard: dict[str, int] | None) -> Mapping[str, Any]:
        return rater_attrs(rater, spec, batch_size=batch_size, model_name=model_name, shard=shard)

    return prepare, attrs


def cache_sharded(
    out: Path,
    samples: Sequence[Any],
    planner: tuple[Prepare, Attrs | None],
    *,
    group: RankGroup,
    **options: Any,
) -> CacheRun:
    """`record_sharded` with a planner's callbacks (``options``: its keywords), then the store's errors."""
    prepare, attrs = planner
    done = record_sharded(out, samples, prepare, attrs=attrs, group=group, **options)
    store_path = done.store if group.rank == 0 else done.shard
    with ActivationStore.open(store_path) as store:
        errors = [(e.id, e.reason) for e in store.errors()]
        n_valid = len(store.valid)
    return CacheRun(store_path, done.record, n_valid, errors, group.rank, group.world_size)
