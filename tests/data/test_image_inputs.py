"""Data images go through the checked loader: 16-bit files scaled, bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechbiqa.data.benchmark import Benchmark
from mechbiqa.data.photos import PhotoInfo, load_photo
from mechbiqa.data.records import IQARecord
from mechbiqa.model.processor import ImageLoadError


def test_photo_and_benchmark_images_scale_16_bit_files(tmp_path: Path):
    values = np.random.default_rng(0).integers(0, 65536, (10, 14), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    by_hand = np.round(values * 255.0 / 65535.0).astype(np.uint8)  # not clipped at 255
    expected = np.repeat(by_hand[..., None], 3, axis=-1)
    photo = load_photo(PhotoInfo("deep", "none", "deep.png", "test", path=path))
    np.testing.assert_array_equal(photo, expected)
    record = IQARecord(id="deep", image_path=path, score=3.0, scale=(1.0, 5.0))
    np.testing.assert_array_equal(Benchmark.load_image(record), expected)


def test_missing_photo_is_named(tmp_path: Path):
    with pytest.raises(ImageLoadError, match=r"gone\.png.*no such file"):
        load_photo(PhotoInfo("gone", "none", "gone.png", "test", path=tmp_path / "gone.png"))
