"""Benchmark: a 16-bit vision tower on a CPU, products in 16 bits vs in float32 (weights 16-bit in both).

Question: on a CPU without 16-bit matrix units, how much faster is the released
vision tower (ViT-L/14 at 448 px: 1,025 tokens, width 1,024) in bfloat16 when its
linear layers and attention products multiply in float32
(`mechbiqa.model.precision.upcast_matmuls`, what `load_pretrained` does there),
and does it give the same tokens?

Method: a random tower with the released shapes (``--layers`` of its 24 blocks:
every block costs the same), cast to bfloat16; the same images through it with
the products in bfloat16 and in float32, alternating, best wall time of
``--repeats`` runs each; the largest difference of the outputs against a float32
copy of the tower, for both. Then decoding's side: one linear layer of the
released LLM's MLP shape (4,096 x 11,008, bfloat16) on ``--rows`` input rows, in
bfloat16 vs through float32 copies, side by side: the crossover below which
`mechbiqa.model.precision.FEW_ROWS` keeps the product in 16 bits.

Example::

    python studies/bench_precision.py --layers 4 --images 1
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from mechbiqa import cli
from mechbiqa.benchmarking import interleaved_best
from mechbiqa.model.config import VisionConfig
from mechbiqa.model.precision import FEW_ROWS, half_matmuls_are_slow, upcast_matmuls
from mechbiqa.model.vision import VisionTower


@dataclass(frozen=True)
class Config:
    """A benchmark run.

    Attributes:
        layers: Blocks of the released tower to build (of 24).
        images: Images per forward.
        repeats: Alternating runs of each; the best is kept.
        threads: torch CPU threads.
        seed: Seed of the weights and images.
        rows: Input rows of the linear-layer comparison (a decoding step has one per sequence).
    """

    layers: int = 4
    images: int = 1
    repeats: int = 3
    threads: int = 2
    seed: int = 0
    rows: tuple[int, ...] = (1, 4, 16, 64)

    def __post_init__(self) -> None:
        """Refuse out-of-range options before anything is built."""
        cli.check_common(self)
        for name in ("layers", "images", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: pass at least 1")


@dataclass
class Result:
    """Best seconds of each, the speed-up, and each one's largest difference from float32."""

    seconds_bf16: float
    seconds_upcast: float
    speedup: float
    max_diff_bf16: float
    max_diff_upcast: float
    emulated: bool
    linear_seconds: dict[int, tuple[float, float]]


def main(cfg: Config) -> Result:
    """Time the two ways side by side."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    full = VisionTower(replace(VisionConfig(), n_layers=cfg.layers)).eval()
    half = copy.deepcopy(full).to(torch.bfloat16)
    pixels = torch.randn(cfg.images, 3, full.cfg.image_size, full.cfg.image_size)

    def run(upcast: bool) -> torch.Tensor:
        upcast_matmuls(half, upcast)
        with torch.no_grad():
            return half(pixels)[0].float()

    with torch.no_grad():
        reference = full(pixels)[0]
    native_s, native, upcast_s, upcast = interleaved_best(lambda: run(False), lambda: run(True), cfg.repeats)
    weight = (torch.randn(11008, 4096) * 0.02).to(torch.bfloat16)
    linear_seconds = {}
    for rows in cfg.rows:
        x = torch.randn(rows, 4096).to(torch.bfloat16)
        bf16_s, _, float32_s, _ = interleaved_best(
            lambda x=x: F.linear(x, weight), lambda x=x: F.linear(x.float(), weight.float()).to(x.dtype), cfg.repeats)
        linear_seconds[rows] = (bf16_s, float32_s)
    return Result(seconds_bf16=native_s, seconds_upcast=upcast_s, speedup=native_s / upcast_s,
                  max_diff_bf16=float((native - reference).abs().max()),
                  max_diff_upcast=float((upcast - reference).abs().max()),
                  emulated=half_matmuls_are_slow("cpu"), linear_seconds=linear_seconds)  # fmt: skip


def render(result: Result, console: Any) -> None:
    """One line per way."""
    console.print(f"bf16 products:    {result.seconds_bf16:.2f} s  max |diff| vs float32 {result.max_diff_bf16:.3g}")
    console.print(f"float32 products: {result.seconds_upcast:.2f} s  max |diff| vs float32 {result.max_diff_upcast:.3g}")
    console.print(f"speed-up {result.speedup:.1f}x (16-bit products emulated on this CPU: {result.emulated})")
    console.print(f"one 4096 x 11008 linear layer (16 bits below {FEW_ROWS + 1} rows):")
    for rows, (bf16_s, float32_s) in result.linear_seconds.items():
        console.print(f"  {rows:>4} rows: bf16 {bf16_s * 1e3:7.1f} ms  through float32 {float32_s * 1e3:7.1f} ms")


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line -> Config (options derived from the Config's fields: `mechbiqa.cli`)."""
    return cli.parse(Config, argv, description=__doc__)


if __name__ == "__main__":
    cli.run(main, Config, render)
