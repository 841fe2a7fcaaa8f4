"""Distortions: severity rises with level on real photos, determinism, shapes, the KADID tables."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mechbiqa.data.distortions import (
    DEFAULT_DISTORTIONS,
    DISTORTIONS,
    MONOTONE_DISTORTIONS,
    apply_distortion,
    lab_to_rgb,
    rgb_to_lab,
)
from mechbiqa.data.photos import find_photos, load_photo
from mechbiqa.metrics import psnr, ssim

PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module")
def references() -> list[np.ndarray]:
    out = []
    for info in find_photos(ids=PHOTOS):
        photo = load_photo(info)
        side = min(photo.shape[:2])
        crop = photo[:side, :side]
        out.append(np.asarray(Image.fromarray(crop).resize((64, 64), Image.Resampling.LANCZOS)))
    return out


def test_tables_have_five_levels_and_kadid_numbers():
    assert len(DISTORTIONS) == 25
    assert sorted(d.kadid_id for d in DISTORTIONS.values()) == list(range(1, 26))
    for d in DISTORTIONS.values():
        assert len(d.levels) == 5 and len(d.kadid_mos) == 5
        assert all(1.0 <= m <= 5.0 for m in d.kadid_mos)
    assert len(DEFAULT_DISTORTIONS) >= 12
    assert all(DISTORTIONS[n].monotone_mos and not DISTORTIONS[n].signed for n in DEFAULT_DISTORTIONS)
    assert DISTORTIONS["jpeg"].levels == (43, 36, 24, 7, 4)
    assert DISTORTIONS["gaussian_blur"].kadid_mos == (4.61, 4.38, 2.91, 1.87, 1.30)


@pytest.mark.parametrize("name", MONOTONE_DISTORTIONS)
def test_severity_rises_with_level(name, references):
    # Mean over three photos and two seeds of PSNR and SSIM against the reference: both must fall with level.
    p = np.zeros(5)
    s = np.zeros(5)
    for ref in references:
        for seed in (0, 1):
            for level in range(1, 6):
                out = apply_distortion(ref, name, level, np.random.default_rng([seed, level]))
                p[level - 1] += psnr(ref, out)
                s[level - 1] += ssim(ref, out)
    assert np.all(np.diff(p) < 0), f"{name}: PSNR by level {np.round(p / 6, 2)}"
    assert np.all(np.diff(s) <= 1e-9), f"{name}: SSIM by level {np.round(s / 6, 4)}"


@pytest.mark.parametrize("name", list(DISTORTIONS))
def test_output_shape_dtype_and_determinism(name, references):
    ref = references[0]
    a = apply_distortion(ref, name, 3, np.random.default_rng(7))
    b = apply_distortion(ref, name, 3, np.random.default_rng(7))
    assert a.shape == ref.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(apply_distortion(ref, name, 0, np.random.default_rng(0)), ref)


def test_bad_arguments_are_named():
    ref = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(KeyError, match="unknown distortion 'blurr'"):
        apply_distortion(ref, "blurr", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="level must be 0-5"):
        apply_distortion(ref, "jpeg", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB"):
        apply_distortion(ref[..., 0], "jpeg", 1, np.random.default_rng(0))


def test_lab_round_trip():
    rgb = np.random.default_rng(0).random((8, 8, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-6)
    # White is L* = 100, a* = b* = 0.
    np.testing.assert_allclose(rgb_to_lab(np.ones((1, 1, 3)))[0, 0], [100, 0, 0], atol=1e-2)
