"""The processes of one run: a single process, or data parallel over several with accelerate.

:class:`Processes` is what the loop asks about the others: how many there
are, which one this is, how to wrap the model and optimizer, how to sum a
number over all of them. Started as one plain ``python`` process it needs
nothing (accelerate is not imported); started by ``accelerate launch`` or
``torchrun`` (``WORLD_SIZE`` > 1), or with an FSDP / DeepSpeed accelerate
config, it is an ``accelerate.Accelerator`` (``pip install 'mechbiqa[dist]'``)
that wraps the model in DDP (gloo on CPUs, NCCL on GPUs), FSDP or DeepSpeed.

Research choice: ``TrainConfig.batch_size`` is the *global* micro-batch. Every
process computes the same example order (:class:`~mechbiqa.train.data.BatchOrder`)
and takes its contiguous share of each micro-batch, and the loss is summed
over answer tokens and divided by the step's token count over all processes,
so N processes take the same optimizer steps as one (up to float summation
order), and a run may resume with another number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Processes", "launched", "is_main_process", "main_process_first"]


def launched() -> bool:
    """Whether this process was started by a multi-process or sharding launcher."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true")


def is_main_process() -> bool:
    """Whether this is the main process (always, unless launched with several)."""
    if not launched():
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block in the main process first, then in the others (data preparation, tokenizer)."""
    if not launched():
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


class Processes:
    """This process's place in the run, and the few collective operations the loop needs.

    Args:
        device: The device of a single-process run (``accelerate`` picks each process's own).
    """

    def __init__(self, device: torch.device) -> None:  # noqa: D107
        self.accelerator: Any = None
        self.device = device
        if launched():
            try:
                from accelerate import Accelerator, DistributedDataParallelKwargs
            except ImportError:
                raise ImportError("a multi-process run needs accelerate: pip install 'mechbiqa[dist]'") from None
            # Stage 2 never runs the vision tower: DDP must not wait for gradients that never come.
            self.accelerator = Accelerator(cpu=device.type == "cpu",
                                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
            self.device = self.accelerator.device

    @property
    def count(self) -> int:
        """Number of processes."""
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def index(self) -> int:
        """This process's rank."""
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and evaluates."""
        return self.index == 0

    @property
    def sharded(self) -> bool:
        """Whether the weights are split over processes (FSDP, DeepSpeed): no single process can evaluate."""
        if self.accelerator is None:
            return False
        kind = str(self.accelerator.distributed_type)
        return "FSDP" in kind or "DEEPSPEED" in kind

    def share(self, index: Sequence[int]) -> list[int]:
        """This process's contiguous share of a global micro-batch.

        Raises:
            ValueError: The micro-batch does not split evenly.
        """
        if len(index) % self.count:
            raise ValueError(f"batch_size {len(index)} does not split over {self.count} processes; "
                             f"make it a multiple of {self.count}")
        size = len(index) // self.count
        return list(index[self.index * size : (self.index + 1) * size])

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """Wrap the model (DDP/FSDP/DeepSpeed) and optimizer; unchanged in a single process."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside its DDP/FSDP wrapper."""
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The full state dict (gathered from the shards when sharded; every process must call it)."""
        if self.accelerator is None:
            return model.state_dict()
        return self.accelerator.get_state_dict(model)

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches before the step's last one."""
        if self.accelerator is None or sync:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, through DeepSpeed's engine where there is one."""
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradient norm (``inf``: measure only); the norm before clipping."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return float("nan") if norm is None else float(norm)  # DeepSpeed clips inside its engine

    def sum(self, value: float) -> float:
        """The sum of a number over all processes."""
        if self.accelerator is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum")[0])

    def agree(self, flag: bool) -> bool:
        """The main process's decision, on every process (e.g. a time-based checkpoint)."""
        if self.accelerator is None:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        return bool(self.accelerator.reduce(t * int(self.is_main), reduction="sum")[0])

    def wait(self) -> None:
        """Barrier: every process reaches this point before any goes on."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
