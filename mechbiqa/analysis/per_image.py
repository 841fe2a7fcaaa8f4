"""Per-image quantities of the analyses, paired by image id: what the main job's findings test.

A finding compares two checkpoints on the same images (`mechbiqa.analysis.findings`),
so each analysis hands over one value per image with the image ids, and `aligned`
pairs two such blocks by id. The blocks are plain ``{"ids": [...], name: [...]}``
dicts so that they go into the run's JSON summary as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float, Int, Num

__all__ = ["aligned", "instability_per_image", "patching_per_image", "non_image_share"]


def aligned(a: Mapping[str, Any], b: Mapping[str, Any], key: str, key_b: str | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """``a[key]`` and ``b[key_b or key]`` on the image ids both blocks hold, in ``a``'s order.

    Args:
        a: A block ``{"ids": [...], key: [...]}``.
        b: The other checkpoint's block.
        key: The quantity.
        key_b: The quantity's name in ``b`` when it differs.

    Raises:
        ValueError: If a block has not one value per id.
    """
    out = []
    for block, name in ((a, key), (b, key_b or key)):
        ids, values = list(map(str, block["ids"])), np.asarray(block[name], dtype=float)
        if values.shape != (len(ids),):
            raise ValueError(f"per-image block: {name!r} has shape {values.shape} for {len(ids)} ids")
        out.append(dict(zip(ids, values, strict=True)))
    common = [i for i in map(str, a["ids"]) if i in out[1]]
    return np.array([out[0][i] for i in common]), np.array([out[1][i] for i in common])


def instability_per_image(
    levels: Int[np.ndarray, "session image answer"],
    label_levels: Int[np.ndarray, " image"],
    unstable: Num[np.ndarray, "session image"],
) -> dict[str, np.ndarray]:
    """Each image's instability and level accuracy, averaged over sessions.

    Args:
        levels: ``[session, image, answer]`` level index of each answer.
        label_levels: ``[image]`` the label's level (-1: unknown, accuracy NaN).
        unstable: ``[session, image]`` unstable answers of each image (`InstabilityResult.unstable`).

    Returns:
        ``instability``: ``[image]`` unstable answers per session; ``accuracy``: ``[image]`` share of
        the image's answers at the label's level.
    """
    levels, labels = np.asarray(levels), np.asarray(label_levels)
    hit = (levels == labels[None, :, None]).mean((0, 2))
    return {"instability": np.asarray(unstable, dtype=float).mean(0),
            "accuracy": np.where(labels >= 0, hit, np.nan)}


def patching_per_image(
    score_effect: Float[np.ndarray, "config image"], tags: Sequence[Mapping[str, Any]], selection: str
) -> Float[np.ndarray, " image"]:
    """``[image]`` mean |change of the score| over the configurations (layers, sites, setters) of a selection.

    Args:
        score_effect: ``[configuration, image]`` patched minus clean score.
        tags: ``[configuration]`` tags with a ``selection`` entry.
        selection: ``dominant``, ``random`` ...

    Raises:
        ValueError: If no configuration has that selection.
    """
    rows = [i for i, t in enumerate(tags) if t.get("selection") == selection]
    if not rows:
        raise ValueError(f"the sweep has no {selection!r} selection; run it with that selection")
    return np.abs(np.asarray(score_effect, dtype=float)[rows]).mean(0)


def non_image_share(
    mass_per_sample: Float[np.ndarray, "sample layer role"],
    role_labels: Sequence[str],
    role: str = "description",
) -> Float[np.ndarray, " sample"]:
    """``[sample]`` share of the non-image attention that goes to ``role`` (mean over layers).

    ``mass[role] / (1 - mass[image])``: the same quantity for a prompt with and one without
    image tokens. NaN where all the attention goes to the image.

    Args:
        mass_per_sample: ``[sample, layer, role]`` attention mass per role, averaged over heads.
        role_labels: Names of the role axis.
        role: The role whose share is wanted.
    """
    mass = np.asarray(mass_per_sample, dtype=float).mean(1)  # [sample, role]
    index = {label: i for i, label in enumerate(role_labels)}
    rest = 1.0 - mass[:, index["image"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rest > 1e-9, mass[:, index[role]] / rest, np.nan)
