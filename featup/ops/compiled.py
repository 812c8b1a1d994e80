"""``torch.compile`` wrappers that build lazily, compile in the background under ``"auto"``, and fall back to eager.

A cold compile of the JBU kernels costs tens of CPU seconds (inductor generates and builds C++ on CPU). Under the
``"auto"`` backend an inference call never waits for it: the first call of each kernel variant queues its compile on
one low-priority background thread and runs the eager kernel; later calls use the compiled kernel once it is built.
The compile holds a file lock in inductor's cache folder, so the processes of one machine (Ray actors) compile one
after the other and the later ones load the first one's result from inductor's on-disk cache. Calls that record
gradients (training) compile in the caller's thread, as before: they run long enough to repay it at once.

``FEATUP_KERNELS`` (``auto``, ``compiled`` or ``eager``) overrides what ``"auto"`` means, for every process that
inherits it: ``eager`` for machines without a working compiler, or test runs that check other things.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from featup.errors import ConfigError

Backend = Literal["auto", "compiled", "eager"]
BACKENDS: tuple[str, ...] = ("auto", "compiled", "eager")
KERNELS_ENV = "FEATUP_KERNELS"  # what "auto" means in this process and its children (auto, compiled, eager)
COMPILE_LOCK_NAME = "featup-compile.lock"
# The compile thread's niceness: it takes about a quarter of a core from busy kernels, so a short job finishes on the
# eager kernels undisturbed, while a long job on fully busy CPUs still gets its compiled kernels (19 starves it).
COMPILE_NICE = 5

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


def auto_means() -> str:
    """What ``"auto"`` resolves to in this process: ``FEATUP_KERNELS`` when set, else ``"auto"`` (background compile)."""
    value = os.environ.get(KERNELS_ENV, "auto") or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"{KERNELS_ENV}: expected one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def compile_lock_path() -> Path:
    """The lock file that serialises kernel compiles on this machine: in inductor's cache folder, which they share."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        cache = default_cache_dir()
    Path(cache).mkdir(parents=True, exist_ok=True)
    return Path(cache) / COMPILE_LOCK_NAME


@contextmanager
def machine_compile_lock() -> Iterator[None]:
    """Held while this process compiles: another process of the machine waits, then finds inductor's cache warm."""
    from filelock import FileLock

    try:
        lock = FileLock(str(compile_lock_path()))
    except OSError:  # cache folder not writable: compile without the lock (inductor will say what fails)
        lock = FileLock(os.path.join(tempfile.gettempdir(), COMPILE_LOCK_NAME))
    with lock:
        yield


def _lower_this_thread_priority() -> None:
    """The compile thread (and the compiler processes it starts) yield most of the CPU to the eager kernels (Linux)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: compile at normal priority
        pass


class _BackgroundCompiler:
    """One thread per process that compiles queued kernel variants one at a time (dynamo's config is process-wide)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future] = set()
        self._mutex = threading.Lock()

    def submit(self, job: Callable[[], None]) -> Future:
        with self._mutex:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="featup-compile", initializer=_lower_this_thread_priority)
            future = self._executor.submit(job)
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
            return future

    def busy(self) -> bool:
        """Whether a compile is queued or running in this process."""
        return any(not f.done() for f in list(self._pending))

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every queued compile has finished (tests, benchmarks)."""
        for future in list(self._pending):
            future.exception(timeout)


BACKGROUND = _BackgroundCompiler()


def compiling() -> bool:
    """True while kernels are being compiled in the background in this process (the progress bar says so)."""
    return BACKGROUND.busy()


def wait_for_compiles(timeout: float | None = None) -> None:
    """Waits until this process's background compiles are done; later ``"auto"`` calls then run compiled."""
    BACKGROUND.wait(timeout)


def _variant(args: tuple[torch.Tensor, ...]) -> tuple:
    """What makes dynamo compile anew: device, dtype, layout, grad mode and sizes of 1 (other sizes are dynamic)."""
    return (
        torch.is_inference_mode_enabled(), torch.is_grad_enabled(),
        tuple((a.device.type, a.dtype, tuple(s == 1 for s in a.shape),
               a.is_contiguous(memory_format=torch.channels_last), a.requires_grad, a.is_inference())
              if isinstance(a, torch.Tensor) else type(a) for a in args),
    )


class LazyCompiled:
    """Runs a kernel, specialised on one static int (the filter diameter), compiled or eager.

    ``make(diameter)`` returns the function to compile; ``make_eager(diameter)`` an eager
    equivalent (default: the same function). Nothing is compiled at import or construction. Under
    ``"auto"`` an inference call of a variant not yet compiled runs eager while the variant compiles in the
    background; a compile that fails logs one warning and switches this kernel to eager for good. Shapes are
    dynamic, so one compile serves every size.
    """

    def __init__(self, make: KernelFactory, make_eager: KernelFactory | None = None) -> None:
        self._make = make
        self._make_eager = make_eager or make
        self._compiled: dict[int, Callable[..., torch.Tensor]] = {}
        self._ready: set[tuple] = set()  # (diameter, variant) compiled and run once
        self._queued: set[tuple] = set()
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
        if backend == "auto":
            backend = auto_means()
        if backend == "eager" or (backend == "auto" and self.broken is not None):
            return self._make_eager(diameter)(*args)
        if backend == "compiled":
            return self._run_compiled(diameter, *args)
        if torch.is_grad_enabled():  # training: compile now, in this thread
            return self._run_or_fall_back(diameter, args)
        key = (diameter, _variant(args))
        if key in self._ready:
            return self._run_or_fall_back(diameter, args)
        if key not in self._queued:
            self._queued.add(key)
            BACKGROUND.submit(lambda: self._compile_in_background(key, diameter, args))
        return self._make_eager(diameter)(*args)

    def _run_or_fall_back(self, diameter: int, args: tuple) -> torch.Tensor:
        try:
            return self._run_compiled(diameter, *args)
        except Exception as exc:  # compiler missing or broken: keep working, say so once
            self._mark_broken(exc)
            return self._make_eager(diameter)(*args)

    def _compile_in_background(self, key: tuple, diameter: int, args: tuple) -> None:
        """Compiles the variant of ``args`` (run once on them, in the caller's inference / no-grad mode)."""
        inference, grad = key[1][0], key[1][1]
        try:
            with machine_compile_lock(), torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self._run_compiled(diameter, *args)
            self._ready.add(key)
        except Exception as exc:
            self._mark_broken(exc)

    def _mark_broken(self, exc: Exception) -> None:
        if self.broken is None:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("torch.compile of %s failed (%s); using eager code", self._make.__name__, self.broken)
