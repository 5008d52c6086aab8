"""Faults injected into a running stack over real DDS and real sockets: the arm holds within a
measured bound, nothing stale moves it, the stack stays up or recovers, and the counters say why.

The nodes run in ``rt2-bringup`` processes; the probe node here plays the camera (20 Hz, pausable,
resizable), the arm driver (ee_pose) and the operator, and records what reaches the controller. The
backends are real peers on loopback sockets: an ``rt2-serve`` process (killed with SIGKILL), an
in-process gRPC policy server that answers by instruction (:class:`ScriptServer`: RT-2 text or
continuous chunks, holds chosen requests, records the image sizes it received) and the OpenVLA
``/act``, gRPC and openpi servers behind the fault proxy of test/servers/fault_server.py.

Faults, and what each asserts (every measured bound is collected by :func:`bound`, printed as a
table at the end with ``pytest -s`` and written to ``fault_bounds.md`` / ``.json`` in the pytest
tmp dir, and to ``$RT2_FAULTS_JSON`` when set, for tools/fault_injection.py):

1. the gRPC server process SIGKILLed mid-episode: zero twist within the watchdog period, both nodes
   up, ``backend_errors`` counted; a restarted server and a fresh instruction move the arm again;
2. and 8. the backend's server stalls (openvla_http, grpc, openpi), drips (openvla_http), answers
   garbage or an oversized / endless reply (all three): zero twist within the watchdog period (plus
   the rest of a queued chunk), every call ends within its budget (from the ActionTokens latencies),
   ``backend_errors`` counted and nothing abandoned, nothing of the garbage in the log; motion
   resumes by itself (same episode) once the server is healthy again;
3. the camera stops mid-episode, with single-step (RT-2) and chunked answers: no action released
   from old frames, zero twist within a bound, the queued chunk counted
   (``actions_dropped_camera_stale``); motion resumes by itself (same episode) with the camera;
4. the camera resolution changes mid-episode (64x64 -> 96x128): the new frames reach the backend
   and their actions are executed; nothing crashes;
5. an instruction change while a reply of the old episode is in flight: the old motion stops when
   the new episode is taken, the old reply is dropped by the policy and an old-episode action by the
   safety node (both counted), and the arm follows the new episode;
6. e-stop on the ``/estop`` topic during motion: zero twist within one command period (+ DDS),
   latched against a new instruction until ``~/reset``; an e-stop from a publisher of the ROS
   default QoS (volatile) or of the sensor QoS (best effort) latches too;
7. terminate in the middle of a scripted answer sequence: nothing after it is requested, released
   or executed (a late action of the episode is ignored and counted). A terminate *inside a chunk*
   cannot be expressed: continuous chunk rows carry 7 motion values and no terminate flag
   (``ActionTokenizer.decode_continuous``; an 8-value row is rejected as ``wrong_count``).

Every ArmAction the policy publishes in these tests answers a frame at most
``policy.max_action_age_s`` old at publication (:func:`assert_actions_fresh`).
Covered elsewhere (not repeated): ee_pose loss, stale / future / unstamped actions and bursts
(test_safety_freshness_dds.py); a node killed and restarted, the e-stop and reset services, cancel
(test_episode_dds.py); every fault of every network backend at the socket level (test_backend_budgets.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
grpc = pytest.importorskip("grpc")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import TwistStamped  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from rt2_ros.backends.base import CALL_MARGIN_S  # noqa: E402
from rt2_ros.backends.proto import PROTOCOL_VERSION, SERVICE_NAME, load  # noqa: E402
from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS, rgb_to_image_msg  # noqa: E402
from rt2_ros_interfaces.msg import ActionTokens, ArmAction, SafetyStatus  # noqa: E402
from test import test_episode_dds  # noqa: E402
from test.ros_helpers import REPO, MatchedPublisher, Probe, isolate_ros_domain, uid, write_params  # noqa: E402
from test.servers.fault_server import FaultServer  # noqa: E402
from test.test_episode_dds import (  # noqa: E402
    MOVE_X,
    STRAGGLER_SEQ,
    WATCHDOG_S,
    arm_action,
    begin,
    drops,
    first_time,
    free_closed_port,
    is_zero,
    latest_status,
    linear,
    policy_actions,
    say,
    timed,
    wait_motion,
    wait_status,
)

stack = test_episode_dds.stack  # its Stack fixture, on this module's probe

pb, _ = load()

EXECUTE_PERIOD_S = 0.1  # policy.execute_rate_hz 10
COMMAND_PERIOD_S = 1.0 / 30.0  # safety.command_rate_hz 30
SLACK_S = 0.15  # DDS delivery and scheduling on a loaded 2-core machine
DDS_SLACK_S = 0.067  # one DDS hop each way plus a wake-up (as test_episode_dds.STOP_MARGIN_S)
# A backend that stops answering: the last released action is pursued until the watchdog.
HOLD_BOUND_S = WATCHDOG_S + EXECUTE_PERIOD_S + COMMAND_PERIOD_S + SLACK_S
HOLD_BOUND_NOTE = f"watchdog {WATCHDOG_S} s + one execute period + one command period + {SLACK_S} s slack"
RECOVER_BOUND_S = 5.0  # fault cleared -> motion again (a generous wait, not a tight claim)
TIMEOUT_S = 0.5  # backend.timeout_s of the network backends here
MAX_FRAME_AGE_S = 0.3  # policy.max_frame_age_s of the camera tests
NETWORK_POLICY = {"backend.timeout_s": TIMEOUT_S, "policy.max_reply_age_s": 1.0, "policy.max_action_age_s": 1.0,
                  "diagnostics_period_s": 0.2}
MOVE_BACK = "0 96 128 128 128 128 128 0"  # -x 5 mm per step (rt2 profile)
MOVE_UP = "0 128 128 200 128 128 128 0"  # +z
TERMINATE = "1 128 128 128 128 128 128 0"
CHUNK_ROW = [0.25, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # +x 5 mm, gripper open (rt2 profile, continuous)
POLICY_DIAG = "rt2_policy: backend"

RESULTS: list[dict] = []


def bound(fault: str, what: str, measured_s: float, bound_s: float | None, note: str = "") -> None:
    """Record (and print) one measured latency against the bound the test asserts."""
    RESULTS.append({"fault": fault, "what": what, "measured_ms": round(measured_s * 1e3, 1),
                    "bound_ms": None if bound_s is None else round(bound_s * 1e3, 1), "note": note})
    b = "no bound" if bound_s is None else f"bound {bound_s * 1e3:.0f} ms"
    print(f"\n[measured] {fault}: {what}: {measured_s * 1e3:.1f} ms ({b}{f'; {note}' if note else ''})", flush=True)


def results_table(rows: list[dict]) -> str:
    """Markdown: one line per (fault, measurement), the worst value measured and its bound."""
    worst: dict[tuple[str, str], dict] = {}
    for r in rows:
        key = (r["fault"], r["what"])
        if key not in worst or r["measured_ms"] > worst[key]["measured_ms"]:
            worst[key] = {**r, "n": worst.get(key, {}).get("n", 0) + 1}
        else:
            worst[key]["n"] += 1
    lines = ["| fault | measurement | bound asserted [ms] | measured worst [ms] | samples | bound = |",
             "|---|---|---|---|---|---|"]
    for (fault, what), r in worst.items():
        b = "-" if r["bound_ms"] is None else f"{r['bound_ms']:.0f}"
        lines.append(f"| {fault} | {what} | {b} | {r['measured_ms']:.1f} | {r['n']} | {r['note']} |")
    return "\n".join(lines) + "\n"


# -- the probe: camera, arm driver, operator, recorder ---------------------------------------------
class Camera:
    """The probe's /camera/image at 20 Hz, which a test can pause and resize."""

    def __init__(self, probe: Probe) -> None:
        self.size = (64, 64)
        self.running = True
        self.last_sent_at = 0.0
        self._lock = threading.Lock()
        probe.image_pub = self.pub = MatchedPublisher(probe, Image, "/camera/image", 10)
        self._probe = probe
        probe.node.create_timer(0.05, self._tick)

    def _tick(self) -> None:
        with self._lock:
            if not self.running:
                return
            h, w = self.size
        frame = np.full((h, w, 3), 40, dtype=np.uint8)
        self.pub.publish(rgb_to_image_msg(frame, self._probe.node.get_clock().now().to_msg(), "camera"))
        self.last_sent_at = time.monotonic()

    def pause(self) -> float:
        """Stop publishing; returns the monotonic time of the last frame sent."""
        with self._lock:
            self.running = False
        time.sleep(0.06)  # a tick in progress finishes
        return self.last_sent_at

    def resume(self, size: tuple[int, int] | None = None) -> None:
        with self._lock:
            if size is not None:
                self.size = size
            self.running = True


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    isolate_ros_domain()
    RESULTS.clear()
    p = Probe("rt2_faults_probe")
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.record(ArmAction, "/arm_action", ACTION_QOS, "action")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.record(ActionTokens, "/rt2_policy/action_tokens", 10, "tokens")
    p.record(DiagnosticArray, "/diagnostics", 10, "diag")
    p.publish_fake_sensors(cameras={})  # the arm driver (ee_pose); the camera is ours
    p.camera = Camera(p)
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    p.straggler = p.publisher(ArmAction, "/arm_action", ACTION_QOS)  # plays a policy that did not stop
    yield p
    p.close()
    if RESULTS:
        table = results_table(RESULTS)
        out = tmp_path_factory.mktemp("faults")
        (out / "fault_bounds.md").write_text(table)
        (out / "fault_bounds.json").write_text(json.dumps(RESULTS, indent=1))
        if os.environ.get("RT2_FAULTS_JSON"):
            Path(os.environ["RT2_FAULTS_JSON"]).write_text(json.dumps(RESULTS, indent=1))
        print(f"\n\nFault injection over DDS: measured bounds\n\n{table}\n(written to {out / 'fault_bounds.md'})")


