"""A fault-injecting TCP proxy on 127.0.0.1 for HTTP services (moto's S3 server): outages, resets, error bursts.

    with FaultProxy(host, port) as proxy:
        options = {..., "client_kwargs": {"endpoint_url": proxy.url}}
        proxy.outage(3.0)       # refuse (reset) new and existing connections for 3 s
        proxy.reset_next(2)     # the next 2 connections that carry a response are reset after 1024 bytes of it
        proxy.slowdown(5)       # the next 5 HTTP requests are answered "503 SlowDown" (S3's throttling)
        proxy.deny(1)           # the next request is answered "403 AccessDenied"
        proxy.reject_credentials(1)  # ... "403 InvalidAccessKeyId"
        proxy.conflict(2)       # the next 2 conditional PUTs are answered "409 ConditionalRequestConflict"
        proxy.strip_if_none_match = True  # conditional creates reach the server without If-None-Match (200 over a key)

Faults are real TCP events (RST via SO_LINGER 0) and real HTTP responses, so the client stacks under test (aiohttp,
botocore, s3fs) see exactly what a failing network or a throttling store gives them. Requests are told apart by
parsing HTTP/1.1 heads and ``Content-Length`` bodies on the way in (a chunked request body switches that connection
to a plain relay). Threaded and bounded: at most ``max_connections`` relays, one thread each; the proxy stops on
``stop()``, on leaving the ``with`` block, or by itself after ``lifetime_s``.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

_POLL_S = 0.05
_MAX_HEAD = 1 << 16


class FaultProxy:
    """A TCP proxy in front of ``target_host:target_port`` whose faults are switched on by method calls."""

    def __init__(self, target_host: str, target_port: int, max_connections: int = 64, lifetime_s: float = 600.0) -> None:
        self.target = (target_host, int(target_port))
        self.max_connections, self.deadline = max_connections, time.monotonic() + lifetime_s
        self.bytes_down = 0  # response bytes relayed to clients
        self.bytes_up = 0  # request bytes relayed to the server
        self.requests = 0  # HTTP requests seen (answered by the server or by an injected fault)
        self.connections = 0  # connections accepted
        self.injected = 0  # faults that took effect: requests answered with an error, connections reset mid-response
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outage_until = 0.0
        self._resets: list[int] = []  # after_bytes for each pending reset
        self._answers: list[tuple[int, str, str]] = []  # (status, S3 code, message) for the next requests
        self._conflicts = 0  # conditional PUTs still to answer with 409 ConditionalRequestConflict
        self.strip_if_none_match = False  # forward PUTs without If-None-Match, as an endpoint that ignores it behaves
        self._relays: set[_Relay] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the endpoint clients use instead of the target."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def outage(self, seconds: float) -> None:
        """Resets every open connection now and every new one for ``seconds``."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            relays = list(self._relays)
        for relay in relays:
            relay.kill()

    def in_outage(self) -> bool:
        """Whether an outage is under way."""
        return time.monotonic() < self._outage_until

    def reset_next(self, n: int, after_bytes: int = 1024) -> None:
        """The next ``n`` connections that carry response bytes are reset once ``after_bytes`` of them have passed."""
        with self._lock:
            self._resets.extend([after_bytes] * n)

    def slowdown(self, n: int) -> None:
        """Answers the next ``n`` HTTP requests with ``503 SlowDown`` (then closes their connection)."""
        self._answer(n, 503, "SlowDown", "Please reduce your request rate.")

    def deny(self, n: int) -> None:
        """Answers the next ``n`` HTTP requests with ``403 AccessDenied`` (then closes their connection)."""
        self._answer(n, 403, "AccessDenied", "Access Denied")

    def reject_credentials(self, n: int) -> None:
        """Answers the next ``n`` HTTP requests with ``403 InvalidAccessKeyId`` (S3's answer to an unknown access key)."""
        self._answer(n, 403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")

    def conflict(self, n: int) -> None:
        """Answers the next ``n`` conditional PUTs (``If-None-Match`` or ``If-Match``) with ``409
        ConditionalRequestConflict``, as AWS answers a conditional write that races another on the same key."""
        with self._lock:
            self._conflicts += n

    def clear(self) -> None:
        """Cancels pending faults, ends an outage and forwards conditional headers again."""
        with self._lock:
            self._outage_until, self._resets, self._answers, self._conflicts = 0.0, [], [], 0
            self.strip_if_none_match = False

    def reset_counters(self) -> None:
        """Sets the byte, request, connection and injected-fault counters to zero."""
        with self._lock:
            self.bytes_down = self.bytes_up = self.requests = self.connections = self.injected = 0

    def stop(self) -> None:
        """Closes the listener and every relay, and waits for their threads."""
        self._stop.set()
        with self._lock:
            relays = list(self._relays)
        for relay in relays:
            relay.kill()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for relay in relays:
            relay.join(timeout=5)
        self._listener.close()

    def _answer(self, n: int, status: int, code: str, message: str) -> None:
        with self._lock:
            self._answers.extend([(status, code, message)] * n)

    def _take_answer(self, head: bytes) -> tuple[int, str, str] | None:
        """The injected answer for the request just seen, if one is pending; counts the request."""
        with self._lock:
            self.requests += 1
            if self._conflicts and _conditional_put(head):
                self._conflicts -= 1
                self.injected += 1
                return 409, "ConditionalRequestConflict", "A conflicting operation occurred. Retry the request."
            if not self._answers:
                return None
            self.injected += 1
            return self._answers.pop(0)

    def _rewrite(self, head: bytes) -> bytes:
        """The request head to forward: without ``If-None-Match`` on a PUT while ``strip_if_none_match`` is on."""
        if not (self.strip_if_none_match and head.startswith(b"PUT ")):
            return head
        lines = head.split(b"\r\n")
        kept = [line for line in lines if not line.lower().startswith(b"if-none-match:")]
        if len(kept) < len(lines):
            with self._lock:
                self.injected += 1
        return b"\r\n".join(kept)

    def _take_reset(self) -> int | None:
        with self._lock:
            if not self._resets:
                return None
            self.injected += 1
            return self._resets.pop(0)

    def _count(self, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def _stopping(self) -> bool:
        return self._stop.is_set() or time.monotonic() > self.deadline

    def _accept_loop(self) -> None:
        while not self._stopping():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.connections += 1
                full = len(self._relays) >= self.max_connections
            if self.in_outage() or full:
                _reset(client)
                continue
            relay = _Relay(self, client)
            with self._lock:
                self._relays.add(relay)
            relay.start()
        self._stop.set()

    def _forget(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)


class _Relay(threading.Thread):
    """One client connection relayed to the target: requests parsed on the way in, response bytes counted on the way out."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        super().__init__(name="faultproxy-relay", daemon=True)
        self.proxy, self.client = proxy, client
        self.upstream: socket.socket | None = None
        self._killed = threading.Event()
        self._head = b""  # bytes of a request head not yet complete
        self._body_left = 0  # request body bytes still to forward
        self._raw = False  # a chunked request was seen: relay the rest without parsing
        self._down = 0  # response bytes relayed on this connection
        self._reset_at: int | None = None

    def kill(self) -> None:
        """Asks the relay to reset both sides (it does so within one poll)."""
        self._killed.set()

    def run(self) -> None:
        orderly = False
        try:
            self.upstream = socket.create_connection(self.proxy.target, timeout=5)
            orderly = self._loop()
        except OSError:
            pass
        finally:
            if orderly:  # the server ended the connection after its response (a 412 is sent before the body is read)
                _close(self.client)
            else:
                _reset(self.client)
            if self.upstream is not None:
                _reset(self.upstream)
            self.proxy._forget(self)

    def _loop(self) -> bool:
        """Relays until either side ends or a fault ends the connection; True when the server ended it after a whole
        response (closed, or reset for a request body it never read), to be passed on as an orderly close."""
        sockets = [self.client, self.upstream]
        while not (self._killed.is_set() or self.proxy._stopping() or self.proxy.in_outage()):
            readable, _, _ = select.select(sockets, [], [], _POLL_S)
            for sock in readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    return sock is self.upstream and self._down > 0 and self._reset_at is None
                if not data:
                    return sock is self.upstream and self._reset_at is None
                if sock is self.client and not self._from_client(data):
                    return False
                if sock is self.upstream and not self._from_upstream(data):
                    return False
        return False

    def _from_client(self, data: bytes) -> bool:
        """Forwards request bytes, answering a request itself when a fault is pending; False to end the connection."""
        while data:
            if self._raw or self._body_left:
                take = len(data) if self._raw else min(self._body_left, len(data))
                self._send_up(data[:take])
                self._body_left -= 0 if self._raw else take
                data = data[take:]
                continue
            self._head += data
            data = b""
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _MAX_HEAD:
                    self._raw, data, self._head = True, self._head, b""
                continue
            head, data, self._head = self._head[: end + 4], self._head[end + 4 :], b""
            answer = self.proxy._take_answer(head)
            if answer is not None:
                self.client.sendall(_error_response(head, *answer))
                return False
            self._body_left, self._raw = _body_length(head)
            self._send_up(self.proxy._rewrite(head))
        return True

    def _from_upstream(self, data: bytes) -> bool:
        """Relays response bytes, resetting the connection where a pending reset says; False to end it."""
        if self._reset_at is None:
            after = self.proxy._take_reset()
            if after is not None:
                self._reset_at = self._down + after
        if self._reset_at is not None and self._down + len(data) >= self._reset_at:
            part = data[: self._reset_at - self._down]
            self.client.sendall(part)
            self.proxy._count(down=len(part))
            return False
        self.client.sendall(data)
        self._down += len(data)
        self.proxy._count(down=len(data))
        return True

    def _send_up(self, data: bytes) -> None:
        self.upstream.sendall(data)
        self.proxy._count(up=len(data))


def _body_length(head: bytes) -> tuple[int, bool]:
    """(Content-Length, chunked) of a request head."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip() or 0)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


def _conditional_put(head: bytes) -> bool:
    """Whether a request head is a PUT carrying ``If-None-Match`` or ``If-Match``."""
    lines = head.lower().split(b"\r\n")
    return lines[0].startswith(b"put ") and any(line.startswith((b"if-none-match:", b"if-match:")) for line in lines[1:])


def _error_response(head: bytes, status: int, code: str, message: str) -> bytes:
    """An S3-style XML error response (no body for HEAD requests), closing the connection."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>faultproxy</RequestId></Error>").encode()
    reason = {503: "Slow Down", 403: "Forbidden", 409: "Conflict"}.get(status, "Error")
    lines = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
             "Connection: close\r\n\r\n").encode()
    return lines if head.startswith(b"HEAD ") else lines + body


def _close(sock: socket.socket) -> None:
    """Closes ``sock`` in order (FIN after every byte sent), as a server that ends a connection does."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a TCP reset (SO_LINGER 0), as a crashed or cut connection does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
