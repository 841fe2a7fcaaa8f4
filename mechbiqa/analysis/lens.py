"""Logit lens on the quality position: which level word each LLM layer would answer.

Where it sits: the recorder (`mechbiqa.store.record`) stores every layer's
residual at the quality position (``llm.blocks.{l}.hook_resid_post@quality``)
in an activation store (`mechbiqa.store`); `studies/logit_lens.py` reads them
as ``[layer, sample, d_model]`` and hands them to a `Lens`, and this module
turns the lens's logits into the quantities of DESIGN.md ("Logit lens"):
level-word probabilities per layer, the layer where the answer settles, the
agreement of each layer with the final answer, and trajectories split by the
final answer. A lens of another model than the store's is refused (`check_lens`,
by the read-out fingerprint the store holds). `mechbiqa.reports.lens_table`
and `mechbiqa.figures.lens_trajectories` render the `LensResult`.

The lens follows tuned-lens's design: a `Lens` maps a layer's residual to
vocabulary logits; `LogitLens`, the trivial case, applies the model's own
final norm and unembedding (nostalgebraist 2020). A trained (tuned) lens would
subclass `Lens` with a per-layer translator in front of the same read-out:
`TunedLens` (Belrose et al. 2023), trained by `train_tuned_lens` on a store's
quality-position residuals (`studies/tuned_lens.py`) and saved as a
tuned-lens-style artefact (``config.json`` + ``params.pt``) that the lens
studies load with ``--tuned-lens``.

Note on the last layer: ``hook_resid_post`` of the last block is the residual
*before* ``ln_final``, so the lens of the last layer is exactly the model's
own logits (a test checks this); applying ``ln_final`` to transformers'
``hidden_states[-1]``, which is already normed, would norm twice.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechbiqa.model.prompts import LEVEL_WORDS
from mechbiqa.outputs import write_json
from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.store import ActivationStore

__all__ = [
    "RESID",
    "LOGITS",
    "Lens",
    "LogitLens",
    "LensResult",
    "analyse_lens",
    "check_lens",
    "lens_from_store",
    "settle_layers",
    "TUNED_LENS_PARAMS",
    "TunedLens",
    "TunedLensFit",
    "TunedLensTraining",
    "kl_to_final",
    "train_tuned_lens",
]

RESID = names.resid_post(names.EACH)
"""What the lens reads from a store, at the ``quality`` selection, every layer."""
LOGITS = names.LOGITS
"""The model's own logits at the quality position (optional: checks the lens at the last layer)."""


