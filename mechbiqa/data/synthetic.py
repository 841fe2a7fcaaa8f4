"""Images made for checks and demos: data sets laid out as the real ones are released, demo photos.

`write_koniq_like` writes a folder that `mechbiqa.data.load_dataset("koniq10k", root)`
reads as KonIQ-10k (``1024x768/`` JPEGs and ``koniq10k_scores_and_distributions.csv``);
`write_qpathway_like` an annotation file in Q-Pathway's conversation format over the
same image names. `studies/smoke_7b.py` runs every study on them; the pixels are noise,
so the numbers mean nothing. Both reuse what is already written. `demo_images` saves packaged
photos clean and distorted, for a first rating.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image_name(i: int) -> str:
    return f"{1000000 + i}.jpg"


def write_koniq_like(root: Path, n_images: int) -> Path:
    """``root/1024x768/<id>.jpg`` (random 1024x768 pixels) and the scores CSV; returns ``root``."""
    root = Path(root)
    (root / "1024x768").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore"]
    for i in range(n_images):
        name = _image_name(i)
        if not (root / "1024x768" / name).is_file():
            pixels = (rng.uniform(0, 255, (768, 1024, 3))).astype("uint8")
            Image.fromarray(pixels).save(root / "1024x768" / name, quality=60 + 10 * i)
        rows.append(f"{name},0,1,2,1,0,4,{2.5 + 0.5 * i:.2f},0.5,{40 + 10 * i:.2f}")
    (root / "koniq10k_scores_and_distributions.csv").write_text("\n".join(rows) + "\n")
    return root


def write_qpathway_like(path: Path, n_images: int) -> Path:
    """A Q-Pathway-style annotation file (one conversation per image of `write_koniq_like`)."""
    entries = [
        {
            "id": str(i),
            "image": _image_name(i),
            "conversations": [
                {"from": "human", "value": "<image>\nHow is the quality of this image?"},
                {
                    "from": "gpt",
                    "value": "The image is noisy and the details are lost. "
                    f"Thus, the quality of the image is {('poor', 'fair')[i % 2]}.",
                },
            ],
        }
        for i in range(n_images)
    ]
    Path(path).write_text(json.dumps(entries, indent=1) + "\n")
    return Path(path)


def demo_images(out_dir: Path, seed: int) -> list[Path]:
    """Three packaged photos, each clean, blurred and noisy (KADID level 4), saved in ``out_dir/images``.

    What `studies/score_images.py` rates when no image is given: the ratings should fall from
    clean to distorted. ``seed`` draws the noise.
    """
    from mechbiqa.data.distortions import apply_distortion
    from mechbiqa.data.photos import find_photos, load_photo

    rng = np.random.default_rng(seed)
    paths = []
    for info in find_photos()[:3]:
        photo = load_photo(info)
        for kind, image in (("clean", photo), ("blur", apply_distortion(photo, "gaussian_blur", 4, rng)),
                            ("noise", apply_distortion(photo, "white_noise", 4, rng))):  # fmt: skip
            path = Path(out_dir) / "images" / f"{info.id}_{kind}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths
