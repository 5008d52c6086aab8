"""``rt2-serve``: host any in-process VLA backend behind rt2_ros's gRPC policy protocol.

Run it on the GPU box; point the robot's ``grpc`` backend at it::

    rt2-serve --backend local --params config/server.yaml --host 0.0.0.0 --port 50051 \\
        --tls-cert server.crt --tls-key server.key --token-file token.txt

The backend is built exactly as on the robot (``rt2_ros.backends.create_backend`` from the
``backend.<type>.*`` and ``tokenizer.*`` keys of a ROS params YAML), so one file describes a
model whether it runs on the robot or here.

Security model (see docs/grpc.md):

* Binds to 127.0.0.1 by default: a policy server drives a robot arm, so it must never be
  reachable from the network by accident without authentication. On any other ``--host`` (0.0.0.0,
  ``::``, a LAN address, a name other than ``localhost``: names are not resolved) it refuses to
  start (exit 2, naming what is missing) without TLS **and** client authentication (a token or
  ``--client-ca``), unless ``--insecure``, the operator's consent to exactly that, logged at start.
* ``--tls-cert/--tls-key`` for TLS, plus ``--client-ca`` to require client certificates (mTLS). The
  files are parsed at start-up and the key checked against the certificate
  (:mod:`rt2_ros.backends.transport_security`); a bad one exits 2 naming the flag and the file.
* ``--token-file``: every call must carry ``authorization: Bearer <token>``; a server
  interceptor checks it with a constant-time compare (no timing oracle). A token over
  plaintext leaks to anyone on the path, so a token without TLS is refused unless
  ``--allow-insecure-token``: meant for a loopback ``--host`` behind a TLS-terminating proxy on this
  machine. The two consents stay separate: ``--insecure`` never lets a token travel in clear text,
  and ``--allow-insecure-token`` never opens a network address.
* ``--max-calls-per-client`` (default 4): concurrent calls per client host (the peer's address: one
  robot may open several connections); above it RESOURCE_EXHAUSTED at once, naming the flag. A robot
  needs one stream or one call at a time; 4 leaves room for a reconnect overlapping the old stream,
  not for a flood. Health checks are not counted; the token is checked first, so unauthenticated
  calls never take a slot. A slot is freed however its call ends (answered, failed, cancelled, past
  its deadline, client gone). Behind a proxy every robot has the proxy's address: raise the bound.
  ``--workers`` bounds all clients together.
* Refused calls (auth, the per-client limit, another protocol version) are counted per reason and
  client in the summary line and logged at a bounded rate (:class:`RefusalLog`): a client's first
  refusal, then at most one line per client and reason every 10 s carrying how many were not
  logged, and at most 20 such lines per 10 s in all, so a flood of bad calls cannot flood the log.
* Every call is bounded on the server too: an observation waits for the model and is handed a
  budget of at most the client's deadline and ``--infer-timeout-s`` (also when the client sets no
  deadline); ``Reset`` waits for the model as long.
* No pickle: requests are protobuf data only (LeRobot's pickled gRPC payloads let any peer run
  code on the server). Decoded images are size-limited (``--max-image-pixels`` each, at most
  16 cameras per observation), state vectors length-limited and checked finite.
* Message size caps both ways: an observation above ``--max-request-bytes`` is refused by gRPC
  before it is read (default: raw rgb8 images of ``--max-image-pixels`` for each of ``--cameras``,
  two without it, plus 1 MiB), a reply above ``--max-reply-bytes`` (default 1 MiB; an answer
  needs a few kB) is answered RESOURCE_EXHAUSTED instead of being sent.
* Standard gRPC health checking (``grpc.health.v1``) is served without the token, so load
  balancers and probes can use it; it reveals only SERVING / NOT_SERVING.

Protocol v2: an observation carries named cameras and stamped proprioception; they are
decoded into :class:`rt2_ros.actions.Observation` (``images``, ``image_stamps``, ``state_stamps``)
for the hosted backend. ``--cameras`` declares the cameras the model needs (advertised in
``GetInfo``; they lead ``Observation.images`` in that order). A robot of another protocol version
calls another service name (the package embeds the version); rather than a bare UNIMPLEMENTED it
gets FAILED_PRECONDITION saying which side to upgrade (:class:`OtherVersionHandler`).

One model instance serves all clients; inference calls are serialised by a lock (a GPU model is
not re-entrant) and a request that can no longer be answered within its deadline is skipped
rather than computed for nobody. Rejected: a home-made batching/serving layer (use Ray Serve or
vLLM for fleets; they can implement the same proto).
"""

from __future__ import annotations

import argparse
import hmac
import importlib
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rt2_ros import __version__, imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import BACKENDS, Backend, BackendConfigError, BackendError, BackendTimeout, create_backend
from rt2_ros.backends.proto import PROTOCOL_VERSION, SERVICE_NAME, VERSION_TRAILER, load
from rt2_ros.backends.transport_security import is_loopback, load_ca_bundle, load_cert_and_key, read_file
from rt2_ros.params import ConfigError, flatten, resolve

pb, pb_grpc = load()

_log = logging.getLogger("rt2_ros.serve")

DEFAULT_HOST = "127.0.0.1"  # never exposed by accident; --host 0.0.0.0 is a deliberate choice
DEFAULT_PORT = 50051
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_CAMERAS = 16  # per observation: each may decode to --max-image-pixels
MAX_CAMERA_NAME = 128  # characters
MAX_STATE_VALUES = 256  # per joint vector
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024  # an answer (text, 8 ids, an action chunk) needs a few kB
# A robot holds one stream or one unary call at a time; a reconnect may overlap the old stream
# briefly and a health probe is not counted: 4 leaves room for that, not for a flood.
DEFAULT_MAX_CALLS_PER_CLIENT = 4
_PEERS_REMEMBERED = 1024  # peers whose refusals are tracked for the log rate limit
REFUSAL_LINES_PER_INTERVAL = 20  # refused-call log lines per refusal_log_interval_s, all clients together
_GRPC_MAX_MESSAGE = 2**31 - 1  # gRPC's message size options are int32
# any version's service: rt2_ros.policy.v<N>.Policy (the package name embeds the protocol version)
# (ASCII, at most 6 digits: the method is the caller's text, and int() of 5,000 digits raises)
_PROTOCOL_METHOD = re.compile(r"/rt2_ros\.policy\.v(\d{1,6})\.Policy/(\w+)", re.ASCII)


