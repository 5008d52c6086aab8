"""Client for an openpi policy server (``scripts/serve_policy.py``: websocket + msgpack-numpy).

Wire format (fixed by the peer): a websocket; optional ``Authorization: Api-Key <key>``
header on the handshake; the server first sends a metadata frame (a msgpack dict); then each
request is one binary frame holding a msgpack dict observation and each reply one binary frame
holding a dict with ``actions`` of shape (horizon, dim). numpy arrays travel in openpi's
``__ndarray__`` form, packed and unpacked with ``openpi_client.msgpack_numpy`` (msgpack, never
pickle). On an exception the server sends the traceback as a *text* frame and closes.

What goes into the observation dict is configuration, because every openpi checkpoint's input
transform expects its own keys: one image per entry of ``image_keys`` (the camera of each named by
``image_cameras``), the instruction under ``prompt_key`` and the proprioception in the layout of
``state_format`` (LIBERO's 8-D ``observation/state``, DROID's separate joint and gripper arrays, a
few end-effector layouts, or a ``custom`` list of pieces). A camera or a state piece the layout
needs but the observation lacks fails the request with a BackendError naming it and its key:
sending a black frame or a zero state instead would feed the policy inputs it never saw in
training.

Why not ``openpi_client.WebsocketClientPolicy``: it waits for the server in an endless loop,
its ``recv()`` has no timeout, and it never reconnects after a drop (DESIGN.md lists all three
as user pains). This client bounds every step: ``open_timeout`` on the handshake, a timeout on
every ``recv``, and reconnection on the next ``infer`` after a drop with a bounded exponential
backoff that never sleeps (a call during the backoff window fails fast, so the policy node's
watchdog keeps the arm held). Because the protocol carries no request id, a request that times
out closes the connection: its late reply must never be read as the answer to the next one.

Budget (total per call, base.py): the handshake and metadata get the time left (``open_timeout`` is
total in websockets), the one-request-at-a-time lock is waited for only as long as the call's own
budget, the send is cut off at the deadline by shutting the socket down (websockets' send has no
timeout and blocks on a full socket buffer, e.g. a server that stopped reading), and the receive
waits for the time left. A dropped connection is shut down at once, without the closing handshake
(which waits for a server that may never answer). Replies above ``max_reply_bytes`` (websockets'
``max_size``) fail the request and close the connection before the frame is read; replies are
unpacked inside ``infer``, on the caller's worker thread.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import websockets
import websockets.sync.client
from openpi_client import msgpack_numpy
from transforms3d import euler, quaternions
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    abort_at,
    check_camera_names,
    credential_specs,
    describe_exception,
    load_secret,
    max_reply_bytes_spec,
    resolve_options,
    snippet,
    time_left,
)
from rt2_ros.backends.transport_security import check_server_url, server_ssl_context
from rt2_ros.params import ParamSpec

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

_log = logging.getLogger(__name__)
# websockets logs every handshake header at DEBUG, the Api-Key included: give it a logger of its own
# that stays at INFO even when the application turns on DEBUG globally.
_wire_log = logging.getLogger(__name__ + ".wire")
_wire_log.setLevel(logging.INFO)

_P = "backend.openpi."

#: websocket close code of a frame larger than max_size (RFC 6455 "message too big")
_TOO_BIG = 1009
#: close codes of an orderly close (ours, e.g. close() from another thread), not a server's fault
_NORMAL_CLOSE = (1000, 1001)
#: how often a waiting receive checks whether the connection failed meanwhile (s)
_FAIL_POLL_S = 0.05

# websockets >= 16 wants connect() used as a context manager unless legacy=True asks for a plain
# connection (which we need: it outlives one call); older releases have no such flag.
_LEGACY = {"legacy": True} if "legacy" in inspect.signature(websockets.sync.client.connect).parameters else {}

#: pieces a state vector is built from (``state_fields`` of state_format custom), each with its size:
#: ee_position (3, m), ee_axis_angle (3, rotation vector, rad), ee_euler (3, roll/pitch/yaw sxyz, rad),
#: ee_quat_wxyz (4), gripper (1, closedness 0..1), gripper_positions (one per joints.gripper_names,
#: times gripper_positions_scale), joint_positions (one per joints.arm_names)
STATE_FIELDS = ("ee_position", "ee_axis_angle", "ee_euler", "ee_quat_wxyz", "gripper", "gripper_positions",
                "joint_positions")

#: state formats that are one vector under state_key, as their list of pieces
STATE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "pos_axisangle_gripper": ("ee_position", "ee_axis_angle", "gripper"),
    "pos_euler_gripper": ("ee_position", "ee_euler", "gripper"),
    "pos_quat_gripper": ("ee_position", "ee_quat_wxyz", "gripper"),
    # LIBERO's observation/state: robot0_eef_pos, axis-angle of robot0_eef_quat, robot0_gripper_qpos
    "libero": ("ee_position", "ee_axis_angle", "gripper_positions"),
}

#: every state_format: the vector layouts, droid (joint positions and gripper closedness as two
#: arrays, as openpi's DROID client sends them) and custom (state_fields)
STATE_FORMATS = (*STATE_LAYOUTS, "droid", "custom")

# Observation field each piece needs (the name used in error messages)
_FIELD_SOURCE = {"ee_position": "ee_position", "ee_axis_angle": "ee_orientation", "ee_euler": "ee_orientation",
                 "ee_quat_wxyz": "ee_orientation", "gripper": "gripper", "gripper_positions": "gripper_positions",
                 "joint_positions": "joint_positions"}

# where each Observation field comes from, for the hint of a "lacks" error
_SOURCE_HINT = {"ee_position": "ee_pose", "ee_orientation": "ee_pose",
                "gripper": "joint_states of joints.gripper_names",
                "gripper_positions": "joint_states of joints.gripper_names",
                "joint_positions": "joint_states of joints.arm_names"}


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
        max_reply_bytes_spec(_P, "one websocket message: the metadata frame or a reply"),
        ParamSpec(_P + "reconnect_backoff_s", "double", 0.5,
                  "Wait after the first failed (re)connect before trying again; doubles per failure.",
                  "s", low=0.0, high=60.0),
        ParamSpec(_P + "reconnect_backoff_max_s", "double", 5.0,
                  "Upper bound of the reconnect backoff.", "s", low=0.0, high=300.0),
        ParamSpec(_P + "image_keys", "string_array", ["observation/image"],
                  "Observation keys of the camera images (uint8 HxWx3 RGB each), as the policy's input transform "
                  "expects, e.g. [observation/image, observation/wrist_image] (LIBERO) or "
                  "[observation/exterior_image_1_left, observation/wrist_image_left] (DROID)."),
        ParamSpec(_P + "image_cameras", "string_array", [],
                  "The camera (a name of the policy node's cameras.names) sent under each of image_keys, same "
                  "length; [] = the observation's cameras in order, which must then be exactly as many as "
                  "image_keys. A listed camera missing from an observation (optional camera absent or stale) fails "
                  "the request."),
        ParamSpec(_P + "image_size", "int", 224,
                  "Resize every image to image_size x image_size before sending; 0 = send the full frames.",
                  "px", low=0, high=4096),
        ParamSpec(_P + "image_resize", "string", "pad",
                  "pad = keep the aspect ratio and pad with black (openpi_client.image_tools.resize_with_pad, the "
                  "pixels openpi checkpoints were trained on); squash = stretch.",
                  choices=("pad", "squash")),
        ParamSpec(_P + "state_key", "string", "observation/state",
                  "Observation key of the state vector (float32) of every state_format but droid; empty = send no "
                  "proprioception at all (any state_format)."),
        ParamSpec(_P + "state_format", "string", "pos_axisangle_gripper",
                  "Proprioception layout, as the policy was trained: pos_axisangle_gripper = position (m) + rotation "
                  "vector (rad) + closedness (7); pos_euler_gripper = position + roll/pitch/yaw (sxyz, rad) + "
                  "closedness (7); pos_quat_gripper = position + quaternion wxyz + closedness (8); libero = position "
                  "+ rotation vector + the two finger positions (8, LIBERO's observation/state); droid = arm joint "
                  "positions under joint_position_key and closedness under gripper_position_key (two arrays); "
                  "custom = the pieces of state_fields.",
                  choices=STATE_FORMATS),
        ParamSpec(_P + "state_fields", "string_array", [],
                  "custom: the pieces of the state vector, in order: ee_position (3), ee_axis_angle (3), ee_euler "
                  "(3), ee_quat_wxyz (4), gripper (1, closedness), gripper_positions (one per joints.gripper_names), "
                  "joint_positions (one per joints.arm_names). Only with state_format custom.",
                  choices=STATE_FIELDS),
        ParamSpec(_P + "gripper_positions_scale", "double_array", [],
                  "Factor for each raw gripper joint position (joints.gripper_names order) in the state (libero, "
                  "custom gripper_positions); [] = as measured. LIBERO's Panda reports the second finger negative: "
                  "[1.0, -1.0] for a ROS Panda whose two finger joints are both positive."),
        ParamSpec(_P + "joint_position_key", "string", "observation/joint_position",
                  "droid: key of the arm joint positions (float32, one per joints.arm_names, rad)."),
        ParamSpec(_P + "gripper_position_key", "string", "observation/gripper_position",
                  "droid: key of the gripper closedness (float32, shape (1,), 0 = open, 1 = closed)."),
        ParamSpec(_P + "prompt_key", "string", "prompt", "Observation key of the language instruction."),
        ParamSpec(_P + "actions_key", "string", "actions", "Reply key of the (horizon, dim) action chunk."),
    )

    @classmethod
    def check_options(cls, options: dict) -> None:
        check_server_url(_P, "url", options, "ws", "wss")

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        opts = resolve_options(self.OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        self.check_options(opts)
        _check_mapping(opts)
        if opts["reconnect_backoff_max_s"] < opts["reconnect_backoff_s"]:
            raise BackendConfigError(f"{_P}reconnect_backoff_max_s: must be >= {_P}reconnect_backoff_s")
        self._url: str = opts["url"]
        self._ssl: ssl.SSLContext | None = server_ssl_context(_P, "url", opts, "wss")
        key = load_secret(opts["api_key_env"], opts["api_key_file"], _P)
        # The key only lives in this header dict; it is never formatted into a message.
        self._headers: dict[str, str] | None = {"Authorization": f"Api-Key {key}"} if key else None

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
        deadline = time.monotonic() + budget
        self._acquire(deadline, budget)
        try:
            self._ensure_connected(deadline)
        finally:
            self._lock.release()
        return self._metadata

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        deadline = time.monotonic() + timeout_s  # the budget covers packing and unpacking too
        request = self._build_request(observation)
        self._acquire(deadline, timeout_s)
        try:
            frame = self._exchange(request, deadline, timeout_s)
        finally:
            self._lock.release()
        return self._parse_reply(frame, observation.seq)

    def close(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            _abort(ws)  # thread-safe: an infer blocked in send() or recv() raises at once

    # -- internals -------------------------------------------------------------------------------

    def _acquire(self, deadline: float, timeout_s: float) -> None:
        """The one-request-at-a-time lock, waited for only within this call's own budget."""
        if not self._lock.acquire(timeout=max(0.0, time_left(deadline))):
            raise BackendTimeout(f"openpi: the previous request to {self._url} still held the connection after "
                                 f"this one's {timeout_s:.2f} s budget (the protocol allows one at a time)")

    def _exchange(self, request: bytes, deadline: float, timeout_s: float) -> bytes:
        """Send ``request`` and return the reply frame, all by ``deadline`` (lock held)."""
        ws = self._ensure_connected(deadline)
        if time_left(deadline) <= 0:
            raise BackendTimeout(f"openpi: no time left for the request after connecting to {self._url}")
        try:
            with abort_at(deadline, lambda: _shutdown(ws)) as send_cut_off:
                ws.send(request)
        except (ConnectionClosed, OSError) as exc:
            self._drop("send failed")
            if send_cut_off.is_set():
                raise BackendTimeout(f"openpi: sending the request to {self._url} did not finish within "
                                     f"{timeout_s:.2f} s (the server does not read); connection reset") from None
            if isinstance(exc, ConnectionClosed):
                raise self._closed_error(exc) from None
            raise BackendError(f"openpi: connection to {self._url} failed ({describe_exception(exc)}); "
                               f"reconnecting on the next request") from None
        try:
            frame = self._recv(ws, deadline)
        except TimeoutError:
            # No request ids on this protocol: drop the connection so the late reply is never
            # taken for the answer to the next observation.
            failed = ws.protocol.close_sent  # we failed the connection (a bad frame): not a timeout
            self._drop(f"no reply within {timeout_s:.2f} s")
            if failed is not None and failed.code not in _NORMAL_CLOSE:
                raise self._failed_error(failed.code, failed.reason) from None
            raise BackendTimeout(
                f"openpi: {self._url} did not answer within {timeout_s:.2f} s; connection reset") from None
        except ConnectionClosed as exc:
            self._drop(_close_reason(exc))
            if send_cut_off.is_set():  # the deadline struck just as the send finished
                raise BackendTimeout(f"openpi: {self._url} did not answer within {timeout_s:.2f} s; connection "
                                     f"reset") from None
            raise self._closed_error(exc) from None
        except OSError as exc:
            self._drop(describe_exception(exc))
            raise BackendError(f"openpi: connection to {self._url} failed ({describe_exception(exc)}); "
                               f"reconnecting on the next request") from None
        if isinstance(frame, str):
            # openpi servers send the traceback as text, then close with 1011.
            self._drop("server error")
            _log.debug("openpi server traceback:\n%s", snippet(frame, 4000))
            raise BackendError(f"openpi: server error: {_error_summary(frame)}")
        return frame

    @staticmethod
    def _recv(ws: websockets.sync.client.ClientConnection, deadline: float) -> bytes | str:
        """The next message by ``deadline`` (TimeoutError otherwise), or TimeoutError soon after this
        client failed the connection: websockets then waits for the server's closing handshake,
        which a server that sent a bad frame may never send."""
        while True:
            try:
                return ws.recv(timeout=max(0.0, min(_FAIL_POLL_S, time_left(deadline))))
            except TimeoutError:
                if ws.protocol.close_sent is not None or time_left(deadline) <= 0:
                    raise  # ConnectionClosed follows once the socket is closed; no use waiting for it

    def _closed_error(self, exc: ConnectionClosed) -> BackendError:
        if exc.sent is not None and exc.rcvd is None and exc.sent.code not in _NORMAL_CLOSE:
            # we failed the connection: the server broke the protocol (or sent too much)
            return self._failed_error(exc.sent.code, exc.sent.reason)
        return BackendError(f"openpi: connection to {self._url} closed ({_close_reason(exc)}); reconnecting on the "
                            f"next request")

    def _failed_error(self, code: int, reason: str) -> BackendError:
        """The error for a connection this client failed with close ``code`` (the server's fault)."""
        if code == _TOO_BIG:
            return BackendError(f"openpi: {self._url} sent a message larger than {_P}max_reply_bytes = "
                                f"{self.options['max_reply_bytes']} bytes; connection closed before reading it")
        return BackendError(f"openpi: {self._url} broke the websocket protocol (closed with code {int(code)}: "
                            f"{snippet(reason, 120)}); reconnecting on the next request")

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
            _log.info("openpi: connected to %s (server metadata keys: %s)", self._url,
                      snippet(sorted(map(str, self._metadata))))
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
                self._url, open_timeout=budget, additional_headers=self._headers, ssl=self._ssl, compression=None,
                max_size=self.options["max_reply_bytes"], close_timeout=0.2, logger=_wire_log, **_LEGACY)
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code in (401, 403):
                raise BackendError(f"openpi: {self._url} rejected the API key (HTTP {code}); check "
                                   f"{_P}api_key_env / {_P}api_key_file") from None
            raise BackendError(f"openpi: {self._url} refused the websocket handshake (HTTP {code})") from None
        except TimeoutError:
            raise BackendTimeout(f"openpi: connecting to {self._url} timed out after {budget:.2f} s") from None
        except (WebSocketException, OSError) as exc:  # a bad or reset handshake, a refused connection
            raise BackendError(
                f"openpi: cannot connect to {self._url} ({describe_exception(exc)}) — is the policy server "
                f"running?") from None
        try:
            frame = ws.recv(timeout=max(0.0, budget - (time.monotonic() - start)))
        except TimeoutError:
            _abort(ws)
            raise BackendTimeout(f"openpi: {self._url} sent no metadata within {budget:.2f} s") from None
        except ConnectionClosed as exc:
            _abort(ws)
            if exc.sent is not None and exc.sent.code == _TOO_BIG:
                raise BackendError(f"openpi: {self._url} sent a metadata frame larger than {_P}max_reply_bytes = "
                                   f"{self.options['max_reply_bytes']} bytes") from None
            raise BackendError(f"openpi: {self._url} closed before sending metadata ({_close_reason(exc)})") from None
        if isinstance(frame, str):
            _abort(ws)
            raise BackendError(f"openpi: server error instead of metadata: {_error_summary(frame)}")
        try:
            metadata = _unpackb(frame)
        except _UNPACK_ERRORS as exc:
            _abort(ws)
            raise BackendError(f"openpi: metadata frame is not msgpack ({snippet(exc, 80)})") from None
        if not isinstance(metadata, dict):
            _abort(ws)
            raise BackendError(f"openpi: metadata frame is a {type(metadata).__name__}, expected a dict")
        self._metadata = metadata
        return ws

    def _drop(self, reason: str) -> None:
        ws, self._ws = self._ws, None
        _log.warning("openpi: dropped connection to %s (%s); will reconnect on the next request", self._url, reason)
        if ws is not None:
            _abort(ws)

    def _build_request(self, observation: Observation) -> bytes:
        o = self.options
        request: dict = {}
        for key, (camera, image) in zip(o["image_keys"], self._frames(observation), strict=True):
            if o["image_size"]:
                try:
                    image = imaging.resize(image, o["image_size"], o["image_size"], pad=o["image_resize"] == "pad")
                except imaging.ImageEncodeError as exc:
                    raise BackendError(f"openpi: cannot resize the camera image {camera!r} for {key!r}: {exc}"
                                       ) from None
            request[key] = np.ascontiguousarray(image)
        request[o["prompt_key"]] = observation.instruction
        if o["state_key"]:
            request.update(state_arrays(observation, o))
        return self._packer.pack(request)

    def _frames(self, observation: Observation) -> list[tuple[str, np.ndarray]]:
        """(camera, frame) for each of image_keys, in order."""
        keys, cameras = self.options["image_keys"], self.options["image_cameras"]
        have = ", ".join(observation.images)
        if cameras:
            for camera, key in zip(cameras, keys, strict=True):
                if camera not in observation.images:
                    raise BackendError(
                        f"openpi: camera {camera!r} for {key!r} ({_P}image_cameras) is not in this observation (it "
                        f"has: {have}); its frame is missing or stale, or cameras.names does not configure it")
            return [(c, observation.images[c]) for c in cameras]
        frames = list(observation.images.items())
        if len(frames) < len(keys):
            raise BackendError(
                f"openpi: no camera for {keys[len(frames)]!r}: {_P}image_keys has {len(keys)} keys but the observation "
                f"has {len(frames)} camera(s) ({have}); an optional camera is missing or stale, or set "
                f"{_P}image_cameras")
        if len(frames) > len(keys):
            raise BackendError(
                f"openpi: the observation has {len(frames)} cameras ({have}) but {_P}image_keys has {len(keys)} "
                f"key(s); set {_P}image_cameras to the camera of each key")
        return frames

    def _parse_reply(self, frame: bytes, seq: int) -> BackendReply:
        try:
            reply = _unpackb(frame)
        except _UNPACK_ERRORS as exc:
            raise BackendError(f"openpi: reply is not msgpack ({snippet(exc, 80)})") from None
        key = self.options["actions_key"]
        if not isinstance(reply, dict) or key not in reply:
            found = snippet(sorted(map(str, reply))) if isinstance(reply, dict) else type(reply).__name__
            raise BackendError(f"openpi: reply has no {key!r} (got {found}); check {_P}actions_key")
        try:
            actions = np.asarray(reply[key], dtype=np.float64)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise BackendError(f"openpi: reply {key!r} is not a numeric array") from None
        if actions.ndim == 1:
            actions = actions.reshape(1, -1)
        if actions.ndim != 2 or actions.size == 0:
            raise BackendError(f"openpi: expected {key!r} of shape (horizon, dim), got {actions.shape}")
        return BackendReply(seq=seq, backend=self.name, actions=actions, server_time_s=_server_time(reply))


