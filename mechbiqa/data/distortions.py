"""KADID-10k-style synthetic distortions: one function per type, with KADID's level tables.

`mechbiqa.data.benchmark` applies these to crops of the packaged reference
photos (`mechbiqa.data.photos`) to make the built-in benchmark, and uses each
type's table of KADID-10k mean human ratings (``kadid_mos``) to calibrate its
labels; `mechbiqa.data.descriptions` words the result.

Sources of the numbers (see ``shared/reference/iqa_data.md`` section 2.1):
the five level parameters of each type are those of the KADIS-700k generator as
ported by ARNIQA (``distortion_range``); the mean KADID-10k rating per
(type, level) was computed from pyiqa's KADID-10k meta-info CSV. Two types have
no parameter table there (colour quantisation and denoise); their parameters
are mechbiqa's own and are marked ``params_source="mechbiqa"``.

Conventions: every function takes an RGB float image ``[H, W, 3]`` in [0, 1],
the level parameter, and a ``numpy.random.Generator`` (used only by the random
types), and returns a new float image in [0, 1]. Pixel-scale parameters (blur
sigma, shift in pixels, noise variance) are applied as KADID gives them, since
the pixel is what the viewer (or the vision tower) sees; the sizes of the
pasted patches and blocks (16 and 32 px at KADID's 512x384) are scaled with the
image so they cover the same fraction of it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage, signal
from scipy.interpolate import CubicSpline

__all__ = [
    "DistortionType",
    "DISTORTIONS",
    "DEFAULT_DISTORTIONS",
    "MONOTONE_DISTORTIONS",
    "apply_distortion",
    "get_distortion",
    "rgb_to_lab",
    "lab_to_rgb",
    "rgb_to_gray",
    "to_uint8",
    "to_float",
]

Image_ = np.ndarray  # float [H, W, 3] in [0, 1]
DistortionFn = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

# KADID's images are 512x384; patch sizes are scaled by (short side / 384).
_KADID_SHORT_SIDE = 384


# ---------------------------------------------------------------------------------------------------------
# Colour helpers (sRGB D65, the conversions MATLAB's rgb2lab and skimage use), written out so they are fast
# and warning-free on out-of-gamut values.
# ---------------------------------------------------------------------------------------------------------

_RGB2XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 (or float) RGB image to float64 in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    return np.asarray(image, dtype=np.float64)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8, rounding to nearest."""
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB float image, ``[H, W]``."""
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """SRGB in [0, 1] to CIE L*a*b* (L in [0, 100])."""
    rgb = np.where(image > 0.04045, ((image + 0.055) / 1.055) ** 2.4, image / 12.92)
    xyz = rgb @ _RGB2XYZ.T / _WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE L*a*b* to sRGB, clipped to [0, 1]."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > 0.206893, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE
    rgb = np.clip(xyz @ _XYZ2RGB.T, 0.0, None)
    rgb = np.where(rgb > 0.0031308, 1.055 * rgb ** (1 / 2.4) - 0.055, 12.92 * rgb)
    return np.clip(rgb, 0.0, 1.0)


# JPEG full-range YCbCr, chroma centred on 0.5 (the convention of kornia and of JPEG files).
_RGB2YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCC2RGB = np.linalg.inv(_RGB2YCC)


def _filter_channels(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with ``kernel``, replicating edges (MATLAB imfilter 'replicate')."""
    return np.stack(
        [ndimage.correlate(image[..., c], kernel, mode="nearest") for c in range(image.shape[-1])], -1
    )


def _gaussian(image: np.ndarray, sigma: float, radius: int | None = None) -> np.ndarray:
    """Gaussian blur over the two spatial axes with KADIS's kernel size 2*ceil(2*sigma)+1 by default."""
    radius = math.ceil(2 * sigma) if radius is None else radius
    axes_sigma = (sigma, sigma) + (0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, axes_sigma, mode="nearest", truncate=radius / sigma)


def _curves(x: np.ndarray, control: tuple[float, ...]) -> np.ndarray:
    """KADIS's tone curve: a spline through (0, 0), the control points and (1, 1), clipped to [0, 1].

    One control value ``c`` puts a point at (0.5, c): MATLAB's spline through three
    points is the parabola y = (2 - 4c) x^2 + (4c - 1) x. Two values (lo, hi) put
    points at (0.3, lo), (0.5, 0.5), (0.7, hi), joined by a not-a-knot cubic spline.
    """
    if len(control) == 1:
        c = control[0]
        y = (2 - 4 * c) * x * x + (4 * c - 1) * x
    else:
        lo, hi = control
        spline = CubicSpline([0.0, 0.3, 0.5, 0.7, 1.0], [0.0, lo, 0.5, hi, 1.0], bc_type="not-a-knot")
        y = spline(x)
    return np.clip(y, 0.0, 1.0)


