"""The one interface every VLA backend implements.

A backend is synchronous and blocking by design: the policy node calls :meth:`Backend.infer`
from a worker thread (never the ROS executor), with a timeout, so each backend stays a plain
client that is easy to test without ROS.

The budget rule (DESIGN "Budgets"): ``timeout_s`` is total for the whole call — connect, send,
receive and decode — whatever the server does (drips a byte at a time, accepts and stalls,
half-closes, resets, answers gigabytes). A network backend returns or raises within
``timeout_s + CALL_MARGIN_S``; test/test_backend_budgets.py measures it against a fault server.
Per-socket-read timeouts, which every client library offers, are not enough: a server that sends
one byte per read timeout holds such a call forever. Each client therefore turns its one deadline
into what its library can enforce (socket timeouts set to the time left before every read and
write, a websocket receive with the time left, a gRPC deadline) and, where a library call can
block past that (a websocket send into a full buffer, a gRPC write to a server that stopped
reading), shuts the socket down at the deadline (:func:`abort_at`) or leaves the call behind,
cancelled: an abandoned call is closed, never queued behind.

Outside data is bounded too: every network backend has a ``max_reply_bytes`` option
(:func:`max_reply_bytes_spec`) sized to an answer, and decodes the reply inside ``infer`` (on the
caller's worker thread), so the node's executor only ever sees small, parsed replies.
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.params import ConfigError, ParamSpec, resolve
from rt2_ros.text import clean_text

if TYPE_CHECKING:
    import numpy as np

    from rt2_ros.tokens import ActionTokenizer


class BackendError(RuntimeError):
    """The backend failed to answer (unreachable, server error, malformed reply)."""


class BackendTimeout(BackendError):
    """The backend did not answer within the request timeout."""


class BackendConfigError(ValueError):
    """Invalid backend options; the message names the offending key (e.g. ``backend.url``)."""


class Backend(abc.ABC):
    """Observation in, model answer out."""

    #: short name used in messages and logs, e.g. "embedded", "grpc"
    name: str = "backend"

    #: the options this backend accepts under ``backend.<name>.*`` in the params YAML
    OPTIONS: tuple[ParamSpec, ...] = ()

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        """``options``: this backend's validated option dict (keys without the prefix);
        ``tokenizer``: the configured action tokenizer (for prompts, grammars, id maps)."""
        self.options = options
        self.tokenizer = tokenizer

    @classmethod  # noqa: B027 - optional hook
    def check_options(cls, options: dict) -> None:
        """The start-up checks that need no file, server or model (validated ``options``, keys without
        the prefix); ``rt2-bringup --check`` runs them too. BackendConfigError names the key."""

    @abc.abstractmethod
    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        """Answer one observation within ``timeout_s`` or raise BackendError/BackendTimeout."""

    def infer_batch(self, observations: Sequence[Observation], timeout_s: float) -> list[BackendReply | BackendError]:
        """Answer several observations within ``timeout_s`` in total (a batching server calls this).

        One result per observation, in order: its reply, or the BackendError that observation alone
        raised (one bad observation does not fail the others). This default is a loop over
        :meth:`infer` under one deadline; a backend that can run one batched forward pass overrides it.
        """
        deadline = time.monotonic() + timeout_s
        results: list[BackendReply | BackendError] = []
        for observation in observations:
            try:
                results.append(self.infer(observation, time_left(deadline)))
            except BackendError as exc:
                results.append(exc)
        return results

    def reset(self) -> None:  # noqa: B027 - optional hook
        """A new episode starts (new instruction); stateful backends clear their state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets, channels, models."""


# -- helpers shared by the backend clients ---------------------------------------------------------
_log = logging.getLogger(__name__)


def describe_exception(exc: BaseException) -> str:
    """A short cause such as 'Connection refused' instead of a nested urllib3/httpx essay.

    The text can come from the peer (an error detail, a URL): it is cleaned (valid UTF-8, no
    control characters, credentials masked, bounded) like every other :func:`snippet`.
    """
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Connection reset", "certificate verify failed"):
        if marker in text:
            return marker
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return snippet(first)


def snippet(text: object, limit: int = 200) -> str:
    """Outside text (a server's error body, a reply that failed to parse) as one safe, short line
    for an exception message or a log line: see :func:`rt2_ros.text.clean_text`."""
    return " ".join(clean_text(text, limit).split())


# -- budgets ---------------------------------------------------------------------------------------

#: A network backend's infer() returns or raises at most this long after its ``timeout_s`` (raising
#: the error, closing the socket, a thread switch). Measured in test/test_backend_budgets.py; the
#: policy node abandons a request only later (``timeout_s`` + 0.5 s), so it never has to.
CALL_MARGIN_S = 0.25

#: Default of every network backend's ``max_reply_bytes``: an answer (8 numbers, a 7-float action,
#: a chunk of 50 x 32 floats, server metadata) needs a few kB; 1 MiB leaves room for long chunks.
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024


def max_reply_bytes_spec(prefix: str, what: str, high: int = 256 * 1024 * 1024) -> ParamSpec:
    """The ``max_reply_bytes`` option of a network backend (``what``: what the cap counts)."""
    return ParamSpec(prefix + "max_reply_bytes", "int", DEFAULT_MAX_REPLY_BYTES,
                     f"Largest reply accepted ({what}); a larger one fails the request (BackendError naming this "
                     f"key) before the rest of it is read. An answer needs a few kB.",
                     "bytes", low=1024, high=high)


def allow_plaintext_spec(prefix: str) -> ParamSpec:
    """The ``allow_plaintext`` option of a network backend (see transport_security.check_plaintext)."""
    return ParamSpec(prefix + "allow_plaintext", "bool", False,
                     "Allow an unencrypted connection to another machine. Without it such a server is refused at "
                     "start-up: anyone on the network path could read the camera images and answer with actions. "
                     "Set it only when the path is protected otherwise (SSH tunnel, TLS-terminating proxy, an "
                     "encrypted VPN, a dedicated cable); loopback needs no TLS.")


def time_left(deadline: float) -> float:
    """Seconds until ``deadline`` (a time.monotonic() value); may be <= 0."""
    return deadline - time.monotonic()


class _Watchdog:
    """One daemon thread that runs each armed ``abort`` at its deadline unless disarmed first.

    Why not a ``threading.Timer`` per call: starting a thread waits until the new thread runs, which
    cost ~0.3 ms per openpi request on a loaded 2-core machine (profiled by bench/transport.py), as
    much as the whole exchange. Arming here is a heap push under a lock; the thread is woken only when
    the new deadline is earlier than the one it sleeps towards.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._ids = itertools.count()
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, fire: Callable[[], None]) -> int:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rt2-abort-watchdog", daemon=True)
                self._thread.start()
            ident = next(self._ids)
            heapq.heappush(self._heap, (deadline, ident, fire))
            self._live.add(ident)
            if deadline < self._wake_at:
                self._cond.notify()
            return ident

    def disarm(self, ident: int) -> None:
        with self._cond:
            self._live.discard(ident)  # its heap entry is dropped when it comes up

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                now = time.monotonic()
                if not self._heap or self._heap[0][0] > now:
                    self._wake_at = self._heap[0][0] if self._heap else float("inf")
                    self._cond.wait(None if not self._heap else self._wake_at - now)
                    self._wake_at = float("inf")
                    continue
                _, ident, fire = heapq.heappop(self._heap)
                self._live.discard(ident)
            fire()  # outside the lock: abort() may block briefly (socket shutdown)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def abort_at(deadline: float, abort: Callable[[], None]) -> Iterator[threading.Event]:
    """Run the block; if it is still running at ``deadline``, call ``abort()`` from a watchdog thread.

    For library calls that can block without a timeout of their own (a websocket send into a
    full socket buffer): ``abort`` shuts the socket down, which makes the blocked call raise in
    its own thread. The yielded event is set once ``abort`` ran, so the caller can tell a
    timeout from a peer's error. ``abort`` must be safe to call from another thread.
    """
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        with contextlib.suppress(Exception):
            abort()

    ident = _WATCHDOG.arm(deadline, fire)
    try:
        yield fired
    finally:
        _WATCHDOG.disarm(ident)


