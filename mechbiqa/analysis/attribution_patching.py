"""Attribution patching: first-order activation patching of every image position x layer at once.

Where it sits: `mechbiqa.analysis.patching` runs activation patching, one
forward per edited (site, layer, positions); attention weights
(`mechbiqa.analysis.attribution`) rank image tokens by where the quality
position looks, not by what they change. This module estimates the effect of
patching *every* image position at *every* layer from one forward and one
backward per image (DESIGN.md, "Attribution patching"; Nanda 2023, Syed et
al. 2023):

    effect(site, layer, p) ~= (a_ref - a_clean)[p] . d metric / d a[p]

where ``a`` is the activation of the site's hook at layer ``l`` (the residual
entering the layer, ``resid``; or the keys and values the layer computes,
``kv``, the two terms summed, as `mechbiqa.analysis.patching.SITES` patches
them together), ``a_ref`` is the reference (zeros, or the activation of another
image at the same image index, the ``source`` setter of the patching sweep),
and the metric is read at the quality position (the good-minus-poor logit
difference or the Q-Align score). The estimate is exact when the metric is
linear in the patched activation, and the further a patch moves the model,
the worse it gets, and worst where a softmax saturates: a key moved far changes a
saturated attention pattern a lot with a near-zero gradient. The QK fix of AtP*
(Kramar et al. 2024, ``qk_fix``, the default) recomputes that pattern exactly for
each patched key, one position at a time, from the scores of the same forward
(`qk_fixed_kv_effect`). `activation_patching_grid` runs the same grid with
`mechbiqa.analysis.patching.sweep` for validation (`correlation`).
`studies/attribution_patching.py` runs both and draws the layer x position map
(`mechbiqa.figures_attribution`).

Gradients are taken with ``torch.autograd.grad`` on the hooked activations
themselves (non-leaf tensors of one forward); a hook on ``hook_image_tokens``
makes the spliced image rows a leaf that requires grad, so parameters need
not require grad and the vision tower stays out of the backward. The batch is
one row per image, and a row's metric depends only on its own row, so the
gradient of the summed metric is each row's own gradient. Images run in chunks
of ``chunk`` (memory: a backward keeps every layer's activations); the
``source`` reference of an image in another chunk comes from one extra no-grad
forward, the reference run (`mechbiqa.analysis.patching.gather_activations`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechbiqa.analysis.patching import SITES, Configuration, Edit, Readout, Setter, gather_activations, sweep
from mechbiqa.model.prompts import LEVEL_WEIGHTS, LEVEL_WORDS
from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.model.mplug_owl2 import MPLUGOwl2

__all__ = [
    "Metric",
    "AttributionPatchingResult",
    "activation_patching_grid",
    "attribution_patching",
    "compare_with_attention",
    "correlation",
    "farthest_reference",
    "metric_of",
    "qk_fixed_kv_effect",
    "top_overlap",
]

Metric = Literal["logit_diff", "score"]
_PATTERN = names.pattern(names.EACH)
_THROUGH_KV = "|through_kv"
_K, _V, _RESID = (
    names.template(names.attn(0, "k")),
    names.template(names.attn(0, "v")),
    names.template(names.resid_pre(0)),
)


def metric_of(
    logits: Float[Tensor, "batch vocab"], readout: Readout, metric: Metric
) -> Float[Tensor, " batch"]:
    """The metric at the quality position (differentiable): logit(positive) - logit(negative) or the score."""
    level = logits[:, torch.as_tensor(readout.level_ids, device=logits.device)].double()
    if metric == "logit_diff":
        return level[:, LEVEL_WORDS.index(readout.positive)] - level[:, LEVEL_WORDS.index(readout.negative)]
    if metric == "score":
        return level.softmax(-1) @ torch.tensor(LEVEL_WEIGHTS, dtype=torch.float64, device=logits.device)
    raise ValueError(f"unknown metric {metric!r}; choose 'logit_diff' or 'score'")


@dataclass(frozen=True)
class AttributionPatchingResult:
    """Estimated patching effects on the metric.

    Attributes:
        metric: ``logit_diff`` or ``score``.
        reference: ``zero`` or ``source``.
        sites: Site name -> hook templates (`mechbiqa.analysis.patching.SITES` or given).
        layers: ``[layer]`` the layers of the per-layer templates.
        effects: Hook template -> ``[clean, layer, k]`` estimated effect of patching position ``k``
            (``[clean, 1, k]`` for a hook without layers).
        clean_metric: ``[clean]`` the metric of the unpatched run.
        source_of: ``[clean]`` the reference image of each one (None for ``zero``).
        pattern: ``[clean, layer, head, key_pos]`` the quality row of every layer's attention in
            the same forward (padded coordinates), when asked.
    """

    metric: str
    reference: str
    sites: Mapping[str, tuple[str, ...]]
    layers: np.ndarray
    effects: Mapping[str, np.ndarray]
    clean_metric: np.ndarray
    source_of: np.ndarray | None = None
    pattern: np.ndarray | None = None

    def site(self, name: str) -> np.ndarray:
        """``[clean, layer, k]`` the estimate of patching a site (its hooks' terms summed)."""
        return sum(self.effects[h] for h in self.sites[name])  # type: ignore[return-value]

    def importance(self, name: str = "resid") -> np.ndarray:
        """``[clean, k]`` each position's largest |estimated effect| over layers.

        Research choice: patching the residual at layer l acts on every later layer, so the
        per-layer effects are not additive; the largest one says how much the position can matter.
        """
        return np.abs(self.site(name)).max(1)


# ----------------------------------------------------------------------------- the estimate
def _hook_names(template: str, layers: Sequence[int]) -> list[str]:
    return names.each_layer(template, layers)


def attribution_patching(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "clean text_pos"],
    images: Float[Tensor, "clean 3 S S"] | None,
    positions: Int[Tensor, "clean k"],
    readout: Readout,
    *,
    metric: Metric = "logit_diff",
    reference: Literal["zero", "source"] = "zero",
    source_of: Int[Tensor, " clean"] | None = None,
    sites: Sequence[str] | Mapping[str, Sequence[str]] = ("resid", "kv"),
    layers: Sequence[int] | None = None,
    attention_mask: Int[Tensor, "clean text_pos"] | None = None,
    keep_pattern: bool = False,
    chunk: int | None = None,
    steps: int = 1,
    qk_fix: bool = True,
    resid_path: Literal["kv_sum", "gradient"] = "kv_sum",
) -> AttributionPatchingResult:
    """Gradient x (reference - clean) at every (site, layer, position), one forward and one backward.

    Args:
        model: The model (eval mode).
        input_ids: ``[clean, text_pos]`` prompts with one image each.
        images: ``[clean, 3, S, S]`` their images.
        positions: ``[clean, k]`` the positions to estimate (e.g. every image token), in the
            spliced (left-padded) coordinates the model computes in.
        readout: Level-word ids and the quality column.
        metric: ``logit_diff`` or ``score`` (read with `metric_of`).
        reference: ``zero`` (zero ablation) or ``source`` (the activation of image
            ``source_of[i]`` at the same index of ``positions``: the other image's run is the
            same batch's row, so it costs no extra forward).
        source_of: The reference image of each clean image (``source``).
        sites: Names of `mechbiqa.analysis.patching.SITES`, or name -> hook templates (``{l}`` for
            the layer; a hook without ``{l}`` gets one layer slot) whose position axis is 1.
        layers: Layers (default: all).
        attention_mask: For padded prompts.
        keep_pattern: Also return the quality row of every layer's attention.
        chunk: Images per forward/backward (None: all at once). With ``source`` and several
            chunks, the reference activations come from one extra no-grad run (the reference run).
        steps: Gradients averaged along the path from the clean image to the reference one
            (``source`` only): the image rows (``hook_image_tokens``) are interpolated at
            ``alpha = 0, 1/steps, ..., (steps-1)/steps`` and the gradient at each site is the mean over
            those runs (integrated gradients on the input, as EAP-IG, Hanna et al. 2024). 1: the
            plain estimate (the gradient at the clean run). Research choice: a patch that moves the
            model far (a saturated attention, a confident answer) has a near-zero gradient at the
            clean point; the path average sees the curvature between the two images.
        qk_fix: Recompute the attention pattern a patched key makes (AtP*'s QK fix, Kramar et al. 2024,
            `qk_fixed_kv_effect`) instead of linearising the softmax: for a key site (``hook_k``) its
            term is the exact change of the layer's pattern-weighted values ``z`` times the gradient
            at ``z``, the value term (``hook_v`` patched with it) the new values under the new
            pattern; for a residual site (``hook_resid_pre``) the part of its gradient x difference
            through its own layer's keys and values is swapped for that layer's QK-fixed key and
            value terms (the reference's keys and values at the same index: the layer recomputes
            them from the patched residual, at the same rotary position), the rest (the position's
            later layers) stays first order. Research choice: a saturated softmax (a quality query fixed on one image token)
            has a near-zero gradient however far a patched key moves the score; measured on the
            compact one-stage model (step 600) the correlation with activation patching went from
            0.58 / 0.36 (resid / kv) to 0.88 / 0.98. False: the plain gradient x difference at
            every site. With ``steps > 1`` the averaged gradients are used in both.
        resid_path: How a patched residual reaches the readout (``source`` reference with ``qk_fix``).
            ``kv_sum``: a position other than the readout's reaches it only through its keys and
            values; patching its residual at layer ``l`` with the reference's makes its keys and
            values at ``l`` exactly the reference's, and the position's later layers follow the
            reference, so the estimate is the sum of the QK-fixed key-and-value terms of layers
            ``l`` to the last (the readout position itself, or layers that do not reach the last
            one, keep ``gradient``). ``gradient``: the QK-fixed terms of layer ``l`` and first order
            through the later layers. Research choice, measured on the compact one-stage model
            (8 layers, step 600, 8 images x 65 image tokens): activation patching's residual
            effect equals the sum of its own key-and-value effects over layers ``>= l`` to
            r = 0.991, and the estimate's correlation with activation patching went from 0.62
            (``gradient``) to 0.95 (``kv_sum``); the first-order step through the later layers is
            what fails there.

    Returns:
        An `AttributionPatchingResult`.
    """
    if reference == "source" and source_of is None:
        raise ValueError("reference='source' needs source_of: the image each one is patched from")
    if reference not in ("zero", "source"):
        raise ValueError(f"reference must be 'zero' or 'source'; got {reference!r}")
    if resid_path not in ("kv_sum", "gradient"):
        raise ValueError(f"resid_path must be 'kv_sum' or 'gradient'; got {resid_path!r}")
    if steps < 1 or (steps > 1 and reference != "source"):
        raise ValueError(
            f"steps={steps}: pass 1, or more with reference='source' (the path ends at the reference image)"
        )
    site_map = (
        {s: SITES[s] for s in sites}
        if not isinstance(sites, Mapping)
        else {k: tuple(v) for k, v in sites.items()}
    )
    unknown = [s for s in site_map if not site_map[s]]
    if unknown:
        raise KeyError(f"sites {unknown} name no hooks")
    n_layers = len(model.llm.blocks)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    templates = list(dict.fromkeys(t for ts in site_map.values() for t in ts))
    hook_names = {t: _hook_names(t, layers) for t in templates}
    known = set(model.hook_dict)
    missing = [h for hs in hook_names.values() for h in hs if h not in known]
    if missing:
        raise KeyError(f"hooks {missing} are not hooks of the model; build names with mechbiqa_hooks.names")
    device = model.device
    positions = torch.as_tensor(positions, dtype=torch.long, device=device)
    order = [h for hs in hook_names.values() for h in hs]
    # the QK fix: keys (and a residual's path through its own layer's keys and values) recomputed exactly
    fix_keys = qk_fix and _K in templates
    fix_resid = qk_fix and _RESID in templates
    joint = any(_K in ts and _V in ts for ts in site_map.values())  # values patched with their keys
    fixed = layers if (fix_keys or fix_resid) else []
    summed_kv = fix_resid and resid_path == "kv_sum" and reference == "source"
    attn = {at: {part: names.attn(at, part) for part in ("q", "k", "v", "z", "attn_scores")} for at in fixed}
    kv_hooks = [attn[at][part] for at in fixed for part in ("k", "v")]
    gradded = list(dict.fromkeys([*order, *kv_hooks, *(attn[at]["z"] for at in fixed)]))
    kept = [attn[at][part] for at in fixed for part in ("q", "attn_scores")]
    referenced = list(dict.fromkeys([*order, *kv_hooks]))
    through = (
        {_RESID.format(l=at): (attn[at]["k"], attn[at]["v"]) for at in fixed} if fix_resid else {}
    )  # the residual's path through its own layer's keys and values
    source = None if source_of is None else torch.as_tensor(source_of, dtype=torch.long, device=device)
    n = input_ids.shape[0]
    size = n if chunk is None else max(1, int(chunk))
    take = lambda t, lo, hi: None if t is None else t[lo:hi].to(device)  # noqa: E731
    reference_acts: dict[str, Tensor] | None = None
    if reference == "source" and size < n:  # the reference run: the other images' activations, no grad
        parts = [
            gather_activations(
                model,
                input_ids[lo : lo + size],
                take(images, lo, lo + size),
                referenced,
                positions[lo : lo + size],
                attention_mask=take(attention_mask, lo, lo + size),
            )
            for lo in range(0, n, size)
        ]
        reference_acts = {h: torch.cat([part[h] for part in parts]) for h in referenced}
    rows_of: Tensor | None = None  # [image, image_pos, d_llm] every image's rows (the path's far end)
    if steps > 1:
        rows_of = _image_rows(model, input_ids, images, attention_mask, size)
    effects: dict[str, list[Tensor]] = {t: [] for t in hook_names}
    values, patterns = [], []
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        mask = take(attention_mask, lo, hi)
        call = (model, input_ids[lo:hi], take(images, lo, hi), mask, readout, metric, gradded)
        acts, grads, value, pattern = _forward_backward(
            *call, n_layers if keep_pattern else 0, extra=kept, through=through
        )
        for step in range(1, steps):  # the rest of the path: the gradients averaged over it
            alpha = step / steps
            clean_rows = rows_of[lo:hi]  # type: ignore[index]
            shifted = clean_rows + alpha * (rows_of[source[lo:hi].cpu()] - clean_rows)  # type: ignore[index]
            _, more, _, _ = _forward_backward(*call, 0, shifted.to(device), through=through)
            grads = {
                h: more[h] if grads[h] is None else grads[h] + (0 if more[h] is None else more[h])
                for h in grads
            }
        if steps > 1:
            grads = {h: None if g is None else g / steps for h, g in grads.items()}
        rows = torch.arange(hi - lo, device=device)[:, None]
        at = positions[lo:hi]

        def act_ref_grad(name: str) -> tuple[Tensor, Tensor, Tensor]:  # each [chunk, k, *rest]
            a = acts[name][rows, at]  # noqa: B023
            g = torch.zeros_like(a) if grads[name] is None else grads[name][rows, at]  # noqa: B023
            if reference == "zero":
                ref = torch.zeros_like(a)
            elif reference_acts is None:  # one chunk: the reference images are rows of this forward
                ref = a[source]  # type: ignore[index]
            else:
                ref = reference_acts[name][source[lo:hi]]  # type: ignore[index]  # noqa: B023
            return a, ref, g

        def plain(name: str) -> Tensor:  # [chunk, k] gradient x difference
            a, ref, g = act_ref_grad(name)
            return ((ref - a).double() * g.double()).flatten(2).sum(-1)

        qk: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in fixed:  # [chunk, k] key and value terms of patching the keys and values together
            h = attn[layer]
            gz = grads[h["z"]]
            qk[layer] = qk_fixed_kv_effect(
                acts[h["q"]],
                acts[h["k"]],
                acts[h["v"]],
                acts[h["attn_scores"]],
                torch.zeros_like(acts[h["q"]]) if gz is None else gz,
                at,
                act_ref_grad(h["k"])[1],
                act_ref_grad(h["v"])[1],
            )
        kv_from: dict[int, Tensor] = {}  # layer -> [chunk, k] key-and-value terms of it and every later layer
        for layer in range(n_layers - 1, -1, -1) if summed_kv else ():
            if layer not in qk:
                break
            kv_from[layer] = qk[layer][0] + qk[layer][1] + kv_from.get(layer + 1, 0)
        for template, names_ in hook_names.items():
            per_layer = []
            for layer, name in zip(layers if "{l}" in template else [None], names_, strict=True):
                if layer is not None and layer in qk and template == _K:
                    per_layer.append(qk[layer][0])
                elif layer is not None and layer in qk and template == _V and fix_keys and joint:
                    per_layer.append(qk[layer][1])
                elif layer is not None and layer in qk and template == _RESID and fix_resid:
                    # the residual's path through its own layer's keys and values, swapped for the fixed one
                    a, ref, g = act_ref_grad(name)
                    g_kv = grads[name + _THROUGH_KV]
                    g_kv = torch.zeros_like(a) if g_kv is None else g_kv[rows, at]
                    linear_kv = ((ref - a).double() * g_kv.double()).flatten(2).sum(-1)
                    estimate = plain(name) - linear_kv + qk[layer][0] + qk[layer][1]  # [chunk, k]
                    if layer in kv_from:  # through its own and every later layer's keys and values
                        readout_at = readout.position % acts[name].shape[1]  # reaches the logits directly
                        estimate = torch.where(at == readout_at, estimate, kv_from[layer])
                    per_layer.append(estimate)
                else:
                    per_layer.append(plain(name))
            effects[template].append(torch.stack(per_layer, 1).cpu())
        values.append(value)
        patterns.append(pattern)
    return AttributionPatchingResult(
        metric=metric,
        reference=reference,
        sites=site_map,
        layers=np.asarray(layers),
        effects={t: torch.cat(e).numpy() for t, e in effects.items()},
        clean_metric=np.concatenate(values),
        source_of=None if source is None else source.cpu().numpy(),
        pattern=np.concatenate(patterns) if keep_pattern else None,
    )


