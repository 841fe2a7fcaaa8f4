"""Reference photos that ship inside installed Python packages (no download, ever).

`mechbiqa.data.benchmark` crops these to make the pristine references of the
built-in benchmark. Each photo is a file inside a package's installed tree,
found with ``importlib.util.find_spec(package).origin`` so that the package is
never imported (sporco and imgaug import heavy optional dependencies).

Sources (colour natural photos only: grey photos cannot show colour
distortions; see ``shared/reference/iqa_data.md`` section 1):

- scikit-image (a dependency): astronaut, chelsea, coffee, rocket, motorcycle
  (left view; the right one is a near-duplicate). hubble_deep_field is listed
  but off by default: mostly black sky, where blur and darkening are invisible.
- matplotlib (a dependency): grace_hopper.
- scikit-learn (optional): china, flower (CC BY 2.0).
- sporco (optional, ``pip install --no-deps sporco``): kodim23, monarch, sail,
  tulips, barbara.
- imgaug (optional, ``pip install --no-deps imgaug``): quokka.

A source that is not installed is skipped; `find_photos` reports which photos
were found, and the benchmark records their file hashes in its fingerprint, so
a build is deterministic given the installed packages.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PhotoInfo", "KNOWN_PHOTOS", "DEFAULT_SOURCES", "find_photos", "load_photo", "photo_sha256"]


@dataclass(frozen=True, slots=True)
class PhotoInfo:
    """A packaged reference photo.

    Attributes:
        id: Short unique name, used in benchmark ids and file names.
        package: Import name of the package that ships the file.
        relpath: Path of the file inside the package directory.
        licence: Licence as the package states it.
        default: Whether the benchmark uses it unless asked otherwise.
        path: Absolute path once found (None in `KNOWN_PHOTOS`).
    """

    id: str
    package: str
    relpath: str
    licence: str
    default: bool = True
    path: Path | None = None


KNOWN_PHOTOS: tuple[PhotoInfo, ...] = (
    PhotoInfo("astronaut", "skimage", "data/astronaut.png", "public domain (NASA)"),
    PhotoInfo("chelsea", "skimage", "data/chelsea.png", "CC0 (Stefan van der Walt)"),
    PhotoInfo("coffee", "skimage", "data/coffee.png", "CC0 (Rachel Michetti)"),
    PhotoInfo("rocket", "skimage", "data/rocket.jpg", "public domain (SpaceX)"),
    PhotoInfo("motorcycle", "skimage", "data/motorcycle_left.png", "Middlebury 2014 stereo; none stated"),
    PhotoInfo("hubble", "skimage", "data/hubble_deep_field.jpg", "public domain (NASA)", default=False),
    PhotoInfo(
        "grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "US Navy photo; none stated"
    ),
    PhotoInfo("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0 (danielbuechele, Flickr)"),
    PhotoInfo("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0 (vultilion, Flickr)"),
    PhotoInfo("kodim23", "sporco", "data/kodim23.png", "Kodak, released for unrestricted use"),
    PhotoInfo("monarch", "sporco", "data/monarch.png", "Waterloo BragZone, free of copyright restrictions"),
    PhotoInfo("sail", "sporco", "data/sail.png", "Waterloo BragZone, free of copyright restrictions"),
    PhotoInfo("tulips", "sporco", "data/tulips.png", "Waterloo BragZone, free of copyright restrictions"),
    PhotoInfo("barbara", "sporco", "data/barbara.png", "attributed to Allen Gersho; freely redistributable"),
    PhotoInfo("quokka", "imgaug", "quokka.jpg", "none stated (imgaug is MIT)"),
)

#: Packages searched by default, required ones first.
DEFAULT_SOURCES: tuple[str, ...] = ("skimage", "matplotlib", "sklearn", "sporco", "imgaug")
_REQUIRED_SOURCES = ("skimage", "matplotlib")


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def find_photos(
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    ids: tuple[str, ...] | None = None,
) -> list[PhotoInfo]:
    """The packaged photos that are installed here, in `KNOWN_PHOTOS` order.

    Args:
        sources: Packages to search. Missing optional packages are skipped;
            missing scikit-image or matplotlib (dependencies) is an error.
        ids: Exactly these photos (each must be found), instead of the defaults.

    Returns:
        `PhotoInfo`s with ``path`` set.

    Raises:
        FileNotFoundError: If a required package or a requested photo is missing,
            naming where it was looked for and how to install it.
    """
    known = {p.id for p in KNOWN_PHOTOS}
    if ids is not None:
        unknown = sorted(set(ids) - known)
        if unknown:
            raise KeyError(f"unknown photo id(s) {unknown}; known: {sorted(known)}")
    found: list[PhotoInfo] = []
    for info in KNOWN_PHOTOS:
        if info.package not in sources and ids is None:
            continue
        if ids is not None and info.id not in ids:
            continue
        if ids is None and not info.default:
            continue
        root = _package_dir(info.package)
        path = None if root is None else root / info.relpath
        if path is None or not path.is_file():
            if ids is not None or info.package in _REQUIRED_SOURCES:
                where = f"{root / info.relpath}" if root else f"package {info.package!r} (not installed)"
                raise FileNotFoundError(
                    f"reference photo {info.id!r} not found at {where}; "
                    f"install it with `pip install --no-deps {_pip_name(info.package)}` "
                    "or choose other photos"
                )
            continue
        found.append(PhotoInfo(info.id, info.package, info.relpath, info.licence, info.default, path))
    return found


def _pip_name(package: str) -> str:
    return {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(package, package)


def load_photo(info: PhotoInfo) -> np.ndarray:
    """Read a found photo as uint8 RGB ``[H, W, 3]`` (`mechbiqa.model.processor.load_image`).

    Raises:
        ImageLoadError: If the file is missing, unreadable or of a refused mode (named).
    """
    from mechbiqa.model.processor import load_image

    if info.path is None:
        raise ValueError(f"photo {info.id!r} has no path; get it from find_photos()")
    return np.asarray(load_image(info.path))


def photo_sha256(info: PhotoInfo) -> str:
    """SHA-256 of the photo's file bytes (part of the benchmark fingerprint)."""
    if info.path is None:
        raise ValueError(f"photo {info.id!r} has no path; get it from find_photos()")
    return hashlib.sha256(info.path.read_bytes()).hexdigest()
