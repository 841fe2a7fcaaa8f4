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
    python studies/grounding.py --model qinstruct=/models/q-instruct --dataset koniq10k=/data/koniq
    python studies/grounding.py --model /models/one-align --dtype bfloat16 --device cuda --split test
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mechbiqa import cli, outputs, sources
from mechbiqa.analysis.grounding import SeverityLexicon
from mechbiqa.analysis.grounding_checkpoints import GroundingComparison, ground_checkpoint, reference_texts
from mechbiqa.sources import tiny_raters

NAME = "grounding"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A grounding run.

    Attributes:
        checkpoints: ``NAME=DIR`` or ``DIR`` entries (``--model``): a one-stage checkpoint, a two-stage parent
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
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Model dtype (``float32``, ``bfloat16``, ``float16``; weights cast as they are read).
        seed: Seed of ``tiny_random``.
        out: Output folder.
    """

    checkpoints: tuple[str, ...] = field(
        default=(), metadata=cli.meta(flag="--model", aliases=("--checkpoint",))
    )
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = "test"
    limit: int | None = None
    references: str | None = None
    real_template: str = "mplug_owl2"
    max_new_tokens: int = 48
    batch_size: int = 32
    chunk: int = 256
    use_stemmer: bool = field(default=True, metadata=cli.meta(aliases=("--stemmer",)))
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    out: str = str(REPO / "cache" / NAME)

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.max_new_tokens < 1 or self.chunk < 1:
            raise ValueError(
                f"--max-new-tokens {self.max_new_tokens}, --chunk {self.chunk}: pass at least 1 for each"
            )
        if self.references is not None and not Path(self.references).is_file():
            raise FileNotFoundError(f"--references {self.references}: no such file; pass a JSON file of "
                                    "{image id: text or [texts]}")

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


Result = GroundingComparison
"""Every checkpoint's grounding, and where it was written (`mechbiqa.analysis.grounding_checkpoints`)."""


def load_raters(cfg: Config) -> dict[str, Any]:
    """Name -> rater for every checkpoint the config names (missing default ones are skipped).

    Raises:
        FileNotFoundError: If no checkpoint is found (the message says how to get one).
    """
    if cfg.tiny_random:
        return tiny_raters(cfg.seed, cfg.max_new_tokens)
    options = dict(dtype=cfg.dtype, device=cfg.device, max_new_tokens=cfg.max_new_tokens)
    return sources.load_raters(cfg.checkpoints, real_template=cfg.real_template, **options)


def load_records(cfg: Config) -> list[Any]:
    """The images to rate: `IQARecord`s (`SampleSource`s for a folder), as every study reads them."""
    return sources.load_samples(cfg.dataset, cfg.split, cfg.limit)


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
    references = reference_texts(records, cfg.references)
    loaded = dict(raters) if raters is not None else load_raters(cfg)
    out = {}
    with torch.no_grad():
        for name, entry in loaded.items():
            rater, path = entry if isinstance(entry, tuple) else (entry, "")
            out[name] = ground_checkpoint(
                name, rater, records, path=path, references=references, lexicon=lexicon,
                use_stemmer=cfg.use_stemmer, chunk=cfg.chunk, batch_size=cfg.batch_size,
            )  # fmt: skip
    result, folder = Result(checkpoints=out, n_images=len(records)), Path(cfg.out)
    files = {"config": outputs.write_config(folder, cfg)}
    files["json"] = outputs.write_json(folder / f"{NAME}.json", result.to_dict())
    return replace(result, files=files)


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
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
