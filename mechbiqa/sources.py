"""Where the studies' models and samples come from: checkpoints, the tiny random model, data sets.

Every study script loads its model and images through this module, so that a
``--model DIR`` or a ``--dataset SPEC`` means the same thing in each of them:

* `load_model`: a checkpoint directory (`mechbiqa.model.load.load_components`),
  the compact default `DEFAULT_CHECKPOINT`, or `tiny_random_model` (a random
  ``ModelConfig.tiny()`` model with a toy tokenizer: pipeline checks and tests).
* `load_samples`: the built-in benchmark (`DEFAULT_BENCHMARK`, built when
  missing), a folder of images, a ``.jsonl`` of IQARecords, or ``NAME=ROOT``.
* `load_rater` / `load_raters` / `tiny_raters`: checkpoints as `mechbiqa.pipeline`
  raters (one-stage, two-stage pair, or a real Q-Instruct / One-Align directory).
* `stored_model` / `load_lens`: the model an activation store was recorded
  with, and its logit lens read back from the checkpoint (or the tiny model).

Every loader takes ``dtype`` and ``device`` and casts each weight as it is read
(`mechbiqa.model.load.load_pretrained`): a 7B checkpoint asked for in bfloat16
on cuda never exists as a float32 copy.

Errors are exceptions (`FileNotFoundError` for something missing, `ValueError`
for a spec that names nothing usable) whose message says what to pass instead;
`mechbiqa.cli.run` turns them into one line on stderr.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechbiqa.model import ModelConfig, MPLUGOwl2
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, QALIGN_SCORER_PROMPT
from mechbiqa.model.tokenizer import Tokenizer, train_compact_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMPACT = REPO / "cache" / "compact"
DEFAULT_CHECKPOINT = COMPACT / "one-stage"
DEFAULT_CHECKPOINTS = (f"one-stage={COMPACT / 'one-stage'}", f"two-stage={COMPACT / 'two-stage'}")
DEFAULT_BENCHMARK = REPO / "cache" / "benchmark"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Text the toy tokenizer of the tiny random model is trained on: the prompts and some answers.
_TOY_TEXT = (
    QALIGN_SCORER_PROMPT.replace("<|image|>", ""),
    "USER: Rate the quality of the image. ASSISTANT: The image is sharp and clear, the colours are vivid.",
    "The image is blurry and noisy, with heavy compression artifacts and washed out colours.",
    "The quality of the image is good. The quality of the image is poor. The quality of the image is fair.",
    *LEVEL_WORDS,
)
_TINY_NAME = re.compile(r"tiny-random\(seed=(\d+)\)")


# ----------------------------------------------------------------------------- models
def seeded_model(cfg: ModelConfig, seed: int = 0) -> MPLUGOwl2:
    """A model with PyTorch's default initialisation under ``seed``, without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MPLUGOwl2(cfg).eval()


def tiny_random_model(seed: int = 0) -> tuple[MPLUGOwl2, Tokenizer, ImageProcessor]:
    """A random `ModelConfig.tiny` model with a toy tokenizer: same seed, same weights."""
    tokenizer = train_compact_tokenizer(_TOY_TEXT, vocab_size=320)
    cfg = ModelConfig.tiny()
    cfg = replace(cfg, llm=replace(cfg.llm, vocab_size=tokenizer.vocab_size))
    generator = torch.Generator().manual_seed(seed)
    model = seeded_model(cfg, seed)
    with torch.no_grad():  # the default init leaves norms at 1 and some rows at 0: spread every weight
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval(), tokenizer, ImageProcessor(image_size=cfg.vision.image_size)


def tiny_random_name(seed: int) -> str:
    """The name stores and reports give the tiny random model (`load_lens` reads it back)."""
    return f"tiny-random(seed={seed})"


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (a torch dtype passes through).

    Raises:
        ValueError: A name that is not float32, bfloat16 or float16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {dtype!r}: choose float32, bfloat16 or float16")
    return getattr(torch, dtype)


