"""Hard budgets of the network backends, measured against servers that misbehave (DESIGN "Budgets").

Each network backend type (openvla_http, openai, openpi, grpc unary and streaming) talks over real
loopback sockets to a healthy server of its wire protocol behind a fault proxy
(test/servers/fault_server.py), which drips, stalls, half-closes, resets, floods, answers garbage
or flaps on demand. For every backend x fault, ``infer`` with ``timeout_s`` = TIMEOUT_S must return
or raise BackendError/BackendTimeout within TIMEOUT_S + CALL_MARGIN_S, in total; the first faulty
call runs on a connection opened while the server was healthy, the next ones on new connections.
After the fault clears, the next call succeeds, and a call stuck on a stalled server never makes
the next one wait beyond its own budget.

The worst call duration of every backend x fault is printed as a table (``pytest -s``) and written
to ``<pytest tmp>/backend_budgets*/worst_call_durations.md``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import Backend, BackendError, BackendTimeout, create_backend
from rt2_ros.backends.base import CALL_MARGIN_S
from rt2_ros.serve import PolicyServer, ServeConfig, request_bytes_cap
from rt2_ros.tokens import ActionTokenizer
from test.servers.fault_server import ANSWER_ACTION, ANSWER_TEXT, FAULTS, FaultServer

TIMEOUT_S = 0.5
CALLS_PER_FAULT = 2  # the first on a connection opened while healthy, then on new connections
KINDS = ("openvla_http", "openai", "openpi", "grpc", "grpc_stream")
PROTOCOL = {"openvla_http": "http", "openai": "http", "openpi": "openpi", "grpc": "grpc", "grpc_stream": "grpc"}
#: gRPC redials a failed connection after a backoff (jittered +-20 %, capped at max_backoff_s = 0.1 s here)
#: and calls fail fast until then: for grpc, recovery is a successful call within this long
REDIAL_WITHIN_S = 1.0
#: backends whose protocol allows one request at a time on their connection (a lock, waited for
#: only within the caller's own budget); the others never wait for another call
ONE_AT_A_TIME = ("openpi", "grpc_stream")


def make_backend(kind: str, port: int, **options: object) -> Backend:
    tokenizer = ActionTokenizer.from_profile("rt2")
    if kind == "openvla_http":
        return create_backend(kind, {"url": f"http://127.0.0.1:{port}", "image_size": 64, **options}, tokenizer)
    if kind == "openai":
        return create_backend(kind, {"base_url": f"http://127.0.0.1:{port}/v1", "model": "fault-test",
                                     "guided_decoding_field": "none", "image_size": 64, **options}, tokenizer)
    if kind == "openpi":
        # no reconnect backoff: recovery is checked on the very next call
        return create_backend(kind, {"url": f"ws://127.0.0.1:{port}", "state_key": "", "image_size": 64,
                                     "reconnect_backoff_s": 0.0, "reconnect_backoff_max_s": 0.0, **options}, tokenizer)
    return create_backend("grpc", {"target": f"127.0.0.1:{port}", "max_backoff_s": 0.1, "connect_timeout_s": 1.0,
                                   "keepalive_s": 0.0, "use_streaming": kind == "grpc_stream", **options}, tokenizer)


def observation(seq: int) -> Observation:
    return Observation(np.full((64, 64, 3), 90, np.uint8), "pick up the red cube", seq, 0.0)


def check_reply(kind: str, reply: BackendReply, seq: int) -> None:
    """A healthy answer, already parsed (numpy or text) by infer on the calling thread."""
    assert reply.seq == seq
    if kind == "openai":
        assert reply.text == ANSWER_TEXT
    else:
        assert isinstance(reply.actions, np.ndarray) and reply.actions.dtype.kind == "f"
        np.testing.assert_allclose(reply.actions[0], ANSWER_ACTION, rtol=1e-6)


def check_clean(message: str) -> None:
    """Error text that reaches a log line: valid UTF-8, no control characters, bounded."""
    message.encode("utf-8")  # raises on a lone surrogate
    assert not any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in message), repr(message)
    assert len(message) < 2000


def timed_call(backend: Backend, seq: int, timeout_s: float = TIMEOUT_S) -> tuple[float, str]:
    """(duration s, outcome) of one infer: "reply", "timeout" or "error"."""
    start = time.monotonic()
    try:
        backend.infer(observation(seq), timeout_s)
        outcome = "reply"
    except BackendTimeout as exc:
        outcome = "timeout"
        check_clean(str(exc))
    except BackendError as exc:
        outcome = "error"
        check_clean(str(exc))
    return time.monotonic() - start, outcome


def recover(kind: str, backend: Backend, seq: int) -> BackendReply:
    """The first call after the fault cleared, which must succeed; for grpc the first call after the
    channel's redial backoff (the calls before it fail fast, UNAVAILABLE)."""
    if PROTOCOL[kind] != "grpc":
        return backend.infer(observation(seq), 2.0)
    deadline = time.monotonic() + REDIAL_WITHIN_S
    while True:
        start = time.monotonic()
        try:
            return backend.infer(observation(seq), 2.0)
        except BackendError as exc:
            assert getattr(exc, "grpc_code", None) == grpc.StatusCode.UNAVAILABLE, exc
            # far below the call's 2 s budget; the first call may also meet the reset of the broken connection
            assert time.monotonic() - start < 0.5, "a call during the redial backoff must fail fast"
            assert time.monotonic() < deadline, f"no successful call within {REDIAL_WITHIN_S} s: {exc}"
            time.sleep(0.02)


