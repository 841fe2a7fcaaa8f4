"""Cache a model's activations for a data set into an HDF5 store, once, to analyse offline many times.

Question: what does the model compute at the quality position, the image tokens
and the quality token's attention row, for every image of a data set?
Method: run the model batch by batch (Q-Align's scorer prompt, or generate the
answer and re-run it, or let a checkpoint rate each image and re-run its own
scoring prompt) with recording hooks (`mechbiqa_hooks.record`) that
stream the cache spec's activations into ``cache/<name>.h5``
(`mechbiqa.store`), memory flat in the number of images. Rerun the same
command after an interruption (even ``kill -9``) and it resumes where it
stopped; the result equals an uninterrupted run bit for bit.
Output: the store (read it with ``mechbiqa.store.ActivationStore.open``), and
``<store>.config.json`` beside it.

Examples::

    python studies/cache_activations.py --tiny-random --dataset path/to/images --out cache/tiny.h5
    python studies/cache_activations.py --model ckpt/ --dataset builtin --split test --spec quality
    python studies/cache_activations.py --model ckpt/ --mode generate --max-new-tokens 64 --sample --seed 1
    python studies/cache_activations.py --model cache/compact/two-stage --mode rated --out cache/pair.h5
    torchrun --nproc_per_node=2 studies/cache_activations.py --model ckpt/ --out cache/acts.h5

Under torchrun each rank records a contiguous part of the data set into
``<out>.shards/rank<r>-of-<n>.h5`` and rank 0 joins them into ``<out>``, a file
of HDF5 virtual datasets (move the folder as a whole).

Mode ``rated`` (one store per checkpoint, what ``studies/replicate.py``
writes): ``--model`` is a one-stage checkpoint or a two-stage pair's folder
(``stage1/``, ``stage2/``); each image is rated as `mechbiqa.pipeline` rates
it and the prompt the quality word was read after is recorded, each sample
with its own prompt and roles (`mechbiqa.analysis.capture.record_rater`): the
one-stage model's image + own description + "The quality of the image is",
or the stage-2 model's text-only prompt (no image tokens; the store is the
stage-2 model's, and names its directory for the lens). With
``--tiny-random`` the tiny random one-stage rater is used.

Spec: a preset (``default``: residuals at the quality and image positions,
the quality attention row, the quality logits; ``quality``: the same without
image residuals, for 7B runs; ``full-attention``) and/or sites
``HOOK@SELECT[:LAYERS]`` separated by ``;``, e.g.
``"default; llm.blocks.{l}.hook_attn_out@quality:0-3"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mechbiqa import cli, outputs, sources
from mechbiqa.analysis.caching import CacheRun, cache_sharded, model_planner, rater_planner
from mechbiqa.reports_studies import cache_activations_report
from mechbiqa.store import CacheSpec
from mechbiqa.store.record import PromptConfig, RunConfig  # noqa: F401  (PromptConfig: the prompt recorded)
from mechbiqa.store.shards import RankGroup

REPO = Path(__file__).resolve().parents[1]
Result = CacheRun
"""What the run wrote (`mechbiqa.analysis.caching.CacheRun`)."""


@dataclass(frozen=True)
class Config:
    """A caching run.

    Attributes:
        model: Checkpoint directory (config.json, weights, tokenizer); None: the compact
            default checkpoint in ``cache/compact/one-stage`` (or --tiny-random).
        tiny_random: Use a random tiny model with a toy tokenizer (pipeline checks, tests).
        dataset: ``builtin`` (the built-in benchmark in ``cache/benchmark``, built if missing),
            a folder of images, a ``.jsonl`` of IQARecords, or ``NAME=ROOT`` for a real
            data set that `mechbiqa.data.load_dataset` knows (``koniq10k=/data/koniq``).
        split: Keep only records of this split (``train``/``val``/``test``).
        limit: Keep only the first N samples.
        spec: Cache spec (preset names and/or sites).
        out: The store file.
        batch_size: Samples per batch.
        store_dtype: Stored activation dtype (``float16`` or ``float32``).
        dtype: Model dtype (``float32``, ``bfloat16``, ``float16``; weights cast as they are read).
        device: ``cpu``, ``cuda``, ``cuda:1`` ... (under torchrun, cuda means the rank's GPU).
        mode: ``score`` (prompted forward), ``generate`` (answer, then recorded re-run) or ``rated``
            (the checkpoint rates each image; its own scoring prompt is recorded).
        max_new_tokens: Longest generated answer.
        do_sample: Sample the answer instead of greedy decoding.
        temperature: Sampling temperature.
        seed: Seed of the sampler and of --tiny-random.
        overwrite: Start again, deleting an existing store.
        fsync: Flush every batch to disk before committing it.
        progress: Show a progress bar.
    """

    model: str | None = None
    tiny_random: bool = False
    dataset: str = "builtin"
    split: str | None = None
    limit: int | None = None
    spec: str = "default"
    out: str = str(REPO / "cache" / "activations.h5")
    batch_size: int = 8
    store_dtype: Literal["float16", "float32"] = "float16"
    dtype: str = "float32"
    device: str = "cpu"
    mode: Literal["score", "generate", "rated"] = "score"
    max_new_tokens: int = 48
    do_sample: bool = field(default=False, metadata=cli.meta(aliases=("--sample",)))
    temperature: float = 1.0
    seed: int = 0
    overwrite: bool = False
    fsync: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: pass at least 1")
        if self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: pass a positive temperature")
        CacheSpec.parse(self.spec, dtype=self.store_dtype)  # a bad spec is refused before any model loads

    @classmethod
    def tiny(cls, tmp: str | Path, **overrides: Any) -> Config:
        """A seconds-long run: the tiny random model over a folder of images under ``tmp``."""
        base = dict(
            tiny_random=True,
            dataset=str(Path(tmp) / "images"),
            out=str(Path(tmp) / "tiny.h5"),
            batch_size=4,
            progress=False,
        )
        return cls(**{**base, **overrides})


def main(cfg: Config, progress: Any = None) -> Result:
    """Record the data set; resume an interrupted store; retry rows that failed; shard under torchrun.

    Args:
        cfg: The run.
        progress: ``callable(done, total)`` called after each batch (the command line
            passes a rich progress bar).

    Raises:
        FileNotFoundError: No model or data set where the config says.
        ValueError: A spec that cannot be parsed or names an unknown hook.
        mechbiqa.store.StoreError: The store at ``--out`` cannot take this run (locked, recorded
            with another setup: the message names the difference and the fix).
    """
    group = RankGroup.from_env()
    device = group.device(cfg.device)
    spec = CacheSpec.parse(cfg.spec, dtype=cfg.store_dtype)
    samples = sources.load_samples(cfg.dataset, cfg.split, cfg.limit)
    load = dict(seed=cfg.seed, dtype=cfg.dtype, device=device)
    if cfg.mode == "rated":
        rater, name = sources.load_store_rater(cfg.model, tiny_random=cfg.tiny_random,
                                               max_new_tokens=cfg.max_new_tokens, **load)  # fmt: skip
        planner = rater_planner(rater, spec, cfg.batch_size, name)
    else:
        model, tokenizer, processor, name = sources.load_model(cfg.model, tiny_random=cfg.tiny_random, **load)
        run = RunConfig(mode=cfg.mode, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                        do_sample=cfg.do_sample, temperature=cfg.temperature, seed=cfg.seed)  # fmt: skip
        planner = model_planner(model, tokenizer, processor, spec, run, name)

    def write_config() -> None:  # only once the store accepted the run: it always describes the store
        outputs.write_config(Path(str(cfg.out) + ".config.json"), cfg)  # written whole or not at all

    return cache_sharded(
        Path(cfg.out), samples, planner, group=group, overwrite=cfg.overwrite, fsync=cfg.fsync,
        progress=progress, on_open=write_config, align=cfg.batch_size,
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


def main_with_progress(cfg: Config) -> Result:
    """`main` under a rich progress bar on stderr (rank 0 only; ``--no-progress``: none)."""
    from mechbiqa.progress import rate_bar

    with rate_bar("caching", show=cfg.progress and int(os.environ.get("RANK", "0")) == 0) as update:
        return main(cfg, progress=update)


def render(result: Result, console: Any) -> None:
    """What was recorded, and the failed samples (rank 0 only)."""
    for line in cache_activations_report(result):
        console.print(line)


if __name__ == "__main__":
    try:
        cli.run(main_with_progress, Config, render)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
