"""The Ray a job runs on: the one already initialised in this process, a cluster at ``--address``, or a local one."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"


@contextmanager
def ray_session(address: str | None, num_cpus: int | None = None) -> Iterator[None]:
    """Joins ``address``, or starts a private local Ray with at least ``num_cpus`` CPUs; shuts down what it started.

    A local Ray is always a new instance (``address="local"``), never another job's Ray running on the machine.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # workers use this interpreter and its installed packages
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Token authentication stays on (Ray's default for a new local instance), but chosen explicitly, so Ray does not
        # print its notice about the default in the middle of the progress output for an instance nobody else reaches.
        os.environ.setdefault(RAY_AUTH_MODE_ENV, "token")
        cpus = max(os.cpu_count() or 1, num_cpus or 0)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
