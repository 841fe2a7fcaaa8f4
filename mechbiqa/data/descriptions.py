"""Q-Pathway-style quality descriptions generated from the distortion parameters.

`mechbiqa.data.benchmark` attaches one description to every benchmark image;
the compact model learns them in two-stage tuning (stage 1: image ->
description; stage 2: description -> level word). So the text must carry the
visual evidence (what is degraded, how strongly, what that does to sharpness,
noise, colour, detail) but never the answer: none of the five level words
(excellent, good, fair, poor, bad) appears anywhere in it, not even inside
another word ("badly", "fairly"). A test enumerates every phrasing to check.

A description is one sentence of about 8-25 words, built from three parts:

- a noun phrase for the distortion type ("motion blur", "JPEG compression");
- a severity adjective from the cell's KADID-10k mean rating (the *perceived*
  strength, so that "strong" means comparable damage across types; a level
  index would not: desaturation by 60% is KADID's level 1 yet rated 2.75);
- an effect clause per (type, level) saying what the parameter does to the
  picture, so that levels with similar ratings are still told apart.

Several templates and synonym adjectives are sampled with the caller's
generator, so a model cannot key on one fixed string.
"""

from __future__ import annotations

import itertools

import numpy as np

from mechbiqa.data.distortions import get_distortion
from mechbiqa.data.records import LEVEL_WORDS

__all__ = ["describe", "all_descriptions", "severity", "SEVERITY_ADJECTIVES", "contains_level_word"]

#: Synonyms per perceived severity 0 (barely visible) .. 4 (severe).
SEVERITY_ADJECTIVES: tuple[tuple[str, ...], ...] = (
    ("barely visible", "very slight", "faint"),
    ("slight", "mild", "light"),
    ("moderate", "noticeable", "evident"),
    ("strong", "heavy", "marked"),
    ("severe", "extreme", "overwhelming"),
)

# Lower edges of severities 0..3 on KADID's 1-5 rating of the (type, level) cell.
_SEVERITY_EDGES = (4.3, 3.6, 2.8, 2.0)

_TEMPLATES: tuple[str, ...] = (
    "{Adj} {noun}: {effect}.",
    "The image has {adj} {noun}, so {effect}.",
    "There is {adj} {noun} across the picture, and {effect}.",
    "{Effect}, because of {adj} {noun}.",
    "The picture suffers from {adj} {noun}; {effect}.",
)

_PRISTINE: tuple[str, ...] = (
    "The photo is clean and sharp, with natural colors and fine detail intact.",
    "No visible distortion: edges are crisp, colors look natural and textures are clear.",
    "A clean image with crisp edges, natural color and no visible noise or artifacts.",
    "Sharp, noise-free picture; colors are natural and every fine texture is preserved.",
)

