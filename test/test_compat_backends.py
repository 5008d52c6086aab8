"""Compatibility backends against real server processes that speak each peer's wire format.

Each server under test/servers/ is a separate process on 127.0.0.1 (port chosen by the OS,
announced on stdout), written from the peer's documented protocol: OpenVLA deploy.py (FastAPI +
json-numpy), an openpi policy server (websockets + openpi msgpack-numpy, metadata first,
Api-Key), and vLLM's OpenAI-compatible chat completions (bearer key, data-URL image, guided
regex). The servers log what they received, so tests check the request as well as the reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openpi_client import image_tools
from transforms3d import euler, quaternions

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import BACKENDS, BackendConfigError, BackendError, BackendTimeout, backend_class, create_backend
from rt2_ros.backends.openai_compat import OpenAICompatBackend, unanchored
from rt2_ros.backends.openpi import STATE_FORMATS, STATE_LAYOUTS, OpenPIBackend, _error_summary, state_vector
from rt2_ros.backends.openvla_http import OpenVLAHttpBackend
from rt2_ros.tokens import ActionTokenizer
from test.processes import terminate, wait_for_line

REPO = Path(__file__).resolve().parents[1]
SERVERS = Path(__file__).resolve().parent / "servers"
SECRET = "s3cret-key-do-not-log-7f1c"  # never appears in messages or logs
COMPAT = (OpenVLAHttpBackend, OpenPIBackend, OpenAICompatBackend)
READY = re.compile(r"^READY (\d+)")  # the line every test server prints once it listens
SQUARE = (240, 240)  # no padding bars when resized to 224x224, so the image mean survives resizing


# -- helpers ---------------------------------------------------------------------------------------

@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log: Path

    def received(self) -> list[dict]:
        """What the server logged, one dict per request, oldest first."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def last(self) -> dict:
        entries = self.received()
        assert entries, "server logged no request"
        return entries[-1]

    def stop(self) -> None:
        terminate(self.proc)


def start_server(script: str, workdir: Path, *args: str, port: int = 0, env: dict | None = None,
                 timeout_s: float = 20.0) -> ServerProcess:
    """Start test/servers/<script> and wait (bounded) for its "READY <port>" line."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{script}.{time.monotonic_ns()}.jsonl"
    stderr = open(workdir / f"{script}.stderr", "a")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, str(SERVERS / script), "--port", str(port), "--log", str(log), *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    stderr.close()
    match = wait_for_line(proc, READY, script, workdir / f"{script}.stderr", timeout_s)
    return ServerProcess(proc, int(match.group(1)), log)


def closed_port() -> int:
    """A port with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observation(value: int = 100, shape: tuple[int, int] = (480, 640), instruction: str = "pick up the apple",
                seq: int = 1, with_state: bool = True, wrist: int | None = None) -> Observation:
    """A flat-colour frame (``value``) from camera "camera"; with ``wrist``, a second 96x128 camera
    "wrist" of that colour; with ``with_state``, every proprioception piece (a Panda's 7 joints)."""
    extra: dict = {}
    if with_state:
        extra = {"ee_position": np.array([0.4, -0.1, 0.3]),
                 "ee_orientation": quaternions.axangle2quat([0.0, 0.0, 1.0], 0.5), "gripper": 0.25,
                 "gripper_positions": np.array([0.03, 0.03]),
                 "joint_positions": np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])}
    image = np.full((*shape, 3), value, np.uint8)
    if wrist is not None:
        extra["images"] = {"camera": image, "wrist": np.full((96, 128, 3), wrist, np.uint8)}
    return Observation(image, instruction, seq, 0.0, **extra)


def assert_secret_absent(exc: BaseException | None, caplog: pytest.LogCaptureFixture) -> None:
    if exc is not None:
        assert SECRET not in str(exc)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


@pytest.fixture(scope="module")
def openvla_tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("openvla")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api_key"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def openvla_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server("openvla_deploy_server.py", tmp_path_factory.mktemp("openvla"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openpi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server("openpi_policy_server.py", tmp_path_factory.mktemp("openpi"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def openpi_keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server("openpi_policy_server.py", tmp_path_factory.mktemp("openpi_key"),
                          env={"OPENPI_TEST_API_KEY": SECRET})
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["structured_outputs", "guided_regex"])
def openai_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[ServerProcess, str]]:
    server = start_server("openai_chat_server.py", tmp_path_factory.mktemp("openai"),
                          "--guided-field", request.param, env={"OPENAI_TEST_API_KEY": SECRET})
    yield server, request.param
    server.stop()


# -- options and registry --------------------------------------------------------------------------

