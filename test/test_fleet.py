"""Fleet serving (rt2_ros.fleet): a backend hosted on Ray Serve, reached by a robot's grpc client.

A real local Ray instance is started (no mocks): the model-cost simulator backend is deployed with
``@serve.batch``, rt2-serve's PolicyServer is its gRPC front, and the robot side is the ``grpc``
backend. If Ray cannot start on this machine the tests fail with Ray's reason (never skip).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from rt2_ros.actions import Observation
from rt2_ros.backends import BackendConfigError, BackendError, create_backend
from rt2_ros.fleet.front import load_fleet_config, start_fleet
from rt2_ros.params import ConfigError
from rt2_ros.serve import PolicyServer, ServeConfig
from rt2_ros.tokens import ActionTokenizer

BASE_S, PER_ITEM_S = 0.1, 0.005  # simulated forward pass: long enough that concurrent calls meet in a batch
MAX_BATCH = 8
TOKEN = b"fleet-test-token"
ROBOTS = 8


def _tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


def _observation(seq: int) -> Observation:
    image = np.random.default_rng(seq).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Observation(image=image, instruction="pick up the red cube", seq=seq, stamp=1000.0 + seq / 10)


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for this module; every Ray process it started is gone afterwards."""
    try:
        import ray
    except ImportError as exc:
        pytest.fail(f"ray[serve] is not installed ({exc}); pip install -r requirements-fleet.txt")
    try:
        ray.init(num_cpus=2, include_dashboard=False, namespace="rt2_fleet_test", logging_level="WARNING",
                 object_store_memory=128 * 1024 * 1024)
    except Exception as exc:  # any reason Ray cannot start is the test's failure message
        pytest.fail(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    node = ray._private.worker.global_worker.node
    pids = [p.process.pid for infos in node.all_processes.values() for p in infos]
    assert pids, "Ray reported no processes of its own"
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    deadline = time.monotonic() + 15.0
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"Ray processes left running after shutdown: {alive}"


def _running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def fleet(ray_instance):
    """The simulator deployed on Ray Serve behind a PolicyServer (token required) on a free port."""
    params = {"backend.simulated_model.base_s": BASE_S, "backend.simulated_model.per_item_s": PER_ITEM_S,
              "tokenizer.profile": "rt2"}
    config = load_fleet_config(None) | {"fleet.max_batch_size": MAX_BATCH, "fleet.batch_wait_timeout_s": 0.05,
                                        "fleet.replica.num_cpus": 0.5, "fleet.app_name": "rt2_fleet_test"}
    t0 = time.monotonic()
    backend = start_fleet(params, "simulated_model", None, config, _tokenizer())
    deploy_s = time.monotonic() - t0
    server = PolicyServer(backend, "simulated_model", _tokenizer(),
                          ServeConfig(port=0, token=TOKEN, workers=32, max_calls_per_client=32))
    server.start()
    yield backend, f"127.0.0.1:{server.port}", deploy_s
    server.stop()


def _client(target: str, tmp_path, token: bytes | None = TOKEN):
    opts: dict = {"target": target, "connect_timeout_s": 10.0, "max_backoff_s": 0.5}
    if token is not None:
        path = tmp_path / "token.txt"
        path.write_bytes(token)
        path.chmod(0o600)
        opts |= {"token_file": str(path), "allow_insecure_token": True}  # loopback in a test; robots use TLS
    return create_backend("grpc", opts, _tokenizer())


def test_robot_gets_valid_actions_through_ray_serve(fleet, tmp_path):
    backend, target, deploy_s = fleet
    robot = _client(target, tmp_path)
    try:
        for seq in range(3):
            reply = robot.infer(_observation(seq), timeout_s=5.0)
            assert reply.seq == seq
            actions = _tokenizer().decode_reply(reply)
            assert len(actions) == 1 and actions[0].is_finite()
            assert np.allclose(actions[0].translation, 0.0, atol=1e-3)  # the simulator's zero motion (one bin)
    finally:
        robot.close()
    assert sum(backend.batch_sizes().values()) >= 3  # the answers came from the Ray replica
    print(f"deployed in {deploy_s:.1f} s")


def test_token_rule_holds_on_the_fleet_front(fleet, tmp_path):
    _, target, _ = fleet
    for token in (None, b"wrong-token"):
        robot = _client(target, tmp_path, token)
        try:
            with pytest.raises(BackendError, match=r"UNAUTHENTICATED|token"):
                robot.infer(_observation(1), timeout_s=5.0)
        finally:
            robot.close()


def test_concurrent_robots_are_batched(fleet, tmp_path):
    """ROBOTS robots ask at once, twice; the replica's own counters show batches of more than one,
    and the total time is far below ROBOTS forward passes one after another."""
    backend, target, _ = fleet
    before = backend.batch_sizes()
    robots = [_client(target, tmp_path) for _ in range(ROBOTS)]
    try:
        robots[0].infer(_observation(0), timeout_s=5.0)  # warm the connection path
        for r in robots[1:]:
            r.infer(_observation(0), timeout_s=5.0)
        with ThreadPoolExecutor(ROBOTS) as pool:
            t0 = time.monotonic()
            for first in (100, 200):
                replies = list(pool.map(lambda i, first=first: robots[i].infer(_observation(first + i), 5.0),
                                        range(ROBOTS)))
                assert [r.seq for r in replies] == [first + i for i in range(ROBOTS)]
            elapsed = time.monotonic() - t0
    finally:
        for r in robots:
            r.close()
    after = backend.batch_sizes()
    new = after - before
    assert max(new) > 1, f"no batch of more than one observation: {dict(new)}"
    assert sum(size * n for size, n in new.items()) >= 2 * ROBOTS
    serial_s = 2 * ROBOTS * (BASE_S + PER_ITEM_S)
    assert elapsed < 0.6 * serial_s, f"{2 * ROBOTS} calls took {elapsed:.2f} s; one at a time needs {serial_s:.2f} s"
    print(f"batch sizes {dict(sorted(new.items()))}; {2 * ROBOTS} calls in {elapsed:.2f} s")


def test_default_infer_batch_loops_and_keeps_errors_apart():
    scripted = create_backend("scripted", {"answers": ["0 128 128 128 128 128 128 0"]}, _tokenizer())
    results = scripted.infer_batch([_observation(1), _observation(2)], timeout_s=1.0)
    assert [r.seq for r in results] == [1, 2]
    stalled = create_backend("scripted", {"answers": ["0 128 128 128 128 128 128 0"], "delays_s": [0.3]},
                             _tokenizer())
    results = stalled.infer_batch([_observation(1), _observation(2)], timeout_s=0.4)
    assert results[0].seq == 1 and isinstance(results[1], BackendError)  # the second ran out of the shared budget


def test_fleet_config_errors_name_the_key(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("fleet:\n  max_batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"fleet\.max_batch_size"):
        load_fleet_config(path)
    path.write_text("fleet:\n  max_batchsize: 4\n")
    with pytest.raises(ConfigError, match="max_batchsize"):
        load_fleet_config(path)
    path.write_text("fleet:\n  autoscaling: {max_replicas: 2, min_replicas: 3}\n")
    with pytest.raises(ConfigError, match="min_replicas"):
        load_fleet_config(path)
    shipped = load_fleet_config(os.path.join(os.path.dirname(__file__), "..", "config", "fleet.yaml"))
    assert shipped["fleet.max_batch_size"] >= 1


def test_simulator_options_name_the_key():
    with pytest.raises(BackendConfigError, match=r"backend\.simulated_model\.base_s"):
        create_backend("simulated_model", {"base_s": -1.0}, _tokenizer())


def test_grpc_status_of_a_refused_call_is_unauthenticated(fleet):
    """The raw protocol view of the token rule: the front answers UNAUTHENTICATED, not a Ray error."""
    from rt2_ros.backends.proto import load

    pb, pb_grpc = load()
    _, target, _ = fleet
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.PolicyStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(pb.InfoRequest(), timeout=5.0)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
