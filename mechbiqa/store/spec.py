"""What a recording run caches: `Site`s (a hook, a selection of positions, layers) and a `CacheSpec`.

Where it sits: the first piece of `mechbiqa.store`. A `CacheSpec` is model-free;
`mechbiqa.store.plan.plan_layout` resolves it against a model into a
`mechbiqa.store.layout.StoreLayout` (every shape), which the writer allocates and
the recorder (`mechbiqa_hooks.record.Recorder`) fills.

A selection is a token role (``"quality"``, ``"image"``, ``"description"`` ...;
`mechbiqa.model.roles`), ``"all"`` positions or the ``"last"`` one. Along the
hook's position axis (the query axis of an attention pattern) only the selected
positions are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mechbiqa.model.roles import ROLE_LABELS
from mechbiqa.store.errors import StoreKeyError
from mechbiqa_hooks import names

__all__ = ["PRESETS", "SELECTIONS", "CacheSpec", "Site", "is_image_space", "split_layer"]

SELECTIONS: tuple[str, ...] = tuple(r for r in ROLE_LABELS if r != "pad") + ("all", "last")
"""Position selections: a role label, ``"all"`` positions, or the ``"last"`` real one."""

_LAYER = re.compile(r"^(?P<head>.+\.blocks\.)(?P<layer>\d+|\{l\})(?P<tail>\..+)$")


def split_layer(hook: str) -> tuple[str, int | None]:
    """``"llm.blocks.3.hook_resid_post"`` -> (``"llm.blocks.{l}.hook_resid_post"``, 3).

    A template stays a template (layer None); a hook outside the blocks is returned as is.
    """
    match = _LAYER.match(hook)
    if match is None:
        return hook, None
    template = f"{match['head']}{names.EACH}{match['tail']}"
    return template, None if match["layer"] == names.EACH else int(match["layer"])


@dataclass(frozen=True, slots=True)
class Site:
    """One thing to cache: a hook, which of its positions, at which layers.

    Attributes:
        hook: A hook name (`mechbiqa_hooks.names`). ``{l}`` in place of the layer
            means every layer in ``layers``; a concrete layer (``llm.blocks.3...``)
            is turned into the template with ``layers=(3,)``.
        select: Positions kept on the hook's position axis (the query axis of an
            attention pattern): a role label (``"quality"``, ``"image"``, ...),
            ``"all"`` or ``"last"``. Hooks of the vision side (``vision.*``,
            ``abstractor.*``, ``hook_image_tokens``) have no text positions and
            take ``"all"``.
        layers: The layers of a ``{l}`` hook; None means every layer of the model.
    """

    hook: str
    select: str = "quality"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"Site {self.hook!r}: select={self.select!r} is not one of {SELECTIONS}")
        template, layer = split_layer(self.hook)
        layers = self.layers
        if layer is not None:
            if layers is not None and tuple(layers) != (layer,):
                raise ValueError(
                    f"Site {self.hook!r} names layer {layer} and also layers={layers}; "
                    f"use the template {template!r} with layers=..., or the concrete name alone"
                )
            layers = (layer,)
        if layers is not None:
            if names.EACH not in template:
                raise ValueError(f"Site {self.hook!r} has no layer, so layers={layers} does not apply")
            if any(int(x) < 0 for x in layers) or not layers:
                raise ValueError(
                    f"Site {self.hook!r}: layers must be non-negative layer numbers; got {layers}"
                )
            layers = tuple(sorted({int(x) for x in layers}))
        object.__setattr__(self, "hook", template)
        object.__setattr__(self, "layers", layers)
        if is_image_space(template) and self.select != "all":
            raise ValueError(
                f"Site {template!r} is an image-side hook without text positions; use select='all'"
            )

    @property
    def key(self) -> str:
        """``"<hook template>@<select>"``: the dataset name under ``acts/``."""
        return f"{self.hook}@{self.select}"

    @property
    def has_layers(self) -> bool:
        """Whether the hook is per layer (its name holds ``{l}``)."""
        return names.EACH in self.hook

    def __str__(self) -> str:
        layers = "" if self.layers is None else ":" + ",".join(map(str, self.layers))
        return f"{self.hook}@{self.select}{layers}"


def is_image_space(hook: str) -> bool:
    """Whether a hook lives on the image side (batch = images, no text positions)."""
    return hook.startswith(("vision.", "abstractor.")) or hook == names.IMAGE_TOKENS


_RESID = names.resid_post(names.EACH)
_PATTERN = names.pattern(names.EACH)
_LOGITS = names.LOGITS

PRESETS: dict[str, tuple[Site, ...]] = {
    # Everything the studies read: the logit lens and probes (residual at the quality
    # position), the dominant image tokens (residuals at the image positions), attention
    # attribution by role (the quality row of every layer and head over all keys), the score.
    "default": (
        Site(_RESID, "quality"),
        Site(_RESID, "image"),
        Site(_PATTERN, "quality"),
        Site(_LOGITS, "quality"),
    ),
    # The light one for a 7B model over thousands of images (~2 MB per sample in fp16):
    # no image residuals, which are 17 MB per sample at 32 layers x 65 tokens x 4096.
    "quality": (Site(_RESID, "quality"), Site(_PATTERN, "quality"), Site(_LOGITS, "quality")),
    # default plus full attention maps of every layer (large: heads x pos x pos per layer).
    "full-attention": (
        Site(_RESID, "quality"),
        Site(_RESID, "image"),
        Site(_PATTERN, "all"),
        Site(_LOGITS, "quality"),
    ),
}
"""Named cache specs (``CacheSpec.preset(name)``)."""

_DTYPES = ("float16", "float32")


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """Which activations a recording run keeps, and in which dtype.

    Attributes:
        sites: The sites; two sites may not share a hook and a selection.
        dtype: ``"float16"`` (half the size; LLaMA residuals stay well inside its range)
            or ``"float32"``. bfloat16 models are cast (HDF5 has no bfloat16).
    """

    sites: tuple[Site, ...]
    dtype: str = "float16"

    def __post_init__(self) -> None:
        sites = tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        if not sites:
            raise ValueError("CacheSpec has no sites; give at least one, or use CacheSpec.preset('default')")
        if self.dtype not in _DTYPES:
            raise ValueError(f"CacheSpec dtype {self.dtype!r} is not one of {_DTYPES}")
        keys = [s.key for s in sites]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"CacheSpec lists {repeated} more than once; merge their layers into one Site")

    @classmethod
    def preset(cls, name: str = "default", dtype: str = "float16") -> CacheSpec:
        """A named spec from `PRESETS`."""
        if name not in PRESETS:
            raise StoreKeyError(f"unknown cache spec preset {name!r}; known: {sorted(PRESETS)}")
        return cls(PRESETS[name], dtype)

    @classmethod
    def default(cls, dtype: str = "float16") -> CacheSpec:
        """`PRESETS["default"]`: quality and image residuals, quality attention rows, quality logits."""
        return cls.preset("default", dtype)

    @classmethod
    def parse(cls, text: str, dtype: str = "float16") -> CacheSpec:
        """Parse ``"default; llm.blocks.{l}.hook_attn_out@quality:0,2; llm.unembed.hook_out@last"``.

        Items are separated by ``;`` (or whitespace); each is a preset name or
        ``HOOK[@SELECT][:LAYERS]`` with LAYERS like ``0,2,5-7``; SELECT defaults to quality.
        """
        sites: list[Site] = []
        for item in re.split(r"[;\s]+", text.strip()):
            if not item:
                continue
            if item in PRESETS:
                sites += [s for s in PRESETS[item] if s.key not in {t.key for t in sites}]
                continue
            match = re.fullmatch(r"(?P<hook>[^@:]+)(@(?P<select>[a-z]+))?(:(?P<layers>[\d,\-]+))?", item)
            if match is None:
                raise ValueError(
                    f"cannot parse cache site {item!r}; write HOOK[@SELECT][:LAYERS], "
                    f"e.g. '{_RESID}@image:0-3'"
                )
            layers = None
            if match["layers"]:
                layers = []
                for part in match["layers"].split(","):
                    lo, _, hi = part.partition("-")
                    layers += list(range(int(lo), int(hi or lo) + 1))
            sites.append(Site(match["hook"], match["select"] or "quality", tuple(layers) if layers else None))
        return cls(tuple(sites), dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "dtype": self.dtype,
            "sites": [
                {"hook": s.hook, "select": s.select, "layers": None if s.layers is None else list(s.layers)}
                for s in self.sites
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CacheSpec:
        """Inverse of `to_dict`."""
        sites = tuple(
            Site(s["hook"], s["select"], None if s["layers"] is None else tuple(s["layers"]))
            for s in d["sites"]
        )
        return cls(sites, d["dtype"])

    def __str__(self) -> str:
        return "; ".join(map(str, self.sites))