def load_model(
    checkpoint: str | Path | None = None,
    *,
    tiny_random: bool = False,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
) -> tuple[MPLUGOwl2, Tokenizer, ImageProcessor, str]:
    """A model, its tokenizer and processor, and a name for stores and reports.

    Args:
        checkpoint: Checkpoint directory (config.json, weights, tokenizer); None: `DEFAULT_CHECKPOINT`.
        tiny_random: The tiny random model of ``seed`` instead (``checkpoint`` is ignored).
        seed: Seed of the tiny random model.
        dtype: Model dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...

    Raises:
        FileNotFoundError: No checkpoint was named and the compact default is not trained.
    """
    dtype = torch_dtype(dtype)
    if tiny_random:
        model, tokenizer, processor = tiny_random_model(seed)
        return model.to(device, dtype), tokenizer, processor, tiny_random_name(seed)
    checkpoint = checkpoint or _default_checkpoint()
    from mechbiqa.model.load import load_components

    parts = load_components(str(checkpoint), dtype=dtype, device=device)
    return parts.model, parts.tokenizer, parts.processor, str(Path(checkpoint).resolve())


def _default_checkpoint() -> Path:
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(
            f"no model: pass a checkpoint directory (--model DIR), train the compact default into "
            f"{DEFAULT_CHECKPOINT}, or use the tiny random model (--tiny-random) for a pipeline check"
        )
    return DEFAULT_CHECKPOINT


def tiny_raters(seed: int = 0, max_new_tokens: int = 6) -> dict[str, Any]:
    """A random tiny one-stage rater and a random tiny two-stage pair (pipeline checks only).

    The one-stage model is ``tiny_random_model(seed)``, the pair's stages ``seed + 1`` and ``seed + 2``.
    """
    from mechbiqa.model.load import Components
    from mechbiqa.pipeline import OneStageRater, TwoStageRater

    def components(s: int) -> Components:
        model, tokenizer, processor = tiny_random_model(s)
        return Components(
            model=model, tokenizer=tokenizer, processor=processor, path=Path(f"tiny-random-{s}")
        )

    return {
        "one-stage": OneStageRater(components(seed), template="v1", max_new_tokens=max_new_tokens),
        "two-stage": TwoStageRater(
            components(seed + 1), components(seed + 2), template="v1", max_new_tokens=max_new_tokens
        ),
    }


def open_source(
    checkpoint: str | Path | None = None,
    *,
    tiny_random: bool = False,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    max_new_tokens: int = 48,
) -> Any:
    """A study's model as a `mechbiqa.checkpoint.Checkpoint`: a directory of any kind, or the tiny random one.

    Args:
        checkpoint: A checkpoint directory or two-stage pair; None: `DEFAULT_CHECKPOINT`.
        tiny_random: The tiny random model of ``seed`` instead (a released-kind checkpoint).
        seed: Seed of the tiny random model.
        dtype: Model dtype.
        device: ``cpu``, ``cuda`` ...
        max_new_tokens: Longest generated description.

    Raises:
        FileNotFoundError: No checkpoint there (or the compact default is not trained).
    """
    from mechbiqa.checkpoint import Checkpoint, open_checkpoint
    from mechbiqa.model.load import Components

    if tiny_random:
        model, tokenizer, processor, name = load_model(
            tiny_random=True, seed=seed, dtype=dtype, device=device
        )
        parts = Components(model=model, tokenizer=tokenizer, processor=processor, path=Path(name))
        return Checkpoint.released(parts, max_new_tokens=max_new_tokens, name=name)
    path = Path(checkpoint) if checkpoint else _default_checkpoint()
    opened = open_checkpoint(path, dtype=dtype, device=device, max_new_tokens=max_new_tokens)
    opened.name = str(path.resolve())
    return opened


