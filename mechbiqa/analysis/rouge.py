"""ROUGE-1 between generated quality descriptions and reference descriptions (a thin wrapper).

Where it sits: `studies/grounding.py` generates a description per image with a
checkpoint (`mechbiqa.pipeline`) and compares it here with the reference text:
the built-in benchmark's Q-Pathway-style description (``IQARecord.description``,
`mechbiqa.data.descriptions`) or a user's annotations (Q-Pathway, Q-Instruct
JSON read by `mechbiqa.data.loaders`). `mechbiqa.reports.rouge_table` renders
the `RougeResult`.

The scoring itself is Google's ``rouge-score`` package (the reimplementation of
Lin's ROUGE-1.5.5 used by most papers), not a local re-implementation, so the
numbers are comparable with published ones. Research choices, stated once:

* ROUGE-1 F1 is the headline (the Q-Pathway / self-consistency papers report
  F-measure); precision and recall are kept per image.
* Porter stemming is on by default (ROUGE-1.5.5 ``-m``, the common setting):
  "blurred" and "blurry" stay different words, "edges" and "edge" match.
* With several references for one image (a user's multiple annotations) the
  best-matching reference counts (``RougeScorer.score_multi``: max F1), the
  usual multi-reference convention for single-sentence descriptions.

A user's annotations join the benchmark's own descriptions as references
(`annotation_references`, `references_with`): Q-Pathway / Q-Instruct /
Q-Reasoning conversation JSON files (the reasoning before the verdict, split by
`mechbiqa.data.annotations.split_verdict`) or a plain ``{image id: text or
[texts]}`` object, keyed by image file name and entry id. The RL reward
(`mechbiqa.rl.rouge_rewards`) and the main job's grounding read the same lists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RougeResult", "annotation_references", "nearest", "references_for", "references_with", "rouge1"]


@dataclass(frozen=True)
class RougeResult:
    """ROUGE-1 of one set of generated descriptions against their references.

    Attributes:
        precision: ``[image]`` unigram precision (overlap / generated words).
        recall: ``[image]`` unigram recall (overlap / reference words).
        f1: ``[image]`` F-measure.
        ids: Image ids, in order ("" when not given).
        use_stemmer: Whether Porter stemming was applied.
        n_references: ``[image]`` references per image.
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    ids: tuple[str, ...]
    use_stemmer: bool
    n_references: np.ndarray

    @property
    def n(self) -> int:
        """Number of images."""
        return int(self.f1.size)

    @property
    def mean_f1(self) -> float:
        """Mean ROUGE-1 F1 over images (NaN when there are none)."""
        return float(self.f1.mean()) if self.n else float("nan")

    @property
    def mean_precision(self) -> float:
        """Mean precision over images."""
        return float(self.precision.mean()) if self.n else float("nan")

    @property
    def mean_recall(self) -> float:
        """Mean recall over images."""
        return float(self.recall.mean()) if self.n else float("nan")

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """JSON-ready dict: means, settings and (optionally) per-image values."""
        out: dict[str, Any] = {
            "n": self.n,
            "mean_f1": self.mean_f1,
            "mean_precision": self.mean_precision,
            "mean_recall": self.mean_recall,
            "use_stemmer": self.use_stemmer,
            "library": "rouge-score (RougeScorer(['rouge1']))",
        }
        if per_image:
            out["per_image"] = [
                {"id": i, "f1": float(f), "precision": float(p), "recall": float(r), "n_references": int(k)}
                for i, f, p, r, k in zip(
                    self.ids, self.f1, self.precision, self.recall, self.n_references, strict=True
                )
            ]
        return out


def _scorer(use_stemmer: bool) -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError(
            "ROUGE-1 needs Google's rouge-score package: pip install rouge-score "
            "(mechbiqa lists it as a dependency; reinstall mechbiqa if it is missing)"
        ) from None
    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)


