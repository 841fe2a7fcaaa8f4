"""Layer-wise probes and a score-regression head on the quality position (the third paper's question).

Question: where does quality become *linearly decodable* in the residual
stream at the quality position, compared with where the model's *words*
settle (the logit lens); and is a continuous score read from the hidden state
by a small regressor (Q-Scorer's score-token idea) better than Q-Align's
level-word score?

Method: read every layer's residual at the quality position
(``llm.blocks.{l}.hook_resid_post@quality``), the 0-1 labels and the records
(reference photo, split) from an activation store written by
``studies/cache_activations.py``; no forward pass runs.

* Ridge probe per layer (`mechbiqa.analysis.probes.probe_layers`): nested
  cross-validation by reference *photo* (crops of one photo share content, so
  they never straddle folds), the penalty chosen by inner photo-grouped CV from
  a fixed grid; SRCC within the held-out folds, beside a shuffled-label control.
* Logit-lens curve: the Q-Align score read through the model's final norm and
  lm_head at each layer (`mechbiqa.analysis.lens`), its SRCC in the same folds,
  and the share of samples whose lens answer already equals the final answer.
* Score head (`train_score_head`): an MLP on one layer's state (default the
  last) trained on the ``train`` photos, epoch chosen on ``val``, scored on
  ``test``, beside a ridge probe on the same layer and split and the Q-Align
  level-word score of the same test images (SRCC/PLCC, `mechbiqa.metrics`).

With ``--checkpoint DIR`` instead of a store, the checkpoint first rates a
data set and its own scoring prompts are recorded into ``<out>/rated.h5``
(`data_from_rater`, `mechbiqa.analysis.capture.record_rater`; what
``studies/cache_activations.py --mode rated`` writes): a one-stage model's
image + own description, or a two-stage pair's text-only stage-2 prompt,
whose quality position sees no image token. The study then reads that store.

Output (in ``--out``, default ``<store dir>/<store stem>.probes/``):
``config.json``, ``probes.json`` (curves, comparison, per-layer alphas),
``score_head/`` (the head with its config JSON), ``rated.h5`` with ``--checkpoint``;
tables when run as a script.

Example::

    python studies/cache_activations.py --model cache/compact/one-stage --out cache/stores/one-stage.h5
    python studies/probes.py --store cache/stores/one-stage.h5
    python studies/probes.py --checkpoint cache/compact/two-stage --out cache/probes/two-stage
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mechbiqa import cli, outputs
from mechbiqa.analysis.probe_data import (  # noqa: F401  (the study's names for the library's)
    RESID,
    ProbeData,
    ProbeRun,
    analyse_probes,
    data_from_checkpoint,
    data_from_rater,
    data_from_store,
    photo_of,
)
from mechbiqa.analysis.probe_data import ProbeAnalysis as Result
from mechbiqa.analysis.probes import RidgeConfig, ScoreHeadConfig
from mechbiqa.reports_studies import probes_summary_line

NAME = "probes"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A probes run.

    Attributes:
        store: The activation store (``studies/cache_activations.py --out``).
        model: Checkpoint directory for the logit-lens curve (its final norm, lm_head, tokenizer);
            None: the model the store names.
        lens: Compute the logit-lens curve and the level-word score (needs the model's read-out).
        out: Output folder; None: ``<store dir>/<store stem>.probes``.
        ridge: The ridge probes' penalty grid and photo folds (`RidgeConfig`).
        n_shuffles: Shuffled-label fits per layer (the chance curve); 0: none.
        head: The score head and its training (`ScoreHeadConfig`; options ``--head-*``).
        train_split: Records of this split train the head.
        val_split: ... choose its epoch (none present: the last epoch).
        eval_split: ... score it against the level-word score.
        seed: Seeds the shuffles (the head has its own, ``--head-seed``).
        device: Where the ridge algebra runs (``cuda`` for 7B stores), and where ``checkpoint`` loads.
        save_head: Write the trained head to ``<out>/score_head``.
        checkpoint: Compute the residuals live from this checkpoint (one-stage, two-stage pair or
            real) over ``dataset`` instead of reading ``store``.
        dataset: With ``checkpoint``: ``builtin``, a ``.jsonl`` of records or ``NAME=ROOT``.
        limit: With ``checkpoint``: keep the first N images.
        max_new_tokens: With ``checkpoint``: longest generated description.
        batch_size: With ``checkpoint``: images per forward.
        dtype: With ``checkpoint``: model dtype (the weights are cast as they are read).
    """

    store: str = str(REPO / "cache" / "activations.h5")
    model: str | None = None
    lens: bool = True
    out: str | None = None
    ridge: RidgeConfig = RidgeConfig()
    n_shuffles: int = 1
    head: ScoreHeadConfig = field(default=ScoreHeadConfig(), metadata=cli.meta(prefix="head"))
    train_split: str = "train"
    val_split: str = "val"
    eval_split: str = "test"
    seed: int = 0
    device: str = "cpu"
    save_head: bool = True
    checkpoint: str | None = None
    dataset: str = "builtin"
    limit: int | None = None
    max_new_tokens: int = 48
    batch_size: int = 32
    dtype: str = "float32"

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.n_shuffles < 0 or self.max_new_tokens < 1:
            raise ValueError(
                f"--n-shuffles {self.n_shuffles}, --max-new-tokens {self.max_new_tokens}: "
                "pass n_shuffles >= 0 and max_new_tokens >= 1"
            )

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """Seconds: the store of ``cache_activations.py``'s ``Config.tiny(tmp)``; small folds and head."""
        base = dict(
            store=str(Path(tmp) / "tiny.h5"),
            out=str(Path(tmp) / NAME),
            ridge=RidgeConfig(n_splits=2, inner_splits=2),
            head=ScoreHeadConfig(epochs=20, hidden=16),
        )
        return cls(**{**base, **overrides})

    @property
    def out_dir(self) -> Path:
        """Where the artefacts go."""
        if self.out:
            return Path(self.out)
        if self.checkpoint:
            return REPO / "cache" / NAME / Path(self.checkpoint).name
        store = Path(self.store)
        return store.parent / f"{store.stem}.{NAME}"


