"""Loopback servers that misbehave on demand, for the backend budget tests (test_backend_budgets.py).

A :class:`FaultServer` is a healthy upstream of one wire protocol — HTTP (OpenVLA ``POST /act``
and OpenAI ``POST /v1/chat/completions``), an openpi websocket (metadata first, msgpack-numpy) or
rt2_ros's gRPC policy service — behind a TCP :class:`FaultProxy` that clients connect to. Each
runs in threads of the test process on 127.0.0.1 (ports chosen by the OS). ``set_fault(name)``
switches the behaviour of new and existing connections at once:

``pass``          healthy: bytes flow both ways
``drip``          the server's bytes reach the client one every ``drip_interval_s`` (default 20 ms);
                  every socket read gets a byte long before any per-read timeout
``stall``         accept and stall: nothing is read or answered (a hung server; bytes are left in
                  the kernel buffers and flow again when the fault clears)
``half_close``    on the client's next bytes the server closes its sending side (FIN) and reads on
``reset``         on the client's next bytes the connection is reset (RST)
``huge``          the upstream answers far more than any cap: an endless chunked HTTP body, an
                  8 MiB websocket message, an 8 MiB protobuf reply
``garbage``       the upstream answers junk in valid framing: HTTP 200 with a body that is not JSON
                  (invalid UTF-8, a lone-surrogate escape, terminal control sequences), a websocket
                  message that is not msgpack, a gRPC message that is not protobuf
``garbage_wire``  on the client's next bytes the server sends bytes of no protocol at all
``flap``          the server goes down and up every ``flap_period_s`` (default 0.1 s): refused
                  connections while down (the listening socket is closed), live ones reset

A connection that saw ``half_close``, ``reset`` or ``garbage_wire`` is beyond repair; it is reset
when the fault clears, like a restarted server would. :attr:`FaultProxy.live` counts the client
connections still open (a client that abandons a call must close its socket).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import json_numpy
import numpy as np
import websockets.sync.server as ws_server
from openpi_client import msgpack_numpy
from websockets.exceptions import ConnectionClosed

from rt2_ros.backends.proto import PROTOCOL_VERSION, SERVICE_NAME, load

pb, _ = load()

FAULTS = ("drip", "stall", "half_close", "reset", "huge", "garbage", "garbage_wire", "flap")
#: bytes of no protocol (not HTTP, not a websocket frame, not HTTP/2), with invalid UTF-8 in them
WIRE_GARBAGE = b"\x00\xff\xfe garbage \xf0\x28\x8c\x28 \x1b[2J not a protocol \r\n" * 64
HUGE_BYTES = 8 * 1024 * 1024
#: the answer of a healthy RT-2 server
ANSWER_TEXT = "0 128 91 241 5 101 127 217"
ANSWER_ACTION = [0.01, -0.02, 0.03, 0.0, 0.0, 0.1, 1.0]


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _peer_gone(sock: socket.socket) -> bool:
    """The peer closed or reset, without reading its pending bytes (POLLRDHUP: Linux)."""
    poller = select.poll()
    poller.register(sock, getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


# -- the proxy -------------------------------------------------------------------------------------


class FaultProxy:
    """TCP proxy on 127.0.0.1 in front of ``upstream_port`` that injects the fault in :attr:`mode`."""

    def __init__(self, upstream_port: int, *, drip_interval_s: float = 0.02, flap_period_s: float = 0.1) -> None:
        self.upstream_port = upstream_port
        self.drip_interval_s = drip_interval_s
        self.flap_period_s = flap_period_s
        self.mode = "pass"
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener: socket.socket | None = self._listen(0)
        self.listening = threading.Event()  # set while the listening socket is open
        self.listening.set()
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def live(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._clients)

    def down(self) -> bool:
        """In ``flap`` mode: whether the server is down now."""
        return self.mode == "flap" and int(time.monotonic() / self.flap_period_s) % 2 == 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for sock in clients:
            _reset(sock)

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self.down():
                if self._listener is not None:  # going down: refuse new connections, reset the live ones
                    self.listening.clear()
                    self._listener.close()
                    self._listener = None
                time.sleep(0.005)
                continue
            if self._listener is None:
                try:
                    self._listener = self._listen(self.port)
                except OSError:  # the port is briefly unavailable: try again
                    time.sleep(0.005)
                    continue
                self.listening.set()
            ready, _, _ = select.select([self._listener], [], [], 0.01)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True).start()
        if self._listener is not None:
            self._listener.close()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        broken = False  # saw a fault it cannot recover from
        try:
            while not self._stop.is_set():
                mode = self.mode
                if self.down() or (broken and mode == "pass"):
                    _reset(client)
                    return
                if mode == "stall" or broken:
                    if _peer_gone(client):
                        return
                    time.sleep(0.005)
                    continue
                watched = [client] if upstream is None else [client, upstream]
                ready, _, _ = select.select(watched, [], [], 0.01)
                if self.mode != mode:  # changed while waiting: act on the new one
                    continue
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    if mode == "reset":
                        _reset(client)
                        return
                    if mode == "half_close":
                        client.shutdown(socket.SHUT_WR)
                        broken = True
                        continue
                    if mode == "garbage_wire":
                        client.sendall(WIRE_GARBAGE)
                        broken = True
                        continue
                    if upstream is None:
                        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2.0)
                        upstream.settimeout(None)
                    upstream.sendall(data)
                if upstream is not None and upstream in ready:
                    data = upstream.recv(65536)
                    if not data:
                        client.shutdown(socket.SHUT_WR)
                        upstream.close()
                        upstream = None
                        continue
                    self._deliver(client, data)
        except OSError:
            pass  # the client or the upstream went away
        finally:
            with self._lock:
                self._clients.discard(client)
            with contextlib.suppress(OSError):
                client.close()
            if upstream is not None:
                upstream.close()

    def _deliver(self, client: socket.socket, data: bytes) -> None:
        """Forward the upstream's ``data``, one byte at a time while the mode is drip."""
        view = memoryview(data)
        while view and self.mode == "drip" and not self._stop.is_set():
            client.sendall(view[:1])
            view = view[1:]
            time.sleep(self.drip_interval_s)
        if view:
            client.sendall(view)


