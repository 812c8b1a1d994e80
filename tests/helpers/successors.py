"""Small random successor upsamplers (anyup, jafar, loftup, naf, uplift) saved as checkpoints, and a local HTTP server of files.

Import it as ``from tests.helpers import successors``.
"""

from __future__ import annotations

import functools
import http.server
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

KINDS = ("anyup", "jafar", "loftup", "naf", "uplift")
NAF_MIN_SIZE = 72  # NAF's window rule 9 * (H' // h) <= H' needs 9 low-res cells: 72 px with the tiny stride-8 backbone


def small_successor(kind: str, dim: int = 16, seed: int = 0):
    """A randomly initialised ``kind`` upsampler a few thousand weights large, for ``dim``-channel features."""
    import torch

    from featup.upsamplers import anyup, jafar, loftup, naf, uplift

    builders = {
        "anyup": lambda: anyup.AnyUp(qk_dim=16),
        "jafar": lambda: jafar.JAFAR(qk_dim=16, v_dim=dim),
        "loftup": lambda: loftup.LoftUp(dim, n_freqs=4),
        "naf": lambda: naf.NAF(dim=32),
        # patch 8: the tiny backbone's stride, which the pipeline gives an UPLiFT read from a file (not recorded in it)
        "uplift": lambda: uplift.UPLiFT(dim, patch_size=8, encoder_channels=(8, 24), hidden_channels=24),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[kind]().eval()


def save_successor(kind: str, path: Path, dim: int = 16, seed: int = 0) -> Path:
    """``small_successor``'s state dict saved at ``path`` (each module's own layout, which its loader accepts)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(small_successor(kind, dim, seed).state_dict(), path)
    return path


@dataclass
class FileServer:
    """A running HTTP server over ``root``; ``requests`` lists (method, path) as they came."""

    root: Path
    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]


@contextmanager
def file_server(root: Path) -> Iterator[FileServer]:
    """Serve ``root`` on 127.0.0.1 (HEAD and GET, recorded) until the block ends."""
    state = FileServer(root)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            state.requests.append(("HEAD", self.path))
            super().do_HEAD()

        def do_GET(self) -> None:
            state.requests.append(("GET", self.path))
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
