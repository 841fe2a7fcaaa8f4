"""mechbiqa: mechanistic interpretability of VLM image-quality raters (mPLUG-Owl2, Q-Instruct, Q-Align).

    import mechbiqa, torch
    model = mechbiqa.load_pretrained("path/to/checkpoint", dtype=torch.bfloat16, device="cuda")

Importing mechbiqa patches nothing and seeds nothing.
"""

from importlib.metadata import PackageNotFoundError, version

from mechbiqa.model import ModelConfig, MPLUGOwl2, load_pretrained, save_pretrained

try:
    __version__ = version("mechbiqa")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["ModelConfig", "MPLUGOwl2", "__version__", "load_pretrained", "save_pretrained"]
