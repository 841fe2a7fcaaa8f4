"""Configuration of an mPLUG-Owl2 model: three frozen dataclasses, one per part.

`ModelConfig` is what every other file of `mechbiqa.model` is built from. It reads
and writes the original Hugging Face ``config.json`` (LLM fields at the top
level, the vision tower under ``visual_config.visual_model``, the abstractor
under ``visual_config.visual_abstractor``), so a checkpoint directory written
here has the same layout as Q-Align's or Q-Instruct's.

Field names follow TransformerLens (``d_model``, ``n_layers``, ``d_mlp`` ...);
the translation to the Hugging Face names lives in one table per part below.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

IMAGE_TOKEN_INDEX = -200  # the placeholder id spliced out for image tokens (original constants.py)
LEVEL_WORDS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")  # Q-Align's level words, best first


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """CLIP-style ViT with a class token and learned absolute positions."""

    image_size: int = 448
    patch_size: int = 14
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    d_mlp: int = 4096
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check(self.image_size % self.patch_size == 0, "vision image_size must be a multiple of patch_size")
        _check(self.d_model % self.n_heads == 0, "vision d_model must be divisible by n_heads")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Class token + patches."""
        return 1 + self.grid**2

    @property
    def d_head(self) -> int:  # noqa: D102
        return self.d_model // self.n_heads