class RequestError(Exception):
    """One request cannot be answered; carries the gRPC status code to report."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- params YAML ----------------------------------------------------------------------------------


def _parameter_sections(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, dict]]:
    """(node name, ros__parameters) for every node in a ROS params file, namespaces included."""
    if not isinstance(tree, Mapping):
        return
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            continue
        if isinstance(value.get("ros__parameters"), Mapping):
            yield "/".join((*path, str(key))), dict(value["ros__parameters"])
        else:
            yield from _parameter_sections(value, (*path, str(key)))


def load_params(path: str | Path, node: str | None = None) -> dict[str, Any]:
    """Flat dotted parameters of the node in ROS params file ``path`` that configures a backend.

    ``node`` picks one when several nodes have a ``backend`` section. ConfigError otherwise.
    """
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"--params: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--params: {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--params: {str(path)!r} is not valid YAML ({exc})") from None
    sections = {name: flatten(params) for name, params in _parameter_sections(tree)}
    if not sections:
        raise ConfigError(f"--params: {str(path)!r} is not a ROS params file (<node>: ros__parameters: {{...}})")
    with_backend = {n: p for n, p in sections.items() if any(k.startswith("backend.") for k in p)}
    if node is not None:
        match = [n for n in sections if n == node or n.rsplit("/", 1)[-1] == node]
        if len(match) != 1:
            raise ConfigError(f"--node: {node!r} is not a node in {str(path)!r} (nodes: {sorted(sections)})")
        return sections[match[0]]
    if len(with_backend) == 1:
        return next(iter(with_backend.values()))
    if not with_backend:
        raise ConfigError(f"--params: no node in {str(path)!r} has a 'backend' section")
    raise ConfigError(f"--params: several nodes in {str(path)!r} have a 'backend' section "
                      f"({sorted(with_backend)}); pick one with --node")


def build_backend(flat: Mapping[str, Any], backend_type: str | None, backend_class: str | None
                  ) -> tuple[Backend, str, Any]:
    """(backend, its type name, tokenizer) from flat params; ``backend_class`` is "module:Class"."""
    from rt2_ros.tokens import ActionTokenizer

    tokenizer = ActionTokenizer.from_config({k: v for k, v in flat.items() if k.startswith("tokenizer.")})
    if backend_class is None:
        if backend_type is None:
            raise ConfigError("--backend is required (or --backend-class)")
        prefix = f"backend.{backend_type}."
        options = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        return create_backend(backend_type, options, tokenizer), backend_type, tokenizer
    module_name, _, class_name = backend_class.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"--backend-class: expected module:Class, got {backend_class!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--backend-class: cannot load {backend_class!r} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"--backend-class: {backend_class!r} is not a rt2_ros.backends.Backend subclass")
    name = backend_type or cls.name
    prefix = f"backend.{name}."
    given = {k: v for k, v in flat.items() if k.startswith(prefix)}
    resolved = resolve(cls.OPTIONS, given) if cls.OPTIONS else {}
    if not cls.OPTIONS and given:
        raise BackendConfigError(f"{next(iter(given))}: backend {name!r} takes no options")
    return cls({k[len(prefix):]: v for k, v in resolved.items()}, tokenizer), name, tokenizer


# -- wire conversion ------------------------------------------------------------------------------


def _decode_image(img: Any, where: str, max_pixels: int) -> np.ndarray:
    """The uint8 HxWx3 RGB array in wire Image ``img``; ValueError starting with ``where`` if malformed."""
    if img.format in (pb.Image.JPEG, pb.Image.PNG):
        try:
            # the header's size first: a few hundred bytes may declare gigabytes of pixels
            width, height = imaging.declared_size(img.data)
            if width * height > max_pixels:
                raise ValueError(f"{where}: {width}x{height} exceeds the server limit of {max_pixels} pixels")
            image = imaging.decode_image(img.data)
        except imaging.ImageEncodeError as exc:
            raise ValueError(f"{where}: cannot decode {pb.Image.Format.Name(img.format)} data ({exc})") from None
        if image.shape[:2] != (height, width):
            raise ValueError(f"{where}: decoded {image.shape[1]}x{image.shape[0]}, its header says {width}x{height}")
        return image
    if img.format == pb.Image.RAW:
        if img.raw_encoding != "rgb8":
            raise ValueError(f"{where}: raw_encoding must be 'rgb8', got {img.raw_encoding!r}")
        if img.width == 0 or img.height == 0:
            raise ValueError(f"{where}: RAW needs width and height > 0")
        if img.width * img.height > max_pixels:
            raise ValueError(f"{where}: {img.width}x{img.height} exceeds the server limit of {max_pixels} pixels")
        expected = img.width * img.height * 3
        if len(img.data) != expected:
            raise ValueError(f"{where}: RAW rgb8 {img.width}x{img.height} needs {expected} bytes, got {len(img.data)}")
        return np.frombuffer(img.data, dtype=np.uint8).reshape(img.height, img.width, 3).copy()
    raise ValueError(f"{where}: format must be JPEG, PNG or RAW")


def is_camera_name(name: str) -> bool:
    """A usable camera name on the wire and in ``--cameras``: printable, no spaces, 1..MAX_CAMERA_NAME characters."""
    return 0 < len(name) <= MAX_CAMERA_NAME and name.isprintable() and not any(c.isspace() for c in name)


def _finite_stamp(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{where}: non-finite stamp {value}")
    return float(value)


def _vector(values: Any, where: str, sizes: tuple[int, ...] | None = None) -> np.ndarray | None:
    """``values`` as float64 (None when empty); ValueError on a wrong length or a non-finite value."""
    if not values:
        return None
    if sizes is not None and len(values) not in sizes:
        raise ValueError(f"{where}: expected {' or '.join(map(str, sizes))} values, got {len(values)}")
    if sizes is None and len(values) > MAX_STATE_VALUES:
        raise ValueError(f"{where}: {len(values)} values exceed the server limit of {MAX_STATE_VALUES}")
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{where}: non-finite value in {array.tolist()}")
    return array


def state_from_proto(state: Any) -> dict[str, Any]:
    """Observation keyword arguments (proprioception and ``state_stamps``) from wire RobotState ``state``."""
    kwargs: dict[str, Any] = {
        "ee_position": _vector(state.ee_position, "state.ee_position", (3,)),
        "ee_orientation": _vector(state.ee_orientation, "state.ee_orientation", (4,)),
        "gripper": float(state.gripper) if state.HasField("gripper") else None,
        "joint_positions": _vector(state.joint_positions, "state.joint_positions"),
        "gripper_positions": _vector(state.gripper_positions, "state.gripper_positions"),
    }
    if kwargs["gripper"] is not None and not math.isfinite(kwargs["gripper"]):
        raise ValueError(f"state.gripper: non-finite closedness {kwargs['gripper']}")
    sent = {"ee_pose": kwargs["ee_position"] is not None or kwargs["ee_orientation"] is not None,
            **{piece: kwargs[piece] is not None for piece in ("gripper", "joint_positions", "gripper_positions")}}
    stamps: dict[str, float] = {}
    for piece, present in sent.items():
        key = f"{piece}_stamp"
        if state.HasField(key):
            if not present:
                raise ValueError(f"state.{key} is set but the robot sent no {piece}")
            stamps[piece] = _finite_stamp(getattr(state, key), f"state.{key}")
    return {**kwargs, "state_stamps": stamps}


def observation_from_proto(msg: Any, max_pixels: int, cameras: Sequence[str] = ()) -> Observation:
    """The Observation in wire message ``msg``; ValueError with a client-facing message if malformed.

    ``cameras``: the cameras the hosted model needs, its primary first (``--cameras``); each must be
    in the message, and they lead ``Observation.images`` in this order (the others follow in wire
    order). Empty: the wire order as sent, its first camera the primary.
    """
    if not msg.images:
        raise ValueError("images: the observation carries no camera image (rt2_ros protocol v2 sends each camera "
                         "in Observation.images)")
    if len(msg.images) > MAX_CAMERAS:
        raise ValueError(f"images: {len(msg.images)} cameras exceed the server limit of {MAX_CAMERAS}")
    images: dict[str, np.ndarray] = {}
    image_stamps: dict[str, float] = {}
    for i, cam in enumerate(msg.images):
        name = cam.camera
        if not name:
            raise ValueError(f"images[{i}].camera: empty camera name")
        if not is_camera_name(name):
            raise ValueError(f"images[{i}].camera: {name[:MAX_CAMERA_NAME]!r} is not a camera name (printable, no "
                             f"spaces, at most {MAX_CAMERA_NAME} characters)")
        if name in images:
            raise ValueError(f"images[{i}].camera: duplicate camera name {name!r}")
        if not cam.HasField("image"):
            raise ValueError(f"images[{i}] (camera {name!r}): no image")
        images[name] = _decode_image(cam.image, f"camera {name!r}", max_pixels)
        if cam.HasField("stamp"):
            image_stamps[name] = _finite_stamp(cam.stamp, f"images[{i}].stamp (camera {name!r})")
    missing = [name for name in cameras if name not in images]
    if missing:
        raise ValueError(f"images: the hosted model needs cameras {list(cameras)} (rt2-serve --cameras) but "
                         f"{missing} did not come (the robot sent {list(images)})")
    if cameras:
        images = {**{name: images[name] for name in cameras}, **images}
    primary = next(iter(images))
    stamp = image_stamps.get(primary, _finite_stamp(msg.stamp, "stamp"))
    state = state_from_proto(msg.state) if msg.HasField("state") else {}
    return Observation(image=images[primary], instruction=msg.instruction, seq=int(msg.seq), stamp=stamp,
                       images=images, image_stamps=image_stamps, **state)


def reply_to_proto(reply: BackendReply, seq: int, *, inference_s: float, backend: str, model: str) -> Any:
    """The wire message for a backend's reply; ValueError if the reply is not exactly one answer for ``seq``."""
    if reply.seq != seq:
        raise ValueError(f"backend answered seq {reply.seq} for observation seq {seq}")
    answers = [name for name in ("text", "token_ids", "actions") if getattr(reply, name) is not None]
    if len(answers) != 1:
        raise ValueError(f"backend reply must carry exactly one of text/token_ids/actions, got {answers or 'none'}")
    msg = pb.InferReply(seq=seq, inference_s=inference_s, backend=backend, model=model)
    if reply.text is not None:
        msg.text = reply.text
    elif reply.token_ids is not None:
        msg.token_ids.ids.extend(int(i) for i in reply.token_ids)
    else:
        actions = np.asarray(reply.actions, dtype=np.float32)
        if actions.ndim == 1:
            actions = actions.reshape(1, -1)
        if actions.ndim != 2 or actions.size == 0:
            raise ValueError(f"backend action chunk must be (horizon, dim), got shape {actions.shape}")
        msg.actions.values.extend(actions.ravel().tolist())
        msg.actions.shape.extend(actions.shape)
    return msg