@pytest.mark.parametrize("cls", COMPAT)
def test_registered_and_options_prefixed(cls: type, tokenizer: ActionTokenizer) -> None:
    assert backend_class(cls.name) is cls
    assert BACKENDS[cls.name].endswith(f":{cls.__name__}")
    assert cls.OPTIONS and all(s.name.startswith(f"backend.{cls.name}.") for s in cls.OPTIONS)
    assert len({s.name for s in cls.OPTIONS}) == len(cls.OPTIONS)
    assert all(s.description for s in cls.OPTIONS)


@pytest.mark.parametrize(("cls", "options", "key"), [
    (OpenVLAHttpBackend, {"url": "ftp://host:1"}, "backend.openvla_http.url"),
    (OpenVLAHttpBackend, {"url": "localhost:8000"}, "backend.openvla_http.url"),
    (OpenVLAHttpBackend, {"image_size": -1}, "backend.openvla_http.image_size"),
    (OpenVLAHttpBackend, {"connect_timeout_s": "2"}, "backend.openvla_http.connect_timeout_s"),
    (OpenVLAHttpBackend, {"unnorm_kye": "bridge_orig"}, "backend.openvla_http.unnorm_kye"),
    (OpenVLAHttpBackend, {"ca_cert_file": "/nonexistent/ca.pem"}, "backend.openvla_http.ca_cert_file"),
    (OpenPIBackend, {"url": "http://host:8000"}, "backend.openpi.url"),
    (OpenPIBackend, {"state_format": "pos_rpy"}, "backend.openpi.state_format"),
    (OpenPIBackend, {"image_keys": []}, "backend.openpi.image_keys"),
    (OpenPIBackend, {"image_key": "observation/image"}, "backend.openpi.image_key"),  # the old single key is gone
    (OpenVLAHttpBackend, {"camera": 3}, "backend.openvla_http.camera"),
    (OpenAICompatBackend, {"model": "m", "cameras": ["camera", "camera"]}, "backend.openai.cameras"),
    (OpenAICompatBackend, {"model": "m", "cameras": ["camera", ""]}, "backend.openai.cameras"),
    (OpenAICompatBackend, {"model": "m", "image_label": "{name}:"}, "backend.openai.image_label"),
    (OpenPIBackend, {"reconnect_backoff_s": 2.0, "reconnect_backoff_max_s": 1.0},
     "backend.openpi.reconnect_backoff_max_s"),
    (OpenPIBackend, {"ca_cert_file": "/nonexistent/ca.pem"}, "backend.openpi.ca_cert_file"),
    (OpenAICompatBackend, {}, "backend.openai.model"),
    (OpenAICompatBackend, {"model": "m", "base_url": "127.0.0.1:8000/v1"}, "backend.openai.base_url"),
    (OpenAICompatBackend, {"model": "m", "guided_decoding_field": "outlines"}, "backend.openai.guided_decoding_field"),
    (OpenAICompatBackend, {"model": "m", "max_tokens": 0}, "backend.openai.max_tokens"),
    (OpenAICompatBackend, {"model": "m", "api_key_env": "RT2_TEST_UNSET_VARIABLE"}, "backend.openai.api_key_env"),
    (OpenAICompatBackend, {"model": "m", "api_key_file": "/nonexistent/key"}, "backend.openai.api_key_file"),
    (OpenPIBackend, {"api_key_env": "HOME", "api_key_file": "/etc/hostname"}, "backend.openpi.api_key_env"),
])
def test_bad_options_name_the_key(cls: type, options: dict, key: str, tokenizer: ActionTokenizer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RT2_TEST_UNSET_VARIABLE", raising=False)
    with pytest.raises(BackendConfigError, match=key.replace(".", r"\.")):
        cls(options, tokenizer)


def test_empty_key_file_is_rejected(tmp_path: Path, tokenizer: ActionTokenizer) -> None:
    (tmp_path / "key").write_text("\n")
    with pytest.raises(BackendConfigError, match=r"backend\.openai\.api_key_file: .* is empty"):
        OpenAICompatBackend({"model": "m", "api_key_file": str(tmp_path / "key")}, tokenizer)


@pytest.mark.parametrize("cls", COMPAT)
def test_create_backend_fills_defaults(cls: type, tokenizer: ActionTokenizer) -> None:
    options = {"model": "m"} if cls is OpenAICompatBackend else {}
    backend = create_backend(cls.name, options, tokenizer)
    try:
        assert isinstance(backend, cls)
        assert set(backend.options) == {s.name.rsplit(".", 1)[1] for s in cls.OPTIONS}
    finally:
        backend.close()


# -- openvla_http ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("image_size", "shape"), [(224, (480, 640)), (0, (480, 640)), (0, (96, 128)), (64, (50, 70))])
def test_openvla_happy_path(openvla_server: ServerProcess, tokenizer: ActionTokenizer,
                            openvla_tokenizer: ActionTokenizer, image_size: int, shape: tuple[int, int]) -> None:
    backend = OpenVLAHttpBackend(
        {"url": f"http://127.0.0.1:{openvla_server.port}/", "image_size": image_size,
         "unnorm_key": "fractal20220817_data"}, tokenizer)
    obs = observation(value=77, shape=shape, instruction="put the cube in the tray", seq=42)
    try:
        reply = backend.infer(obs, timeout_s=5.0)
    finally:
        backend.close()
    sent_h, sent_w = (image_size, image_size) if image_size else shape
    assert isinstance(reply, BackendReply)
    assert (reply.seq, reply.backend, reply.text, reply.token_ids) == (42, "openvla_http", None, None)
    assert reply.actions.shape == (1, 7) and reply.actions.dtype == np.float64
    expected = [77 / 255, sent_h / 1000, sent_w / 1000, len(obs.instruction) / 100, 1.0, 0.0, 1.0]
    np.testing.assert_allclose(reply.actions[0], expected, atol=1e-9)
    assert len(openvla_tokenizer.decode_reply(reply)) == 1  # the policy node can use it as is
    assert openvla_server.last() == {"keys": ["image", "instruction", "unnorm_key"], "shape": [sent_h, sent_w, 3],
                                     "dtype": "uint8", "centre": [77, 77, 77], "instruction": obs.instruction,
                                     "unnorm_key": "fractal20220817_data"}


@pytest.mark.parametrize("unnorm_key", ["not_a_dataset", ""])
def test_openvla_server_error_string(openvla_server: ServerProcess, tokenizer: ActionTokenizer,
                                     unnorm_key: str) -> None:
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{openvla_server.port}", "unnorm_key": unnorm_key},
                                 tokenizer)
    with pytest.raises(BackendError, match=r"OpenVLA server returned 'error'.*unnorm_key") as err:
        backend.infer(observation(), timeout_s=5.0)
    assert not isinstance(err.value, BackendTimeout)
    assert ("unnorm_key" in openvla_server.last()["keys"]) == bool(unnorm_key)  # empty key = omitted
    backend.close()