class Lens(ABC):
    """Map residual-stream states of a layer to vocabulary logits."""

    @abstractmethod
    def logits(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Vocabulary logits of residuals read at the output of ``layer``."""

    def __call__(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Alias of `logits`."""
        return self.logits(resid, layer)

    def readout_fingerprint(self, dtype: torch.dtype) -> str | None:
        """`mechbiqa.store.identity.readout_fingerprint` of the model this lens reads out with.

        A store holds its model's (``model_identity["readout"]``), so `lens_from_store` refuses
        a lens of another model even when the store has no logits to compare. None: unknown
        (no check).
        """
        return None


class LogitLens(Lens):
    """``unembed(ln_final(resid))``: the model's own read-out applied to every layer.

    Args:
        ln_final: The model's final RMSNorm (``model.llm.ln_final``).
        unembed: The model's ``lm_head`` (``model.llm.unembed``).
    """

    def __init__(self, ln_final: nn.Module, unembed: nn.Module, source: str = "") -> None:  # noqa: D107 (documented on the class)
        self.ln_final = ln_final
        self.unembed = unembed
        self.source = source  # where the read-out came from (named in errors)

    @classmethod
    def from_model(cls, model: MPLUGOwl2, source: str = "") -> LogitLens:
        """The lens of a model (its modules, shared, not copied); ``source`` names it in errors."""
        return cls(model.llm.ln_final, model.llm.unembed, source)

    def readout_fingerprint(self, dtype: torch.dtype) -> str:
        """The fingerprint of the final norm and unembedding, cast to ``dtype`` (see `Lens`)."""
        from mechbiqa.store.identity import readout_fingerprint

        return readout_fingerprint(self.ln_final.weight, self.unembed.weight, dtype)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, dtype: torch.dtype = torch.float32) -> LogitLens:
        """Read only the final norm and ``lm_head`` of a checkpoint directory (no full model).

        What the offline logit lens needs besides the store: two tensors, read by their original
        key names (``model.norm.weight``, ``lm_head.weight``) without loading the rest.

        Raises:
            mechbiqa.model.load.CheckpointError: The directory lacks one of them.
        """
        from safetensors import safe_open

        from mechbiqa.model.config import ModelConfig
        from mechbiqa.model.llm import RMSNorm, Unembed
        from mechbiqa.model.load import CheckpointError, find_weight_files, iter_tensors, to_original

        directory = Path(directory)
        cfg = ModelConfig.from_json(directory).llm
        wanted = {to_original("llm.ln_final.weight"): "norm", to_original("llm.unembed.weight"): "unembed"}
        found: dict[str, Tensor] = {}
        for path in find_weight_files(directory):
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in set(wanted) & set(f.keys()):
                        found[wanted[key]] = f.get_tensor(key)
            else:
                found.update({wanted[k]: t for k, t in iter_tensors([path]) if k in wanted})
        missing = sorted(set(wanted.values()) - set(found))
        if missing:
            raise CheckpointError(
                f"{directory} has no {[k for k, v in wanted.items() if v in missing]}: the "
                "logit lens needs the final norm and lm_head of the model that made the store"
            )
        norm, unembed = RMSNorm(cfg.d_model, cfg.rms_norm_eps), Unembed(cfg.d_model, cfg.vocab_size)
        with torch.no_grad():
            norm.weight.copy_(found["norm"])
            unembed.weight.copy_(found["unembed"])
        return cls(norm.to(dtype).eval(), unembed.to(dtype).eval(), str(directory))

    @torch.no_grad()
    def logits(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Apply the final norm then the unembedding (``layer`` is not used: one read-out for all)."""
        weight = self.unembed.weight
        # the norm takes [batch, pos, d_model]: flatten the leading axes into batch
        flat = resid.to(weight.device, weight.dtype).reshape(-1, 1, resid.shape[-1])
        return self.unembed(self.ln_final(flat)).reshape(*resid.shape[:-1], -1)


@dataclass(frozen=True)
class LensResult:
    """The logit lens at the quality position of a set of samples.

    Attributes:
        layers: ``[layer]`` the layer numbers (output of block ``l``).
        level_words: The level words, best first.
        level_probs: ``[layer, sample, level]`` softmax over the level-word logits only (the
            Q-Align rule, so each layer is read exactly as the final answer is).
        level_mass: ``[layer, sample]`` full-vocabulary probability of the five level words
            together: how much of the layer's prediction is a level word at all.
        answer: ``[layer, sample]`` argmax level index per layer.
        final: ``[sample]`` the last layer's answer (the model's own).
        settle: ``[sample]`` the layer from which on the answer equals the final one (the
            layer after the argmax last changes).
        n_changes: ``[sample]`` how often the argmax changes from one layer to the next.
        agreement: ``[layer]`` fraction of samples whose answer at the layer equals the final.
        by_answer: ``[final level, layer, level]`` mean level probabilities over the samples with
            that final answer (NaN where none).
        n_by_answer: ``[final level]`` samples per final answer.
        top_ids: ``[layer, k]`` most probable tokens of the sample-mean full-vocabulary
            distribution per layer.
        top_probs: ``[layer, k]`` their probabilities.
        top_tokens: ``[layer][k]`` their decoded text ("" when no tokenizer was given).
        sample_ids: The samples, in order.
        labels: ``[sample]`` 0-1 ratings (NaN when unrated).
        last_layer_error: Max |lens logits - the model's own logits| at the last layer, relative to
            the largest logit, when the store holds the model's logits (None otherwise).
        n_excluded: Samples left out because they have no quality position.
    """

    layers: np.ndarray
    level_words: tuple[str, ...]
    level_probs: np.ndarray
    level_mass: np.ndarray
    answer: np.ndarray
    final: np.ndarray
    settle: np.ndarray
    n_changes: np.ndarray
    agreement: np.ndarray
    by_answer: np.ndarray
    n_by_answer: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: tuple[tuple[str, ...], ...]
    sample_ids: tuple[str, ...]
    labels: np.ndarray
    last_layer_error: float | None = None
    n_excluded: int = 0

    @property
    def mean_level_probs(self) -> np.ndarray:
        """``[layer, level]`` level probabilities averaged over samples."""
        return self.level_probs.mean(axis=1)

    @property
    def settle_layer(self) -> int:
        """The layer from which on every sample's answer is final (the latest settle)."""
        return int(self.settle.max())

    @property
    def median_settle(self) -> float:
        """Median over samples of the settle layer."""
        return float(np.median(self.settle))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-sample arrays included)."""
        return {
            "layers": self.layers.tolist(),
            "level_words": list(self.level_words),
            "mean_level_probs": self.mean_level_probs.tolist(),
            "level_mass": self.level_mass.mean(1).tolist(),
            "agreement": self.agreement.tolist(),
            "settle_layer": self.settle_layer,
            "median_settle": self.median_settle,
            "last_layer_error": self.last_layer_error,
            "n_excluded": self.n_excluded,
            "by_answer": {
                w: (None if n == 0 else self.by_answer[k].tolist())
                for k, (w, n) in enumerate(zip(self.level_words, self.n_by_answer, strict=True))
            },
            "n_by_answer": dict(zip(self.level_words, self.n_by_answer.tolist(), strict=True)),
            "top_tokens": [list(t) for t in self.top_tokens],
            "top_probs": self.top_probs.tolist(),
            "samples": [
                {
                    "id": s,
                    "label": None if np.isnan(lab) else float(lab),
                    "final": self.level_words[f],
                    "settle": int(st),
                    "n_changes": int(c),
                    "answers": [self.level_words[a] for a in ans],
                }
                for s, lab, f, st, c, ans in zip(
                    self.sample_ids,
                    self.labels,
                    self.final,
                    self.settle,
                    self.n_changes,
                    self.answer.T,
                    strict=True,
                )
            ],
        }


def settle_layers(answer: np.ndarray, layers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer from which on each sample's answer stays final, and how often it changes.

    Args:
        answer: ``[layer, sample]`` argmax per layer.
        layers: ``[layer]`` layer numbers.

    Returns:
        ``settle [sample]`` (a layer number) and ``n_changes [sample]``.
    """
    answer = np.asarray(answer)
    differs = answer != answer[-1:]  # [layer, sample]: not yet the final answer
    # the last layer that differs; the answer settles one layer later (the first layer if none differs)
    last_diff = np.where(differs.any(0), len(layers) - 1 - np.argmax(differs[::-1], axis=0), -1)
    settle = np.asarray(layers)[last_diff + 1]
    n_changes = (answer[1:] != answer[:-1]).sum(0)
    return settle, n_changes