def _forward_backward(
    model: MPLUGOwl2,
    input_ids: Tensor,
    images: Tensor | None,
    attention_mask: Tensor | None,
    readout: Readout,
    metric: Metric,
    hooks: Sequence[str],
    n_pattern_layers: int,
    image_rows: Tensor | None = None,
    extra: Sequence[str] = (),
    through: Mapping[str, tuple[str, str]] = {},  # noqa: B006  (read only)
) -> tuple[dict[str, Tensor], dict[str, Tensor | None], np.ndarray, np.ndarray | None]:
    """One forward and one backward: the hooked activations, the metric's gradient at each, the metric.

    ``image_rows`` (``[image, image_pos, d_llm]``) replace the spliced image rows (a point on the path);
    ``extra`` hooks are kept too, without their gradients; ``through`` maps a residual hook to its
    layer's key and value hooks (all in ``hooks``): the residual's gradient through those alone comes
    back under ``resid + _THROUGH_KV``.
    """
    acts: dict[str, Tensor] = {}
    patterns: dict[int, Tensor] = {}

    def leaf(x: Tensor, hook: Any) -> Tensor:  # [image, image_pos, d_llm]: where the graph starts
        rows = x if image_rows is None else image_rows.to(x.device, x.dtype)
        return rows.detach().requires_grad_(True)

    def keep(x: Tensor, hook: Any) -> None:  # [batch, pos, ...]
        acts[hook.name] = x

    def keep_row(x: Tensor, hook: Any) -> None:  # [batch, head, query_pos, key_pos]
        patterns[int(hook.name.split(".")[2])] = x[:, :, readout.position].detach()

    fwd = [(names.IMAGE_TOKENS, leaf)] + [(h, keep) for h in dict.fromkeys([*hooks, *extra])]
    fwd += [(_PATTERN.format(l=layer), keep_row) for layer in range(n_pattern_layers)]
    # Gradients flow from the image rows only: with the weights frozen, the vision tower and the text
    # build no graph (at 7B its activations held for a backward nobody runs took gigabytes).
    with torch.enable_grad(), _frozen(model), model.hooks(fwd_hooks=fwd):
        out = model(
            input_ids.to(model.device),
            images=None if images is None else images.to(model.device, model.dtype),
            attention_mask=None if attention_mask is None else attention_mask.to(model.device),
        )
        value = metric_of(out.logits[:, readout.position], readout, metric)
        grads = dict(
            zip(
                hooks,
                torch.autograd.grad(
                    value.sum(), [acts[h] for h in hooks], allow_unused=True, retain_graph=bool(through)
                ),
                strict=True,
            )
        )
        for resid, (k, v) in through.items():  # the part of the residual's gradient through its layer's K, V
            pairs = [(acts[h], grads[h]) for h in (k, v) if grads[h] is not None]
            grads[resid + _THROUGH_KV] = (
                torch.autograd.grad(
                    [a for a, _ in pairs],
                    acts[resid],
                    grad_outputs=[g for _, g in pairs],
                    retain_graph=True,
                    allow_unused=True,
                )[0]
                if pairs
                else None
            )
    pattern = None
    if n_pattern_layers:
        pattern = torch.stack([patterns[x] for x in range(n_pattern_layers)], 1).float().cpu().numpy()
    return (
        {h: acts[h].detach() for h in dict.fromkeys([*hooks, *extra])},
        grads,
        value.detach().cpu().numpy(),
        pattern,
    )