def test_openvla_slow_server_times_out_and_recovers(openvla_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{openvla_server.port}"}, tokenizer)
    start = time.monotonic()
    with pytest.raises(BackendTimeout, match=r"did not answer within 0\.30 s"):
        backend.infer(observation(instruction="sleep:1.5"), timeout_s=0.3)
    assert time.monotonic() - start < 1.2
    reply = backend.infer(observation(value=10), timeout_s=5.0)
    assert reply.actions[0, 0] == pytest.approx(10 / 255)
    backend.close()


def test_openvla_unreachable_is_a_quick_error(tokenizer: ActionTokenizer) -> None:
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{closed_port()}"}, tokenizer)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot reach .*Connection refused.*deploy.py") as err:
        backend.infer(observation(), timeout_s=5.0)
    assert not isinstance(err.value, BackendTimeout)
    assert time.monotonic() - start < 1.0
    backend.close()


def test_openvla_bearer_token_is_not_logged(openvla_server: ServerProcess, tokenizer: ActionTokenizer, key_file: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{openvla_server.port}", "api_key_file": str(key_file)},
                                 tokenizer)
    assert backend.infer(observation(), timeout_s=5.0).actions.shape == (1, 7)
    backend.close()
    assert_secret_absent(None, caplog)


@pytest.mark.parametrize(("camera", "value"), [("", 77), ("camera", 77), ("wrist", 30)])
def test_openvla_sends_the_configured_camera(openvla_server: ServerProcess, tokenizer: ActionTokenizer,
                                             camera: str, value: int) -> None:
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{openvla_server.port}", "camera": camera,
                                  "image_size": 0}, tokenizer)
    try:
        reply = backend.infer(observation(value=77, wrist=30), timeout_s=5.0)
    finally:
        backend.close()
    assert reply.actions[0, 0] == pytest.approx(value / 255)  # the server answers the mean of "image"
    got = openvla_server.last()
    assert got["shape"] == ([96, 128, 3] if camera == "wrist" else [480, 640, 3]) and got["centre"] == [value] * 3


def test_openvla_missing_camera_is_refused_before_sending(openvla_server: ServerProcess,
                                                          tokenizer: ActionTokenizer) -> None:
    backend = OpenVLAHttpBackend({"url": f"http://127.0.0.1:{openvla_server.port}", "camera": "wrist"}, tokenizer)
    before = len(openvla_server.received())
    with pytest.raises(BackendError, match=r"camera 'wrist' \(backend\.openvla_http\.camera\) is not in this "
                                           r"observation \(it has: camera\)"):
        backend.infer(observation(), timeout_s=5.0)
    assert len(openvla_server.received()) == before
    backend.close()