# -- helpers ------------------------------------------------------------------------------------------
def motion_stops(probe: Probe, t0: float, limit: float) -> float:
    """Arrival time of the first zero twist after the last non-zero one, watching ``limit`` + 1 s after
    ``t0`` (a transient hold before the end, e.g. a late ee_pose, does not count as the stop)."""
    probe.wait_for(lambda: time.monotonic() > t0 + limit + 1.0, limit + 2.0, "the hold window")
    twists = timed(probe, "twist", t0)
    last_move = max((t for t, m in twists if not is_zero(m)), default=t0)
    return next(t for t, m in twists if t > last_move and is_zero(m))


def steady_motion(probe: Probe, t0: float, timeout: float = 5.0) -> None:
    """Until the last 5 twists after ``t0`` all move: a zero twist after this can only be the stop."""
    probe.wait_for(lambda: len(w := probe.since("twist", t0)) >= 5 and not any(is_zero(m) for m in w[-5:]),
                   timeout, "steady motion")


def policy_diag(probe: Probe, t0: float) -> dict[str, str]:
    """The key/values of the policy node's last /diagnostics status after ``t0`` ({} if none)."""
    for arr in reversed(probe.since("diag", t0)):
        for st in arr.status:
            if st.name == POLICY_DIAG:
                return {kv.key: kv.value for kv in st.values}
    return {}