@dataclass(frozen=True, slots=True)
class AbstractorConfig:
    """Visual abstractor: learned queries cross-attending to the vision tokens."""

    n_queries: int = 64
    d_model: int = 1024
    n_layers: int = 6
    n_heads: int = 16
    d_mlp: int = 2816
    layer_norm_eps: float = 1e-6  # used only by the LayerNorm inside the MLP (ffn_ln)
    grid_size: int = 32

    def __post_init__(self) -> None:
        _check(self.d_model % self.n_heads == 0, "abstractor d_model must be divisible by n_heads")

    @property
    def d_head(self) -> int:  # noqa: D102
        return self.d_model // self.n_heads


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """LLaMA-2 decoder with modality-adaptive K/V projections and norms."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    d_mlp: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        _check(self.d_model % self.n_heads == 0, "llm d_model must be divisible by n_heads")
        _check(self.n_heads % self.n_kv_heads == 0, "llm n_heads must be a multiple of n_kv_heads")

    @property
    def d_head(self) -> int:  # noqa: D102
        return self.d_model // self.n_heads


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The whole model: vision tower -> abstractor -> multiway LLaMA."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = field(default_factory=AbstractorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def __post_init__(self) -> None:
        # The abstractor concatenates its queries with the vision tokens and adds
        # one sin-cos table over both, so the three widths must agree.
        _check(
            self.abstractor.d_model == self.vision.d_model,
            "abstractor d_model must equal the vision d_model (queries and image tokens share one sequence)",
        )
        _check(
            self.abstractor.grid_size == self.vision.grid,
            "abstractor grid_size must equal vision image_size // patch_size",
        )

    @property
    def n_image_tokens(self) -> int:
        """LLM positions one image occupies: the queries plus the ``vit_eos`` row (65 at 7B)."""
        return self.abstractor.n_queries + 1

    # ---------------------------------------------------------------- presets
    @classmethod
    def tiny(cls) -> ModelConfig:
        """A random-init test model (2 vision, 2 abstractor, 2 LLM layers)."""
        return cls(
            vision=VisionConfig(image_size=28, patch_size=14, d_model=32, n_layers=2, n_heads=2, d_mlp=64),
            abstractor=AbstractorConfig(n_queries=4, d_model=32, n_layers=2, n_heads=2, d_mlp=48, grid_size=2),
            llm=LLMConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=64,
                          max_position_embeddings=512),
        )

    @classmethod
    def compact(cls, vocab_size: int = 1024, image_size: int = 64) -> ModelConfig:
        """The compact model of the embedded default: 65 image tokens, as the real model.

        Chosen by measurement on the built-in benchmark (``mechbiqa.train`` and
        ``studies/train_pair.py`` train it from scratch on 2 CPU cores): 64 px
        images in 8 px patches (an 8 x 8 grid: fine detail reaches the vision
        tower, and linear statistics of such patches already predict the labels
        better than at 84 px), a 2-layer width-128 vision tower and a 1-layer
        abstractor with the real model's 64 queries (+ ``vit_eos`` = 65 image
        tokens) -- shallow towers learned distortions as well as 4 + 2 layers in
        a probe, at half the cost -- and an 8-layer width-128 LLM (4 heads of 32,
        MLP 256), deep enough for layer-wise trajectories (logit lens, patching
        sweeps) to have a shape. It costs what the earlier 4-layer width-192 LLM
        (6 heads, MLP 512) cost: 1.03x its CPU seconds per training step
        (batch 32, one thread, interleaved), where keeping MLP 352 cost 1.14x and
        width 160 cost 1.58x. Other sizes take the largest patch of 8, 7, 6, 4
        that divides them.
        """
        patch = next((p for p in (8, 7, 6, 4) if image_size % p == 0), None)
        if patch is None:
            raise ValueError(f"compact image_size must be divisible by 8, 7, 6 or 4; got {image_size}")
        return cls(
            vision=VisionConfig(image_size=image_size, patch_size=patch, d_model=128, n_layers=2, n_heads=4,
                                d_mlp=512),
            abstractor=AbstractorConfig(n_queries=64, d_model=128, n_layers=1, n_heads=4, d_mlp=352,
                                        grid_size=image_size // patch),
            llm=LLMConfig(vocab_size=vocab_size, d_model=128, n_layers=8, n_heads=4, n_kv_heads=4, d_mlp=256,
                          max_position_embeddings=512),
        )

    @classmethod
    def llama2_7b(cls) -> ModelConfig:
        """The released mPLUG-Owl2 7B shapes (Q-Instruct, Q-Align, One-Align)."""
        return cls()

    # ------------------------------------------------------ Hugging Face json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read the original ``config.json`` dictionary; unknown keys are ignored."""
        try:
            visual = d["visual_config"]
            vm, va = visual["visual_model"], visual["visual_abstractor"]
        except KeyError as e:
            raise ValueError(
                f"config.json has no {e.args[0]!r}: this is not an mPLUG-Owl2 config "
                "(expected LLM fields at the top level and visual_config.{visual_model,visual_abstractor})"
            ) from None
        vision = _from_table(VisionConfig, _VISION_HF, vm)
        abstractor = _from_table(AbstractorConfig, _ABSTRACTOR_HF, va)
        if va.get("grid_size") is None:  # the original turns None into 32
            abstractor = replace(abstractor, grid_size=vision.grid)
        llm = _from_table(LLMConfig, _LLM_HF, d)
        if d.get("num_key_value_heads") is None:
            llm = replace(llm, n_kv_heads=llm.n_heads)
        if d.get("rope_scaling"):
            raise ValueError("rope_scaling is set in config.json; mPLUG-Owl2 checkpoints use none and it is not ported")
        return cls(vision=vision, abstractor=abstractor, llm=llm)

    def to_hf_dict(self) -> dict[str, Any]:
        """The original ``config.json`` layout, loadable by the original code."""
        out: dict[str, Any] = {"model_type": "mplug_owl2", "architectures": ["MPLUGOwl2LlamaForCausalLM"],
                               "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
                               "pretraining_tp": 1, "rope_scaling": None, "use_cache": True}
        out.update(_to_table(self.llm, _LLM_HF))
        vm = {"model_type": "mplug_owl_vision_model", "hidden_act": "quick_gelu", "num_channels": 3,
              "use_cls_token": True, "use_post_layernorm": True, "use_flash_attn": False,
              "projection_dim": self.vision.d_model, "attention_dropout": 0.0}
        vm.update(_to_table(self.vision, _VISION_HF))
        va = {"model_type": "mplug_owl_visual_abstract", "encoder_hidden_size": self.vision.d_model,
              "add_v2t_pos_emb": False, "use_cls_token": True, "attention_probs_dropout_prob": 0.0}
        va.update(_to_table(self.abstractor, _ABSTRACTOR_HF))
        out["visual_config"] = {"visual_model": vm, "visual_abstractor": va}
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` file (or the one inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no config.json at {path}: a checkpoint directory needs the original config.json beside its weights"
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    def to_json(self, path: str | Path) -> None:
        """Write the original ``config.json`` layout."""
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict in this package's own field names (for store and report metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; warns on unknown keys."""
        return cls(
            vision=_dataclass_from_dict(VisionConfig, d.get("vision", {})),
            abstractor=_dataclass_from_dict(AbstractorConfig, d.get("abstractor", {})),
            llm=_dataclass_from_dict(LLMConfig, d.get("llm", {})),
        )


# Our field name -> the original config.json field name.
_VISION_HF = {"image_size": "image_size", "patch_size": "patch_size", "d_model": "hidden_size",
              "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "d_mlp": "intermediate_size",
              "layer_norm_eps": "layer_norm_eps"}
_ABSTRACTOR_HF = {"n_queries": "num_learnable_queries", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
                  "n_heads": "num_attention_heads", "d_mlp": "intermediate_size",
                  "layer_norm_eps": "layer_norm_eps", "grid_size": "grid_size"}
_LLM_HF = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_mlp": "intermediate_size",
           "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
           "max_position_embeddings": "max_position_embeddings", "bos_token_id": "bos_token_id",
           "eos_token_id": "eos_token_id", "pad_token_id": "pad_token_id"}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _from_table(cls: type, table: dict[str, str], d: dict[str, Any]) -> Any:
    kwargs = {ours: d[theirs] for ours, theirs in table.items() if d.get(theirs) is not None}
    return cls(**kwargs)


def _to_table(obj: Any, table: dict[str, str]) -> dict[str, Any]:
    return {theirs: getattr(obj, ours) for ours, theirs in table.items()}


def _dataclass_from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=3)
    return cls(**{k: v for k, v in d.items() if k in names})
