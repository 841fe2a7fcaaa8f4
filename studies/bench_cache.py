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

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
from mechbiqa_hooks.nnsight_view import nnsight_view
from mechbiqa_hooks.record import PromptConfig, RunConfig, SampleSource, record_dataset

from mechbiqa import cli, outputs
from mechbiqa.model import ModelConfig
from mechbiqa.model.processor import ImageProcessor
from mechbiqa.model.prompts import LEVEL_WORDS, QALIGN_SCORER_PROMPT
from mechbiqa.model.roles import Role, assign_roles
from mechbiqa.model.tokenizer import train_compact_tokenizer
from mechbiqa.sources import seeded_model
from mechbiqa.store import (
    ActivationStore,
    ArraySpec,
    BatchRows,
    CacheSpec,
    SampleInfo,
    StoreLayout,
    StoreWriter,
)

REPO = Path(__file__).resolve().parents[1]
METHODS = ("plain", "record", "transformer_lens", "nnsight")


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


# ----------------------------------------------------------------------------- setup
class Bench:
    """The model, the inputs and the four methods."""

    def __init__(self, cfg: Config) -> None:  # noqa: D107
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.model:
            from mechbiqa.model.load import load_components

            parts = load_components(cfg.model, dtype=getattr(torch, cfg.dtype))
            self.model, self.tokenizer, self.processor = parts.model, parts.tokenizer, parts.processor
        else:
            self.tokenizer = train_compact_tokenizer(
                [QALIGN_SCORER_PROMPT.replace("<|image|>", ""), *LEVEL_WORDS], vocab_size=300
            )
            model_cfg = ModelConfig.compact(vocab_size=self.tokenizer.vocab_size)
            if cfg.size == "wide":
                model_cfg = replace(
                    model_cfg,
                    llm=replace(model_cfg.llm, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1376),
                )
            self.model = seeded_model(model_cfg, 0).to(getattr(torch, cfg.dtype))
            self.processor = ImageProcessor(image_size=model_cfg.vision.image_size)
        self.spec = CacheSpec.default()
        encoded = PromptConfig().encode(self.tokenizer, "score")
        self.prompt_ids = torch.tensor([encoded.ids])
        roles = assign_roles(
            encoded.ids,
            response_start=encoded.response_start,
            quality_index=encoded.quality_index,
            n_image_tokens=self.model.cfg.n_image_tokens,
        )
        self.quality = int(roles.positions(Role.QUALITY)[0])
        self.image_pos = torch.from_numpy(roles.positions(Role.IMAGE))
        self.layers = range(self.model.cfg.llm.n_layers)
        self.hooks = (
            {f"llm.blocks.{i}.hook_resid_post" for i in self.layers}
            | {f"llm.blocks.{i}.attn.hook_pattern" for i in self.layers}
            | {"llm.unembed.hook_out"}
        )
        size = self.model.cfg.vision.image_size
        g = torch.Generator().manual_seed(0)
        self.bank = torch.randn(16, 3, size, size, generator=g)  # reused images: inputs cost nothing to make
        self._view: Any = None

    def pixels(self, index: int) -> torch.Tensor:
        """The image of sample ``index``."""
        return self.bank[index % len(self.bank)]

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and pixels of batch ``b``."""
        n = self.cfg.batch_size
        pixels = torch.stack([self.pixels(b * n + i) for i in range(n)])
        return self.prompt_ids.expand(n, -1), pixels

    # ------------------------------------------------------------ methods
    def run(self, method: str, n_batches: int, store_path: Path) -> tuple[float, float, Any]:
        """Run one method over ``n_batches``; return (wall s, CPU s of this process, what it keeps)."""
        began, cpu = time.perf_counter(), time.process_time()
        held = getattr(self, f"_{method}")(n_batches, store_path)
        return time.perf_counter() - began, time.process_time() - cpu, held

    def _plain(self, n_batches: int, _: Path) -> None:
        with torch.inference_mode():
            for b in range(n_batches):
                ids, pixels = self.batch(b)
                self.model(ids, images=pixels)

    def _record(self, n_batches: int, path: Path) -> Path:
        n = n_batches * self.cfg.batch_size
        samples = [SampleSource(id=str(i), image_path=f"memory://{i}") for i in range(n)]
        result = record_dataset(
            self.model,
            self.tokenizer,
            self.processor,
            samples,
            self.spec,
            path,
            run=RunConfig(batch_size=self.cfg.batch_size),
            overwrite=True,
            load_image=lambda s: self.pixels(int(s.id)),
        )
        return result.path

    def _transformer_lens(self, n_batches: int, _: Path) -> list:
        caches = []
        with torch.inference_mode():
            for b in range(n_batches):
                ids, pixels = self.batch(b)
                _, cache = self.model.run_with_cache(
                    ids, images=pixels, names_filter=lambda name: name in self.hooks
                )
                caches.append(cache)
        return caches

    def _nnsight(self, n_batches: int, _: Path) -> list:
        if self._view is None:
            # nnsight wraps the modules it sees in place: give it its own copy, so the
            # other methods keep running the plain model.
            self._view = nnsight_view(copy.deepcopy(self.model))
        view = self._view
        q, image = self.quality, self.image_pos
        saved = []
        with torch.inference_mode():
            for b in range(n_batches):
                ids, pixels = self.batch(b)
                rows = []
                with view.trace(ids, images=pixels):
                    for layer in self.layers:
                        block = view.llm.blocks[layer]
                        # clone(): a saved slice is a view that would keep the whole tensor alive
                        rows.append(
                            block.attn.hook_pattern.output[:, :, q].clone().save()
                        )  # [batch, head, key]
                        resid = block.hook_resid_post.output
                        rows.append(resid[:, q].clone().save())  # [batch, d_model]
                        rows.append(resid[:, image].save())  # [batch, image_pos, d_model] (a copy already)
                    rows.append(view.llm.unembed.hook_out.output[:, q].clone().save())  # [batch, vocab]
                saved.append(rows)
        return saved


# ----------------------------------------------------------------------------- time
def bench_time(bench: Bench, cfg: Config, tmp: Path) -> dict[str, Any]:
    """Paired rounds of the four methods: wall and CPU time, ratios to the plain forward of the same round."""
    wall: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_ in range(cfg.rounds + 1):
        order = METHODS[round_ % len(METHODS) :] + METHODS[: round_ % len(METHODS)]
        for method in order:
            gc.collect()
            seconds, cpu_seconds, held = bench.run(method, cfg.n_batches, tmp / "time.h5")
            del held
            if round_ > 0:  # round 0 warms up
                wall[method].append(seconds / cfg.n_batches)
                cpu[method].append(cpu_seconds / cfg.n_batches)
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ratios = [t / p for t, p in zip(times[method], times["plain"], strict=True)]
            out[method][clock] = {
                "median_s_per_batch": statistics.median(times[method]),
                "min_s_per_batch": min(times[method]),
                "max_s_per_batch": max(times[method]),
                "median_ratio": statistics.median(ratios),
                "min_ratio": min(ratios),
                "max_ratio": max(ratios),
                "ratios": ratios,
            }
    setup = []  # one-time cost of a recording run (identity hashes, store creation, final fsync + rename)
    for _ in range(3):
        _, record_cpu, _ = bench.run("record", 1, tmp / "setup.h5")
        _, plain_cpu, _ = bench.run("plain", 1, tmp / "setup.h5")
        setup.append(record_cpu - plain_cpu)
    out["record_setup_cpu_s"] = statistics.median(setup)
    with ActivationStore.open(tmp / "time.h5") as store:
        n = store.n_samples
        size = (tmp / "time.h5").stat().st_size
        out["store_mb_per_sample"] = size / n / 2**20
        out["agreement"] = _agreement(bench, store)
    return out


def _agreement(bench: Bench, store: ActivationStore) -> dict[str, float]:
    """Max |difference| between the store, TransformerLens and nnsight on batch 0 (fp16 store)."""
    [cache] = bench.run("transformer_lens", 1, Path())[2]
    [saved] = bench.run("nnsight", 1, Path())[2]
    n, last = bench.cfg.batch_size, bench.layers[-1]
    stored = store.get(f"llm.blocks.{last}.hook_resid_post", samples=slice(0, n))[:, 0]
    tl = cache[f"llm.blocks.{last}.hook_resid_post"][:, bench.quality].numpy()
    ns = saved[3 * last + 1].numpy()
    stored_row = store.get(f"llm.blocks.{last}.attn.hook_pattern", samples=slice(0, n))[:, :, 0]
    ns_row = saved[3 * last].numpy()
    k = ns_row.shape[-1]
    return {
        "store_vs_transformer_lens_resid": float(np.abs(stored - tl).max()),
        "store_vs_nnsight_resid": float(np.abs(stored - ns).max()),
        "store_vs_nnsight_attention_row": float(np.abs(stored_row[..., :k] - ns_row).max()),
        "resid_scale": float(np.abs(tl).max()),
    }


# ----------------------------------------------------------------------------- memory
def _read_status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(cfg: Config, method: str, n_batches: int, path: Path) -> dict[str, float]:
    """In a fresh process: warm up, reset the peak, run, report peak RSS above the start."""
    bench = Bench(cfg)
    _, _, held = bench.run(method, 1, path)
    del held
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    before = _read_status("VmRSS")
    seconds, _, held = bench.run(method, n_batches, path)
    peak = _read_status("VmHWM")
    del held
    return {"before_mb": before, "peak_mb": peak, "growth_mb": peak - before, "seconds": seconds}


def bench_memory(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Each (method, scale) in its own process."""
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for scale in cfg.scales:
            n_batches = scale * cfg.memory_batches
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                method,
                str(n_batches),
                str(tmp / f"mem-{method}.h5"),
                *cli.to_argv(cfg),
            ]
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
            )
            if done.returncode != 0:
                raise RuntimeError(f"memory run {method} x{scale} failed:\n{done.stderr[-2000:]}")
            out[method][f"{scale}x"] = json.loads(done.stdout.strip().splitlines()[-1]) | {
                "samples": n_batches * cfg.batch_size
            }
    return out