def counter(values: dict[str, str], key: str) -> int:
    return int(values.get(key, "0") or 0)


def wait_policy_counter(probe: Probe, t0: float, keys: tuple[str, ...], at_least: int, timeout: float = 5.0
                        ) -> dict[str, str]:
    """Until the sum of ``keys`` in the policy's diagnostics (published after ``t0``) reaches ``at_least``."""
    probe.wait_for(lambda: sum(counter(policy_diag(probe, t0), k) for k in keys) >= at_least, timeout,
                   f"policy diagnostics {' + '.join(keys)} >= {at_least}")
    return policy_diag(probe, t0)


def stamp_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def assert_actions_fresh(probe: Probe, t0: float, max_age_s: float) -> int:
    """Every ArmAction the policy published after ``t0`` answers a camera frame at most ``max_age_s`` old
    when it was published (header stamp - observation_stamp; both this machine's clock). Returns how many."""
    actions = policy_actions(probe, t0)
    ages = [stamp_s(a.header.stamp) - stamp_s(a.observation_stamp) for a in actions]
    stale = [round(a, 3) for a in ages if not 0.0 <= a <= max_age_s + 0.005]
    assert not stale, f"{len(stale)} of {len(ages)} actions answered frames older than {max_age_s} s: {stale[:5]}"
    return len(actions)


# -- the gRPC policy server of the tests ----------------------------------------------------------------
class ScriptServer:
    """rt2_ros's gRPC policy service (protocol v2) on 127.0.0.1, in this process.

    Answers each observation by its instruction: the first entry of :attr:`answers` whose key is in
    the instruction (RT-2 text, or an (N, 7) array sent as an ActionChunk); holds requests whose
    instruction contains :attr:`hold_key` for :attr:`hold_s` before answering (:attr:`holding` is set
    when one arrives); records (arrival, instruction, height, width) of every request.
    """

    def __init__(self) -> None:
        self.answers: dict[str, object] = {}
        self.hold_key = ""
        self.hold_s = 0.0
        self.holding = threading.Event()
        self.received: list[tuple[float, str, int, int]] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="script-grpc"))
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                lambda _r, _c: pb.ServerInfo(protocol_version=PROTOCOL_VERSION, backend="script", model="faults"),
                request_deserializer=pb.InfoRequest.FromString, response_serializer=pb.ServerInfo.SerializeToString),
            "Infer": grpc.unary_unary_rpc_method_handler(
                self._infer, request_deserializer=pb.Observation.FromString,
                response_serializer=pb.InferReply.SerializeToString),
            "Reset": grpc.unary_unary_rpc_method_handler(
                lambda _r, _c: pb.ResetReply(), request_deserializer=pb.ResetRequest.FromString,
                response_serializer=pb.ResetReply.SerializeToString),
        }),))
        self.port: int = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def configure(self, answers: dict[str, object], hold_key: str = "", hold_s: float = 0.0) -> None:
        with self._lock:
            self.answers, self.hold_key, self.hold_s = dict(answers), hold_key, hold_s
            self.holding.clear()
            self.received = []

    def hold(self, key: str, seconds: float) -> None:
        with self._lock:
            self.hold_key, self.hold_s = key, seconds
            self.holding.clear()

    def sizes_since(self, t0: float) -> set[tuple[int, int]]:
        with self._lock:
            return {(h, w) for t, _, h, w in self.received if t >= t0}

    def _infer(self, request, _context):
        img = request.images[0].image if request.images else None
        with self._lock:
            self.received.append((time.monotonic(), request.instruction, img.height if img else 0,
                                  img.width if img else 0))
            answer = next((a for k, a in self.answers.items() if k in request.instruction), MOVE_X)
            delay = self.hold_s if self.hold_key and self.hold_key in request.instruction else 0.0
        if delay:
            self.holding.set()
            time.sleep(delay)
        reply = pb.InferReply(seq=request.seq, backend="script", model="faults")
        if isinstance(answer, str):
            reply.text = answer
        else:
            chunk = np.asarray(answer, dtype=np.float32)
            reply.actions.values.extend(chunk.reshape(-1).tolist())
            reply.actions.shape.extend(chunk.shape)
        return reply

    def close(self) -> None:
        self._server.stop(0).wait(2.0)