def _patch_size(image: np.ndarray, kadid_px: int) -> int:
    return max(2, round(kadid_px * min(image.shape[:2]) / _KADID_SHORT_SIDE))


def _disk_kernel(radius: float, supersample: int = 16) -> np.ndarray:
    """Pill-box PSF: the fraction of each pixel inside a circle of ``radius`` (as MATLAB fspecial('disk'))."""
    r = math.ceil(radius)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    grid = np.arange(-r, r + 1)
    yy = (grid[:, None, None, None] + offsets[None, None, :, None]) ** 2
    xx = (grid[None, :, None, None] + offsets[None, None, None, :]) ** 2
    kernel = ((yy + xx) <= radius * radius).mean(axis=(2, 3))
    return kernel / kernel.sum()


def _motion_kernel(length: float, angle_deg: float, samples_per_px: int = 32) -> np.ndarray:
    """Line PSF of ``length`` pixels at ``angle_deg``, splatted bilinearly (as fspecial('motion'))."""
    if length <= 1:
        return np.ones((1, 1))
    half = (length - 1) / 2.0
    r = math.ceil(half) + 1
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    t = np.linspace(-half, half, int(samples_per_px * length) + 1)
    phi = math.radians(angle_deg)
    xs, ys = r + t * math.cos(phi), r - t * math.sin(phi)
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    for dy, dx, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (0, 1, fx * (1 - fy)),
        (1, 0, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(kernel, (y0 + dy, x0 + dx), w)
    return kernel / kernel.sum()


# ---------------------------------------------------------------------------------------------------------
# The distortions (KADID type number in brackets)
# ---------------------------------------------------------------------------------------------------------


def gaussian_blur(image: Image_, sigma: float, rng: np.random.Generator) -> Image_:
    """[1] Gaussian blur with standard deviation ``sigma`` px."""
    return _gaussian(image, sigma)


def lens_blur(image: Image_, radius: float, rng: np.random.Generator) -> Image_:
    """[2] Defocus: convolution with a disk of ``radius`` px."""
    return _filter_channels(image, _disk_kernel(radius))


def motion_blur(image: Image_, length: float, rng: np.random.Generator) -> Image_:
    """[3] Linear motion blur of ``length`` px in a random direction."""
    angle = float(rng.uniform(0.0, 180.0))
    return _filter_channels(image, _motion_kernel(length, angle))


def color_diffusion(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[4] Colour diffusion: a*b* blurred (sigma = 1.5 * amount + 2) and scaled by ``amount``."""
    lab = rgb_to_lab(image)
    lab[..., 1:] = _gaussian(lab[..., 1:], 1.5 * amount + 2) * amount
    return lab_to_rgb(lab)


def color_shift(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[5] Colour fringing: the green channel shifted by ``amount`` px, weighted towards edges."""
    gy, gx = np.gradient(rgb_to_gray(image))
    edges = _gaussian(np.hypot(gx, gy), 4.0)
    lo, hi = np.percentile(edges, [1, 99])
    weight = np.clip((edges - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    direction = rng.random(2)
    dy, dx = np.round(direction / np.linalg.norm(direction) * amount).astype(int)
    green = image[..., 1]
    pad = max(abs(dy), abs(dx))
    shifted = np.pad(green, pad, mode="edge")
    shifted = shifted[pad - dy : pad - dy + green.shape[0], pad - dx : pad - dx + green.shape[1]]
    out = image.copy()
    out[..., 1] = shifted * weight + green * (1 - weight)
    return out


def color_quantization(image: Image_, colors: float, rng: np.random.Generator) -> Image_:
    """[6] Palette of ``colors`` colours (median cut) with Floyd-Steinberg dithering."""
    pil = Image.fromarray(to_uint8(image))
    quant = pil.quantize(
        colors=int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
    )
    return to_float(np.asarray(quant.convert("RGB")))


def saturation_hsv(image: Image_, factor: float, rng: np.random.Generator) -> Image_:
    """[7] HSV saturation multiplied by ``factor`` (negative factors invert the hue, then clip).

    With V = max(R, G, B) each channel is V * (1 - S * k(hue)), so scaling S by f
    gives V - f * (V - channel); this keeps KADID's negative level unclipped in S.
    """
    value = image.max(axis=-1, keepdims=True)
    return np.clip(value - factor * (value - image), 0.0, 1.0)


def saturation_lab(image: Image_, factor: float, rng: np.random.Generator) -> Image_:
    """[8] Chroma (a*, b*) multiplied by ``factor``: over-saturation."""
    lab = rgb_to_lab(image)
    lab[..., 1:] *= factor
    return lab_to_rgb(lab)


def jpeg2000(image: Image_, ratio: float, rng: np.random.Generator) -> Image_:
    """[9] JPEG2000 at compression ratio ``ratio``:1 (OpenJPEG through Pillow).

    A small crop would spend most of its byte budget on the codestream header, so
    the image is mirror-padded to at least 256 px a side before coding (the same
    bits per pixel) and cropped back after.
    """
    h, w = image.shape[:2]
    big = np.pad(to_uint8(image), ((0, max(0, 256 - h)), (0, max(0, 256 - w)), (0, 0)), mode="symmetric")
    levels = min(6, int(math.log2(min(big.shape[:2]))))
    buf = io.BytesIO()
    Image.fromarray(big).save(
        buf, format="JPEG2000", quality_mode="rates", quality_layers=[float(ratio)], num_resolutions=levels
    )
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return to_float(decoded[:h, :w])


def jpeg(image: Image_, quality: float, rng: np.random.Generator) -> Image_:
    """[10] JPEG at ``quality`` (libjpeg through Pillow, 4:2:0 chroma)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=int(quality))
    return to_float(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def white_noise(image: Image_, variance: float, rng: np.random.Generator) -> Image_:
    """[11] Additive Gaussian noise of ``variance`` on each RGB channel."""
    return np.clip(image + rng.normal(0.0, math.sqrt(variance), image.shape), 0.0, 1.0)


def white_noise_cc(image: Image_, variance: float, rng: np.random.Generator) -> Image_:
    """[12] Additive Gaussian noise of ``variance`` in YCbCr, so it is coloured."""
    ycc = image @ _RGB2YCC.T + np.array([0.0, 0.5, 0.5])
    ycc = ycc + rng.normal(0.0, math.sqrt(variance), image.shape)
    return np.clip((ycc - np.array([0.0, 0.5, 0.5])) @ _YCC2RGB.T, 0.0, 1.0)


def impulse_noise(image: Image_, density: float, rng: np.random.Generator) -> Image_:
    """[13] Salt and pepper: a fraction ``density`` of channel values set to 0 or 1."""
    out = image.copy()
    flat = out.reshape(-1)
    count = int(density * flat.size)
    idx = rng.integers(0, flat.size, count)
    flat[idx[: count // 2]] = 1.0
    flat[idx[count // 2 :]] = 0.0
    return out


def multiplicative_noise(image: Image_, variance: float, rng: np.random.Generator) -> Image_:
    """[14] Speckle: x + x * n with n Gaussian of ``variance``."""
    return np.clip(image * (1.0 + rng.normal(0.0, math.sqrt(variance), image.shape)), 0.0, 1.0)


def denoise(image: Image_, variance: float, rng: np.random.Generator) -> Image_:
    """[15] Denoising artefacts: white noise of ``variance``, then a 5x5 Wiener filter per channel."""
    noisy = white_noise(image, variance, rng)
    out = np.stack([signal.wiener(noisy[..., c], 5, noise=variance) for c in range(3)], axis=-1)
    return np.clip(out, 0.0, 1.0)


def brighten(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[16] Brightening tone curve through (0.5, 0.5 + amount / 2), blended from RGB and L*."""
    control = (0.5 + amount / 2,)
    lab = rgb_to_lab(image)
    lab[..., 0] = _curves(lab[..., 0] / 100.0, control) * 100.0
    return (2 * _curves(image, control) + lab_to_rgb(lab)) / 3


def darken(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[17] Darkening tone curve through (0.5, 0.5 - amount / 2) on RGB."""
    return _curves(image, (0.5 - amount / 2,))


def mean_shift(image: Image_, shift: float, rng: np.random.Generator) -> Image_:
    """[18] All values shifted by ``shift`` (signed), clipped."""
    return np.clip(image + shift, 0.0, 1.0)


def jitter(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[19] Pixel scatter: five rounds of random per-pixel displacement with std ``amount`` px."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = image
    for _ in range(5):
        sy, sx = rng.normal(0.0, amount, (2, h, w))
        coords = np.stack([yy - sy, xx - sx])
        out = np.stack(
            [ndimage.map_coordinates(out[..., c], coords, order=1, mode="nearest") for c in range(3)], -1
        )
    return out


def non_eccentricity_patch(image: Image_, count: float, rng: np.random.Generator) -> Image_:
    """[20] ``count`` small patches (16 px at KADID size) copied onto nearby positions."""
    out = image.copy()
    h, w = image.shape[:2]
    p = _patch_size(image, 16)
    radius = p
    for _ in range(int(count)):
        y0 = int(rng.integers(0, max(1, h - p)))
        x0 = int(rng.integers(0, max(1, w - p)))
        patch = out[y0 : y0 + p, x0 : x0 + p].copy()
        y1 = int(np.clip(y0 + round((rng.random() - 0.5) * radius), 0, h - p))
        x1 = int(np.clip(x0 + round((rng.random() - 0.5) * radius), 0, w - p))
        out[y1 : y1 + p, x1 : x1 + p] = patch
    return out


def pixelate(image: Image_, strength: float, rng: np.random.Generator) -> Image_:
    """[21] Nearest-neighbour down-scaling by z = 0.95 - strength^0.6 and back up."""
    h, w = image.shape[:2]
    z = 0.95 - strength**0.6
    small = Image.fromarray(to_uint8(image)).resize(
        (max(1, int(w * z)), max(1, int(h * z))), Image.Resampling.NEAREST
    )
    return to_float(np.asarray(small.resize((w, h), Image.Resampling.NEAREST)))


def quantization(image: Image_, levels: float, rng: np.random.Generator) -> Image_:
    """[22] Each channel cut into ``levels`` equal-width bins over 0-255, then stretched to [0, 1]."""
    n = int(levels)
    thresholds = np.linspace(0.0, 255.0, n + 1)[1:-1]
    index = np.searchsorted(thresholds, image * 255.0, side="right").astype(np.float64)
    lo, hi = index.min(), index.max()
    return (index - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def color_block(image: Image_, count: float, rng: np.random.Generator) -> Image_:
    """[23] ``count`` uniformly coloured square blocks (32 px at KADID size) pasted at random."""
    out = image.copy()
    h, w = image.shape[:2]
    p = _patch_size(image, 32)
    for _ in range(int(count)):
        colour = rng.random(3)
        y0 = int(rng.integers(0, max(1, h - p)))
        x0 = int(rng.integers(0, max(1, w - p)))
        out[y0 : y0 + p, x0 : x0 + p] = colour
    return out


def high_sharpen(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[24] Unsharp masking of L* with ``amount`` (KADIS's 13x13 Gaussian of sigma 6)."""
    lab = rgb_to_lab(image)
    lum = lab[..., 0]
    lab[..., 0] = lum + amount * (lum - _gaussian(lum, 6.0, radius=6))
    return lab_to_rgb(lab)


def contrast_change(image: Image_, amount: float, rng: np.random.Generator) -> Image_:
    """[25] S-shaped (amount > -0.2) or flattening tone curve through (0.3, 0.25 - a/4), (0.7, 0.75 + a/4)."""
    return _curves(image, (0.25 - amount / 4, 0.75 + amount / 4))


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DistortionType:
    """One distortion type with its five levels.

    Attributes:
        name: Identifier used in records and file names.
        kadid_id: KADID-10k type number (1-25).
        group: KADID group (blur, color, compression, noise, brightness, spatial, sharpness).
        param: Name of the level parameter.
        levels: The five parameter values, mildest first.
        kadid_mos: Mean KADID-10k rating (1-5, higher is better) at each level.
        fn: The function ``fn(image, value, rng) -> image``.
        signed: True where the level parameter is signed and severity is not monotone in level.
        random: True where the result depends on the generator.
        params_source: ``"kadis"`` (KADIS-700k / ARNIQA table) or ``"mechbiqa"`` (our own choice).
    """

    name: str
    kadid_id: int
    group: str
    param: str
    levels: tuple[float, ...]
    kadid_mos: tuple[float, ...]
    fn: DistortionFn
    signed: bool = False
    random: bool = False
    params_source: str = "kadis"

    @property
    def monotone_mos(self) -> bool:
        """Whether KADID's mean rating falls strictly with level for this type."""
        return all(a > b for a, b in zip(self.kadid_mos, self.kadid_mos[1:], strict=False))


def _t(name, kid, group, param, levels, mos, fn, **kw) -> DistortionType:
    return DistortionType(name, kid, group, param, tuple(float(v) for v in levels), tuple(mos), fn, **kw)


DISTORTIONS: dict[str, DistortionType] = {
    d.name: d
    for d in (
        _t(
            "gaussian_blur",
            1,
            "blur",
            "sigma",
            (0.1, 0.5, 1, 2, 5),
            (4.61, 4.38, 2.91, 1.87, 1.30),
            gaussian_blur,
        ),
        _t("lens_blur", 2, "blur", "radius", (1, 2, 4, 6, 8), (3.86, 2.65, 1.76, 1.44, 1.30), lens_blur),
        _t(
            "motion_blur",
            3,
            "blur",
            "length",
            (1, 2, 4, 6, 10),
            (4.60, 4.10, 2.85, 2.18, 1.67),
            motion_blur,
            random=True,
        ),
        _t(
            "color_diffusion",
            4,
            "color",
            "amount",
            (1, 3, 6, 8, 12),
            (4.50, 2.60, 1.76, 1.61, 1.39),
            color_diffusion,
        ),
        _t(
            "color_shift",
            5,
            "color",
            "shift_px",
            (1, 3, 6, 8, 12),
            (4.23, 2.55, 1.92, 1.85, 1.86),
            color_shift,
            random=True,
        ),
        _t(
            "color_quantization",
            6,
            "color",
            "colors",
            (64, 48, 32, 16, 8),
            (4.11, 3.97, 3.72, 3.20, 2.42),
            color_quantization,
            params_source="mechbiqa",
        ),
        _t(
            "saturation_hsv",
            7,
            "color",
            "factor",
            (0.4, 0.2, 0.1, 0.0, -0.4),
            (2.75, 2.33, 2.26, 2.24, 2.03),
            saturation_hsv,
        ),
        _t(
            "saturation_lab",
            8,
            "color",
            "factor",
            (1, 2, 3, 6, 9),
            (4.58, 3.33, 2.65, 1.82, 1.52),
            saturation_lab,
        ),
        _t(
            "jpeg2000",
            9,
            "compression",
            "ratio",
            (16, 32, 45, 120, 170),
            (4.55, 4.20, 3.87, 2.44, 1.39),
            jpeg2000,
        ),
        _t("jpeg", 10, "compression", "quality", (43, 36, 24, 7, 4), (4.34, 4.25, 3.87, 1.95, 1.35), jpeg),
        _t(
            "white_noise",
            11,
            "noise",
            "variance",
            (0.001, 0.002, 0.003, 0.005, 0.01),
            (3.89, 3.39, 3.05, 2.71, 2.30),
            white_noise,
            random=True,
        ),
        _t(
            "white_noise_cc",
            12,
            "noise",
            "variance",
            (1e-4, 5e-4, 1e-3, 2e-3, 3e-3),
            (4.47, 3.68, 3.17, 2.69, 2.38),
            white_noise_cc,
            random=True,
        ),
        _t(
            "impulse_noise",
            13,
            "noise",
            "density",
            (0.001, 0.005, 0.01, 0.02, 0.03),
            (3.58, 2.93, 2.61, 2.31, 2.13),
            impulse_noise,
            random=True,
        ),
        _t(
            "multiplicative_noise",
            14,
            "noise",
            "variance",
            (0.001, 0.005, 0.01, 0.02, 0.05),
            (4.40, 3.58, 3.08, 2.64, 2.12),
            multiplicative_noise,
            random=True,
        ),
        _t(
            "denoise",
            15,
            "noise",
            "variance",
            (0.001, 0.002, 0.005, 0.01, 0.02),
            (3.67, 2.73, 2.20, 1.65, 1.47),
            denoise,
            random=True,
            params_source="mechbiqa",
        ),
        _t(
            "brighten",
            16,
            "brightness",
            "amount",
            (0.1, 0.2, 0.4, 0.7, 1.1),
            (4.51, 4.29, 3.63, 2.70, 1.81),
            brighten,
        ),
        _t(
            "darken",
            17,
            "brightness",
            "amount",
            (0.05, 0.1, 0.2, 0.4, 0.8),
            (4.60, 4.53, 4.23, 3.53, 2.22),
            darken,
        ),
        _t(
            "mean_shift",
            18,
            "brightness",
            "shift",
            (0, 0.08, -0.08, 0.15, -0.15),
            (4.22, 4.52, 4.60, 4.37, 3.90),
            mean_shift,
            signed=True,
        ),
        _t(
            "jitter",
            19,
            "spatial",
            "amount",
            (0.05, 0.1, 0.2, 0.5, 1),
            (4.42, 4.09, 3.24, 1.85, 1.34),
            jitter,
            random=True,
        ),
        _t(
            "non_eccentricity_patch",
            20,
            "spatial",
            "patches",
            (20, 40, 60, 80, 100),
            (4.33, 3.94, 3.77, 3.46, 3.26),
            non_eccentricity_patch,
            random=True,
        ),
        _t(
            "pixelate",
            21,
            "spatial",
            "strength",
            (0.01, 0.05, 0.1, 0.2, 0.5),
            (3.89, 3.10, 2.90, 2.79, 1.50),
            pixelate,
        ),
        _t(
            "quantization",
            22,
            "spatial",
            "levels",
            (20, 16, 13, 10, 7),
            (4.17, 3.93, 3.69, 3.37, 2.80),
            quantization,
        ),
        _t(
            "color_block",
            23,
            "spatial",
            "blocks",
            (2, 4, 6, 8, 10),
            (2.69, 2.36, 2.30, 2.13, 2.04),
            color_block,
            random=True,
        ),
        _t(
            "high_sharpen",
            24,
            "sharpness",
            "amount",
            (1, 2, 3, 6, 12),
            (3.58, 2.64, 2.14, 1.61, 1.34),
            high_sharpen,
        ),
        _t(
            "contrast_change",
            25,
            "sharpness",
            "amount",
            (0, 0.15, -0.4, 0.3, -0.6),
            (3.42, 3.86, 4.29, 4.14, 3.32),
            contrast_change,
            signed=True,
        ),
    )
}

#: The benchmark's default types: every KADID type with KADIS's parameters whose mean rating falls with level,
#: except colour block (random flat squares: a pasting artefact, not a degradation of the photo). Left out:
#: signed types (mean shift, contrast change), colour shift (its ratings plateau at 1.9), and the two
#: types whose parameters are our own (colour quantisation, denoise), whose KADID ratings would not match.
DEFAULT_DISTORTIONS: tuple[str, ...] = (
    "gaussian_blur", "lens_blur", "motion_blur",
    "color_diffusion", "saturation_hsv", "saturation_lab",
    "jpeg2000", "jpeg",
    "white_noise", "white_noise_cc", "impulse_noise", "multiplicative_noise",
    "brighten", "darken",
    "jitter", "non_eccentricity_patch", "pixelate", "quantization",
    "high_sharpen",
)  # fmt: skip

#: Types whose damage rises with level (all but the signed ones).
MONOTONE_DISTORTIONS: tuple[str, ...] = tuple(n for n, d in DISTORTIONS.items() if not d.signed)


def get_distortion(name: str) -> DistortionType:
    """Look up a distortion type by name.

    Raises:
        KeyError: Naming the unknown type and listing the known ones.
    """
    try:
        return DISTORTIONS[name]
    except KeyError:
        raise KeyError(f"unknown distortion {name!r}; known: {', '.join(DISTORTIONS)}") from None


def apply_distortion(image: np.ndarray, name: str, level: int, rng: np.random.Generator) -> np.ndarray:
    """Apply distortion ``name`` at ``level`` (1-5; 0 returns the image unchanged).

    Args:
        image: RGB uint8 or float in [0, 1], ``[H, W, 3]``.
        name: A key of `DISTORTIONS`.
        level: 1 (mildest) to 5 (most severe), or 0 for none.
        rng: Source of randomness for the random types.

    Returns:
        The distorted image as uint8 ``[H, W, 3]``.
    """
    spec = get_distortion(name)
    if not 0 <= level <= len(spec.levels):
        raise ValueError(f"level must be 0-{len(spec.levels)} for {name}, got {level}")
    x = to_float(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {x.shape}")
    if level == 0:
        return to_uint8(x)
    return to_uint8(spec.fn(x, spec.levels[level - 1], rng))
