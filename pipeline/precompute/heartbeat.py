"""Keeps the store's lock alive from the moment it is taken: a background thread that renews it every few seconds.

The driver may be busy for a long time before its loop starts (fitting the PCA, starting Ray and the actors), and
a ``ray.wait`` may block; a lock renewed only from the loop could look stale to a second job in the meantime.
The renewals ride out storage outages inside the store's retry budget; if one still fails, the error is kept
and the driver stops the job with it.
"""

from __future__ import annotations

import threading
from typing import Any

HEARTBEAT_S = 10.0


class LockHeartbeat:
    """``with LockHeartbeat(store):`` renews ``store``'s lock every ``interval_s`` until the block ends."""

    def __init__(self, store: Any, interval_s: float = HEARTBEAT_S) -> None:
        self.store, self.interval_s = store, interval_s
        self.error: BaseException | None = None  # the renewal failure that ended the thread, if any
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-heartbeat", daemon=True)

    def __enter__(self) -> LockHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.heartbeat()
            except Exception as e:  # retried inside the store already: this one is final
                self.error = e
                return
