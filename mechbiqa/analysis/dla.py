"""Direct logit attribution at the quality position: which layer, head, MLP and source writes the decision.

Where it sits: the model (`mechbiqa.model.llm`) builds the final residual at
the quality position as a sum, embeddings + every layer's attention output +
every layer's MLP output, and reads it through the final RMSNorm and the
unembedding. This module splits the decision read there (DESIGN.md, "Direct
logit attribution") into those parts, from a live forward (`dla_live`,
hooks through ``run_with_cache``) or from an activation store recorded with
`DLA_SPEC` (`dla_from_store`); `studies/direct_logit_attribution.py` runs it
and `mechbiqa.figures_attribution` draws it.

The maths, at the quality position of one sample:

    x_final = e + sum_l (sum_h z_lh W_O,lh + m_l)            (resid_post of the last layer)
    logits  = W_U (g * x_final * s),  s = 1 / rms(x_final)     (ln_final gain g, unembedding W_U)

A decision is a combination ``c`` of the five level-word logits (`direction`):
``D = c . logits[levels] = (c W_U[levels] * g * s) . x_final``. With ``s``
**frozen** at its value for this sample, D is linear in ``x_final``, so each
part's projection on ``u = c W_U[levels] * g * s`` is its contribution and
the parts sum to D exactly (up to float rounding; `DLAResult.sum_error`).
A head's write splits further by source position j, because
``z_lh = sum_j a_lhj v_{l,kv(h),j}`` (``a`` the quality row of the pattern,
``v`` the values, already modality-adaptive per token, ``kv(h)`` the key/value
head a query head shares under grouped-query attention): the contribution of
source j is ``a_lhj (v_j W_O,lh) . u``. Summed over the positions of each token
role (`mechbiqa.model.roles`), it says how much of the decision is written
from the image, the instruction, the description, BOS.

Directions (a research choice; the JSON names the one used):

* ``logit_diff``: ``logit(good) - logit(poor)``, the paper's contrast.
* ``score``: the Q-Align expected-score direction with fixed weights,
  ``sum_k (w_k - mean w) logit_k`` (w = `LEVEL_WEIGHTS`): the same for every
  sample, and invariant to a shift of all five logits, like the score itself.
* ``score_gradient``: the gradient of the Q-Align score with respect to the
  five logits at this sample's final point, ``c_k = p_k (w_k - score)``: the
  first-order effect of each part on the score itself (the sum is then
  ``c . logits``, a linearisation, not the score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS
from mechbiqa.model.roles import Role
from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.analysis.scoring_batch import ScoringBatch
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2
    from mechbiqa.store import ActivationStore

__all__ = [
    "DIRECTIONS",
    "DLA_HEADS_SPEC",
    "DLA_SPEC",
    "SOURCE_ROLES",
    "DLAResult",
    "ReadoutWeights",
    "decompose",
    "direction_coefficients",
    "dla_from_store",
    "dla_live",
]

Direction = Literal["logit_diff", "score", "score_gradient"]
DIRECTIONS: tuple[str, ...] = ("logit_diff", "score", "score_gradient")

SOURCE_ROLES: tuple[Role, ...] = (
    Role.BOS,
    Role.INSTRUCTION,
    Role.IMAGE,
    Role.DESCRIPTION,
    Role.QUALITY,
    Role.OTHER,
)
"""The roles a head's write is split by (padding receives no attention)."""

_EMBED = names.resid_pre(names.EACH)  # layer 0 at the quality position: the embedding
_Z = names.attn(names.EACH, "z")
_MLP = names.mlp_out(names.EACH)
_SCALE = names.LN_FINAL_SCALE
_LOGITS = names.LOGITS
_PATTERN = names.pattern(names.EACH)
_V = names.attn(names.EACH, "v")
_RESID = names.resid_post(names.EACH)

DLA_HEADS_SPEC = f"{_EMBED}@quality:0; {_Z}@quality; {_MLP}@quality; {_SCALE}@quality; {_LOGITS}@quality"
"""The sites of the per-head and per-MLP parts alone (no split by source; small: heads x d_head per layer)."""
DLA_SPEC = f"{DLA_HEADS_SPEC}; {_PATTERN}@quality; {_V}@all"
"""The cache spec (`mechbiqa.store.CacheSpec.parse`) `dla_from_store` reads. The first five sites
give the per-head and per-MLP parts (small: heads x d_head per layer); the last two the split by
source position, and ``hook_v@all`` is large (pos x kv_heads x d_head per layer and sample: ~180 MB
in fp16 for a 7B model with a 700-token prompt); drop them for per-head parts only. Record it in
float32 (``--dtype float32``): the parts of an fp16 store sum to the stored logits only to ~1e-3."""


