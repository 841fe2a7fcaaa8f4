"""Hook names of `mechbiqa.model.MPLUGOwl2`, built by functions (module path == hook name).

Use these instead of string literals: ``names.resid_post(3)`` is
``"llm.blocks.3.hook_resid_post"``, and ``names.resid_post(names.EACH)`` is the
template ``"llm.blocks.{l}.hook_resid_post"`` that names one hook at every layer
(how the store groups them). `all_hook_names(cfg)` is the golden list
a test compares with the model's own ``hook_dict``. Shapes, in the glossary
used throughout (batch, pos, head, d_head, d_model, vocab, image_pos, token):

    hook_image_tokens                          [image, image_pos, d_llm]   rows spliced into the prompt
    vision.blocks.{l}.hook_resid_pre|mid|post  [image, token, d_vision]    token 0 = class token
    vision.blocks.{l}.hook_attn_out|mlp_out    [image, token, d_vision]
    vision.blocks.{l}.attn.hook_pattern        [image, head, token, token]
    vision.blocks.{l}.attn.hook_z              [image, token, head, d_head]
    vision.hook_out                            [image, token, d_vision]    after ln_post
    abstractor.blocks.{l}.hook_resid_pre|post  [image, query, d_vision]
    abstractor.blocks.{l}.hook_pattern         [image, head, query, query + token]
    abstractor.hook_out                        [image, image_pos, d_llm]   queries then vit_eos
    llm.hook_modality                          [batch, pos]                0 text, 1 image
    llm.blocks.{l}.hook_resid_pre|mid|post     [batch, pos, d_model]
    llm.blocks.{l}.hook_attn_out|mlp_out       [batch, pos, d_model]
    llm.blocks.{l}.ln1|ln2.hook_scale          [batch, pos, 1]
    llm.blocks.{l}.ln1|ln2.hook_normalized     [batch, pos, d_model]
    llm.blocks.{l}.attn.hook_q|z               [batch, pos, head, d_head]
    llm.blocks.{l}.attn.hook_k|v               [batch, pos, kv_head, d_head]  new positions only
    llm.blocks.{l}.attn.hook_attn_scores|pattern [batch, head, pos, key_pos]
    llm.blocks.{l}.mlp.hook_pre|post           [batch, pos, d_mlp]
    llm.ln_final.hook_scale|normalized         [batch, pos, 1|d_model]
    llm.unembed.hook_out                       [batch, pos, vocab]         the logits
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from mechbiqa.model.config import LLMConfig, ModelConfig

Tower = Literal["llm", "vision"]
Layer = int | str
"""A layer number, or `EACH` (a template over layers)."""

EACH = "{l}"
"""The layer placeholder of a hook template: ``resid_post(EACH)`` is ``llm.blocks.{l}.hook_resid_post``."""

IMAGE_TOKENS = "hook_image_tokens"
MODALITY = "llm.hook_modality"
LN_FINAL = "llm.ln_final.hook_normalized"
LN_FINAL_SCALE = "llm.ln_final.hook_scale"
LOGITS = "llm.unembed.hook_out"
VISION_OUT = "vision.hook_out"
ABSTRACTOR_OUT = "abstractor.hook_out"

_BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def block(layer: Layer, name: str, tower: Tower = "llm") -> str:
    """``{tower}.blocks.{layer}.{name}``."""
    return f"{tower}.blocks.{layer}.{name}"


def abstractor(layer: Layer, name: str) -> str:
    """``abstractor.blocks.{layer}.{name}``."""
    return f"abstractor.blocks.{layer}.{name}"


def resid_pre(layer: Layer, tower: Tower = "llm") -> str:  # noqa: D103
    return block(layer, "hook_resid_pre", tower)


def resid_mid(layer: Layer, tower: Tower = "llm") -> str:  # noqa: D103
    return block(layer, "hook_resid_mid", tower)


def resid_post(layer: Layer, tower: Tower = "llm") -> str:  # noqa: D103
    return block(layer, "hook_resid_post", tower)


def attn_out(layer: Layer, tower: Tower = "llm") -> str:  # noqa: D103
    return block(layer, "hook_attn_out", tower)


def mlp_out(layer: Layer, tower: Tower = "llm") -> str:  # noqa: D103
    return block(layer, "hook_mlp_out", tower)


def pattern(layer: Layer, tower: Literal["llm", "vision", "abstractor"] = "llm") -> str:
    """The attention pattern of a layer (the abstractor's sits on its block)."""
    if tower == "abstractor":
        return abstractor(layer, "hook_pattern")
    return block(layer, "attn.hook_pattern", tower)


def attn(layer: Layer, name: Literal["q", "k", "v", "z", "attn_scores", "pattern"]) -> str:
    """An LLM attention hook: ``llm.blocks.{layer}.attn.hook_{name}``."""
    return block(layer, f"attn.hook_{name}")


def mlp(layer: Layer, name: Literal["pre", "post"]) -> str:
    """An LLM MLP hook: ``llm.blocks.{layer}.mlp.hook_{name}``."""
    return block(layer, f"mlp.hook_{name}")


def has_key_axis(name: str) -> bool:
    """Whether axis 3 of the hook spans key positions (attention scores and patterns)."""
    return name.endswith(("attn.hook_pattern", "attn.hook_attn_scores"))


def each_layer(template: str, layers: Iterable[int]) -> list[str]:
    """The concrete names of a template over ``layers`` (a name without `EACH`: itself, once)."""
    return [template.replace(EACH, str(layer)) for layer in layers] if EACH in template else [template]


def position_shape(
    name: str, cfg: LLMConfig, n_pos: int, n_keys: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Per-sample shape and dim names of an LLM hook with ``n_pos`` kept positions (the table above).

    Args:
        name: The hook (a template or a concrete name).
        cfg: The LLM's config (widths, heads, vocabulary).
        n_pos: Positions kept on the hook's position axis (the query axis of a pattern).
        n_keys: Length of the key axis of attention patterns and scores.

    Raises:
        ValueError: Not an LLM hook with a position axis.
    """
    last = name.rsplit(".", 1)[-1]
    if has_key_axis(name):
        return (cfg.n_heads, n_pos, n_keys), ("head", "pos", "key_pos")
    if name.endswith(("attn.hook_q", "attn.hook_z")):
        return (n_pos, cfg.n_heads, cfg.d_head), ("pos", "head", "d_head")
    if name.endswith(("attn.hook_k", "attn.hook_v")):
        return (n_pos, cfg.n_kv_heads, cfg.d_head), ("pos", "kv_head", "d_head")
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return (n_pos, cfg.d_mlp), ("pos", "d_mlp")
    if last == "hook_scale":
        return (n_pos, 1), ("pos", "one")
    if name == LOGITS:
        return (n_pos, cfg.vocab_size), ("pos", "vocab")
    if name == MODALITY:
        return (n_pos,), ("pos",)
    if last in (*_BLOCK_HOOKS, "hook_normalized"):
        return (n_pos, cfg.d_model), ("pos", "d_model")
    raise ValueError(
        f"cannot cache hook {name!r}: not an LLM hook with a position axis that the recorder knows; "
        "see mechbiqa_hooks.names for the hook names"
    )


def layer_of(name: str) -> int | None:
    """The layer number in a block hook name, else None."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "blocks" else None


def template(name: str) -> str:
    """The name with its layer replaced by ``{l}`` (groups one hook across layers)."""
    layer = layer_of(name)
    if layer is None:
        return name
    parts = name.split(".")
    parts[2] = EACH
    return ".".join(parts)


def all_hook_names(cfg: ModelConfig) -> list[str]:
    """Every hook point of a model built from ``cfg``, sorted."""
    out = [IMAGE_TOKENS, MODALITY, VISION_OUT, ABSTRACTOR_OUT, LOGITS, LN_FINAL_SCALE, LN_FINAL]
    for layer in range(cfg.vision.n_layers):
        out += [block(layer, h, "vision") for h in _BLOCK_HOOKS]
        out += [block(layer, "attn.hook_pattern", "vision"), block(layer, "attn.hook_z", "vision")]
    for layer in range(cfg.abstractor.n_layers):
        out += [abstractor(layer, h) for h in ("hook_resid_pre", "hook_pattern", "hook_resid_post")]
    for layer in range(cfg.llm.n_layers):
        out += [block(layer, h) for h in _BLOCK_HOOKS]
        out += [attn(layer, h) for h in ("q", "k", "v", "z", "attn_scores", "pattern")]  # type: ignore[arg-type]
        out += [block(layer, f"{ln}.{h}") for ln in ("ln1", "ln2") for h in ("hook_scale", "hook_normalized")]
        out += [mlp(layer, "pre"), mlp(layer, "post")]
    return sorted(out)