# -- server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tls_cert: bytes | None = None
    tls_key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = None  # set: client certificates are required (mTLS)
    token: bytes | None = field(default=None, repr=False)  # never logged
    workers: int = 8
    infer_timeout_s: float = 30.0  # s, upper bound when the client sent no deadline
    max_image_pixels: int = 4096 * 4096
    max_request_bytes: int | None = None  # None: derived, see request_bytes_cap()
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    image_size: tuple[int, int] | None = None  # (width, height) advertised in GetInfo
    cameras: tuple[str, ...] = ()  # cameras the hosted model needs, its primary first; () = any
    summary_interval_s: float = 30.0
    grace_s: float = 2.0  # s given to running calls at shutdown
    max_calls_per_client: int = DEFAULT_MAX_CALLS_PER_CLIENT
    refusal_log_interval_s: float = 10.0  # s between log lines about one peer's refused calls


def request_bytes_cap(config: ServeConfig) -> int:
    """Largest observation message accepted: ``config.max_request_bytes``, or by default the largest
    legitimate one — a raw rgb8 image of ``max_image_pixels`` for each camera of ``cameras`` (two
    without it: a scene and a wrist camera) plus 1 MiB for the rest (state, instruction, framing)."""
    if config.max_request_bytes is not None:
        return config.max_request_bytes
    cameras = len(config.cameras) or 2
    return min(cameras * 3 * config.max_image_pixels + 1024 * 1024, _GRPC_MAX_MESSAGE)


