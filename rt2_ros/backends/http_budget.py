"""The HTTP stack of the HTTP backends (openvla_http, openai): one budget per call, not per socket read.

HTTP client libraries bound each socket operation separately: a read timeout of 1 s lets a server
that sends one byte every 0.9 s hold a call for as long as it likes (the status line, the headers
and the body may each drip). This module gives httpx2 — the client the ``openai`` package is built
on — a network layer that bounds the whole call instead:

* :func:`call_budget` opens a call's scope (a context variable, so concurrent calls on other
  worker threads keep their own): its deadline and the most bytes it may receive;
* the network backend plugged into httpcore2's connection pool (its documented extension point,
  ``network_backend``) sets every socket timeout — connect, TLS handshake, each read, each write
  — to the time the current call has left, raises the library's own timeout exceptions once it is
  spent, and counts the bytes received against the cap (:class:`ReplyTooLarge`, before the rest
  is read); httpcore closes a connection whose exchange failed, so an abandoned call's socket is
  closed at once, never reused;
* a response hook refuses a compressed body (we ask for ``identity``: the cap counts bytes on the
  wire, and a decompressed body could be a thousand times larger) and a declared
  ``Content-Length`` above the cap before any of the body is read.

Rejected: ``requests`` (urllib3 has no per-operation hook: its headers are read with a per-read
timeout only); running the call on a thread abandoned at the deadline (the thread and its socket
live on until the server lets go, and the next call queues behind it for a pooled connection).
Not bounded: the host name lookup (getaddrinfo has no timeout) — use an IP address or a name
from /etc/hosts for a robot's backend. Proxies from the environment (HTTP(S)_PROXY) are not used.
"""

from __future__ import annotations

import contextlib
import contextvars
import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore2
import httpx2

#: sent with every request: the reply's size on the wire is its decoded size
HEADERS = {"Accept-Encoding": "identity"}


class ReplyRejected(Exception):
    """The reply was refused before it was fully read (the connection is closed)."""


class ReplyTooLarge(ReplyRejected):
    """The reply exceeds the call's ``max_reply_bytes``; ``option`` names the key to raise."""

    def __init__(self, size: int, limit: int, option: str, *, declared: bool = False) -> None:
        how = f"declares Content-Length {size}" if declared else f"exceeded it after {size} bytes"
        super().__init__(f"reply larger than {option} = {limit} bytes ({how}; connection closed)")
        self.size, self.limit, self.option = size, limit, option


@dataclass
class _Call:
    deadline: float  # time.monotonic()
    max_bytes: int
    option: str
    received: int = 0


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("rt2_ros_http_call", default=None)


@contextlib.contextmanager
def call_budget(deadline: float, max_bytes: int, option: str) -> Iterator[None]:
    """Every socket operation of the HTTP requests made in this block on this thread ends by
    ``deadline`` (time.monotonic()) and all of them together receive at most ``max_bytes``
    (``option`` is the key named in :class:`ReplyTooLarge`)."""
    token = _CALL.set(_Call(deadline, max_bytes, option))
    try:
        yield
    finally:
        _CALL.reset(token)


def timeout(time_left_s: float, connect_s: float) -> httpx2.Timeout:
    """The httpx2 timeout of a request with ``time_left_s`` to go (connect at most ``connect_s``)."""
    return httpx2.Timeout(time_left_s, connect=min(connect_s, time_left_s), pool=time_left_s)


def _time_left(timeout_s: float | None, exc: type[Exception]) -> float | None:
    """``timeout_s`` cut to the current call's time left; ``exc`` once it is spent."""
    call = _CALL.get()
    if call is None:
        return timeout_s
    left = call.deadline - time.monotonic()
    if left <= 0:
        raise exc("the call's time budget is spent")
    return left if timeout_s is None else min(timeout_s, left)


@contextlib.contextmanager
def _mapped(timeout_exc: type[Exception], error_exc: type[Exception]) -> Iterator[None]:
    """Socket errors as httpcore2's exceptions (httpx2 maps those to its own, openai to its own)."""
    try:
        yield
    except TimeoutError as exc:  # socket.timeout, and ssl's "handshake operation timed out"
        raise timeout_exc(str(exc) or "timed out") from exc
    except OSError as exc:  # ssl.SSLError included
        raise error_exc(str(exc) or type(exc).__name__) from exc


