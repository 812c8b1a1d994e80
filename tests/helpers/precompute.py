"""Shared by the precompute tests: a tiny user backbone module, a local 2-CPU Ray, reference stores and store comparison.

Tests whose subject is not Ray run their jobs in process (``tiny_config(..., in_process=True)``, ``--in-process``): the
tiny module only has to be importable here (``tiny_modules``); those about actors, placement and kills use ``local_ray``.

Import it as ``from tests.helpers import precompute as helpers``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

TINY_MODULE = "featup_tiny_net"
TINY_BACKBONE = f"{TINY_MODULE}:tiny"  # stride 8, 16 channels: a patchify conv, GELU and a 1x1 conv
SLOW_FLAG_ENV = "FEATUP_TEST_SLOW_FLAG"  # while the file it names exists, every forward sleeps SLOW_SECONDS
SLOW_SECONDS = 0.3
IMAGE_SIZE = 32

TINY_SOURCE = f'''
"""A tiny backbone for the precompute tests (written by precompute_helpers)."""
import os
import time

import torch
from torch import nn


class TinyNet(nn.Module):
    stride = 8
    dim = 16

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.mix = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        if os.path.exists(os.environ.get("{SLOW_FLAG_ENV}", "")):
            time.sleep({SLOW_SECONDS})
        return self.mix(torch.nn.functional.gelu(self.patch(x)))


def tiny():
    return TinyNet()
'''


def write_tiny_module(folder: Path) -> Path:
    """Writes the ``featup_tiny_net`` module into ``folder`` and returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_MODULE}.py").write_text(textwrap.dedent(TINY_SOURCE))
    return folder


@contextmanager
def tiny_modules(root: Path) -> Iterator[Path]:
    """The tiny module written under ``root``, importable in this process while the context lasts (no Ray)."""
    modules = write_tiny_module(root / "mods")
    sys.path.insert(0, str(modules))
    try:
        yield modules
    finally:
        sys.path.remove(str(modules))


@contextmanager
def slow_forwards() -> Iterator[None]:
    """Every forward of the tiny backbone in this process sleeps SLOW_SECONDS while the context lasts (in-process runs;
    Ray workers watch the flag of ``RayEnv``)."""
    flag = Path(tempfile.mkdtemp()) / "slow.flag"
    saved = os.environ.get(SLOW_FLAG_ENV)
    os.environ[SLOW_FLAG_ENV] = str(flag)
    flag.touch()
    try:
        yield
    finally:
        flag.unlink()
        flag.parent.rmdir()
        if saved is None:
            os.environ.pop(SLOW_FLAG_ENV)
        else:
            os.environ[SLOW_FLAG_ENV] = saved


class RayEnv(NamedTuple):
    """The test run's one local Ray: where its workers import the tiny module from, and the slow flag they watch."""

    modules: Path
    flag: Path