class CallStats:
    """Counters for the periodic info-level summary line (answered, failed, refused by reason and client)."""

    def __init__(self, interval_s: float) -> None:
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self._since = now
        self._ok = self._errors = 0
        self._total_s = self._max_s = 0.0
        self._refused: Counter[str] = Counter()
        self._refused_by: dict[str, Counter[str]] = {}  # why -> client host -> count (at most _PEERS_REMEMBERED)

    def refused(self, why: str, host: str) -> None:
        """Count a call refused before it reached the model (auth, per-client limit, protocol version)."""
        with self._lock:
            self._refused[why] += 1
            hosts = self._refused_by.setdefault(why, Counter())
            if host in hosts or len(hosts) < _PEERS_REMEMBERED:
                hosts[host] += 1
            line = self._due(time.monotonic())
        if line:  # a flood of refused calls alone still gets its summary line
            _log.info(line)

    def record(self, ok: bool, inference_s: float) -> None:
        with self._lock:
            if ok:
                self._ok += 1
                self._total_s += inference_s
                self._max_s = max(self._max_s, inference_s)
            else:
                self._errors += 1
            line = self._due(time.monotonic())
        if line:
            _log.info(line)

    def _due(self, now: float) -> str | None:
        """The summary line when the interval has passed (counters then restart); caller holds the lock."""
        if now - self._since < self._interval_s:
            return None
        line = self._line(now)
        self._reset(now)
        return line

    def _line(self, now: float) -> str:
        mean_ms = 1000 * self._total_s / self._ok if self._ok else 0.0
        refused = ""
        for why, n in sorted(self._refused.items()):
            hosts = self._refused_by[why]
            top, top_n = hosts.most_common(1)[0]
            clients = f"{len(hosts)} clients" if len(hosts) < _PEERS_REMEMBERED else f">= {len(hosts)} clients"
            refused += f", {n} refused ({why}) from {clients if len(hosts) > 1 else '1 client'}, most {top} ({top_n})"
        return (f"last {now - self._since:.0f} s: {self._ok} answered, {self._errors} failed{refused}; "
                f"inference mean {mean_ms:.1f} ms, max {1000 * self._max_s:.1f} ms")

    def flush(self) -> None:
        with self._lock:
            if self._ok or self._errors or self._refused:
                _log.info(self._line(time.monotonic()))
            self._reset(time.monotonic())


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:10.0.0.5:40000" -> "10.0.0.5", "ipv6:%5B::1%5D:5" -> "::1");
    one robot may open several connections, so limits and logs go by host, not by connection."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)  # gRPC percent-encodes the brackets of an IPv6 peer (grpcio 1.85: "ipv6:%5B::1%5D:5")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return kind or peer  # unix sockets and the like: one local peer


class RefusalLog:
    """Counts refused calls and logs them at a bounded rate: the first refusal of a client (host) for
    one reason is logged, then at most one line per client and reason every ``interval_s`` saying how
    many were refused since; and at most ``max_lines`` lines per ``interval_s`` in all, so a client
    with many addresses (an IPv6 prefix) cannot flood the log either. What is not logged is still
    counted in the summary line."""

    def __init__(self, stats: CallStats, interval_s: float, max_lines: int = REFUSAL_LINES_PER_INTERVAL) -> None:
        self._stats = stats
        self._interval_s = interval_s
        self._max_lines = max_lines
        self._lock = threading.Lock()
        # (host, why) -> [time of its last line, refusals since then not logged]
        self._peers: OrderedDict[tuple[str, str], list[float | int]] = OrderedDict()
        self._window_start = -math.inf  # the all-clients line budget of the current interval
        self._window_lines = 0
        self.total: Counter[str] = Counter()

    def record(self, why: str, peer: str, method: str, reason: str) -> None:
        now = time.monotonic()
        host = peer_host(peer)
        self._stats.refused(why, host)
        key = (host, why)
        with self._lock:
            self.total[why] += 1
            entry = self._peers.setdefault(key, [-math.inf, 0])  # [time of its last line, refused since]
            if now - entry[0] < self._interval_s:
                entry[1] += 1
                return
            if now - self._window_start >= self._interval_s:
                self._window_start, self._window_lines = now, 0
            self._window_lines += 1
            if self._window_lines > self._max_lines:
                entry[1] += 1  # stays due: its next line, once there is budget, carries the count
                self._trim()
                if self._window_lines > self._max_lines + 1:
                    return
                line = (f"more than {self._max_lines} lines about refused calls within {self._interval_s:g} s: "
                        "further refusals are only counted in the summary line for now")
            else:
                suppressed = entry[1]
                entry[:] = [now, 0]
                self._peers.move_to_end(key)
                self._trim()
                more = f" ({suppressed} more refused since the last line)" if suppressed else ""
                line = f"refused {method} from {unquote(peer)}: {reason}{more}"  # "ipv6:[::1]:5", not %5B
        _log.warning("%s", line)

    def _trim(self) -> None:
        while len(self._peers) > _PEERS_REMEMBERED:
            self._peers.popitem(last=False)


