"""Per-image values of the analyses, paired by image id (what the main job's findings test)."""

from __future__ import annotations

import numpy as np
import pytest

from mechbiqa.analysis.per_image import aligned, instability_per_image, non_image_share, patching_per_image


def test_aligned_pairs_by_id_in_the_first_blocks_order_and_drops_unshared_ids():
    a = {"ids": ["x", "y", "z"], "v": [1.0, 2.0, 3.0]}
    b = {"ids": ["z", "w", "x"], "v": [30.0, 99.0, 10.0]}
    left, right = aligned(a, b, "v")
    np.testing.assert_array_equal(left, [1.0, 3.0])
    np.testing.assert_array_equal(right, [10.0, 30.0])
    with pytest.raises(ValueError, match="one value per id|shape"):
        aligned(a, {"ids": ["x"], "v": [1.0, 2.0]}, "v")


def test_instability_per_image_averages_over_sessions_and_answers():
    levels = np.array([[[0, 0, 1], [2, 2, 2]], [[0, 1, 1], [2, 2, 3]]])  # [session, image, answer]
    unstable = np.array([[1, 0], [1, 1]])
    out = instability_per_image(levels, np.array([0, -1]), unstable)
    np.testing.assert_allclose(out["instability"], [1.0, 0.5])
    assert out["accuracy"][0] == pytest.approx(3 / 6) and np.isnan(out["accuracy"][1])


def test_patching_per_image_is_the_mean_absolute_effect_of_one_selection():
    effect = np.array([[0.1, -0.2], [-0.3, 0.4], [5.0, 5.0]])
    tags = [{"selection": "dominant"}, {"selection": "dominant"}, {"selection": "random"}]
    np.testing.assert_allclose(patching_per_image(effect, tags, "dominant"), [0.2, 0.3])
    with pytest.raises(ValueError, match="least"):
        patching_per_image(effect, tags, "least")


def test_non_image_share_divides_by_the_attention_left_after_the_image():
    roles = ("system", "image", "description")
    mass = np.array([[[0.1, 0.5, 0.4], [0.1, 0.7, 0.2]],  # one-stage-like: image mass 0.6 on average
                     [[0.5, 0.0, 0.5], [0.3, 0.0, 0.7]],  # text only
                     [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]])  # all on the image: no share
    share = non_image_share(mass, roles)
    assert share[0] == pytest.approx(0.3 / 0.4) and share[1] == pytest.approx(0.6) and np.isnan(share[2])
