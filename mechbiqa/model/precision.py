"""16-bit weights on a CPU without 16-bit matrix units: stored in 16 bits, multiplied in float32.

A 7B checkpoint loaded in bfloat16 or float16 takes half the memory of float32, but
on an x86 CPU without AVX-512 (BF16 / FP16 / AMX) PyTorch's 16-bit matrix products
run emulated, measured 7x slower than float32 on an AVX2 machine (a 1025 x 1024 by
1024 x 4096 product: 3.9 vs 27.7 GFLOPS, 2 threads). :func:`upcast_matmuls` makes
every ``nn.Linear`` of a model with 16-bit weights cast its input and weight to
float32 for the product and its output back, and the attention layers take their
two products (scores, pattern x values) the same way (:func:`matmul`; in the
vision tower's 1,025-token attention they were 87% of a 7B rating's time once the
linear layers were upcast): the weights stay 16-bit (memory: the weights plus one
layer's float32 copy while it runs), the products accumulate in float32 as the
16-bit kernels do, and the activations every hook sees keep the model's dtype.
The state dict, parameter names and gradients are unchanged.

A product of a few rows (a decoding step: one new token per sequence) is the
exception: it is bound by reading the weight, and a float32 copy of the weight
costs more than the emulated product, so up to `FEW_ROWS` rows multiply in 16 bits
(`studies/bench_precision.py` on the AVX2 machine above, 2 threads, a 4096 x 11008
bf16 weight: 1 row 4.9 ms in bf16 vs 82 ms through float32, 16 rows 66 vs 119 ms,
64 rows 275 vs 139 ms).

:func:`load_pretrained` applies it on such a CPU (:func:`half_matmuls_are_slow`);
call ``upcast_matmuls(model, False)`` to compute in 16 bits instead.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FEW_ROWS", "half_matmuls_are_slow", "linear", "matmul", "upcast_matmuls"]

_HALF = (torch.bfloat16, torch.float16)
FEW_ROWS = 32
"""Linear inputs of at most this many rows (tokens x sequences) multiply in 16 bits (decoding)."""


def half_matmuls_are_slow(device: str | torch.device) -> bool:
    """Whether 16-bit matrix products on ``device`` are emulated: an x86 CPU below AVX-512."""
    if torch.device(device).type != "cpu":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX", "AVX", "AVX2")


def matmul(a: Tensor, b: Tensor, float32: bool = False) -> Tensor:
    """``a @ b``; with ``float32``, multiplied in float32 and returned in ``a``'s dtype (attention layers)."""
    return (a.float() @ b.float()).to(a.dtype) if float32 else a @ b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, float32: bool = False) -> Tensor:
    """``F.linear``; with ``float32``, multiplied in float32 and returned in ``x``'s dtype (inputs of more
    than `FEW_ROWS` rows: a few rows multiply faster in 16 bits)."""
    if not float32 or x.numel() <= FEW_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Float32Linear.apply(x, weight, bias)  # keeps the 16-bit tensors for backward, not float32 copies
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


class _Float32Linear(torch.autograd.Function):
    """`linear` in float32 whose backward casts again instead of keeping float32 copies.

    Through ``F.linear(x.float(), weight.float())`` autograd would keep every layer's float32
    weight until backward: twice the 16-bit model (a 7B gradient ran out of 24 GB). Here the
    16-bit input and weight are saved, and each gradient is one more float32 product.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g = grad.float()
        grad_x = (g @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.with_bias and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b


def _float32_linear(self: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, self.weight, self.bias, True)


def upcast_matmuls(model: nn.Module, enabled: bool = True) -> int:
    """Compute each 16-bit ``nn.Linear`` and attention product of ``model`` in float32 (``enabled=False``: in
    its own dtype again).

    Returns:
        How many linear layers were switched.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "float32_products"):  # a layer that asks: attention products, the unembedding
            half = any(p.dtype in _HALF for p in module.parameters())
            module.float32_products = enabled and half
            switched += int(isinstance(module, nn.Linear) and half)
            continue
        if not isinstance(module, nn.Linear) or module.weight.dtype not in _HALF:
            continue
        if type(module).forward is not nn.Linear.forward:  # a subclass with its own forward (and hooks) is kept
            continue
        if enabled:
            module.forward = MethodType(_float32_linear, module)  # type: ignore[method-assign]
        else:
            module.__dict__.pop("forward", None)
        switched += 1
    return switched
