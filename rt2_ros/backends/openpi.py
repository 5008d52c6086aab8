"""Client for an openpi policy server (``scripts/serve_policy.py``: websocket + msgpack-numpy).

Wire format (fixed by the peer): a websocket; optional ``Authorization: Api-Key <key>``
header on the handshake; the server first sends a metadata frame (a msgpack dict); then each
request is one binary frame holding a msgpack dict observation and each reply one binary frame
holding a dict with ``actions`` of shape (horizon, dim). numpy arrays travel in openpi's
``__ndarray__`` form, packed and unpacked with ``openpi_client.msgpack_numpy`` (msgpack, never
pickle). On an exception the server sends the traceback as a *text* frame and closes.

Why not ``openpi_client.WebsocketClientPolicy``: it waits for the server in an endless loop,
its ``recv()`` has no timeout, and it never reconnects after a drop (DESIGN.md lists all three
as user pains). This client bounds every step: ``open_timeout`` on the handshake, a timeout on
every ``recv``, and reconnection on the next ``infer`` after a drop with a bounded exponential
backoff that never sleeps (a call during the backoff window fails fast, so the policy node's
watchdog keeps the arm held). Because the protocol carries no request id, a request that times
out closes the connection: its late reply must never be read as the answer to the next one.
"""

from __future__ import annotations

import inspect
import logging
import math
import ssl
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import msgpack
import numpy as np
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy
from transforms3d import euler, quaternions
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    credential_specs,
    describe_exception,
    load_secret,
    resolve_options,
)
from rt2_ros.params import ParamSpec

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

_log = logging.getLogger(__name__)
# websockets logs every handshake header at DEBUG, the Api-Key included: give it a logger of its own
# that stays at INFO even when the application turns on DEBUG globally.
_wire_log = logging.getLogger(__name__ + ".wire")
_wire_log.setLevel(logging.INFO)

_P = "backend.openpi."

#: largest frame accepted from the server; replies are a few kB, metadata rarely more
_MAX_FRAME_BYTES = 16 * 1024 * 1024

# websockets >= 16 wants connect() used as a context manager unless legacy=True asks for a plain
# connection (which we need: it outlives one call); older releases have no such flag.
_LEGACY = {"legacy": True} if "legacy" in inspect.signature(websockets.sync.client.connect).parameters else {}

#: state layouts built from Observation.ee_position / ee_orientation / gripper
STATE_FORMATS = ("pos_axisangle_gripper", "pos_euler_gripper", "pos_quat_gripper")


