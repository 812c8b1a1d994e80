"""A real S3 API (moto's server) on 127.0.0.1 for the whole test session: ``tests/conftest.py`` makes it the ``s3_server`` fixture."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from contextlib import contextmanager

_S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: where it listens, its bucket, and the s3fs storage options to reach it."""

    endpoint_url: str
    bucket: str
    storage_options: dict = field(hash=False)
    env: dict = field(hash=False)  # credentials + AWS_ENDPOINT_URL, for subprocesses that take S3 settings from the environment

    def url(self, name: str) -> str:
        """A fresh ``s3://`` prefix in the bucket, unique per call so tests never share objects."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's threaded S3 server on a free port of 127.0.0.1 with one bucket; credentials set in os.environ for the session."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(_S3_ENV)
    werkzeug_log = logging.getLogger("werkzeug")
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"key": _S3_ENV["AWS_ACCESS_KEY_ID"], "secret": _S3_ENV["AWS_SECRET_ACCESS_KEY"],
                   "client_kwargs": {"endpoint_url": endpoint}}
        bucket = "featup-test"
        import s3fs

        s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        yield S3Server(endpoint, bucket, options, {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    finally:
        server.stop()
        werkzeug_log.setLevel(saved_level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