# -- openpi ----------------------------------------------------------------------------------------

def openpi(server: ServerProcess, tokenizer: ActionTokenizer, **options: object) -> OpenPIBackend:
    return OpenPIBackend({"url": f"ws://127.0.0.1:{server.port}", "reconnect_backoff_s": 0.05, **options}, tokenizer)


@pytest.mark.parametrize("state_format", [f for f in STATE_FORMATS if f != "custom"])
def test_openpi_happy_path(openpi_server: ServerProcess, tokenizer: ActionTokenizer,
                           openvla_tokenizer: ActionTokenizer, state_format: str) -> None:
    backend = openpi(openpi_server, tokenizer, state_format=state_format)
    try:
        metadata = backend.connect()
        assert metadata == backend.metadata and metadata["action_horizon"] == 10 and "boot_id" in metadata
        for seq, value in enumerate((30, 200)):
            obs = observation(value=value, instruction="stack the blocks", seq=seq)
            reply = backend.infer(obs, timeout_s=5.0)
            assert (reply.seq, reply.backend, reply.text) == (seq, "openpi", None)
            assert reply.actions.shape == (10, 7)
            # 480x640 padded into 224x224: a 168x224 picture between black bars (openpi resize_with_pad)
            mean = value * (480 * 224 / 640) / 224 / 255
            expected = np.arange(10)[:, None] + np.full((10, 7), np.float32(mean))
            np.testing.assert_allclose(reply.actions, expected, rtol=1e-6)
            # 7-D rows decode like OpenVLA's (row 0 only: the test server's later rows, i + mean, leave [-1, 1])
            assert len(openvla_tokenizer.decode_reply(dataclasses.replace(reply, actions=reply.actions[:1]))) == 1
            assert np.isfinite(reply.server_time_s) and reply.server_time_s >= 0
            got = openpi_server.last()
            assert (got["prompt"], got["shape"], got["dtype"]) == ("stack the blocks", [224, 224, 3], "uint8")
            if state_format == "droid":  # two arrays instead of observation/state (test/test_observation_mapping.py)
                assert got["keys"] == ["observation/gripper_position", "observation/image",
                                       "observation/joint_position", "prompt"]
                assert got["state"] is None
            else:
                assert got["keys"] == ["observation/image", "observation/state", "prompt"]
                assert got["state_dtype"] == "float32"
                np.testing.assert_allclose(got["state"], state_vector(obs, state_format), rtol=1e-6)
    finally:
        backend.close()