def _replace_behaviour(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]
                       ) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour function replaced by ``wrap(behaviour, response_streaming)``."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
             ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler),
             ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for attr, make in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(wrap(behaviour, handler.response_streaming), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _deny(handler: grpc.RpcMethodHandler | None, method: str, reason: str, refusals: RefusalLog
          ) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED (counted, rate-limited log)."""
    if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
        return None

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        refusals.record("auth", context.peer(), method, reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class PerClientLimit(grpc.ServerInterceptor):
    """At most ``limit`` concurrent calls per client host (health checks excepted); one more is
    answered RESOURCE_EXHAUSTED at once. The slot is released when the call ends however it ends
    (answered, failed, cancelled, deadline, client gone): by the call's termination callback, and
    by the behaviour's own exit, whichever comes first."""

    def __init__(self, limit: int, refusals: RefusalLog) -> None:
        self._limit = limit
        self._refusals = refusals
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()

    def in_flight(self, host: str) -> int:
        with self._lock:
            return self._calls[host]

    def _acquire(self, context: grpc.ServicerContext, method: str) -> Callable[[], None]:
        host = peer_host(context.peer())
        with self._lock:
            admitted = self._calls[host] < self._limit
            if admitted:
                self._calls[host] += 1
        if not admitted:
            reason = f"more than {self._limit} concurrent calls from {host} (rt2-serve --max-calls-per-client)"
            self._refusals.record("per-client limit", context.peer(), method, reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if released.is_set():
                    return
                released.set()
                self._calls[host] -= 1
                if self._calls[host] <= 0:
                    del self._calls[host]

        context.add_callback(release)
        return release

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        method = details.method

        def wrap(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    release = self._acquire(context, method)
                    try:
                        yield from behaviour(request, context)
                    finally:
                        release()
                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                release = self._acquire(context, method)
                try:
                    return behaviour(request, context)
                finally:
                    release()
            return unary

        return _replace_behaviour(handler, wrap)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call (health checks excepted) without ``authorization: Bearer <token>``."""

    def __init__(self, token: bytes, refusals: RefusalLog) -> None:
        self._token = token
        self._refusals = refusals

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(HEALTH_PREFIX):  # probes carry no token; status only
            return continuation(details)
        presented = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if presented is None:
            return _deny(continuation(details), details.method, "missing bearer token", self._refusals)
        scheme, _, credential = str(presented).partition(" ")
        # compare_digest: the time taken does not depend on where the strings differ
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token):
            return continuation(details)
        return _deny(continuation(details), details.method, "invalid bearer token", self._refusals)


def version_refusal(theirs: int) -> str:
    """What rt2-serve answers a caller of protocol version ``theirs`` (!= PROTOCOL_VERSION)."""
    if theirs < PROTOCOL_VERSION:
        return (f"this rt2-serve speaks rt2_ros protocol v{PROTOCOL_VERSION}, the robot v{theirs}; upgrade the "
                f"robot's rt2_ros to {__version__} (or serve it with an rt2-serve of the robot's version)")
    return (f"this rt2-serve speaks rt2_ros protocol v{PROTOCOL_VERSION}, the robot v{theirs}; upgrade rt2-serve "
            f"(rt2_ros {__version__} here) to the robot's version")


class OtherVersionHandler(grpc.GenericRpcHandler):
    """Answers every method of another protocol version's service with FAILED_PRECONDITION.

    An old robot would otherwise get UNIMPLEMENTED, indistinguishable from a wrong ``target``. No
    old .proto is needed: the handler takes and returns raw bytes and never reads the request.
    The trailing metadata ``rt2_ros-protocol-version`` lets a client word the refusal itself.
    """

    def __init__(self, refusals: RefusalLog) -> None:
        self._refusals = refusals

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        match = _PROTOCOL_METHOD.fullmatch(handler_call_details.method)
        if match is None or int(match.group(1)) == PROTOCOL_VERSION:
            return None
        theirs, method = int(match.group(1)), match.group(2)
        message = version_refusal(theirs)

        def refuse(_request: Any, context: grpc.ServicerContext) -> None:
            self._refusals.record("protocol version", context.peer(), handler_call_details.method,
                                  f"protocol v{theirs}, this server v{PROTOCOL_VERSION}")
            context.set_trailing_metadata(((VERSION_TRAILER, str(PROTOCOL_VERSION)),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)

        if method == "InferStream":
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


class PolicyServer:
    """The gRPC server hosting one backend (use :func:`main` for the CLI)."""

    def __init__(self, backend: Backend, backend_type: str, tokenizer: Any, config: ServeConfig) -> None:
        self.backend = backend
        self.backend_type = backend_type
        self.config = config
        opts = getattr(backend, "options", {}) or {}
        self.model = str(getattr(backend, "model_name", "") or next(
            (opts[k] for k in ("model", "model_id", "model_path") if opts.get(k)), ""))
        size = config.image_size or (0, 0)
        self.info = pb.ServerInfo(
            protocol_version=PROTOCOL_VERSION, backend=backend_type, model=self.model,
            tokenizer_profile=str(getattr(tokenizer, "profile", "") or ""), image_width=size[0],
            image_height=size[1], image_formats=[pb.Image.JPEG, pb.Image.PNG, pb.Image.RAW],
            server_version=__version__, cameras=list(config.cameras))
        # One inference at a time (models are not re-entrant), unless the backend declares itself safe to
        # call concurrently: rt2_ros.fleet forwards to Ray Serve, whose replicas batch concurrent calls.
        concurrent = config.workers if getattr(backend, "concurrent_safe", False) else 1
        self._model_lock = threading.BoundedSemaphore(concurrent)
        self._stats = CallStats(config.summary_interval_s)
        self.refusals = RefusalLog(self._stats, config.refusal_log_interval_s)
        # the token is checked first: an unauthenticated caller never takes one of a client's slots
        self.client_limit = PerClientLimit(config.max_calls_per_client, self.refusals)
        interceptors = ([BearerTokenInterceptor(config.token, self.refusals)] if config.token else []) + \
            [self.client_limit]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rt2-serve"),
            interceptors=interceptors,
            # a streaming call holds a worker thread; beyond this, calls fail fast with RESOURCE_EXHAUSTED
            maximum_concurrent_rpcs=config.workers,
            options=[
                ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent split
                ("grpc.max_receive_message_length", request_bytes_cap(config)),
                ("grpc.max_send_message_length", config.max_reply_bytes),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients ping every 30 s
            ])
        pb_grpc.add_PolicyServicer_to_server(_Servicer(self), self._server)
        self._server.add_generic_rpc_handlers((OtherVersionHandler(self.refusals),))
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
        try:
            if config.tls_cert is not None:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key, config.tls_cert)], root_certificates=config.client_ca,
                    require_client_auth=config.client_ca is not None)
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address} ({exc}); is another server using the port?") from None
        if not self.port:
            raise OSError(f"cannot listen on {address}; is another server using the port?")

    def start(self) -> None:
        self._server.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        """NOT_SERVING for probes, finish running calls within the grace period, release the model."""
        self._health.enter_graceful_shutdown()
        self._server.stop(self.config.grace_s).wait(self.config.grace_s + 5.0)
        self._stats.flush()
        self.backend.close()

    # -- request handling (called by _Servicer from worker threads) --------------------------

    def _budget_s(self, context: grpc.ServicerContext) -> float:
        """Time this call may take: the client's deadline, never more than --infer-timeout-s."""
        remaining = context.time_remaining()
        return self.config.infer_timeout_s if remaining is None else min(remaining, self.config.infer_timeout_s)

    def reset(self, context: grpc.ServicerContext) -> None:
        """Reset the backend's episode state, not while it infers (a model is not re-entrant)."""
        if not self._model_lock.acquire(timeout=max(0.0, self._budget_s(context))):
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "server busy: the model did not become free before the deadline")
        try:
            self.backend.reset()
        except Exception as exc:
            _log.exception("backend %s reset failed", self.backend_type)
            raise RequestError(grpc.StatusCode.INTERNAL, f"backend reset failed: {exc}") from None
        finally:
            self._model_lock.release()

    def answer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The InferReply for one observation; RequestError when it cannot be answered."""
        t_start = time.monotonic()
        budget = self._budget_s(context)
        if request.timeout_s > 0:
            budget = min(budget, request.timeout_s)
        deadline = t_start + budget
        inference_s = 0.0
        try:
            try:
                observation = observation_from_proto(request, self.config.max_image_pixels, self.config.cameras)
            except ValueError as exc:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if not self._model_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "server busy: the model did not become free before the deadline")
            try:
                budget = deadline - time.monotonic()
                if budget <= 0:
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before inference")
                t0 = time.monotonic()
                try:
                    reply = self.backend.infer(observation, budget)
                except BackendTimeout as exc:
                    raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, f"backend timed out: {exc}") from None
                except BackendError as exc:
                    raise RequestError(grpc.StatusCode.INTERNAL, f"backend {self.backend_type} failed: {exc}") from None
                except Exception:
                    _log.exception("backend %s raised on seq %d", self.backend_type, request.seq)
                    raise RequestError(grpc.StatusCode.INTERNAL,
                                       "unexpected server error; see the server log") from None
                inference_s = time.monotonic() - t0
            finally:
                self._model_lock.release()
            try:
                msg = reply_to_proto(reply, int(request.seq), inference_s=inference_s,
                                     backend=self.backend_type, model=self.model)
            except ValueError as exc:
                raise RequestError(grpc.StatusCode.INTERNAL, f"backend {self.backend_type}: {exc}") from None
            if msg.ByteSize() > self.config.max_reply_bytes:  # checked here: gRPC's own refusal names no flag
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"backend {self.backend_type} answered {msg.ByteSize()} bytes, above the server's "
                                   f"--max-reply-bytes {self.config.max_reply_bytes}")
        except RequestError as exc:
            _log.debug("seq=%d from %s: %s %s (%.1f ms)", request.seq, context.peer(), exc.code.name, exc.message,
                       1000 * (time.monotonic() - t_start))
            self._stats.record(False, 0.0)
            raise
        if _log.isEnabledFor(logging.DEBUG):
            cams = ", ".join(f"{c.camera} {pb.Image.Format.Name(c.image.format)} {c.image.width}x{c.image.height} "
                             f"{len(c.image.data)} B" for c in request.images)
            state = ",".join(observation.state_stamps) or "no"
            _log.debug("seq=%d from %s: [%s], %s state -> %s in %.1f ms (model %.1f ms)", request.seq,
                       context.peer(), cams, state, msg.WhichOneof("answer"), 1000 * (time.monotonic() - t_start),
                       1000 * inference_s)
        self._stats.record(True, inference_s)
        return msg


class _Servicer(pb_grpc.PolicyServicer):
    """The generated service interface, delegating to PolicyServer."""

    def __init__(self, server: PolicyServer) -> None:
        self._s = server

    def GetInfo(self, request: Any, context: Any) -> Any:
        return self._s.info

    def Infer(self, request: Any, context: Any) -> Any:
        try:
            return self._s.answer(request, context)
        except RequestError as exc:
            context.abort(exc.code, exc.message)

    def InferStream(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in request_iterator:
            try:
                yield self._s.answer(request, context)
            except RequestError as exc:  # in-band: one bad observation does not end the stream
                yield pb.InferReply(seq=request.seq, error=pb.ReplyError(code=exc.code.value[0], message=exc.message),
                                    backend=self._s.backend_type, model=self._s.model)

    def Reset(self, request: Any, context: Any) -> Any:
        _log.info("reset requested by %s", context.peer())
        try:
            self._s.reset(context)
        except RequestError as exc:
            context.abort(exc.code, exc.message)
        return pb.ResetReply()


# -- CLI ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rt2-serve", description="Serve a VLA backend over rt2_ros's gRPC policy protocol (see docs/grpc.md).")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="backend type to host (its backend.<type>.* keys "
                   "are read from --params; default: backend.type there)")
    p.add_argument("--backend-class", metavar="MODULE:CLASS",
                   help="host this Backend subclass instead (testing, out-of-tree backends)")
    p.add_argument("--params", required=True, help="ROS params YAML (<node>: ros__parameters: {backend: ..., "
                   "tokenizer: ...})")
    p.add_argument("--node", help="node section of --params to use when several have a backend section")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default 127.0.0.1: not reachable from the network). Any other address "
                        "(0.0.0.0, ::, a LAN address, a host name other than localhost) needs TLS and client "
                        "authentication (--tls-cert/--tls-key with --token-file or --client-ca) unless --insecure")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port, printed at start)")
    p.add_argument("--tls-cert", help="PEM server certificate (chain); enables TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert (not encrypted; checked to match it at start)")
    p.add_argument("--client-ca", help="PEM CA bundle; clients must present a certificate it signed (mTLS)")
    p.add_argument("--token-file", help="file with the bearer token every call must carry")
    p.add_argument("--allow-insecure-token", action="store_true",
                   help="accept --token-file without TLS: for a loopback --host behind a TLS-terminating proxy on "
                        "this machine, the only place a token in clear text does not cross the network (another "
                        "--host also needs --insecure)")
    p.add_argument("--insecure", action="store_true",
                   help="serve on a network --host without TLS and/or client authentication: anyone who can reach "
                        "the port can then drive the policy and see the camera (isolated networks only; logged at "
                        "start). It does not allow a token without TLS (--allow-insecure-token) and changes "
                        "nothing on loopback")
    p.add_argument("--max-calls-per-client", type=int, default=DEFAULT_MAX_CALLS_PER_CLIENT, metavar="N",
                   help="concurrent calls one client host may hold (a stream counts for its lifetime, health "
                        "checks not at all); more are refused with RESOURCE_EXHAUSTED at once (default "
                        f"{DEFAULT_MAX_CALLS_PER_CLIENT}: a robot needs one stream or one call at a time). Behind a "
                        "proxy every robot is the proxy's address: raise it to robots x "
                        f"{DEFAULT_MAX_CALLS_PER_CLIENT}")
    p.add_argument("--image-size", metavar="WxH", help="image size the model expects, advertised to clients so "
                   "they resize every camera image before sending (e.g. 224x224)")
    p.add_argument("--cameras", metavar="NAME[,NAME...]",
                   help="cameras the hosted model needs, its primary first (e.g. camera,wrist): advertised to "
                        "clients, which send only these; an observation without one of them is refused. "
                        "Default: any cameras, the robot's primary first")
    p.add_argument("--workers", type=int, default=8,
                   help="worker threads = max concurrent calls of all clients together (default 8)")
    p.add_argument("--infer-timeout-s", type=float, default=30.0,
                   help="upper bound (s) of one observation's wait for the model and of the budget handed to it, "
                        "also when the client sets no deadline (a model that ignores its budget is not "
                        "interrupted, but later calls stop waiting for it)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="reject larger images")
    p.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                   help="refuse larger observation messages before reading them (default: raw rgb8 images of "
                        "--max-image-pixels for each of --cameras, two without it, plus 1 MiB)")
    p.add_argument("--max-reply-bytes", type=int, default=DEFAULT_MAX_REPLY_BYTES, metavar="BYTES",
                   help="refuse to send a larger answer (RESOURCE_EXHAUSTED; default 1 MiB, an answer needs a few kB)")
    p.add_argument("--summary-interval-s", type=float, default=30.0, help="period of the info summary line (s)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="DEBUG logs one line per request")
    return p


def missing_protection(host: str, *, tls: bool, client_auth: bool) -> list[str]:
    """What a server on ``host`` lacks to be served to the network (flags included); [] on loopback,
    where only this machine can connect."""
    if is_loopback(host):
        return []
    return [what for what, absent in (("TLS (--tls-cert/--tls-key)", not tls),
                                      ("client authentication (--token-file or --client-ca)", not client_auth))
            if absent]


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Validate the security flags and read their files; ConfigError naming the flag otherwise."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise ConfigError("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if args.token_file and not args.tls_cert and not args.allow_insecure_token:
        raise ConfigError("--token-file without TLS would send the token in clear text; add --tls-cert/--tls-key, "
                          "or --allow-insecure-token if a TLS-terminating proxy sits in front")
    host = args.host.strip()
    if host.startswith("[") and host.endswith("]"):  # "[::1]": the brackets belong to a URL, not to --host
        host = host[1:-1]
    missing = missing_protection(host, tls=bool(args.tls_cert), client_auth=bool(args.token_file or args.client_ca))
    if missing and not args.insecure:
        raise ConfigError(f"--host {host or repr(host)} is reachable from other machines, so rt2-serve needs "
                          f"{' and '.join(missing)} there: otherwise anyone who can reach the port can drive the "
                          "policy and see the camera. Serve on 127.0.0.1 behind an SSH tunnel or proxy, or pass "
                          "--insecure on an isolated network")
    if args.max_calls_per_client < 1:
        raise ConfigError("--max-calls-per-client must be >= 1")
    token = None
    if args.token_file:
        token = read_file("--token-file", args.token_file, secret=True).strip()
        if not token or any(c in token for c in b" \t\r\n"):
            raise ConfigError(f"--token-file: {args.token_file!r} must hold one non-empty line without spaces")
    image_size = None
    if args.image_size:
        try:
            w, h = (int(v) for v in args.image_size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--image-size: expected WIDTHxHEIGHT, e.g. 224x224, got {args.image_size!r}") from None
        if w <= 0 or h <= 0:
            raise ConfigError(f"--image-size: sides must be positive, got {args.image_size!r}")
        image_size = (w, h)
    cameras: tuple[str, ...] = ()
    if args.cameras is not None:
        cameras = tuple(name.strip() for name in args.cameras.split(","))
        if not all(is_camera_name(n) for n in cameras):
            raise ConfigError(f"--cameras: expected camera names separated by commas, e.g. camera,wrist, got "
                              f"{args.cameras!r}")
        if len(set(cameras)) != len(cameras):
            raise ConfigError(f"--cameras: a camera is listed twice in {args.cameras!r}")
        if len(cameras) > MAX_CAMERAS:
            raise ConfigError(f"--cameras: at most {MAX_CAMERAS} cameras")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a TCP port")
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    if not args.infer_timeout_s > 0:
        raise ConfigError("--infer-timeout-s must be > 0")
    if args.max_image_pixels < 1:
        raise ConfigError("--max-image-pixels must be >= 1")
    for flag, value in (("--max-request-bytes", args.max_request_bytes), ("--max-reply-bytes", args.max_reply_bytes)):
        if value is not None and not 1024 <= value <= _GRPC_MAX_MESSAGE:
            raise ConfigError(f"{flag}: {value} is not between 1024 and {_GRPC_MAX_MESSAGE} bytes")
    tls_cert, tls_key = load_cert_and_key("--tls-cert", args.tls_cert, "--tls-key", args.tls_key) \
        if args.tls_cert else (None, None)
    client_ca = load_ca_bundle("--client-ca", args.client_ca) if args.client_ca else None
    return ServeConfig(host=host, port=args.port, tls_cert=tls_cert, tls_key=tls_key,
                       client_ca=client_ca, token=token, workers=args.workers,
                       max_calls_per_client=args.max_calls_per_client,
                       infer_timeout_s=args.infer_timeout_s, max_image_pixels=args.max_image_pixels,
                       max_request_bytes=args.max_request_bytes, max_reply_bytes=args.max_reply_bytes,
                       image_size=image_size, cameras=cameras, summary_interval_s=args.summary_interval_s)


def serve_until_signalled(server: PolicyServer, program: str, *, insecure_flag: bool = False,
                          detail: str = "") -> None:
    """Start ``server``, print the readiness line (``<program>: serving ... on host:port [security]<detail>``;
    tests and scripts wait for it, logs go to stderr), serve until SIGINT/SIGTERM, then stop it. Shared
    by rt2-serve and rt2-fleet-serve, so both warn alike about what an --insecure server lacks."""
    config, backend_type = server.config, server.backend_type
    missing = missing_protection(config.host, tls=config.tls_cert is not None,
                                 client_auth=bool(config.token or config.client_ca))
    if missing:  # only reachable with --insecure (config_from_args refuses it otherwise)
        _log.warning("--insecure: serving on %s without %s: anyone who can reach this port can drive the policy and "
                     "see the camera", config.host, " and ".join(m.split(" (")[0] for m in missing))
    elif insecure_flag:
        _log.info("--insecure has no effect here: %s", "a loopback --host" if is_loopback(config.host) else
                  "TLS and client authentication are on")
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda _signum, _frame: stop.set())
    server.start()
    security = ("mTLS" if config.client_ca else "TLS" if config.tls_cert else "plaintext") + (
        " + token" if config.token else "")
    print(f"{program}: serving {backend_type} ({server.model or 'model n/a'}) on {config.host}:{server.port} "
          f"[{security}]{detail}", flush=True)
    _log.info("serving %s on %s:%d [%s], %d workers, rt2_ros protocol v%d, cameras %s, messages up to %d bytes in "
              "and %d out", backend_type, config.host, server.port, security, config.workers, PROTOCOL_VERSION,
              ", ".join(config.cameras) or "any", request_bytes_cap(config), config.max_reply_bytes)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _log.info("shutting down")
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        flat = load_params(args.params, args.node)
        backend_type = args.backend
        if backend_type is None and args.backend_class is None:
            backend_type = flat.get("backend.type")
            if backend_type in (None, "grpc"):  # the robot's own file says grpc: which model to host is unknown
                raise ConfigError("--backend is required (the params file does not name a local backend.type)")
        backend, backend_type, tokenizer = build_backend(flat, backend_type, args.backend_class)
    except (ConfigError, BackendConfigError) as exc:
        print(f"rt2-serve: error: {exc}", file=sys.stderr)
        return 2
    except (BackendError, ImportError, OSError) as exc:  # e.g. model weights or an optional extra missing
        print(f"rt2-serve: error: cannot start the backend: {exc}", file=sys.stderr)
        return 1
    # OpenCV refuses to decode larger images (decompression bombs); must be set before its first decode
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(config.max_image_pixels))
    try:
        server = PolicyServer(backend, backend_type, tokenizer, config)
    except OSError as exc:
        backend.close()
        print(f"rt2-serve: error: {exc}", file=sys.stderr)
        return 1
    serve_until_signalled(server, "rt2-serve", insecure_flag=args.insecure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
