"""Attention attribution of the quality position: where does the token that picks the level word look?

Where it sits: the recorder stores the quality position's attention row of
every layer and head (``llm.blocks.{l}.attn.hook_pattern@quality``) with each
sample's token roles (`mechbiqa.model.roles`, `mechbiqa.store`);
`studies/attention_attribution.py` reads them and calls `attribute`, which
computes what DESIGN.md ("Attention attribution") asks: the attention mass
per role (image / instruction / description / bos / ...) per layer and head,
averaged over samples; the top-k (default 5) dominant image tokens of each
sample and how consistent they are across samples; and the
layer-by-position heatmap of the paper's Fig. 5. The dominant tokens feed
`mechbiqa.analysis.patching` (`studies/patch_image_tokens.py`), and
`mechbiqa.reports.attribution_table` / `mechbiqa.figures.attention_heatmap`
render the result.

Positions are unpadded sequence coordinates (0 = BOS), the store's
convention; the key axis may be padded beyond a sample's length, where roles
are ``PAD`` and attention is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float, Int

from mechbiqa.model.roles import ROLE_LABELS, Role
from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.store import ActivationStore

PATTERN = names.pattern(names.EACH)
"""What attribution reads from a store: the quality row of every layer's attention (``@quality``)."""

__all__ = [
    "PATTERN",
    "AttributionResult",
    "attribute_store",
    "attention_heatmap",
    "attribute",
    "expected_random_jaccard",
    "image_attention",
    "mean_pairwise_jaccard",
    "role_mass",
    "top_image_tokens",
]


def role_mass(
    pattern: Float[np.ndarray, "sample layer head key_pos"], roles: Int[np.ndarray, "sample key_pos"]
) -> Float[np.ndarray, "sample layer head role"]:
    """Attention of the quality position summed over the keys of each role (`Role` order).

    Each row of an attention pattern sums to 1 over keys, so the masses of all roles (the
    quality position's attention to itself under ``quality``) sum to 1.
    """
    pattern = np.asarray(pattern, dtype=np.float64)
    roles = np.asarray(roles)
    if roles.shape != (pattern.shape[0], pattern.shape[-1]):
        raise ValueError(
            f"roles {roles.shape} must be [sample, key_pos] = {(pattern.shape[0], pattern.shape[-1])}"
        )
    onehot = (roles[..., None] == np.arange(len(Role))).astype(np.float64)  # [sample, key, role]
    return np.einsum("slhk,skr->slhr", pattern, onehot)


def image_attention(
    pattern: Float[np.ndarray, "sample layer head key_pos"],
    image_index: Int[np.ndarray, "sample key_pos"],
    n_image_tokens: int,
) -> Float[np.ndarray, "sample layer head image"]:
    """Attention of the quality position to each image token, by its index inside the image."""
    pattern = np.asarray(pattern, dtype=np.float64)
    image_index = np.asarray(image_index)
    onehot = (image_index[..., None] == np.arange(n_image_tokens)).astype(np.float64)  # [sample, key, image]
    return np.einsum("slhk,ski->slhi", pattern, onehot)


def top_image_tokens(scores: Float[np.ndarray, "sample image"], k: int, *, least: bool = False) -> np.ndarray:
    """``[sample, k]`` image indices of the k highest (or lowest) scores, best first; ties by lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"k={k} must be in 1..{scores.shape[-1]} (the number of image tokens)")
    order = np.argsort(scores if least else -scores, axis=-1, kind="stable")
    return order[:, :k]


def mean_pairwise_jaccard(sets: Int[np.ndarray, "sample k"]) -> float:
    """Mean Jaccard index |A & B| / |A | B| over all pairs of samples' top-k sets (NaN for one sample)."""
    sets = [set(map(int, row)) for row in np.asarray(sets)]
    if len(sets) < 2:
        return float("nan")
    values = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    return float(np.mean(values))


