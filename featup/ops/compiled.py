"""``torch.compile`` wrappers that build lazily and fall back to eager code if compilation fails."""

from __future__ import annotations

import logging
import types
from typing import Callable, Literal

import torch

from featup.errors import ConfigError

Backend = Literal["auto", "compiled", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "compiled", "eager")

KernelFactory = Callable[[int], Callable[..., torch.Tensor]]

log = logging.getLogger(__name__)

# Each dtype, grad mode, batch of 1 or more and input layout is its own compiled variant; dynamo's
# default of 8 per function is soon spent in a process that trains and evaluates at several sizes.
RECOMPILE_LIMIT = 64


def _own_code(fn: Callable[..., torch.Tensor], diameter: int) -> Callable[..., torch.Tensor]:
    """``fn`` with a code object of its own: dynamo counts recompilations per code object, so the
    kernels made for different diameters by one factory would otherwise share one budget."""
    name = f"{fn.__name__}_d{diameter}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class LazyCompiled:
    """Runs a kernel, specialised on one static int (the filter diameter), compiled or eager.

    ``make(diameter)`` returns the function to compile; ``make_eager(diameter)`` an eager
    equivalent (default: the same function). Nothing is compiled at import or construction; the
    first ``"auto"`` call that fails to compile (no C++ compiler, unsupported device) logs one
    warning and switches to eager for good. Shapes are dynamic, so one compile serves every size.
    """

    def __init__(self, make: KernelFactory, make_eager: KernelFactory | None = None) -> None:
        self._make = make
        self._make_eager = make_eager or make
        self._compiled: dict[int, Callable[..., torch.Tensor]] = {}
        self.broken: str | None = None

    def _get_compiled(self, diameter: int) -> Callable[..., torch.Tensor]:
        if diameter not in self._compiled:
            kernel = _own_code(self._make(diameter), diameter)
            self._compiled[diameter] = torch.compile(kernel, dynamic=True, fullgraph=True)
        return self._compiled[diameter]

    def _run_compiled(self, diameter: int, *args: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._get_compiled(diameter)(*args)

    def __call__(self, diameter: int, *args: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
        if backend not in BACKENDS:
            raise ConfigError(f"kernel backend: expected one of {BACKENDS}, got {backend!r}")
        if backend == "eager" or (backend == "auto" and self.broken is not None):
            return self._make_eager(diameter)(*args)
        if backend == "compiled":
            return self._run_compiled(diameter, *args)
        try:
            return self._run_compiled(diameter, *args)
        except Exception as exc:  # compiler missing or broken: keep working, say so once
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("torch.compile of %s failed (%s); using eager code", self._make.__name__, self.broken)
            return self._make_eager(diameter)(*args)
