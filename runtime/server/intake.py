"""The model server's intake: accept connections and collect whole requests before a thread sees them.

Slowloris (issue #20, defect 4): with a thread per connection and only a per-read socket
timeout, 64 connections that each send one byte every 10 s held every thread and the server
answered nobody. Here one thread runs a selector (epoll) over the listening socket and every
connection still sending its request; such a connection costs a file descriptor and its
buffer, never a thread, and it has to deliver

- its request line and headers within ``header_timeout_s`` of being accepted, in total: a byte
  every second does not extend it (a per-read timeout would). Past it: 408, closed;
- at most :data:`MAX_HEADER_BYTES` of them (431);
- no more, all pending connections together, than the buffer budget (``max_buffered_bytes``,
  at least :data:`MIN_BUFFERED_BYTES`): past it the oldest connection still sending a body is
  closed (503), so slow uploads cannot fill the memory a byte at a time;
- for a request the server will read a body for (a POST to a generation endpoint whose Host,
  API key, type and ``Content-Length`` pass), the body within ``body_timeout_s`` of the headers.

Only then does :class:`~edgepack.runtime.server.http.HTTPServer` get an :class:`Arrival` (the
socket and the bytes read) and start a handler thread, which answers without waiting on the
client. A request that will be refused (wrong key, body over the limit, unknown path) is handed
over as soon as its headers are complete, so the key is checked before a byte of the body is
awaited and the 401/413/404 comes at once.

Limits on connections still sending: at most ``max_pending_per_client`` per client address and
``max_pending`` in all (lowered to fit the process's file-descriptor limit). A new connection
past either closes the *oldest* pending one (that client's, or anyone's) with 503: idle or
dripping connections can be displaced, a request that arrives whole cannot. Requests being
handled are capped separately (``max_connections``, 503 at once; see ``server_http``).

Keep-alive: after a complete reply the handler may give the socket back (:meth:`Intake.keep`);
it waits here, like a new connection, for its next request: idle at most ``keepalive_idle_s``
(then closed quietly, no 408), and once the next request's first byte comes, its headers and
body under the same deadlines as above. An idle kept connection displaced by the pending caps
is closed quietly too (the client opens a new one).

After an early error reply the handler gives the socket back (:meth:`Intake.drain`): the intake
discards the unread body -- bounded by :data:`DRAIN_LIMIT_BYTES`, :data:`DRAIN_SECONDS` and
:data:`DRAIN_IDLE_S` -- so the client reads the reply instead of a reset, and no thread waits
on a client that keeps sending.
"""

from __future__ import annotations

import errno
import heapq
import io
import itertools
import json
import os
import resource
import selectors
import socket
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http.client import parse_headers
from typing import Any

from edgepack.runtime.server.api import error_body
from edgepack.runtime.server.metrics import Metrics

MAX_HEADER_BYTES = 64 * 1024
MIN_BUFFERED_BYTES = 64 * 1024 * 1024
RECV_BYTES = 64 * 1024
ACCEPT_BURST = 64  # connections accepted per wake-up, so reading keeps its turn under a flood
FD_RESERVE = 64  # descriptors kept for the model, the handlers' sockets and the process itself
# An unread body after an early error reply is read and discarded until the client has sent
# it all, closes, or pauses DRAIN_IDLE_S, but at most DRAIN_LIMIT_BYTES or DRAIN_SECONDS: a
# bounded cost per connection that covers a 64 MiB upload at ~15 MB/s (issue #9).
DRAIN_LIMIT_BYTES = 256 * 1024 * 1024
DRAIN_SECONDS = 5.0
DRAIN_IDLE_S = 1.0

_HEAD, _BODY, _DRAIN = "head", "body", "drain"


@dataclass(frozen=True)
class IntakeLimits:
    """Deadlines and caps for connections that have not delivered their request yet."""

    header_timeout_s: float
    body_timeout_s: float
    max_pending: int
    max_pending_per_client: int
    max_buffered_bytes: int = MIN_BUFFERED_BYTES
    keepalive_idle_s: float = 5.0
    """How long a kept-alive connection may wait for its next request (httpx keeps 5 s)."""


