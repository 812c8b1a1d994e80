"""A file server on 127.0.0.1 that lets a request in only with the credentials it was given: a ``token`` query
parameter, a user and password (HTTP basic auth, as in ``http://user:password@host/...``) and an ``X-Api-Key``
header. It answers HEAD and (range) GET, as fsspec's HTTP filesystem needs, so shards can be read from it.

    with CredentialFileServer(folder, token="t", user="u", password="p", api_key="k") as server:
        url = server.url("shard-000000.tar")   # http://u:p@127.0.0.1:PORT/shard-000000.tar?token=t
"""

from __future__ import annotations

import base64
import http.server
import os
import threading
import urllib.parse
from pathlib import Path


class CredentialFileServer:
    """Serves the files of ``root``; a request without every credential is answered ``403`` (``refused`` counts them)."""

    def __init__(self, root: Path, *, token: str, user: str, password: str, api_key: str) -> None:
        self.root, self.token, self.api_key = Path(root), token, api_key
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.user, self.password = user, password
        self.served = 0  # requests answered with file bytes or headers
        self.refused = 0  # requests that lacked a credential
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="credential-file-server", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        """The URL of file ``name`` with every credential in it (user-info and query); the header goes in options."""
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}?token={self.token}"

    def __enter__(self) -> CredentialFileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def allowed(self, handler: http.server.BaseHTTPRequestHandler) -> bool:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        return (query.get("token") == [self.token] and handler.headers.get("Authorization") == self.basic
                and handler.headers.get("X-Api-Key") == self.api_key)


def _handler(server: CredentialFileServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            if not server.allowed(self):
                server.refused += 1
                self.send_error(403, "credentials required")
                return
            path = server.root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            if not path.is_file():
                self.send_error(404)
                return
            size = os.path.getsize(path)
            start, end = _range(self.headers.get("Range"), size)
            server.served += 1
            self.send_response(206 if (start, end) != (0, size - 1) else 200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if (start, end) != (0, size - 1):
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                with open(path, "rb") as f:
                    f.seek(start)
                    self.wfile.write(f.read(end - start + 1))

    return Handler


def _range(header: str | None, size: int) -> tuple[int, int]:
    """(first, last) byte of a ``Range: bytes=A-B`` header (the whole file without one)."""
    if not header or not header.startswith("bytes="):
        return 0, size - 1
    first, _, last = header[len("bytes="):].partition("-")
    start = int(first) if first else max(0, size - int(last))
    end = min(int(last), size - 1) if first and last else size - 1
    return start, end