def _check_mapping(opts: dict) -> None:
    """Configuration checks of the observation mapping (errors name the key)."""
    keys = opts["image_keys"]
    if not keys:
        raise BackendConfigError(f"{_P}image_keys: name at least one image key, e.g. [observation/image]")
    for name in ("prompt_key", "actions_key"):
        if not opts[name]:
            raise BackendConfigError(f"{_P}{name}: must not be empty")
    cameras = check_camera_names(opts["image_cameras"], f"{_P}image_cameras")
    if cameras and len(cameras) != len(keys):
        raise BackendConfigError(f"{_P}image_cameras: {len(cameras)} camera(s) {cameras} for {len(keys)} image_keys "
                                 f"{keys}; give one camera per key, or [] for the observation's cameras in order")
    fmt, fields = opts["state_format"], opts["state_fields"]
    if fmt == "custom" and not fields:
        raise BackendConfigError(f"{_P}state_fields: state_format custom needs the pieces of the state vector, "
                                 f"e.g. [ee_position, ee_axis_angle, gripper]")
    if fmt != "custom" and fields:
        raise BackendConfigError(f"{_P}state_fields: only used with state_format custom (state_format is {fmt!r})")
    # every key the request carries, in the order of its options, must be distinct
    sent = [(f"image_keys[{i}]", k) for i, k in enumerate(keys)] + [("prompt_key", opts["prompt_key"])]
    if opts["state_key"] and fmt == "droid":
        sent += [("joint_position_key", opts["joint_position_key"]),
                 ("gripper_position_key", opts["gripper_position_key"])]
    elif opts["state_key"]:
        sent.append(("state_key", opts["state_key"]))
    seen: dict[str, str] = {}
    for option, key in sent:
        if not key:
            raise BackendConfigError(f"{_P}{option}: must not be empty")
        if key in seen:
            raise BackendConfigError(f"{_P}{option}: key {key!r} is already used by {_P}{seen[key]}")
        seen[key] = option


