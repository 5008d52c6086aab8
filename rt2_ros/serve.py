"""``rt2-serve``: host any in-process VLA backend behind rt2_ros's gRPC policy protocol.

Run it on the GPU box; point the robot's ``grpc`` backend at it::

    rt2-serve --backend local --params config/server.yaml --host 0.0.0.0 --port 50051 \\
        --tls-cert server.crt --tls-key server.key --token-file token.txt

The backend is built exactly as on the robot (``rt2_ros.backends.create_backend`` from the
``backend.<type>.*`` and ``tokenizer.*`` keys of a ROS params YAML), so one file describes a
model whether it runs on the robot or here.

Security model (see docs/grpc.md):

* Binds to 127.0.0.1 by default: a policy server drives a robot arm, so it must never be
  reachable from the network by accident without authentication. Exposing it is a flag.
* ``--token-file``: every call must carry ``authorization: Bearer <token>``; a server
  interceptor checks it with a constant-time compare (no timing oracle). A token over
  plaintext leaks to anyone on the path, so a token without TLS is refused unless
  ``--allow-insecure-token`` (for a TLS-terminating proxy in front).
* ``--tls-cert/--tls-key`` for TLS, plus ``--client-ca`` to require client certificates (mTLS).
* No pickle: requests are protobuf data only (LeRobot's pickled gRPC payloads let any peer run
  code on the server). Decoded images are size-limited (``--max-image-pixels``).
* Standard gRPC health checking (``grpc.health.v1``) is served without the token, so load
  balancers and probes can use it; it reveals only SERVING / NOT_SERVING.

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
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rt2_ros import __version__, imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import BACKENDS, Backend, BackendConfigError, BackendError, BackendTimeout, create_backend
from rt2_ros.backends.proto import PROTOCOL_VERSION, SERVICE_NAME, load
from rt2_ros.params import ConfigError, flatten, resolve

pb, pb_grpc = load()

_log = logging.getLogger("rt2_ros.serve")

DEFAULT_HOST = "127.0.0.1"  # never exposed by accident; --host 0.0.0.0 is a deliberate choice
DEFAULT_PORT = 50051
HEALTH_PREFIX = "/grpc.health.v1.Health/"


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


def observation_from_proto(msg: Any, max_pixels: int) -> Observation:
    """The Observation in wire message ``msg``; ValueError with a client-facing message if malformed."""
    img = msg.image
    if img.format in (pb.Image.JPEG, pb.Image.PNG):
        try:
            image = imaging.decode_image(img.data)
        except Exception as exc:  # ImageEncodeError, or cv2.error for images above OPENCV_IO_MAX_IMAGE_PIXELS
            raise ValueError(f"image: cannot decode {pb.Image.Format.Name(img.format)} data ({exc})") from None
        height, width = image.shape[:2]
        if height * width > max_pixels:
            raise ValueError(f"image: {width}x{height} exceeds the server limit of {max_pixels} pixels")
    elif img.format == pb.Image.RAW:
        if img.raw_encoding != "rgb8":
            raise ValueError(f"image: raw_encoding must be 'rgb8', got {img.raw_encoding!r}")
        if img.width == 0 or img.height == 0:
            raise ValueError("image: RAW needs width and height > 0")
        if img.width * img.height > max_pixels:
            raise ValueError(f"image: {img.width}x{img.height} exceeds the server limit of {max_pixels} pixels")
        expected = img.width * img.height * 3
        if len(img.data) != expected:
            raise ValueError(f"image: RAW rgb8 {img.width}x{img.height} needs {expected} bytes, got {len(img.data)}")
        image = np.frombuffer(img.data, dtype=np.uint8).reshape(img.height, img.width, 3).copy()
    else:
        raise ValueError("image: format must be JPEG, PNG or RAW")
    ee_position = ee_orientation = gripper = None
    if msg.HasField("ee"):
        ee = msg.ee
        if len(ee.position) not in (0, 3):
            raise ValueError(f"ee.position: expected 3 values (m), got {len(ee.position)}")
        if len(ee.orientation) not in (0, 4):
            raise ValueError(f"ee.orientation: expected a (w, x, y, z) quaternion, got {len(ee.orientation)} values")
        if ee.position:
            ee_position = np.asarray(ee.position, dtype=np.float64)
        if ee.orientation:
            ee_orientation = np.asarray(ee.orientation, dtype=np.float64)
        if ee.HasField("gripper"):
            gripper = float(ee.gripper)
        values = [v for v in (ee_position, ee_orientation, gripper) if v is not None]
        if not all(np.all(np.isfinite(v)) for v in values):
            raise ValueError("ee: non-finite end-effector state")
    return Observation(image=image, instruction=msg.instruction, seq=int(msg.seq), stamp=float(msg.stamp),
                       ee_position=ee_position, ee_orientation=ee_orientation, gripper=gripper)


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
    max_message_bytes: int = 64 * 1024 * 1024
    image_size: tuple[int, int] | None = None  # (width, height) advertised in GetInfo
    summary_interval_s: float = 30.0
    grace_s: float = 2.0  # s given to running calls at shutdown


class _Stats:
    """Counters for the periodic info-level summary line."""

    def __init__(self, interval_s: float) -> None:
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self._since = now
        self._ok = self._errors = 0
        self._total_s = self._max_s = 0.0

    def record(self, ok: bool, inference_s: float) -> None:
        now = time.monotonic()
        line = None
        with self._lock:
            if ok:
                self._ok += 1
                self._total_s += inference_s
                self._max_s = max(self._max_s, inference_s)
            else:
                self._errors += 1
            if now - self._since >= self._interval_s:
                line = self._line(now)
                self._reset(now)
        if line:
            _log.info(line)

    def _line(self, now: float) -> str:
        mean_ms = 1000 * self._total_s / self._ok if self._ok else 0.0
        return (f"last {now - self._since:.0f} s: {self._ok} answered, {self._errors} failed; "
                f"inference mean {mean_ms:.1f} ms, max {1000 * self._max_s:.1f} ms")

    def flush(self) -> None:
        with self._lock:
            if self._ok or self._errors:
                _log.info(self._line(time.monotonic()))
            self._reset(time.monotonic())


def _deny(handler: grpc.RpcMethodHandler | None, method: str, reason: str) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""
    if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
        return None

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        _log.warning("refused %s from %s: %s", method, context.peer(), reason)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call (health checks excepted) without ``authorization: Bearer <token>``."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(HEALTH_PREFIX):  # probes carry no token; status only
            return continuation(details)
        presented = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if presented is None:
            return _deny(continuation(details), details.method, "missing bearer token")
        scheme, _, credential = str(presented).partition(" ")
        # compare_digest: the time taken does not depend on where the strings differ
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token):
            return continuation(details)
        return _deny(continuation(details), details.method, "invalid bearer token")


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
            server_version=__version__)
        self._model_lock = threading.Lock()  # one inference at a time: models are not re-entrant
        self._stats = _Stats(config.summary_interval_s)
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rt2-serve"),
            interceptors=interceptors,
            # a streaming call holds a worker thread; beyond this, calls fail fast with RESOURCE_EXHAUSTED
            maximum_concurrent_rpcs=config.workers,
            options=[
                ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent split
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),  # clients ping every 30 s
            ])
        pb_grpc.add_PolicyServicer_to_server(_Servicer(self), self._server)
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

    def answer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The InferReply for one observation; RequestError when it cannot be answered."""
        t_start = time.monotonic()
        budgets = [self.config.infer_timeout_s]
        remaining = context.time_remaining()
        if remaining is not None:
            budgets.append(remaining)
        if request.timeout_s > 0:
            budgets.append(request.timeout_s)
        deadline = t_start + min(budgets)
        inference_s = 0.0
        try:
            try:
                observation = observation_from_proto(request, self.config.max_image_pixels)
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
        except RequestError as exc:
            _log.debug("seq=%d from %s: %s %s (%.1f ms)", request.seq, context.peer(), exc.code.name, exc.message,
                       1000 * (time.monotonic() - t_start))
            self._stats.record(False, 0.0)
            raise
        _log.debug("seq=%d from %s: %s %dx%d %d B -> %s in %.1f ms (model %.1f ms)", request.seq, context.peer(),
                   pb.Image.Format.Name(request.image.format), observation.image.shape[1],
                   observation.image.shape[0], len(request.image.data), msg.WhichOneof("answer"),
                   1000 * (time.monotonic() - t_start), 1000 * inference_s)
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
            self._s.backend.reset()
        except Exception as exc:
            _log.exception("backend %s reset failed", self._s.backend_type)
            context.abort(grpc.StatusCode.INTERNAL, f"backend reset failed: {exc}")
        return pb.ResetReply()


