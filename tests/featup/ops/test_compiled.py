"""The "auto" kernel backend: eager at once while the compiled kernel builds in the background, then compiled."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from filelock import FileLock

from featup.errors import ConfigError
from featup.ops import compiled
from featup.ops.compiled import LazyCompiled


def _make_kernel(diameter: int):
    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * diameter + y.sin()

    return kernel


def _make_uncompilable(diameter: int):
    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > -1e30:  # a data-dependent Python branch: fullgraph compilation refuses it
            return x * diameter + y
        return x

    return kernel


@pytest.fixture
def auto_kernels(monkeypatch):
    """``"auto"`` as users get it (the suite sets FEATUP_KERNELS=eager)."""
    monkeypatch.setenv(compiled.KERNELS_ENV, "auto")
    yield
    compiled.wait_for_compiles(120)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)


def test_inference_runs_eager_at_once_then_compiled_once_built(auto_kernels):
    kernel = LazyCompiled(_make_kernel)
    with torch.inference_mode():  # as in a precompute job: the tensors are made under inference mode too
        x, y = _inputs()
        want = _make_kernel(3)(x, y)
        first = kernel(3, x, y)
        assert not kernel._ready and compiled.compiling()  # answered by the eager kernel; the compile is under way
        compiled.wait_for_compiles(120)
        assert len(kernel._ready) == 1 and not compiled.compiling()
        calls = torch._dynamo.utils.counters["stats"]["calls_captured"]
        later = kernel(3, x * 2, y)  # another call of the same variant runs the compiled kernel, without recompiling
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(later, _make_kernel(3)(x * 2, y), rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == calls
    assert kernel.broken is None


def test_compiles_wait_for_the_machine_lock(auto_kernels):
    """Another process of the machine compiling (holding the lock): this one keeps running eager until it is free."""
    kernel = LazyCompiled(_make_kernel)
    x, y = _inputs()
    with FileLock(str(compiled.compile_lock_path())):
        with torch.inference_mode():
            kernel(5, x, y)
        time.sleep(1.0)
        assert not kernel._ready and compiled.compiling()
    compiled.wait_for_compiles(120)
    assert len(kernel._ready) == 1


def test_calls_that_record_gradients_compile_in_the_caller(auto_kernels):
    kernel = LazyCompiled(_make_kernel)
    x, y = _inputs()
    x.requires_grad_(True)
    out = kernel(2, x, y)
    assert not compiled.compiling() and not kernel._ready  # nothing queued: it ran compiled, here
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 2.0))


def test_a_kernel_that_cannot_compile_warns_once_and_stays_eager(auto_kernels, caplog):
    kernel = LazyCompiled(_make_uncompilable)
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="featup.ops.compiled"), torch.inference_mode():
        first = kernel(3, x, y)
        compiled.wait_for_compiles(120)
        again = kernel(3, x, y)
    assert kernel.broken is not None and not kernel._ready
    assert sum("using eager code" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(first, x * 3 + y)
    torch.testing.assert_close(again, x * 3 + y)


def test_featup_kernels_eager_never_compiles(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "eager")
    kernel = LazyCompiled(_make_kernel)
    x, y = _inputs()
    with torch.inference_mode():
        kernel(3, x, y)
    assert not compiled.compiling() and not kernel._queued


def test_a_bad_featup_kernels_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "fast")
    with pytest.raises(ConfigError, match="FEATUP_KERNELS: expected one of auto, compiled, eager, got 'fast'"):
        LazyCompiled(_make_kernel)(3, *_inputs())


def test_the_lock_lives_in_inductors_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    assert compiled.compile_lock_path() == tmp_path / "cache" / compiled.COMPILE_LOCK_NAME