@contextmanager
def local_ray(root: Path) -> Iterator[RayEnv]:
    """A 2-CPU local Ray whose workers can import the tiny module (written under ``root``) and see the slow flag.

    The whole test run shares one (the ``ray_env`` session fixture): starting Ray and its worker pool costs seconds.
    """
    import ray

    ray_env = RayEnv(write_tiny_module(root / "mods"), root / "slow.flag")
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ray_env.modules), os.environ.get("PYTHONPATH")])),
        SLOW_FLAG_ENV: str(ray_env.flag),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "HF_HUB_OFFLINE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    sys.path.insert(0, str(ray_env.modules))
    start_local_ray()
    try:
        yield ray_env
    finally:
        ray.shutdown()
        sys.path.remove(str(ray_env.modules))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local_ray() -> None:
    """The 2-CPU local Ray of ``local_ray`` (never another job's Ray), joined by this process."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")


@contextmanager
def ray_paused() -> Iterator[None]:
    """This process without Ray for the block: the session's local Ray (``ray_env``), if an earlier test on this
    pytest worker started it, is stopped and started again after, for tests that check a command starts no Ray."""
    import ray

    if not ray.is_initialized():
        yield
        return
    ray.shutdown()
    try:
        yield
    finally:
        start_local_ray()


def tiny_config(inputs: Any, output: str, **overrides: Any):
    """A PrecomputeConfig of the tiny backbone at 32x32, float32, eager JBU kernels, 1 CPU per actor."""
    from pipeline.precompute.config import PrecomputeConfig

    settings = dict(
        inputs=tuple(str(i) for i in inputs), output=str(output), backbone=TINY_BACKBONE, weights="random",
        image_size=IMAGE_SIZE, dtype="float32", kernel_backend="eager", batch_size=4, decode_threads=1,
        cpus_per_actor=1.0, device="cpu", save_lowres=True,
        max_errors=None,  # the tests of bad input count every failure; those of the limit pass their own
    )
    settings.update(overrides)
    return PrecomputeConfig(**settings)


def reference_store(config) -> None:
    """Computes the whole store in this process, shard after shard, with plain ShardWorker calls (no Ray)."""
    import torch

    from pipeline.precompute.plan import make_plan
    from pipeline.precompute.driver import open_store
    from pipeline.precompute.worker import ShardTask, ShardWorker

    plan = make_plan(config)
    store, _, projection, _ = open_store(plan, "reference", sys.stderr)
    threads = torch.get_num_threads()
    try:
        worker = ShardWorker(config, projection=projection, torch_threads=1)  # as in the actors: 1 CPU, 1 thread
        for shard, offset in zip(plan.shards, plan.offsets):
            worker.process_shard(ShardTask(shard, offset))
    finally:
        torch.set_num_threads(threads)
        store.release_lock()


def read_store(url: str, storage_options: dict | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every array of a store (whole) and its index rows."""
    from pipeline.store.features import FeatureStore

    store = FeatureStore.open(url, storage_options, mode="r")
    arrays = {name: store.array(name)[...] for name in store.array_names}
    return arrays, store.read_index().to_pylist()


def assert_same_store(a: str, b: str, *, options_a: dict | None = None, options_b: dict | None = None, same_urls: bool = True) -> None:
    """Both stores hold bit-identical arrays and the same index (shard URLs compared only when ``same_urls``)."""
    arrays_a, index_a = read_store(a, options_a)
    arrays_b, index_b = read_store(b, options_b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype, name
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=f"array {name}")
    if not same_urls:
        index_a = [{k: v for k, v in row.items() if k != "shard"} for row in index_a]
        index_b = [{k: v for k, v in row.items() if k != "shard"} for row in index_b]
    assert index_a == index_b


def assert_materialized(full: str, materialized: str, tolerance: float = 1e-4) -> None:
    """A store written by ``featup materialize`` holds the full store's arrays (within ``tolerance``), index and
    attributes (but for where it came from, the command line and the time)."""
    from pipeline.store.features import FeatureStore

    (expected, index), (got, got_index) = read_store(full), read_store(materialized)
    assert sorted(got) == sorted(expected) and got_index == index
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert np.abs(got[name].astype(np.float64) - expected[name]).max() <= tolerance, name
    a, b = FeatureStore.open(full, mode="r").attrs, FeatureStore.open(materialized, mode="r").attrs
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= {"materialized_from", "command_line", "created_at"}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Polls ``predicate`` until it returns something truthy; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def busy_actor(samples_per_shard: int | None = None):
    """A live precompute actor of this Ray namespace that is part-way through a shard, or None. With
    ``samples_per_shard``, only one with samples of its shard still to compute (a kill then always lands before the
    shard's result is returned)."""
    import ray

    from pipeline.precompute.driver import ACTOR_PREFIX

    for name in ray.util.list_named_actors():
        if not name.startswith(ACTOR_PREFIX):
            continue
        try:
            handle = ray.get_actor(name)
            progress = ray.get(handle.progress.remote(), timeout=5)
        except Exception:  # dead or not started yet
            continue
        if 0 < progress < (samples_per_shard or float("inf")):
            return handle
    return None