@pytest.fixture(scope="module")
def script_server():
    server = ScriptServer()
    yield server
    server.close()


def grpc_policy(port: int, **extra) -> dict:
    return {"backend.type": "grpc", "backend.grpc.target": f"127.0.0.1:{port}", "backend.grpc.tls": False,
            "backend.grpc.max_backoff_s": 0.5, **NETWORK_POLICY, **extra}


# -- 1. the gRPC server process dies mid-episode -----------------------------------------------------
def start_server(tmp_path, port: int) -> subprocess.Popen:
    params = write_params(tmp_path / "serve.yaml", policy={
        "backend.type": "scripted", "backend.scripted.answers": [MOVE_X], "backend.scripted.repeat": True})
    path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rt2_ros.serve", "--params", str(params), "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if re.search(r"serving", path.read_text()):
            return proc
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"rt2-serve did not start: {path.read_text()}")


def test_grpc_server_killed_mid_episode_holds_then_recovers(probe, stack, tmp_path):
    port = free_closed_port()
    server = start_server(tmp_path, port)
    try:
        s = stack(policy=grpc_policy(port))
        s.start("both")
        _, t0, _ = begin(probe, lambda: say(probe, "push the block forward"))
        steady_motion(probe, t0)
        errors = counter(policy_diag(probe, t0), "backend_errors")
        t_kill = time.monotonic()
        server.send_signal(signal.SIGKILL)
        server.wait(5)
        # No reply can come: the last released action keeps the arm moving until the watchdog.
        t_zero = motion_stops(probe, t_kill, HOLD_BOUND_S)
        bound("gRPC server SIGKILLed", "kill -> first zero twist", t_zero - t_kill, HOLD_BOUND_S, HOLD_BOUND_NOTE)
        assert t_zero - t_kill <= HOLD_BOUND_S
        assert s.alive("both")
        st = latest_status(probe)
        assert st.state_name == "HOLDING" and (st.watchdog_trips >= 1 or "hold:stale_action" in list(st.drop_causes))
        wait_policy_counter(probe, t_kill, ("backend_errors",), errors + 1)  # UNAVAILABLE, counted
        assert_actions_fresh(probe, t0, 1.0)

        server = start_server(tmp_path, port)  # same port: the client reconnects by itself
        t_back = time.monotonic()
        _, t1, _ = begin(probe, lambda: say(probe, "push the block forward again"))
        t_move = wait_motion(probe, t1, RECOVER_BOUND_S)
        bound("gRPC server SIGKILLed", "server restarted -> motion on a fresh instruction", t_move - t_back,
              RECOVER_BOUND_S)
        assert "Traceback" not in s.log("both"), s.log("both")
    finally:
        server.kill()
        server.wait(5)


# -- 2. and 8. a network backend's server stalls, drips, answers garbage or an endless reply ------------
@pytest.fixture(scope="module")
def fault_servers():
    """One FaultServer per protocol ("http", "grpc", "openpi"), made on first use."""
    made: dict[str, FaultServer] = {}

    def get(protocol: str) -> FaultServer:
        if protocol not in made:
            made[protocol] = FaultServer(protocol)
        return made[protocol]

    yield get
    for server in made.values():
        server.close()


# The fault server answers fault_server.ANSWER_ACTION (dx 1 cm, ...): continuous rows read as metres.
CONTINUOUS = {"tokenizer.profile": "openvla", "tokenizer.translation_scale_m": 1.0, "tokenizer.rotation_scale_rad": 1.0,
              "tokenizer.rotation_convention": "rpy", "tokenizer.gripper_convention": "one_open_zero_closed",
              **NETWORK_POLICY}
# backend type -> (fault server protocol, actions per reply, policy params given the server's port)
NETWORK_BACKENDS = {
    "openvla_http": ("http", 1, lambda port: {
        "backend.type": "openvla_http", "backend.openvla_http.url": f"http://127.0.0.1:{port}",
        "backend.openvla_http.image_size": 64, "backend.openvla_http.connect_timeout_s": 0.3, **CONTINUOUS}),
    "grpc": ("grpc", 1, lambda port: {
        "backend.type": "grpc", "backend.grpc.target": f"127.0.0.1:{port}", "backend.grpc.tls": False,
        "backend.grpc.max_backoff_s": 0.2, "backend.grpc.connect_timeout_s": 0.3, **CONTINUOUS}),
    "openpi": ("openpi", 4, lambda port: {
        "backend.type": "openpi", "backend.openpi.url": f"ws://127.0.0.1:{port}", "backend.openpi.state_key": "",
        "backend.openpi.image_size": 64, "backend.openpi.connect_timeout_s": 0.3,
        "backend.openpi.reconnect_backoff_s": 0.1, "backend.openpi.reconnect_backoff_max_s": 0.2, **CONTINUOUS}),
}