class OpenPIBackend(Backend):
    """``backend.type: openpi`` — one websocket, one request/reply pair per observation."""

    name = "openpi"

    OPTIONS: tuple[ParamSpec, ...] = (
        ParamSpec(_P + "url", "string", "ws://127.0.0.1:8000",
                  "openpi policy server URL (ws:// or wss://), e.g. ws://gpu-host:8000."),
        *credential_specs(_P, key_use="the API key sent as 'Authorization: Api-Key KEY' on the handshake",
                          scheme="wss"),
        ParamSpec(_P + "connect_timeout_s", "double", 5.0,
                  "Limit for the websocket handshake plus the server's metadata frame (also capped by the "
                  "request budget).", "s", low=0.01, high=120.0),
        ParamSpec(_P + "reconnect_backoff_s", "double", 0.5,
                  "Wait after the first failed (re)connect before trying again; doubles per failure.",
                  "s", low=0.0, high=60.0),
        ParamSpec(_P + "reconnect_backoff_max_s", "double", 5.0,
                  "Upper bound of the reconnect backoff.", "s", low=0.0, high=300.0),
        ParamSpec(_P + "image_key", "string", "observation/image",
                  "Observation key of the camera image (uint8 HxWx3 RGB), as the policy's input transform expects."),
        ParamSpec(_P + "image_size", "int", 224,
                  "Resize the image to image_size x image_size before sending; 0 = send the full frame.",
                  "px", low=0, high=4096),
        ParamSpec(_P + "image_resize", "string", "pad",
                  "pad = keep the aspect ratio and pad with black (openpi's resize_with_pad); squash = stretch.",
                  choices=("pad", "squash")),
        ParamSpec(_P + "state_key", "string", "observation/state",
                  "Observation key of the proprioceptive state vector (float32); empty = send no state."),
        ParamSpec(_P + "state_format", "string", "pos_axisangle_gripper",
                  "State layout built from the end-effector pose and gripper: position (m) + rotation vector (rad) "
                  "+ closedness (7), position + roll/pitch/yaw (sxyz, rad) + closedness (7), or position + "
                  "quaternion wxyz + closedness (8). Must match the layout the policy was trained on.",
                  choices=STATE_FORMATS),
        ParamSpec(_P + "prompt_key", "string", "prompt", "Observation key of the language instruction."),
        ParamSpec(_P + "actions_key", "string", "actions", "Reply key of the (horizon, dim) action chunk."),
    )

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        opts = resolve_options(self.OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        parts = urlsplit(opts["url"])
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise BackendConfigError(f"{_P}url: expected ws://host:port or wss://host:port, got {opts['url']!r}")
        for key in ("image_key", "prompt_key", "actions_key"):
            if not opts[key]:
                raise BackendConfigError(f"{_P}{key}: must not be empty")
        if opts["reconnect_backoff_max_s"] < opts["reconnect_backoff_s"]:
            raise BackendConfigError(f"{_P}reconnect_backoff_max_s: must be >= {_P}reconnect_backoff_s")
        self._url: str = opts["url"]
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "wss":
            try:
                self._ssl = ssl.create_default_context(cafile=opts["ca_cert_file"] or None)
            except (OSError, ssl.SSLError) as exc:
                raise BackendConfigError(f"{_P}ca_cert_file: cannot load {opts['ca_cert_file']!r}: {exc}") from None
        elif opts["ca_cert_file"]:
            raise BackendConfigError(f"{_P}ca_cert_file: only used with a wss:// url")
        key = load_secret(opts["api_key_env"], opts["api_key_file"], _P)
        # The key only lives in this header dict; it is never formatted into a message.
        self._headers: dict[str, str] | None = {"Authorization": f"Api-Key {key}"} if key else None
        if key and parts.scheme == "ws" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            _log.warning("%sapi key is sent unencrypted to %s; use wss:// or an ssh tunnel", _P, parts.netloc)

        self._packer = msgpack_numpy.Packer()
        self._lock = threading.Lock()  # one request in flight per connection (the protocol has no ids)
        self._ws: websockets.sync.client.ClientConnection | None = None
        self._metadata: dict = {}
        self._failures = 0  # consecutive failed connection attempts
        self._next_attempt = 0.0  # monotonic time before which no reconnect is tried
        self._last_error = ""
        self._ever_connected = False
        self._closed = False

    # -- public API ------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict:
        """The metadata dict the server sent on the current connection ({} before connecting)."""
        return self._metadata

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def connect(self, timeout_s: float | None = None) -> dict:
        """Connect now (instead of on the first :meth:`infer`) and return the server metadata.

        Raises BackendError / BackendTimeout; honours the reconnect backoff like ``infer``.
        """
        budget = self.options["connect_timeout_s"] if timeout_s is None else timeout_s
        with self._lock:
            self._ensure_connected(time.monotonic() + budget)
        return self._metadata

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        request = self._build_request(observation)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            ws = self._ensure_connected(deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(f"openpi: no time left for the request after connecting to {self._url}")
            try:
                ws.send(request)
                frame = ws.recv(timeout=remaining)
            except TimeoutError:
                # No request ids on this protocol: drop the connection so the late reply is never
                # taken for the answer to the next observation.
                self._drop(f"no reply within {timeout_s:.2f} s")
                raise BackendTimeout(
                    f"openpi: {self._url} did not answer within {timeout_s:.2f} s; connection reset") from None
            except ConnectionClosed as exc:
                self._drop(_close_reason(exc))
                raise BackendError(
                    f"openpi: connection to {self._url} closed ({_close_reason(exc)}); reconnecting on the next "
                    f"request") from None
            except OSError as exc:
                self._drop(describe_exception(exc))
                raise BackendError(f"openpi: connection to {self._url} failed ({describe_exception(exc)}); "
                                   f"reconnecting on the next request") from None
            if isinstance(frame, str):
                # openpi servers send the traceback as text, then close with 1011.
                self._drop("server error")
                _log.debug("openpi server traceback:\n%s", frame)
                raise BackendError(f"openpi: server error: {_error_summary(frame)}")
        return self._parse_reply(frame, observation.seq)

    def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()  # thread-safe: unblocks an infer waiting in recv()

    # -- internals -------------------------------------------------------------------------------

    def _ensure_connected(self, deadline: float) -> websockets.sync.client.ClientConnection:
        if self._closed:
            raise BackendError("openpi: backend is closed")
        if self._ws is not None:
            return self._ws
        now = time.monotonic()
        if now < self._next_attempt:
            raise BackendError(
                f"openpi: not connected to {self._url}; next attempt in {self._next_attempt - now:.1f} s "
                f"(last error: {self._last_error})")
        budget = min(self.options["connect_timeout_s"], deadline - now)
        if budget <= 0:
            raise BackendTimeout(f"openpi: no time left to connect to {self._url}")
        try:
            ws = self._open(budget)
        except BackendError as exc:
            self._failures += 1
            backoff = min(self.options["reconnect_backoff_s"] * 2 ** (self._failures - 1),
                          self.options["reconnect_backoff_max_s"])
            self._next_attempt = time.monotonic() + backoff
            self._last_error = str(exc)
            _log.warning("%s (attempt %d; retrying no sooner than in %.1f s)", exc, self._failures, backoff)
            raise
        if self._ever_connected:
            _log.info("openpi: reconnected to %s after %d failed attempt(s)", self._url, self._failures)
        else:
            _log.info("openpi: connected to %s (server metadata keys: %s)", self._url, sorted(map(str, self._metadata)))
        self._ever_connected = True
        self._failures = 0
        self._next_attempt = 0.0
        self._ws = ws
        return ws

    def _open(self, budget: float) -> websockets.sync.client.ClientConnection:
        """Handshake and read the metadata frame within ``budget`` seconds."""
        start = time.monotonic()
        try:
            ws = websockets.sync.client.connect(
                self._url, open_timeout=budget, additional_headers=self._headers, ssl=self._ssl,
                compression=None, max_size=_MAX_FRAME_BYTES, close_timeout=1.0, logger=_wire_log, **_LEGACY)
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code in (401, 403):
                raise BackendError(f"openpi: {self._url} rejected the API key (HTTP {code}); check "
                                   f"{_P}api_key_env / {_P}api_key_file") from None
            raise BackendError(f"openpi: {self._url} refused the websocket handshake (HTTP {code})") from None
        except TimeoutError:
            raise BackendTimeout(f"openpi: connecting to {self._url} timed out after {budget:.2f} s") from None
        except (InvalidHandshake, InvalidURI, OSError) as exc:
            raise BackendError(
                f"openpi: cannot connect to {self._url} ({describe_exception(exc)}) — is the policy server "
                f"running?") from None
        try:
            frame = ws.recv(timeout=max(0.0, budget - (time.monotonic() - start)))
        except TimeoutError:
            ws.close()
            raise BackendTimeout(f"openpi: {self._url} sent no metadata within {budget:.2f} s") from None
        except ConnectionClosed as exc:
            raise BackendError(f"openpi: {self._url} closed before sending metadata ({_close_reason(exc)})") from None
        if isinstance(frame, str):
            ws.close()
            raise BackendError(f"openpi: server error instead of metadata: {_error_summary(frame)}")
        try:
            metadata = msgpack_numpy.unpackb(frame)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            ws.close()
            raise BackendError(f"openpi: metadata frame is not msgpack ({exc})") from None
        if not isinstance(metadata, dict):
            ws.close()
            raise BackendError(f"openpi: metadata frame is a {type(metadata).__name__}, expected a dict")
        self._metadata = metadata
        return ws

    def _drop(self, reason: str) -> None:
        ws, self._ws = self._ws, None
        _log.warning("openpi: dropped connection to %s (%s); will reconnect on the next request", self._url, reason)
        if ws is not None:
            ws.close()

    def _build_request(self, observation: Observation) -> bytes:
        o = self.options
        image = observation.image
        if o["image_size"]:
            try:
                image = imaging.resize(image, o["image_size"], o["image_size"], pad=o["image_resize"] == "pad")
            except imaging.ImageEncodeError as exc:
                raise BackendError(f"openpi: cannot resize the camera image: {exc}") from None
        request: dict = {o["image_key"]: np.ascontiguousarray(image), o["prompt_key"]: observation.instruction}
        if o["state_key"]:
            request[o["state_key"]] = state_vector(observation, o["state_format"])
        return self._packer.pack(request)

    def _parse_reply(self, frame: bytes, seq: int) -> BackendReply:
        try:
            reply = msgpack_numpy.unpackb(frame)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BackendError(f"openpi: reply is not msgpack ({exc})") from None
        key = self.options["actions_key"]
        if not isinstance(reply, dict) or key not in reply:
            found = sorted(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__
            raise BackendError(f"openpi: reply has no {key!r} (got {found}); check {_P}actions_key")
        try:
            actions = np.asarray(reply[key], dtype=np.float64)
        except (ValueError, TypeError):
            raise BackendError(f"openpi: reply {key!r} is not a numeric array") from None
        if actions.ndim == 1:
            actions = actions.reshape(1, -1)
        if actions.ndim != 2 or actions.size == 0:
            raise BackendError(f"openpi: expected {key!r} of shape (horizon, dim), got {actions.shape}")
        return BackendReply(seq=seq, backend=self.name, actions=actions, server_time_s=_server_time(reply))


def state_vector(observation: Observation, state_format: str) -> np.ndarray:
    """The float32 proprioceptive state for ``state_format`` (see STATE_FORMATS)."""
    pos, quat, grip = observation.ee_position, observation.ee_orientation, observation.gripper
    if pos is None or quat is None or grip is None:
        missing = [n for n, v in (("ee_position", pos), ("ee_orientation", quat), ("gripper", grip)) if v is None]
        raise BackendError(f"openpi: observation lacks {', '.join(missing)} for {_P}state_key; provide the arm "
                           f"state or set {_P}state_key to ''")
    pos = np.asarray(pos, dtype=np.float64).reshape(3)
    quat = np.asarray(quat, dtype=np.float64).reshape(4)
    norm = float(np.linalg.norm(quat))
    if not (np.all(np.isfinite(pos)) and math.isfinite(norm) and abs(norm - 1.0) < 1e-2 and math.isfinite(grip)):
        raise BackendError(f"openpi: invalid arm state (position {pos}, quaternion {quat} (|q|={norm:.3f}), "
                           f"gripper {grip})")
    quat = quat / norm
    if state_format == "pos_quat_gripper":
        rot = quat
    elif state_format == "pos_euler_gripper":
        rot = np.asarray(euler.quat2euler(quat, "sxyz"))
    else:
        axis, angle = quaternions.quat2axangle(quat)
        rot = np.asarray(axis) * angle
    return np.concatenate([pos, rot, [float(grip)]]).astype(np.float32)


def _close_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame"
    return f"code {int(frame.code)}{': ' + frame.reason if frame.reason else ''}"


def _error_summary(text: str) -> str:
    """One line from a server error: the exception line of a traceback, else the first line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(empty error message)"
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= 300 else line[:300] + "…"


def _server_time(reply: dict) -> float:
    """openpi servers report ``server_timing: {"infer_ms": ...}``; NaN when absent."""
    timing = reply.get("server_timing")
    if isinstance(timing, dict):
        infer_ms = timing.get("infer_ms")
        if isinstance(infer_ms, (int, float, np.number)) and math.isfinite(float(infer_ms)):
            return float(infer_ms) / 1000.0
    return float("nan")
