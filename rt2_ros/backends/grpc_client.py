"""The ``grpc`` backend: send observations to a remote policy server speaking rt2_ros's protocol.

The protocol (``rt2_ros/backends/proto/policy.proto``) is served by ``rt2-serve`` on a GPU box,
or by any engine that implements it (e.g. Ray Serve behind a gRPC ingress). This module is the
robot side: one channel, unary ``Infer`` or one bidirectional ``InferStream``, a deadline on
every call, TLS / mTLS / bearer token, standard gRPC health checking, and a clear
:class:`BackendError` for every failure.

Why our own protocol rather than LeRobot's async-inference gRPC: LeRobot pickles observations
and actions and sends them over an insecure channel, so anyone who can reach either end can
execute code on it (unpickling runs code chosen by the sender). Here every byte on the wire is
a protobuf message (data only), images are JPEG/PNG/raw rgb8, and the channel can be TLS with
a token. Rejected as well: JSON over HTTP (OpenVLA's ``/act``: no deadlines, errors as "error"
with HTTP 200) and msgpack over websockets (openpi: fine, but no schema, no standard health
check, no per-call deadlines).

Reconnection is gRPC's own: a channel reconnects by itself with exponential backoff capped at
``backend.grpc.max_backoff_s``. Calls fail fast (``UNAVAILABLE`` -> BackendError) while the
server is down rather than blocking the control loop, and succeed again as soon as it is back.

Every reply's echoed sequence id is checked: an answer for another observation is never
returned (it would be executed at the wrong time).

Budget (total per call, base.py): one deadline for the whole ``infer`` — GetInfo when the server
must be asked again, encoding, the call itself, decoding. A gRPC deadline covers connecting,
sending and receiving, but a message stuck in a write to a server that stopped reading (socket
buffers full) holds a blocking call past it until the connection breaks, so every call is made
through the future API and abandoned (cancelled) if gRPC has not ended it shortly after its
deadline. Streaming calls take turns on the one stream and wait for it only within their own
budget; a stream whose answer is late is cancelled, not waited for. Replies are capped by
``max_reply_bytes`` (the channel's ``grpc.max_receive_message_length``: gRPC refuses a larger
message before decoding it) and decoded to numpy inside ``infer``.

What travels (protocol v2): every camera of the observation by name (primary first; only the
cameras the server lists in ``ServerInfo.cameras`` when it lists any), each resized to the
server's image size and encoded per ``image_encoding``, plus every proprioception piece the
observation holds (end-effector pose, gripper closedness, arm joint and gripper joint positions),
each with its ROS stamp. A peer of another protocol version is refused at start-up with a
message that says which side to upgrade: an rt2-serve of an older version is recognised by
its answer to the older ``GetInfo``, a newer one says so itself (FAILED_PRECONDITION with the
``rt2_ros-protocol-version`` trailer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rt2_ros import __version__, imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    allow_plaintext_spec,
    max_reply_bytes_spec,
    snippet,
)
from rt2_ros.backends.proto import PROTOCOL_VERSION, SERVICE_NAME, VERSION_TRAILER, load, service_name
from rt2_ros.backends.transport_security import check_plaintext, load_ca_bundle, load_cert_and_key, read_file
from rt2_ros.params import ParamSpec

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

pb, pb_grpc = load()

_log = logging.getLogger("rt2_ros.backends.grpc")

_P = "backend.grpc."
OPTIONS: tuple[ParamSpec, ...] = (
    ParamSpec(_P + "target", "string", "127.0.0.1:50051",
              "host:port of the rt2-serve (or compatible) policy server; any gRPC target URI works too"),
    ParamSpec(_P + "image_encoding", "string", "jpeg",
              "how every camera image travels: jpeg (small, lossy), png (lossless), raw (rgb8, no codec cost)",
              choices=("jpeg", "png", "raw")),
    ParamSpec(_P + "jpeg_quality", "int", 90, "JPEG quality when image_encoding is jpeg", low=1, high=100),
    ParamSpec(_P + "resize_to_server_size", "bool", True,
              "resize every camera image to the size the server reports in GetInfo before encoding (saves "
              "bandwidth; the model resizes to that size anyway)"),
    ParamSpec(_P + "use_streaming", "bool", False,
              "one long-lived bidirectional InferStream instead of a unary Infer call per observation"),
    ParamSpec(_P + "tls", "bool", False,
              "use TLS (required for a target on another machine unless allow_plaintext, and for a token unless "
              "allow_insecure_token)"),
    ParamSpec(_P + "ca_cert", "string", "",
              "PEM file of the CA that signed the server certificate; empty = the system roots"),
    ParamSpec(_P + "client_cert", "string", "", "PEM client certificate for mutual TLS (with client_key)"),
    ParamSpec(_P + "client_key", "string", "", "PEM private key of client_cert for mutual TLS"),
    ParamSpec(_P + "token_file", "string", "",
              "file holding the bearer token sent as 'authorization: Bearer ...'; empty = no token"),
    ParamSpec(_P + "allow_insecure_token", "bool", False,
              "send the token without TLS (only through an SSH tunnel or a TLS-terminating proxy; a target on "
              "another machine also needs allow_plaintext)"),
    allow_plaintext_spec(_P),
    ParamSpec(_P + "server_name_override", "string", "",
              "TLS: the name to check the server certificate against instead of the target host"),
    ParamSpec(_P + "connect_timeout_s", "double", 5.0,
              "start-up health/info probe and (re)connection attempt timeout", units="s", low=0.1, high=120.0),
    ParamSpec(_P + "max_backoff_s", "double", 2.0,
              "cap of the exponential backoff between reconnection attempts after a drop", units="s",
              low=0.1, high=120.0),
    max_reply_bytes_spec(_P, "one protobuf reply: GetInfo, Infer, a stream answer", high=2**31 - 1),
    ParamSpec(_P + "keepalive_s", "double", 30.0,
              "HTTP/2 ping period while calls are active, so a dead link is noticed and redialled instead of "
              "timing out call after call; 0 = off (servers must allow it: rt2-serve allows >= 10 s)", units="s",
              low=0.0, high=3600.0),
)

_FORMATS = {"jpeg": pb.Image.JPEG, "png": pb.Image.PNG, "raw": pb.Image.RAW}
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: past its deadline by this, a call that gRPC did not end is abandoned (GrpcBackend._bounded)
_ABANDON_GRACE_S = 0.05
# after these a restarted or replaced server may host another model or speak another protocol version
_ASK_AGAIN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)


class ProtocolMismatch(BackendError):
    """The server speaks another rt2_ros protocol version; the message says which side to upgrade."""


def read_token(key: str, path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped). Never logged."""
    token = read_file(key, path, secret=True).decode("utf-8", errors="strict").strip()
    if not token:
        raise BackendConfigError(f"{key}: {path!r} is empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise BackendConfigError(f"{key}: the token in {path!r} must be one line of printable text without spaces")
    return token


def target_host(target: str) -> str | None:
    """The host part of a gRPC target ("h:p", "[v6]:p", "dns:///h:p"), or None for unix sockets."""
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    rest = target.split("///", 1)[1] if "///" in target else target
    if rest.startswith("["):
        return rest[1:rest.find("]")] if "]" in rest else rest
    return rest.rsplit(":", 1)[0] if ":" in rest else rest


def observation_to_proto(observation: Observation, image_encoding: str = "jpeg", jpeg_quality: int = 90,
                         *, resize_to: tuple[int, int] | None = None, timeout_s: float = 0.0,
                         cameras: Sequence[str] | None = None) -> Any:
    """The wire message for ``observation``; ``resize_to`` is (height, width) or None.

    ``cameras``: the cameras to send, in this order (each must be in ``observation.images``);
    None = every camera of the observation, primary first. Raises :class:`imaging.ImageEncodeError`
    (naming the camera) when an image cannot be encoded.
    """
    if image_encoding not in _FORMATS:
        raise ValueError(f"image_encoding must be jpeg, png or raw, got {image_encoding!r}")
    msg = pb.Observation(seq=int(observation.seq), stamp=float(observation.stamp),
                         instruction=observation.instruction, timeout_s=float(timeout_s))
    for name in (observation.images if cameras is None else cameras):
        image = observation.images[name]
        try:
            if resize_to is not None and image.shape[:2] != tuple(resize_to):
                image = imaging.resize(image, resize_to[0], resize_to[1])
            if image_encoding == "jpeg":
                data = imaging.encode_jpeg(image, jpeg_quality)
            elif image_encoding == "png":
                data = imaging.encode_png(image)
            else:
                data = np.ascontiguousarray(image).tobytes()
        except imaging.ImageEncodeError as exc:
            raise imaging.ImageEncodeError(f"camera {name!r}: {exc}") from None
        height, width = image.shape[:2]
        cam = msg.images.add(camera=name, image=pb.Image(
            format=_FORMATS[image_encoding], data=data, width=width, height=height,
            raw_encoding="rgb8" if image_encoding == "raw" else ""))
        if name in observation.image_stamps:
            cam.stamp = float(observation.image_stamps[name])
    state = state_to_proto(observation)
    if state is not None:
        msg.state.CopyFrom(state)
    return msg


def _values(array: Any) -> list[float]:
    return np.asarray(array, dtype=np.float64).reshape(-1).tolist()


def state_to_proto(observation: Observation) -> Any | None:
    """The RobotState of ``observation`` (every piece it holds, with its stamp), or None when it holds none."""
    state = pb.RobotState()
    stamps = observation.state_stamps
    present = False
    if observation.ee_position is not None:
        state.ee_position.extend(_values(observation.ee_position))
        present = True
    if observation.ee_orientation is not None:
        state.ee_orientation.extend(_values(observation.ee_orientation))
        present = True
    if (observation.ee_position is not None or observation.ee_orientation is not None) and "ee_pose" in stamps:
        state.ee_pose_stamp = float(stamps["ee_pose"])
    for piece in ("gripper", "joint_positions", "gripper_positions"):
        value = getattr(observation, piece)
        if value is None:
            continue
        present = True
        if piece == "gripper":
            state.gripper = float(value)
        else:
            getattr(state, piece).extend(_values(value))
        if piece in stamps:
            setattr(state, f"{piece}_stamp", float(stamps[piece]))
    return state if present else None


def error_from_status(code: grpc.StatusCode, details: str, *, target: str, timeout_s: float,
                      has_token: bool = False, tls: bool = False) -> BackendError:
    """The BackendError (or BackendTimeout) for a gRPC status, with a message that says what to do.

    The status code is kept as the ``grpc_code`` attribute of the returned exception.
    """
    err = _error_from_status(code, details, target=target, timeout_s=timeout_s, has_token=has_token, tls=tls)
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


def _error_from_status(code: grpc.StatusCode, details: str, *, target: str, timeout_s: float,
                       has_token: bool, tls: bool) -> BackendError:
    details = snippet(details or "", 300) or code.name  # the server's text: cleaned, bounded
    where = f"policy server {target}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return BackendTimeout(f"{where}: no answer within {timeout_s:.3f} s ({details})")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if has_token:
            return BackendError(f"{where}: token rejected by server; check backend.grpc.token_file ({details})")
        return BackendError(f"{where}: server requires a bearer token; set backend.grpc.token_file ({details})")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return BackendError(f"{where}: permission denied; check backend.grpc.token_file and the client "
                            f"certificate ({details})")
    if code == grpc.StatusCode.UNAVAILABLE:
        low = details.lower()
        if any(w in low for w in ("ssl", "tls", "handshake", "certificate", "verification")):
            hint = ("TLS handshake failed; check backend.grpc.tls, ca_cert, client_cert/client_key and "
                    "server_name_override" if tls else
                    "connection failed; is the server using TLS? then set backend.grpc.tls: true")
            return BackendError(f"{where}: {hint} ({details})")
        return BackendError(f"{where} unavailable ({details}); check that it runs and that backend.grpc.tls and "
                            "client_cert/client_key match its --tls-cert/--client-ca; the channel reconnects by itself "
                            "(backoff capped at backend.grpc.max_backoff_s)")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BackendError(f"{where} rejected the observation: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "CLIENT: Received message larger than max" in details:
            return BackendError(f"{where}: reply larger than {_P}max_reply_bytes, dropped unread ({details})")
        if "larger than max" in details:
            return BackendError(f"{where} refused a message above its size cap ({details}); an observation larger "
                                f"than rt2-serve --max-request-bytes? send jpeg or smaller images")
        return BackendError(f"{where} is at capacity or the message is too large ({details})")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return BackendError(f"{where} does not implement {SERVICE_NAME} ({details}); is it an rt2-serve (or "
                            f"compatible) server of rt2_ros protocol v{PROTOCOL_VERSION}?")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return BackendError(f"{where} refused the call: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return BackendError(f"{where}: call cancelled ({details})")
    return BackendError(f"{where} failed with {code.name}: {details}")


def reply_from_proto(msg: Any, expected_seq: int, **status_context: Any) -> BackendReply:
    """The BackendReply in ``msg``; BackendError if it answers another observation or is malformed.

    ``status_context`` (target, timeout_s, has_token, tls) words an in-band stream error.
    """
    if msg.seq != expected_seq:
        raise BackendError(f"policy server answered observation seq {msg.seq} while waiting for seq "
                           f"{expected_seq}; reply dropped")
    which = msg.WhichOneof("answer")
    if which == "error":
        code = _STATUS_BY_NUMBER.get(msg.error.code, grpc.StatusCode.UNKNOWN)
        status_context.setdefault("target", "?")
        status_context.setdefault("timeout_s", float("nan"))
        raise error_from_status(code, msg.error.message, **status_context)
    backend = f"grpc:{snippet(msg.backend, 64)}" if msg.backend else "grpc"  # the server's text: cleaned
    server_time_s = msg.inference_s if msg.HasField("inference_s") else float("nan")
    if which == "text":
        return BackendReply(seq=expected_seq, backend=backend, text=msg.text, server_time_s=server_time_s)
    if which == "token_ids":
        return BackendReply(seq=expected_seq, backend=backend, token_ids=tuple(int(i) for i in msg.token_ids.ids),
                            server_time_s=server_time_s)
    if which == "actions":
        shape = tuple(int(s) for s in msg.actions.shape)
        values = np.asarray(msg.actions.values, dtype=np.float32)
        if len(shape) == 1:
            shape = (1, shape[0])
        if len(shape) != 2 or min(shape) < 1 or math.prod(shape) != values.size:
            raise BackendError(f"policy server sent a malformed action chunk: {values.size} values for shape "
                               f"{list(msg.actions.shape)} (expected (horizon, dim))")
        return BackendReply(seq=expected_seq, backend=backend, actions=values.reshape(shape),
                            server_time_s=server_time_s)
    raise BackendError("policy server reply carries no answer (no text, token_ids or actions)")


class _Stream:
    """One InferStream call: a request queue feeding the call and a reader thread draining it.

    Strictly one observation in flight (GrpcBackend holds its lock), so replies are in step with
    requests. After a timeout the whole stream is cancelled and replaced, so a late reply can
    never be taken for the next observation's answer.
    """

    _END = object()

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._call = stub.InferStream(self._request_iter(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="rt2-grpc-stream-reader", daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[Any]:
        while not self._closed.is_set():
            try:
                item = self._requests.get(timeout=0.5)  # wakes up to notice close()
            except queue.Empty:
                continue
            if item is self._END:
                return
            yield item

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._replies.put(reply)
            self._replies.put(self._END)
        except grpc.RpcError as exc:
            self._replies.put(exc)

    def exchange(self, request: Any, timeout_s: float) -> Any:
        """Send ``request``, return its reply; raises queue.Empty on timeout, grpc.RpcError, EOFError."""
        self._requests.put(request)
        item = self._replies.get(timeout=timeout_s)
        if item is self._END:
            raise EOFError("the server closed the stream")
        if isinstance(item, grpc.RpcError):
            self._replies.put(item)  # sticky: the stream is dead
            raise item
        return item

    def close(self) -> None:
        """Cancel the call; its reader thread ends by itself (never waited for: a call that is
        being abandoned at its deadline must not wait any longer)."""
        self._closed.set()
        self._requests.put(self._END)
        self._call.cancel()


class GrpcBackend(Backend):
    """Observation -> remote rt2_ros policy server -> BackendReply (see the module docstring)."""

    name = "grpc"
    OPTIONS = OPTIONS

    @classmethod
    def check_options(cls, options: dict) -> None:
        o = options
        target = o["target"].strip()
        if not target:
            raise BackendConfigError(f"{_P}target: empty; set it to host:port of the policy server")
        if ":" not in target:
            raise BackendConfigError(f"{_P}target: {target!r} has no port; use host:port, e.g. 10.0.0.5:50051")
        if o["tls"]:
            if bool(o["client_cert"]) != bool(o["client_key"]):
                raise BackendConfigError(f"{_P}client_cert and {_P}client_key go together (mutual TLS); set both "
                                         "or none")
            return
        for key in ("ca_cert", "client_cert", "client_key", "server_name_override"):
            if o[key]:
                raise BackendConfigError(f"{_P}{key} is set but {_P}tls is false; enable tls or clear {key}")
        # Two separate consents, neither implying the other: allow_plaintext for images and actions in
        # clear text to another machine, allow_insecure_token for the token in clear text (also to a
        # loopback target: the local end of an SSH tunnel, which the operator vouches for).
        check_plaintext(_P + "allow_plaintext", f"{_P}target {target!r} ({_P}tls: false)", target_host(target),
                        o["allow_plaintext"])
        if o["token_file"] and not o["allow_insecure_token"]:
            raise BackendConfigError(
                f"{_P}token_file is set but {_P}tls is false: the token would travel in clear text; enable tls "
                f"(or set {_P}allow_insecure_token: true behind an SSH tunnel or TLS-terminating proxy)")

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        super().__init__(options, tokenizer)
        o = options
        self.check_options(o)
        self.target: str = o["target"].strip()
        self._encoding: str = o["image_encoding"]
        self._jpeg_quality: int = o["jpeg_quality"]
        self._resize: bool = o["resize_to_server_size"]
        self._streaming: bool = o["use_streaming"]
        self._tls: bool = o["tls"]
        self._connect_timeout_s: float = o["connect_timeout_s"]
        token = read_token(_P + "token_file", o["token_file"]) if o["token_file"] else None
        self._has_token = token is not None
        # the token lives only in this tuple; it is never logged or put in an exception message
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = self._make_channel(o)
        self._stub = pb_grpc.PolicyStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._lock = threading.Lock()  # guards the stream
        self._stream: _Stream | None = None
        self.server_info: Any | None = None  # pb.ServerInfo once fetched
        self._probe_at_start()

    # -- set-up ---------------------------------------------------------------------------------

    def _make_channel(self, o: dict) -> grpc.Channel:
        max_backoff_ms = int(o["max_backoff_s"] * 1000)
        channel_options: list[tuple[str, Any]] = [
            ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
            ("grpc.initial_reconnect_backoff_ms", min(200, max_backoff_ms)),
            # in gRPC core this is the connection-attempt timeout
            ("grpc.min_reconnect_backoff_ms", int(self._connect_timeout_s * 1000)),
            ("grpc.max_receive_message_length", o["max_reply_bytes"]),
            ("grpc.primary_user_agent", f"rt2_ros/{__version__}"),
            # own subchannels: never share a connection (and its credentials) with another channel
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if o["keepalive_s"] > 0:
            channel_options += [("grpc.keepalive_time_ms", int(o["keepalive_s"] * 1000)),
                                ("grpc.keepalive_timeout_ms", 10_000)]
        if not self._tls:  # allowed by check_options
            return grpc.insecure_channel(self.target, options=channel_options)
        root = load_ca_bundle(_P + "ca_cert", o["ca_cert"]) if o["ca_cert"] else None
        cert, key = load_cert_and_key(_P + "client_cert", o["client_cert"], _P + "client_key", o["client_key"]) \
            if o["client_cert"] else (None, None)
        credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
        if o["server_name_override"]:
            channel_options.append(("grpc.ssl_target_name_override", o["server_name_override"]))
        return grpc.secure_channel(self.target, credentials, options=channel_options)

    def _status_context(self, timeout_s: float) -> dict[str, Any]:
        return {"target": self.target, "timeout_s": timeout_s, "has_token": self._has_token, "tls": self._tls}

    def _probe_at_start(self) -> None:
        """Health and GetInfo once, waiting up to connect_timeout_s for the server; never fatal
        for an unreachable server (the robot may start first), fatal for a wrong model setup."""
        try:
            try:
                status = self.check_health(self._connect_timeout_s, wait_for_ready=True)
            except BackendTimeout:
                # waiting for readiness hides why the server is not ready; one fail-fast call reports the cause
                status = self.check_health(min(1.0, self._connect_timeout_s))
        except BackendError as exc:
            _log.warning("grpc backend: %s; infer() fails until the server is reachable", exc)
            return
        _log.info("grpc backend: %s health %s", self.target, status)
        try:
            info = self._fetch_info(self._connect_timeout_s)
        except ProtocolMismatch as exc:
            raise BackendConfigError(str(exc)) from None
        except BackendError as exc:
            _log.warning("grpc backend: GetInfo failed: %s", exc)
            return
        problem = self._info_problem(info)
        if problem:
            raise BackendConfigError(problem)

    def check_health(self, timeout_s: float, *, wait_for_ready: bool = False) -> str:
        """The server's standard gRPC health status ("SERVING", "NOT_SERVING", ...).

        Asks for the policy service first, then the whole server ("") when the service is not
        registered. Raises BackendError when the server cannot be asked.
        """
        for service in (SERVICE_NAME, ""):
            try:
                resp = self._bounded(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s,
                                     wait_for_ready=wait_for_ready)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and service:
                    continue
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return "UNIMPLEMENTED"
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise BackendTimeout(f"policy server {self.target} not reachable within {timeout_s:.1f} s; "
                                         "check backend.grpc.target, that rt2-serve runs, and the firewall") from None
                raise error_from_status(exc.code(), exc.details(), **self._status_context(timeout_s)) from None
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return "SERVICE_UNKNOWN"

    def _fetch_info(self, timeout_s: float) -> Any:
        """GetInfo; ProtocolMismatch when the server speaks another protocol version."""
        try:
            info = self._bounded(self._stub.GetInfo, pb.InfoRequest(), timeout_s)
        except grpc.RpcError as exc:
            mismatch = self._version_refusal(exc)
            if mismatch:
                raise ProtocolMismatch(mismatch) from None
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise error_from_status(exc.code(), exc.details(), **self._status_context(timeout_s)) from None
            older = self._older_server(timeout_s)
            if older:
                raise ProtocolMismatch(older) from None
            _log.warning("grpc backend: %s has no GetInfo; tokenizer profile, image size and cameras are not checked",
                         self.target)
            info = pb.ServerInfo()
        self.server_info = info
        size = f"{info.image_width}x{info.image_height}" if info.image_width else "any size"
        cameras = "cameras " + snippet(", ".join(info.cameras)) if info.cameras else "any cameras"
        _log.info("grpc backend: %s serves backend %r model %r, tokenizer %r, images %s, %s, protocol v%d, "
                  "rt2_ros %s", self.target, snippet(info.backend, 80), snippet(info.model, 200),
                  snippet(info.tokenizer_profile, 80), size, cameras, info.protocol_version,
                  snippet(info.server_version, 40) or "?")
        return info

    def _upgrade_hint(self, theirs: int) -> str:
        if theirs < PROTOCOL_VERSION:
            return f"upgrade rt2-serve on the server to this robot's rt2_ros ({__version__})"
        return "upgrade rt2_ros on the robot to the server's version"

    def _version_refusal(self, exc: grpc.RpcError) -> str | None:
        """The mismatch a server reported in its refusal's ``rt2_ros-protocol-version`` trailer, or None."""
        trailer = next((str(v) for k, v in (exc.trailing_metadata() or ()) if k == VERSION_TRAILER), None)
        if trailer is None or not trailer.isdigit() or int(trailer) == PROTOCOL_VERSION:
            return None
        theirs = int(trailer)
        age = "an older" if theirs < PROTOCOL_VERSION else "a newer"
        return (f"policy server {self.target} speaks {age} rt2_ros protocol (v{theirs}) than this robot "
                f"(v{PROTOCOL_VERSION}); {self._upgrade_hint(theirs)} (server: {snippet(exc.details() or '')})")

    def _older_server(self, timeout_s: float) -> str | None:
        """Why the server is an rt2-serve of an older protocol version, or None when it is not one.

        Such a server lacks this version's service, so it answers our GetInfo UNIMPLEMENTED; it is
        recognised by answering an older version's GetInfo (raw bytes both ways: no old .proto is
        needed, and ServerInfo fields 1..8 read alike in every version).
        """
        for version in range(PROTOCOL_VERSION - 1, 0, -1):
            call = self._channel.unary_unary(f"/{service_name(version)}/GetInfo")
            try:
                raw = self._bounded(call, b"", timeout_s)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raw = b""  # the method exists, only our credentials are refused: still an old server
                else:
                    continue  # UNIMPLEMENTED: not this version either; anything else: cannot tell
            try:
                old = pb.ServerInfo.FromString(raw)
            except DecodeError:  # not an rt2_ros answer
                continue
            theirs = old.protocol_version or version
            release = f", rt2_ros {snippet(old.server_version, 40)}" if old.server_version else ""
            return (f"policy server {self.target} speaks an older rt2_ros protocol (v{theirs}{release}) than this "
                    f"robot (v{PROTOCOL_VERSION}); {self._upgrade_hint(theirs)}")
        return None

    def _info_problem(self, info: Any) -> str | None:
        """Why answers from this server would be misread here, or None."""
        if info.protocol_version and info.protocol_version != PROTOCOL_VERSION:
            return (f"policy server {self.target} reports rt2_ros protocol v{info.protocol_version}, this robot "
                    f"speaks v{PROTOCOL_VERSION}; {self._upgrade_hint(info.protocol_version)}")
        local = getattr(self.tokenizer, "profile", None)
        if info.tokenizer_profile and local and info.tokenizer_profile != local:
            theirs = snippet(info.tokenizer_profile, 80)
            return (f"policy server {self.target} uses tokenizer profile {theirs!r} but this "
                    f"robot uses {local!r}; set tokenizer.profile: {theirs} (answers would be "
                    "decoded wrongly)")
        return None

    def _cameras_to_send(self, observation: Observation, needed: Sequence[str]) -> Sequence[str] | None:
        """The cameras the server needs (None = all of the observation's); BackendError if one is missing."""
        if not needed:
            return None
        missing = [name for name in needed if name not in observation.images]
        if missing:
            raise BackendError(
                f"policy server {self.target} needs cameras {list(needed)} but this observation has no frame of "
                f"{missing} (it has {list(observation.images)}); list them in cameras.names with these names, "
                "or serve the model with a matching rt2-serve --cameras")
        return needed

    # -- calls ----------------------------------------------------------------------------------

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        """Thread-safe. Unary calls run concurrently; streaming calls take turns on the one stream."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        deadline = time.monotonic() + timeout_s
        try:
            info = self.server_info
            if info is None:  # not fetched yet, or forgotten after the server went away
                info = self._fetch_info(self._remaining(deadline, timeout_s))
                problem = self._info_problem(info)
                if problem:
                    self.server_info = None
                    raise BackendError(problem)
            resize_to = None
            if self._resize and info.image_width and info.image_height:
                resize_to = (int(info.image_height), int(info.image_width))
            cameras = self._cameras_to_send(observation, info.cameras)
            try:
                request = observation_to_proto(observation, self._encoding, self._jpeg_quality, resize_to=resize_to,
                                               timeout_s=self._remaining(deadline, timeout_s), cameras=cameras)
            except imaging.ImageEncodeError as exc:
                raise BackendError(f"cannot encode the observation image: {exc}") from None
            if self._streaming:
                msg = self._call_stream(request, deadline, timeout_s)
            else:
                msg = self._call_unary(request, self._remaining(deadline, timeout_s))
            return reply_from_proto(msg, observation.seq, **self._status_context(timeout_s))
        except BackendError as exc:
            if getattr(exc, "grpc_code", None) in _ASK_AGAIN:
                self.server_info = None  # a restarted server may host another model or protocol: ask again
            raise

    def _bounded(self, method: Any, request: Any, timeout_s: float, **kwargs: Any) -> Any:
        """``method(request)`` with gRPC deadline ``timeout_s``, returning or raising within
        ``timeout_s`` + _ABANDON_GRACE_S whatever the connection does.

        gRPC's deadline alone does not end every call: a message that is still being written to a
        server that stopped reading (its socket buffers full) keeps the blocking call — and the
        channel's close() — waiting until the connection breaks. The future API lets the caller
        leave at the deadline; the call is cancelled and left to gRPC to finish.
        """
        future = method.future(request, timeout=timeout_s, metadata=self._metadata, **kwargs)
        try:
            return future.result(timeout=timeout_s + _ABANDON_GRACE_S)
        except grpc.FutureTimeoutError:
            future.cancel()
            raise BackendTimeout(f"policy server {self.target}: no answer within {timeout_s:.3f} s (the request "
                                 "could not even be sent: the server stopped reading); call abandoned") from None

    def _remaining(self, deadline: float, timeout_s: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendTimeout(f"policy server {self.target}: no answer within {timeout_s:.3f} s")
        return remaining

    def _call_unary(self, request: Any, timeout_s: float) -> Any:
        try:
            return self._bounded(self._stub.Infer, request, timeout_s)
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details(), **self._status_context(timeout_s)) from None

    def _call_stream(self, request: Any, deadline: float, timeout_s: float) -> Any:
        # one observation in flight on the stream at a time, so replies stay in step with requests
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise BackendTimeout(f"policy server {self.target}: the stream was busy with the previous observation "
                                 f"for {timeout_s:.3f} s")
        try:
            remaining = self._remaining(deadline, timeout_s)
            if self._stream is None:
                self._stream = _Stream(self._stub, self._metadata)
            try:
                return self._stream.exchange(request, remaining)
            except queue.Empty:
                self._drop_stream()  # its late reply must never be read as the next observation's answer
                raise BackendTimeout(f"policy server {self.target}: no answer within {timeout_s:.3f} s "
                                     "(stream reopened)") from None
            except grpc.RpcError as exc:
                self._drop_stream()
                raise error_from_status(exc.code(), exc.details(), **self._status_context(timeout_s)) from None
            except EOFError:
                self._drop_stream()
                raise BackendError(f"policy server {self.target} closed the stream; it is reopened on the next "
                                   "call") from None
        finally:
            self._lock.release()

    def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def reset(self) -> None:
        """Forward the new episode to the server (a no-op for servers without Reset)."""
        timeout_s = self._connect_timeout_s
        if not self._lock.acquire(timeout=timeout_s):
            raise BackendTimeout(f"policy server {self.target}: reset() waited {timeout_s:.1f} s for a running "
                                 "infer() call")
        try:
            self._drop_stream()
            self._bounded(self._stub.Reset, pb.ResetRequest(), timeout_s)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise error_from_status(exc.code(), exc.details(), **self._status_context(timeout_s)) from None
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the channel; never waits more than a second (see _bounded for why it could)."""
        with contextlib.suppress(Exception):
            self._drop_stream()
        closer = threading.Thread(target=self._channel.close, name="rt2-grpc-close", daemon=True)
        closer.start()
        closer.join(timeout=1.0)
        if closer.is_alive():
            _log.warning("grpc backend: a call to %s is stuck writing to a server that stopped reading; the channel "
                         "closes once the connection breaks", self.target)


__all__ = ["OPTIONS", "GrpcBackend", "ProtocolMismatch", "error_from_status", "observation_to_proto", "read_token",
           "reply_from_proto", "state_to_proto"]