@pytest.mark.parametrize(("backend", "fault"), [
    ("openvla_http", "stall"), ("openvla_http", "drip"), ("openvla_http", "garbage"), ("openvla_http", "huge"),
    ("grpc", "stall"), ("grpc", "garbage"), ("grpc", "huge"),
    ("openpi", "stall"), ("openpi", "garbage"), ("openpi", "huge")])
def test_backend_server_fault_holds_counts_and_recovers(probe, stack, fault_servers, backend, fault):
    protocol, horizon, params = NETWORK_BACKENDS[backend]
    server = fault_servers(protocol)
    server.set_fault("pass")
    s = stack(policy=params(server.port))
    s.start("both")
    _, t0, ep = begin(probe, lambda: say(probe, "put the cube in the tray"))
    steady_motion(probe, t0)
    errors = counter(policy_diag(probe, t0), "backend_errors")
    name = f"{backend} server {fault}"
    # What was queued before the fault still runs (each action fresh), then the watchdog holds.
    limit = HOLD_BOUND_S + (horizon - 1) * EXECUTE_PERIOD_S
    note = HOLD_BOUND_NOTE + (f" + {horizon - 1} execute periods (rest of a {horizon}-action chunk)"
                              if horizon > 1 else "")
    t_fault = time.monotonic()
    server.set_fault(fault)
    try:
        t_zero = motion_stops(probe, t_fault, limit)
        bound(name, "fault -> first zero twist", t_zero - t_fault, limit, note)
        assert t_zero - t_fault <= limit
        values = wait_policy_counter(probe, t_fault, ("backend_errors",), errors + 2)
        st = latest_status(probe)
        # Held by the watchdog; on a loaded machine the probe's ee_pose may go stale first, and the node
        # then holds for that (hold:no_fresh_pose) before the watchdog would trip: a hold either way.
        assert st.state_name == "HOLDING" and uid(st.episode_id) == ep, st
        assert st.watchdog_trips >= 1 or drops(st).get("hold:no_fresh_pose"), st
        # Every call under the fault ended within its budget, in total (the policy's own measurement).
        calls = probe.since("tokens", t_fault + EXECUTE_PERIOD_S)  # every outcome, failed or not
        assert len(calls) >= 2, "no call under the fault was reported on ~/action_tokens"
        worst = max(m.latency_s for m in calls)
        budget = TIMEOUT_S + CALL_MARGIN_S
        bound(name, "worst backend call (ActionTokens latency)", worst, budget,
              f"backend.timeout_s {TIMEOUT_S} s + CALL_MARGIN_S {CALL_MARGIN_S} s")
        assert worst <= budget, worst
        assert counter(values, "requests_abandoned") == 0, values  # nothing had to be given up on
    finally:
        server.set_fault("pass")
    t_clear = time.monotonic()
    t_move = wait_motion(probe, t_clear, RECOVER_BOUND_S)  # same episode: the next healthy reply moves
    bound(name, "server healthy -> motion (same episode)", t_move - t_clear, RECOVER_BOUND_S)
    assert uid(latest_status(probe).episode_id) == ep
    assert s.alive("both")
    log = s.log("both")  # read as strict UTF-8: a lone surrogate or invalid byte would raise here
    assert "Traceback" not in log and "\x1b" not in log, log[-3000:]
    assert_actions_fresh(probe, t0, 1.0)


