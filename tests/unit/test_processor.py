"""Image preprocessing against a hand-written reference and transformers' CLIP processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mechbiqa.model.processor import (
    CLIP_MEAN,
    CLIP_STD,
    ImageFailure,
    ImageLoadError,
    ImageProcessor,
    UnsupportedImageError,
    expand2square,
    load_image,
    load_images,
    to_rgb,
)

SIZE = 32  # small outputs keep the tests fast; the geometry is the same at 448


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def reference_pixels(image: Image.Image, size: int, *, pad: bool) -> np.ndarray:
    """The fact sheet's bit-exact recipe, written independently with numpy for the geometry."""
    rgb = np.asarray(image.convert("RGB"))
    h, w, _ = rgb.shape
    if pad:
        side = max(h, w)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = [int(255 * m) for m in CLIP_MEAN]
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = rgb
        resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))
    else:
        scale = size / min(h, w)
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        assert abs(new_w - w * scale) < 1 and abs(new_h - h * scale) < 1
        big = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        resized = big[top : top + size, left : left + size]
    x = resized.astype(np.float32) / np.float32(255)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- geometry
def test_background_is_int_255_mean() -> None:
    assert ImageProcessor().background == (122, 116, 104)


@pytest.mark.parametrize(("width", "height"), [(7, 4), (4, 7), (6, 3), (3, 6), (5, 5)])
def test_expand2square_centres_with_floor_offsets(width: int, height: int) -> None:
    image = Image.new("RGB", (width, height), (255, 0, 0))
    square = np.asarray(expand2square(image, (122, 116, 104)))
    side = max(width, height)
    assert square.shape == (side, side, 3)
    red = np.all(square == [255, 0, 0], axis=-1)
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert (rows[0], cols[0]) == ((side - height) // 2, (side - width) // 2)
    assert red.sum() == width * height
    assert np.all(square[~red] == [122, 116, 104])


def test_square_image_is_not_padded() -> None:
    image = random_image(9, 9)
    assert expand2square(image, (0, 0, 0)) is image


# ----------------------------------------------------------------------------- pixel values
@pytest.mark.parametrize(("width", "height"), [(50, 31), (31, 50), (40, 40), (17, 64)])
def test_pad_path_equals_reference(width: int, height: int) -> None:
    image = random_image(width, height, seed=width)
    out = ImageProcessor(image_size=SIZE)([image])
    assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), reference_pixels(image, SIZE, pad=True))


@pytest.mark.parametrize(("width", "height"), [(50, 31), (31, 50), (45, 33)])
def test_crop_path_equals_reference(width: int, height: int) -> None:
    image = random_image(width, height, seed=height)
    out = ImageProcessor(image_size=SIZE, pad_to_square=False)([image])
    np.testing.assert_array_equal(out[0].numpy(), reference_pixels(image, SIZE, pad=False))


@pytest.mark.parametrize("pad", [True, False])
def test_equals_transformers_clip_image_processor(pad: bool) -> None:
    """Transformers' CLIP processor (PIL backend) on the padded image, as the original calls it."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if cls is None:
        pytest.skip("this transformers has no CLIPImageProcessorPil (the PIL backend of CLIPImageProcessor)")
    clip = cls(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)  # fmt: skip
    ours = ImageProcessor(image_size=SIZE, pad_to_square=pad)
    for width, height in [(61, 37), (37, 61), (48, 48)]:
        image = random_image(width, height, seed=width + height)
        source = expand2square(image, ours.background) if pad else image
        expected = clip(source, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(ours([image])[0].numpy(), expected)


def test_batch_of_paths_and_images(tmp_path: Path) -> None:
    images = [random_image(30, 20, seed=1), random_image(20, 30, seed=2)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    processor = ImageProcessor(image_size=SIZE)
    from_paths = processor(paths)
    from_images = processor(images)
    assert from_paths.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(from_paths, from_images, rtol=0, atol=0)
    torch.testing.assert_close(processor(str(paths[0])), from_images[:1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no images"):
        processor([])


# ----------------------------------------------------------------------------- colour modes
def test_grayscale_is_replicated() -> None:
    gray = random_image(20, 12, mode="L")
    out = ImageProcessor(image_size=SIZE)([gray])[0].numpy()
    np.testing.assert_array_equal(out, reference_pixels(gray.convert("RGB"), SIZE, pad=True))
    raw = (
        out * np.array(CLIP_STD, dtype=np.float32)[:, None, None]
        + np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    )
    centre = raw[:, SIZE // 2, SIZE // 2]  # inside the image, not the padding: R == G == B
    np.testing.assert_allclose(centre, centre[0], atol=1e-6)


def test_rgba_drops_alpha_and_cmyk_uses_pil_conversion() -> None:
    rgba = random_image(20, 12, mode="RGBA")
    out = ImageProcessor(image_size=SIZE)([rgba])[0].numpy()
    np.testing.assert_array_equal(
        out, reference_pixels(Image.fromarray(np.asarray(rgba)[..., :3]), SIZE, pad=True)
    )
    cmyk = random_image(20, 12, mode="CMYK")
    expected = reference_pixels(cmyk.convert("RGB"), SIZE, pad=True)
    np.testing.assert_array_equal(ImageProcessor(image_size=SIZE)([cmyk])[0].numpy(), expected)


def test_palette_with_transparency_loads_without_warning(tmp_path: Path) -> None:
    palette = random_image(20, 12).convert("P")
    path = tmp_path / "p.png"
    palette.save(path, transparency=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(palette.convert("RGB")))


def test_load_image_from_jpeg_cmyk(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    random_image(16, 16, mode="CMYK").save(path)
    assert load_image(path).mode == "RGB"


# ----------------------------------------------------------------------------- wide and unusual modes
def gray16(width: int = 40, height: int = 24, seed: int = 0) -> np.ndarray:
    """A 16-bit grayscale image using the whole range (a mid-grey mean, like a real photo)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, (height, width), dtype=np.uint16)


