"""What the ``studies/bench_*.py`` scripts measure with: fair timing on a shared machine, caching costs.

`interleaved_best` times two methods alternately (`studies/bench_patching.py`). `CachingBench` holds
one model, its inputs and the four ways `studies/bench_cache.py` runs the same batches (a plain forward,
recording to a store, TransformerLens' cache, an nnsight trace); `bench_time`, `bench_memory` and
`bench_read` are that study's three measurements, and `memory_child` the body of its fresh processes.
`run_measured` runs a script in its own process and reads its time and peak memory
(`studies/smoke_7b.py`, with `shared_weights_pair`).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mechbiqa.model.roles import Role, assign_roles
from mechbiqa.sources import random_compact
from mechbiqa.store import (
    ActivationStore,
    ArraySpec,
    BatchRows,
    CacheSpec,
    SampleInfo,
    StoreLayout,
    StoreWriter,
)
from mechbiqa_hooks import names
from mechbiqa_hooks.nnsight_view import nnsight_view
from mechbiqa_hooks.record import PromptConfig, RunConfig, SampleSource, record_dataset


def interleaved_best(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int
) -> tuple[float, Any, float, Any]:
    """Best wall time of each of two functions, run alternately (a shared machine's load hits both alike).

    Returns:
        ``(seconds_a, last_output_a, seconds_b, last_output_b)``.
    """
    best_a = best_b = float("inf")
    out_a = out_b = None
    for _ in range(repeats):
        start = time.perf_counter()
        out_a = a()
        best_a = min(best_a, time.perf_counter() - start)
        start = time.perf_counter()
        out_b = b()
        best_b = min(best_b, time.perf_counter() - start)
    return best_a, out_a, best_b, out_b


# ----------------------------------------------------------------------------- caching costs
CACHE_METHODS = ("plain", "record", "transformer_lens", "nnsight")
"""The four ways `studies/bench_cache.py` runs the same batches."""


class CachingBench:
    """The model, the inputs and the four methods of `studies/bench_cache.py`.

    Args:
        cfg: The study's Config (reads ``model``, ``dtype``, ``size``, ``batch_size``, ``threads``).
    """

    def __init__(self, cfg: Any) -> None:  # noqa: D107
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.model:
            from mechbiqa.model.load import load_components

            parts = load_components(cfg.model, dtype=getattr(torch, cfg.dtype))
            self.model, self.tokenizer, self.processor = parts.model, parts.tokenizer, parts.processor
        else:
            self.model, self.tokenizer, self.processor = random_compact(0, wide=cfg.size == "wide")
            self.model = self.model.to(getattr(torch, cfg.dtype))
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
            {names.resid_post(i) for i in self.layers}
            | {names.pattern(i) for i in self.layers}
            | {names.LOGITS}
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


def bench_time(bench: CachingBench, rounds: int, n_batches: int, tmp: Path) -> dict[str, Any]:
    """Paired rounds of the four methods: wall and CPU time, ratios to the plain forward of the same round."""
    wall: dict[str, list[float]] = {m: [] for m in CACHE_METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in CACHE_METHODS}
    for round_ in range(rounds + 1):
        order = CACHE_METHODS[round_ % len(CACHE_METHODS) :] + CACHE_METHODS[: round_ % len(CACHE_METHODS)]
        for method in order:
            gc.collect()
            seconds, cpu_seconds, held = bench.run(method, n_batches, tmp / "time.h5")
            del held
            if round_ > 0:  # round 0 warms up
                wall[method].append(seconds / n_batches)
                cpu[method].append(cpu_seconds / n_batches)
    out: dict[str, Any] = {}
    for method in CACHE_METHODS:
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


def _agreement(bench: CachingBench, store: ActivationStore) -> dict[str, float]:
    """Max |difference| between the store, TransformerLens and nnsight on batch 0 (fp16 store)."""
    [cache] = bench.run("transformer_lens", 1, Path())[2]
    [saved] = bench.run("nnsight", 1, Path())[2]
    n, last = bench.cfg.batch_size, bench.layers[-1]
    stored = store.get(names.resid_post(last), samples=slice(0, n))[:, 0]
    tl = cache[names.resid_post(last)][:, bench.quality].numpy()
    ns = saved[3 * last + 1].numpy()
    stored_row = store.get(names.pattern(last), samples=slice(0, n))[:, :, 0]
    ns_row = saved[3 * last].numpy()
    k = ns_row.shape[-1]
    return {
        "store_vs_transformer_lens_resid": float(np.abs(stored - tl).max()),
        "store_vs_nnsight_resid": float(np.abs(stored - ns).max()),
        "store_vs_nnsight_attention_row": float(np.abs(stored_row[..., :k] - ns_row).max()),
        "resid_scale": float(np.abs(tl).max()),
    }


def _read_status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(bench: CachingBench, method: str, n_batches: int, path: Path) -> dict[str, float]:
    """In a fresh process: warm up, reset the peak, run, report peak RSS above the start (Linux)."""
    _, _, held = bench.run(method, 1, path)
    del held
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    before = _read_status("VmRSS")
    seconds, _, held = bench.run(method, n_batches, path)
    peak = _read_status("VmHWM")
    del held
    return {"before_mb": before, "peak_mb": peak, "growth_mb": peak - before, "seconds": seconds}


def bench_memory(
    command: Callable[[str, int, Path], list[str]],
    scales: Sequence[int],
    memory_batches: int,
    batch_size: int,
    tmp: Path,
    env: Mapping[str, str],
) -> dict[str, Any]:
    """Each (method, scale) in its own process: ``command(method, n_batches, store)`` runs `memory_child`."""
    out: dict[str, Any] = {}
    for method in CACHE_METHODS:
        out[method] = {}
        for scale in scales:
            n_batches = scale * memory_batches
            argv = command(method, n_batches, tmp / f"mem-{method}.h5")
            done = subprocess.run(argv, capture_output=True, text=True, env=dict(env))
            if done.returncode != 0:
                raise RuntimeError(f"memory run {method} x{scale} failed:\n{done.stderr[-2000:]}")
            out[method][f"{scale}x"] = json.loads(done.stdout.strip().splitlines()[-1]) | {
                "samples": n_batches * batch_size
            }
    return out


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bench_read(n: int, layers: int, pos: int, d: int, tmp: Path) -> dict[str, Any]:
    """Cold reads of an fp16 store of ``n`` samples x ``layers`` x ``pos`` x ``d``, and of the data chunked.

    The comparison file is chunked (1, 1, pos, d). Read: one layer of all samples (MB/s, each a cold
    read: written, synced and dropped from the page cache first), one sample of all layers (ms).
    """
    hook = names.resid_post(names.EACH)
    key = f"{hook}@image"
    array = ArraySpec(key, hook, "image", tuple(range(layers)), (pos, d), ("pos", "d_model"))
    layout = StoreLayout(n, pos + 30, (("image", pos), ("quality", 1)), (array,), dtype="float16")
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
            data = store.get(hook, "image", layers=layer, samples="all")  # [sample, pos, d]
            cold.append(layer_mb / (time.perf_counter() - began))
            began = time.perf_counter()
            store.get(hook, "image", layers=layer, samples="all")
            warm.append(layer_mb / (time.perf_counter() - began))
            assert data.shape == (n, pos, d)
        for i in np.random.default_rng(1).choice(n, 5, replace=False):
            _drop_cache(path)
            began = time.perf_counter()
            store.get(hook, "image", samples=int(i))  # [layer, pos, d]
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


# ----------------------------------------------------------------------------- a script's cost
# Runs a script as __main__ and, at exit, writes its own peak GPU memory (the RSS peak comes from wait4).
_WRAPPER = """
import atexit, json, os, runpy, sys
def _peak():
    out = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = range(torch.cuda.device_count())
        out["gpu_peak_bytes"] = max(torch.cuda.max_memory_allocated(d) for d in devices)
    with open(os.environ["MECHBIQA_PEAK_FILE"], "w") as f:
        json.dump(out, f)
atexit.register(_peak)
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


@dataclass
class Step:
    """One script's outcome (`run_measured`).

    Attributes:
        name: The step's name.
        status: ``ok``, ``exit N`` or ``timeout``.
        seconds: Wall time.
        rss_gb: Peak resident set of the process (``wait4``).
        gpu_gb: Peak GPU memory torch allocated (None: no CUDA used).
        tail: The last lines of its log when it failed.
    """

    name: str
    status: str
    seconds: float
    rss_gb: float
    gpu_gb: float | None
    tail: str = ""


def run_measured(name: str, script: Path, args: Sequence[str], log_dir: Path, timeout: float) -> Step:
    """Run ``script args`` as its own process; its wall time, peak RSS (``wait4``) and peak GPU memory.

    The log goes to ``log_dir/<name>.log``; a run past ``timeout`` seconds is killed.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    peak_file, log_file = log_dir / f"{name}.peak.json", log_dir / f"{name}.log"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "MECHBIQA_PEAK_FILE": str(peak_file)}
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(script), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        status, usage = "timeout", None
        while time.perf_counter() - start < timeout:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(code)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
                break
            time.sleep(0.2)
        else:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
    seconds = time.perf_counter() - start
    rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux reports kilobytes
    gpu = json.loads(peak_file.read_text()).get("gpu_peak_bytes") if peak_file.is_file() else None
    tail = "\n".join(log_file.read_text(errors="replace").strip().splitlines()[-6:]) if status != "ok" else ""
    return Step(name, status, seconds, rss_gb, None if gpu is None else gpu / 1e9, tail)


def shared_weights_pair(checkpoint: Path, pair: Path) -> Path:
    """A two-stage pair folder in `studies/train_pair.py`'s layout whose stages link to one checkpoint.

    Its weight and tokenizer files are linked into both stages, which so share the weights (and the
    page cache: one copy in memory): a pipeline check, not a trained pair. Each stage gets its own
    ``mechbiqa.json`` (mode, stage, template). Existing links are kept.
    """
    from mechbiqa.pipeline import INFO_FILE

    (pair / INFO_FILE).unlink(missing_ok=True)  # a pair is its two stages; an older smoke wrote one here
    for number, stage in enumerate(("stage1", "stage2"), start=1):
        (pair / stage).mkdir(parents=True, exist_ok=True)
        for f in checkpoint.iterdir():
            link = pair / stage / f.name
            if f.name != INFO_FILE and not link.exists():
                link.symlink_to(f)
        info = {"mode": "two-stage", "stage": number, "template": "mplug_owl2"}
        (pair / stage / INFO_FILE).unlink(missing_ok=True)  # a link to the checkpoint's own, if any
        (pair / stage / INFO_FILE).write_text(json.dumps(info) + "\n")
    return pair