@torch.no_grad()
def analyse_lens(
    lens: Lens,
    resid: Float[Tensor, "layer sample d_model"] | np.ndarray,
    level_ids: Sequence[int],
    layers: Sequence[int] | None = None,
    *,
    tokenizer: Any | None = None,
    top_k: int = 5,
    sample_ids: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    chunk: int = 256,
) -> LensResult:
    """Apply a lens to every layer's residual at the quality position and summarise.

    Args:
        lens: The lens (`LogitLens.from_model(model)`).
        resid: ``[layer, sample, d_model]`` residuals (``hook_resid_post`` of each layer).
        level_ids: Token ids of the five level words, best first.
        layers: The layer number of each row of ``resid`` (default ``0..``).
        tokenizer: Decodes the top tokens (anything with ``decode([id])``); optional.
        top_k: How many top tokens per layer.
        sample_ids: Names of the samples.
        labels: ``[sample]`` ratings, kept for the report.
        chunk: Samples per lens call (memory: ``chunk x vocab`` floats per layer).

    Returns:
        A `LensResult`.
    """
    resid_t = torch.as_tensor(np.asarray(resid)) if isinstance(resid, np.ndarray) else resid
    n_layers, n_samples = resid_t.shape[:2]
    if n_samples == 0:
        raise ValueError("analyse_lens got no samples")
    layer_numbers = np.arange(n_layers) if layers is None else np.asarray(list(layers), dtype=np.int64)
    if len(layer_numbers) != n_layers:
        raise ValueError(f"{len(layer_numbers)} layer numbers for {n_layers} layers of residuals")
    if len(level_ids) != len(LEVEL_WORDS):
        raise ValueError(
            f"need the ids of the {len(LEVEL_WORDS)} level words {LEVEL_WORDS}; got {len(level_ids)}"
        )
    ids = torch.as_tensor(list(level_ids), dtype=torch.long)
    level_probs = np.zeros((n_layers, n_samples, len(ids)))
    level_mass = np.zeros((n_layers, n_samples))
    mean_probs: list[Tensor] = []
    for li, layer in enumerate(layer_numbers):
        total = None
        for start in range(0, n_samples, chunk):
            logits = lens(resid_t[li, start : start + chunk], int(layer)).double()  # [chunk, vocab]
            full = logits.softmax(-1)
            level_logits = logits[:, ids.to(logits.device)]
            level_probs[li, start : start + chunk] = level_logits.softmax(-1).cpu().numpy()
            level_mass[li, start : start + chunk] = full[:, ids.to(full.device)].sum(-1).cpu().numpy()
            part = full.sum(0).cpu()
            total = part if total is None else total + part
        mean_probs.append(total / n_samples)  # type: ignore[operator]
    mean = torch.stack(mean_probs)  # [layer, vocab]
    k = min(top_k, mean.shape[-1])
    top = mean.topk(k, dim=-1)
    top_ids = top.indices.numpy()
    decode = (lambda i: tokenizer.decode([int(i)])) if tokenizer is not None else (lambda i: "")
    top_tokens = tuple(tuple(decode(i) for i in row) for row in top_ids)

    answer = level_probs.argmax(-1)  # [layer, sample]
    final = answer[-1]
    settle, n_changes = settle_layers(answer, layer_numbers)
    agreement = (answer == final[None]).mean(1)
    by_answer = np.full((len(ids), n_layers, len(ids)), np.nan)
    n_by_answer = np.bincount(final, minlength=len(ids))
    for level in range(len(ids)):
        chosen = final == level
        if chosen.any():
            by_answer[level] = level_probs[:, chosen].mean(1)
    return LensResult(
        layers=layer_numbers,
        level_words=tuple(LEVEL_WORDS),
        level_probs=level_probs,
        level_mass=level_mass,
        answer=answer,
        final=final,
        settle=settle,
        n_changes=n_changes,
        agreement=agreement,
        by_answer=by_answer,
        n_by_answer=n_by_answer,
        top_ids=top_ids,
        top_probs=top.values.numpy(),
        top_tokens=top_tokens,
        sample_ids=tuple(sample_ids) if sample_ids is not None else tuple(str(i) for i in range(n_samples)),
        labels=np.full(n_samples, np.nan) if labels is None else np.asarray(labels, dtype=float),
    )