# ----------------------------------------------------------------------------- directions
def direction_coefficients(
    direction: Direction, level_logits: Float[Tensor, "sample level"]
) -> Float[Tensor, "sample level"]:
    """The decision as a combination of the five level-word logits, per sample (see the module docstring)."""
    n = level_logits.shape[0]
    weights = torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64)
    if direction == "logit_diff":
        c = torch.zeros(len(LEVEL_WORDS), dtype=torch.float64)
        c[LEVEL_WORDS.index("good")], c[LEVEL_WORDS.index("poor")] = 1.0, -1.0
        return c.expand(n, -1).clone()
    if direction == "score":
        return (weights - weights.mean()).expand(n, -1).clone()
    if direction == "score_gradient":
        p = level_logits.double().cpu().softmax(-1)
        score = p @ weights
        return p * (weights[None] - score[:, None])
    raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")


@dataclass(frozen=True)
class ReadoutWeights:
    """The weights the decomposition needs (float64 on the CPU, but ``w_o``).

    Attributes:
        w_o: Per layer, ``[d_model, head, d_head]``: its ``o_proj`` split by head, views of the model's
            weights (its dtype and device), cast to float64 one layer at a time where used: a float64
            copy of every layer would take 4.3 GB at 7B.
        ln_final: ``[d_model]`` the final RMSNorm's gain.
        eps: Its epsilon (to recompute the scale from a stored residual).
        w_levels: ``[level, d_model]`` the unembedding rows of the five level words.
        n_kv_heads: Key/value heads (grouped-query attention shares one among ``head / kv_head``).
        level_ids: Token ids of the five level words, best first.
    """

    w_o: Sequence[Tensor]
    ln_final: Tensor
    eps: float
    w_levels: Tensor
    n_kv_heads: int
    level_ids: tuple[int, ...]

    @classmethod
    def from_model(cls, model: MPLUGOwl2, level_ids: Sequence[int]) -> ReadoutWeights:
        """Read them from a model (`mechbiqa.model.MPLUGOwl2`)."""
        cfg = model.llm.cfg
        ids = torch.as_tensor(list(level_ids), dtype=torch.long)
        return cls(
            w_o=tuple(b.attn.o_proj.weight.detach().reshape(cfg.d_model, cfg.n_heads, cfg.d_head)
                      for b in model.llm.blocks),
            ln_final=model.llm.ln_final.weight.detach().double().cpu(),
            eps=float(model.llm.ln_final.eps),
            w_levels=model.llm.unembed.weight.detach()[ids.to(model.llm.unembed.weight.device)]
            .double()
            .cpu(),
            n_kv_heads=cfg.n_kv_heads,
            level_ids=tuple(int(i) for i in level_ids),
        )


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True)
class DLAResult:
    """The decision at the quality position split into what each part of the model writes.

    Attributes:
        direction: Which decision (`DIRECTIONS`).
        layers: ``[layer]`` layer numbers.
        embed: ``[sample]`` contribution of the embedding of the quality token.
        heads: ``[sample, layer, head]`` contribution of each attention head.
        mlp: ``[sample, layer]`` contribution of each MLP.
        target: ``[sample]`` the decision read from the model's own logits (NaN where unknown).
        by_role: ``[sample, layer, head, role]`` each head's contribution split by the role of the
            source position (`SOURCE_ROLES` order), or None without pattern and values.
        image: ``[sample, layer, image_index]`` contribution through every head from each image
            token (first image), or None.
        split_error: Largest |sum over sources - the head's contribution| (None without split).
        sample_ids: The samples.
        labels: ``[sample]`` 0-1 ratings (NaN when unrated).
    """

    direction: str
    layers: np.ndarray
    embed: np.ndarray
    heads: np.ndarray
    mlp: np.ndarray
    target: np.ndarray
    by_role: np.ndarray | None = None
    image: np.ndarray | None = None
    split_error: float | None = None
    sample_ids: tuple[str, ...] = ()
    labels: np.ndarray | None = None

    @property
    def attn(self) -> np.ndarray:
        """``[sample, layer]`` contribution of each layer's attention (its heads summed)."""
        return self.heads.sum(-1)

    @property
    def total(self) -> np.ndarray:
        """``[sample]`` the sum of all parts."""
        return self.embed + self.heads.sum((1, 2)) + self.mlp.sum(1)

    @property
    def sum_error(self) -> float:
        """Largest |sum of the parts - the decision read from the logits| (NaN when no logits)."""
        diff = np.abs(self.total - self.target)
        return float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan")

    @property
    def role_by_layer(self) -> np.ndarray | None:
        """``[layer, role]`` sample-mean contribution written from each source role (heads summed)."""
        return None if self.by_role is None else self.by_role.sum(2).mean(0)

    def top_image_tokens(self, k: int = 5) -> np.ndarray:
        """``[sample, k]`` image indices with the largest |contribution| summed over layers."""
        if self.image is None:
            raise ValueError("no per-source split: record the pattern and values (DLA_SPEC)")
        return np.argsort(-np.abs(self.image.sum(1)), axis=-1, kind="stable")[:, :k]

    def to_dict(self, k: int = 5) -> dict[str, Any]:
        """JSON-ready summary: sample means, per-sample totals."""
        out: dict[str, Any] = {
            "direction": self.direction,
            "layers": self.layers.tolist(),
            "mean_embed": float(self.embed.mean()),
            "mean_attn": self.attn.mean(0).tolist(),
            "mean_mlp": self.mlp.mean(0).tolist(),
            "mean_heads": self.heads.mean(0).tolist(),
            "mean_abs_heads": np.abs(self.heads).mean(0).tolist(),
            "roles": [r.label for r in SOURCE_ROLES],
            "role_by_layer": None if self.by_role is None else self.role_by_layer.tolist(),
            "samples": [
                {"id": s, "target": float(t), "total": float(x)}
                for s, t, x in zip(self.sample_ids, self.target, self.total, strict=True)
            ],
        }
        if self.image is not None:
            out["mean_image_by_layer"] = self.image.mean(0).tolist()
            out["top_image_tokens"] = self.top_image_tokens(k).tolist()
        return out


