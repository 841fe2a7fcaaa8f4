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
subclass `Lens` with a per-layer translator in front of the same read-out.

Note on the last layer: ``hook_resid_post`` of the last block is the residual
*before* ``ln_final``, so the lens of the last layer is exactly the model's
own logits (a test checks this); applying ``ln_final`` to transformers'
``hidden_states[-1]``, which is already normed, would norm twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechbiqa.model.prompts import LEVEL_WORDS

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
]

RESID = "llm.blocks.{l}.hook_resid_post"
"""What the lens reads from a store, at the ``quality`` selection, every layer."""
LOGITS = "llm.unembed.hook_out"
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
