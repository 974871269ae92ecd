"""One HTTP exchange with a teacher endpoint under a total deadline and a size cap.

urllib (and http.client below it) bounds each socket operation by its ``timeout``: a server
that sends a byte just before every timeout keeps a request alive forever (issue #20: 150 s
at ``--timeout 5``, and on without end). :class:`Deadline` bounds the whole exchange —
connect, TLS handshake, proxy tunnel, request, headers, body — however the bytes arrive, and
:func:`read_body` refuses a body over a cap as soon as it is declared or sent. Used by
``distill/endpoint.py`` (endpoint teachers, one :class:`Deadline` per try) and
``runtime/server/fallback.py`` (the server's fallback teacher)::

    deadline = Deadline(timeout_s)
    with deadline:
        with deadline_opener(deadline, extra_handler).open(request, timeout=timeout_s) as resp:
            raw = read_body(resp, deadline, cap)

Staying on urllib keeps what it does for both callers: proxies from the environment, HTTPS
with the default certificate checks, ``HTTPError`` for statuses.
"""

from __future__ import annotations

import functools
import http.client
import socket
import threading
import time
import urllib.request
from typing import Any


class DeadlinePassed(TimeoutError):
    """The exchange ran past its deadline (whichever read or write noticed it)."""


class BodyTooLarge(ValueError):
    """The answer declared or sent more bytes than the cap (``detail`` says which)."""

    def __init__(self, cap: int, detail: str) -> None:
        super().__init__(detail)
        self.cap, self.detail = cap, detail


class Deadline:
    """One exchange's total deadline, enforced however the bytes arrive.

    A timer shuts the connection's socket down at the deadline: a read blocked in http.client
    or ssl returns at once (EOF, an SSL error or IncompleteRead), and :attr:`expired` says
    why. The socket is watched through a duplicate descriptor of our own: ``shutdown`` acts on
    the connection whichever descriptor names it (the TLS layer's included), and ours cannot
    be closed and reused by another connection under us. :meth:`remaining` also bounds the
    connect and each socket timeout, so a server that sends nothing is cut without the timer.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._done = False
        self._watched: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        """Seconds left; DeadlinePassed when none are."""
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise DeadlinePassed(f"deadline of {self.seconds:g} s passed")
        return left

    def watch(self, sock: socket.socket) -> socket.socket:
        """Put ``sock`` under the deadline (returns it)."""
        dup = sock.dup()
        with self._lock:
            if not self._done and not self.expired:
                self._watched.append(dup)
                return sock
        dup.close()
        sock.close()
        raise DeadlinePassed(f"deadline of {self.seconds:g} s passed")

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for s in self._watched:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the peer closed it already

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:  # from here on _expire touches nothing
            self._done = True
            for s in self._watched:
                s.close()
            self._watched.clear()


class _DeadlineConnection:
    """Mixin for http.client connections: connect within the deadline, then watch the socket.

    ``_create_connection`` is the hook http.client calls for the TCP socket (it is an instance
    attribute "to allow unit tests to replace it"), before a proxy tunnel or TLS is set up on
    that socket, so everything after the TCP connect is under the watch.
    """

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        create = self._create_connection  # type: ignore[has-type]

        def connect(address: tuple[str, int], timeout: Any = None, source: Any = None) -> socket.socket:
            return deadline.watch(create(address, deadline.remaining(), source))

        self._create_connection = connect


class _HTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        # context None: http.client's default context (certificates and host name checked)
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req,
                            context=self._context)


def deadline_opener(deadline: Deadline, *handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """A urllib opener whose HTTP and HTTPS connections live under ``deadline`` (plus ``handlers``)."""
    return urllib.request.build_opener(*handlers, _HTTPHandler(deadline), _HTTPSHandler(deadline))


def read_body(resp: Any, deadline: Deadline, cap: int) -> bytes:
    """The response body; BodyTooLarge past ``cap`` bytes (declared or sent), DeadlinePassed past the deadline."""
    declared = resp.headers.get("Content-Length") if resp.headers else None
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise BodyTooLarge(cap, f"it declares {int(declared):,} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = resp.read(1 << 16)
        if deadline.expired:  # a body read until close ends "normally" when the socket is shut down
            raise DeadlinePassed(f"deadline of {deadline.seconds:g} s passed")
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(cap, "it sent more")
        chunks.append(chunk)
