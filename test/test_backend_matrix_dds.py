"""Every backend type end to end through the real nodes, against a peer that checks what it received.

For each backend type the real nodes run (``rt2-bringup`` in its own process) with ``config/rt2.yaml``
+ the shipped ``config/backends/<type>.yaml`` + an overlay holding only the address of the peer
(URL, gRPC target, model directory and its dataset_statistics.json; keys come from the
environment variable the shipped file names). The probe plays the cameras and the arm driver (a
scene camera on camera/image, a wrist camera on wrist_camera/image, ee_pose, a Panda's
joint_states with its fingers) and the operator.

The peers follow each wire format and log every request as one JSON line (test/servers/):
OpenVLA's deploy.py, an openpi policy server (which also refuses an observation without the
LIBERO keys, 224x224 images or an 8-float state, as the policy's input transform would), vLLM's
OpenAI-compatible server, ``rt2-serve`` hosting a recording backend (the real gRPC server code), and
for ``local`` a tiny random-weight OpenVLA-style checkpoint whose remote code logs what its
processor and model received. ``embedded`` and ``scripted`` run in the node and have no peer.

Pass = the safety node accepted actions of the episode (SafetyStatus.actions_accepted) and, where
the peer's answers move, a non-zero twist reached servo_node/delta_twist_cmds, AND the peer's log
matches :data:`EXPECTED`. Two extra cases put both cameras on the wires that carry several images
(gRPC and OpenAI), whose shipped files use one camera. A summary of what every peer received is
printed at the end (``pytest -s``) and written to ``backend_matrix.txt`` in the module's tmp dir, the
peers' raw log lines to ``backend_matrix.json`` beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import TwistStamped  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from rt2_ros.nodes.common import COMMAND_QOS, EVENT_QOS, LATCHED_QOS  # noqa: E402
from rt2_ros.params import flatten  # noqa: E402
from rt2_ros_interfaces.msg import SafetyStatus  # noqa: E402
from test.processes import wait_for_line  # noqa: E402
from test.ros_helpers import (  # noqa: E402
    PANDA_JOINTS,
    REPO,
    Probe,
    isolate_ros_domain,
    start_bringup,
    stop,
    uid,
)
from test.test_compat_backends import ServerProcess, start_server  # noqa: E402

SERVERS = Path(__file__).resolve().parent / "servers"
TASK = "put the cube in the tray"
OPENPI_KEY, OPENAI_KEY = "matrix-openpi-test-key", "matrix-openai-test-key"

# -- what the probe publishes ------------------------------------------------------------------------
PRIMARY, WRIST = "/camera/image", "/wrist_camera/image"


def _frame(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = rgb
    return frame


# Uniform colours tell the cameras apart after any resize, pad or JPEG round trip (the centre pixel);
# different sizes show who resized.
FRAMES = {PRIMARY: _frame(48, 64, (200, 40, 40)), WRIST: _frame(40, 40, (40, 40, 200))}
EE_POSITION = [0.45, 0.0, 0.3]  # Probe.publish_fake_sensors: identity orientation
FINGERS = [PANDA_JOINTS["panda_finger_joint1"], PANDA_JOINTS["panda_finger_joint2"]]  # 0.02 m each: closedness 0.5
TWO_CAMERAS = {"cameras": {"names": ["camera", "wrist"], "wrist": {"topic": "wrist_camera/image"}}}

# -- what each peer must have received -----------------------------------------------------------------
# Per case: "images" maps the wire's name for an image (openpi key, gRPC camera, OpenAI label, ...) to
# (camera topic whose frame it is, shape; None = that frame's own shape); "keys" the request's keys
# (where the wire has keys); "state" the proprioception as the peer decoded it; "extra" entries the
# peer logged verbatim. Checked against the peer's JSON log by check_received().
EXPECTED: dict[str, dict] = {
    "embedded": {},
    "scripted": {},
    "local": {  # the processor gets the primary frame as it is; the model its 32x32 pixel values
        "images": {"image": (PRIMARY, None)},
        "extra": {"pixel_values": [1, 3, 32, 32], "last_ids": [None, 29871]}},
    "grpc": {
        "images": {"camera": (PRIMARY, None)},
        "state": {"ee_position": EE_POSITION, "ee_orientation": [1.0, 0.0, 0.0, 0.0], "gripper": 0.5,
                  "gripper_positions": FINGERS, "joint_positions": None}},
    "grpc_two_cameras": {
        "images": {"camera": (PRIMARY, None), "wrist": (WRIST, None)},
        "state": {"ee_position": EE_POSITION, "ee_orientation": [1.0, 0.0, 0.0, 0.0], "gripper": 0.5,
                  "gripper_positions": FINGERS, "joint_positions": None}},
    "openvla_http": {
        "keys": ["image", "instruction", "unnorm_key"],
        "images": {"image": (PRIMARY, (224, 224, 3))},
        "extra": {"unnorm_key": "bridge_orig"}},
    "openpi": {  # LIBERO: two 224x224 images and the 8-D state (finger 2 negative, as robosuite reports it)
        "keys": ["observation/image", "observation/state", "observation/wrist_image", "prompt"],
        "images": {"observation/image": (PRIMARY, (224, 224, 3)), "observation/wrist_image": (WRIST, (224, 224, 3))},
        "state": [*EE_POSITION, 0.0, 0.0, 0.0, FINGERS[0], -FINGERS[1]], "extra": {"state_dtype": "float32"}},
    "openai": {"images": {"image": (PRIMARY, None)}, "extra": {"mime": "image/jpeg"}},
    "openai_two_cameras": {  # each image after a text part naming it, then the prompt
        "images": {"camera:": (PRIMARY, None), "wrist:": (WRIST, None)}, "extra": {"mime": "image/jpeg"}},
}


@dataclass(frozen=True)
class Case:
    name: str  # key of EXPECTED
    backend: str  # backend.type: config/backends/<backend>.yaml
    peer: str | None = None  # key of the peers fixture
    extra_overlay: dict = field(default_factory=dict)  # beyond the address: only for the two-camera cases
    moves: bool = True  # the peer's answers move the arm: a non-zero twist must reach the controller
    min_accepted: int = 3  # actions the safety node must accept in the episode (a stream, not one lucky reply)


CASES = (
    # The reference policy sees no cube and no tray in a uniform frame: it answers terminate at once, which
    # the safety node accepts (and holds).
    Case("embedded", "embedded", moves=False, min_accepted=1),
    Case("scripted", "scripted"),
    Case("local", "local", "local", moves=False),  # random weights: any valid action, maybe zero
    Case("grpc", "grpc", "grpc"),
    Case("grpc_two_cameras", "grpc", "grpc_two_cameras", TWO_CAMERAS),
    Case("openvla_http", "openvla_http", "openvla_http"),
    Case("openpi", "openpi", "openpi"),
    Case("openai", "openai", "openai"),
    Case("openai_two_cameras", "openai", "openai",
         {**TWO_CAMERAS, "backend": {"openai": {"cameras": ["camera", "wrist"]}}}),
)
SUMMARY: list[str] = []  # one line per case: what its peer received, what the safety node did
RAW: dict[str, object] = {}  # per case: the peer's last log entry (local: processor and model) as logged


# -- peers --------------------------------------------------------------------------------------------

def start_rt2_serve(workdir: Path, *args: str, timeout_s: float = 20.0) -> ServerProcess:
    """``rt2-serve`` hosting test/servers/grpc_recording_backend.py on a free loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "received.jsonl"
    params = workdir / "serve.yaml"
    params.write_text(yaml.safe_dump({"rt2_serve": {"ros__parameters": {
        "backend": {"recorder": {"log": str(log)}}, "tokenizer": {"profile": "rt2"}}}}))
    stderr = open(workdir / "rt2-serve.stderr", "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "rt2_ros.serve", "--backend-class", "grpc_recording_backend:RecordingBackend",
         "--params", str(params), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(SERVERS)))})
    stderr.close()
    match = wait_for_line(proc, re.compile(r"rt2-serve: serving .* on [^ ]+:(\d+) "), "rt2-serve",
                          workdir / "rt2-serve.stderr", timeout_s)
    return ServerProcess(proc, int(match.group(1)), log)