def _run(cfg: Config) -> ProbeRun:
    return ProbeRun(**{f.name: getattr(cfg, f.name) for f in fields(ProbeRun)})


def analyse(data: ProbeData, cfg: Config) -> Result:
    """Probe curve, lens curve and head comparison of already-read data (no files written)."""
    return analyse_probes(data, _run(cfg))


def main(cfg: Config, data: ProbeData | None = None) -> Result:
    """Read the store (or use ``data``), fit probes and head, write ``probes.json``, the head and the config.

    Args:
        cfg: The run.
        data: Arrays to analyse instead of reading ``cfg.store`` (tests, callers with their own arrays).
    """
    if data is None and cfg.checkpoint:  # loaded as studies/grounding.py loads checkpoints and data sets
        data = data_from_checkpoint(
            cfg.checkpoint, cfg.dataset, cfg.out_dir / "rated.h5", limit=cfg.limit, batch_size=cfg.batch_size,
            dtype=cfg.dtype, device=cfg.device, max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
    data = data if data is not None else data_from_store(cfg.store, cfg.model, lens=cfg.lens)
    result = analyse(data, cfg)
    out = cfg.out_dir
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", result.to_dict()),
    }
    if cfg.save_head:
        files["head"] = result.head.save(out / "score_head")
    return replace(result, files=files)


def render(result: Result, console: Any) -> None:
    """Print the layer curves and the score-head comparison."""
    from mechbiqa import reports

    console.print(reports.probe_table(result.curve, result.lens_srcc, result.lens_agreement))
    console.print(reports.score_head_table({"": result.comparison}))
    console.print(probes_summary_line(result))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