def test_openpi_two_cameras_libero(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    """The shipped LIBERO mapping over the wire: both images and the 8-D state reach the server."""
    backend = openpi(openpi_server, tokenizer, image_keys=["observation/image", "observation/wrist_image"],
                     image_cameras=["camera", "wrist"], state_format="libero", gripper_positions_scale=[1.0, -1.0])
    try:
        reply = backend.infer(observation(value=90, shape=SQUARE, wrist=10, instruction="libero"), timeout_s=5.0)
    finally:
        backend.close()
    np.testing.assert_allclose(reply.actions[0], np.float32(90 / 255), rtol=1e-6)  # observation/image = camera
    got = openpi_server.last()
    assert got["keys"] == ["observation/image", "observation/state", "observation/wrist_image", "prompt"]
    assert got["images"] == {"observation/image": {"shape": [224, 224, 3], "dtype": "uint8", "centre": [90] * 3},
                             "observation/wrist_image": {"shape": [224, 224, 3], "dtype": "uint8", "centre": [10] * 3}}
    assert got["state_dtype"] == "float32"
    np.testing.assert_allclose(got["state"], [0.4, -0.1, 0.3, 0.0, 0.0, 0.5, 0.03, -0.03], atol=1e-7)


def test_openpi_custom_keys_without_state(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer, state_key="", image_size=0, image_keys=["observation/image"],
                     prompt_key="prompt")
    try:
        backend.infer(observation(shape=(60, 80), with_state=False), timeout_s=5.0)
    finally:
        backend.close()
    got = openpi_server.last()
    assert got["keys"] == ["observation/image", "prompt"] and got["shape"] == [60, 80, 3] and got["state"] is None


def test_openpi_missing_camera_is_refused_before_sending(openpi_server: ServerProcess,
                                                          tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer, image_keys=["observation/image", "observation/wrist_image"],
                     image_cameras=["camera", "wrist"])
    before = len(openpi_server.received())
    with pytest.raises(BackendError, match=r"camera 'wrist' for 'observation/wrist_image' "
                                           r"\(backend\.openpi\.image_cameras\) is not in this observation"):
        backend.infer(observation(), timeout_s=5.0)
    assert len(openpi_server.received()) == before
    backend.close()


def test_openpi_missing_state_is_refused_before_sending(openpi_server: ServerProcess,
                                                         tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer)
    before = len(openpi_server.received())
    with pytest.raises(BackendError, match=r"lacks ee_position, ee_orientation, gripper .*state_key"):
        backend.infer(observation(with_state=False), timeout_s=5.0)
    assert len(openpi_server.received()) == before
    backend.close()


def test_openpi_server_traceback_then_reconnect(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer)
    try:
        with pytest.raises(BackendError, match=r"server error: ValueError: policy exploded on purpose$"):
            backend.infer(observation(instruction="raise"), timeout_s=5.0)
        assert not backend.connected
        reply = backend.infer(observation(value=50, shape=SQUARE), timeout_s=5.0)
        np.testing.assert_allclose(reply.actions[0], np.float32(50 / 255), rtol=1e-6)
    finally:
        backend.close()


def test_openpi_non_msgpack_reply(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer)
    with pytest.raises(BackendError, match=r"reply is not msgpack"):
        backend.infer(observation(instruction="garbage"), timeout_s=5.0)
    backend.close()


def test_openpi_timeout_drops_the_late_reply(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer)
    try:
        backend.connect()
        start = time.monotonic()
        with pytest.raises(BackendTimeout, match=r"did not answer within 0\.30 s"):
            backend.infer(observation(value=11, shape=SQUARE, instruction="sleep:1.0"), timeout_s=0.3)
        assert time.monotonic() - start < 1.0
        # The next answer must be for the next observation, never the late reply to the first one.
        reply = backend.infer(observation(value=222, shape=SQUARE, seq=2), timeout_s=5.0)
        assert reply.seq == 2
        np.testing.assert_allclose(reply.actions[0], np.float32(222 / 255), rtol=1e-6)
    finally:
        backend.close()


def test_openpi_unreachable_fails_fast_with_backoff(tokenizer: ActionTokenizer) -> None:
    backend = OpenPIBackend({"url": f"ws://127.0.0.1:{closed_port()}", "reconnect_backoff_s": 30.0,
                             "reconnect_backoff_max_s": 60.0}, tokenizer)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot connect to .*Connection refused") as err:
        backend.infer(observation(), timeout_s=5.0)
    assert not isinstance(err.value, BackendTimeout)
    # during the backoff window no connection is attempted: the call fails at once
    with pytest.raises(BackendError, match=r"next attempt in \d+\.\d s \(last error: .*Connection refused"):
        backend.infer(observation(), timeout_s=5.0)
    assert time.monotonic() - start < 1.0
    backend.close()


def test_openpi_api_key(openpi_keyed_server: ServerProcess, tokenizer: ActionTokenizer, key_file: Path,
                        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    good = openpi(openpi_keyed_server, tokenizer, api_key_file=str(key_file))
    try:
        assert good.infer(observation(), timeout_s=5.0).actions.shape == (10, 7)
    finally:
        good.close()
    monkeypatch.setenv("RT2_TEST_OPENPI_KEY", SECRET + "-wrong")
    wrong = openpi(openpi_keyed_server, tokenizer, api_key_env="RT2_TEST_OPENPI_KEY")
    with pytest.raises(BackendError, match=r"rejected the API key \(HTTP 401\)") as err:
        wrong.infer(observation(), timeout_s=5.0)
    wrong.close()
    missing = openpi(openpi_keyed_server, tokenizer)
    with pytest.raises(BackendError, match=r"HTTP 401"):
        missing.infer(observation(), timeout_s=5.0)
    missing.close()
    assert_secret_absent(err.value, caplog)


def test_openpi_reconnects_after_server_restart(tmp_path: Path, tokenizer: ActionTokenizer,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rt2_ros.backends.openpi")
    first = start_server("openpi_policy_server.py", tmp_path)
    backend = openpi(first, tokenizer, reconnect_backoff_max_s=0.2)
    try:
        backend.infer(observation(), timeout_s=5.0)
        boot_id = backend.metadata["boot_id"]
        first.stop()
        with pytest.raises(BackendError):  # the drop is noticed on this request (closed), not before
            backend.infer(observation(), timeout_s=5.0)
        second = start_server("openpi_policy_server.py", tmp_path, port=first.port)
        try:
            deadline = time.monotonic() + 10.0
            reply = None
            while reply is None and time.monotonic() < deadline:
                try:
                    reply = backend.infer(observation(value=90, shape=SQUARE), timeout_s=2.0)
                except BackendError:
                    time.sleep(0.05)  # polling a restarting peer; the backoff decides when to dial
            assert reply is not None, "no reconnect within 10 s"
            np.testing.assert_allclose(reply.actions[0], np.float32(90 / 255), rtol=1e-6)
            assert backend.metadata["boot_id"] != boot_id
            assert any("reconnected to" in r.getMessage() for r in caplog.records)
        finally:
            second.stop()
    finally:
        backend.close()
        first.stop()


def test_openpi_closed_backend_refuses(openpi_server: ServerProcess, tokenizer: ActionTokenizer) -> None:
    backend = openpi(openpi_server, tokenizer)
    backend.connect()
    backend.close()
    with pytest.raises(BackendError, match=r"closed"):
        backend.infer(observation(), timeout_s=1.0)


# -- openai (vLLM) ---------------------------------------------------------------------------------

def openai_backend(server: ServerProcess, tokenizer: ActionTokenizer, field: str, key_file: Path,
                   **options: object) -> OpenAICompatBackend:
    base = {"base_url": f"http://127.0.0.1:{server.port}/v1", "model": "rt2-test", "guided_decoding_field": field,
            "api_key_file": str(key_file)}
    return OpenAICompatBackend({**base, **options}, tokenizer)


@pytest.mark.parametrize(("image_format", "image_size"), [("jpeg", 0), ("png", 0), ("jpeg", 224)])
def test_openai_happy_path(openai_server: tuple[ServerProcess, str], tokenizer: ActionTokenizer, key_file: Path,
                           image_format: str, image_size: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server, field = openai_server
    backend = openai_backend(server, tokenizer, field, key_file, image_format=image_format, image_size=image_size)
    obs = observation(value=140, shape=(120, 160), instruction="open the drawer", seq=7)
    try:
        reply = backend.infer(obs, timeout_s=5.0)
    finally:
        backend.close()
    assert (reply.seq, reply.backend, reply.actions, reply.token_ids) == (7, "openai", None, None)
    bins = tokenizer.parse_text(reply.text).bins
    assert bins.shape == (8,) and abs(int(bins[1]) - 140) <= 2  # JPEG may move a flat colour by a level
    got = server.last()
    assert got["prompt"] == tokenizer.prompt("open the drawer")
    assert got["mime"] == f"image/{image_format}"
    assert got["shape"] == ([image_size, image_size, 3] if image_size else [120, 160, 3])
    default_max_tokens = next(o.default for o in OpenAICompatBackend.OPTIONS if o.name.endswith(".max_tokens"))
    assert got["temperature"] == 0 and got["max_tokens"] == default_max_tokens
    assert got["regex"] == unanchored(tokenizer.text_regex())
    assert_secret_absent(None, caplog)


@pytest.mark.parametrize(("cameras", "label", "expected"), [
    ([], "{camera}:", [(None, 140)]),  # default: the primary only, no label
    (["wrist", "camera"], "{camera}:", [("wrist:", 60), ("camera:", 140)]),
    (["camera", "wrist"], "Image {index}", [("Image 1", 140), ("Image 2", 60)]),
    (["camera", "wrist"], "", [(None, 140), (None, 60)]),
])
def test_openai_sends_the_configured_cameras_in_order(openai_server: tuple[ServerProcess, str],
                                                     tokenizer: ActionTokenizer, key_file: Path, cameras: list[str],
                                                     label: str, expected: list[tuple[str | None, int]]) -> None:
    server, field = openai_server
    backend = openai_backend(server, tokenizer, field, key_file, cameras=cameras, image_label=label,
                             image_format="png")
    try:
        reply = backend.infer(observation(value=140, shape=(120, 160), wrist=60, instruction="open the drawer"),
                              timeout_s=5.0)
    finally:
        backend.close()
    assert tokenizer.parse_text(reply.text).bins[1] == expected[0][1]  # the answer encodes the first image's mean
    got = server.last()
    assert got["prompt"] == tokenizer.prompt("open the drawer") and got["n_images"] == len(expected)
    assert [(i["label"], i["centre"]) for i in got["images"]] == [(lab, [v] * 3) for lab, v in expected]
    assert [i["shape"] for i in got["images"]] == [[120, 160, 3] if v == 140 else [96, 128, 3] for _, v in expected]
    assert got["texts"] == [lab for lab, _ in expected if lab] + [got["prompt"]]


def test_openai_one_image_server_refuses_two(tmp_path: Path, tokenizer: ActionTokenizer, key_file: Path) -> None:
    """Why the default is the primary only: vLLM serving with --limit-mm-per-prompt image=1 refuses more."""
    server = start_server("openai_chat_server.py", tmp_path, "--max-images", "1", env={"OPENAI_TEST_API_KEY": SECRET})
    try:
        one = openai_backend(server, tokenizer, "structured_outputs", key_file)
        two = openai_backend(server, tokenizer, "structured_outputs", key_file, cameras=["camera", "wrist"])
        obs = observation(wrist=60)
        tokenizer.parse_text(one.infer(obs, timeout_s=5.0).text)
        with pytest.raises(BackendError, match=r"HTTP 400 .*2 images"):
            two.infer(obs, timeout_s=5.0)
        one.close()
        two.close()
    finally:
        server.stop()


def test_openai_missing_camera_is_refused_before_sending(openai_server: tuple[ServerProcess, str],
                                                         tokenizer: ActionTokenizer, key_file: Path) -> None:
    server, field = openai_server
    backend = openai_backend(server, tokenizer, field, key_file, cameras=["camera", "wrist"])
    before = len(server.received())
    with pytest.raises(BackendError, match=r"camera 'wrist' \(backend\.openai\.cameras\) is not in this observation"):
        backend.infer(observation(), timeout_s=5.0)
    assert len(server.received()) == before
    backend.close()


def test_openai_unconstrained_request_is_refused_by_a_guided_server(
        openai_server: tuple[ServerProcess, str], tokenizer: ActionTokenizer, key_file: Path) -> None:
    server, field = openai_server
    other = "guided_regex" if field == "structured_outputs" else "none"
    backend = openai_backend(server, tokenizer, other, key_file)
    with pytest.raises(BackendError, match=r"HTTP 400 .*requires a regex.*guided_decoding_field"):
        backend.infer(observation(), timeout_s=5.0)
    backend.close()


@pytest.mark.parametrize(("instruction", "message"), [
    ("no-choices", "returned no choices"), ("null-content", "returned no message content")])
def test_openai_empty_answers(openai_server: tuple[ServerProcess, str], tokenizer: ActionTokenizer, key_file: Path,
                              instruction: str, message: str) -> None:
    server, field = openai_server
    backend = openai_backend(server, tokenizer, field, key_file)
    with pytest.raises(BackendError, match=message):
        backend.infer(observation(instruction=instruction), timeout_s=5.0)
    backend.close()


def test_openai_wrong_key_and_wrong_model(openai_server: tuple[ServerProcess, str], tokenizer: ActionTokenizer,
                                          tmp_path: Path, key_file: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    server, field = openai_server
    monkeypatch.setenv("RT2_TEST_VLLM_KEY", "wrong-" + SECRET)
    wrong = openai_backend(server, tokenizer, field, key_file, api_key_file="", api_key_env="RT2_TEST_VLLM_KEY")
    with pytest.raises(BackendError, match=r"rejected the API key \(HTTP 401\).*api_key_env") as err:
        wrong.infer(observation(), timeout_s=5.0)
    wrong.close()
    assert_secret_absent(err.value, caplog)
    bad_model = openai_backend(server, tokenizer, field, key_file, model="not-served")
    with pytest.raises(BackendError, match=r"HTTP 404 .*does not exist.*backend\.openai\.model"):
        bad_model.infer(observation(), timeout_s=5.0)
    bad_model.close()


def test_openai_slow_server_times_out(openai_server: tuple[ServerProcess, str], tokenizer: ActionTokenizer,
                                      key_file: Path) -> None:
    server, field = openai_server
    backend = openai_backend(server, tokenizer, field, key_file)
    start = time.monotonic()
    with pytest.raises(BackendTimeout, match=r"did not answer within 0\.30 s"):
        backend.infer(observation(instruction="sleep:1.5"), timeout_s=0.3)
    assert time.monotonic() - start < 1.2
    backend.close()


def test_openai_unreachable_is_a_quick_error(tokenizer: ActionTokenizer) -> None:
    backend = OpenAICompatBackend({"base_url": f"http://127.0.0.1:{closed_port()}/v1", "model": "m"}, tokenizer)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot reach .*is the server running") as err:
        backend.infer(observation(), timeout_s=5.0)
    assert not isinstance(err.value, BackendTimeout)
    assert time.monotonic() - start < 1.0
    backend.close()


# -- pure helpers (property-based) -----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 64), w=st.integers(1, 64), th=st.integers(1, 48), tw=st.integers(1, 48), pad=st.booleans(),
       value=st.integers(1, 255))
def test_resize_shape_and_content(h: int, w: int, th: int, tw: int, pad: bool, value: int) -> None:
    image = np.full((h, w, 3), value, np.uint8)
    ratio = max(w / tw, h / th)
    if pad and (int(h / ratio) < 1 or int(w / ratio) < 1):  # a side would vanish: refused, not a 0-px image
        with pytest.raises(imaging.ImageEncodeError, match="too elongated"):
            imaging.resize(image, th, tw, pad=pad)
        return
    out = imaging.resize(image, th, tw, pad=pad)
    assert out.shape == (th, tw, 3) and out.dtype == np.uint8
    painted = np.argwhere(out[..., 0] > 0)
    if pad:  # a solid rectangle keeping the source aspect ratio (up to rounding) inside black bars
        np.testing.assert_array_equal(out, image_tools.resize_with_pad(image, th, tw))  # openpi's pixels exactly
        rows = painted[:, 0].max() - painted[:, 0].min() + 1
        cols = painted[:, 1].max() - painted[:, 1].min() + 1
        assert len(painted) == rows * cols
        assert rows >= th - 1 or cols >= tw - 1  # resize_with_pad truncates, so a side may come out 1 px short
        assert abs(rows * w - cols * h) <= w + h
    else:
        assert len(painted) == th * tw


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_png_round_trip_is_exact(h: int, w: int, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.decode_image(imaging.encode_png(image)), image)


@pytest.mark.parametrize("cls", COMPAT)
def test_unencodable_image_is_a_backend_error(cls: type, tokenizer: ActionTokenizer) -> None:
    options = {"model": "m", "image_size": 32} if cls is OpenAICompatBackend else {}
    backend = cls({**options, "url": "ws://127.0.0.1:1"} if cls is OpenPIBackend else options, tokenizer)
    empty = Observation(np.zeros((0, 4, 3), np.uint8), "x", 0, 0.0)
    with pytest.raises(BackendError, match="camera image"):
        backend.infer(empty, timeout_s=1.0)
    backend.close()


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8)])
def test_imaging_rejects_bad_images(bad: np.ndarray) -> None:
    with pytest.raises(imaging.ImageEncodeError):
        imaging.encode_jpeg(bad)


unit_quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).map(np.array).filter(
    lambda q: np.linalg.norm(q) > 0.1).map(lambda q: q / np.linalg.norm(q))


