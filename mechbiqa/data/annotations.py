"""Annotation files for training: Q-Pathway / Q-Instruct reasoning and Q-Align verdicts, entry by entry.

How it connects: :func:`read_annotations` reads one or more LLaVA / mPLUG-Owl2
conversation JSON files into :class:`~mechbiqa.data.records.IQARecord` records that
:func:`mechbiqa.train.examples_from_records` turns into training examples;
``studies/train_pair.py --annotations FILE [FILE ...] --image-root ROOT`` is the
command line. The dataset score scales come from
:data:`mechbiqa.data.scales.DATASET_SCALES` (read, never copied).

The two shapes of answer (DESIGN.md, "Annotation files for training"):

* **Q-Pathway / Q-Instruct**: reasoning that ends with a verdict, "... The
  noise is strong and the details are lost. Thus, the quality of the image is
  poor." :func:`split_verdict` cuts the last sentence that states the quality
  of the image with a level word off the reasoning. One-stage trains on the
  whole answer as written; two-stage stage 1 on the reasoning *without* the
  verdict (image -> reasoning) and stage 2 on reasoning -> "The quality of the
  image is poor." (text only).
* **Q-Align**: the verdict alone, "The quality of the image is good." This is
  one-stage data: there is no reasoning for stage 1 to learn or stage 2 to
  read: two-stage refuses Q-Align files up front (:meth:`Annotations.for_mode`), and,
  given with Q-Pathway files, leaves their entries out by name.

The level word comes from the verdict, or, when a rated dataset is given
(``scores=``: records of :mod:`mechbiqa.data.loaders`), from that image's MOS
(joined by file name; equal-width bins on the dataset's scale). Each entry's
score scale is that of its own source (the same rule as the Q-Align test files of
:func:`~mechbiqa.data.loaders.load_qalign_json`): a folder of the image path
(``koniq/...``, ``kadid10k/images/...``, ``LIVE_Challenge/...``), else the
dataset's own file naming (``I01_01_05.png``, ``00001.jpg``), else the one
dataset the file name names (a name that names several, ``train_koniq_spaq_kadid.json``,
names none), so a mixed KonIQ + SPAQ + KADID file maps KADID's 1.71 (1-5) to 0.18,
not 0.017. An entry with a score but no source keeps its level word and no score.

Entries that cannot be used are not fatal one by one: each is named (file,
index, reason) in :attr:`Annotations.rejected`, and :meth:`Annotations.for_mode`
adds those the mode cannot use, so a caller reports them all before training.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from mechbiqa.data.loaders import entry_source, file_source
from mechbiqa.data.records import LEVEL_WORDS, IQARecord, level_word, level_word_edges
from mechbiqa.data.scales import DATASET_SCALES

__all__ = [
    "AnnotationError",
    "Rejected",
    "Annotations",
    "read_annotations",
    "split_verdict",
    "verdict_level",
    "VERDICT_SYNONYMS",
    "split_holdout",
    "TWO_STAGE_NEEDS",
]

TWO_STAGE_NEEDS = (
    "two-stage training needs reasoning before the verdict: stage 1 learns image -> reasoning (a description "
    "of the visual attributes) and stage 2 learns reasoning -> 'The quality of the image is <level>.'. "
    "A Q-Align file holds only the verdict, so it is one-stage data: train it with --modes one-stage, "
    "or give a Q-Pathway / Q-Instruct file whose answers reason before concluding"
)
"""What two-stage needs, in the words of every refusal."""

_PLACEHOLDERS = ("<|image|>", "<image>")

#: How annotators conclude, beyond the five level words: a phrase -> the level it states
#: (Q-Pathway / Q-Instruct write "... the quality of this image is rather low.", "... is average").
#: A level word is taken as written ("very poor" is poor).
VERDICT_SYNONYMS: Mapping[str, str] = MappingProxyType({
    **{word: word for word in LEVEL_WORDS},
    "very high": "excellent", "extremely high": "excellent", "outstanding": "excellent",
    "superb": "excellent",
    "high": "good", "above average": "good",
    "average": "fair", "medium": "fair", "moderate": "fair", "mediocre": "fair", "acceptable": "fair",
    "low": "poor", "below average": "poor",
    "very low": "bad", "extremely low": "bad", "terrible": "bad", "awful": "bad",
})
_PHRASE = "|".join(sorted((re.escape(k) for k in VERDICT_SYNONYMS), key=len, reverse=True))
_LEVEL_PHRASE = re.compile(rf"(?<![\w-])(?P<phrase>{_PHRASE})(?!\w)", re.IGNORECASE)
# "not good", "isn't very high", "hardly acceptable": the level is denied, not stated.
_NEGATION = re.compile(r"(?:\bnot|n't|\bnever|\bhardly|\bno longer)\s+(?:\w+\s+)?$", re.IGNORECASE)
_QUALITY = re.compile(r"\bquality\b", re.IGNORECASE)
_LAST_SENTENCE = re.compile(r"[^.!?]*[.!?]*\s*$")
_ABOUT_QUALITY = re.compile(r"\bquality of (?:the|this) (?:image|picture|photo)\b", re.IGNORECASE)


def verdict_level(sentence: str) -> tuple[str | None, str | None]:
    """The level a verdict sentence states, and why there is none.

    The level phrase is the one that qualifies "quality": right before it ("a poor-quality image"),
    else the first after it ("the quality of the image is rather low"), else the last before it.
    Phrases are the level words and :data:`VERDICT_SYNONYMS`.

    Args:
        sentence: One sentence about the quality of the image.

    Returns:
        ``(level word, None)``, or ``(None, reason)`` when the sentence names no level or denies one
        ("the quality of the image is not good": no level can be read from it).
    """
    quality = _QUALITY.search(sentence)
    found = list(_LEVEL_PHRASE.finditer(sentence))
    if quality is None or not found:
        return None, "names no level (" + ", ".join(LEVEL_WORDS) + " or a synonym such as low, average, high)"
    before = [m for m in found if m.end() <= quality.start()]
    after = [m for m in found if m.start() >= quality.end()]
    attached = [m for m in before if re.fullmatch(r"[\s-]+(?:image\s+|picture\s+|photo\s+)?",
                                                  sentence[m.end():quality.start()], re.IGNORECASE)]
    chosen = (attached or after[:1] or before[-1:])[0]
    denied = _NEGATION.search(sentence[: chosen.start()])
    if denied:
        phrase = sentence[denied.start() : chosen.end()].strip()
        return None, f"denies a level ({phrase!r}) rather than stating one"
    return VERDICT_SYNONYMS[chosen.group("phrase").lower()], None


def split_verdict(answer: str) -> tuple[str, str | None, str | None]:
    """Split an answer into its reasoning and its final quality verdict.

    Args:
        answer: The assistant's answer.

    Returns:
        ``(reasoning, verdict sentence, level word)``: the answer without its last sentence when
        that sentence is about the quality and states a level (a level word or one of
        :data:`VERDICT_SYNONYMS`, in either order: "Thus, the quality of the image is poor.",
        "Overall, this is a good quality image", "... quality of this image is rather low" ->
        poor), else ``(answer, None, None)``. A verdict-only answer (Q-Align) has empty
        reasoning. A last sentence about the quality of the image that states no level
        ("... the quality of the image is unusual.", "... is not good.") is returned as the
        verdict with level None (:func:`verdict_level` says why).
    """
    text = answer.strip()
    last = _LAST_SENTENCE.search(text)
    sentence = last.group(0).strip() if last else ""
    if not sentence or _QUALITY.search(sentence) is None:
        return text, None, None
    level, _why = verdict_level(sentence)
    if level is None and _LEVEL_PHRASE.search(sentence) is None and _ABOUT_QUALITY.search(sentence) is None:
        return text, None, None  # a sentence that mentions quality in passing, not a verdict
    return text[: last.start()].strip(), sentence, level


class AnnotationError(ValueError):
    """An annotation file (or a set of them) that cannot train the requested mode (the message says why)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that cannot be used, and why.

    Attributes:
        file: The annotation file.
        index: The entry's position in the file's list.
        reason: What is wrong, in words.
    """

    file: Path
    index: int
    reason: str

    def __str__(self) -> str:  # noqa: D105
        return f"{self.file.name}[{self.index}]: {self.reason}"


@dataclass(frozen=True)
class Annotations:
    """The usable entries of some annotation files, and the rejected ones.

    Attributes:
        records: One record per usable entry: ``description`` is the reasoning (None for
            verdict-only answers), ``level_word`` the level, ``meta["answer"]`` the whole answer
            (what one-stage trains on), ``meta["source"]`` / ``meta["index"]`` where it came from.
        rejected: Entries no mode can use, with the reason.
        files: The files read.
    """

    records: tuple[IQARecord, ...]
    rejected: tuple[Rejected, ...]
    files: tuple[Path, ...]

    def for_mode(self, mode: Literal["one-stage", "two-stage"]) -> tuple[list[IQARecord], list[Rejected]]:
        """The records a mode can train on, and every entry it cannot (file, index, reason).

        Several files at once: two-stage takes the entries with reasoning and names the bare
        verdicts it leaves out; it refuses only when nothing but bare verdicts (Q-Align files) is given.

        Raises:
            AnnotationError: No entry is usable; for two-stage on verdicts alone the message states
                what two-stage needs (:data:`TWO_STAGE_NEEDS`).
        """
        if mode not in ("one-stage", "two-stage"):
            raise ValueError(f"mode must be 'one-stage' or 'two-stage', got {mode!r}")
        usable, rejected = [], list(self.rejected)
        for r in self.records:
            if mode == "two-stage" and not r.description:
                why = "verdict without reasoning (Q-Align style): one-stage data only"
                rejected.append(Rejected(Path(r.meta["source"]), r.meta["index"], why))
            else:
                usable.append(r)
        if mode == "two-stage" and not usable and self.records:
            raise AnnotationError(f"{', '.join(str(f) for f in self.files)}: every usable answer is a "
                                  f"verdict without reasoning; {TWO_STAGE_NEEDS}")
        if not usable:
            shown = "; ".join(str(x) for x in rejected[:5])
            raise AnnotationError(f"no entry of {', '.join(str(f) for f in self.files)} can train {mode} "
                                  f"({len(rejected)} rejected, e.g. {shown})")
        return usable, rejected


def _source(entry: Mapping[str, Any], image: str, extra: Mapping[str, Any],
            default: str | None) -> str | None:
    """The dataset an entry comes from, else ``default`` (the one its file's name names).

    :func:`~mechbiqa.data.loaders.entry_source`: its field, a folder of its image path, its image's
    file name, then its id's.
    """
    found = entry_source(entry, image, extra)
    if found is None and "->" in str(entry.get("id", "")):
        found = entry_source({}, str(entry["id"]).rsplit("->", 1)[0], extra)
    return found or default


def _score(entry: Mapping[str, Any]) -> float | None:
    raw = entry.get("gt_score")
    if raw is None and "->" in str(entry.get("id", "")):
        raw = str(entry["id"]).rsplit("->", 1)[1]
    try:
        score = None if raw is None else float(raw)
    except (TypeError, ValueError):
        return None
    return score if score is None or math.isfinite(score) else None  # "->nan" rates nothing


def read_annotations(
    paths: Sequence[str | Path],
    image_root: str | Path,
    *,
    scores: Sequence[IQARecord] | None = None,
    scales: Mapping[str, tuple[float, float]] | None = None,
    check_images: bool = True,
) -> Annotations:
    """Read Q-Pathway / Q-Instruct / Q-Align conversation JSON files (several at once).

    Args:
        paths: The JSON files (each a list of ``{"id", "image", "conversations", ["gt_score"]}``).
        image_root: Folder the ``image`` values are relative to.
        scores: A rated dataset (e.g. ``load_koniq10k(root)``); an entry whose image file name
            matches one of its records takes that record's score, scale and level word.
        scales: Extra or overriding dataset scales by name, higher is better (default: ``DATASET_SCALES``).
        check_images: Reject entries whose image file does not exist.

    Returns:
        The :class:`Annotations` (usable records and rejected entries).

    Raises:
        AnnotationError: A file is missing or not a JSON list of objects.
    """
    table = {name: (s.range, s.higher_is_better) for name, s in DATASET_SCALES.items()}
    table.update({name: (tuple(v), True) for name, v in (scales or {}).items()})
    joined = {Path(r.image_path).name: r for r in (scores or ())}
    root = Path(image_root)
    records: list[IQARecord] = []
    rejected: list[Rejected] = []
    # A file given twice (--annotations F --qalign-json F) is read once: its entries are not doubled.
    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(Path(p).resolve(), Path(p))
    files = tuple(unique.values())
    if check_images and not root.is_dir():
        raise AnnotationError(f"the image folder {root} is not a folder; give the folder the entries' "
                              "'image' paths are relative to (--image-root)")
    for path in files:
        if not path.is_file():
            what = "is a folder, not a JSON file" if path.is_dir() else "does not exist"
            raise AnnotationError(f"annotation file {path} {what}")
        try:
            # utf-8-sig: a BOM is common in files saved on Windows
            entries = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(entries, list):
            raise AnnotationError(f"{path} should hold a JSON list of entries, got {type(entries).__name__}")
        from_file = file_source(path, table)
        for i, entry in enumerate(entries):
            record = _record(entry, path, i, root, from_file, table, joined, check_images)
            (rejected if isinstance(record, Rejected) else records).append(record)
    return Annotations(records=tuple(records), rejected=tuple(rejected), files=files)


def _record(entry: Any, path: Path, i: int, root: Path, from_file: str | None,
            table: Mapping[str, tuple[tuple[float, float], bool]], joined: Mapping[str, IQARecord],
            check_images: bool) -> IQARecord | Rejected:
    """One entry as a record, or the reason it cannot be one."""
    if not isinstance(entry, dict):
        return Rejected(path, i, f"not an object ({type(entry).__name__})")
    image = entry.get("image", entry.get("img_path"))
    if isinstance(image, list):
        return Rejected(path, i, f"'image' lists {len(image)} images; an entry trains one image")
    if not isinstance(image, str) or not image:
        return Rejected(path, i, "no image (text-only entries cannot train an image rater)")
    turns = entry.get("conversations")
    if turns is None and "gt_score" in entry:
        return Rejected(path, i, "a test entry (image and gt_score, no conversations): nothing to train on; "
                                 "Q-Align test files are read by evaluate_quality")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                              for t in turns):
        return Rejected(path, i, "no 'conversations' list of {'from', 'value'} turns")
    answers = [t["value"] for t in turns if t.get("from") in ("gpt", "assistant")]
    # The answer that concludes on the quality (Q-Instruct entries may hold several exchanges).
    parsed = [split_verdict(a) for a in answers]
    concluding = [(a, p) for a, p in zip(answers, parsed, strict=True) if p[1] is not None]
    if not concluding:
        return Rejected(path, i, "no answer ends with a verdict on the quality of the image "
                                 "('... the quality of the image is <level>.')")
    # The last answer that states a level; a later "No, it is not of good quality." states none.
    stated = [c for c in concluding if c[1][2] is not None]
    answer, (reasoning, verdict, level) = (stated or concluding)[-1]
    if any(ph in answer for ph in _PLACEHOLDERS):
        return Rejected(path, i, "the answer contains an image placeholder")
    image_path = root / image
    if check_images and not image_path.is_file():
        return Rejected(path, i, f"image not found: {image_path}")
    meta: dict[str, Any] = {"answer": answer.strip(), "source": str(path), "index": i, "verdict": verdict}
    rated = joined.get(Path(image).name)
    if rated is not None:
        score, scale, higher = rated.score, rated.scale, rated.higher_is_better
        mos01 = rated.mos01  # equal-width bins on the dataset's scale, as Q-Align labels
        mos_level = rated.level_word or (None if mos01 is None else level_word(mos01, level_word_edges(0, 1)))
        if mos_level is not None and mos_level != level:
            meta["verdict_level"] = level
            # The trained answer must state the level the label says.
            meta["answer"] = f"{reasoning} The quality of the image is {mos_level}.".strip()
        level, dataset = mos_level, rated.dataset
        meta["level_source"] = "mos"
    else:
        score = _score(entry)
        source = _source(entry, image, table, from_file)
        (scale, higher), dataset = table.get(source, ((0.0, 1.0), True)), source or path.stem
        if score is not None and source is None:
            meta["unscaled_score"] = score  # no known source: a 0-1 rating cannot be derived
            score = None
        meta["level_source"] = "verdict"
    if level is None:
        why = verdict_level(verdict)[1] if verdict else "states no level"
        return Rejected(path, i, f"the verdict {verdict!r} {why} "
                                 "(and no rated dataset gives this image a MOS)")
    return IQARecord(id=str(entry.get("id", image)).split("->")[0], image_path=image_path, score=score,
                     scale=scale, higher_is_better=higher, dataset=dataset, level_word=level,
                     description=reasoning or None, meta=meta)


def split_holdout(records: Sequence[IQARecord], *, seed: int = 0, test_fraction: float | int = 0.1,
                  val_fraction: float | int = 0.05, max_val: int | None = None
                  ) -> tuple[list[IQARecord], list[IQARecord], list[IQARecord]]:
    """Train / validation / test split by image (no image in two parts); validation comes out of training.

    Args:
        records: The usable records.
        seed: Seed of the shuffle.
        test_fraction: Share of the images held out as the test set.
        val_fraction: Share of the *training* images used for validation during training.
        max_val: At most this many validation images (None: no cap).

    Returns:
        ``(train, val, test)``, each with ``split`` set.
    """
    images = sorted({r.image_path for r in records})
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = max(1, round(len(images) * test_fraction)) if test_fraction and len(images) > 2 else 0
    rest = len(images) - n_test
    n_val = max(1, round(rest * val_fraction)) if val_fraction and rest > 2 else 0
    if max_val is not None:
        n_val = min(n_val, max_val)
    part = {}
    for rank, k in enumerate(order):
        part[images[k]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[IQARecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[part[r.image_path]].append(replace(r, split=part[r.image_path]))
    return out["train"], out["val"], out["test"]
