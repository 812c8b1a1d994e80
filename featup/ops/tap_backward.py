"""Eager tap kernels with a hand-written backward: autograd of D*D shifted views allocates a whole input-sized gradient
per view; these backwards accumulate each tap's gradient in place instead (``bench/bench_eager_backward.py``)."""

from __future__ import annotations

from typing import Callable

import torch

# forward(a, b, static) -> out; backward(grad_out, a, b, static, needs) -> (grad_a or None, grad_b or None)
TapsForward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
TapsBackward = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]


class _TapsFunction(torch.autograd.Function):
    """``forward(a, b, static)`` differentiated by ``backward``; its gradients equal autograd's to float rounding."""

    @staticmethod
    def forward(ctx, forward: TapsForward, backward: TapsBackward, a: torch.Tensor, b: torch.Tensor, static: int):
        ctx.backward_fn, ctx.static = backward, static
        ctx.save_for_backward(a, b)
        return forward(a, b, static)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a, grad_b = ctx.backward_fn(grad_out, a, b, ctx.static, ctx.needs_input_grad[2:4])
        return None, None, grad_a, grad_b, None


def eager_taps(forward: TapsForward, backward: TapsBackward, static: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(a, b) -> forward(a, b, static)``, through ``backward`` when recording gradients of ``a`` or ``b``."""

    def taps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _TapsFunction.apply(forward, backward, a, b, static)
        return forward(a, b, static)

    return taps
