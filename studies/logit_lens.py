"""Logit lens on the quality token (the paper's Fig. 3 and 6).

Question: at which LLM layer is the quality level decodable from the residual
stream at the quality position, and do intermediate layers flip between
levels (e.g. "poor" and "good") before the answer settles?

Method: read every layer's residual at the quality position
(``llm.blocks.{l}.hook_resid_post@quality``) from an activation store written
by ``studies/cache_activations.py``; apply the model's final norm and
unembedding to each (`mechbiqa.analysis.lens.LogitLens`; only those two
tensors are read from the checkpoint the store was recorded with, no forward
pass runs); take the softmax over the five level words per layer (the Q-Align
rule the final answer is read with). The answer *settles* at the layer after
which the argmax never changes; agreement = fraction of samples whose layer
answer equals the final one; trajectories are split by the final answer. The
last layer must reproduce the logits stored with the residuals.

Output (in ``--out``, default ``<store dir>/<store stem>.logit_lens/``):
``config.json``, ``logit_lens.json``, ``logit_lens.png``; the table below when
run as a script. With ``--paper-figures``, also the paper's Figs. 3, 5 and 6 in
``paper/`` (`mechbiqa.analysis.paper_figures`: one image's top-4 candidates per
layer, the attention aligned by role, the argmax level of the samples labelled
"poor" over the last layers).

Example::

    python studies/cache_activations.py --model cache/compact/one-stage --split test --out cache/acts.h5
    python studies/logit_lens.py --store cache/acts.h5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechbiqa import cli, figures, outputs, reports
from mechbiqa.analysis.lens import LensResult, lens_from_store
from mechbiqa.scoring import level_ids
from mechbiqa.sources import load_lens, stored_model
from mechbiqa.store import ActivationStore

NAME = "logit_lens"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A logit-lens run.

    Attributes:
        store: The activation store (``studies/cache_activations.py --out``).
        model: Checkpoint directory whose final norm, lm_head and tokenizer the lens uses;
            None: the model the store names (its checkpoint path, or the tiny random model).
        out: Output folder; None: ``<store dir>/<store stem>.logit_lens``.
        top_k: Top tokens per layer in the report.
        tuned_lens: A tuned lens folder (``studies/tuned_lens.py``) to read the layers with
            instead of the plain logit lens; None: the logit lens.
        paper_figures: Also draw the paper's Figs. 3, 5 and 6 (``<out>/paper/``).
    """

    store: str = str(REPO / "cache" / "activations.h5")
    model: str | None = None
    out: str | None = None
    top_k: int = 5
    tuned_lens: str | None = None
    paper_figures: bool = False

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.top_k < 1:
            raise ValueError(f"--top-k {self.top_k}: show at least 1 token per layer")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The store of ``studies/cache_activations.py``'s ``Config.tiny(tmp)`` (``tmp/tiny.h5``)."""
        return cls(**{"store": str(Path(tmp) / "tiny.h5"), "out": str(Path(tmp) / NAME), **overrides})

    @property
    def out_dir(self) -> Path:
        """Where the artefacts go."""
        store = Path(self.store)
        return Path(self.out) if self.out else store.parent / f"{store.stem}.{NAME}"


@dataclass(frozen=True)
class Result:
    """The lens and where it was written.

    Attributes:
        lens: The `LensResult`.
        files: Artefact name -> path (``config``, ``json``, ``figure``).
        model: What the lens was read from.
    """

    lens: LensResult
    files: dict[str, Path] = field(default_factory=dict)
    model: str = ""
    paper: dict[str, Any] | None = None


def main(cfg: Config) -> Result:
    """Read the store, apply the lens, write JSON, figure and config."""
    store_path = Path(cfg.store)
    with ActivationStore.open(store_path) as store:
        source = cfg.model or stored_model(store)
        lens, tokenizer = load_lens(source)
        if cfg.tuned_lens:
            from mechbiqa.analysis.lens import TunedLens

            lens = TunedLens.load(cfg.tuned_lens, lens)
        result = lens_from_store(store, lens, level_ids(tokenizer), tokenizer=tokenizer, top_k=cfg.top_k)
    out = cfg.out_dir
    summary = {"store": str(store_path), "model": source, **result.to_dict()}
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", summary),
    }
    files["figure"] = figures.lens_trajectories(result, out / f"{NAME}.png")
    paper = None
    if cfg.paper_figures:
        from mechbiqa.analysis.paper_figures import paper_figures

        paper = paper_figures(store_path, out / "paper", read_out=(lens, tokenizer))
        files.update({f"paper {k}": Path(v) for k, v in paper["files"].items()})
    return Result(lens=result, files=files, model=source, paper=paper)


def render(result: Result, console: Any) -> None:
    """Print the lens table and the split by final answer."""
    console.print(reports.lens_table(result.lens))
    console.print(reports.lens_answers_table(result.lens))
    if result.paper:
        from mechbiqa.analysis.paper_figures import Fig6Data

        console.print(reports.fig6_table(Fig6Data.from_dict(result.paper["fig6"])))
    lens = result.lens
    console.print(
        f"answers settle by layer {lens.settle_layer} (median {lens.median_settle:g}); "
        f"{(lens.n_changes > 0).mean():.0%} of samples change their answer across layers"
        + (f"; {lens.n_excluded} samples without a quality position left out" if lens.n_excluded else "")
    )
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