# ----------------------------------------------------------------------------- the decomposition
def decompose(
    weights: ReadoutWeights,
    coefficients: Float[Tensor, "sample level"],
    embed: Float[Tensor, "sample d_model"],
    z: Float[Tensor, "sample layer head d_head"],
    mlp: Float[Tensor, "sample layer d_model"],
    scale: Float[Tensor, " sample"],
    *,
    pattern: Float[Tensor, "sample layer head key_pos"] | None = None,
    v: Float[Tensor, "sample layer key_pos kv_head d_head"] | None = None,
    roles: Int[np.ndarray, "sample key_pos"] | None = None,
    image_index: Int[np.ndarray, "sample key_pos"] | None = None,
    n_image: int = 0,
) -> dict[str, Any]:
    """Project every part on the frozen-norm decision direction (all maths in float64).

    Args:
        weights: `ReadoutWeights` of the model.
        coefficients: ``[sample, level]`` the decision over the level logits (`direction_coefficients`).
        embed: The residual entering layer 0 at the quality position.
        z: Every layer's ``hook_z`` at the quality position.
        mlp: Every layer's ``hook_mlp_out`` there.
        scale: The final norm's ``1 / rms`` there (``llm.ln_final.hook_scale``), frozen.
        pattern: The quality row of every layer's attention (for the split by source).
        v: Every layer's values at every key position (``hook_v``, same key axis as ``pattern``).
        roles: ``[sample, key_pos]`` `Role` of each key position.
        image_index: ``[sample, key_pos]`` index inside the image, -1 elsewhere.
        n_image: Image tokens per image.

    Returns:
        ``embed``, ``heads``, ``mlp`` (arrays) and, with the split, ``by_role``, ``image``,
        ``split_error``.
    """
    f64 = lambda t: torch.as_tensor(t).detach().double().cpu()  # noqa: E731
    u = (f64(coefficients) @ weights.w_levels) * weights.ln_final * f64(scale)[:, None]  # [sample, d_model]
    head_dir = torch.stack([torch.einsum("dhe,sd->she", w.double().cpu(), u) for w in weights.w_o],
                           1)  # [sample, layer, head, d_head]: W_O,lh^T u
    out: dict[str, Any] = {
        "embed": (f64(embed) * u).sum(-1).numpy(),
        "heads": (f64(z) * head_dir).sum(-1).numpy(),
        "mlp": torch.einsum("sld,sd->sl", f64(mlp), u).numpy(),
    }
    if pattern is None or v is None or roles is None:
        return out
    n_heads = head_dir.shape[2]
    v64 = f64(v).repeat_interleave(n_heads // weights.n_kv_heads, dim=3)  # [sample, layer, key, head, d_head]
    per_source = f64(pattern) * torch.einsum("slkhe,slhe->slhk", v64, head_dir)  # [sample, layer, head, key]
    out["split_error"] = float((per_source.sum(-1) - torch.from_numpy(out["heads"])).abs().max())
    roles_t = torch.as_tensor(np.asarray(roles), dtype=torch.long)
    onehot = torch.stack([roles_t == int(r) for r in SOURCE_ROLES], -1).double()  # [sample, key, role]
    out["by_role"] = torch.einsum("slhk,skr->slhr", per_source, onehot).numpy()
    if image_index is not None and n_image:
        index = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
        is_image = (roles_t == int(Role.IMAGE)) & (index >= 0) & (index < n_image)
        slot = torch.nn.functional.one_hot(index.clamp(0, n_image - 1), n_image).double()
        slot = slot * is_image[..., None]  # [sample, key, image]
        out["image"] = torch.einsum("slhk,ski->sli", per_source, slot).numpy()
    return out


def _target(coefficients: Tensor, level_logits: Tensor | None, n: int) -> np.ndarray:
    if level_logits is None:
        return np.full(n, np.nan)
    return (coefficients.double() * level_logits.double().cpu()).sum(-1).numpy()


# ----------------------------------------------------------------------------- live
def dla_live(
    model: MPLUGOwl2,
    batch: ScoringBatch,
    level_ids: Sequence[int],
    direction: Direction = "logit_diff",
    *,
    sample_ids: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    chunk: int | None = None,
) -> DLAResult:
    """Direct logit attribution from hooked forwards of a batch of scoring prompts.

    Args:
        model: The model (eval mode).
        batch: The prompts, images and padded roles (`mechbiqa.analysis.scoring_batch`).
        level_ids: Token ids of the five level words, best first.
        direction: The decision (`DIRECTIONS`).
        sample_ids: Names of the samples.
        labels: ``[sample]`` ratings.
        chunk: Images per forward (None: all at once; the cache keeps every layer's values).
    """
    size = len(batch) if chunk is None else max(1, int(chunk))
    weights = ReadoutWeights.from_model(model, level_ids)
    pieces = [
        _live_parts(model, batch.select(slice(lo, lo + size)), weights, direction)
        for lo in range(0, len(batch), size)
    ]
    parts: dict[str, Any] = {
        k: np.concatenate([p[k] for p in pieces]) for k in pieces[0] if k != "split_error"
    }
    if "split_error" in pieces[0]:
        parts["split_error"] = max(p["split_error"] for p in pieces)
    n_layers, n = len(model.llm.blocks), len(batch)
    return DLAResult(
        direction=direction,
        layers=np.arange(n_layers),
        sample_ids=tuple(sample_ids) if sample_ids is not None else tuple(map(str, range(n))),
        labels=np.full(n, np.nan) if labels is None else np.asarray(labels, dtype=float),
        **parts,
    )


def _live_parts(model: MPLUGOwl2, batch: ScoringBatch, weights: ReadoutWeights, direction: Direction) -> dict:
    """`decompose` of one hooked forward, with the decision read from the model's logits (``target``)."""
    n_layers = len(model.llm.blocks)
    wanted = {_SCALE, _LOGITS, _EMBED.format(l=0)} | {
        t.format(l=layer) for t in (_Z, _MLP, _PATTERN, _V) for layer in range(n_layers)
    }
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids.to(model.device),
            images=batch.pixels.to(model.device, model.dtype),
            attention_mask=batch.attention_mask.to(model.device),
            names_filter=lambda name: name in wanted,
        )
    device = cache[_LOGITS].device
    rows, q = torch.arange(len(batch), device=device), batch.quality.to(device)
    at_q = lambda name: cache[name][rows, q]  # noqa: E731  [batch, ...] at the quality column
    per_layer = lambda t: torch.stack([at_q(t.format(l=x)) for x in range(n_layers)], 1)  # noqa: E731
    level_logits = at_q(_LOGITS)[:, torch.as_tensor(weights.level_ids, device=device)]
    coefficients = direction_coefficients(direction, level_logits)
    parts = decompose(
        weights,
        coefficients,
        at_q(_EMBED.format(l=0)),
        per_layer(_Z),
        per_layer(_MLP),
        at_q(_SCALE)[:, 0],
        pattern=torch.stack([cache[_PATTERN.format(l=x)][rows, :, q] for x in range(n_layers)], 1),
        v=torch.stack([cache[_V.format(l=x)] for x in range(n_layers)], 1),
        roles=batch.role_array,
        image_index=batch.image_index,
        n_image=model.cfg.n_image_tokens,
    )
    return {**parts, "target": _target(coefficients, level_logits, len(batch))}