# -- 3. the camera stops, then resumes -------------------------------------------------------------------
@pytest.mark.parametrize("answer", ["rt2_step", "chunk10"])
def test_camera_stop_holds_and_resume_moves_again(probe, stack, script_server, answer):
    """rt2_step: one RT-2 action per reply (nothing is ever queued); chunk10: chunks of 10 actions."""
    script_server.configure({"": MOVE_X if answer == "rt2_step" else [CHUNK_ROW] * 10})
    s = stack(policy=grpc_policy(script_server.port, **{"policy.max_frame_age_s": MAX_FRAME_AGE_S}))
    s.start("both")
    _, t0, ep = begin(probe, lambda: say(probe, "push the block forward"))
    steady_motion(probe, t0)
    before = policy_diag(probe, t0)
    t_last_frame = probe.camera.pause()
    try:
        # The last frame can still be answered, and a queued chunk runs on until the camera is stale
        # (its newest frame older than policy.max_frame_age_s); then nothing is released, and the
        # watchdog holds the arm.
        release_until = MAX_FRAME_AGE_S + EXECUTE_PERIOD_S if answer == "chunk10" else EXECUTE_PERIOD_S
        limit = release_until + WATCHDOG_S + COMMAND_PERIOD_S + SLACK_S
        t_zero = motion_stops(probe, t_last_frame, limit)
        bound(f"camera stops ({answer})", "last frame -> first zero twist", t_zero - t_last_frame, limit,
              ("policy.max_frame_age_s + " if answer == "chunk10" else "") + HOLD_BOUND_NOTE)
        assert t_zero - t_last_frame <= limit
        late = [t - t_last_frame for t, m in timed(probe, "action", t_last_frame + release_until + SLACK_S)
                if m.observation_seq < STRAGGLER_SEQ]
        assert late == [], f"{len(late)} actions released from old frames, at {late[:5]} s after the last frame"
        st = latest_status(probe)  # why: the watchdog (no fresh action) or the stale-target rule
        assert st.state_name == "HOLDING" and (st.watchdog_trips >= 1 or "hold:stale_action" in list(st.drop_causes))
        assert uid(st.episode_id) == ep  # the episode waits, it did not end
        if answer == "chunk10":  # the rest of the chunk was dropped, counted
            after = wait_policy_counter(probe, t_last_frame, ("actions_dropped_camera_stale",),
                                        counter(before, "actions_dropped_camera_stale") + 1)
        else:
            after = policy_diag(probe, time.monotonic() - 0.5)
        print(f"\npolicy counters after the camera stopped ({answer}): " + ", ".join(
            f"{k}={after.get(k, '0')}" for k in ("frames_stale", "actions_dropped_camera_stale", "actions_expired",
                                                "requests_sent", "replies_accepted")))
    finally:
        probe.camera.resume()
    t_resume = time.monotonic()
    t_move = wait_motion(probe, t_resume, RECOVER_BOUND_S)  # same episode: fresh frames, fresh requests
    bound(f"camera stops ({answer})", "camera resumes -> motion (same episode)", t_move - t_resume, RECOVER_BOUND_S)
    assert uid(latest_status(probe).episode_id) == ep
    assert s.alive("both")
    assert_actions_fresh(probe, t0, 1.0)


# -- 4. the camera's resolution changes mid-episode --------------------------------------------------------
def test_camera_resolution_change_mid_episode_keeps_working(probe, stack, script_server):
    script_server.configure({"": MOVE_X})
    s = stack(policy=grpc_policy(script_server.port))
    s.start("both")
    _, t0, ep = begin(probe, lambda: say(probe, "push the block forward"))
    probe.wait_for(lambda: len(policy_actions(probe, t0)) >= 3, 10.0, "actions at 64x64")
    assert script_server.sizes_since(t0) == {(64, 64)}
    accepted = latest_status(probe).actions_accepted
    try:
        probe.camera.resume(size=(96, 128))  # the driver switches mode mid-episode
        t_change = time.monotonic() + 0.1  # a 64x64 frame in flight is still fine
        probe.wait_for(lambda: (96, 128) in script_server.sizes_since(t_change), 5.0, "a 96x128 frame at the server")
        t_first = min(t for t, _, h, w in script_server.received if (h, w) == (96, 128))
        probe.wait_for(lambda: len(policy_actions(probe, t_first)) >= 3, 5.0, "actions after the change to 96x128")
        wait_status(probe, lambda st: st.actions_accepted >= accepted + 3, 5.0, "actions accepted after the change")
        bound("camera 64x64 -> 96x128", "first 96x128 request -> 3rd action after it",
              timed(probe, "action", t_first)[2][0] - t_first, 5.0)
    finally:
        probe.camera.resume(size=(64, 64))
    assert uid(latest_status(probe).episode_id) == ep and latest_status(probe).state_name == "RUNNING"
    values = policy_diag(probe, t0)
    assert not any(k.startswith("frames_invalid") and v != "0" for k, v in values.items()), values
    assert s.alive("both")
    assert "Traceback" not in s.log("both"), s.log("both")
    assert_actions_fresh(probe, t0, 1.0)