def build_tiny_openvla(out: Path) -> Path:
    """A tiny random-weight checkpoint shaped like OpenVLA-7B for the shipped local.yaml: remote code
    (test/servers/tiny_prismatic_remote.py), no image placeholder in the prompt, a 32064-id head
    (OpenVLA pads Llama's 32000), its dataset_statistics.json with a bridge_orig entry."""
    import importlib.util

    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from test import tiny_models

    hf_logging.disable_progress_bar()
    tiny_models.build_tiny_llava(out)
    spec = importlib.util.spec_from_file_location("tiny_prismatic_remote", SERVERS / "tiny_prismatic_remote.py")
    remote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote)
    llava = LlavaForConditionalGeneration.from_pretrained(out)
    model = remote.TinyPrismaticForActionPrediction(llava.config)
    model.load_state_dict(llava.state_dict())
    model.resize_token_embeddings(32064, mean_resizing=False)
    model.config.auto_map = {"AutoModelForVision2Seq": "modeling_tiny_prismatic.TinyPrismaticForActionPrediction"}
    model.save_pretrained(out)  # saved by the remote class: its own weight names, as a remote checkpoint has
    shutil.copy(SERVERS / "tiny_prismatic_remote.py", out / "modeling_tiny_prismatic.py")
    processor_config = json.loads((out / "processor_config.json").read_text())
    processor_config["auto_map"] = {"AutoProcessor": "modeling_tiny_prismatic.TinyPrismaticProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor_config))
    stats = {"bridge_orig": {"action": {"q01": [-0.02] * 3 + [-0.1] * 3 + [0.0], "q99": [0.02] * 3 + [0.1] * 3 + [1.0],
                                        "mask": [True] * 6 + [False]}}}
    (out / "dataset_statistics.json").write_text(json.dumps(stats))
    return out


@dataclass
class LocalModel:
    """The local backend's "peer": a checkpoint directory and the log its remote code writes."""

    path: Path
    log: Path

    def received(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Every peer, started once and in parallel."""
    root = tmp_path_factory.mktemp("matrix")
    openpi = EXPECTED["openpi"]

    def local() -> LocalModel | None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return None  # the optional extra is missing: the local case skips
        return LocalModel(build_tiny_openvla(root / "tiny_openvla"), root / "local_received.jsonl")

    starters = {
        "openpi": lambda: start_server(
            "openpi_policy_server.py", root / "openpi", "--require-keys", ",".join(openpi["keys"]),
            "--state-dim", str(len(openpi["state"])), "--image-size", "224", "--action-scale", "0.1",  # rows in [-1, 1]
            env={"OPENPI_TEST_API_KEY": OPENPI_KEY}),
        "openvla_http": lambda: start_server("openvla_deploy_server.py", root / "openvla"),
        "openai": lambda: start_server("openai_chat_server.py", root / "openai", "--model", "rt2",
                                       env={"OPENAI_TEST_API_KEY": OPENAI_KEY}),
        "grpc": lambda: start_rt2_serve(root / "grpc"),
        "grpc_two_cameras": lambda: start_rt2_serve(root / "grpc2", "--cameras", "camera,wrist"),
        "local": local,
    }
    with ThreadPoolExecutor(len(starters)) as pool:
        futures = {name: pool.submit(start) for name, start in starters.items()}
    started, errors = {}, []
    for name, fut in futures.items():
        try:
            started[name] = fut.result()
        except Exception as exc:
            errors.append(f"{name}: {exc}")
    if errors:
        for peer in started.values():
            if peer is not None:
                peer.stop()
        raise RuntimeError("peers did not start: " + "; ".join(errors))
    started["root"] = root
    yield started
    for name, peer in started.items():
        if name != "root" and peer is not None:
            peer.stop()
    if not SUMMARY:
        return
    report = "\n".join(SUMMARY)
    (root / "backend_matrix.txt").write_text(report + "\n")
    (root / "backend_matrix.json").write_text(json.dumps(RAW, indent=1) + "\n")
    print(f"\n--- what each backend sent, as its peer logged it (raw log lines: {root / 'backend_matrix.json'}) "
          f"---\n{report}")


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe("rt2_matrix_probe")
    p.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    p.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    p.publish_fake_sensors(joints=PANDA_JOINTS, cameras=FRAMES)  # cameras and arm driver
    p.instruction = p.publisher(String, "/instruction", EVENT_QOS)
    yield p
    p.close()


# -- the nodes' view of a config -------------------------------------------------------------------

def merged_policy_params(files: list[Path]) -> dict:
    """The rt2_policy parameters the files give, later files winning (as rt2-bringup layers them)."""
    flat: dict = {}
    for path in files:
        doc = yaml.safe_load(path.read_text()) or {}
        flat.update(flatten((doc.get("rt2_policy") or {}).get("ros__parameters") or {}))
    return flat


def camera_topics(flat: dict) -> dict[str, str]:
    """{camera name: probe topic} of the policy node's cameras (rt2_ros.cameras defaults)."""
    topics = {}
    for name in flat.get("cameras.names", ["camera"]):
        topic = "/" + flat.get(f"cameras.{name}.topic", f"{name}/image").lstrip("/")
        if flat.get(f"cameras.{name}.transport", "raw") == "compressed":
            topic += "/compressed"
        topics[name] = topic
    return topics


def address_overlay(case: Case, peer) -> dict:
    """The rt2_policy parameters that point the shipped file at the peer: the address and nothing else."""
    if case.backend in ("embedded", "scripted"):
        return {}
    if case.backend == "local":
        return {"backend": {"local": {"model_path": str(peer.path)}},
                "tokenizer": {"dataset_statistics": str(peer.path / "dataset_statistics.json")}}
    address = {"grpc": ("target", f"127.0.0.1:{peer.port}"), "openvla_http": ("url", f"http://127.0.0.1:{peer.port}"),
               "openpi": ("url", f"ws://127.0.0.1:{peer.port}"),
               "openai": ("base_url", f"http://127.0.0.1:{peer.port}/v1")}[case.backend]
    return {"backend": {case.backend: {address[0]: address[1]}}}


def write_overlay(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump({"rt2_policy": {"ros__parameters": params}}))
    return path


# -- the peers' logs -----------------------------------------------------------------------------------

def normalise(case: Case, entries: list[dict]) -> list[dict]:
    """Each request a peer logged as {images: {wire name: {shape, dtype, centre}}, keys, state, text, extra}."""
    out = []
    if case.backend == "local":
        model = [e for e in entries if e["where"] == "model"]
        for i, e in enumerate(e for e in entries if e["where"] == "processor"):
            m = model[i] if i < len(model) else {}
            names = ["image"] if e["n_images"] == 1 else [f"image{j}" for j in range(e["n_images"])]
            out.append({"images": dict(zip(names, e["images"], strict=True)), "keys": None, "state": None,
                        "text": e["text"], "extra": {"pixel_values": m.get("pixel_values"),
                                                     "last_ids": m.get("last_ids")}})
    elif case.backend == "grpc":
        for e in entries:
            out.append({"images": e["cameras"], "keys": None, "text": e["instruction"], "extra": {},
                        "state": {k: e[k] for k in ("ee_position", "ee_orientation", "gripper", "gripper_positions",
                                                    "joint_positions")}})
    elif case.backend == "openpi":
        for e in entries:
            out.append({"images": e["images"], "keys": e["keys"], "state": e["state"], "text": e["prompt"],
                        "extra": {"state_dtype": e["state_dtype"], "problems": e["problems"]}})
    elif case.backend == "openvla_http":
        for e in entries:
            out.append({"images": {"image": {k: e[k] for k in ("shape", "dtype", "centre")}}, "keys": e["keys"],
                        "state": None, "text": e["instruction"], "extra": {"unnorm_key": e["unnorm_key"]}})
    elif case.backend == "openai":
        for e in entries:
            names = [img["label"] or "image" for img in e["images"]]
            out.append({"images": dict(zip(names, e["images"], strict=True)), "keys": None, "state": None,
                        "text": e["prompt"], "extra": {"mime": e["mime"]}})
    return out


def close(a, b, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.shape(a) == np.shape(b) and bool(np.allclose(a, b, atol=tol))


def check_received(case: Case, got: dict) -> list[str]:
    """Differences between one normalised request and EXPECTED[case.name] (empty = as expected)."""
    want = EXPECTED[case.name]
    problems = []
    if TASK not in got["text"]:
        problems.append(f"instruction {TASK!r} not in {got['text']!r}")
    if "keys" in want and got["keys"] != want["keys"]:
        problems.append(f"keys {got['keys']} != {want['keys']}")
    if list(got["images"]) != list(want["images"]):
        problems.append(f"images {list(got['images'])} != {list(want['images'])}")
    for name, (topic, shape) in want["images"].items():
        img = got["images"].get(name)
        if img is None:
            continue
        frame = FRAMES[topic]
        if list(img["shape"]) != list(shape or frame.shape) or img["dtype"] != "uint8":
            problems.append(f"{name}: {img['dtype']} {img['shape']}, expected uint8 {list(shape or frame.shape)}")
        if not close(img["centre"], frame[0, 0].tolist(), 12):  # JPEG round trips shift a uniform colour a little
            problems.append(f"{name}: centre pixel {img['centre']} is not {topic}'s colour {frame[0, 0].tolist()}")
    if "state" in want:
        if isinstance(want["state"], dict):
            for key, value in want["state"].items():
                if not close(got["state"][key], value, 1e-5):
                    problems.append(f"state {key} {got['state'][key]} != {value}")
        elif not close(got["state"], want["state"], 1e-5):
            problems.append(f"state {got['state']} != {want['state']}")
    for key, value in want.get("extra", {}).items():
        have = got["extra"].get(key)
        if isinstance(value, list) and isinstance(have, list) and len(value) == len(have):
            mismatch = any(v is not None and v != h for v, h in zip(value, have, strict=True))
        else:
            mismatch = have != value
        if mismatch:
            problems.append(f"{key} {have!r} != {value!r}")
    return problems


def describe(case: Case, got: dict | None, accepted: int, twist: float) -> str:
    """One summary line: what the peer received and what the safety node did with the answers."""
    head = f"{case.name:<19}"
    tail = f"| accepted {accepted} actions, max |v| {twist:.3f} m/s"
    if got is None:
        return f"{head}| (in the node, no peer) {tail}"
    parts = []
    if got["keys"] is not None:
        parts.append("keys " + ",".join(got["keys"]))
    for name, img in got["images"].items():
        parts.append(f"{name} {'x'.join(map(str, img['shape']))} {img['dtype']} centre {tuple(img['centre'])}")
    state = got["state"]
    if isinstance(state, dict):
        parts.append("state " + " ".join(f"{k}={v}" for k, v in state.items() if v is not None))
    elif state is not None:
        parts.append(f"state {got['extra'].get('state_dtype', '')}[{len(state)}] "
                     f"{[round(v, 4) for v in state]}")
    parts += [f"{k} {v}" for k, v in got["extra"].items() if k not in ("state_dtype", "problems") and v]
    parts.append(f"text {got['text']!r}")
    return f"{head}| {'; '.join(parts)} {tail}"


# -- the test ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_through_the_nodes(case, probe, peers, tmp_path, monkeypatch):
    peer = peers.get(case.peer) if case.peer else None
    if case.backend == "local" and peer is None:
        pytest.skip("torch/transformers not installed (pip install -r requirements-local.txt)")
    monkeypatch.setenv("OPENPI_API_KEY", OPENPI_KEY)  # the variables the shipped files name
    monkeypatch.setenv("VLLM_API_KEY", OPENAI_KEY)
    if case.backend == "local":
        monkeypatch.setenv("RT2_TEST_LOCAL_LOG", str(peer.log))  # read by the checkpoint's remote code
        monkeypatch.setenv("HF_HOME", str(peers["root"] / "hf_home"))  # transformers copies remote code there
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [REPO / "config" / "rt2.yaml", REPO / "config" / "backends" / f"{case.backend}.yaml"]
    overlay = address_overlay(case, peer)
    if overlay:
        files.append(write_overlay(tmp_path / "address.yaml", overlay))
    if case.extra_overlay:
        files.append(write_overlay(tmp_path / "cameras.yaml", case.extra_overlay))
    topics = camera_topics(merged_policy_params(files))
    assert set(topics.values()) <= set(FRAMES), f"the probe publishes no frames on {topics}"
    before = len(peer.received()) if peer is not None else 0
    log = tmp_path / "bringup.log"
    baselines, t0 = probe.match_baselines("both", camera_topics=list(topics.values())), time.monotonic()
    args = [a for f in files[1:] for a in ("--params", str(f))]
    proc = start_bringup(files[0], *args, log=log)
    try:
        probe.wait_started(proc, "both", baselines, t0, log, timeout=30.0)
        _, t_sent, episode, _ = probe.take_episode(lambda: probe.instruction.publish(String(data=TASK)))

        def accepted() -> int:
            st = probe.latest("status")
            return st.actions_accepted if st is not None and uid(st.episode_id) == episode else 0

        def speed() -> float:
            return max((float(np.linalg.norm([t.twist.linear.x, t.twist.linear.y, t.twist.linear.z]))
                        for t in probe.since("twist", t_sent)), default=0.0)

        def done() -> bool:
            return accepted() >= case.min_accepted and (not case.moves or speed() > 1e-4)

        try:
            probe.wait_for(done, 20.0, f"the safety node to accept (moving) actions from {case.name}")
        except AssertionError as exc:
            seen = peer.received()[before:][-2:] if peer is not None else []
            raise AssertionError(f"{exc}\n{case.name} peer saw: {seen}\n--- bringup.log ---\n{log.read_text()}"
                                 ) from None
    finally:
        code = stop(proc)
    assert code == 0, f"rt2-bringup exited with {code}\n{log.read_text()}"
    got = None
    if peer is not None:
        raw = peer.received()[before:]
        RAW[case.name] = raw[-2:] if case.backend == "local" else raw[-1:]
        requests = normalise(case, raw)
        assert requests, f"{case.name}: the peer logged no request"
        got = requests[-1]
        problems = check_received(case, got)
        assert not problems, f"{case.name} peer received something else: {problems}\n{got}"
    SUMMARY.append(describe(case, got, accepted(), speed()))


def test_the_peers_refuse_what_their_model_could_not_read(peers, monkeypatch):
    """The checks behind the matrix's pass: the openpi peer refuses a non-LIBERO observation (one image,
    a 7-D state) and rt2-serve --cameras camera,wrist one without the wrist camera."""
    from rt2_ros.actions import Observation
    from rt2_ros.backends import BackendError, create_backend
    from rt2_ros.tokens import ActionTokenizer

    monkeypatch.setenv("OPENPI_API_KEY", OPENPI_KEY)
    obs = Observation(FRAMES[PRIMARY], TASK, seq=1, stamp=time.time(), ee_position=np.array(EE_POSITION),
                      ee_orientation=np.array([1.0, 0.0, 0.0, 0.0]), gripper=0.5)
    openpi = create_backend("openpi", {"url": f"ws://127.0.0.1:{peers['openpi'].port}",
                                       "api_key_env": "OPENPI_API_KEY", "state_format": "pos_axisangle_gripper"},
                            ActionTokenizer.from_profile("openvla"))
    try:
        with pytest.raises(BackendError, match=r"missing key 'observation/wrist_image'.*expected 8 float32"):
            openpi.infer(obs, 5.0)
    finally:
        openpi.close()
    grpc = create_backend("grpc", {"target": f"127.0.0.1:{peers['grpc_two_cameras'].port}"},
                          ActionTokenizer.from_profile("rt2"))
    try:
        with pytest.raises(BackendError, match="wrist"):
            grpc.infer(obs, 5.0)
    finally:
        grpc.close()
