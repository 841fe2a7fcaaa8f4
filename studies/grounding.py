"""Grounding / self-consistency of a rater's quality word, and ROUGE-1 of its descriptions (second paper).

Question: does the quality a checkpoint gives follow from its own description
of the image? Three measurements per checkpoint:

1. the **contradiction rate**: the share of images where the quality read
   with the image (the image path) and the quality read from the model's own
   generated description fed back as text only (the text path) differ by one
   level or more, and the SRCC between the two paths' scores;
2. **description-verdict conflicts**: descriptions of severe degradation that
   end in "excellent"/"good", and descriptions of a clean image that end in
   "poor"/"bad" (severity read from the words by
   `mechbiqa.analysis.grounding.SeverityLexicon`);
3. **ROUGE-1** (Google's rouge-score) of the generated descriptions against
   the reference descriptions: the benchmark's Q-Pathway-style text, or a
   user's annotations (``--references file.json``: ``{image id: text or [texts]}``).

Method: `mechbiqa.pipeline` loads each checkpoint as a rater (a one-stage
directory, a two-stage pair ``stage1/ + stage2/``, or a real Q-Instruct /
One-Align directory rated as one-stage with the ``mplug_owl2`` template);
`mechbiqa.analysis.grounding.rate_paths` describes every image with greedy
decoding and reads the level-word probabilities along both paths (its
docstring says which model answers which path for each kind of rater).

Output (in ``--out``, default ``cache/grounding/``): ``config.json`` and
``grounding.json`` (per checkpoint: the summary, ROUGE-1 means, and per image
the description, both levels, scores, severity, conflict, ROUGE-1); a table
when run as a script.

Example::

    python studies/grounding.py --split test                    # the compact pair in cache/compact/
    python studies/grounding.py --checkpoint qinstruct=/models/q-instruct --dataset koniq10k=/data/koniq
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa import sources
from mechbiqa.analysis.grounding import (
    GroundingPaths,
    GroundingResult,
    SeverityLexicon,
    grounding,
    rate_paths,
)
from mechbiqa.analysis.rouge import RougeResult, references_for, rouge1
from mechbiqa.sources import tiny_raters

NAME = "grounding"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A grounding run.

    Attributes:
        checkpoints: ``NAME=DIR`` or ``DIR`` entries: a one-stage checkpoint, a two-stage parent
            (``stage1/``, ``stage2/``) or a real checkpoint (no ``mechbiqa.json``: rated as one-stage).
            Empty: the compact pair in ``cache/compact/`` (those that exist).
        tiny_random: Rate with a random tiny one-stage model and a random tiny two-stage pair
            (a pipeline check for tests; the numbers mean nothing).
        dataset: ``builtin`` (``cache/benchmark``), a ``.jsonl`` of IQARecords, ``NAME=ROOT`` of a
            real data set, or a folder of images (no MOS, no references).
        split: Keep one split (``train``/``val``/``test``; None: all).
        limit: Keep the first N images.
        references: A JSON file ``{image id: text or [texts]}`` of reference descriptions; None:
            the records' own descriptions (the benchmark's).
        real_template: Conversation template for real checkpoints (One-Align/Q-Instruct evaluate
            with ``mplug_owl2``).
        max_new_tokens: Longest generated description.
        batch_size: Images per forward.
        chunk: Images preprocessed at a time (memory of the pixels).
        use_stemmer: Porter stemming in ROUGE-1.
        device: ``cpu`` or ``cuda``.
        dtype: Model dtype (``float32``, ``bfloat16``).
        seed: Seed of ``tiny_random``.
        out: Output folder.
    """

    checkpoints: tuple[str, ...] = ()
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    references: str | None = None
    real_template: str = "mplug_owl2"
    max_new_tokens: int = 48
    batch_size: int = 32
    chunk: int = 256
    use_stemmer: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)

    @classmethod
    def tiny(cls, tmp: str | Path, dataset: str | Path, **overrides: Any) -> Config:
        """Seconds: random tiny raters over ``dataset`` (a tiny benchmark's ``.jsonl``), short answers."""
        base = dict(
            tiny_random=True,
            dataset=str(dataset),
            split=None,
            max_new_tokens=6,
            batch_size=16,
            out=str(Path(tmp) / NAME),
        )
        return cls(**{**base, **overrides})


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
class Result:
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


# ----------------------------------------------------------------------------- raters and data
def load_raters(cfg: Config) -> dict[str, Any]:
    """Name -> rater for every checkpoint the config names (missing default ones are skipped).

    Raises:
        SystemExit: If no checkpoint is found (the message says how to get one).
    """
    if cfg.tiny_random:
        return tiny_raters(cfg.seed, cfg.max_new_tokens)
    try:
        return sources.load_raters(
            cfg.checkpoints,
            dtype=cfg.dtype,
            device=cfg.device,
            max_new_tokens=cfg.max_new_tokens,
            real_template=cfg.real_template,
        )
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def load_records(cfg: Config) -> list[Any]:
    """The images to rate: `IQARecord`s (`SampleSource`s for a folder), as every study reads them."""
    try:
        return sources.load_samples(cfg.dataset, cfg.split, cfg.limit)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None


