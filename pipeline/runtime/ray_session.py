"""The Ray a job runs on: the one already initialised in this process, a cluster at ``--address``, or a local one."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

# Ray's notice that token authentication is on by default for a new local instance: printed in the middle of the
# progress output for an embedded Ray that nobody else reaches (authentication stays on; only the notice goes).
RAY_NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


@contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Raises the named loggers to ERROR while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


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
        cpus = max(os.cpu_count() or 1, num_cpus or 0)
        with _quiet(RAY_NOTICE_LOGGERS):
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