def state_arrays(observation: Observation, options: dict) -> dict[str, np.ndarray]:
    """The proprioception entries of the request for ``options`` (this backend's resolved options)."""
    fmt = options["state_format"]
    if fmt == "droid":
        joints_key, gripper_key = options["joint_position_key"], options["gripper_position_key"]
        _require(observation, [("joint_positions", joints_key), ("gripper", gripper_key)], fmt)
        return {joints_key: _piece(observation, "joint_positions", joints_key, ()).astype(np.float32),
                gripper_key: _piece(observation, "gripper", gripper_key, ()).astype(np.float32)}
    fields = options["state_fields"] if fmt == "custom" else fmt
    return {options["state_key"]: state_vector(observation, fields, options["gripper_positions_scale"],
                                               key=options["state_key"])}


def state_vector(observation: Observation, layout: str | list[str] | tuple[str, ...],
                 gripper_positions_scale: list[float] | tuple[float, ...] = (), *,
                 key: str = "observation/state") -> np.ndarray:
    """One float32 state vector: ``layout`` is a name of STATE_LAYOUTS or a list of STATE_FIELDS.

    Raises BackendError naming the missing piece and ``key`` when the observation lacks one.
    """
    fmt = layout if isinstance(layout, str) else "custom"
    fields = STATE_LAYOUTS[layout] if isinstance(layout, str) else tuple(layout)
    _require(observation, [(f, key) for f in fields], fmt)
    parts = [_piece(observation, f, key, gripper_positions_scale) for f in fields]
    if fmt == "libero" and parts[-1].size != 2:
        raise BackendError(f"openpi: state_format libero needs the 2 finger positions for {key!r}, got "
                           f"{parts[-1].size} gripper_positions; set joints.gripper_names to the two finger joints")
    return np.concatenate(parts).astype(np.float32)