@contextmanager
def _frozen(model: MPLUGOwl2) -> Iterator[None]:
    """No parameter of ``model`` requires a gradient inside; each one's flag is restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _image_rows(
    model: MPLUGOwl2, input_ids: Tensor, images: Tensor | None, attention_mask: Tensor | None, size: int
) -> Tensor:
    """``[image, image_pos, d_llm]`` the spliced rows of every image (no grad; CPU)."""
    kept: list[Tensor] = []
    take = lambda t, lo, hi: None if t is None else t[lo:hi].to(model.device)  # noqa: E731

    def keep(x: Tensor, hook: Any) -> None:  # [image, image_pos, d_llm]
        kept.append(x.detach().cpu())

    with torch.no_grad(), model.hooks(fwd_hooks=[(names.IMAGE_TOKENS, keep)]):
        for lo in range(0, input_ids.shape[0], size):
            model(
                input_ids[lo : lo + size].to(model.device),
                images=None if images is None else images[lo : lo + size].to(model.device, model.dtype),
                attention_mask=take(attention_mask, lo, lo + size),
                logits_at=-1,
            )
    return torch.cat(kept)


def qk_fixed_kv_effect(
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    scores: Float[Tensor, "batch head pos pos"],
    grad_z: Float[Tensor, "batch pos head d_head"],
    positions: Int[Tensor, "batch k"],
    k_ref: Float[Tensor, "batch k kv_head d_head"] | None,
    v_ref: Float[Tensor, "batch k kv_head d_head"] | None,
) -> tuple[Float[Tensor, "batch k"], Float[Tensor, "batch k"]]:
    """The effect of patching one position's key and value, the attention recomputed (AtP*'s QK fix).

    Patching the key at source position ``p`` changes one score in each query's row; the new row is
    recomputed exactly (``A'_j = A_j / D`` for ``j != p`` and ``A'_p = A_p e^delta / D``, with
    ``delta = q . (k_ref - k)_p / sqrt(d_head)`` and ``D = 1 - A_p + A_p e^delta``) instead of
    linearised through a saturated softmax (Kramar et al. 2024). The change of each query's
    pattern-weighted values is then

        dz = (z - A_p v_p) / D - z + A'_p v_p + A'_p (v_ref - v)_p

    and the estimate is ``sum_{query, head} grad_z . dz``: exact when the metric is linear in the
    layer's ``z`` (a single attention layer read linearly), first order in ``z`` beyond it. The
    key term is the first two (the pattern change with the old values), the value term the last
    (the new values under the new pattern); without a key reference the pattern is unchanged and the
    value term is the plain gradient x difference.

    Args:
        q: ``[batch, pos, head, d_head]`` the layer's queries (after RoPE, ``hook_q``).
        k: ``[batch, pos, kv_head, d_head]`` its keys (``hook_k``).
        v: ``[batch, pos, kv_head, d_head]`` its values (``hook_v``).
        scores: ``[batch, head, pos, pos]`` its masked scores (``hook_attn_scores``; a score at the
            dtype's minimum is a masked key).
        grad_z: ``[batch, pos, head, d_head]`` the metric's gradient at ``hook_z``.
        positions: ``[batch, k]`` the patched source positions (one at a time).
        k_ref: ``[batch, k, kv_head, d_head]`` the keys patched in (None: keys unpatched).
        v_ref: ``[batch, k, kv_head, d_head]`` the values patched in (None: values unpatched).

    Returns:
        ``key [batch, k]`` and ``value [batch, k]`` terms; their sum is the estimate.
    """
    group = q.shape[2] // k.shape[2]
    wide = lambda t: t.double().repeat_interleave(group, dim=2)  # noqa: E731  kv heads -> heads
    allowed = scores > torch.finfo(scores.dtype).min / 2  # [batch, head, query, key]
    pattern = scores.double().softmax(-1)  # [batch, head, query, key]
    rows = torch.arange(q.shape[0], device=q.device)[:, None]
    v_all = wide(v)  # [batch, pos, head, d_head]
    v_p = v_all[rows, positions]  # [batch, k, head, d_head]
    gz = grad_z.double()
    index = positions[:, None, None, :].expand(-1, pattern.shape[1], pattern.shape[2], -1)
    a_p = pattern.gather(-1, index)  # [batch, head, query, k]
    ok = allowed.gather(-1, index)
    z = torch.einsum("bhqj,bjhd->bhqd", pattern, v_all)  # [batch, head, query, d_head]
    gz_z = torch.einsum("bqhd,bhqd->bhq", gz, z)[..., None]  # [batch, head, query, 1]
    gz_vp = torch.einsum("bqhd,bkhd->bhqk", gz, v_p)  # [batch, head, query, k]
    if k_ref is None:
        a_new, key = a_p, torch.zeros(positions.shape, dtype=torch.float64, device=q.device)
    else:
        dk = wide(k_ref) - wide(k)[rows, positions]  # [batch, k, head, d_head]
        delta = torch.einsum("bqhd,bkhd->bhqk", q.double(), dk) / q.shape[-1] ** 0.5
        delta = delta.masked_fill(~ok, 0.0)
        # the row without p (1 - A_p and z - A_p v_p) without cancellation where A_p is near 1: only a row's
        # largest entry can be, and for it the others are summed directly
        top = pattern.argmax(-1, keepdim=True)  # [batch, head, query, 1]
        others = pattern.scatter(-1, top, 0.0)  # [batch, head, query, key]
        is_top = index == top
        rest = torch.where(is_top, others.sum(-1, keepdim=True), (1.0 - a_p).clamp_min(0.0))
        z_rest_top = torch.einsum("bhqj,bjhd->bhqd", others, v_all)  # z - A_top v_top
        gz_z_rest_top = torch.einsum("bqhd,bhqd->bhq", gz, z_rest_top)[..., None]
        gz_z_rest = torch.where(is_top, gz_z_rest_top, gz_z - a_p * gz_vp)  # grad_z . (z - A_p v_p)
        log_d = torch.logaddexp(rest.log(), a_p.log() + delta)  # log D, stable for any delta
        a_new = torch.exp(a_p.log() + delta - log_d)  # A'_p
        # grad_z . (z' - z) with the old values
        key = (torch.exp(-log_d) * gz_z_rest - gz_z + a_new * gz_vp).sum((1, 2))
    if v_ref is None:
        value = torch.zeros_like(key)
    else:
        gz_dv = torch.einsum("bqhd,bkhd->bhqk", gz, wide(v_ref) - v_p)
        value = (a_new * gz_dv).sum((1, 2))
    return key, value


# ----------------------------------------------------------------------------- validation
def activation_patching_grid(
    model: MPLUGOwl2,
    input_ids: Int[Tensor, "clean text_pos"],
    images: Float[Tensor, "clean 3 S S"] | None,
    positions: Int[Tensor, "clean k"],
    readout: Readout,
    estimate: AttributionPatchingResult,
    *,
    site_names: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    attention_mask: Int[Tensor, "clean text_pos"] | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """The same grid by activation patching (`mechbiqa.analysis.patching.sweep`), one position at a time.

    Each configuration patches one site at one layer at one position, with the estimate's
    reference (zeros, or the source image's activation at the same index).

    Returns:
        Site name -> ``[clean, layer, k]`` actual effect on the estimate's metric (``layers`` of
        the estimate, or the subset given; NaN elsewhere).
    """
    chosen = list(estimate.sites) if site_names is None else list(site_names)
    all_layers = [int(x) for x in estimate.layers]
    layers = all_layers if layers is None else [int(x) for x in layers]
    positions = torch.as_tensor(positions, dtype=torch.long)
    n_clean, k = positions.shape
    values: dict[str, Tensor] = {}
    if estimate.reference == "source":
        hooks = [h for s in chosen for t in estimate.sites[s] for h in _hook_names(t, layers)]
        gathered = gather_activations(
            model, input_ids, images, hooks, positions, attention_mask=attention_mask
        )
        source = torch.as_tensor(estimate.source_of, dtype=torch.long)
        values = {h: a[source.to(a.device)].cpu() for h, a in gathered.items()}
    configurations = []
    for site in chosen:
        for layer in layers:
            for m in range(k):
                edits = []
                for template in estimate.sites[site]:
                    hook = _hook_names(template, [layer])[0]
                    setter = (
                        Setter.zero()
                        if estimate.reference == "zero"
                        else Setter.source(values[hook][:, m : m + 1])
                    )
                    edits.append(Edit(hook, positions[:, m : m + 1], setter))
                configurations.append(
                    Configuration(
                        f"{site} L{layer} p{m}", tuple(edits), {"site": site, "layer": layer, "k": m}
                    )
                )
    result = sweep(
        model,
        input_ids,
        images,
        configurations,
        readout,
        attention_mask=attention_mask,
        batch_size=batch_size,
    )
    effect = result.logit_diff_effect if estimate.metric == "logit_diff" else result.score_effect
    out = {}
    for site in chosen:
        grid = np.full((n_clean, len(all_layers), k), np.nan)
        for c in result.select(site=site):
            tags = result.tags[c]
            grid[:, all_layers.index(tags["layer"]) if tags["layer"] in all_layers else 0, tags["k"]] = (
                effect[c]
            )
        out[site] = grid
    return out


def correlation(estimate: np.ndarray, actual: np.ndarray) -> float:
    """Pearson correlation over the finite entries of two grids (NaN when either is constant)."""
    a, b = np.ravel(estimate), np.ravel(actual)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def top_overlap(first: Int[np.ndarray, "clean k"], second: Int[np.ndarray, "clean k"]) -> np.ndarray:
    """``[clean]`` fraction of the first set's indices also in the second (per row)."""
    return np.array([len(set(a) & set(b)) / max(1, len(a)) for a, b in zip(first, second, strict=True)])


def farthest_reference(clean: Float[np.ndarray, " clean"]) -> np.ndarray:
    """``[clean]`` each image's reference: the image whose clean metric differs most from its own.

    Research choice (as `studies/patch_image_tokens.py`): the patched activations then carry the
    most different quality information the model itself perceives, without needing labels.
    """
    clean = np.asarray(clean, dtype=float)
    return np.abs(clean[:, None] - clean[None]).argmax(1)


def compare_with_attention(
    estimate: AttributionPatchingResult,
    roles: Int[np.ndarray, "clean key_pos"],
    image_index: Int[np.ndarray, "clean key_pos"],
    n_image: int,
    k: int = 5,
    site: str = "resid",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k most important image tokens (`AttributionPatchingResult.importance`) vs the k most attended.

    The attention ranking is `mechbiqa.analysis.attribution.attribute`'s (every layer and head) on the
    quality rows the estimate kept (``keep_pattern=True``).

    Returns:
        ``top [clean, k]``, ``attended [clean, k]`` (image indices) and ``overlap [clean]``.
    """
    from mechbiqa.analysis.attribution import attribute

    if estimate.pattern is None:
        raise ValueError(
            "the estimate kept no attention rows: run attribution_patching(..., keep_pattern=True)"
        )
    attended = attribute(estimate.pattern, roles, image_index, n_image, k=k).top
    top = np.argsort(-estimate.importance(site), axis=-1, kind="stable")[:, :k]
    return top, attended, top_overlap(top, attended)