def check_lens(store: ActivationStore, lens: Lens) -> None:
    """Refuse a lens whose read-out is not the one of the model the store was recorded from.

    Raises:
        mechbiqa.store.StoreMismatchError: One line naming the store, both models and the fix.
    """
    from mechbiqa.store import StoreMismatchError

    identity = store.info.model_identity
    stored = identity.get("readout")
    if not stored:  # a store written before read-out fingerprints: the logits check remains
        return
    mine = lens.readout_fingerprint(getattr(torch, identity.get("dtype", "float32")))
    if mine is not None and mine != stored:
        given = getattr(lens, "source", "") or "the given model"
        recorded = store.info.model or "?"
        raise StoreMismatchError(
            f"{store.path} was recorded from model {recorded}, but the lens comes from {given}, another "
            f"model (read-out fingerprint {mine}, the store's {stored}): pass the checkpoint the store "
            f"was recorded from (--model {recorded}), or record the store again with this model"
        )


def lens_from_store(
    store: ActivationStore,
    lens: Lens,
    level_ids: Sequence[int],
    *,
    tokenizer: Any | None = None,
    top_k: int = 5,
    tolerance: float = 0.05,
) -> LensResult:
    """The logit lens over every sample of a store (offline: no forward pass).

    Reads `RESID` at the ``quality`` selection for every stored layer; samples without a
    quality position (a generated answer without a level word) are left out and counted.
    A lens of another model than the store's is refused: by the read-out fingerprint the
    store holds (`Lens.readout_fingerprint`), and, when the store also holds the model's
    logits (`LOGITS` at ``quality``), by the lens of the last layer reproducing them.

    Args:
        store: An open `mechbiqa.store.ActivationStore`.
        lens: The lens (from the model or checkpoint the store was recorded with).
        level_ids: Token ids of the five level words.
        tokenizer: Decodes the top tokens.
        top_k: Top tokens per layer.
        tolerance: Largest accepted relative difference from the stored logits (fp16 storage
            rounds residuals and logits to ~1e-3 relative).

    Raises:
        LookupError: The store lacks `RESID` at ``quality``, its last layer, or any sample
            with a quality position (the message names the hook or role and the fix).
        mechbiqa.store.StoreMismatchError: The lens reads out with another model than the
            store was recorded from.
        ValueError: The lens does not reproduce the stored logits.
    """
    from mechbiqa.model.config import ModelConfig

    check_lens(store, lens)

    fix = f"record it with studies/cache_activations.py --spec 'default' (or add '{RESID}@quality' to --spec)"
    try:
        spec = store.spec_of(RESID, "quality")
    except KeyError as error:
        raise LookupError(
            f"the logit lens needs hook {RESID} at the quality position, every layer; "
            f"{store.path} lacks it ({error.args[0]}); {fix}"
        ) from None
    n_layers = ModelConfig.from_dict(store.info.model_config).llm.n_layers
    if n_layers - 1 not in spec.layers:
        raise LookupError(
            f"the logit lens needs {RESID.replace('{l}', str(n_layers - 1))} (the last layer, whose "
            f"answer is the model's) at the quality position; {store.path} holds layers "
            f"{list(spec.layers)}; {fix}"
        )
    counts = store.counts("quality")
    keep = np.flatnonzero(counts > 0)
    if not len(keep):
        raise LookupError(
            f"no sample of {store.path} has a token with role 'quality' (the position whose logits "
            "choose the level word): score with a prompt that ends before the level word "
            "(--mode score), or generate answers that contain one"
        )
    valid = store.valid
    rows = valid[keep]
    resid = store.get(RESID, "quality", samples=rows)[:, :, 0]  # [sample, layer, d_model]
    resid_t = torch.from_numpy(
        np.ascontiguousarray(resid.transpose(1, 0, 2))
    ).float()  # [layer, sample, d_model]
    error = None
    if LOGITS + "@quality" in store.keys:
        own = torch.from_numpy(store.get(LOGITS, "quality", samples=rows)[:, 0].astype(np.float32))
        mine = lens(resid_t[-1], int(spec.layers[-1])).float().cpu()
        error = float((mine - own).abs().max() / own.abs().max().clamp(min=1e-6))
        if error > tolerance:
            raise ValueError(
                f"the lens does not reproduce the logits stored in {store.path} at the last layer "
                f"(relative difference {error:.3g} > {tolerance}): the store was recorded with another "
                "model; pass the checkpoint it was recorded from (--model)"
            )
    result = analyse_lens(
        lens,
        resid_t,
        level_ids,
        spec.layers,
        tokenizer=tokenizer,
        top_k=top_k,
        sample_ids=store.ids(rows),
        labels=store.labels(rows),
    )
    return replace(result, last_layer_error=error, n_excluded=int(len(valid) - len(keep)))