# -- upstreams -------------------------------------------------------------------------------------


class HttpUpstream:
    """OpenVLA deploy.py's ``POST /act`` and vLLM's ``POST /v1/chat/completions``, healthy or not."""

    def __init__(self) -> None:
        #: ok | huge | garbage, and two set directly by tests: declared_huge (a Content-Length of 1 GB,
        #: then nothing) and gzip (a compressed body although identity was asked for)
        self.behaviour = "ok"
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                behaviour = upstream.behaviour
                if behaviour == "huge":
                    self._huge()
                    return
                if behaviour in ("declared_huge", "gzip"):
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if behaviour == "gzip":
                        body = gzip.compress(b"[" + b"0.0," * 100_000 + b"0.0]")
                        self.send_header("Content-Encoding", "gzip")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    self.send_header("Content-Length", str(10**9))
                    self.end_headers()
                    self.wfile.write(b"[0.0,")
                    self.wfile.flush()
                    time.sleep(2.0)  # and nothing more: only the declared length tells the size
                    self.close_connection = True
                    return
                if behaviour == "garbage":
                    body = b'{"choices": "\\ud800 \x1b[31m\xff\xfe' + b"\x00\x07 junk" * 40
                elif self.path.endswith("/act"):
                    body = json_numpy.dumps(np.array(ANSWER_ACTION)).encode()
                else:
                    body = json.dumps({
                        "id": "cmpl-fault", "object": "chat.completion", "created": 0, "model": "fault-test",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": ANSWER_TEXT}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _huge(self) -> None:
                """An endless chunked JSON array (no Content-Length to refuse it by)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"0.0," * 16384
                frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                try:
                    self.wfile.write(b"1\r\n[\r\n")
                    for _ in range(256 * 1024 * 1024 // len(chunk)):
                        self.wfile.write(frame)
                except OSError:
                    pass  # the client gave up, as it should
                self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class OpenPIUpstream:
    """An openpi policy server: metadata frame first, then one msgpack reply per observation."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        self._huge = b"\x00" * HUGE_BYTES
        self._server = ws_server.serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None)
        self.port: int = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-openpi", daemon=True)
        self._thread.start()

    def _handle(self, ws: ws_server.ServerConnection) -> None:
        packer = msgpack_numpy.Packer()
        try:
            ws.send(packer.pack({"action_horizon": 4, "action_dim": 7}))
            while True:
                ws.recv()
                behaviour = self.behaviour
                if behaviour == "huge":
                    ws.send(self._huge)
                elif behaviour == "garbage":
                    ws.send(b"\xc1 not msgpack \xff\x00" * 8)
                else:
                    ws.send(packer.pack({"actions": np.tile(np.array(ANSWER_ACTION, np.float32), (4, 1)),
                                         "server_timing": {"infer_ms": 1.0}}))
        except ConnectionClosed:
            pass

    def close(self) -> None:
        self._server.shutdown()


class GrpcUpstream:
    """rt2_ros's gRPC policy service (GetInfo, Infer, InferStream, Reset), answering an action."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        chunk = pb.InferReply(backend="fault", model="fault-test")
        rows = HUGE_BYTES // 28
        chunk.actions.values.extend(np.zeros(rows * 7, np.float32))
        chunk.actions.shape.extend([rows, 7])
        self._huge = chunk.SerializeToString()  # + a serialised InferReply(seq=...) sets the seq
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fault-grpc"))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self._info, request_deserializer=pb.InfoRequest.FromString, response_serializer=_serialize),
            "Infer": grpc.unary_unary_rpc_method_handler(
                self._infer, request_deserializer=pb.Observation.FromString, response_serializer=_serialize),
            "InferStream": grpc.stream_stream_rpc_method_handler(
                self._infer_stream, request_deserializer=pb.Observation.FromString, response_serializer=_serialize),
            "Reset": grpc.unary_unary_rpc_method_handler(
                lambda _r, _c: pb.ResetReply(), request_deserializer=pb.ResetRequest.FromString,
                response_serializer=_serialize),
        }),))
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _info(self, _request: Any, _context: Any) -> Any:
        return pb.ServerInfo(protocol_version=PROTOCOL_VERSION, backend="fault", model="fault-test")

    def _infer(self, request: Any, _context: Any) -> Any:
        behaviour = self.behaviour
        if behaviour == "huge":
            return self._huge + pb.InferReply(seq=request.seq).SerializeToString()
        if behaviour == "garbage":
            return b"\x0f\xff\xff\xff not protobuf"  # field 1 with the invalid wire type 7
        reply = pb.InferReply(seq=request.seq, backend="fault", model="fault-test")
        reply.actions.values.extend(ANSWER_ACTION)
        reply.actions.shape.extend([1, 7])
        return reply

    def _infer_stream(self, requests: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in requests:
            yield self._infer(request, context)

    def close(self) -> None:
        self._server.stop(0).wait(2.0)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


UPSTREAMS: dict[str, Callable[[], Any]] = {"http": HttpUpstream, "openpi": OpenPIUpstream, "grpc": GrpcUpstream}


class FaultServer:
    """A healthy ``protocol`` upstream ("http", "openpi", "grpc") behind a :class:`FaultProxy`."""

    def __init__(self, protocol: str, **proxy_options: float) -> None:
        self.protocol = protocol
        self.upstream = UPSTREAMS[protocol]()
        self.proxy = FaultProxy(self.upstream.port, **proxy_options)
        self.port = self.proxy.port
        self.fault = "pass"

    def set_fault(self, fault: str) -> None:
        """One of FAULTS, or "pass" (healthy); returns once the proxy listens again (after flap)."""
        if fault not in (*FAULTS, "pass"):
            raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS}")
        self.fault = fault
        self.upstream.behaviour = fault if fault in ("huge", "garbage") else "ok"
        self.proxy.mode = "pass" if fault in ("huge", "garbage") else fault
        if fault != "flap" and not self.proxy.listening.wait(timeout=2.0):
            raise RuntimeError("the fault proxy did not listen again within 2 s")

    def close(self) -> None:
        self.proxy.close()
        self.upstream.close()


__all__ = ["ANSWER_ACTION", "ANSWER_TEXT", "FAULTS", "FaultProxy", "FaultServer", "GrpcUpstream", "HttpUpstream",
           "OpenPIUpstream"]