# (noun phrase, effect clause per level 1..5) for each distortion type.
_TEXT: dict[str, tuple[str, tuple[str, ...]]] = {
    "gaussian_blur": ("blur", (
        "fine detail is essentially untouched",
        "the finest textures are a little softened",
        "edges look soft and fine texture is lost",
        "edges are smeared and most detail is gone",
        "shapes melt together and no detail remains",
    )),
    "lens_blur": ("defocus blur", (
        "fine texture is softened",
        "edges are soft and small details fade",
        "the scene is out of focus and detail is lost",
        "objects are blurred into soft blobs",
        "only large shapes remain recognizable",
    )),
    "motion_blur": ("motion blur", (
        "edges are essentially unchanged",
        "edges show a faint directional smear",
        "edges are streaked in one direction",
        "objects are doubled and streaked",
        "long streaks wipe out the detail",
    )),
    "color_diffusion": ("color bleeding", (
        "colors spread slightly across edges",
        "colors bleed across edges and look too strong",
        "colors spread over objects and look garish",
        "large areas are flooded with intense color",
        "colors are blown out into unnatural blotches",
    )),
    "color_shift": ("color fringing", (
        "a thin color fringe lines the edges",
        "edges show colored fringes",
        "wide colored halos surround the edges",
        "colored ghosts are offset from every edge",
        "color ghosts sit far from the edges",
    )),
    "color_quantization": ("color quantization", (
        "smooth gradients show slight dithering",
        "gradients show dither patterns",
        "colors are reduced and dither dots appear",
        "few colors remain and dither dots are obvious",
        "the palette is tiny and surfaces look dotted",
    )),
    "saturation_hsv": ("color fading", (
        "colors are muted and dull",
        "colors are washed out",
        "colors have nearly faded away",
        "the image is almost entirely gray",
        "colors turn into odd, inverted tones",
    )),
    "saturation_lab": ("oversaturation", (
        "colors stay close to natural",
        "colors look richer than natural",
        "colors are vivid and slightly garish",
        "colors are glaring and clipped",
        "colors are neon-like and blown out",
    )),
    "jpeg2000": ("JPEG2000 compression", (
        "fine texture is slightly smoothed",
        "textures are smoothed and faint ringing appears",
        "faint ringing appears around edges and texture softens",
        "surfaces are blotchy with blurry, ringing edges",
        "the image is smeared into blotches with heavy ringing",
    )),
    "jpeg": ("JPEG compression", (
        "faint blocking appears in smooth areas",
        "blocking artifacts are visible around edges",
        "blocking and ringing show around edges",
        "the image breaks into blocks and colors smear",
        "large blocks replace detail and colors are smeared",
    )),
    "white_noise": ("random noise", (
        "a light grain covers the image",
        "grain is visible in flat areas",
        "grainy noise covers the whole picture",
        "heavy grain masks fine detail",
        "dense noise hides detail everywhere",
    )),
    "white_noise_cc": ("color noise", (
        "faint color speckles appear in flat areas",
        "colored grain is visible",
        "colored grain covers the picture",
        "thick colored grain masks detail",
        "dense colored noise hides detail",
    )),
    "impulse_noise": ("salt-and-pepper noise", (
        "a few bright and dark dots are scattered",
        "scattered colored dots are visible",
        "many colored dots speckle the image",
        "dense dots cover the whole picture",
        "a thick layer of dots hides the detail",
    )),
    "multiplicative_noise": ("speckle noise", (
        "faint grain appears in bright areas",
        "grain is visible in bright areas",
        "grain covers the brighter regions",
        "thick grain covers bright regions",
        "dense grain swamps the bright regions",
    )),
    "denoise": ("denoising smear", (
        "textures look slightly waxy",
        "fine texture is smoothed away with faint blotches",
        "surfaces look plastic and blotchy",
        "detail is smeared into noisy blotches",
        "the image is smeared and mottled",
    )),
    "brighten": ("overexposure", (
        "the image is slightly brighter",
        "the image looks a bit washed out",
        "bright areas lose some detail and contrast flattens",
        "highlights are blown out and colors fade",
        "most of the image is blown out to white",
    )),
    "darken": ("underexposure", (
        "the image is slightly darker",
        "shadows are a little deeper",
        "shadows lose some of their detail",
        "dark areas are crushed and detail is hidden",
        "most of the image sinks into black",
    )),
    "mean_shift": ("brightness shift", (
        "brightness stays close to the original",
        "the image looks lighter and a little hazy",
        "the image looks darker and a little murky",
        "the image looks much lighter and hazy",
        "the image looks much darker and murky",
    )),
    "jitter": ("pixel jitter", (
        "edges are very slightly ragged",
        "edges look a little ragged",
        "edges are ragged and fine detail shimmers",
        "pixels are scattered and edges break up",
        "pixels are scrambled and shapes dissolve",
    )),
    "non_eccentricity_patch": ("patch displacement", (
        "a few small patches are displaced",
        "small displaced patches break some edges",
        "displaced patches break edges in many places",
        "many displaced patches make edges jagged",
        "displaced patches scramble edges everywhere",
    )),
    "pixelate": ("pixelation", (
        "edges look slightly jagged",
        "edges become jagged and stair-stepped",
        "blocky pixels appear along edges",
        "the picture is visibly made of blocks",
        "large square pixels replace all detail",
    )),
    "quantization": ("color banding", (
        "smooth gradients show faint banding",
        "gradients break into visible bands",
        "banding and flat color patches appear",
        "colors are flattened into few tones",
        "the image is posterized into flat patches",
    )),
    "color_block": ("color blocking", (
        "two flat colored squares cover parts of the scene",
        "a few flat colored squares hide parts of the scene",
        "several flat colored squares hide the scene",
        "many flat colored squares hide the scene",
        "flat colored squares cover much of the scene",
    )),
    "high_sharpen": ("oversharpening", (
        "edges have thin bright halos",
        "edges have wide bright halos",
        "halos and harsh edges appear",
        "thick halos and exaggerated texture appear",
        "harsh halos and gritty texture dominate",
    )),
    "contrast_change": ("contrast change", (
        "contrast is slightly raised",
        "contrast is raised and shadows deepen",
        "contrast is reduced and the image looks flat",
        "contrast is harsh and shadows are crushed",
        "contrast is very low and the image looks dull gray",
    )),
}  # fmt: skip


def severity(distortion: str, level: int) -> int:
    """Perceived severity 0-4 of a (type, level) cell, from KADID's mean rating of that cell."""
    if level == 0:
        raise ValueError("a pristine image has no severity")
    mos = get_distortion(distortion).kadid_mos[level - 1]
    return sum(mos < edge for edge in _SEVERITY_EDGES)


def _fill(template: str, adj: str, noun: str, effect: str) -> str:
    # Capitalise only the first letter, so proper nouns inside ("JPEG") keep their case.
    return template.format(
        adj=adj, Adj=adj[0].upper() + adj[1:], noun=noun, effect=effect, Effect=effect[0].upper() + effect[1:]
    )


def all_descriptions(distortion: str | None, level: int) -> list[str]:
    """Every phrasing `describe` can produce for this cell (``None``/level 0: pristine)."""
    if distortion in (None, "pristine") or level == 0:
        return list(_PRISTINE)
    if distortion not in _TEXT:
        raise KeyError(f"no description text for distortion {distortion!r}; known: {sorted(_TEXT)}")
    noun, effects = _TEXT[distortion]
    effect = effects[level - 1]
    adjectives = SEVERITY_ADJECTIVES[severity(distortion, level)]
    return [_fill(t, a, noun, effect) for t, a in itertools.product(_TEMPLATES, adjectives)]


def describe(distortion: str | None, level: int, rng: np.random.Generator) -> str:
    """One description of an image with ``distortion`` at ``level`` (None or level 0: pristine).

    Args:
        distortion: A distortion type name, or None / ``"pristine"``.
        level: 1-5, or 0 for a pristine image.
        rng: Chooses the phrasing; pass a generator seeded per image for reproducibility.
    """
    options = all_descriptions(distortion, level)
    return options[int(rng.integers(len(options)))]


def contains_level_word(text: str) -> str | None:
    """The first level word found anywhere in ``text`` (also inside other words), else None."""
    lower = text.lower()
    for word in LEVEL_WORDS:
        if word in lower:
            return word
    return None