# -- 5. the instruction changes while a reply of the old episode is in flight ---------------------------------
def test_instruction_change_mid_episode_drops_the_old_episode_and_follows_the_new(probe, stack, script_server):
    script_server.configure({"forward": MOVE_X, "back": MOVE_BACK})
    s = stack(policy=grpc_policy(script_server.port))
    s.start("both")
    _, t0, old = begin(probe, lambda: say(probe, "push the block forward"))
    steady_motion(probe, t0)
    before = policy_diag(probe, t0)
    script_server.hold("forward", 0.3)  # the next request of the old episode is answered late
    assert script_server.holding.wait(3.0), "no request of the old episode reached the server"
    t_switch = say(probe, "pull the block back")
    t_taken = first_time(probe, "status", t_switch, lambda st: uid(st.episode_id) not in (old, bytes(16)), 5.0,
                         "the safety node to take the new episode")
    new = uid(latest_status(probe).episode_id)
    bound("instruction change", "new instruction -> new episode taken", t_taken - t_switch, 1.0)
    assert t_taken - t_switch <= 1.0
    # The old reply arrives 0.3 s after it was asked for: the policy drops it (counted).
    dropped = ("replies_dropped_stale_episode",)
    values = wait_policy_counter(probe, t_switch, dropped, sum(counter(before, k) for k in dropped) + 1)
    # A policy that has not noticed yet: an old-episode action reaching the safety node is dropped (counted).
    n_stale = drops(latest_status(probe)).get("stale_episode", 0)
    probe.straggler.publish(arm_action(old, z=0.05))
    wait_status(probe, lambda st: drops(st).get("stale_episode", 0) == n_stale + 1, 5.0, "a stale_episode drop")

    t_back = first_time(probe, "twist", t_switch, lambda m: linear(m)[0] < -1e-3, 5.0, "-x motion (new episode)")
    t_last_fwd = max((t for t, m in timed(probe, "twist", t_switch) if linear(m)[0] > 1e-3), default=t_switch)
    assert t_last_fwd <= t_taken + COMMAND_PERIOD_S + DDS_SLACK_S, t_last_fwd - t_taken  # old motion ends there
    t_stop = first_time(probe, "twist", t_switch, lambda m: linear(m)[0] <= 1e-3, 1.0, "the old motion to end")
    limit = COMMAND_PERIOD_S + SLACK_S
    bound("instruction change", "new instruction -> old motion ends (first twist without +x)", t_stop - t_switch,
          limit, f"one command period + {SLACK_S} s (policy -> episode -> safety node: two DDS hops)")
    assert t_stop - t_switch <= limit
    bound("instruction change", "new instruction -> first -x twist", t_back - t_switch, 2.0)
    after = policy_actions(probe, t_taken + DDS_SLACK_S)  # published after the switch reached the policy
    assert after and all(uid(a.episode_id) == new and a.translation.x < 0 for a in after), \
        [(uid(a.episode_id).hex()[:8], a.translation.x) for a in after]
    window_start = time.monotonic()
    probe.wait_for(lambda: len(probe.since("twist", window_start)) >= 15, 3.0, "15 twists")
    assert all(linear(m)[0] <= 1e-3 and abs(linear(m)[2]) < 0.02 for m in probe.since("twist", window_start))
    print("\npolicy drops of the old reply: " + ", ".join(f"{k}={values.get(k, '0')}" for k in dropped))
    assert s.alive("both")
    assert_actions_fresh(probe, t0, 1.0)


# -- 6. e-stop on the topic during motion -------------------------------------------------------------------
def test_estop_topic_during_motion_holds_within_one_command_period_until_reset(probe, stack):
    s = stack()
    s.start("both")
    estop = probe.publisher(Bool, "/estop", LATCHED_QOS)
    latencies = []
    try:
        estop.wait_new_match(0, 10.0)
        for i in range(3):
            _, t0, ep = begin(probe, lambda i=i: say(probe, f"move until the e-stop {i}"))
            steady_motion(probe, t0)
            t_pub = estop.publish(Bool(data=True))
            t_zero = first_time(probe, "twist", t_pub, is_zero, 2.0, "a zero twist after the e-stop")
            latencies.append(t_zero - t_pub)
            st = wait_status(probe, lambda st: st.state_name == "ESTOPPED", 2.0, "ESTOPPED")
            # latched: nothing moves, whatever comes (here: a new instruction) until the reset
            say(probe, "move anyway")
            window = time.monotonic()
            probe.wait_for(lambda w=window: len(probe.since("twist", w)) >= 15, 3.0, "15 twists")
            assert all(is_zero(m) for m in probe.since("twist", t_zero)), "motion during the e-stop"
            assert latest_status(probe).state_name == "ESTOPPED"
            assert policy_actions(probe, t_pub + 0.3) == [], "the policy kept publishing during the e-stop"
            assert st.estops >= i + 1
            probe.wait_answering("rt2_safety")
            reset = probe.call(Trigger, "/rt2_safety/reset", Trigger.Request())
            assert reset.success, reset.message
            wait_status(probe, lambda st: st.state_name == "IDLE", 2.0, "IDLE after the reset")
            assert uid(latest_status(probe).episode_id) != ep
    finally:
        estop.publish(Bool(data=False))  # the latched sample a later safety node would get: harmless
        time.sleep(0.1)
        probe.node.destroy_publisher(estop.pub)
    limit = COMMAND_PERIOD_S + DDS_SLACK_S
    for x in latencies:
        bound("e-stop on /estop", "publish -> first zero twist", x, limit,
              f"one command period {COMMAND_PERIOD_S * 1e3:.0f} ms + {DDS_SLACK_S * 1e3:.0f} ms DDS")
    assert max(latencies) <= limit, latencies
    _, t1, _ = begin(probe, lambda: say(probe, "move after the reset"))  # a fresh instruction moves again
    assert s.alive("both")
    assert_actions_fresh(probe, t1, 4.0)


def release_estop(probe) -> None:
    """Leave the safety node as the next test expects it: not ESTOPPED."""
    if latest_status(probe).state_name == "ESTOPPED":
        probe.wait_answering("rt2_safety")
        probe.call(Trigger, "/rt2_safety/reset", Trigger.Request())


