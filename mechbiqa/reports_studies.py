"""Tables of the benchmark, smoke and data-summary studies (the numbers come from their `main`).

Like `mechbiqa.reports`, each function returns rich renderables (tables, lines of text) and prints
nothing: a study's ``render`` prints them in order. Kept apart from `mechbiqa.reports`, which holds
the tables of the analyses.
"""

from __future__ import annotations

import statistics
from typing import Any

from rich.table import Table

from mechbiqa.model.prompts import LEVEL_WORDS


def bench_cache_report(result: dict[str, Any]) -> list[Any]:
    """`studies/bench_cache.py`'s numbers: model line, time table, memory table, read table."""
    out: list[Any] = []
    if "model" in result:
        m = result["model"]
        out.append(
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
        from mechbiqa.benchmarking import CACHE_METHODS

        for method in CACHE_METHODS:
            c, w = t[method]["cpu"], t[method]["wall"]
            table.add_row(
                method,
                f"{c['median_s_per_batch']:.4f} ({c['min_s_per_batch']:.4f}-{c['max_s_per_batch']:.4f})",
                f"{c['median_ratio']:.3f}x ({c['min_ratio']:.3f}-{c['max_ratio']:.3f})",
                f"{w['median_s_per_batch']:.4f}",
                f"{w['median_ratio']:.3f}x ({w['min_ratio']:.3f}-{w['max_ratio']:.3f})",
            )
        out.append(table)
        out.append(
            f"recording's one-time setup per run: {t['record_setup_cpu_s'] * 1e3:.0f} ms CPU (included above)"
        )
        out.append(
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
        out.append(table)
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
        out.append(table)
        out.append(
            f"warm re-read of one layer: {statistics.median(r['contiguous']['layer_warm_mb_s']):.0f} MB/s"
        )
    return out