def load_references(cfg: Config, records: Sequence[Any]) -> list[str | Sequence[str]] | None:
    """Reference description(s) per record: a user's JSON file, else the records' descriptions (or None)."""
    ids = [str(r.id) for r in records]
    if cfg.references:
        annotations = json.loads(Path(cfg.references).read_text(encoding="utf-8"))
        if not isinstance(annotations, Mapping):
            raise ValueError(f"{cfg.references} must hold a JSON object {{image id: text or [texts]}}")
        return references_for(ids, annotations)
    texts = [getattr(r, "description", None) for r in records]
    return texts if all(texts) else None  # type: ignore[return-value]


def _mos(records: Sequence[Any]) -> np.ndarray | None:
    values = [getattr(r, "mos01", None) for r in records]
    return None if any(v is None for v in values) else np.asarray(values, dtype=np.float64)


# ----------------------------------------------------------------------------- main
def run_rater(rater: Any, records: Sequence[Any], cfg: Config) -> GroundingPaths:
    """`rate_paths` over the records, ``cfg.chunk`` images preprocessed at a time."""
    from mechbiqa.checkpoint import Checkpoint

    processor = Checkpoint.from_rater(rater).processor
    parts = []
    for start in range(0, len(records), cfg.chunk):
        pixels = processor([r.image_path for r in records[start : start + cfg.chunk]])
        parts.append(rate_paths(rater, pixels, batch_size=cfg.batch_size))
    return GroundingPaths(
        mode=parts[0].mode,
        descriptions=sum((p.descriptions for p in parts), ()),
        answers=sum((p.answers for p in parts), ()),
        image_probs=np.concatenate([p.image_probs for p in parts]),
        text_probs=np.concatenate([p.text_probs for p in parts]),
        final_levels=np.concatenate([p.final_levels for p in parts]),
    )


def main(
    cfg: Config, raters: Mapping[str, Any] | None = None, lexicon: SeverityLexicon | None = None
) -> Result:
    """Rate the images along both paths with every checkpoint; write ``grounding.json`` and the config.

    Args:
        cfg: The run.
        raters: Name -> rater (or ``(rater, path)``) to use instead of loading ``cfg.checkpoints``.
        lexicon: Reads the severity of descriptions (default: the benchmark's words).
    """
    records = load_records(cfg)
    references = load_references(cfg, records)
    mos = _mos(records)
    ids = [str(r.id) for r in records]
    loaded = dict(raters) if raters is not None else load_raters(cfg)
    out: dict[str, CheckpointGrounding] = {}
    with torch.no_grad():
        for name, entry in loaded.items():
            rater, path = entry if isinstance(entry, tuple) else (entry, "")
            paths = run_rater(rater, records, cfg)
            result = grounding(
                paths.image_probs,
                paths.text_probs,
                paths.descriptions,
                final_levels=paths.final_levels,
                ids=ids,
                mos=mos,
                lexicon=lexicon,
            )
            rouge = (
                None
                if references is None
                else rouge1(list(paths.descriptions), references, ids=ids, use_stemmer=cfg.use_stemmer)
            )
            out[name] = CheckpointGrounding(
                name=name, path=path, mode=paths.mode, grounding=result, rouge=rouge, paths=paths
            )
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config": folder / "config.json", "json": folder / f"{NAME}.json"}
    files["config"].write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    payload = {
        "n_images": len(records),
        "summary": {k: c.summary() for k, c in out.items()},
        "checkpoints": {k: c.to_dict() for k, c in out.items()},
    }
    files["json"].write_text(json.dumps(_json_ready(payload), indent=1, allow_nan=False) + "\n")
    return Result(checkpoints=out, n_images=len(records), files=files)


def _json_ready(value: Any) -> Any:
    """Arrays to lists, numpy scalars to Python, NaN/inf to None (strict JSON for other readers)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def render(result: Result, console: Any) -> None:
    """Print the grounding table, the worst ROUGE-1 images and the file paths."""
    from mechbiqa import reports

    console.print(
        reports.grounding_table(
            {k: c.grounding for k, c in result.checkpoints.items()},
            {k: c.rouge for k, c in result.checkpoints.items() if c.rouge is not None},
        )
    )
    for name, c in result.checkpoints.items():
        if c.rouge is not None:
            console.print(reports.rouge_table(c.rouge, limit=5, title=f"ROUGE-1 per image: {name}"))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command line -> Config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a checkpoint or two-stage pair (repeat; default: the compact pair in cache/compact)",
    )
    p.add_argument("--tiny-random", action="store_true", help="random tiny raters (pipeline check)")
    p.add_argument(
        "--dataset", default=d.dataset, help="'builtin', a .jsonl of records, NAME=ROOT, or a folder"
    )
    p.add_argument("--split", default=d.split, help="keep one split (default: test; 'all' for every image)")
    p.add_argument("--limit", type=int, help="keep the first N images")
    p.add_argument("--references", help="JSON {image id: text or [texts]} of reference descriptions")
    p.add_argument("--real-template", default=d.real_template, help="template of real checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--no-stemmer", action="store_true", help="ROUGE-1 without Porter stemming")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output folder (default: cache/grounding)")
    a = p.parse_args(argv)
    return Config(
        checkpoints=tuple(a.checkpoint),
        tiny_random=a.tiny_random,
        dataset=a.dataset,
        split=None if a.split == "all" else a.split,
        limit=a.limit,
        references=a.references,
        real_template=a.real_template,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        use_stemmer=not a.no_stemmer,
        device=a.device,
        dtype=a.dtype,
        seed=a.seed,
        out=a.out,
    )


if __name__ == "__main__":
    from rich.console import Console

    render(main(parse_args()), Console())