# ----------------------------------------------------------------------------- tuned lens
TUNED_LENS_PARAMS = "params.pt"
"""The translators' weights in a tuned-lens directory (beside ``config.json``)."""


class TunedLens(Lens):
    """``unembed(ln_final(A_l h + b_l))``: a learned affine translator per layer before the model's read-out.

    Belrose et al. (2023): the logit lens misreads early and middle layers because their
    residuals live in a basis the final norm and unembedding were not trained on; a per-layer
    affine map, trained to make the lens's distribution match the model's final one, corrects
    for that. Translators start at the identity (``A = I``, ``b = 0``), where the tuned lens *is*
    the logit lens. The last layer's translator stays the identity: its residual is what the
    model reads, so the lens there must reproduce the model's own logits (and
    `lens_from_store` checks it does).

    Args:
        base: The logit lens whose norm and unembedding follow the translators (frozen).
        layers: The layer numbers with a translator.
        last_layer: The model's last layer (kept the identity); None: ``max(layers)``.
    """

    def __init__(self, base: LogitLens, layers: Sequence[int], last_layer: int | None = None) -> None:  # noqa: D107
        self.base = base
        self.layers = tuple(int(x) for x in layers)
        self.last_layer = max(self.layers) if last_layer is None else int(last_layer)
        d_model = base.unembed.weight.shape[1]
        weight = base.unembed.weight
        self.translators = nn.ModuleDict()
        for layer in self.layers:
            linear = nn.Linear(d_model, d_model, bias=True, device=weight.device, dtype=torch.float32)
            with torch.no_grad():
                linear.weight.copy_(torch.eye(d_model))
                linear.bias.zero_()
            linear.requires_grad_(layer != self.last_layer)
            self.translators[str(layer)] = linear

    def readout_fingerprint(self, dtype: torch.dtype) -> str:
        """The read-out fingerprint of the base lens: the model the translators read out through."""
        return self.base.readout_fingerprint(dtype)

    def translate(
        self, resid: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch d_model"]:
        """``A_l resid + b_l`` (float32; differentiable)."""
        if str(int(layer)) not in self.translators:
            raise KeyError(f"the tuned lens has no translator for layer {layer}; it has {list(self.layers)}")
        translator = self.translators[str(int(layer))]
        return translator(resid.to(translator.weight.device, torch.float32))

    def forward_logits(
        self, resid: Float[Tensor, "*batch d_model"], layer: int
    ) -> Float[Tensor, "*batch vocab"]:
        """The lens's logits with gradients to the translators (training)."""
        weight = self.base.unembed.weight
        h = self.translate(resid, layer).reshape(-1, 1, resid.shape[-1]).to(weight.dtype)
        return self.base.unembed(self.base.ln_final(h)).reshape(*resid.shape[:-1], -1)

    @torch.no_grad()
    def logits(self, resid: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Translate, then the final norm and the unembedding."""
        return self.forward_logits(resid, layer)

    def save(self, directory: str | Path, **info: Any) -> Path:
        """Write ``config.json`` (layers, widths and ``info``) and `TUNED_LENS_PARAMS`; return the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weight = self.base.unembed.weight
        config = {
            "kind": "tuned_lens",
            "d_model": int(weight.shape[1]),
            "vocab_size": int(weight.shape[0]),
            "layers": list(self.layers),
            "last_layer": self.last_layer,
            "readout": self.base.readout_fingerprint(torch.float32),  # `load` checks the model by it
            **info,
        }
        state = {k: v.detach().cpu() for k, v in self.translators.state_dict().items()}
        torch.save(state, directory / TUNED_LENS_PARAMS)
        write_json(directory / "config.json", config)  # strict JSON: dataclasses and arrays in info too
        return directory

    @classmethod
    def load(cls, directory: str | Path, base: LogitLens) -> TunedLens:
        """Read a saved tuned lens onto the read-out of the model it was trained for.

        Raises:
            FileNotFoundError: The folder lacks ``config.json`` or the parameters.
            ValueError: The lens was trained for a model of other widths, or for another model
                (its read-out fingerprint differs).
        """
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / TUNED_LENS_PARAMS).is_file():
            raise FileNotFoundError(
                f"{directory} is not a tuned lens (no config.json + {TUNED_LENS_PARAMS}); "
                "train one with studies/tuned_lens.py --store STORE"
            )
        config = json.loads((directory / "config.json").read_text())
        weight = base.unembed.weight
        if (config["d_model"], config["vocab_size"]) != (weight.shape[1], weight.shape[0]):
            raise ValueError(
                f"the tuned lens in {directory} was trained for d_model={config['d_model']}, vocab="
                f"{config['vocab_size']}; this model has {weight.shape[1]}, {weight.shape[0]}: "
                "pass the model it was trained with"
            )
        stored = config.get("readout")  # absent in lenses saved before the check
        if stored and base.readout_fingerprint(torch.float32) != stored:
            raise ValueError(
                f"the tuned lens in {directory} was trained for another model ({config.get('model', '?')}, "
                f"read-out fingerprint {stored}), not for {getattr(base, 'source', '') or 'the given one'}: "
                "pass the model it was trained with (--model), or train a tuned lens for this model"
            )
        lens = cls(base, config["layers"], config["last_layer"])
        state = torch.load(directory / TUNED_LENS_PARAMS, map_location=weight.device, weights_only=True)
        lens.translators.load_state_dict(state)
        return lens


@dataclass(frozen=True)
class TunedLensTraining:
    """How a tuned lens is trained (full-batch AdamW on the store's quality-position residuals).

    Attributes:
        steps: Optimiser steps.
        lr: Learning rate.
        weight_decay: AdamW decay (pulls ``A`` and ``b`` toward zero; 0: none).
        batch_size: Samples per step (None: all training samples).
        holdout: Fraction of the samples held out for the reported KL (at least one sample).
        seed: Seed of the hold-out split and the batches.
    """

    steps: int = 300
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int | None = 256
    holdout: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValueError(
                f"holdout={self.holdout} must be in (0, 1): the KL is reported on held-out samples"
            )


@dataclass(frozen=True)
class TunedLensFit:
    """A trained tuned lens and its losses.

    Attributes:
        lens: The `TunedLens`.
        train: ``[sample]`` indices (into the residuals given) it was trained on.
        heldout: ``[sample]`` the held-out indices.
        loss: ``[step]`` mean training KL per step.
    """

    lens: TunedLens
    train: np.ndarray
    heldout: np.ndarray
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))


