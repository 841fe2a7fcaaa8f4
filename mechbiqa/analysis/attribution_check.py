"""Around an attribution-patching estimate: its reference images and its check.

`mechbiqa.analysis.attribution_patching` estimates each image token's effect from one forward
and backward; this file adds what `studies/attribution_patching.py` does before and after:
`clean_sources` picks each image's reference run from a plain forward, and `check_estimate`
compares the estimate with activation patching (Pearson correlation per site) and with the
most-attended image tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mechbiqa.analysis.attribution_patching import (
    AttributionPatchingResult,
    Metric,
    activation_patching_grid,
    compare_with_attention,
    correlation,
    farthest_reference,
    metric_of,
)
from mechbiqa.analysis.patching import Readout


def clean_sources(model: Any, batch: Any, readout: Readout, metric: Metric) -> Tensor:
    """``[clean]`` each image's reference: the image whose clean ``metric`` differs most from its own.

    Args:
        model: The model.
        batch: A `mechbiqa.analysis.scoring_batch.ScoringBatch` of the images.
        readout: The level words' ids and the quality position.
        metric: ``logit_diff`` or ``score``.
    """
    with torch.no_grad():
        logits = model(batch.input_ids, images=batch.pixels, attention_mask=batch.attention_mask).logits
    clean = metric_of(logits[:, readout.position], readout, metric)
    return torch.from_numpy(farthest_reference(clean.float().cpu().numpy()))


def check_estimate(
    model: Any,
    batch: Any,
    readout: Readout,
    estimate: AttributionPatchingResult,
    *,
    layers: Sequence[int] | None,
    batch_size: int,
    k: int,
    site: str,
) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """The estimate against activation patching and against attention.

    Args:
        model: The model the estimate was made with.
        batch: Its `ScoringBatch`.
        readout: Its readout.
        estimate: The estimate (made with ``keep_pattern=True``).
        layers: Layers of the activation-patching check (None: every layer; empty: no check).
        batch_size: Rows per forward of the check.
        k: Top tokens compared with the k most attended.
        site: The site whose importance is compared with attention.

    Returns:
        ``actual`` (site -> ``[image, layer, image position]`` effects; empty without a check),
        ``corr`` (site -> Pearson correlation with the estimate), and `compare_with_attention`'s
        ``top``, ``attended`` and ``overlap``.
    """
    actual: dict[str, np.ndarray] = {}
    if layers != ():
        actual = activation_patching_grid(
            model, batch.input_ids, batch.pixels, batch.image_positions, readout, estimate, layers=layers,
            attention_mask=batch.attention_mask, batch_size=batch_size,
        )  # fmt: skip
    corr = {s: correlation(estimate.site(s), grid) for s, grid in actual.items()}
    top, attended, overlap = compare_with_attention(
        estimate, batch.role_array, batch.image_index, model.cfg.n_image_tokens, k, site
    )
    return actual, corr, top, attended, overlap
