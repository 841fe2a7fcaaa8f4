"""Tables and lines of study results that `mechbiqa.reports` does not draw.

The benchmark, smoke and data-summary studies' tables, the caching run's lines, the probes'
summary sentence. Like `mechbiqa.reports`, each function returns rich renderables (tables, lines
of text) and prints nothing: a study's ``render`` prints them in order.
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


def build_benchmark_report(result: Any) -> list[Any]:
    """`studies/build_benchmark.py`'s summary of a `mechbiqa.data.summary.BuildResult`.

    Splits, cells, label histogram, level-word edges, example descriptions, the independent check
    and the files.
    """
    out: list[Any] = []
    how = "reused" if result.reused else "built"
    out.append(
        f"[bold]Benchmark[/] {result.root} ({how} in {result.seconds:.1f} s; original build "
        f"{result.build_seconds} s), {result.n_images} images, fingerprint {result.fingerprint[:12]}"
    )

    splits = Table(title="Splits (by reference photo)")
    for col in ("split", "photos", "images", *LEVEL_WORDS):
        splits.add_column(col)
    for s, photos in result.photos_per_split.items():
        words = result.word_counts.get(s, {})
        splits.add_row(
            s,
            ", ".join(photos),
            str(result.images_per_split[s]),
            *(str(words.get(w, 0)) for w in LEVEL_WORDS),
        )
    out.append(splits)

    cells = Table(title="Images and mean label (MOS 1-5) per type and level")
    cells.add_column("distortion")
    for level in range(6):
        cells.add_column(f"L{level}", justify="right")
    for name, counts in result.cell_counts.items():
        means = result.cell_mean_mos[name]
        cells.add_row(name, *(f"{n} / {m:.2f}" if n else "" for n, m in zip(counts, means, strict=True)))
    out.append(cells)

    hist = Table(title="Label distribution (MOS bins)")
    hist.add_column("bin")
    for s in ("train", "val", "test"):
        hist.add_column(s, justify="right")
    edges = result.mos_histogram["edges"]
    for i in range(len(edges) - 1):
        hist.add_row(
            f"{edges[i]:.2f}-{edges[i + 1]:.2f}",
            *(str(result.mos_histogram[s][i]) for s in ("train", "val", "test")),
        )
    out.append(hist)
    out.append("Level-word edges: " + ", ".join(f"{e:.2f}" for e in result.word_edges))

    ex = Table(title="Example descriptions (test split)")
    for col in ("id", "word", "MOS", "description"):
        ex.add_column(col)
    for id_, word, mos, text in result.examples:
        ex.add_row(id_, word, f"{mos:.2f}", text)
    out.append(ex)

    c = result.check
    ci = c.get("ci", {}).get("srcc")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    out.append(
        f"[bold]Independent check[/]: {c['measure'].upper()} (labels use {result.label_measure.upper()}) "
        "vs labels on "
        f"{c['split']} (n={c['n']}): SRCC {c['srcc']:.3f}{ci_text}, KRCC {c['krcc']:.3f}, "
        f"PLCC {c['plcc_fitted']:.3f} after {c['fit']['kind'] if c['fit'] else 'no'} fit"
        + (f"; flags {c['flags']}" if c["flags"] else "")
    )
    out.append(f"Contact sheet: {result.contact_sheet}\nSummary: {result.summary_json}")
    return out


def cache_activations_report(result: Any) -> list[str]:
    """`studies/cache_activations.py`'s lines of a `mechbiqa.analysis.caching.CacheRun`: recorded, failed."""
    if result.rank != 0:
        return []
    r = result.record
    how = (
        "already complete"
        if r.n_recorded == 0
        else (
            f"recorded {r.n_recorded} samples in {r.seconds:.1f} s "
            f"({r.n_recorded / max(r.seconds, 1e-9):.1f}/s)"
            + (f", resumed at sample {r.resumed_from}" if r.resumed_from else "")
        )
    )
    out = [
        f"[green]{result.store}[/]: {how}; {result.n_valid} valid"
        + (f" over {result.world_size} ranks" if result.world_size > 1 else "")
    ]
    out += [f"  [yellow]failed[/] {sample_id}: {reason}" for sample_id, reason in result.errors[:20]]
    if len(result.errors) > 20:
        out.append(f"  ... and {len(result.errors) - 20} more (ActivationStore.errors())")
    if result.errors:
        out.append(f"  {len(result.errors)} sample(s) failed: fix or replace them and rerun the same command to "
                   "retry only those")
    return out


def probes_summary_line(result: Any) -> str:
    """`studies/probes.py`'s sentence on a `ProbeAnalysis`: where quality becomes decodable."""
    curve = result.curve
    return (
        f"quality is linearly decodable (90% of the best probe) from layer {curve.decodable_layer()}; "
        f"best probe layer {curve.best_layer}"
        + (
            f"; the lens answer settles at median layer {result.lens_settle:g}"
            if result.lens_settle is not None
            else ""
        )
    )