def kl_to_final(
    lens: Lens,
    resid: Float[Tensor, "layer sample d_model"],
    layers: Sequence[int],
    *,
    chunk: int = 256,
) -> np.ndarray:
    """``[layer]`` mean over samples of KL(final || lens at the layer), full vocabulary, nats.

    The final distribution is the lens of the last row of ``resid`` (for `LogitLens` and
    `TunedLens`, the model's own logits).
    """
    out = np.zeros(len(layers))
    n = resid.shape[1]
    with torch.no_grad():
        for start in range(0, n, chunk):
            part = resid[:, start : start + chunk]
            final = lens(part[-1], int(layers[-1])).double().log_softmax(-1)
            for i, layer in enumerate(layers):
                mine = lens(part[i], int(layer)).double().log_softmax(-1)
                out[i] += float((final.exp() * (final - mine)).sum(-1).sum())
    return out / n


def train_tuned_lens(
    base: LogitLens,
    resid: Float[Tensor, "layer sample d_model"],
    layers: Sequence[int],
    config: TunedLensTraining = TunedLensTraining(),
    *,
    last_layer: int | None = None,
    heldout: Sequence[int] | np.ndarray | None = None,
) -> TunedLensFit:
    """Train per-layer translators to minimise KL(final || tuned lens) on part of the samples.

    Args:
        base: The model's logit lens (final norm and unembedding, kept frozen).
        resid: ``[layer, sample, d_model]`` residuals at the quality position (``hook_resid_post``).
        layers: The layer number of each row of ``resid``; the last row is the model's output.
        config: Steps, learning rate, hold-out.
        last_layer: The model's last layer (default: ``layers[-1]``).
        heldout: The samples to hold out (indices into ``resid``; e.g. one fold of a
            cross-fitting); None: a seeded ``config.holdout`` fraction.

    Returns:
        A `TunedLensFit` (the held-out samples are for the reported KL; see `kl_to_final`).
    """
    layers = [int(x) for x in layers]
    n = resid.shape[1]
    if n < 2:
        raise ValueError(f"training a tuned lens needs at least 2 samples (one held out); got {n}")
    if heldout is None:
        order = np.random.default_rng(config.seed).permutation(n)
        n_held = min(n - 1, max(1, round(config.holdout * n)))
        heldout, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    else:
        heldout = np.unique(np.asarray(heldout, dtype=np.int64))
        if not len(heldout) or heldout.min() < 0 or heldout.max() >= n or len(heldout) == n:
            raise ValueError(
                f"heldout must name between 1 and {n - 1} of the {n} samples (indices 0..{n - 1}); "
                f"got {len(heldout)} indices in [{heldout.min() if len(heldout) else '-'}, "
                f"{heldout.max() if len(heldout) else '-'}]"
            )
        train = np.setdiff1d(np.arange(n), heldout)
    lens = TunedLens(base, layers, last_layer if last_layer is not None else layers[-1])
    for p in list(base.ln_final.parameters()) + list(base.unembed.parameters()):
        p.requires_grad_(False)  # the read-out is the model's own
    params = [p for p in lens.translators.parameters() if p.requires_grad]
    resid32 = resid.float()
    with torch.no_grad():
        target = lens.forward_logits(resid32[-1], layers[-1]).float().log_softmax(-1)  # [sample, vocab]
    losses: list[float] = []
    if params:
        optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        batch = len(train) if config.batch_size is None else min(config.batch_size, len(train))
        g = torch.Generator().manual_seed(config.seed)
        train_t = torch.from_numpy(train)
        trained = [(i, layer) for i, layer in enumerate(layers) if layer != lens.last_layer]
        for _ in range(config.steps):
            rows = train_t[torch.randperm(len(train_t), generator=g)[:batch]]
            with torch.enable_grad():
                p_final = target[rows]
                kls = []
                for i, layer in trained:
                    mine = lens.forward_logits(resid32[i, rows], layer).float().log_softmax(-1)
                    kls.append((p_final.exp() * (p_final - mine)).sum(-1).mean())
                loss = torch.stack(kls).mean()
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
    return TunedLensFit(lens=lens, train=train, heldout=heldout, loss=np.asarray(losses))

