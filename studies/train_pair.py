r"""Train (or reuse) the one-stage and two-stage checkpoints, and measure both on held-out photos.

Question: does tuning in two stages (stage 1: image -> description of visual
attributes; stage 2: text only, description -> quality) give a quality answer
as good as one-stage tuning (image -> description and quality in one answer),
with the same total budget?

Method: build (or reuse) the built-in benchmark; train a small BPE tokenizer
on its training text; train the compact mPLUG-Owl2 from scratch in each mode
with `mechbiqa.train.train_pair` (label-smoothed NLL on answer tokens, AdamW (0.9, 0.98),
warm-up + cosine); the two-stage pair gets stage budgets 2:1 and the
one-stage baseline the same total number of steps. Then, on the held-out test
photos, rate every image with `mechbiqa.pipeline` (one-stage: generate the
answer, read the level logits after its description; two-stage: stage 1
describes, stage 2 rates the description alone) and report SRCC/PLCC of the
Q-Align score against the label, level accuracy, and how often the generated
descriptions name the right distortion family.

Output (``--out``, default ``cache/compact``): ``one-stage/``,
``two-stage/stage1/``, ``two-stage/stage2/`` (checkpoint directories in the
original layout, each with ``mechbiqa.json``), ``tokenizer/`` and
``results.json`` (the numbers printed). Finished checkpoints trained with the
same settings are reused; an interrupted run resumes.

    python studies/train_pair.py                      # the compact pair, on CPU
    python studies/train_pair.py --model /models/mplug-owl2-llama2-7b --lora-rank 64 \\
        --device cuda --precision bf16 --dtype bfloat16 --batch-size 8 --grad-accum 4 \\
        --lr 2e-4 --total-steps 1500 --warmup-steps 50 --out cache/pair-7b
"""

from __future__ import annotations

import os

# Research-irrelevant but decisive on a shared CPU: OpenMP threads that spin while
# waiting burn the cores other processes need (we measured 10x slower steps on a loaded
# 2-core machine). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from mechbiqa import cli  # noqa: E402
from mechbiqa.train import AnnotationWarning, PairResult, TrainEvent, train_pair  # noqa: E402
from mechbiqa.train import PairConfig as Config  # noqa: E402

__all__ = ["Config", "PairResult", "AnnotationWarning", "main", "render", "parse_args", "main_with_display"]


def main(cfg: Config, progress=None) -> PairResult:
    """Train (or resume, or reuse) both checkpoints, rate the test photos with each, write ``results.json``.

    Under ``accelerate launch`` / ``torchrun`` every process trains its share of each batch; the main
    process alone rates the test photos and writes ``results.json`` (`mechbiqa.train.train_pair`).
    """
    return train_pair(cfg, progress=progress)


# ------------------------------------------------------------------------------------------------ display
class Display:
    """A rich progress display of the training runs (the only printing of this study)."""

    def __init__(self) -> None:  # noqa: D107
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=self.console)
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: TrainEvent) -> None:  # noqa: D102
        if event.kind == "start":
            if not self.progress.live.is_started:
                self.progress.start()
            self.tasks[event.label] = self.progress.add_task(event.label, total=event.steps,
                                                             completed=event.step, status="")
        task = self.tasks.get(event.label)
        if task is None:
            return
        if event.kind == "step":
            status = f"loss {event.loss:.3f}  lr {event.lr:.1e}  |g| {event.grad_norm:.2f}"
            self.progress.update(task, completed=event.step, status=status)
        elif event.kind == "eval" and event.metrics:
            m = event.metrics
            keys = ("loss", "srcc", "level_acc", "family_rate")
            shown = "  ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)
            self.progress.console.print(f"[bold]{event.label}[/] step {event.step}: {shown}")
        elif event.kind == "done":
            self.progress.update(task, completed=event.step)

    def stop(self) -> None:  # noqa: D102
        if self.progress.live.is_started:
            self.progress.stop()

    def report(self, result: PairResult) -> None:
        """The final table."""
        render(result, self.console)


def render(result: PairResult, console: Any) -> None:
    """The final table: test metrics of each checkpoint, the SRCC difference, example descriptions."""
    from rich.table import Table

    table = Table(title="held-out test photos (Q-Align score vs label)")
    for column in ("checkpoint", "train s", "eval s", "SRCC", "PLCC", "level acc", "family named"):
        table.add_column(column, justify="right" if column != "checkpoint" else "left")
    for name in result.paths:  # every trained checkpoint, in training order
        metrics = result.entry(name)
        if metrics is None:
            continue
        seconds = result.train_seconds.get(name, float("nan"))
        table.add_row(name, f"{seconds:.0f}", f"{result.eval_seconds.get(name, float('nan')):.0f}",
                      f"{metrics['srcc']:.3f}", f"{metrics['plcc']:.3f}", f"{metrics['level_acc']:.3f}",
                      f"{metrics.get('family_rate', float('nan')):.3f}")
    console.print(table)
    if result.comparison:
        c = result.comparison
        console.print(f"two-stage minus one-stage SRCC: {c['srcc_two_minus_one']:+.3f}, paired bootstrap 95% "
                      f"interval [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] over {c['n']} test images")
    if "stage1" in result.train_seconds:
        console.print(f"two-stage: stage 1 {result.train_seconds['stage1']:.0f} s, "
                      f"stage 2 {result.train_seconds['stage2']:.0f} s")
    for name in result.paths:
        for ex in (result.entry(name) or {}).get("examples", [])[:3]:
            console.print(f"[dim]{name} {ex['id']} ({ex['label']} -> {ex['rated']}): {ex['description']}[/]")
    console.print(f"results: {Path(result.config['out_dir']) / 'results.json'}")


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


def main_with_display(cfg: Config) -> PairResult:
    """`main` with a rich progress display of the training runs."""
    display = Display()
    try:
        return main(cfg, progress=display)
    finally:
        display.stop()


if __name__ == "__main__":
    cli.run(main_with_display, Config, render)