class _Stream(httpcore2.NetworkStream):
    """A connected socket whose every operation ends by the current call's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore2.ReadTimeout, httpcore2.ReadError):
            self._sock.settimeout(_time_left(timeout, httpcore2.ReadTimeout))
            data = self._sock.recv(max_bytes)  # one read: SSLSocket.recv's timeout is total too
        call = _CALL.get()
        if call is not None:
            call.received += len(data)
            if call.received > call.max_bytes:
                raise ReplyTooLarge(call.received, call.max_bytes, call.option)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        with _mapped(httpcore2.WriteTimeout, httpcore2.WriteError):
            while view:  # a new timeout before each send: a slow reader cannot stretch the total
                self._sock.settimeout(_time_left(timeout, httpcore2.WriteTimeout))
                view = view[self._sock.send(view):]

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        with _mapped(httpcore2.ConnectTimeout, httpcore2.ConnectError):
            try:
                # the handshake's timeout is total (CPython's _ssl keeps one deadline across its reads)
                self._sock.settimeout(_time_left(timeout, httpcore2.ConnectTimeout))
                sock = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
            except BaseException:
                self._sock.close()
                raise
        return _Stream(sock)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":  # httpcore asks it for the ALPN protocol; SSLSocket answers that
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":  # an idle pooled connection that is readable was closed or reset
            return _is_readable(self._sock)
        return None


def _is_readable(sock: socket.socket) -> bool:
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


class _Backend(httpcore2.NetworkBackend):
    """Connects with the current call's time left (each address of the host in turn)."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        last: OSError | None = None
        with _mapped(httpcore2.ConnectTimeout, httpcore2.ConnectError):
            for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                sock = socket.socket(family, kind, proto)
                try:
                    for option in socket_options or ():
                        sock.setsockopt(*option)
                    if local_address:
                        sock.bind((local_address, 0))
                    sock.settimeout(_time_left(timeout, httpcore2.ConnectTimeout))
                    sock.connect(address)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError as exc:
                    sock.close()
                    last = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                return _Stream(sock)
            raise last or OSError(f"no address for {host!r}")

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        raise httpcore2.ConnectError("unix sockets are not supported by the rt2_ros HTTP backends")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Transport(httpx2.HTTPTransport):
    """httpx2's transport with the budgeted network backend in its connection pool.

    httpx2.HTTPTransport takes no ``network_backend``; its pool is replaced by an identical one
    that has it (``_pool`` is the transport's only state; the pinned httpx2 is covered by the budget
    tests, which fail if a release stops using it).
    """

    def __init__(self, verify: ssl.SSLContext | bool, max_connections: int) -> None:
        # idle connections are dropped before uvicorn's 5 s keep-alive ends them under a request
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                               keepalive_expiry=2.0)
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=_Backend())


def _check_headers(response: httpx2.Response) -> None:
    """Response hook (runs before the body is read): refuse what the byte cap cannot bound."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ReplyRejected(f"reply is compressed ({encoding[:40]}) although the request asked for identity")
    call = _CALL.get()
    length = response.headers.get("content-length", "").strip()
    if call is not None and length.isdigit() and int(length) > call.max_bytes:
        raise ReplyTooLarge(int(length), call.max_bytes, call.option, declared=True)


def client_options(verify: ssl.SSLContext | bool = True, max_connections: int = 4) -> dict[str, Any]:
    """Keyword arguments of an ``httpx2.Client`` (or ``openai.DefaultHttpxClient``) using this stack.

    ``max_connections``: requests beyond it wait for a free connection (within their budget).
    """
    return {"transport": _Transport(verify, max_connections), "headers": dict(HEADERS), "trust_env": False,
            "event_hooks": {"request": [], "response": [_check_headers]}}


__all__ = ["HEADERS", "ReplyRejected", "ReplyTooLarge", "call_budget", "client_options", "timeout"]