def resolve_options(specs: tuple[ParamSpec, ...], prefix: str, options: dict) -> dict:
    """Validate ``options`` (keys without ``prefix``), fill defaults; errors name the full key.

    create_backend() validates too; repeating it here makes direct construction (tests,
    notebooks) just as safe and fills defaults for keys the caller left out.
    """
    try:
        resolved = resolve(specs, {prefix + k: v for k, v in options.items()})
    except ConfigError as exc:
        raise BackendConfigError(str(exc)) from None
    return {k[len(prefix):]: v for k, v in resolved.items()}


def load_secret(env_name: str, file_path: str, prefix: str) -> str:
    """The secret named by an env var or stored in a file ('' when neither is set); never logged."""
    if env_name and file_path:
        raise BackendConfigError(f"{prefix}api_key_env and {prefix}api_key_file are both set; choose one")
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise BackendConfigError(f"{prefix}api_key_env: environment variable {env_name} is not set or empty")
        return value
    if file_path:
        try:
            with open(file_path, encoding="utf-8") as f:
                value = f.read().strip()
            mode = os.stat(file_path).st_mode
        except OSError as exc:
            raise BackendConfigError(f"{prefix}api_key_file: cannot read {file_path!r}: {exc.strerror}") from None
        if not value:
            raise BackendConfigError(f"{prefix}api_key_file: {file_path!r} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            _log.warning("%sapi_key_file %s is readable by other users; chmod 600 it", prefix, file_path)
        return value
    return ""


def credential_specs(prefix: str, *, key_use: str, scheme: str, secret: str = "API key") -> tuple[ParamSpec, ...]:
    """The ``api_key_env`` / ``api_key_file`` / ``ca_cert_file`` options of a network backend.

    Declared once here so the three clients cannot drift apart in names, types or defaults;
    ``key_use`` says what the secret is and how it is sent (e.g. "the API key sent as
    'Authorization: Api-Key KEY'"), ``scheme`` which TLS URL scheme the CA file verifies ("https"
    or "wss"), ``secret`` the short noun for the key ("API key", "bearer token"). Read them with
    :func:`load_secret`.
    """
    return (
        ParamSpec(prefix + "api_key_env", "string", "",
                  f"Name of an environment variable holding {key_use}; empty with an empty api_key_file = "
                  "no key (a server without auth)."),
        ParamSpec(prefix + "api_key_file", "string", "",
                  f"Path of a file holding that {secret} (alternative to api_key_env; chmod 600)."),
        ParamSpec(prefix + "ca_cert_file", "string", "",
                  f"PEM CA bundle to verify {scheme}:// servers with a private CA; empty = system CAs. Parsed at "
                  "start-up."),
        allow_plaintext_spec(prefix),
    )


# -- cameras ---------------------------------------------------------------------------------------

def check_camera_names(names: Sequence[str], key: str) -> list[str]:
    """A camera-name list option, checked at configuration: no empty and no repeated names.

    The backend cannot check the names against the policy node's ``cameras.names`` (it never sees
    them); a name that is not configured there shows up as a missing camera on the first request.
    """
    names = list(names)
    for name in names:
        if not name:
            raise BackendConfigError(f"{key}: camera names must not be empty, got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BackendConfigError(f"{key}: camera {repeated[0]!r} is listed twice in {names!r}")
    return names


def camera_frames(observation: Observation, cameras: Sequence[str], key: str, backend: str
                  ) -> list[tuple[str, np.ndarray]]:
    """``(name, frame)`` of each camera named in ``cameras``, in that order; ``[]`` = the primary only.

    A named camera missing from the observation (an optional camera whose frame was absent or stale)
    raises BackendError naming the camera and the option ``key``: the request fails and is counted,
    rather than the model silently seeing another set of cameras than it was configured for.
    """
    if not cameras:
        return [(observation.primary_camera, observation.image)]
    missing = [c for c in cameras if c not in observation.images]
    if missing:
        have = ", ".join(observation.images)
        raise BackendError(f"{backend}: camera {missing[0]!r} ({key}) is not in this observation (it has: {have}); "
                           f"its frame is missing or stale, or cameras.names does not configure it")
    return [(c, observation.images[c]) for c in cameras]