# ----------------------------------------------------------------------------- store
def dla_from_store(
    store: ActivationStore,
    weights: ReadoutWeights,
    direction: Direction = "logit_diff",
    *,
    split: bool = True,
) -> DLAResult:
    """Direct logit attribution of every sample of a store recorded with `DLA_SPEC` (no forward pass).

    Samples without a quality position are left out. The decision's value comes from the stored
    logits (`_LOGITS` at ``quality``), else from the stored last residual through the final norm,
    else it is NaN. The split by source needs the pattern and ``hook_v@all``; without them (or with
    ``split=False``) only the per-head parts are computed.

    Raises:
        LookupError: A site the per-head parts need is missing (the message names it and the fix).
    """
    fix = f"record the store with studies/cache_activations.py --spec '{DLA_SPEC}' --dtype float32"
    keys = set(store.keys)
    for need in (f"{_Z}@quality", f"{_MLP}@quality", f"{_EMBED}@quality"):
        if need not in keys:
            raise LookupError(f"direct logit attribution needs {need}; {store.path} lacks it; {fix}")
    if 0 not in store.spec_of(_EMBED, "quality").layers:
        raise LookupError(
            f"direct logit attribution needs {_EMBED.format(l=0)}@quality (the embedding); {fix}"
        )
    rows = store.valid[store.counts("quality") > 0]
    if not len(rows):
        raise LookupError(f"no sample of {store.path} has a quality position")
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    z = as_t(store.get(_Z, "quality", samples=rows)[:, :, 0])  # [sample, layer, head, d_head]
    mlp = as_t(store.get(_MLP, "quality", samples=rows)[:, :, 0])
    layers = np.asarray(store.spec_of(_Z, "quality").layers)
    if len(layers) != len(weights.w_o) or list(store.spec_of(_MLP, "quality").layers) != list(layers):
        raise LookupError(f"direct logit attribution needs {_Z} and {_MLP} at every layer; {fix}")
    embed = as_t(store.get(_EMBED, "quality", layers=0, samples=rows)[:, 0])
    resid = None
    if f"{_RESID}@quality" in keys and layers[-1] in store.spec_of(_RESID, "quality").layers:
        resid = as_t(store.get(_RESID, "quality", layers=int(layers[-1]), samples=rows)[:, 0])
    if f"{_SCALE}@quality" in keys:
        scale = as_t(store.get(_SCALE, "quality", samples=rows)[:, 0, 0])
    elif resid is not None:
        scale = torch.rsqrt(resid.pow(2).mean(-1) + weights.eps)
    else:  # the parts sum to the last residual: recompute its scale from them
        total = embed + mlp.sum(1) + sum(
            torch.einsum("she,dhe->sd", z[:, i], w.double().cpu()) for i, w in enumerate(weights.w_o))
        scale = torch.rsqrt(total.pow(2).mean(-1) + weights.eps)
    if f"{_LOGITS}@quality" in keys:
        level_logits = as_t(store.get(_LOGITS, "quality", samples=rows)[:, 0][:, list(weights.level_ids)])
    elif resid is not None:  # the model's own read-out of the stored last residual
        normed = weights.ln_final * resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + weights.eps)
        level_logits = normed @ weights.w_levels.T
    else:
        level_logits = None
    coefficients = direction_coefficients(
        direction, level_logits if level_logits is not None else torch.zeros(len(rows), len(LEVEL_WORDS))
    )
    extra: dict[str, Any] = {}
    if split and f"{_PATTERN}@quality" in keys and f"{_V}@all" in keys:
        extra = dict(
            pattern=as_t(store.get(_PATTERN, "quality", samples=rows)[:, :, :, 0]),
            v=as_t(store.get(_V, "all", samples=rows)),
            roles=store.roles(rows),
            image_index=store.image_index(rows),
            n_image=int(store.info.model_config["abstractor"]["n_queries"]) + 1,
        )
    parts = decompose(weights, coefficients, embed, z, mlp, scale, **extra)
    return DLAResult(
        direction=direction,
        layers=layers,
        target=_target(coefficients, level_logits, len(rows)),
        sample_ids=tuple(store.ids(rows)),
        labels=store.labels(rows),
        **parts,
    )
