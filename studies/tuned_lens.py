"""Tuned lens on the quality position: how early is the answer decodable, read in each layer's own basis?

Question: the logit lens (`studies/logit_lens.py`) reads every layer through
the final norm and unembedding, which were trained on the last layer only, so
early and middle layers look undecided (or flip between "poor" and "good")
partly because they are read in the wrong basis. Does a lens that learns each
layer's basis see the answer earlier?

Method: per layer an affine translator A_l h + b_l (initialised to the
identity, where it is the logit lens) before the model's final norm and
unembedding (`mechbiqa.analysis.lens.TunedLens`, Belrose et al. 2023), trained
with AdamW to minimise KL(final || lens) over the full vocabulary on the
store's quality-position residuals (``llm.blocks.{l}.hook_resid_post@quality``)
of a training part of the samples; the last layer stays the identity.
**Held out**: ``--holdout`` of the samples (seeded) are not trained on; the
KL per layer and the agreement with the final answer are reported on them
only, for both lenses.

Output (in ``--out``, default ``<store dir>/<store stem>.tuned_lens/``): the
lens artefact (``config.json`` with the training settings, ``params.pt``; give
the folder to ``studies/logit_lens.py --tuned-lens``), ``tuned_lens.json``
(``checks.kl_tuned``, ``checks.kl_logit``: one held-out value per layer), the
figure.

Example::

    python studies/tuned_lens.py --store cache/acts.h5
    python studies/logit_lens.py --store cache/acts.h5 --tuned-lens cache/acts.tuned_lens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa import cli, outputs
from mechbiqa import figures_attribution as fa
from mechbiqa.analysis.lens import (
    RESID,
    TunedLensTraining,
    analyse_lens,
    check_lens,
    kl_to_final,
    train_tuned_lens,
)
from mechbiqa.scoring import level_ids
from mechbiqa.sources import load_lens, stored_model
from mechbiqa.store import ActivationStore

NAME = "tuned_lens"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """A tuned-lens training run.

    Attributes:
        store: The activation store (``studies/cache_activations.py --out``; the default spec has
            what it needs).
        model: Checkpoint whose final norm and lm_head the lens reads through; None: the store's.
        out: The lens folder; None: ``<store dir>/<store stem>.tuned_lens``.
        training: Steps, learning rate, decay, batch, hold-out fraction and seed (`TunedLensTraining`).
    """

    store: str = str(REPO / "cache" / "activations.h5")
    model: str | None = None
    out: str | None = None
    training: TunedLensTraining = TunedLensTraining()

    def __post_init__(self) -> None:
        """Refuse out-of-range options before the store is read (the message names the option)."""
        cli.check_common(self)
        t = self.training
        if t.steps < 0 or not t.lr > 0 or t.weight_decay < 0:
            raise ValueError(
                f"--steps {t.steps} --lr {t.lr} --weight-decay {t.weight_decay}: pass steps >= 0, lr > 0, "
                "weight decay >= 0"
            )

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """The store of ``studies/cache_activations.py``'s ``Config.tiny(tmp)`` (``tmp/tiny.h5``)."""
        base = dict(store=str(Path(tmp) / "tiny.h5"), out=str(Path(tmp) / NAME),
                    training=TunedLensTraining(steps=60, lr=3e-2))  # fmt: skip
        return cls(**{**base, **overrides})

    @property
    def out_dir(self) -> Path:
        """Where the lens and the artefacts go."""
        store = Path(self.store)
        return Path(self.out) if self.out else store.parent / f"{store.stem}.{NAME}"


@dataclass(frozen=True)
class Result:
    """Held-out comparison of the two lenses, and where it was written.

    Attributes:
        layers: ``[layer]``.
        kl: ``{"tuned": [layer], "logit": [layer]}`` held-out KL(final || lens), nats.
        agreement: The same keys: held-out fraction of samples whose answer equals the final one.
        n_train: Samples trained on.
        n_heldout: Samples held out.
        files: Artefact name -> path.
    """

    layers: np.ndarray
    kl: dict[str, np.ndarray]
    agreement: dict[str, np.ndarray]
    n_train: int
    n_heldout: int
    files: dict[str, Path] = field(default_factory=dict)


def main(cfg: Config) -> Result:
    """Read the residuals, train on part, compare both lenses on the rest, save the lens."""
    with ActivationStore.open(cfg.store) as store:
        source = cfg.model or stored_model(store)
        base, tokenizer = load_lens(source)
        check_lens(store, base)  # a lens of another model than the store's is refused
        try:
            spec = store.spec_of(RESID, "quality")
        except KeyError:
            raise LookupError(
                f"the tuned lens needs {RESID}@quality, every layer; {cfg.store} lacks it: record it with "
                "studies/cache_activations.py (its default spec)"
            ) from None
        rows = store.valid[store.counts("quality") > 0]
        resid = torch.from_numpy(
            np.ascontiguousarray(store.get(RESID, "quality", samples=rows)[:, :, 0].transpose(1, 0, 2))
        ).float()
    layers = [int(x) for x in spec.layers]
    fit = train_tuned_lens(base, resid, layers, cfg.training)
    held = resid[:, torch.from_numpy(fit.heldout)]
    lenses = {"tuned": fit.lens, "logit": base}
    kl = {k: kl_to_final(lens, held, layers) for k, lens in lenses.items()}
    ids = level_ids(tokenizer)
    agreement = {k: analyse_lens(lens, held, ids, layers).agreement for k, lens in lenses.items()}

    out = cfg.out_dir
    fit.lens.save(out, model=source, store=str(cfg.store), training=cfg.training, train_samples=fit.train,
                  heldout_samples=fit.heldout, study=cfg)  # fmt: skip
    summary = {
        "store": str(cfg.store),
        "model": source,
        "layers": layers,
        "n_train": len(fit.train),
        "n_heldout": len(fit.heldout),
        "checks": {"kl_tuned": kl["tuned"], "kl_logit": kl["logit"]},
        "agreement": agreement,
        "train_loss": {
            "first": float(fit.loss[0]) if len(fit.loss) else None,
            "last": float(fit.loss[-1]) if len(fit.loss) else None,
        },
    }
    files = {
        "config": out / "config.json",
        "params": out / "params.pt",
        "json": outputs.write_json(out / f"{NAME}.json", summary),
        "figure": fa.tuned_lens_figure(layers, kl, agreement, out / f"{NAME}.png"),
    }
    return Result(np.asarray(layers), kl, agreement, len(fit.train), len(fit.heldout), files)


def render(result: Result, console: Any) -> None:
    """Print the per-layer comparison."""
    console.print(fa.tuned_lens_table(result.layers.tolist(), result.kl, result.agreement))
    console.print(
        f"trained on {result.n_train} samples; numbers above on {result.n_heldout} held-out samples"
    )
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
