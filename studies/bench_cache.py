"""Benchmark of activation caching: recording to HDF5 against a plain forward, TransformerLens and nnsight.

Question: what does streaming activations to disk cost, and does memory stay flat?
Method, on one model and the same inputs (Q-Align's scorer prompt, the same
pre-processed images, batches of ``--batch-size``):

* time, side by side in one process: (a) plain forward; (b) recording the
  default cache spec to an HDF5 store (`mechbiqa_hooks.record.record_dataset`,
  store creation and commit included); (c) TransformerLens ``run_with_cache``
  of the same hooks, caches kept in RAM; (d) an nnsight trace that ``.save()``s
  the same sites (the same selected positions as the store). ``--rounds``
  rounds, methods in rotated order each round; per round, each method's time
  over ``--n-batches`` batches divided by the plain forward's of the same round.
  Reported: median ratio, min-max over rounds, median seconds per batch.
* memory: each method in a fresh process over 1x, 4x and 16x
  ``--memory-batches`` batches; peak RSS (VmHWM, reset after a warm-up batch)
  minus RSS before the run.
* offline read: a store shaped like a 7B default-spec run (image residuals,
  65 positions x 4096 in fp16 per layer) written with `StoreWriter`, synced and
  dropped from the page cache (``posix_fadvise(DONTNEED)``); then one layer for
  all samples is read cold (MB/s, every layer a fresh cold read) and one sample
  of all layers (ms), and the same two reads from an HDF5 file chunked
  (1, 1, pos, d) for comparison.

Output: rich tables and ``bench_cache.json`` in ``--out``. Goals (issue 4):
recording <= 1.10x plain forward; peak memory flat in the number of samples;
cold read of one layer >= 300 MB/s.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mechbiqa import cli, outputs
from mechbiqa.benchmarking import CachingBench as Bench
from mechbiqa.benchmarking import bench_memory, bench_read, bench_time, memory_child
from mechbiqa.reports_studies import bench_cache_report

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """What to benchmark.

    Attributes:
        model: A checkpoint directory; None: a random model of ``size``.
        dtype: Dtype of the model (a checkpoint's weights are cast as they are read).
        size: ``compact`` (the embedded default's shapes: 65 image tokens, d 128, 8 layers)
            or ``wide`` (d 512, 8 layers: closer to a 7B's compute per stored byte).
        batch_size: Images per batch.
        n_batches: Batches per method per timing round.
        rounds: Timing rounds (plus one warm-up).
        memory_batches: Batches at scale 1x of the memory test.
        scales: Multiples of ``memory_batches``.
        read_samples: Samples in the read test's store.
        read_layers: Layers in the read test's store.
        read_pos: Positions per sample per layer (65: the image tokens).
        read_d: Width (4096: LLaMA-2 7B).
        out_dir: Where the JSON and the temporary stores go (``--out``).
        parts: Which of ``time``, ``memory``, ``read`` to run.
        threads: torch threads (None: torch's default). One by default: on a shared
            machine CPU time is then the work done, and no thread waits on another.
    """

    model: str | None = None
    dtype: str = "float32"
    size: Literal["compact", "wide"] = "compact"
    batch_size: int = 8
    n_batches: int = 24
    rounds: int = 5
    memory_batches: int = 2
    scales: tuple[int, ...] = (1, 4, 16)
    read_samples: int = 384
    read_layers: int = 4
    read_pos: int = 65
    read_d: int = 4096
    out_dir: str = field(
        default=str(REPO / "cache" / "bench"), metadata=cli.meta(flag="--out", aliases=("--out-dir",))
    )
    parts: tuple[Literal["time", "memory", "read"], ...] = ("time", "memory", "read")
    threads: int | None = 1

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        counts = ("n_batches", "rounds", "memory_batches", "read_samples", "read_layers", "read_pos")
        counts += ("read_d",)
        low = [f"--{n.replace('_', '-')} {getattr(self, n)}" for n in counts if getattr(self, n) < 1]
        if low or not self.scales or min(self.scales) < 1:
            raise ValueError(f"{', '.join(low) or '--scales'}: pass positive counts and scales")


def main(cfg: Config) -> dict[str, Any]:
    """Run the chosen parts; write ``bench_cache.json``; return the numbers."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = {
        "config": outputs.jsonable(cfg),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        if "time" in cfg.parts or "memory" in cfg.parts:
            bench = Bench(cfg)
            model_cfg = bench.model.cfg
            result["model"] = {
                "source": cfg.model or f"random {cfg.size}",
                "llm_layers": model_cfg.llm.n_layers,
                "d_model": model_cfg.llm.d_model,
                "image_tokens": model_cfg.n_image_tokens,
                "positions": int(bench.prompt_ids.shape[1]) - 1 + model_cfg.n_image_tokens,
                "spec": str(bench.spec),
            }
        if "time" in cfg.parts:
            result["time"] = bench_time(bench, cfg.rounds, cfg.n_batches, tmp)
        if "memory" in cfg.parts:

            def command(method: str, n_batches: int, store: Path) -> list[str]:  # a fresh process each
                argv = ["--memory-child", method, str(n_batches), str(store), *cli.to_argv(cfg)]
                return [sys.executable, __file__, *argv]

            env = {**os.environ, "PYTHONPATH": str(REPO)}
            result["memory"] = bench_memory(command, cfg.scales, cfg.memory_batches, cfg.batch_size, tmp, env)
        if "read" in cfg.parts:
            result["read"] = bench_read(cfg.read_samples, cfg.read_layers, cfg.read_pos, cfg.read_d, tmp)
    outputs.write_json(out_dir / "bench_cache.json", result, indent=2)
    return result


def report(result: dict[str, Any], console: Any = None) -> None:
    """Rich tables of the numbers (the only printing)."""
    from rich.console import Console

    console = console or Console(width=150)
    for part in bench_cache_report(result):
        console.print(part)


def render(result: dict[str, Any], console: Any) -> None:
    """The tables of `report`."""
    report(result, console)


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":  # bench_memory's fresh process
        method, n_batches, path = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        child = memory_child(Bench(parse_args(sys.argv[5:])), method, n_batches, path)
        print(outputs.dumps(child, indent=None))
    else:
        cli.run(main, Config, render)