def load_rater(
    path: str | Path, *, dtype: str | torch.dtype = "float32", device: str = "cpu", **kwargs: Any
) -> Any:
    """A checkpoint (released, one-stage) or a two-stage pair as a `mechbiqa.pipeline` rater.

    `mechbiqa.checkpoint.open_checkpoint` in ``dtype`` on ``device``: each model's weights are cast as
    they are read (no float32 copy); the checkpoints' modes are checked there.

    Args:
        path: The checkpoint directory or the pair's folder.
        dtype: Model dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype).
        device: ``cpu``, ``cuda`` ...
        **kwargs: ``template``, ``max_new_tokens`` of the rater.

    Raises:
        FileNotFoundError: ``path`` holds neither a checkpoint nor a pair.
        CheckpointModeError: A checkpoint of another mode or stage.
    """
    from mechbiqa.checkpoint import open_checkpoint

    return open_checkpoint(path, dtype=torch_dtype(dtype), device=device, **kwargs).rater


def load_raters(
    checkpoints: Sequence[str] = (),
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    max_new_tokens: int = 48,
    real_template: str = "mplug_owl2",
) -> dict[str, tuple[Any, str]]:
    """Name -> ``(rater, path)`` for ``NAME=DIR`` or ``DIR`` entries.

    An entry is a one-stage checkpoint, a two-stage parent (``stage1/``, ``stage2/``), or a real
    checkpoint without ``mechbiqa.json`` (Q-Instruct, One-Align: rated as one-stage with
    ``real_template``). No entries: `DEFAULT_CHECKPOINTS`, those that exist.

    Raises:
        FileNotFoundError: A named entry is not a checkpoint, or no checkpoint was found at all.
    """
    from mechbiqa.checkpoint import open_checkpoint

    raters = {}
    for entry in checkpoints or DEFAULT_CHECKPOINTS:
        name, _, where = entry.rpartition("=")
        path = Path(where)
        name = name or path.name
        try:
            checkpoint = open_checkpoint(path, dtype=dtype, device=device, max_new_tokens=max_new_tokens,
                                         released_template=real_template)
        except FileNotFoundError:
            if checkpoints:
                raise
            continue  # a default compact checkpoint not trained yet
        raters[name] = (checkpoint.rater, str(path))
    if not raters:
        raise FileNotFoundError(
            f"no checkpoint: train the compact pair into {COMPACT} (studies/train_pair.py), pass a "
            "checkpoint directory (--model DIR), or use tiny random raters (--tiny-random) for a "
            "pipeline check"
        )
    return raters


# ----------------------------------------------------------------------------- stores and lenses
def stored_model(store: Any) -> str:
    """The model an `ActivationStore` was recorded with: a checkpoint path or ``tiny-random(seed=N)``."""
    import h5py

    with h5py.File(store.path, "r") as f:
        value = f.attrs.get("model", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def load_lens(source: str) -> tuple[Any, Tokenizer]:
    """The `LogitLens` and tokenizer of a checkpoint directory or of ``tiny-random(seed=N)``.

    Raises:
        FileNotFoundError: ``source`` is neither (e.g. a store recorded on another machine).
    """
    from mechbiqa.analysis.lens import LogitLens

    tiny = _TINY_NAME.fullmatch(source)
    if tiny:
        model, tokenizer, _ = tiny_random_model(int(tiny.group(1)))
        return LogitLens.from_model(model), tokenizer
    if not source or not Path(source).is_dir():
        raise FileNotFoundError(
            f"the store names model {source!r}, which is not a checkpoint directory here; "
            "pass the checkpoint the store was recorded with (--model DIR)"
        )
    from mechbiqa.model.tokenizer import load_tokenizer

    return LogitLens.from_checkpoint(source), load_tokenizer(source)


# ----------------------------------------------------------------------------- samples
def load_samples(dataset: str = "builtin", split: str | None = None, limit: int | None = None) -> list[Any]:
    """The records a data set spec names (IQARecords, or `SampleSource`s for a folder of images).

    Args:
        dataset: ``builtin`` (`DEFAULT_BENCHMARK`, built if missing), a folder of images, a ``.jsonl``
            of IQARecords, or ``NAME=ROOT`` for a real data set `mechbiqa.data.load_dataset` knows
            (``koniq10k=/data/koniq``).
        split: Keep only records of this split (``train``/``val``/``test``).
        limit: Keep only the first N samples.

    Raises:
        FileNotFoundError: The spec is none of the above, or the folder holds no images.
        ValueError: No sample is left (after ``split``).
    """
    if dataset == "builtin":
        from mechbiqa.data import BenchmarkConfig, build_benchmark, load_benchmark

        if (DEFAULT_BENCHMARK / "manifest.jsonl").is_file():
            records = list(load_benchmark(DEFAULT_BENCHMARK))
        else:
            records = list(build_benchmark(BenchmarkConfig(), DEFAULT_BENCHMARK, workers=None))
    elif "=" in dataset and not Path(dataset).exists():
        from mechbiqa.data import load_dataset

        name, root = dataset.split("=", 1)
        records = load_dataset(name, root)
    elif dataset.endswith(".jsonl"):
        from mechbiqa.data.records import records_from_jsonl

        path = Path(dataset)
        records = records_from_jsonl(path, root=path.parent)
    else:
        from mechbiqa_hooks.record import SampleSource

        folder = Path(dataset)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--dataset {dataset!r} is not 'builtin', a folder of images, a .jsonl file or NAME=ROOT"
            )
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        records = [SampleSource(id=str(p.relative_to(folder)), image_path=p) for p in files]
    if split is not None:
        records = [r for r in records if getattr(r, "split", None) == split]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"no samples in {dataset!r}" + (f" with split {split!r}" if split else ""))
    return records