# ----------------------------------------------------------------------------- read
def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_read(cfg: Config, tmp: Path) -> dict[str, Any]:
    """Cold reads of a 7B-shaped store, and of the same data chunked (1, 1, pos, d)."""
    n, layers, pos, d = cfg.read_samples, cfg.read_layers, cfg.read_pos, cfg.read_d
    key = "llm.blocks.{l}.hook_resid_post@image"
    layout = StoreLayout(
        n,
        pos + 30,
        (("image", pos), ("quality", 1)),
        (
            ArraySpec(
                key,
                "llm.blocks.{l}.hook_resid_post",
                "image",
                tuple(range(layers)),
                (pos, d),
                ("pos", "d_model"),
            ),
        ),
        dtype="float16",
    )
    path, chunked = tmp / "read.h5", tmp / "read-chunked.h5"
    for p in (path, chunked):
        p.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    samples = [SampleInfo(str(i), f"memory://{i}") for i in range(n)]
    writer = StoreWriter.open(path, layout, {}, samples)
    step = 16
    with h5py.File(chunked, "w") as f:
        ds = f.create_dataset("x", shape=(n, layers, pos, d), dtype="<f2", chunks=(1, 1, pos, d))
        for start in range(0, n, step):
            m = min(step, n - start)
            acts = rng.standard_normal((layers, m, pos, d), dtype=np.float32).astype(np.float16)
            rows = {
                name: np.zeros((m, *row), dtype=dtype)
                for name, (dtype, row) in layout.row_datasets().items()
                if name != "samples/status"
            }
            writer.write(BatchRows(start, np.ones(m, np.int8), rows, {key: acts}))
            ds[start : start + m] = acts.transpose(1, 0, 2, 3)
    writer.finish()
    layer_mb = n * pos * d * 2 / 2**20
    out: dict[str, Any] = {"layer_mb": layer_mb, "file_mb": path.stat().st_size / 2**20}
    with ActivationStore.open(path) as store:
        cold, warm, sample_ms = [], [], []
        for layer in range(layers):
            _drop_cache(path)
            began = time.perf_counter()
            data = store.get(key.split("@")[0], "image", layers=layer, samples="all")  # [sample, pos, d]
            cold.append(layer_mb / (time.perf_counter() - began))
            began = time.perf_counter()
            store.get(key.split("@")[0], "image", layers=layer, samples="all")
            warm.append(layer_mb / (time.perf_counter() - began))
            assert data.shape == (n, pos, d)
        for i in np.random.default_rng(1).choice(n, 5, replace=False):
            _drop_cache(path)
            began = time.perf_counter()
            store.get(key.split("@")[0], "image", samples=int(i))  # [layer, pos, d]
            sample_ms.append(1e3 * (time.perf_counter() - began))
    out["contiguous"] = {
        "layer_cold_mb_s": cold,
        "layer_warm_mb_s": warm,
        "sample_all_layers_cold_ms": sample_ms,
    }
    with h5py.File(chunked, "r", rdcc_nbytes=0) as f:
        ds = f["x"]
        cold, sample_ms = [], []
        for layer in range(layers):
            _drop_cache(chunked)
            began = time.perf_counter()
            ds[:, layer]
            cold.append(layer_mb / (time.perf_counter() - began))
        for i in np.random.default_rng(1).choice(n, 5, replace=False):
            _drop_cache(chunked)
            began = time.perf_counter()
            ds[int(i)]
            sample_ms.append(1e3 * (time.perf_counter() - began))
    out["chunked_1_1_pos_d"] = {"layer_cold_mb_s": cold, "sample_all_layers_cold_ms": sample_ms}
    for p in (path, chunked):
        p.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- main
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
            result["time"] = bench_time(bench, cfg, tmp)
        if "memory" in cfg.parts:
            result["memory"] = bench_memory(cfg, tmp)
        if "read" in cfg.parts:
            result["read"] = bench_read(cfg, tmp)
    outputs.write_json(out_dir / "bench_cache.json", result, indent=2)
    return result