def _require(observation: Observation, needs: list[tuple[str, str]], fmt: str) -> None:
    """BackendError naming every Observation field that ``needs`` ((piece, request key) pairs) lacks."""
    missing: dict[str, list[str]] = {}  # request key -> missing Observation fields
    for field, key in needs:
        source = _FIELD_SOURCE[field]
        if getattr(observation, source) is None and source not in missing.get(key, []):
            missing.setdefault(key, []).append(source)
    if missing:
        what = "; ".join(f"{', '.join(sources)} for {key!r}" for key, sources in missing.items())
        hints = ", ".join(dict.fromkeys(_SOURCE_HINT[s] for sources in missing.values() for s in sources))
        raise BackendError(f"openpi: observation lacks {what} (state_format {fmt}); it comes from a fresh {hints} "
                           f"(a missing or stale piece is left out), or set {_P}state_key to '' to send no state")


def _piece(observation: Observation, field: str, key: str, scale: list[float] | tuple[float, ...]) -> np.ndarray:
    """One piece of the state as a finite float64 vector (the observation has it: see _require)."""
    if field == "ee_position":
        value = np.asarray(observation.ee_position, dtype=np.float64).reshape(-1)
        if value.size != 3:
            raise BackendError(f"openpi: ee_position for {key!r} has {value.size} values, expected 3")
    elif field in ("ee_axis_angle", "ee_euler", "ee_quat_wxyz"):
        quat = _unit_quaternion(observation.ee_orientation, key)
        if field == "ee_quat_wxyz":
            value = quat
        elif field == "ee_euler":
            value = np.asarray(euler.quat2euler(quat, "sxyz"))
        else:
            value = axis_angle(quat)
    elif field == "gripper":
        value = np.array([float(observation.gripper)])
    elif field == "gripper_positions":
        value = np.asarray(observation.gripper_positions, dtype=np.float64).reshape(-1)
        if scale:
            if len(scale) != value.size:
                raise BackendError(f"openpi: {_P}gripper_positions_scale has {len(scale)} factors for {value.size} "
                                   f"gripper_positions ({key!r}); give one per joints.gripper_names")
            value = value * np.asarray(scale, dtype=np.float64)
    else:  # joint_positions
        value = np.asarray(observation.joint_positions, dtype=np.float64).reshape(-1)
    if value.size == 0 or not np.all(np.isfinite(value)):
        raise BackendError(f"openpi: invalid {field} for {key!r}: {value}")
    return value