def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FaultServer]]:
    started = {protocol: FaultServer(protocol) for protocol in ("http", "openpi", "grpc")}
    yield started
    for server in started.values():
        server.close()


@pytest.fixture(scope="module")
def worst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], tuple[float, list[str]]]]:
    """(kind, fault) -> (worst call duration, outcomes); printed and written as a table at the end."""
    results: dict[tuple[str, str], tuple[float, list[str]]] = {}
    yield results
    if not results:
        return
    header = (f"Worst infer() duration in s (timeout_s {TIMEOUT_S}, allowed {TIMEOUT_S + CALL_MARGIN_S:.2f}; "
              f"{CALLS_PER_FAULT} calls per fault, outcomes r = reply, t = BackendTimeout, e = BackendError)")
    faults = [f for f in FAULTS if any(k[1] == f for k in results)]
    lines = [header, "", "| backend | " + " | ".join(faults) + " |", "|---" * (len(faults) + 1) + "|"]
    for kind in KINDS:
        cells = []
        for fault in faults:
            if (kind, fault) in results:
                duration, outcomes = results[kind, fault]
                cells.append(f"{duration:.3f} ({''.join(o[0] for o in outcomes)})")
            else:
                cells.append("-")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    path: Path = tmp_path_factory.mktemp("backend_budgets") / "worst_call_durations.md"
    path.write_text(table)
    print(f"\n{table}(written to {path})")


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", KINDS)
def test_call_ends_within_budget_then_recovers(kind: str, fault: str, servers: dict[str, FaultServer],
                                               worst: dict) -> None:
    server = servers[PROTOCOL[kind]]
    server.set_fault("pass")
    backend = make_backend(kind, server.port)
    try:
        check_reply(kind, backend.infer(observation(1), 2.0), 1)  # a connection opened while healthy
        server.set_fault(fault)
        durations, outcomes = [], []
        for seq in range(2, 2 + CALLS_PER_FAULT):
            duration, outcome = timed_call(backend, seq)
            durations.append(duration)
            outcomes.append(outcome)
        worst[kind, fault] = (max(durations), outcomes)
        assert max(durations) <= TIMEOUT_S + CALL_MARGIN_S, (kind, fault, durations, outcomes)
        if fault != "flap":  # a flapping server may answer while up
            assert "reply" not in outcomes, (kind, fault, outcomes)
        server.set_fault("pass")
        seq = 2 + CALLS_PER_FAULT
        check_reply(kind, recover(kind, backend, seq), seq)
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_stalled_call_does_not_hold_the_next_one(kind: str, servers: dict[str, FaultServer]) -> None:
    """Two calls back to back on a stalled server, the second started while the first is stuck:
    each ends within its own budget."""
    server = servers[PROTOCOL[kind]]
    server.set_fault("pass")
    backend = make_backend(kind, server.port)
    try:
        backend.infer(observation(1), 2.0)
        server.set_fault("stall")
        first: list[tuple[float, str]] = []
        thread = threading.Thread(target=lambda: first.append(timed_call(backend, 2)))
        thread.start()
        time.sleep(0.1)
        second = timed_call(backend, 3)
        thread.join(timeout=5.0)
        assert first and first[0][0] <= TIMEOUT_S + CALL_MARGIN_S, first
        assert second[0] <= TIMEOUT_S + CALL_MARGIN_S, second
        assert first[0][1] != "reply" and second[1] != "reply"
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_the_next_call_does_not_wait_behind_a_stuck_one(kind: str, servers: dict[str, FaultServer]) -> None:
    """A call is stuck on a stalled server; the server recovers; the next call succeeds at once
    (within its own budget: behind the stuck call's lock at most, for one-at-a-time protocols)."""
    server = servers[PROTOCOL[kind]]
    server.set_fault("pass")
    backend = make_backend(kind, server.port)
    try:
        backend.infer(observation(1), 2.0)
        server.set_fault("stall")
        stuck: list[tuple[float, str]] = []
        thread = threading.Thread(target=lambda: stuck.append(timed_call(backend, 2)))
        thread.start()
        time.sleep(0.1)
        server.set_fault("pass")
        budget = 2 * TIMEOUT_S
        start = time.monotonic()
        reply = backend.infer(observation(3), budget)
        duration = time.monotonic() - start
        thread.join(timeout=5.0)
        check_reply(kind, reply, 3)
        if kind in ONE_AT_A_TIME:  # waits for the lock until the stuck call's deadline, no longer
            assert duration <= TIMEOUT_S + CALL_MARGIN_S, duration
        else:  # another connection or another stream: no waiting at all
            assert duration < TIMEOUT_S / 2, duration
        assert stuck and stuck[0][0] <= TIMEOUT_S + CALL_MARGIN_S, stuck
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_large_request_to_a_server_that_stops_reading(kind: str, servers: dict[str, FaultServer]) -> None:
    """Megabytes of camera frame into a stalled server: the send blocks on full socket buffers and
    is cut off at the deadline (the budget also covers encoding the frame)."""
    server = servers[PROTOCOL[kind]]
    full_frames = {"image_size": 0} if PROTOCOL[kind] != "grpc" else {"image_encoding": "raw",
                                                                       "resize_to_server_size": False}
    server.set_fault("pass")
    backend = make_backend(kind, server.port, **full_frames)
    noise = np.random.default_rng(7).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)  # 6.75 MB raw
    try:
        backend.infer(observation(1), 2.0)
        server.set_fault("stall")
        start = time.monotonic()
        with pytest.raises(BackendError):
            backend.infer(Observation(noise, "pick up the red cube", 2, 0.0), TIMEOUT_S)
        assert time.monotonic() - start <= TIMEOUT_S + CALL_MARGIN_S
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", ("openvla_http", "openai", "openpi"))
@pytest.mark.parametrize("fault", ("drip", "stall", "huge"))
def test_an_abandoned_call_closes_its_socket(kind: str, fault: str, servers: dict[str, FaultServer]) -> None:
    """The connection of a call that timed out or was refused is closed, never kept or reused."""
    server = servers[PROTOCOL[kind]]
    server.set_fault(fault)
    backend = make_backend(kind, server.port)
    try:
        _, outcome = timed_call(backend, 1)
        assert outcome in ("timeout", "error")
        assert wait_until(lambda: server.proxy.live == 0, 1.0), f"{server.proxy.live} connection(s) still open"
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", ("openvla_http", "openai", "openpi", "grpc"))
def test_reply_cap_names_the_option(kind: str, servers: dict[str, FaultServer]) -> None:
    server = servers[PROTOCOL[kind]]
    server.set_fault("huge")
    backend = make_backend(kind, server.port)
    try:
        with pytest.raises(BackendError, match=rf"backend\.{kind}\.max_reply_bytes"):
            backend.infer(observation(1), 2.0)
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("kind", ("openvla_http", "openai"))
@pytest.mark.parametrize(("behaviour", "fragment"), [
    ("declared_huge", r"max_reply_bytes = 1048576 bytes \(declares Content-Length 1000000000"),
    ("gzip", r"reply is compressed \(gzip\) although the request asked for identity")])