def report(result: dict[str, Any], console: Any = None) -> None:
    """Rich tables of the numbers (the only printing)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=150)
    if "model" in result:
        m = result["model"]
        console.print(
            f"model: {m['source']} ({m['llm_layers']} LLM layers, d {m['d_model']}, {m['positions']} "
            f"positions); spec: {m['spec']}; torch threads {result['torch_threads']}, "
            f"load average {', '.join(f'{x:.1f}' for x in result['load_average'])}"
        )
    if "time" in result:
        t = result["time"]
        table = Table(
            title=f"time per batch of {result['config']['batch_size']} (same model, inputs and batches; "
            f"{result['config']['rounds']} rounds of {result['config']['n_batches']} batches, "
            "methods in rotated order)"
        )
        for col in (
            "method",
            "CPU s/batch median (min-max)",
            "CPU ratio to plain: median (min-max)",
            "wall s/batch median",
            "wall ratio: median (min-max)",
        ):
            table.add_column(col, justify="right" if col != "method" else "left")
        for method in METHODS:
            c, w = t[method]["cpu"], t[method]["wall"]
            table.add_row(
                method,
                f"{c['median_s_per_batch']:.4f} ({c['min_s_per_batch']:.4f}-{c['max_s_per_batch']:.4f})",
                f"{c['median_ratio']:.3f}x ({c['min_ratio']:.3f}-{c['max_ratio']:.3f})",
                f"{w['median_s_per_batch']:.4f}",
                f"{w['median_ratio']:.3f}x ({w['min_ratio']:.3f}-{w['max_ratio']:.3f})",
            )
        console.print(table)
        console.print(
            f"recording's one-time setup per run: {t['record_setup_cpu_s'] * 1e3:.0f} ms CPU (included above)"
        )
        console.print(
            f"store: {t['store_mb_per_sample']:.3f} MB per sample; agreement (max |diff|): "
            + ", ".join(f"{k} {v:.2g}" for k, v in t["agreement"].items())
        )
    if "memory" in result:
        mem = result["memory"]
        scales = list(next(iter(mem.values())))
        table = Table(title="peak memory growth during the run (MB, fresh process each)")
        table.add_column("method")
        for s in scales:
            table.add_column(f"{s} ({mem['plain'][s]['samples']} samples)", justify="right")
        for method, row in mem.items():
            table.add_row(method, *[f"{row[s]['growth_mb']:.1f}" for s in scales])
        console.print(table)
    if "read" in result:
        r = result["read"]
        table = Table(title=f"cold reads ({r['layer_mb']:.0f} MB per layer, file {r['file_mb']:.0f} MB)")
        for col in (
            "layout",
            "one layer, all samples: MB/s median (min-max)",
            "one sample, all layers: ms median",
        ):
            table.add_column(col)
        for name in ("contiguous", "chunked_1_1_pos_d"):
            x = r[name]
            c = x["layer_cold_mb_s"]
            table.add_row(
                name,
                f"{statistics.median(c):.0f} ({min(c):.0f}-{max(c):.0f})",
                f"{statistics.median(x['sample_all_layers_cold_ms']):.1f}",
            )
        console.print(table)
        console.print(
            f"warm re-read of one layer: {statistics.median(r['contiguous']['layer_warm_mb_s']):.0f} MB/s"
        )


def render(result: dict[str, Any], console: Any) -> None:
    """The tables of `report`."""
    report(result, console)


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":  # bench_memory's fresh process
        method, n_batches, path = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        print(outputs.dumps(memory_child(parse_args(sys.argv[5:]), method, n_batches, path), indent=None))
    else:
        cli.run(main, Config, render)
