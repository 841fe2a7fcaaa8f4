"""Benchmark: the compact pair trained side by side (one process per checkpoint) vs one after the other.

Question: on a CPU, how much wall time does `train_pair` save by training the
one-stage and two-stage checkpoints at once, each in its own process with an
equal share of the threads (the longer one taking every thread once the other
ends), over training them one after the other with every thread, and do the two
arrangements train the same checkpoints?

Method: the built-in benchmark (``--benchmark-dir``, built if absent) and the
compact model; ``--total-steps`` per pair (one-stage that many, two-stage split
2:1), no evaluation during training and no test rating, each arrangement into
its own fresh folder. Best wall time of ``--repeats`` alternating runs; the
final losses of the two arrangements are compared (rounding differs with the
thread count, the curve should not).

Example::

    python studies/bench_side_by_side.py --total-steps 40 --repeats 1
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mechbiqa import cli, outputs
from mechbiqa.sources import DEFAULT_BENCHMARK
from mechbiqa.train import PairConfig, State, train_pair


@dataclass(frozen=True)
class Config:
    """A benchmark run.

    Attributes:
        total_steps: Steps per pair (one-stage; two-stage split 2:1).
        threads: CPU threads shared out (side by side) or all used (one after the other).
        repeats: Alternating runs per arrangement; the best time counts.
        benchmark_dir: The built-in benchmark (built there if absent).
    """

    total_steps: int = 40
    threads: int = 2
    repeats: int = 1
    benchmark_dir: Path = DEFAULT_BENCHMARK

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is loaded (the message names the option)."""
        cli.check_common(self)
        if self.total_steps < 3 or self.repeats < 1 or self.threads < 2:
            raise ValueError(f"--total-steps {self.total_steps}, --repeats {self.repeats}, --threads {self.threads}: "
                             "pass at least 3 steps, 1 repeat and 2 threads")


@dataclass(frozen=True)
class Result:
    """Timings and the agreement of the two arrangements.

    Attributes:
        side_by_side_seconds: Best wall time, one process per checkpoint.
        one_after_other_seconds: Best wall time, one process, every thread.
        speedup: ``one_after_other / side_by_side``.
        final_losses: Arrangement -> run (``one-stage``, ``stage1``, ``stage2``) -> last training loss.
        config: The run.
    """

    side_by_side_seconds: float
    one_after_other_seconds: float
    speedup: float
    final_losses: dict[str, dict[str, float]]
    config: Config = field(default_factory=Config)


RUNS = {"one-stage": "one-stage", "stage1": "two-stage/stage1", "stage2": "two-stage/stage2"}


def _pair(base: PairConfig, parallel: bool) -> tuple[float, dict[str, float]]:
    """Train the pair from nothing into a fresh folder; its wall seconds and final losses."""
    out = Path(tempfile.mkdtemp(prefix="bench-pair-"))
    try:
        cfg = replace(base, out_dir=out, parallel=parallel)
        train_pair(replace(cfg, modes=("one-stage",), total_steps=1))  # the tokenizer, outside the timing
        shutil.rmtree(out / "one-stage", ignore_errors=True)
        start = time.perf_counter()
        train_pair(cfg)
        seconds = time.perf_counter() - start
        return seconds, {run: State.load(out / sub).history[-1]["loss"] for run, sub in RUNS.items()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(cfg: Config) -> Result:
    """Train the pair both ways, alternately; compare."""
    base = PairConfig(benchmark_dir=cfg.benchmark_dir, total_steps=cfg.total_steps, threads=cfg.threads,
                      eval_every=0, test_samples=1, checkpoint_every=0, checkpoint_seconds=0, retrain=True)
    best = {True: float("inf"), False: float("inf")}
    losses: dict[bool, dict[str, float]] = {}
    for _ in range(cfg.repeats):
        for parallel in (True, False):
            seconds, losses[parallel] = _pair(base, parallel)
            best[parallel] = min(best[parallel], seconds)
    return Result(side_by_side_seconds=best[True], one_after_other_seconds=best[False],
                  speedup=best[False] / best[True],
                  final_losses={"side_by_side": losses[True], "one_after_other": losses[False]}, config=cfg)


def render(result: Result, console: Any) -> None:
    """The numbers as JSON on stdout, then one sentence."""
    console.out(outputs.dumps({"config": result.config, "result": result}), highlight=False)
    console.print(f"{result.config.total_steps} steps per pair on {result.config.threads} threads: side by side "
                  f"{result.side_by_side_seconds:.0f} s vs one after the other {result.one_after_other_seconds:.0f} s: "
                  f"{result.speedup:.2f}x")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