def by_hand_16_to_8(values: np.ndarray) -> Image.Image:
    """16 to 8 bits by hand: v * 255 / 65535, rounded, replicated to RGB."""
    gray = np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_file_is_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    values = gray16()
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"  # how PIL reads a 16-bit grayscale file
        clipped = np.asarray(opened.convert("RGB"))  # the original's conversion
    expected = by_hand_16_to_8(values)
    loaded = load_image(path)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
    assert abs(np.asarray(loaded).mean() - 127.5) < 3 and clipped.mean() > 250  # clipping made it white
    out = ImageProcessor(image_size=SIZE)([path])[0].numpy()
    np.testing.assert_array_equal(out, reference_pixels(expected, SIZE, pad=True))


def test_big_endian_16_bit_and_32_bit_integer_images() -> None:
    values = gray16(seed=1)
    big = Image.fromarray(values.astype(">u2"))
    assert big.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(to_rgb(big)), np.asarray(by_hand_16_to_8(values)))
    wide = Image.fromarray(values.astype(np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(wide)), np.asarray(by_hand_16_to_8(values)))
    for bad in (-1, 70000):
        with pytest.raises(UnsupportedImageError, match=rf"mode 'I' image with values .*{bad}.*0\.\.65535"):
            to_rgb(Image.fromarray(np.array([[0, bad]], dtype=np.int32)))


def test_float_images_are_rounded_or_refused() -> None:
    values = np.random.default_rng(2).uniform(0, 255, (12, 20)).astype(np.float32)
    expected = np.repeat(np.rint(values.astype(np.float64)).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(values))), expected)
    nan = values.copy()
    nan[3, 4], nan[0, 0] = np.nan, np.inf
    with pytest.raises(UnsupportedImageError, match=r"1 NaN and 1 infinite"):
        to_rgb(Image.fromarray(nan))
    with pytest.raises(UnsupportedImageError, match=r"0\.\.255"):
        to_rgb(Image.fromarray(values * 2))
    with pytest.raises(UnsupportedImageError, match=r"0-1 float image.*multiply it by 255"):
        to_rgb(Image.fromarray(values / 255))


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "PA", "RGBA", "RGBa", "RGBX", "YCbCr", "LAB", "HSV", "CMYK"]
)
def test_8_bit_modes_convert_as_the_original(mode: str) -> None:
    """Every 8-bit mode gives what ``Image.convert("RGB")`` (the original) gives; alpha is dropped."""
    rgb = random_image(20, 12, seed=5)
    image = rgb.convert("P").convert("PA") if mode == "PA" else rgb.convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))
    if mode in ("LA", "RGBA"):  # alpha ignored: the same colours under any alpha
        alpha = Image.fromarray(np.random.default_rng(6).integers(0, 256, (12, 20), dtype=np.uint8))
        image.putalpha(alpha)
        np.testing.assert_array_equal(
            np.asarray(to_rgb(image)), np.asarray(rgb.convert(mode[:-1]).convert("RGB"))
        )


