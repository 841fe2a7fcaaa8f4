"""Attention attribution of the quality token (the paper's Fig. 5).

Question: when the model picks the level word, where does the quality position
look: at the image, the instruction, its own description, BOS? And within the
image, is the attention spread over the 65 image tokens or concentrated on a
few (the paper finds five), the same few for every image?

Method: read the quality position's attention row of every layer and head
(``llm.blocks.{l}.attn.hook_pattern@quality``) and every sample's token roles
from an activation store written by ``studies/cache_activations.py``; sum the
row over the keys of each role, per layer and head, and average over samples
(`mechbiqa.analysis.attribution.attribute`). Rank each sample's image tokens
by their attention averaged over the chosen layers and all heads; keep the
top-k (default 5) and the k least attended; measure consistency across samples
as the frequency of each image index in the top-k and the mean pairwise
Jaccard index of the top-k sets (against its value for random k-subsets).
No model is needed.

Output (in ``--out``, default ``<store dir>/<store stem>.attention_attribution/``):
``config.json``, ``attention_attribution.json`` (per-sample top-k and least-k
included: ``studies/patch_image_tokens.py`` can take them), and
``attention_attribution.png`` (layers x positions heatmap with role bands).

Example::

    python studies/attention_attribution.py --store cache/acts.h5 --k 5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechbiqa import cli, figures, outputs, reports
from mechbiqa.analysis.attribution import AttributionResult, attribute_store
from mechbiqa.store import ActivationStore

NAME = "attention_attribution"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """An attribution run.

    Attributes:
        store: The activation store.
        out: Output folder; None: ``<store dir>/<store stem>.attention_attribution``.
        k: Dominant image tokens per sample (the paper's five).
        score_layers: Layers whose attention ranks the image tokens; None: all layers.
    """

    store: str = str(REPO / "cache" / "activations.h5")
    out: str | None = None
    k: int = 5
    score_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.k < 1:
            raise ValueError(f"--k {self.k}: ask for at least one dominant token")

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The store of ``studies/cache_activations.py``'s ``Config.tiny(tmp)``; k=2 of its 5 image tokens."""
        return cls(**{"store": str(Path(tmp) / "tiny.h5"), "out": str(Path(tmp) / NAME), "k": 2, **overrides})

    @property
    def out_dir(self) -> Path:
        """Where the artefacts go."""
        store = Path(self.store)
        return Path(self.out) if self.out else store.parent / f"{store.stem}.{NAME}"


@dataclass(frozen=True)
class Result:
    """The attribution and where it was written.

    Attributes:
        attribution: The `AttributionResult`.
        files: Artefact name -> path.
    """

    attribution: AttributionResult
    files: dict[str, Path] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Read the store, attribute, write JSON, heatmap and config."""
    with ActivationStore.open(cfg.store) as store:
        result = attribute_store(store, k=cfg.k, score_layers=cfg.score_layers)
    out = cfg.out_dir
    files = {
        "config": outputs.write_config(out, cfg),
        "json": outputs.write_json(out / f"{NAME}.json", {"store": str(cfg.store), **result.to_dict()}),
    }
    files["figure"] = figures.attention_heatmap(result, out / f"{NAME}.png")
    return Result(attribution=result, files=files)


def render(result: Result, console: Any) -> None:
    """Print the role table and the dominant tokens."""
    console.print(reports.attribution_table(result.attribution))
    console.print(reports.dominant_tokens_table(result.attribution))
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