def rouge1(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    ids: Sequence[str] | None = None,
    use_stemmer: bool = True,
) -> RougeResult:
    """ROUGE-1 of each generated description against its reference(s).

    Args:
        predictions: Generated descriptions, one per image.
        references: For each image a reference string, or a list of references (best one counts).
        ids: Image ids, kept in the result for the per-image table.
        use_stemmer: Porter-stem words before matching (default, as ROUGE-1.5.5 ``-m``).

    Returns:
        A `RougeResult`. An empty prediction or reference scores 0 (the library's rule).

    Raises:
        ValueError: If the lengths differ, or an image has an empty list of references.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"rouge1: {len(predictions)} predictions but {len(references)} references; "
            "pass one reference (or list of references) per prediction, in the same order"
        )
    if ids is not None and len(ids) != len(predictions):
        raise ValueError(f"rouge1: {len(ids)} ids for {len(predictions)} predictions")
    scorer = _scorer(use_stemmer)
    p, r, f, k = [], [], [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        refs = [reference] if isinstance(reference, str) else list(reference)
        if not refs:
            raise ValueError(f"rouge1: image {index} has an empty list of references; drop it or give one")
        score = (
            scorer.score(refs[0], prediction) if len(refs) == 1 else scorer.score_multi(refs, prediction)
        )["rouge1"]
        p.append(score.precision)
        r.append(score.recall)
        f.append(score.fmeasure)
        k.append(len(refs))
    as_array = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    return RougeResult(
        precision=as_array(p),
        recall=as_array(r),
        f1=as_array(f),
        ids=tuple(ids) if ids is not None else ("",) * len(f),
        use_stemmer=use_stemmer,
        n_references=np.asarray(k, dtype=np.int64),
    )


def references_for(
    ids: Sequence[str], annotations: Mapping[str, str | Sequence[str]]
) -> list[str | Sequence[str]]:
    """Look up each image's reference description(s) in a user's annotations.

    Args:
        ids: Image ids (store ids, record ids or file names).
        annotations: id -> reference text or list of texts (e.g. Q-Pathway's, keyed by image file name).

    Raises:
        KeyError: Naming the ids that have no annotation (and a few that exist), so the
            caller can fix the key format instead of silently scoring a subset.
    """
    missing = [i for i in ids if i not in annotations]
    if missing:
        raise KeyError(
            f"{len(missing)} image(s) have no reference description, e.g. {missing[:5]}; "
            f"annotation keys look like {list(annotations)[:5]}; key the annotations by the same ids"
        )
    return [annotations[i] for i in ids]


def nearest(prediction: str, candidates: Sequence[str], *, use_stemmer: bool = False) -> tuple[int, float]:
    """The candidate with the highest ROUGE-1 F1 against one prediction (first on ties).

    Args:
        prediction: A generated description.
        candidates: Texts to compare it with (e.g. every phrasing a describer can produce).
        use_stemmer: Porter-stem words before matching.

    Returns:
        ``(index, f1)`` of the best candidate.

    Raises:
        ValueError: If there are no candidates.
    """
    if not candidates:
        raise ValueError("nearest: no candidates to match the prediction against")
    scorer = _scorer(use_stemmer)
    scores = [scorer.score(c, prediction)["rouge1"].fmeasure for c in candidates]
    best = int(np.argmax(scores))
    return best, float(scores[best])


def annotation_references(paths: Sequence[str | Path]) -> dict[str, tuple[str, ...]]:
    """Reference descriptions from a user's annotation files, keyed by image file name and by entry id.

    Two shapes are read (several files at once, their texts pooled per key):

    * a conversation list (Q-Pathway, Q-Instruct, Q-Reasoning: ``[{"id", "image",
      "conversations": [{"from": "gpt", "value": ...}]}]``): each assistant answer's reasoning,
      the answer without its final verdict (`mechbiqa.data.annotations.split_verdict`); a
      verdict-only answer (Q-Align) holds no reasoning and gives no reference;
    * an object ``{image id or file name: text or [texts]}`` (what ``studies/grounding.py
      --references`` reads).

    Args:
        paths: The JSON files.

    Returns:
        key -> references, in file order without repeats. Keys: the entry's ``id`` (before a
        ``->score`` suffix) and its image's file name, so benchmark records match by either.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file is neither shape (the message names it).
    """
    from mechbiqa.data.annotations import split_verdict

    found: dict[str, list[str]] = {}

    def add(key: str, text: str) -> None:
        text = text.strip()
        if key and text and text not in found.setdefault(key, []):
            found[key].append(text)

    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"annotation file {path} does not exist; pass an existing JSON file")
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, Mapping):
            for key, texts in data.items():
                for text in [texts] if isinstance(texts, str) else list(texts):
                    add(str(key), str(text))
            continue
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a list of conversation entries (Q-Pathway / Q-Instruct) or an object "
                f"{{image id: text}}, got {type(data).__name__}"
            )
        for entry in data:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("conversations"), list):
                continue
            answers = [t.get("value", "") for t in entry["conversations"]
                       if isinstance(t, Mapping) and t.get("from") in ("gpt", "assistant")]
            keys = [str(entry.get("id", "")).split("->")[0]]
            image = entry.get("image", entry.get("img_path"))
            if isinstance(image, str) and image:
                keys.append(Path(image).name)
            for answer in answers:
                reasoning = split_verdict(str(answer))[0]
                for key in keys:
                    add(key, reasoning)
    return {k: tuple(v) for k, v in found.items() if v}


def references_with(
    records: Sequence[Any], extra: Mapping[str, Sequence[str]] | None = None
) -> list[tuple[str, ...]]:
    """Each record's references: its own description (the benchmark's), then a user's annotations.

    Args:
        records: Records with ``id``, ``image_path`` and ``description`` (any may be missing).
        extra: `annotation_references` (key: entry id or image file name); None: own descriptions only.

    Returns:
        One tuple per record (empty when it has none), without repeats.
    """
    out = []
    for r in records:
        refs: list[str] = []
        own = getattr(r, "description", None)
        candidates = [own] if own else []
        if extra:
            image = getattr(r, "image_path", None)
            for key in (str(getattr(r, "id", "")), Path(image).name if image else ""):
                candidates.extend(extra.get(key, ()))
        for text in candidates:
            if text and text not in refs:
                refs.append(text)
        out.append(tuple(refs))
    return out