# -- CLI ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
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
                   help="address to bind (default 127.0.0.1: not reachable from the network; use 0.0.0.0 "
                        "with TLS and a token to serve robots)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 = any free port, printed at start)")
    p.add_argument("--tls-cert", help="PEM server certificate (chain); enables TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--client-ca", help="PEM CA bundle; clients must present a certificate it signed (mTLS)")
    p.add_argument("--token-file", help="file with the bearer token every call must carry")
    p.add_argument("--allow-insecure-token", action="store_true",
                   help="accept --token-file without TLS (only behind a TLS-terminating proxy)")
    p.add_argument("--image-size", metavar="WxH", help="image size the model expects, advertised to clients so "
                   "they resize before sending (e.g. 224x224)")
    p.add_argument("--workers", type=int, default=8, help="worker threads = max concurrent calls (default 8)")
    p.add_argument("--infer-timeout-s", type=float, default=30.0,
                   help="upper bound for one inference when the client sets no deadline (s)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="reject larger images")
    p.add_argument("--summary-interval-s", type=float, default=30.0, help="period of the info summary line (s)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="DEBUG logs one line per request")
    return p


def _read(flag: str, path: str | None, *, secret: bool = False) -> bytes | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {str(p)!r} ({exc.strerror or exc})") from None
    if secret and os.name == "posix" and p.stat().st_mode & 0o077:
        _log.warning("%s: %s is readable by other users; chmod 600 it", flag, p)
    return data


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Validate the security flags and read their files; ConfigError naming the flag otherwise."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise ConfigError("--client-ca (mTLS) needs --tls-cert and --tls-key")
    if args.token_file and not args.tls_cert and not args.allow_insecure_token:
        raise ConfigError("--token-file without TLS would send the token in clear text; add --tls-cert/--tls-key, "
                          "or --allow-insecure-token if a TLS-terminating proxy sits in front")
    token = None
    if args.token_file:
        raw = _read("--token-file", args.token_file, secret=True) or b""
        token = raw.strip()
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
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: {args.port} is not a TCP port")
    if args.workers < 1:
        raise ConfigError("--workers must be >= 1")
    if not args.infer_timeout_s > 0:
        raise ConfigError("--infer-timeout-s must be > 0")
    return ServeConfig(host=args.host, port=args.port, tls_cert=_read("--tls-cert", args.tls_cert),
                       tls_key=_read("--tls-key", args.tls_key, secret=True),
                       client_ca=_read("--client-ca", args.client_ca), token=token, workers=args.workers,
                       infer_timeout_s=args.infer_timeout_s, max_image_pixels=args.max_image_pixels,
                       image_size=image_size, summary_interval_s=args.summary_interval_s)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    if config.token is None and config.client_ca is None and config.host not in ("127.0.0.1", "::1", "localhost"):
        _log.warning("serving on %s without a token or client certificates: anyone who can reach this port can "
                     "drive the policy; add --tls-cert/--tls-key and --token-file", config.host)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda _signum, _frame: stop.set())
    server.start()
    security = ("mTLS" if config.client_ca else "TLS" if config.tls_cert else "plaintext") + (
        " + token" if config.token else "")
    # machine-readable readiness line (tests and scripts wait for it); logs go to stderr
    print(f"rt2-serve: serving {backend_type} ({server.model or 'model n/a'}) on {config.host}:{server.port} "
          f"[{security}]", flush=True)
    _log.info("serving %s on %s:%d [%s], %d workers", backend_type, config.host, server.port, security,
              config.workers)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        _log.info("shutting down")
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