def _unit_quaternion(quat: object, key: str) -> np.ndarray:
    q = np.asarray(quat, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(q)) if q.size == 4 else math.nan
    if not (math.isfinite(norm) and abs(norm - 1.0) < 1e-2):
        raise BackendError(f"openpi: invalid arm state for {key!r}: ee_orientation {q} is not a unit quaternion "
                           f"wxyz (|q|={norm:.3f})")
    return q / norm


def axis_angle(quat: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle, rad) of a unit quaternion wxyz, as LIBERO computes its state.

    LIBERO's conversion: angle ``2 acos(w)`` in [0, 2 pi], the quaternion's sign kept as published.
    Not canonicalised to w >= 0 on purpose: a gripper pointing down sits at an angle near pi, where
    w >= 0 would flip the vector between about (+pi, ., .) and (-pi, ., .) from one step to the next,
    while pose sources that derive the quaternion from a rotation matrix (Eigen, Bullet) keep its
    largest component positive there, so the vector stays on one side.
    """
    axis, angle = quaternions.quat2axangle(quat)
    return np.asarray(axis) * angle


def _unpack_array(obj: dict) -> Any:
    """openpi_client.msgpack_numpy's object hook, safe for outside bytes. Its ``np.ndarray(buffer=,
    dtype=, shape=)`` kills the whole process (SIGFPE in numpy) for a zero-size dtype such as "0f8"
    with shape -1, found by fuzzing; ``np.frombuffer`` + ``reshape`` check sizes and raise instead."""
    if b"__ndarray__" not in obj and b"__npgeneric__" not in obj:
        return obj
    dtype = np.dtype(obj[b"dtype"])
    if dtype.itemsize == 0 or dtype.hasobject or dtype.shape:
        raise ValueError(f"unsupported array dtype {dtype}")
    if b"__ndarray__" in obj:
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    return dtype.type(obj[b"data"])


def _unpackb(frame: bytes) -> Any:
    """One openpi msgpack frame (openpi's numpy form, :func:`_unpack_array`)."""
    return msgpack.unpackb(frame, object_hook=_unpack_array)


#: what unpacking outside bytes can raise (msgpack's errors are ValueErrors; openpi's __ndarray__
#: hook raises TypeError/ValueError/KeyError on a malformed array; deep nesting a RecursionError)
# SyntaxError: numpy parses a dtype string such as "<,8" with ast (found by fuzzing, test_fuzz.py)
_UNPACK_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, SyntaxError,
                  msgpack.UnpackException)


