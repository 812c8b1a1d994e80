"""``eager_taps``: the forward as is without gradients, the hand-written backward (told which inputs need one) with them."""

from __future__ import annotations

import pytest
import torch

from featup.ops.tap_backward import eager_taps

calls: list[tuple[bool, ...]] = []


def _forward(a: torch.Tensor, b: torch.Tensor, static: int) -> torch.Tensor:
    return a * b * static


def _backward(grad_out, a, b, static, needs):
    calls.append(tuple(needs))
    return (grad_out * b * static if needs[0] else None, grad_out * a * static if needs[1] else None)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_the_backward_gets_the_inputs_that_need_a_gradient_and_gives_autograds_answer(needs):
    calls.clear()
    a = torch.randn(2, 3, dtype=torch.float64).requires_grad_(needs[0])
    b = torch.randn(2, 3, dtype=torch.float64).requires_grad_(needs[1])
    inputs = [t for t in (a, b) if t.requires_grad]
    got = torch.autograd.grad(eager_taps(_forward, _backward, 3)(a, b).sum(), inputs)
    want = torch.autograd.grad(_forward(a, b, 3).sum(), inputs)
    assert calls == [needs]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_without_gradients_the_forward_runs_as_is():
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3)
    with torch.no_grad():
        out = eager_taps(_forward, _backward, 2)(a, b)
    assert out.grad_fn is None
    torch.testing.assert_close(out, a.detach() * b * 2, rtol=0, atol=0)