class Arrival:
    """A request as far as the intake waited for it: the socket (blocking again), the peer's
    address, the bytes read (request line, headers and any collected body) and where the
    headers end. The handler sets ``drain_left`` to the body bytes it left unread."""

    def __init__(self, sock: socket.socket, address: Any, data: bytes, head_end: int) -> None:
        self.sock, self.address, self.data, self.head_end = sock, address, data, head_end
        self.drain_left = 0
        self.keep = False  # the handler replied in full and the connection stays open


class PrefixedReader(io.RawIOBase):
    """A raw stream that returns ``prefix`` first, then reads ``sock``: the handler's ``rfile``."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix, self._sock = memoryview(prefix), sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)


class SocketWriter(io.BufferedIOBase):
    """The handler's ``wfile``: every write is a ``sendall`` (nothing buffered, nothing to flush)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


def canned_reply(status: int, phrase: str, message: str, code: str, retry: bool = False) -> bytes:
    """A complete small JSON error response, sendable in one non-blocking ``send``."""
    body = json.dumps(error_body(message, "server_error" if status >= 500 else "invalid_request_error",
                                 code=code)).encode()
    head = (f"HTTP/1.0 {status} {phrase}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + ("Retry-After: 1\r\n" if retry else "") + f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def send_and_close(sock: socket.socket, reply: bytes = b"") -> None:
    """Best effort, never blocking: the reply fits an empty socket buffer, or is lost."""
    try:
        sock.setblocking(False)
        if reply:
            sock.send(reply)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def head_end(data: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line that ends the headers (searched from ``start``, so a
    header dripped a byte at a time is scanned once, not once per byte); -1 when not there yet."""
    ends = [i + 4 for i in (data.find(b"\r\n\r\n", start),) if i >= 0]
    ends += [i + 2 for i in (data.find(b"\n\n", start),) if i >= 0]
    return min(ends) if ends else -1


def parse_head(data: bytes) -> tuple[str, str, Message] | None:
    """Method, target and headers of a request head; None when it does not parse (the
    handler's own parser then gives the precise error)."""
    line, _, rest = data.partition(b"\n")
    words = line.decode("iso-8859-1").split()
    if len(words) != 3:
        return None
    try:
        return words[0], words[1], parse_headers(io.BytesIO(rest))
    except Exception:  # noqa: BLE001 - http.client raises several kinds for a bad head
        return None


def fd_room(max_connections: int) -> int:
    """How many pending connections the file-descriptor limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16, soft - max_connections - FD_RESERVE)


class _Pending:
    __slots__ = ("sock", "address", "client", "seq", "data", "phase", "need", "head_end", "deadline",
                 "heap_at", "drain_end", "left", "idle")

    def __init__(self, sock: socket.socket, address: Any, seq: int, deadline: float) -> None:
        self.sock, self.address, self.seq = sock, address, seq
        self.client = str(address[0]) if isinstance(address, tuple) else str(address)
        self.data = bytearray()
        self.phase, self.need, self.head_end = _HEAD, 0, -1
        self.deadline = self.heap_at = deadline
        self.drain_end = deadline
        self.left = 0
        self.idle = False  # a kept-alive connection that has not started its next request


class Intake:
    """The selector loop; see the module docstring. ``serve`` runs it (one thread), ``stop``
    ends it and closes every pending connection."""

    def __init__(self, listener: socket.socket, limits: IntakeLimits, metrics: Metrics,
                 body_to_collect: Callable[[str, str, Message], int],
                 dispatch: Callable[[Arrival], None], max_connections: int) -> None:
        self._listener = listener
        self.limits = limits
        self.max_pending = min(limits.max_pending, fd_room(max_connections))
        self._metrics = metrics
        self._body_to_collect = body_to_collect
        self._dispatch = dispatch
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending: OrderedDict[int, _Pending] = OrderedDict()  # oldest first
        self._by_client: dict[str, OrderedDict[int, _Pending]] = {}
        self._heap: list[tuple[float, int]] = []  # (deadline, seq); stale entries are skipped
        self._buffered = 0  # bytes held in pending connections' buffers
        self.max_buffered = max(limits.max_buffered_bytes, MIN_BUFFERED_BYTES)
        self._seq = itertools.count()
        self._returned: deque[Arrival] = deque()  # sockets handed back to drain
        self._lock = threading.Lock()
        self._stopping = False
        self._running = False
        self._stopped = threading.Event()
        self._listen_paused_until = 0.0

    # --- lifecycle ---------------------------------------------------------------------
    def serve(self, poll_interval: float = 0.5) -> None:
        """Accept and collect until :meth:`stop`."""
        self._running = True
        self._stopped.clear()
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                now = time.monotonic()
                timeout = poll_interval
                if self._heap:
                    timeout = max(0.0, min(timeout, self._heap[0][0] - now))
                if self._listen_paused_until:
                    timeout = max(0.0, min(timeout, self._listen_paused_until - now))
                for key, _ in self._sel.select(timeout):
                    try:
                        if key.data == "listener":
                            self._accept()
                        elif key.data == "wake":
                            self._take_returned()
                        elif key.data.seq in self._pending:
                            self._readable(key.data)
                    except Exception:  # noqa: BLE001 - this thread is every client's way in: it must live
                        if os.environ.get("EDGEPACK_DEBUG") == "1":
                            traceback.print_exc()
                        if isinstance(key.data, _Pending) and key.data.seq in self._pending:
                            self._forget(key.data)
                            key.data.sock.close()
                now = time.monotonic()
                self._expire(now)
                if self._listen_paused_until and now >= self._listen_paused_until:
                    self._listen_paused_until = 0.0
                    self._sel.register(self._listener, selectors.EVENT_READ, "listener")
        finally:
            for pending in list(self._pending.values()):
                self._forget(pending)
                pending.sock.close()
            self._take_returned()
            self._sel.close()
            self._running = False
            self._stopped.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End :meth:`serve` (from another thread) and wait for it."""
        self._stopping = True
        self._wake()
        if self._running:
            self._stopped.wait(timeout_s)

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    # --- connections coming and going ----------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free the oldest pending one, or pause accepting
                    # briefly (the kernel's backlog holds the rest) instead of spinning.
                    if self._pending:
                        self._evict(next(iter(self._pending.values())))
                    else:
                        self._sel.unregister(self._listener)
                        self._listen_paused_until = time.monotonic() + 0.1
                        return
                continue  # ECONNABORTED and the like: that connection is gone already
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        pending = _Pending(sock, address, next(self._seq), time.monotonic() + self.limits.header_timeout_s)
        mine = self._by_client.get(pending.client)
        if mine is not None and len(mine) >= self.limits.max_pending_per_client:
            self._evict(next(iter(mine.values())))
        if len(self._pending) >= self.max_pending:
            self._evict(next(iter(self._pending.values())))
        self._track(pending)

    def _track(self, pending: _Pending) -> None:
        self._pending[pending.seq] = pending
        self._by_client.setdefault(pending.client, OrderedDict())[pending.seq] = pending
        heapq.heappush(self._heap, (pending.heap_at, pending.seq))
        self._sel.register(pending.sock, selectors.EVENT_READ, pending)
        self._metrics.gauges(pending=len(self._pending))

    def _forget(self, pending: _Pending) -> None:
        if self._pending.pop(pending.seq, None) is not None:
            self._buffered -= len(pending.data)
        mine = self._by_client.get(pending.client)
        if mine is not None:
            mine.pop(pending.seq, None)
            if not mine:
                del self._by_client[pending.client]
        try:
            self._sel.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        self._metrics.gauges(pending=len(self._pending))

    def _refuse(self, pending: _Pending, status: int, reason: str, reply: bytes) -> None:
        self._forget(pending)
        if pending.phase == _DRAIN or pending.idle:  # its reply went out already / it asked nothing
            pending.sock.close()
            return
        self._metrics.reject(reason)
        self._metrics.request("other", status)
        send_and_close(pending.sock, reply)

    def _evict(self, pending: _Pending) -> None:
        self._refuse(pending, 503, "too_many_connections", canned_reply(
            503, "Service Unavailable", "too many connections are still sending their request; this, the "
            "oldest, was closed to make room. Send the request at once after connecting", "too_many_connections",
            retry=True))

    # --- reading -----------------------------------------------------------------------
    def _readable(self, pending: _Pending) -> None:
        want = min(RECV_BYTES, pending.left) if pending.phase == _DRAIN else RECV_BYTES
        try:
            chunk = pending.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away (or reset) before it finished
            self._forget(pending)
            pending.sock.close()
            return
        if pending.phase == _DRAIN:
            pending.left -= len(chunk)
            pending.deadline = min(pending.drain_end, time.monotonic() + DRAIN_IDLE_S)
            if pending.left <= 0:
                self._forget(pending)
                pending.sock.close()
            return
        if pending.idle:  # the next request on a kept-alive connection: a new connection's deadline
            pending.idle = False
            self._set_deadline(pending, time.monotonic() + self.limits.header_timeout_s)
        scanned = max(0, len(pending.data) - 3)
        pending.data += chunk
        self._buffered += len(chunk)
        if self._buffered > self.max_buffered and not self._shed(pending):
            return
        if pending.phase == _HEAD:
            end = head_end(pending.data, scanned)
            if end < 0:
                if len(pending.data) > MAX_HEADER_BYTES:
                    self._refuse(pending, 431, "headers_too_large", canned_reply(
                        431, "Request Header Fields Too Large",
                        f"the request line and headers exceed {MAX_HEADER_BYTES} bytes", "headers_too_large"))
                return
            pending.head_end = end
            head = parse_head(bytes(pending.data[:end]))
            length = self._body_to_collect(*head) if head is not None else 0
            if length and len(pending.data) < end + length:
                pending.phase, pending.need = _BODY, end + length
                self._set_deadline(pending, time.monotonic() + self.limits.body_timeout_s)
                return
        elif len(pending.data) < pending.need:
            return
        self._forget(pending)
        pending.sock.setblocking(True)
        self._dispatch(Arrival(pending.sock, pending.address, bytes(pending.data), pending.head_end))

    def _shed(self, reading: _Pending) -> bool:
        """Over the buffer budget: close the oldest connections still sending a body until it
        fits again; False when ``reading`` itself had to go."""
        for pending in [p for p in self._pending.values() if p.phase == _BODY]:
            if self._buffered <= self.max_buffered:
                break
            self._evict(pending)
        if self._buffered > self.max_buffered and reading.seq in self._pending:
            self._evict(reading)
        return reading.seq in self._pending

    def _set_deadline(self, pending: _Pending, deadline: float) -> None:
        pending.deadline = deadline
        if deadline < pending.heap_at:  # a later deadline is picked up lazily in _expire
            pending.heap_at = deadline
            heapq.heappush(self._heap, (deadline, pending.seq))

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            at, seq = heapq.heappop(self._heap)
            pending = self._pending.get(seq)
            if pending is None or at != pending.heap_at:
                continue  # gone, or superseded by an earlier entry
            if pending.deadline > now:  # moved later since it was queued
                pending.heap_at = pending.deadline
                heapq.heappush(self._heap, (pending.deadline, seq))
                continue
            what = {_HEAD: f"the request line and headers did not arrive within "
                           f"{self.limits.header_timeout_s:g} s of connecting",
                    _BODY: f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                           "of its headers",
                    _DRAIN: ""}[pending.phase]
            self._refuse(pending, 408, "request_timeout",
                         canned_reply(408, "Request Timeout", what, "request_timeout"))

    # --- bodies left unread ------------------------------------------------------------------
    def drain(self, arrival: Arrival) -> None:
        """Take back a replied-to connection and discard its unread body (any thread)."""
        try:
            arrival.sock.shutdown(socket.SHUT_WR)  # the reply is complete: the client sees EOF now
        except OSError:
            arrival.sock.close()
            return
        self._take_back(arrival)

    def keep(self, arrival: Arrival) -> None:
        """Take back a connection whose reply is complete, to wait for its next request (any thread)."""
        self._take_back(arrival)

    def _take_back(self, arrival: Arrival) -> None:
        with self._lock:
            if self._stopping:
                arrival.sock.close()
                return
            self._returned.append(arrival)
        self._wake()

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            returned, self._returned = list(self._returned), deque()
        now = time.monotonic()
        for arrival in returned:
            if self._stopping:
                arrival.sock.close()
                continue
            arrival.sock.setblocking(False)
            if arrival.keep:
                pending = _Pending(arrival.sock, arrival.address, next(self._seq), now + self.limits.keepalive_idle_s)
                pending.idle = True
            else:
                pending = _Pending(arrival.sock, arrival.address, next(self._seq), now + DRAIN_IDLE_S)
                pending.phase, pending.left = _DRAIN, min(arrival.drain_left, DRAIN_LIMIT_BYTES)
                pending.drain_end = now + DRAIN_SECONDS
            if len(self._pending) >= self.max_pending:
                self._evict(next(iter(self._pending.values())))
            self._track(pending)