def test_premultiplied_la_and_unknown_modes() -> None:
    la = random_image(8, 6, seed=7).convert("LA")
    premultiplied = la.convert("La")
    np.testing.assert_array_equal(
        np.asarray(to_rgb(premultiplied)), np.asarray(premultiplied.convert("LA").convert("RGB"))
    )
    odd = Image.new("L", (2, 2))
    odd._mode = "BGR;15"  # an old PIL mode, standing in for any mode PIL cannot convert
    with pytest.raises(
        UnsupportedImageError, match=r"image mode 'BGR;15' is not supported.*convert the image"
    ):
        to_rgb(odd)


def test_refused_mode_in_a_file_is_an_image_load_error(tmp_path: Path) -> None:
    path = tmp_path / "signed.tif"
    Image.fromarray(np.array([[-5, 100], [3, 9]], dtype=np.int32)).save(path)
    with pytest.raises(ImageLoadError, match=r"signed\.tif.*mode 'I' image with values -5\.\.100"):
        load_image(path)


# ----------------------------------------------------------------------------- partial success
def test_load_images_keeps_the_good_files_and_names_the_bad(tmp_path: Path) -> None:
    good = [tmp_path / "a.png", tmp_path / "deep.png", tmp_path / "c.jpg"]
    random_image(30, 20, seed=1).save(good[0])
    Image.fromarray(gray16()).save(good[1])
    random_image(20, 30, seed=2).save(good[2])
    missing, broken = tmp_path / "gone.png", tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images, failures = load_images([good[0], missing, good[1], broken, good[2]])
    assert [p for p, _ in images] == good
    assert [f.path for f in failures] == [missing, broken]
    assert "no such file" in failures[0].reason and "not a recognised image" in failures[1].reason
    assert str(failures[1]).startswith(f"{broken}: ") and isinstance(failures[0], ImageFailure)
    processor = ImageProcessor(image_size=SIZE)
    torch.testing.assert_close(processor([im for _, im in images]), processor(good), rtol=0, atol=0)
    assert load_images([]) == ([], [])


# ----------------------------------------------------------------------------- refused files
def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg") as info:
        ImageProcessor(image_size=SIZE)([missing])
    assert info.value.path == missing and "no such file" in info.value.reason
    assert isinstance(info.value, ValueError)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("content", [b"", b"this is not an image at all"])
def test_non_image_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=r"fake\.png.*not a recognised image"):
        load_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_named(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    random_image(64, 64, seed=3).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=rf"cut\{suffix}.*corrupt or truncated"):
        load_image(path)


def test_image_load_error_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(ImageLoadError("a/b.png", "why")))
    assert error.path == Path("a/b.png") and error.reason == "why" and "a/b.png" in str(error)


# ----------------------------------------------------------------------------- config files
def test_defaults_without_config(tmp_path: Path) -> None:
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor == ImageProcessor(image_size=448, mean=CLIP_MEAN, std=CLIP_STD, pad_to_square=True)
    assert ImageProcessor.from_pretrained(tmp_path, pad_to_square=False).pad_to_square is False
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "missing")


def test_save_load_round_trip(tmp_path: Path) -> None:
    processor = ImageProcessor(
        image_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), pad_to_square=False
    )
    path = processor.save_pretrained(tmp_path)
    config = json.loads(path.read_text())
    assert config["image_processor_type"] == "CLIPImageProcessor"
    assert config["crop_size"] == {"height": 224, "width": 224} and config["size"] == {"shortest_edge": 224}
    assert config["resample"] == 3 and config["do_center_crop"] is True
    assert ImageProcessor.from_pretrained(tmp_path) == processor


def test_reads_real_checkpoint_config(tmp_path: Path) -> None:
    real = {  # the fields of Q-Align's preprocessor_config.json
        "crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 3, "size": 448,
    }  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(real))
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("resample", 2, "resample"),
        ("do_normalize", False, "do_normalize"),
        ("crop_size", {"height": 448, "width": 336}, "not square"),
        ("size", {"shortest_edge": 512}, "differs from crop_size"),
        ("image_processor_type", "SiglipImageProcessor", "not CLIP"),
    ],
)
def test_refuses_other_pipelines(tmp_path: Path, field: str, value: object, match: str) -> None:
    config = ImageProcessor().to_dict() | {field: value}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        ImageProcessor.from_pretrained(tmp_path)


def test_unknown_fields_warn() -> None:
    with pytest.warns(UserWarning, match="shiny"):
        ImageProcessor.from_dict(ImageProcessor().to_dict() | {"shiny": 1})