def test_http_reply_refused_by_its_headers(kind: str, behaviour: str, fragment: str,
                                           servers: dict[str, FaultServer]) -> None:
    """A declared size above the cap, or a compressed body (whose decoded size the cap cannot
    bound), is refused as soon as the headers arrive."""
    server = servers["http"]
    backend = make_backend(kind, server.port)
    server.upstream.behaviour = behaviour
    try:
        start = time.monotonic()
        with pytest.raises(BackendError, match=fragment) as err:
            backend.infer(observation(1), TIMEOUT_S)
        assert time.monotonic() - start < TIMEOUT_S / 2
        assert not isinstance(err.value, BackendTimeout)
    finally:
        server.set_fault("pass")
        backend.close()


@pytest.mark.parametrize("fault", ("stall", "drip", "reset", "flap"))
def test_openai_retries_stay_within_the_budget(fault: str, servers: dict[str, FaultServer]) -> None:
    """Retries (backend.openai.max_retries) share the one budget and never sleep."""
    server = servers["http"]
    server.set_fault(fault)
    backend = make_backend("openai", server.port, max_retries=3)
    try:
        duration, _ = timed_call(backend, 1)
        assert duration <= TIMEOUT_S + CALL_MARGIN_S
    finally:
        server.set_fault("pass")
        backend.close()