def load_test_split(dataset: str = "builtin", benchmark: str | Path | None = None) -> list[Any]:
    """The test images of a data set spec: its ``test`` split, or all of it when it has no splits.

    Args:
        dataset: As `load_samples`; ``builtin`` is the benchmark in ``benchmark``.
        benchmark: The built-in benchmark's folder (must be built); None: `DEFAULT_BENCHMARK`.
    """
    if dataset == "builtin":
        from mechbiqa.data import load_benchmark

        return [r for r in load_benchmark(Path(benchmark or DEFAULT_BENCHMARK)).records if r.split == "test"]
    records = load_samples(dataset)
    test = [r for r in records if getattr(r, "split", None) == "test"]
    return test or records


def spread_indices(count: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(count)``, first and last included; all when ``n`` is larger."""
    if n >= count:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, n).round()]  # steps of at least 1: distinct


def spread(records: Sequence[Any], n: int) -> list[Any]:
    """``n`` records spread evenly over the list (a test split is ordered by photo); all when ``n`` is larger."""
    return [records[i] for i in spread_indices(len(records), n)]


def random_compact(seed: int = 0, wide: bool = False) -> tuple[MPLUGOwl2, Tokenizer, ImageProcessor]:
    """An untrained compact model with a tokenizer that knows the scorer prompt and the level words.

    Args:
        seed: Seeds the weights (`seeded_model`: the caller's random state is kept).
        wide: d_model 512 and 8 LLM layers instead of the compact 192 and 4 (closer to a 7B's
            compute per stored byte).
    """
    words = [QALIGN_SCORER_PROMPT.replace("<|image|>", ""), *LEVEL_WORDS]
    tokenizer = train_compact_tokenizer(words, vocab_size=300)
    cfg = ModelConfig.compact(vocab_size=tokenizer.vocab_size)
    if wide:
        cfg = replace(cfg, llm=replace(cfg.llm, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1376))
    return seeded_model(cfg, seed), tokenizer, ImageProcessor(image_size=cfg.vision.image_size)


def load_store_rater(
    model: str | None, *, tiny_random: bool, seed: int, dtype: str, device: str, max_new_tokens: int
) -> tuple[Any, str | None]:
    """The rater a ``rated`` store is recorded with, and the store's model name (None: its checkpoint's).

    ``tiny_random``: the tiny random one-stage rater, named as `tiny_random_model(seed)` (its weights);
    else the checkpoint ``model`` (default: `DEFAULT_CHECKPOINT`), a one-stage directory or a pair.
    """
    if tiny_random:
        return tiny_raters(seed, max_new_tokens)["one-stage"], tiny_random_name(seed)
    where = (str(model or DEFAULT_CHECKPOINT),)
    raters = load_raters(where, dtype=dtype, device=device, max_new_tokens=max_new_tokens)
    ((rater, _),) = raters.values()
    return rater, None
