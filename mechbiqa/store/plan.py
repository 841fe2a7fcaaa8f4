"""A `CacheSpec` resolved against a model and its prompts: the `StoreLayout` a run allocates.

Where it sits: between `mechbiqa.store.spec` (model-free: hooks, selections) and
`mechbiqa.store.writer` (allocates every array at creation). `plan_layout`
reads widths and layer counts from the model's config, the image-side shapes by
encoding one blank image, and the capacity of each selection from the roles of
the prompt(s): the longest prompt and the largest count of each role, plus
``max_new_tokens`` when answers are generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechbiqa.model.config import ModelConfig
from mechbiqa.model.mplug_owl2 import MPLUGOwl2
from mechbiqa.model.roles import Role, TokenRoles
from mechbiqa.store.layout import ArraySpec, StoreLayout
from mechbiqa.store.spec import CacheSpec, is_image_space
from mechbiqa_hooks import names

if TYPE_CHECKING:
    from mechbiqa.store.record import RunConfig

__all__ = ["capacities", "plan_layout"]


def _layers_of(cfg: ModelConfig, hook: str) -> int:
    tower = hook.split(".")[0]
    return {"vision": cfg.vision.n_layers, "abstractor": cfg.abstractor.n_layers}.get(tower, cfg.llm.n_layers)


def _text_feature(
    cfg: ModelConfig, hook: str, cap: int, max_pos: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Per-sample shape of an LLM hook with ``cap`` selected positions (`names.position_shape`)."""
    return names.position_shape(hook, cfg.llm, cap, max_pos)


def _image_features(model: MPLUGOwl2, hooks: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of image-side hooks, found by encoding one blank image."""
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(tensor: Tensor, hook: Any) -> None:
        shapes[hook.name] = tuple(tensor.shape[1:])

    concrete = sorted({h.replace(names.EACH, "0") for h in hooks})
    size = model.cfg.vision.image_size
    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, grab) for n in concrete]):
        model.encode_images(torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype))
    missing = [n for n in concrete if n not in shapes]
    if missing:
        raise ValueError(
            f"image-side hook(s) {missing} did not fire while encoding an image; check the names"
        )
    return {h: shapes[h.replace(names.EACH, "0")] for h in hooks}


def capacities(
    prompt_roles: TokenRoles | Sequence[TokenRoles], run: RunConfig | None = None
) -> dict[str, int]:
    """Positions each selection may hold, from the prompts' roles and the longest answer.

    With several prompts (one per sample) each role gets the largest count any prompt has.
    """
    many = [prompt_roles] if isinstance(prompt_roles, TokenRoles) else list(prompt_roles)
    if not many:
        raise ValueError("capacities needs the roles of at least one prompt")
    per_prompt = [r.counts() for r in many]
    counts = {label: max(c[label] for c in per_prompt) for label in per_prompt[0]}
    grow = run.max_new_tokens if run is not None and run.mode == "generate" else 0
    max_pos = max(len(r) for r in many) + grow
    cap = {"all": max_pos, "last": 1, "quality": 1, "bos": 1}
    for role in Role:
        label = role.label
        if label in ("pad", "quality", "bos"):
            continue
        cap[label] = counts[label] + (grow if role in (Role.DESCRIPTION, Role.OTHER) else 0)
    return {k: max(1, v) for k, v in cap.items()}


def plan_layout(
    model: MPLUGOwl2,
    spec: CacheSpec,
    prompt_roles: TokenRoles | Sequence[TokenRoles],
    n_samples: int,
    run: RunConfig | None = None,
) -> StoreLayout:
    """Resolve a spec against a model and prompt: every array's shape, fixed before the run starts.

    Args:
        model: The model (its config gives widths and layer counts).
        spec: What to cache.
        prompt_roles: Roles of the prompt's spliced sequence, or of every sample's own prompt.
        n_samples: Rows of the store.
        run: The run (generation lengthens sequences by ``max_new_tokens``); None: scoring.
    """
    cfg = model.cfg
    cap = capacities(prompt_roles, run)
    max_pos = cap["all"]
    image_hooks = [s.hook for s in spec.sites if is_image_space(s.hook)]
    image_shapes = _image_features(model, image_hooks) if image_hooks else {}
    arrays = []
    for site in spec.sites:
        if site.has_layers:
            n_layers = _layers_of(cfg, site.hook)
            layers = site.layers if site.layers is not None else tuple(range(n_layers))
            bad = [x for x in layers if x >= n_layers]
            if bad:
                raise ValueError(f"{site}: layer(s) {bad} do not exist; the model has {n_layers}")
        else:
            layers = ()
        if is_image_space(site.hook):
            shape = image_shapes[site.hook]
            dims = ("head", "query", "key") if len(shape) == 3 else ("token", "d")
        else:
            shape, dims = _text_feature(cfg, site.hook, cap[site.select], max_pos)
        arrays.append(ArraySpec(site.key, site.hook, site.select, layers, shape, dims))
    used = {s.select for s in spec.sites} | {"quality", "image"}
    answer_bytes = 24 * run.max_new_tokens if run is not None and run.mode == "generate" else 1
    return StoreLayout(
        n_samples,
        max_pos,
        tuple((s, cap[s]) for s in sorted(used)),
        tuple(arrays),
        answer_bytes=answer_bytes,
        dtype=spec.dtype,
    )