# -- rt2-serve's message caps ----------------------------------------------------------------------


class _TextBackend(Backend):
    """Answers the text of ``answer_bytes`` characters (an outsize answer from a hosted model)."""

    name = "text"

    def __init__(self, answer_bytes: int) -> None:
        super().__init__({}, ActionTokenizer.from_profile("rt2"))
        self.answer_bytes = answer_bytes

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        return BackendReply(seq=observation.seq, backend=self.name, text="1" * self.answer_bytes)


@pytest.fixture
def serve_caps() -> Iterator[tuple[PolicyServer, Backend]]:
    """rt2-serve with small caps both ways, and a grpc backend talking to it."""
    hosted = _TextBackend(10)
    server = PolicyServer(hosted, "text", hosted.tokenizer,
                          ServeConfig(port=0, max_request_bytes=64 * 1024, max_reply_bytes=4096))
    server.start()
    client = create_backend("grpc", {"target": f"127.0.0.1:{server.port}", "image_encoding": "raw",
                                     "keepalive_s": 0.0}, hosted.tokenizer)
    yield server, client
    client.close()
    server.stop()


def test_serve_refuses_an_outsize_reply(serve_caps: tuple[PolicyServer, Backend]) -> None:
    server, client = serve_caps
    assert client.infer(observation(1), 2.0).text == "1" * 10
    server.backend.answer_bytes = 8192
    with pytest.raises(BackendError, match=r"answered \d+ bytes, above the server's --max-reply-bytes 4096"):
        client.infer(observation(2), 2.0)


def test_serve_refuses_an_outsize_request(serve_caps: tuple[PolicyServer, Backend]) -> None:
    _, client = serve_caps
    big = Observation(np.zeros((256, 256, 3), np.uint8), "pick", 1, 0.0)  # 196 kB raw > 64 kB
    with pytest.raises(BackendError, match=r"refused a message above its size cap .*--max-request-bytes"):
        client.infer(big, 2.0)
    assert client.infer(observation(2), 2.0).text == "1" * 10  # a 12 kB observation passes


def test_serve_default_request_cap_follows_images_and_cameras() -> None:
    assert request_bytes_cap(ServeConfig(max_image_pixels=640 * 480)) == 2 * 3 * 640 * 480 + 1024 * 1024
    assert request_bytes_cap(ServeConfig(max_image_pixels=640 * 480, cameras=("a", "b", "c"))) == \
        3 * 3 * 640 * 480 + 1024 * 1024
    assert request_bytes_cap(ServeConfig(max_request_bytes=5000)) == 5000
    assert request_bytes_cap(ServeConfig(max_image_pixels=1 << 40)) == 2**31 - 1
