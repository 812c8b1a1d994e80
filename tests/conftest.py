"""Shared test settings: no hub downloads, and the paths of the read-only reference fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import s3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# "auto" kernels run eager in the tests and in the Ray workers they start: the kernel tests compile one shape per
# kernel with backend="compiled", and the background compile of "auto" has tests of its own (tests/featup/ops).
os.environ.setdefault("FEATUP_KERNELS", "eager")

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
FIXTURES = SHARED_FIXTURES / "featup-official"


def shared_fixture_dir(name: str) -> Path:
    """``../shared/fixtures/<name>-official``: a published upsampler's reference outputs (read-only)."""
    path = SHARED_FIXTURES / f"{name}-official"
    assert path.is_dir(), f"reference fixtures missing at {path}"
    return path


MAX_WORKERS = 4  # each worker may start a 2-CPU local Ray (ray_env): more than four buys little and costs memory


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU this process may use, at most MAX_WORKERS (xdist's own count skips hyperthreads)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


# The modules that take a minute or more (``--durations``, a cold inductor cache), heaviest first. xdist's loadscope
# hands each worker one module at a time in collection order: these run first so that no long module starts last and
# holds the run while the other workers sit idle (pyproject: --no-loadscope-reorder keeps this order).
RUN_FIRST = (
    "tests/jobs/test_evaluate.py",
    "tests/jobs/test_submit.py",
    "tests/featup/upsamplers/test_jbu.py",
    "tests/pipeline/precompute/test_faults.py",
    "tests/jobs/test_train_jbu.py",
    "tests/jobs/test_precompute.py",
    "tests/pipeline/precompute/test_driver.py",
    "tests/featup/ops/test_upsample_filter.py",
    "tests/pipeline/precompute/test_pool.py",
    "tests/featup/ops/test_adaptive_conv.py",
    "tests/featup/test_checkpoint.py",
    "tests/pipeline/store/test_faults.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Moves the RUN_FIRST modules to the front, in that order; every other test keeps its place."""
    rank = {path: i for i, path in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep their order


# Every test parametrised with backend="compiled" (a "compiled" token in its parameter id) goes to one xdist scope, so
# to one worker, where each kernel variant (grad mode, dtype, layout, batch of 1 or more) compiles once and later tests
# reuse it in process; spread over the workers by module, they compiled the same variants again. The kernel tests
# therefore use the variants the JBU tests use: float32, a batch of 2, forward checks under inference_mode. (Two scopes,
# forward and gradients, compiling on both workers at once, gave a cold run of 17.8 minutes here; one scope 15.3 and 16.0.)
# The tests of the "auto" backend's background compile (tests/featup/ops/test_compiled.py) join that scope too: on a
# worker of their own, the first compile of the process (inductor's set-up: its compile workers, the C++ ISA checks) cost
# them 20 to 40 s; after the kernel tests they take a few seconds.
COMPILED_SCOPE = "compiled-kernels"
COMPILING_MODULES = ("tests/featup/ops/test_compiled.py",)


def compiled_kernel_scope(nodeid: str) -> str | None:
    """``COMPILED_SCOPE`` for a compiled-kernel test (or a test of a COMPILING_MODULES module), else None."""
    if nodeid.split("::", 1)[0] in COMPILING_MODULES:
        return COMPILED_SCOPE
    params = nodeid.rpartition("::")[2].partition("[")[2].rstrip("]")
    return COMPILED_SCOPE if "compiled" in params.split("-") else None


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with one more scope: a module's tests (and so its module-scoped fixtures) go to one worker,
    and so do all the compiled-kernel tests (``compiled_kernel_scope``)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrCompiledScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return compiled_kernel_scope(nodeid) or super()._split_scope(nodeid)

    if config.getvalue("dist") != "loadscope":
        return None  # any other --dist: xdist's own scheduler
    return ModuleOrCompiledScheduling(config, log)


def pytest_configure(config) -> None:
    """In an xdist worker: torch threads (and those of the processes it starts) = this worker's share of the CPUs, so
    that the workers do not oversubscribe the machine (two 2-thread workers on 2 cores run torch several times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        import torch

        torch.set_num_threads(share)


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """Folder of the published FeatUp reference outputs (``../shared/fixtures/featup-official``)."""
    assert FIXTURES.is_dir(), f"reference fixtures missing at {FIXTURES}"
    return FIXTURES


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a 2-core machine shared with Ray workers, two threads oversubscribe it (10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_env(tmp_path_factory):
    """The test run's one local 2-CPU Ray (``tests.helpers.precompute.local_ray``), started by the first test that
    needs it and stopped at the end of the run: ``.modules`` (the tiny backbone module), ``.flag`` (the slow flag)."""
    from tests.helpers.precompute import local_ray

    with local_ray(tmp_path_factory.mktemp("ray")) as env:
        yield env


@pytest.fixture(scope="session")
def tiny_modules(tmp_path_factory):
    """The folder of the tiny backbone module (``tests.helpers.precompute.tiny_modules``), importable in this process for
    the whole run: what in-process precompute runs need, without starting Ray."""
    from tests.helpers.precompute import tiny_modules

    with tiny_modules(tmp_path_factory.mktemp("tiny")) as modules:
        yield modules


@pytest.fixture(scope="session")
def s3_server():
    """moto's threaded S3 server on a free port of 127.0.0.1 with one bucket (``tests.helpers.s3.S3Server``)."""
    with s3.s3_server() as server:
        yield server