def _shutdown(ws: websockets.sync.client.ClientConnection) -> None:
    """Shut the socket down: a send or receive blocked on it in another thread returns at once."""
    with contextlib.suppress(OSError):
        ws.socket.shutdown(socket.SHUT_RDWR)


def _abort(ws: websockets.sync.client.ClientConnection) -> None:
    """Close without the closing handshake (a stalled server would hold it for close_timeout)."""
    _shutdown(ws)
    with contextlib.suppress(Exception):
        ws.close()  # returns at once on a shut-down socket; joins websockets' reader thread


def _close_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame"
    return f"code {int(frame.code)}{': ' + snippet(frame.reason, 120) if frame.reason else ''}"


def _error_summary(text: str) -> str:
    """One clean line from a server error: the exception line of a traceback, else the first line."""
    lines = [ln.strip() for ln in text.strip()[-20_000:].splitlines() if ln.strip()]
    if not lines:
        return "(empty error message)"
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return snippet(line, 300) or "(empty error message)"


def _server_time(reply: dict) -> float:
    """openpi servers report ``server_timing: {"infer_ms": ...}``; NaN when absent."""
    timing = reply.get("server_timing")
    if isinstance(timing, dict):
        infer_ms = timing.get("infer_ms")
        if isinstance(infer_ms, (int, float, np.number)) and math.isfinite(float(infer_ms)):
            return float(infer_ms) / 1000.0
    return float("nan")
