"""One record type for every image-quality dataset mechbiqa reads.

The built-in benchmark (`mechbiqa.data.benchmark`) and the loaders of real
datasets (`mechbiqa.data.loaders`) both produce `IQARecord`s, so studies,
training and the activation store handle KonIQ, KADID or the synthetic
benchmark through the same fields. The record keeps the dataset's own score
and scale (``score``, ``scale``, ``higher_is_better``) and derives the common
currency from them: ``mos01``, a 0-1 rating where higher is better.

Fields that only some datasets have (the reference photo, the distortion, a
level word, a description) are optional; a loader fills what its files hold.

The equal-width binning of scores into the five level words (Q-Align's rule)
also lives here, because both the benchmark and the Q-Align JSON loader need it;
the words themselves (`LEVEL_WORDS`, best first) come from `mechbiqa.model.config`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mechbiqa.model.config import LEVEL_WORDS

__all__ = [
    "IQARecord",
    "LEVEL_WORDS",
    "SPLITS",
    "level_word",
    "level_word_edges",
    "records_to_jsonl",
    "records_from_jsonl",
]

# LEVEL_WORDS (Q-Align's five level words, best first) is defined once in mechbiqa.model.config.
#: The split names a record may carry (None means "not assigned").
SPLITS: tuple[str, ...] = ("train", "val", "test")


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


def _record_from_fields(values: dict[str, Any]) -> IQARecord:
    """An `IQARecord` back from pickling (`IQARecord.__reduce__`)."""
    return IQARecord(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class IQARecord:
    """One rated (or described) image.

    Attributes:
        id: Unique within its dataset (e.g. the file name, or the benchmark's
            ``"<photo>-c<crop>-<distortion>-<level>"``).
        image_path: Where the image is; absolute once loaded (a string is stored as a `Path`).
        score: The dataset's own rating (MOS or DMOS) on ``scale``; None for
            description-only records (Q-Instruct conversations).
        scale: ``(low, high)`` of the dataset's score range, e.g. (1, 5) for
            KADID, (0, 100) for KonIQ's MOS_zscore, (0, 1) for CSIQ's DMOS; stored as floats.
        higher_is_better: False for DMOS datasets (CSIQ, LIVE).
        dataset: Short name, e.g. ``"koniq10k"`` or ``"mechbiqa-benchmark"``.
        split: ``"train"``, ``"val"``, ``"test"`` or None if the files give none.
        ref_id: The pristine reference this image was made from (synthetic
            datasets), else None.
        distortion: Distortion type name (synthetic datasets), ``"pristine"`` for
            references, else None.
        level: Distortion level 1-5 (0 for a pristine reference), else None.
        level_word: One of `LEVEL_WORDS` when the dataset gives or implies one.
        description: A quality description (benchmark, Q-Instruct), else None.
        params: Distortion parameters, e.g. ``{"sigma": 2.0}``.
        meta: Anything else the files hold (std of ratings, prompt, attributes).
    """

    id: str
    image_path: Path | str
    score: float | int | None
    scale: tuple[float | int, float | int]
    higher_is_better: bool = True
    dataset: str = ""
    split: str | None = None
    ref_id: str | None = None
    distortion: str | None = None
    level: int | None = None
    level_word: str | None = None
    description: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the values and store the mappings read-only."""
        lo, hi = self.scale
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(
                f"IQARecord {self.id!r}: scale must be (low, high) with low < high, got {self.scale}"
            )
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"IQARecord {self.id!r}: score is {self.score}; use None for unrated images")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"IQARecord {self.id!r}: split {self.split!r} is not one of {SPLITS} or None")
        if self.level_word is not None and self.level_word not in LEVEL_WORDS:
            raise ValueError(
                f"IQARecord {self.id!r}: level_word {self.level_word!r} is not one of {LEVEL_WORDS}"
            )
        # Mappings are stored read-only so a frozen record is really immutable.
        object.__setattr__(self, "image_path", Path(self.image_path))
        object.__setattr__(self, "scale", (float(lo), float(hi)))
        object.__setattr__(self, "params", _freeze(self.params))
        object.__setattr__(self, "meta", _freeze(self.meta))

    def __hash__(self) -> int:
        """Hash of identifying fields (the generated hash would fail on the read-only mappings)."""
        return hash((self.dataset, self.id, self.image_path, self.score))

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickled (to another process) as its fields, the read-only mappings as plain dicts."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _record_from_fields, ({k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()},)

    @property
    def mos01(self) -> float | None:
        """The rating mapped to 0-1, higher is better (clipped), or None if unrated."""
        if self.score is None:
            return None
        lo, hi = self.scale
        x = (self.score - lo) / (hi - lo)
        if not self.higher_is_better:
            x = 1.0 - x
        return min(1.0, max(0.0, x))

    @property
    def mos5(self) -> float | None:
        """The rating on Q-Align's 1-5 scale (1 + 4 * mos01), or None if unrated."""
        m = self.mos01
        return None if m is None else 1.0 + 4.0 * m

    @property
    def has_score(self) -> bool:
        """Whether the record carries a rating."""
        return self.score is not None

    def with_root(self, root: Path | str) -> IQARecord:
        """Return a copy whose relative ``image_path`` is resolved against ``root``."""
        path = self.image_path if self.image_path.is_absolute() else Path(root) / self.image_path
        return replace(self, image_path=path)

    def to_dict(self, relative_to: Path | str | None = None) -> dict[str, Any]:
        """A JSON-ready dict (``mos01`` included for readers that do not use this class).

        Args:
            relative_to: If given, ``image_path`` is written relative to it.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "image_path":
                value = value.relative_to(relative_to).as_posix() if relative_to is not None else str(value)
            elif f.name == "scale":
                value = list(value)
            elif f.name in ("params", "meta"):
                value = dict(value)
            out[f.name] = value
        out["mos01"] = self.mos01
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: Path | str | None = None) -> IQARecord:
        """Inverse of `to_dict`; ``root`` resolves a relative ``image_path``.

        Raises:
            ValueError: If a required key is missing (named in the message).
        """
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("id", "image_path", "score", "scale") if k not in data]
        if missing:
            raise ValueError(f"record dict lacks key(s) {missing}; it has {sorted(data)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["scale"] = tuple(kwargs["scale"])
        record = cls(**kwargs)
        return record.with_root(root) if root is not None else record


def level_word_edges(low: float | int, high: float | int) -> tuple[float, ...]:
    """The four inner edges of five equal-width bins over ``[low, high]`` (Q-Align's rule).

    Q-Align labels KonIQ and SPAQ by cutting the training score range into five
    equal-width bins (observed KonIQ edges about 22.4/38.1/53.9/69.6).
    """
    if not high > low:
        raise ValueError(f"level_word_edges needs low < high, got ({low}, {high})")
    width = (high - low) / 5.0
    return tuple(low + width * i for i in range(1, 5))


def level_word(score: float | int, edges: Sequence[float]) -> str:
    """The level word of ``score`` given the four inner bin edges (higher score, better word).

    Scores outside the binned range fall into the end bins.
    """
    if len(edges) != 4:
        raise ValueError(f"level_word needs 4 inner edges, got {len(edges)}")
    bins_above = sum(score >= e for e in edges)  # 0 (lowest bin) .. 4 (highest)
    return LEVEL_WORDS[len(LEVEL_WORDS) - 1 - bins_above]


def records_to_jsonl(
    records: Iterable[IQARecord], path: Path | str, relative_to: Path | str | None = None
) -> None:
    """Write records as JSON lines (one record per line, `IQARecord.to_dict` format)."""
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(relative_to=relative_to), sort_keys=True) + "\n")


def records_from_jsonl(path: Path | str, root: Path | str | None = None) -> list[IQARecord]:
    """Read records written by `records_to_jsonl`; ``root`` resolves relative image paths."""
    import json

    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(IQARecord.from_dict(json.loads(line), root=root))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"{path}, line {n}: {err}") from err
    return out
