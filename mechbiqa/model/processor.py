"""Image preprocessing: files to the pixel tensor the vision tower reads.

The first step of the data path (DESIGN.md): an image file becomes a
``[3, S, S]`` float tensor, exactly as the original mPLUG-Owl2 / Q-Align /
Q-Instruct code prepares it (fact sheet §9):

1. open and convert to RGB (``Image.open(path).convert("RGB")``; `to_rgb`
   does the same for 8-bit modes and scales 16-bit and float images, which the
   original clips, or refuses a mode by name);
2. Q-Align / training: pad to a square of the mean colour (``expand2square``),
   then PIL bicubic resize to ``S x S``; Q-Instruct's scorer instead resizes
   the shortest edge to ``S`` and centre-crops (``pad_to_square=False``);
3. divide by 255, subtract CLIP's mean, divide by its std, reorder to CHW.

This equals ``CLIPImageProcessor`` on the padded image bit for bit, without
depending on transformers. The vision tower (``mechbiqa.model.vision``) takes
the result; the original casts it to fp16 at inference, which is the caller's
choice here. Checkpoint directories carry a ``preprocessor_config.json`` in the
CLIPImageProcessor format, read by :meth:`ImageProcessor.from_pretrained`.

Batch callers use `load_images`, which keeps the files that load and returns
the others as `ImageFailure`s (path and reason), so one bad file does not stop a
run. NaN pixels in a tensor handed to the model are refused there
(`mechbiqa.model.checks.check_pixels`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

_PIL_BICUBIC = 3  # the `resample` value of real checkpoints (PIL.Image.BICUBIC)
_KNOWN_KEYS = frozenset(
    {
        "crop_size", "size", "image_mean", "image_std", "resample", "rescale_factor",
        "do_center_crop", "do_convert_rgb", "do_normalize", "do_rescale", "do_resize",
        "image_processor_type", "feature_extractor_type", "processor_class", "mechbiqa_pad_to_square",
    }
)  # fmt: skip

ImageInput = str | Path | Image.Image


class ImageLoadError(ValueError):
    """An image file that cannot be read: missing, not an image, corrupt or truncated.

    Attributes:
        path: The file.
        reason: What went wrong.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        """Record the file and the reason; the message names both."""
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")

    def __reduce__(self):
        """Pickle with both arguments (the default would pass only the message)."""
        return (type(self), (self.path, self.reason))


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, decode it fully and convert it to RGB.

    Decoding the whole file here (not lazily) turns a truncated or corrupt file
    into an error that names it, instead of a failure deep inside a batch.

    Args:
        path: An image file in any format PIL reads.

    Returns:
        The RGB image (as the original ``load_image`` returns it, with 16-bit and
        float images scaled rather than clipped: `to_rgb`).

    Raises:
        ImageLoadError: If the file is missing, not a file, not an image, cannot be
            decoded, or has a mode or values `to_rgb` refuses.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "no such file; check the path and the dataset root")
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file; pass the path of an image file")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except Image.UnidentifiedImageError:
        raise ImageLoadError(
            path, "not a recognised image format (empty or not an image); remove or replace it"
        ) from None
    except Image.DecompressionBombError as error:
        raise ImageLoadError(path, f"too many pixels ({error}); downscale it first") from None
    except UnsupportedImageError as error:
        raise ImageLoadError(path, str(error)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(path, f"corrupt or truncated ({error}); re-download or remove it") from None


#: Modes PIL's own ``convert("RGB")`` handles as the original does: grayscale replicated,
#: palette looked up, alpha dropped (not composited), CMYK / YCbCr / LAB / HSV converted.
_PIL_CONVERTED = frozenset({"1", "L", "P", "LA", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = 65535


class UnsupportedImageError(ValueError):
    """A PIL image whose mode or values have no 8-bit RGB reading (the message says why)."""


def _gray8_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")


@dataclass(frozen=True, slots=True)
class ImageFailure:
    """An image that could not be loaded, and why.

    Attributes:
        path: The file.
        reason: What went wrong and the fix (`ImageLoadError.reason`).
    """

    path: Path
    reason: str

    def __str__(self) -> str:
        """``<path>: <reason>``, one line for a report."""
        return f"{self.path}: {self.reason}"


def load_images(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, Image.Image]], list[ImageFailure]]:
    """Load many files, keeping the good ones when some cannot be read.

    For batch callers (``studies/score_images.py``): rate what loaded, report every
    failure by name and reason, and exit non-zero when there was any.

    Args:
        paths: Image files.

    Returns:
        ``(images, failures)``: ``(path, RGB image)`` of every file that loaded, in input
        order, and one `ImageFailure` per file that did not.
    """
    images, failures = [], []
    for path in paths:
        try:
            images.append((Path(path), load_image(path)))
        except ImageLoadError as error:
            failures.append(ImageFailure(error.path, error.reason))
    return images, failures


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB image the model reads, from a PIL image of any mode.

    Modes with 8-bit channels go through PIL's ``convert("RGB")``, exactly as
    the original's ``Image.open(path).convert("RGB")``: grayscale is replicated,
    palettes are looked up, alpha is dropped (not composited: the colour under a
    transparent pixel is kept, as the model saw it in training), CMYK, YCbCr, LAB
    and HSV use PIL's conversion. The original clips wider modes at 255, so a
    16-bit grayscale PNG turned almost white; here they are scaled instead:

    - ``I;16`` (16-bit grayscale PNG/TIFF) and ``I`` (32-bit integers, read as
      16-bit: 0..65535, else refused): ``round(v * 255 / 65535)``;
    - ``F`` (32-bit float, PIL's 0-255 convention of ``L``): rounded; NaN or
      infinite values, values outside 0..255, and an image entirely within 0..1
      (a 0-1 float image, whose scale cannot be told) are refused.

    Raises:
        UnsupportedImageError: For a mode PIL cannot convert or values that have
            no 8-bit reading (named, with the fix).
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > _SIXTEEN_BIT):
            raise UnsupportedImageError(
                f"mode {mode!r} image with values {values.min()}..{values.max()}: read as 16-bit, it must "
                f"lie in 0..{_SIXTEEN_BIT}; rescale it to 8 bits (mode 'L' or 'RGB') first"
            )
        return _gray8_to_rgb(np.rint(values * (255.0 / _SIXTEEN_BIT)))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            raise UnsupportedImageError(
                f"mode 'F' image holds {int(np.isnan(values).sum())} NaN and "
                f"{int(bad.sum() - np.isnan(values).sum())} infinite value(s); replace them before rating"
            )
        if values.size and (values.min() < 0 or values.max() > 255):
            raise UnsupportedImageError(
                f"mode 'F' image with values {values.min():g}..{values.max():g}: PIL's float mode is on the "
                "0..255 scale of 'L'; rescale it to 0..255 (or convert to 'L') first"
            )
        if values.size and values.max() <= 1.0 and values.max() > values.min():
            raise UnsupportedImageError(
                f"mode 'F' image with all values in 0..1 ({values.min():g}..{values.max():g}): a 0-1 "
                "float image cannot be told from a nearly black 0-255 one; multiply it by 255 (or convert "
                "to 'L') first"
            )
        return _gray8_to_rgb(np.rint(values))
    if mode == "La":  # premultiplied: PIL converts it to RGB only through LA
        return image.convert("LA").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA gives the same RGB values and avoids PIL's warning
        # about palette transparency.
        return image.convert("RGBA").convert("RGB")
    if mode in _PIL_CONVERTED:
        return image.convert("RGB")
    raise UnsupportedImageError(
        f"image mode {mode!r} is not supported (supported: RGB, I;16, I, F, "
        f"{', '.join(sorted(_PIL_CONVERTED))}); convert the image to RGB first"
    )


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad an image to a square canvas of a colour, centred (OWL2 ``mm_utils.expand2square``).

    The canvas is ``max(w, h)`` on each side; the image is pasted at
    ``((S - w) // 2, (S - h) // 2)``, the floor taken on the offset.

    Args:
        image: The image.
        background: The fill colour, one int per channel.

    Returns:
        The square image (the input itself when already square).
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass(frozen=True, slots=True)
class ImageProcessor:
    """The original image preprocessing, as a configuration that applies itself.

    Attributes:
        image_size: Side ``S`` of the output (448 for mPLUG-Owl2).
        mean: Per-channel mean subtracted after scaling to [0, 1] (CLIP's).
        std: Per-channel std divided by (CLIP's).
        pad_to_square: Pad to a square of :attr:`background` before resizing
            (Q-Align, One-Align, training); False gives Q-Instruct's scorer:
            shortest edge to ``S``, then a centre crop, cutting the borders.
    """

    image_size: int = 448
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True

    def __post_init__(self) -> None:
        """Store mean and std as float tuples and validate the fields."""
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive; got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB); got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive; got {self.std}")

    @property
    def background(self) -> tuple[int, int, int]:
        """Padding colour ``int(255 * mean)`` per channel: (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def __call__(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """Preprocess images into one batch.

        Args:
            images: Paths or PIL images (a single one is taken as a batch of 1).

        Returns:
            Float32 tensor ``[n, 3, S, S]``.

        Raises:
            ImageLoadError: If a file cannot be read.
        """
        if isinstance(images, str | Path | Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("ImageProcessor got no images; pass at least one path or PIL image")
        arrays = [self.preprocess(image) for image in images]
        return torch.from_numpy(np.stack(arrays))

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """Preprocess one image.

        Args:
            image: A path or a PIL image (any mode).

        Returns:
            Float32 array ``[3, S, S]``.
        """
        pil = load_image(image) if isinstance(image, str | Path) else to_rgb(image)
        size = self.image_size
        if self.pad_to_square:
            pil = expand2square(pil, self.background).resize((size, size), Image.BICUBIC)
        else:
            # CLIPImageProcessor: shortest edge to S, then a centre crop (floor offsets).
            pil = self._resize_shortest_edge(pil)
            left, top = (pil.width - size) // 2, (pil.height - size) // 2
            pil = pil.crop((left, top, left + size, top + size))
        pixels = np.asarray(pil, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        pixels = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _resize_shortest_edge(self, image: Image.Image) -> Image.Image:
        # transformers' get_resize_output_image_size(default_to_square=False): the long
        # side is int(S * long / short), truncated.
        width, height = image.size
        size = self.image_size
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        return image.resize(new, Image.BICUBIC)

    # ------------------------------------------------------------------ config files
    def to_dict(self) -> dict:
        """The CLIPImageProcessor fields of real checkpoints, plus ``mechbiqa_pad_to_square``."""
        size = self.image_size
        return {
            "crop_size": {"height": size, "width": size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.std),
            "resample": _PIL_BICUBIC,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": size},
            # Not a CLIPImageProcessor field: real checkpoints say it in config.json
            # (image_aspect_ratio "pad"); kept here so a saved processor round-trips.
            "mechbiqa_pad_to_square": self.pad_to_square,
        }

    @classmethod
    def from_dict(cls, config: dict, *, pad_to_square: bool | None = None) -> ImageProcessor:
        """Build from CLIPImageProcessor fields, refusing settings this pipeline does not do.

        Args:
            config: The fields of a ``preprocessor_config.json``.
            pad_to_square: Overrides ``mechbiqa_pad_to_square``; if both are
                absent, True (every Q-Align scorer and the training recipe pad).

        Returns:
            The processor.

        Raises:
            ValueError: If a field asks for something else than the original
                pipeline (another resample, no normalisation, a non-square crop,
                a resize size different from the crop size, ...).
        """
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            warnings.warn(f"ignoring unknown preprocessor_config fields {unknown}", stacklevel=2)
        kind = config.get("image_processor_type") or config.get("feature_extractor_type")
        if kind is not None and not str(kind).startswith("CLIP"):
            raise ValueError(
                f"preprocessor type {kind!r} is not CLIP's; mPLUG-Owl2 checkpoints use CLIPImageProcessor"
            )

        def side(value, name: str) -> int | None:
            if value is None:
                return None
            if isinstance(value, int):
                return value
            if "shortest_edge" in value:
                return int(value["shortest_edge"])
            if value.get("height") != value.get("width"):
                raise ValueError(f"{name}={value} is not square; the vision tower needs a square input")
            return int(value["height"])

        crop = side(config.get("crop_size"), "crop_size")
        resize = side(config.get("size"), "size")
        if crop is not None and resize is not None and crop != resize:
            raise ValueError(
                f"size={resize} differs from crop_size={crop}; mPLUG-Owl2 resizes to the crop size (448): "
                "set both to the same value"
            )
        checks = {
            "resample": (config.get("resample", _PIL_BICUBIC) == _PIL_BICUBIC, "must be 3 (PIL bicubic)"),
            "rescale_factor": (abs(config.get("rescale_factor", 1 / 255) - 1 / 255) < 1e-12, "must be 1/255"),
        }
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "do_center_crop"):
            checks[flag] = (config.get(flag, True) is True, "must be true")
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(
                    f"preprocessor_config field {name}={config[name]!r} {rule} for mPLUG-Owl2 preprocessing"
                )

        def triple(value, default: tuple[float, float, float]) -> tuple[float, float, float]:
            if value is None:
                return default
            if isinstance(value, int | float):
                return (float(value),) * 3
            return tuple(float(v) for v in value)  # type: ignore[return-value]

        if pad_to_square is None:
            pad_to_square = bool(config.get("mechbiqa_pad_to_square", True))
        return cls(
            image_size=crop or resize or 448,
            mean=triple(config.get("image_mean"), CLIP_MEAN),
            std=triple(config.get("image_std"), CLIP_STD),
            pad_to_square=pad_to_square,
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, pad_to_square: bool | None = None) -> ImageProcessor:
        """Read ``preprocessor_config.json`` from a checkpoint directory.

        Args:
            directory: The checkpoint directory. Without the file, the defaults
                (448, CLIP mean and std) are used.
            pad_to_square: See :meth:`from_dict`. For a real checkpoint pass
                ``config.json``'s ``image_aspect_ratio == "pad"``.

        Returns:
            The processor.

        Raises:
            FileNotFoundError: If the directory does not exist.
            ValueError: If the file is not valid JSON or asks for another pipeline.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
        path = directory / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls(pad_to_square=True if pad_to_square is None else pad_to_square)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it") from None
        return cls.from_dict(config, pad_to_square=pad_to_square)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``preprocessor_config.json`` (CLIPImageProcessor format) into a directory.

        Returns:
            The path of the file written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PREPROCESSOR_CONFIG
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path
