"""Grounding and ROUGE-1 of whole checkpoints over a set of records (`studies/grounding.py`'s method).

`mechbiqa.analysis.grounding` holds the measurements on arrays (`rate_paths`, `grounding`);
this file runs them per checkpoint: `rate_records` rates the records' images a chunk at a time,
`ground_checkpoint` adds the grounding summary and ROUGE-1 against the references
(`reference_texts`: a user's annotation file or the records' own descriptions) into a
`CheckpointGrounding`; `GroundingComparison` holds every checkpoint's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mechbiqa.analysis.grounding import (
    GroundingPaths,
    GroundingResult,
    SeverityLexicon,
    grounding,
    rate_paths,
)
from mechbiqa.analysis.rouge import RougeResult, references_for, rouge1


@dataclass(frozen=True)
class CheckpointGrounding:
    """One checkpoint's grounding and ROUGE-1.

    Attributes:
        name: Display name.
        path: Where it was loaded from.
        mode: ``"one-stage"`` or ``"two-stage"``.
        grounding: The `GroundingResult`.
        rouge: ROUGE-1 of its descriptions, or None without references.
        paths: The raw `GroundingPaths` (answers included).
    """

    name: str
    path: str
    mode: str
    grounding: GroundingResult
    rouge: RougeResult | None
    paths: GroundingPaths

    def summary(self) -> dict[str, Any]:
        """Headline numbers."""
        rouge = None if self.rouge is None else {k: v for k, v in self.rouge.to_dict(per_image=False).items()}
        return {
            "mode": self.mode,
            "path": self.path,
            **self.grounding.summary(),
            "rouge1_f1": None if self.rouge is None else self.rouge.mean_f1,
            "rouge1": rouge,
        }

    def to_dict(self) -> dict[str, Any]:
        """Summary, confusion matrix and per-image rows (with ROUGE-1 and the full answer)."""
        out = self.summary() | self.grounding.to_dict(per_image=True)
        for i, row in enumerate(out["per_image"]):
            row["answer"] = self.paths.answers[i]
            if self.rouge is not None:
                row["rouge1_f1"] = float(self.rouge.f1[i])
        return out


@dataclass(frozen=True)
class GroundingComparison:
    """Every checkpoint's grounding, and where it was written.

    Attributes:
        checkpoints: Name -> `CheckpointGrounding`.
        n_images: Images rated.
        files: Artefact name -> path.
    """

    checkpoints: dict[str, CheckpointGrounding]
    n_images: int
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Name -> headline numbers (what the comparison report prints and the summary JSON keeps)."""
        return {name: c.summary() for name, c in self.checkpoints.items()}

    def to_dict(self) -> dict[str, Any]:
        """What ``grounding.json`` holds: the image count, the summary, every checkpoint's `to_dict`."""
        return {
            "n_images": self.n_images,
            "summary": self.summary(),
            "checkpoints": {k: c.to_dict() for k, c in self.checkpoints.items()},
        }


def reference_texts(
    records: Sequence[Any], annotations: str | Path | None = None
) -> list[str | Sequence[str]] | None:
    """Reference description(s) per record: a user's JSON file, else the records' descriptions (or None).

    Args:
        records: The rated records (their ``id`` and, without ``annotations``, ``description``).
        annotations: A JSON file ``{image id: text or [texts]}``.

    Raises:
        ValueError: The file does not hold a JSON object.
    """
    ids = [str(r.id) for r in records]
    if annotations:
        loaded = json.loads(Path(annotations).read_text(encoding="utf-8"))
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{annotations} must hold a JSON object {{image id: text or [texts]}}")
        return references_for(ids, loaded)
    texts = [getattr(r, "description", None) for r in records]
    return texts if all(texts) else None  # type: ignore[return-value]


def mos01_of(records: Sequence[Any]) -> np.ndarray | None:
    """``[record]`` MOS on the 0-1 scale, or None when any record has none."""
    values = [getattr(r, "mos01", None) for r in records]
    return None if any(v is None for v in values) else np.asarray(values, dtype=np.float64)


def rate_records(rater: Any, records: Sequence[Any], *, chunk: int, batch_size: int) -> GroundingPaths:
    """`rate_paths` over the records' images, ``chunk`` images preprocessed at a time."""
    from mechbiqa.checkpoint import Checkpoint

    processor = Checkpoint.from_rater(rater).processor
    parts = []
    for start in range(0, len(records), chunk):
        pixels = processor([r.image_path for r in records[start : start + chunk]])
        parts.append(rate_paths(rater, pixels, batch_size=batch_size))
    return GroundingPaths(
        mode=parts[0].mode,
        descriptions=sum((p.descriptions for p in parts), ()),
        answers=sum((p.answers for p in parts), ()),
        image_probs=np.concatenate([p.image_probs for p in parts]),
        text_probs=np.concatenate([p.text_probs for p in parts]),
        final_levels=np.concatenate([p.final_levels for p in parts]),
    )


def ground_checkpoint(
    name: str,
    rater: Any,
    records: Sequence[Any],
    *,
    path: str = "",
    references: Sequence[str | Sequence[str]] | None = None,
    lexicon: SeverityLexicon | None = None,
    use_stemmer: bool = True,
    chunk: int = 256,
    batch_size: int = 32,
) -> CheckpointGrounding:
    """Rate the records along both paths with one rater; its grounding and (with references) ROUGE-1."""
    ids = [str(r.id) for r in records]
    paths = rate_records(rater, records, chunk=chunk, batch_size=batch_size)
    result = grounding(
        paths.image_probs,
        paths.text_probs,
        paths.descriptions,
        final_levels=paths.final_levels,
        ids=ids,
        mos=mos01_of(records),
        lexicon=lexicon,
    )
    rouge = (
        None
        if references is None
        else rouge1(list(paths.descriptions), references, ids=ids, use_stemmer=use_stemmer)
    )
    return CheckpointGrounding(
        name=name, path=path, mode=paths.mode, grounding=result, rouge=rouge, paths=paths
    )