@pytest.mark.parametrize("writer", ["default", "sensor"])
def test_estop_from_a_writer_of_any_qos_is_received(probe, stack, writer):
    """An e-stop button driver publishing with the ROS default QoS (reliable, volatile, depth 10) or
    the sensor QoS (best effort): such a writer is matched (it is incompatible with the latched reader
    by design, and the node says nothing about that), and its message latches."""
    from rclpy.event_handler import PublisherEventCallbacks
    from rclpy.qos import qos_profile_sensor_data

    s = stack()
    s.start("safety")
    seen: list[str] = []
    qos = 10 if writer == "default" else qos_profile_sensor_data
    pub = probe.node.create_publisher(Bool, "/estop", qos, event_callbacks=PublisherEventCallbacks(
        matched=lambda e: seen.append("matched"), incompatible_qos=lambda e: seen.append("incompatible")))
    try:
        probe.wait_for(lambda: "matched" in seen, 10.0, "the safety node's estop reader to be matched")
        # Repeated like a button driver: the reader may match this writer a moment after the writer
        # matched it (discovery is not symmetric in time), and a volatile reader drops what came before.
        for _ in range(30):
            pub.publish(Bool(data=True))
            try:
                wait_status(probe, lambda st: st.state_name == "ESTOPPED", 0.1, "ESTOPPED")
                break
            except AssertionError:
                continue
        wait_status(probe, lambda st: st.state_name == "ESTOPPED", 0.5, f"ESTOPPED (publisher events: {seen})")
        assert "incompatible" not in s.log("safety"), s.log("safety")
    finally:
        probe.node.destroy_publisher(pub)
        release_estop(probe)


def test_estop_latched_before_the_safety_node_starts_holds_it(probe, stack):
    """A latched e-stop (a button held down) published before rt2_safety starts: the node comes up ESTOPPED."""
    pub = probe.publisher(Bool, "/estop", LATCHED_QOS)
    pub.publish(Bool(data=True))
    s = stack()
    try:
        s.start("safety")
        wait_status(probe, lambda st: st.state_name == "ESTOPPED", 10.0, "ESTOPPED from the latched e-stop")
    finally:
        pub.publish(Bool(data=False))  # the latched sample a later safety node would get: harmless
        time.sleep(0.1)
        probe.node.destroy_publisher(pub.pub)  # else every later safety node of this run starts ESTOPPED
        release_estop(probe)


# -- 7. terminate in the middle of an answer sequence ---------------------------------------------------------
def test_terminate_mid_sequence_nothing_after_it_executes(probe, stack):
    s = stack(policy={"backend.scripted.answers": [MOVE_X] * 4 + [TERMINATE] + [MOVE_UP] * 5,
                      "backend.scripted.repeat": False, "diagnostics_period_s": 0.2})
    s.start("both")
    _, t0, ep = begin(probe, lambda: say(probe, "push, then stop"))
    t_term = first_time(probe, "action", t0, lambda a: a.terminate and uid(a.episode_id) == ep, 10.0,
                        "the terminate action")
    t_zero = first_time(probe, "twist", t_term, is_zero, 2.0, "a zero twist after terminate")
    limit = COMMAND_PERIOD_S + DDS_SLACK_S
    bound("terminate mid-sequence", "terminate action -> first zero twist", t_zero - t_term, limit,
          "one command period + DDS")
    assert t_zero - t_term <= limit
    st = wait_status(probe, lambda st: st.state_name == "TERMINATED" and uid(st.episode_id) == ep, 2.0, "TERMINATED")
    assert st.terminations >= 1
    # A late action of the episode (a policy that did not stop) is ignored, counted.
    ignored = drops(st).get("ignored:terminated", 0)
    probe.straggler.publish(arm_action(ep, z=0.05))
    wait_status(probe, lambda st: drops(st).get("ignored:terminated", 0) == ignored + 1, 3.0, "ignored:terminated")
    window = time.monotonic()
    probe.wait_for(lambda: len(probe.since("twist", window)) >= 20, 3.0, "20 twists")
    assert all(is_zero(m) for _, m in timed(probe, "twist", t_zero)), "motion after terminate"
    actions = policy_actions(probe, t0)
    moves = [a for a in actions if not a.terminate]
    assert len(moves) == 4 and all(a.translation.z < 1e-3 for a in moves), [a.translation for a in moves]
    assert [a for a in actions if a.terminate] == [actions[-1]], "an action was released after terminate"
    probe.wait_for(lambda: bool(policy_diag(probe, t_term + 0.3)), 3.0, "policy diagnostics after terminate")
    values = policy_diag(probe, t_term + 0.3)
    assert counter(values, "episodes_terminated") == 1, values
    requests = counter(values, "requests_sent")
    t_check = time.monotonic()
    probe.wait_for(lambda: time.monotonic() > t_check + 0.5 and bool(policy_diag(probe, t_check + 0.5)), 3.0,
                   "diagnostics 0.5 s later")  # absence of requests can only be observed over time
    assert counter(policy_diag(probe, t_check + 0.5), "requests_sent") == requests, "a request after terminate"
    begin(probe, lambda: say(probe, "push again"))  # a fresh instruction moves again
    assert s.alive("both")
    assert_actions_fresh(probe, t0, 4.0)