@settings(max_examples=100, deadline=None)
@given(q=unit_quaternions, pos=st.lists(st.floats(-2, 2), min_size=3, max_size=3), grip=st.floats(0, 1))
def test_state_vector_encodes_the_pose(q: np.ndarray, pos: list[float], grip: float) -> None:
    obs = Observation(np.zeros((2, 2, 3), np.uint8), "x", 0, 0.0, ee_position=np.array(pos), ee_orientation=q,
                      gripper=grip)
    for fmt in (f for f in STATE_LAYOUTS if f.startswith("pos_")):
        state = state_vector(obs, fmt)
        assert state.dtype == np.float32 and state.shape == ((8,) if fmt == "pos_quat_gripper" else (7,))
        np.testing.assert_allclose(state[:3], pos, atol=1e-6)
        assert state[-1] == pytest.approx(grip, abs=1e-6)
        if fmt == "pos_axisangle_gripper":
            angle = float(np.linalg.norm(state[3:6]))
            back = quaternions.axangle2quat(state[3:6] if angle > 1e-9 else [1, 0, 0], angle)
        elif fmt == "pos_euler_gripper":
            back = euler.euler2quat(*state[3:6], "sxyz")
        else:
            back = state[3:7]
        assert min(np.abs(back - q).max(), np.abs(back + q).max()) < 1e-4  # q and -q are the same rotation


@pytest.mark.parametrize("quat", [[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [np.nan, 0.0, 0.0, 1.0]])
def test_state_vector_rejects_invalid_orientation(quat: list[float]) -> None:
    obs = Observation(np.zeros((2, 2, 3), np.uint8), "x", 0, 0.0, ee_position=np.zeros(3),
                      ee_orientation=np.array(quat), gripper=0.0)
    with pytest.raises(BackendError, match=r"invalid arm state"):
        state_vector(obs, "pos_axisangle_gripper")


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=8))
def test_error_summary_is_one_line(lines: list[str]) -> None:
    summary = _error_summary("\n".join(lines))
    assert "\n" not in summary and "\r" not in summary and summary
    assert len(summary) <= 301


@pytest.mark.parametrize(("regex", "expected"), [("^a b$", "a b"), ("a b", "a b"), (r"cost \$", r"cost \$"),
                                                 ("^(1|0)( \\d+){7}$", "(1|0)( \\d+){7}")])
def test_unanchored(regex: str, expected: str) -> None:
    assert unanchored(regex) == expected