def expected_random_jaccard(n: int, k: int) -> float:
    """Expected Jaccard index of two independent uniformly random k-subsets of n items.

    The chance level of `mean_pairwise_jaccard`: the overlap ``i`` is hypergeometric,
    ``P(i) = C(k, i) C(n - k, k - i) / C(n, k)``, and ``J = i / (2k - i)``.
    """
    return float(sum(comb(k, i) * comb(n - k, k - i) / comb(n, k) * i / (2 * k - i) for i in range(0, k + 1)))


def attention_heatmap(
    pattern: Float[np.ndarray, "sample layer head key_pos"], roles: Int[np.ndarray, "sample key_pos"]
) -> tuple[Float[np.ndarray, "layer key_pos"], np.ndarray]:
    """The quality position's attention over key positions and layers, averaged over heads and samples.

    Samples are aligned at BOS (position 0): with one prompt, the prompt and the image
    occupy the same positions in every sample, and a fixed-prompt (score) run is aligned
    exactly. Beyond a sample's length (``PAD``) it does not count in the mean.

    Returns:
        ``heatmap [layer, key_pos]`` and the most common role of each key position.
    """
    return _heatmap_from_sum(np.asarray(pattern, dtype=np.float64).mean(2).sum(0), roles)


def _heatmap_from_sum(total: np.ndarray, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`attention_heatmap` from the head-mean attention summed over samples, ``[layer, key_pos]``."""
    roles = np.asarray(roles)
    counts = (roles != int(Role.PAD)).sum(0)  # samples that reach each position
    heatmap = np.divide(total, counts[None], out=np.zeros_like(total), where=counts[None] > 0)
    votes = (roles[..., None] == np.arange(len(Role))).sum(0)  # [key, role]
    return heatmap, votes.argmax(-1).astype(np.int8)


@dataclass(frozen=True)
class AttributionResult:
    """Where the quality position attends.

    Attributes:
        layers: ``[layer]`` layer numbers.
        role_labels: Role names, the last axis of the mass arrays (`Role` order).
        mass: ``[layer, head, role]`` attention mass per role, averaged over samples.
        mass_per_sample: ``[sample, layer, role]`` averaged over heads.
        image_attention: ``[layer, image]`` attention to each image index, mean over samples and heads.
        token_score: ``[sample, image]`` the score the dominant tokens are ranked by: attention to
            the image token, averaged over ``score_layers`` and all heads.
        score_layers: The layers ``token_score`` averages.
        k: Tokens per selection.
        top: ``[sample, k]`` dominant image indices per sample, most attended first.
        least: ``[sample, k]`` least attended image indices.
        frequency: ``[image]`` fraction of samples that have the index in their top-k.
        consensus: ``[k]`` indices most often in the top-k (ties by mean score).
        jaccard: Mean pairwise Jaccard index of the samples' top-k sets.
        jaccard_chance: The same for random k-subsets (`expected_random_jaccard`).
        top_share: ``[sample]`` share of the image attention (by ``token_score``) that the top-k take.
        heatmap: ``[layer, key_pos]`` attention over positions (`attention_heatmap`).
        heatmap_roles: ``[key_pos]`` role of each heatmap column.
        sample_ids: The samples.
    """

    layers: np.ndarray
    role_labels: tuple[str, ...]
    mass: np.ndarray
    mass_per_sample: np.ndarray
    image_attention: np.ndarray
    token_score: np.ndarray
    score_layers: tuple[int, ...]
    k: int
    top: np.ndarray
    least: np.ndarray
    frequency: np.ndarray
    consensus: np.ndarray
    jaccard: float
    jaccard_chance: float
    top_share: np.ndarray
    heatmap: np.ndarray
    heatmap_roles: np.ndarray
    sample_ids: tuple[str, ...]

    def layer_mass(self) -> np.ndarray:
        """``[layer, role]`` mass per role averaged over heads and samples."""
        return self.mass.mean(1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "layers": self.layers.tolist(),
            "roles": list(self.role_labels),
            "mass_by_layer": self.layer_mass().tolist(),
            "mass_by_layer_head": self.mass.tolist(),
            "image_attention": self.image_attention.tolist(),
            "score_layers": list(self.score_layers),
            "k": self.k,
            "consensus": self.consensus.tolist(),
            "frequency": self.frequency.tolist(),
            "jaccard": self.jaccard,
            "jaccard_chance": self.jaccard_chance,
            "top_share_mean": float(self.top_share.mean()),
            "samples": [
                {"id": s, "top": t.tolist(), "least": lo.tolist(), "top_share": float(sh)}
                for s, t, lo, sh in zip(self.sample_ids, self.top, self.least, self.top_share, strict=True)
            ],
        }


def attribute(
    pattern: Float[np.ndarray, "sample layer head key_pos"],
    roles: Int[np.ndarray, "sample key_pos"],
    image_index: Int[np.ndarray, "sample key_pos"],
    n_image_tokens: int,
    *,
    k: int = 5,
    layers: Sequence[int] | None = None,
    score_layers: Sequence[int] | None = None,
    sample_ids: Sequence[str] | None = None,
    chunk: int = 64,
) -> AttributionResult:
    """Attention mass by role, dominant image tokens and their consistency.

    Args:
        pattern: ``[sample, layer, head, key_pos]`` the quality row of each layer's attention.
        roles: ``[sample, key_pos]`` `Role` values (``PAD`` beyond a sample's length).
        image_index: ``[sample, key_pos]`` index inside the image, -1 elsewhere.
        n_image_tokens: Tokens per image (65 for mPLUG-Owl2).
        k: Dominant tokens per sample (the paper's five).
        layers: Layer number of each row of ``pattern``'s layer axis (default ``0..``).
        score_layers: Layers whose attention ranks the image tokens (default: all). Research
            choice: averaging over layers and heads finds tokens that are attended throughout,
            as the paper's figure does; pass late layers only to rank by what the answer reads last.
        sample_ids: Names of the samples.
        chunk: Samples processed at a time.

    Returns:
        An `AttributionResult`.
    """
    pattern = np.asarray(pattern)  # kept in its stored dtype; chunks are widened to float64 below
    if pattern.ndim != 4:
        raise ValueError(
            f"pattern must be [sample, layer, head, key_pos]; got shape {pattern.shape} "
            "(squeeze the stored query axis of length 1)"
        )
    n_samples, n_layers = pattern.shape[:2]
    if n_samples == 0:
        raise ValueError("attribute got no samples")
    layer_numbers = np.arange(n_layers) if layers is None else np.asarray(list(layers), dtype=np.int64)
    chosen = [int(x) for x in (layer_numbers if score_layers is None else score_layers)]
    missing = [x for x in chosen if x not in layer_numbers]
    if missing:
        raise ValueError(f"score_layers {missing} are not among the layers {layer_numbers.tolist()}")
    roles, image_index = np.asarray(roles), np.asarray(image_index)
    rows = [int(np.flatnonzero(layer_numbers == x)[0]) for x in chosen]
    # Chunks of samples keep memory at chunk x layer x head x key_pos floats (a 7B row is ~1 MB).
    mass_sum = np.zeros((n_layers, pattern.shape[2], len(Role)))
    mass_per_sample = np.zeros((n_samples, n_layers, len(Role)))
    token_sum = np.zeros((n_layers, n_image_tokens))
    score = np.zeros((n_samples, n_image_tokens))
    heat_sum = np.zeros((n_layers, pattern.shape[-1]))
    for start in range(0, n_samples, chunk):
        part = slice(start, start + chunk)
        block = np.asarray(pattern[part], dtype=np.float64)
        masses = role_mass(block, roles[part])  # [chunk, layer, head, role]
        mass_sum += masses.sum(0)
        mass_per_sample[part] = masses.mean(2)
        per_token = image_attention(block, image_index[part], n_image_tokens)  # [chunk, layer, head, image]
        token_sum += per_token.sum(axis=(0, 2)) / pattern.shape[2]
        score[part] = per_token[:, rows].mean(axis=(1, 2))
        heat_sum += block.mean(2).sum(0)
    top = top_image_tokens(score, k)
    least = top_image_tokens(score, k, least=True)
    frequency = np.bincount(top.ravel(), minlength=n_image_tokens) / n_samples
    # consensus: most frequent, then most attended on average (stable for ties)
    order = np.lexsort((-score.mean(0), -frequency))
    image_total = score.sum(-1)
    top_share = np.take_along_axis(score, top, -1).sum(-1) / np.where(image_total > 0, image_total, 1.0)
    heatmap, heatmap_roles = _heatmap_from_sum(heat_sum, roles)
    return AttributionResult(
        layers=layer_numbers,
        role_labels=ROLE_LABELS,
        mass=mass_sum / n_samples,
        mass_per_sample=mass_per_sample,
        image_attention=token_sum / n_samples,
        token_score=score,
        score_layers=tuple(chosen),
        k=k,
        top=top,
        least=least,
        frequency=frequency,
        consensus=order[:k],
        jaccard=mean_pairwise_jaccard(top),
        jaccard_chance=expected_random_jaccard(n_image_tokens, k),
        top_share=top_share,
        heatmap=heatmap,
        heatmap_roles=heatmap_roles,
        sample_ids=tuple(sample_ids) if sample_ids is not None else tuple(str(i) for i in range(n_samples)),
    )


def attribute_store(
    store: ActivationStore,
    *,
    k: int = 5,
    score_layers: Sequence[int] | None = None,
    require_image: bool = True,
) -> AttributionResult:
    """`attribute` over every sample of a store that has a quality position (offline).

    Args:
        store: An open store holding `PATTERN` at ``quality``.
        k: Dominant image tokens per sample.
        score_layers: Layers that rank the image tokens (default: all).
        require_image: Refuse a store without image tokens. Pass False for a text-only store
            (a two-stage pair's stage-2 prompts): the mass per role is still measured (the
            image's is 0), but the dominant-token fields (``top``, ``jaccard`` ...) mean nothing.

    Raises:
        LookupError: The store lacks `PATTERN` at ``quality``, or no sample has the role
            ``quality`` or (with ``require_image``) ``image`` (the message names it and the fix).
    """
    from mechbiqa.model.config import ModelConfig

    try:
        store.spec_of(PATTERN, "quality")
    except KeyError as error:
        raise LookupError(
            f"attention attribution needs hook {PATTERN} at the quality position (the quality "
            f"token's attention row, every layer and head); {store.path} lacks it "
            f"({error.args[0]}); record it with studies/cache_activations.py --spec 'default'"
        ) from None
    valid = store.valid
    rows = valid[store.counts("quality") > 0]
    if not len(rows):
        raise LookupError(
            f"no sample of {store.path} has a token with role 'quality'; score with a prompt that "
            "ends before the level word (--mode score), or generate answers that contain one"
        )
    roles = store.roles(rows)
    if require_image and not (roles == int(Role.IMAGE)).any():
        raise LookupError(
            f"no sample of {store.path} has tokens with role 'image': attribution to the image needs "
            "prompts with an image (pass require_image=False to measure a text-only store's role mass)"
        )
    pattern = store.get(PATTERN, "quality", samples=rows)[:, :, :, 0]  # [sample, layer, head, key_pos]
    n_image_tokens = ModelConfig.from_dict(store.info.model_config).n_image_tokens
    return attribute(
        pattern,
        roles,
        store.image_index(rows),
        n_image_tokens,
        k=k,
        layers=store.spec_of(PATTERN, "quality").layers,
        score_layers=score_layers,
        sample_ids=store.ids(rows),
    )
