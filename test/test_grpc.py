"""rt2_ros gRPC protocol: GrpcBackend against real rt2-serve processes on 127.0.0.1.

Servers host ``test/grpc_echo_backend.py`` (a deterministic backend that describes what it
received), so each test checks the bytes that crossed the wire, not just that a call returned.
Certificates come from the ``openssl`` CLI (``cryptography`` is not installed in the venv).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros import __version__, imaging, serve
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import BackendConfigError, BackendError, BackendTimeout, create_backend
from rt2_ros.backends.grpc_client import error_from_status, observation_to_proto, reply_from_proto
from rt2_ros.backends.proto import PROTOCOL_VERSION, VERSION_TRAILER, load
from rt2_ros.tokens import ActionTokenizer

sys.path.append(str(Path(__file__).resolve().parent))  # for grpc_echo_backend, also imported by rt2-serve
from grpc_echo_backend import ECHO_MODEL, expected_bins, image_digest

pb, pb_grpc = load()
REPO = Path(__file__).resolve().parent.parent
ECHO = "grpc_echo_backend:EchoBackend"
TOKEN = "s3cr3t-t0ken-for-tests"
SERVER_SIZE = (64, 48)  # (width, height) the plain server advertises
START_TIMEOUT_S = 30.0


# -- helpers ----------------------------------------------------------------------------------------


class Server:
    """An rt2-serve subprocess; ``port`` is parsed from its readiness line."""

    def __init__(self, tmp: Path, *args: str, port: int = 0, name: str = "server") -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "test")]))
        self.log_path = tmp / f"{name}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rt2_ros.serve", "--port", str(port), "--log-level", "DEBUG", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=REPO)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop(signal.SIGKILL)
                raise AssertionError(f"rt2-serve did not start within {START_TIMEOUT_S} s: {self.log()}") from None
            if line is None:
                self.proc.wait(timeout=5)
                raise AssertionError(f"rt2-serve exited with {self.proc.returncode}: {self.log()}")
            match = re.search(r"serving .* on \S*:(\d+) \[", line)  # host: 127.0.0.1, 0.0.0.0, ::, ...
            if match:
                self.port = int(match.group(1))
                self.ready_line = line.strip()
                return

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=10)
        finally:
            self._log.close()
        return rc


def write_params(path: Path, profile: str = "rt2", extra: str = "") -> Path:
    path.write_text(f"""
rt2_test_server:
  ros__parameters:
    backend:
      echo:
        model_name: {ECHO_MODEL}
{extra}
    tokenizer:
      profile: {profile}
""")
    return path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certs(d: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=rt2 test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d)
    for name, usage, san in (("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
                             ("client", "clientAuth", "DNS:rt2-robot")):
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName={san}\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


def client(target: str, **options: object):
    opts = {"target": target, "connect_timeout_s": 5.0, "max_backoff_s": 0.5, **options}
    return create_backend("grpc", opts, tokenizer())


def frame(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth content plus noise: JPEG keeps the mean close, PNG/raw must keep every byte
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-8, 9, size=base.shape), 0, 255).astype(np.uint8)


JOINTS = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])  # rad, a Panda's arm
FINGERS = np.array([0.039, 0.0391])  # m, its two finger joints


def observation(seq: int, *, width: int = 64, height: int = 48, instruction: str = "pick up the red cube",
                ee: bool = False, joints: bool = False, rng_seed: int = 0,
                cameras: dict[str, tuple[int, int]] | None = None) -> Observation:
    """``cameras``: further cameras after the primary ("camera"), name -> (width, height)."""
    stamp = 1000.0 + seq / 10
    image = frame(width, height, rng_seed + seq)
    images = {"camera": image}
    image_stamps = {"camera": stamp}
    for i, (name, (w, h)) in enumerate((cameras or {}).items(), start=1):
        images[name] = frame(w, h, rng_seed + seq + 1000 * i)
        image_stamps[name] = stamp - 0.01 * i
    kwargs: dict = {}
    state_stamps: dict[str, float] = {}
    if ee:
        kwargs |= {"ee_position": np.array([0.4, -0.1, 0.3]) + seq * 1e-3,
                   "ee_orientation": np.array([1.0, 0.0, 0.0, 0.0]), "gripper": 0.25}
        state_stamps |= {"ee_pose": stamp - 0.002, "gripper": stamp - 0.003}
    if joints:
        kwargs |= {"joint_positions": JOINTS + seq * 1e-3, "gripper_positions": FINGERS}
        state_stamps |= {"joint_positions": stamp - 0.004, "gripper_positions": stamp - 0.005}
    return Observation(image=image, instruction=instruction, seq=seq, stamp=stamp, images=images,
                       image_stamps=image_stamps, state_stamps=state_stamps, **kwargs)


def plan_fields(text: str) -> dict[str, str]:
    keys = ("size", "sha", "mean", "stamp", "cameras", "ee", "quat", "gripper", "joints", "fingers", "stamps")
    pattern = "Plan: " + " ".join(f"{k} (\\S+)" for k in keys) + r" instruction (.*)\. Action: ([\d ]+)$"
    match = re.match(pattern, text)
    assert match, f"unexpected echo answer {text!r}"
    return dict(zip((*keys, "instruction", "action"), match.groups(), strict=True))


def floats(field: str) -> np.ndarray | None:
    return None if field == "none" else np.array([float(v) for v in field.split(",")])


def cameras_seen(fields: dict[str, str]) -> list[tuple[str, str, str, float | None]]:
    """(name, WxH, sha, stamp) of every camera the server-side backend saw, in its order (primary first)."""
    out = []
    for item in fields["cameras"].split(","):
        name, size, sha, stamp = item.split(":")
        out.append((name, size, sha, None if stamp == "none" else float(stamp)))
    return out


def state_stamps_seen(fields: dict[str, str]) -> dict[str, float]:
    if fields["stamps"] == "none":
        return {}
    return {k: float(v) for k, v in (item.split("=") for item in fields["stamps"].split(","))}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value or ``timeout_s`` passes (returns the last value)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("grpc")


@pytest.fixture(scope="module")
def certs(workdir: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make test certificates")
    d = workdir / "certs"
    d.mkdir()
    return make_certs(d)


@pytest.fixture(scope="module")
def token_file(workdir: Path) -> Path:
    path = workdir / "token.txt"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def params(workdir: Path) -> Path:
    return write_params(workdir / "params.yaml")


@pytest.fixture(scope="module")
def plain_server(workdir: Path, params: Path) -> Iterator[Server]:
    server = Server(workdir, "--backend-class", ECHO, "--params", str(params),
                    "--image-size", f"{SERVER_SIZE[0]}x{SERVER_SIZE[1]}", name="plain")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def tls_server(workdir: Path, params: Path, certs: dict[str, Path], token_file: Path) -> Iterator[Server]:
    server = Server(workdir, "--backend-class", ECHO, "--params", str(params), "--tls-cert", str(certs["server.crt"]),
                    "--tls-key", str(certs["server.key"]), "--token-file", str(token_file), name="tls")
    yield server
    assert server.stop() == 0, server.log()


# -- round trips against a plain server -------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_round_trip(plain_server: Server, encoding: str, streaming: bool) -> None:
    backend = client(plain_server.target, image_encoding=encoding, use_streaming=streaming)
    try:
        for seq in (3, 4, 9):  # several calls: the stream is reused, each reply matches its observation
            obs = observation(seq, ee=seq == 4)
            reply = backend.infer(obs, timeout_s=5.0)
            assert reply.seq == seq
            assert reply.backend == "grpc:echo"
            assert np.isfinite(reply.server_time_s) and reply.server_time_s >= 0
            fields = plan_fields(reply.text)
            assert fields["size"] == "64x48"
            assert fields["instruction"] == repr(obs.instruction)
            if encoding == "jpeg":  # lossy: compare content statistics
                assert abs(float(fields["mean"]) - obs.image.mean()) < 2.0
            else:  # lossless: the server decoded exactly the bytes the robot had
                assert fields["sha"] == image_digest(obs.image)
                assert [int(b) for b in fields["action"].split()] == expected_bins(seq, obs.image)
            if obs.ee_position is not None:
                assert np.allclose([float(v) for v in fields["ee"].split(",")], obs.ee_position)
                assert np.allclose([float(v) for v in fields["quat"].split(",")], obs.ee_orientation)
                assert float(fields["gripper"]) == pytest.approx(0.25)
            else:
                assert fields["ee"] == fields["quat"] == fields["gripper"] == "none"
    finally:
        backend.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("encoding", ["png", "raw", "jpeg"])
def test_two_cameras_and_joint_state_round_trip(plain_server: Server, encoding: str, streaming: bool) -> None:
    backend = client(plain_server.target, image_encoding=encoding, use_streaming=streaming)
    try:
        for seq in (5, 6):
            obs = observation(seq, ee=True, joints=True, cameras={"wrist": (128, 96)})
            reply = backend.infer(obs, timeout_s=5.0)
            assert reply.seq == seq
            fields = plan_fields(reply.text)
            seen = cameras_seen(fields)
            # both frames, by name, primary first, each resized to the server's 64x48 and stamped
            assert [(name, size) for name, size, _, _ in seen] == [("camera", "64x48"), ("wrist", "64x48")]
            assert [stamp for *_, stamp in seen] == [obs.image_stamps["camera"], obs.image_stamps["wrist"]]
            assert float(fields["stamp"]) == obs.stamp
            if encoding != "jpeg":  # lossless: exactly the robot's pixels (the wrist frame after the resize)
                wrist = imaging.resize(obs.images["wrist"], SERVER_SIZE[1], SERVER_SIZE[0])
                assert [sha for _, _, sha, _ in seen] == [image_digest(obs.image), image_digest(wrist)]
            # every proprioception piece, exactly, with its stamp
            np.testing.assert_array_equal(floats(fields["ee"]), obs.ee_position)
            np.testing.assert_array_equal(floats(fields["quat"]), obs.ee_orientation)
            np.testing.assert_array_equal(floats(fields["gripper"]), [obs.gripper])
            np.testing.assert_array_equal(floats(fields["joints"]), obs.joint_positions)
            np.testing.assert_array_equal(floats(fields["fingers"]), FINGERS)
            assert state_stamps_seen(fields) == obs.state_stamps
            assert set(obs.state_stamps) == {"ee_pose", "gripper", "joint_positions", "gripper_positions"}
        # a piece left out (stale on the robot) stays out on the server
        obs = observation(7, joints=True)
        fields = plan_fields(backend.infer(obs, timeout_s=5.0).text)
        assert fields["ee"] == fields["quat"] == fields["gripper"] == "none"
        assert state_stamps_seen(fields) == {"joint_positions": obs.state_stamps["joint_positions"],
                                             "gripper_positions": obs.state_stamps["gripper_positions"]}
        assert [name for name, *_ in cameras_seen(fields)] == ["camera"]
    finally:
        backend.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_server_cameras_option(workdir: Path, params: Path, streaming: bool) -> None:
    # the model's primary is the wrist camera; the robot's primary is "camera" and it has a third camera
    server = Server(workdir, "--backend-class", ECHO, "--params", str(params), "--cameras", "wrist,camera",
                    name="cameras")
    try:
        backend = client(server.target, image_encoding="png", use_streaming=streaming)
        try:
            assert list(backend.server_info.cameras) == ["wrist", "camera"]
            obs = observation(8, cameras={"wrist": (32, 24), "side": (16, 12)})
            fields = plan_fields(backend.infer(obs, timeout_s=5.0).text)
            seen = cameras_seen(fields)
            # only the cameras the server needs travel, and the model's primary leads
            assert [(name, size, sha) for name, size, sha, _ in seen] == [
                ("wrist", "32x24", image_digest(obs.images["wrist"])), ("camera", "64x48", image_digest(obs.image))]
            assert (fields["size"], fields["sha"]) == ("32x24", image_digest(obs.images["wrist"]))
            assert float(fields["stamp"]) == obs.image_stamps["wrist"]
            # an observation without the wrist frame (an optional camera gone stale) is refused before sending
            with pytest.raises(BackendError, match=re.escape("needs cameras ['wrist', 'camera'] but this observation "
                                                             "has no frame of ['wrist'] (it has ['camera'])")):
                backend.infer(observation(9), timeout_s=5.0)
            assert backend.infer(observation(10, cameras={"wrist": (32, 24)}), timeout_s=5.0).seq == 10
        finally:
            backend.close()
        # the server checks it too (a client that ignores ServerInfo.cameras)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.PolicyStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(observation_to_proto(observation(11), "png"), timeout=5.0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the hosted model needs cameras ['wrist', 'camera'] (rt2-serve --cameras) but ['wrist'] did not " \
                   "come (the robot sent ['camera'])" in info.value.details()
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_bad_observation_is_invalid_argument(plain_server: Server, streaming: bool) -> None:
    request = observation_to_proto(observation(12, cameras={"wrist": (8, 6)}), "png")
    request.images[1].camera = "camera"
    with grpc.insecure_channel(plain_server.target) as channel:
        stub = pb_grpc.PolicyStub(channel)
        if streaming:  # in-band, and the stream stays usable
            good = observation_to_proto(observation(13), "png")
            replies = list(stub.InferStream(iter([request, good]), timeout=5.0))
            assert replies[0].seq == 12 and replies[0].WhichOneof("answer") == "error"
            assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            message = replies[0].error.message
            assert replies[1].seq == 13 and replies[1].WhichOneof("answer") == "text"
        else:
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(request, timeout=5.0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            message = info.value.details()
    assert message == "images[1].camera: duplicate camera name 'camera'"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_token_ids_and_action_chunks(plain_server: Server, streaming: bool) -> None:
    backend = client(plain_server.target, image_encoding="png", use_streaming=streaming)
    try:
        obs = observation(11, instruction="ids")
        reply = backend.infer(obs, timeout_s=5.0)
        assert reply.text is None and reply.actions is None
        assert reply.token_ids == tuple(32000 - b for b in expected_bins(11, obs.image))
        obs = observation(12, instruction="actions")
        reply = backend.infer(obs, timeout_s=5.0)
        bins = np.array(expected_bins(12, obs.image)[1:], dtype=np.float32) / 255.0
        assert reply.actions.shape == (2, 7)
        np.testing.assert_allclose(reply.actions, np.stack([bins, -bins]), rtol=1e-6)
    finally:
        backend.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_concurrent_calls_get_their_own_answers(plain_server: Server, streaming: bool) -> None:
    backend = client(plain_server.target, image_encoding="png", use_streaming=streaming)
    try:
        observations = [observation(100 + i) for i in range(8)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            replies = list(pool.map(lambda o: backend.infer(o, timeout_s=10.0), observations))
        for obs, reply in zip(observations, replies, strict=True):
            assert reply.seq == obs.seq
            assert plan_fields(reply.text)["sha"] == image_digest(obs.image)
    finally:
        backend.close()


@pytest.mark.parametrize("resize", [True, False])
def test_resize_to_server_size(plain_server: Server, resize: bool) -> None:
    backend = client(plain_server.target, image_encoding="raw", resize_to_server_size=resize)
    try:
        assert (backend.server_info.image_width, backend.server_info.image_height) == SERVER_SIZE
        reply = backend.infer(observation(1, width=128, height=96), timeout_s=5.0)
        assert plan_fields(reply.text)["size"] == ("64x48" if resize else "128x96")
    finally:
        backend.close()


def test_health_and_info(plain_server: Server) -> None:
    backend = client(plain_server.target)
    try:
        assert backend.check_health(2.0) == "SERVING"
        info = backend.server_info
        assert (info.backend, info.model, info.tokenizer_profile, info.protocol_version) == \
            ("echo", ECHO_MODEL, "rt2", 2)
        assert list(info.cameras) == []  # no --cameras: any
    finally:
        backend.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_deadline_exceeded_then_recovers(plain_server: Server, streaming: bool) -> None:
    backend = client(plain_server.target, use_streaming=streaming, image_encoding="png")
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendTimeout, match="no answer within"):
            backend.infer(observation(20, instruction="sleep:1.0"), timeout_s=0.3)
        assert time.monotonic() - t0 < 0.9  # the deadline, not the slow model, ends the call
        # the next observation gets its own answer, never the late one for seq 20
        obs = observation(21)
        reply = backend.infer(obs, timeout_s=5.0)
        assert reply.seq == 21
        assert plan_fields(reply.text)["sha"] == image_digest(obs.image)
    finally:
        backend.close()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_backend_failure_is_backend_error(plain_server: Server, streaming: bool) -> None:
    backend = client(plain_server.target, use_streaming=streaming)
    try:
        with pytest.raises(BackendError, match="echo backend was told to fail") as info:
            backend.infer(observation(30, instruction="fail"), timeout_s=5.0)
        assert not isinstance(info.value, BackendTimeout)
        assert backend.infer(observation(31), timeout_s=5.0).seq == 31  # the stream survived
    finally:
        backend.close()


def test_reset_reaches_server(plain_server: Server) -> None:
    backend = client(plain_server.target)
    try:
        backend.reset()
    finally:
        backend.close()
    assert "reset requested by" in plain_server.log()


# -- security -------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_tls_with_correct_token(tls_server: Server, certs: dict[str, Path], token_file: Path, streaming: bool,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    backend = client(tls_server.target, tls=True, ca_cert=str(certs["ca.crt"]), token_file=str(token_file),
                     use_streaming=streaming)
    try:
        obs = observation(40)
        assert backend.infer(obs, timeout_s=5.0).seq == 40
        assert backend.check_health(2.0) == "SERVING"
    finally:
        backend.close()
    assert "health SERVING" in caplog.text  # the start-up probe is logged ...
    assert TOKEN not in caplog.text and TOKEN not in tls_server.log()  # ... the token never is


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_tls_wrong_token_refused(tls_server: Server, certs: dict[str, Path], workdir: Path, streaming: bool) -> None:
    wrong = workdir / f"wrong-{streaming}.txt"
    wrong.write_text("not-the-token")
    wrong.chmod(0o600)
    backend = client(tls_server.target, tls=True, ca_cert=str(certs["ca.crt"]), token_file=str(wrong),
                     use_streaming=streaming)
    try:
        rejected = re.escape("token rejected by server; check backend.grpc.token_file")
        with pytest.raises(BackendError, match=rejected) as info:
            backend.infer(observation(41), timeout_s=5.0)
        assert TOKEN not in str(info.value) and "not-the-token" not in str(info.value)
    finally:
        backend.close()
    assert "invalid bearer token" in tls_server.log()


def test_tls_no_token_refused(tls_server: Server, certs: dict[str, Path]) -> None:
    backend = client(tls_server.target, tls=True, ca_cert=str(certs["ca.crt"]))
    try:
        required = re.escape("server requires a bearer token; set backend.grpc.token_file")
        with pytest.raises(BackendError, match=required):
            backend.infer(observation(42), timeout_s=5.0)
    finally:
        backend.close()


def test_plaintext_client_to_tls_server_fails_clearly(tls_server: Server, token_file: Path) -> None:
    backend = client(tls_server.target, connect_timeout_s=0.5, token_file=str(token_file), allow_insecure_token=True)
    try:
        with pytest.raises(BackendError, match=r"unavailable|TLS") as info:
            backend.infer(observation(43), timeout_s=2.0)
        assert not isinstance(info.value, BackendTimeout)
    finally:
        backend.close()


def test_mtls_requires_client_certificate(workdir: Path, params: Path, certs: dict[str, Path]) -> None:
    server = Server(workdir, "--backend-class", ECHO, "--params", str(params), "--tls-cert", str(certs["server.crt"]),
                    "--tls-key", str(certs["server.key"]), "--client-ca", str(certs["ca.crt"]), name="mtls")
    try:
        with_cert = client(server.target, tls=True, ca_cert=str(certs["ca.crt"]),
                           client_cert=str(certs["client.crt"]), client_key=str(certs["client.key"]))
        try:
            assert with_cert.infer(observation(50), timeout_s=5.0).seq == 50
        finally:
            with_cert.close()
        without_cert = client(server.target, tls=True, ca_cert=str(certs["ca.crt"]), connect_timeout_s=1.0)
        try:
            with pytest.raises(BackendError, match=r"unavailable|TLS") as info:
                without_cert.infer(observation(51), timeout_s=3.0)
            assert not isinstance(info.value, BackendTimeout)
        finally:
            without_cert.close()
    finally:
        assert server.stop() == 0, server.log()


# -- protocol versions ------------------------------------------------------------------------------


class FakeServer:
    """An in-process gRPC server answering only ``methods`` (full method name -> behaviour on raw bytes).

    Stands in for an rt2-serve of another protocol version, or for a server that is no rt2-serve at all;
    no health service, so the client goes straight to GetInfo.
    """

    def __init__(self, methods: dict, port: int = 0) -> None:
        class Handler(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                behaviour = methods.get(details.method)
                return None if behaviour is None else grpc.unary_unary_rpc_method_handler(behaviour)

        self.calls: list[str] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((Handler(),))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(0).wait(5.0)


def v1_rt2_serve() -> dict:
    """What an rt2-serve of protocol v1 answers (only its own package; GetInfo as v1 encoded ServerInfo)."""
    info = pb.ServerInfo(protocol_version=1, backend="embedded", tokenizer_profile="rt2", server_version="0.0.9")
    return {"/rt2_ros.policy.v1.Policy/GetInfo": lambda _request, _context: info.SerializeToString()}


def v3_rt2_serve() -> dict:
    """What an rt2-serve of a later protocol v3 answers this version's calls (as OtherVersionHandler does)."""
    def refuse(_request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata(((VERSION_TRAILER, "3"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                      "this rt2-serve speaks rt2_ros protocol v3, the robot v2; upgrade the robot's rt2_ros")

    return {f"/rt2_ros.policy.v2.Policy/{m}": refuse for m in ("GetInfo", "Infer", "Reset")}


OLDER_SERVER = ("policy server 127.0.0.1:{port} speaks an older rt2_ros protocol (v1, rt2_ros 0.0.9) than this robot "
                f"(v2); upgrade rt2-serve on the server to this robot's rt2_ros ({__version__})")
NEWER_SERVER = ("policy server 127.0.0.1:{port} speaks a newer rt2_ros protocol (v3) than this robot (v2); "
                "upgrade rt2_ros on the robot to the server's version (server: this rt2-serve speaks rt2_ros "
                "protocol v3, the robot v2; upgrade the robot's rt2_ros)")


@pytest.mark.parametrize(("methods", "expected"), [(v1_rt2_serve, OLDER_SERVER), (v3_rt2_serve, NEWER_SERVER)],
                         ids=["older-server", "newer-server"])
def test_other_protocol_server_refused_at_start(methods, expected: str) -> None:
    server = FakeServer(methods())
    try:
        with pytest.raises(BackendConfigError, match=re.escape(expected.format(port=server.port))):
            client(server.target)
    finally:
        server.stop()


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("methods", "expected"), [(v1_rt2_serve, OLDER_SERVER), (v3_rt2_serve, NEWER_SERVER)],
                         ids=["older-server", "newer-server"])
def test_other_protocol_server_refused_on_first_call(methods, expected: str, streaming: bool) -> None:
    placeholder = FakeServer({})  # reserve a free port, then free it: the robot starts before its server
    port = placeholder.port
    placeholder.stop()
    backend = client(f"127.0.0.1:{port}", connect_timeout_s=0.3, use_streaming=streaming)  # unreachable: not fatal
    server = FakeServer(methods(), port=port)

    def refusal() -> str | None:
        try:
            backend.infer(observation(1), timeout_s=5.0)
        except BackendError as exc:
            return None if "unavailable" in str(exc) else str(exc)  # the channel is still in its backoff
        raise AssertionError("a server of another protocol version answered")

    try:
        assert wait_until(refusal, timeout_s=10.0) == expected.format(port=port)
        # every call, not just the first (the server could be upgraded meanwhile)
        with pytest.raises(BackendError, match=re.escape(expected.format(port=port))):
            backend.infer(observation(2), timeout_s=5.0)
        assert backend.server_info is None
    finally:
        backend.close()
        server.stop()


def test_not_an_rt2_server(caplog: pytest.LogCaptureFixture) -> None:
    server = FakeServer({})  # serves nothing we know
    try:
        backend = client(server.target)
        try:
            assert "has no GetInfo" in caplog.text
            with pytest.raises(BackendError, match=re.escape(
                    "does not implement rt2_ros.policy.v2.Policy (Method not found!); is it an rt2-serve (or "
                    "compatible) server of rt2_ros protocol v2?")):
                backend.infer(observation(1), timeout_s=5.0)
        finally:
            backend.close()
    finally:
        server.stop()


OLDER_ROBOT = ("this rt2-serve speaks rt2_ros protocol v2, the robot v1; upgrade the robot's rt2_ros to {version} "
               "(or serve it with an rt2-serve of the robot's version)")
NEWER_ROBOT = ("this rt2-serve speaks rt2_ros protocol v2, the robot v3; upgrade rt2-serve (rt2_ros {version} here) "
               "to the robot's version")


@pytest.mark.parametrize(("version", "expected"), [(1, OLDER_ROBOT), (3, NEWER_ROBOT)],
                         ids=["older-robot", "newer-robot"])
@pytest.mark.parametrize("method", ["GetInfo", "Infer", "InferStream", "Reset"])
def test_server_refuses_other_protocol_clients(plain_server: Server, version: int, expected: str, method: str) -> None:
    assert PROTOCOL_VERSION == 2
    path = f"/rt2_ros.policy.v{version}.Policy/{method}"
    with grpc.insecure_channel(plain_server.target) as channel:
        # raw bytes both ways: an old robot's messages are never parsed (v1's Observation had field 4 = one Image)
        v1_request = pb.Observation(seq=1, instruction="x").SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            if method == "InferStream":
                list(channel.stream_stream(path)(iter([v1_request]), timeout=5.0))
            else:
                channel.unary_unary(path)(v1_request, timeout=5.0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == expected.format(version=__version__)
    assert (VERSION_TRAILER, "2") in tuple(info.value.trailing_metadata())


# -- reconnection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_server_restart_is_survived(workdir: Path, params: Path, streaming: bool) -> None:
    first = Server(workdir, "--backend-class", ECHO, "--params", str(params), name="restart-a")
    port = first.port
    max_backoff_s = 0.5
    backend = client(first.target, use_streaming=streaming, max_backoff_s=max_backoff_s, connect_timeout_s=1.0)
    second = None
    try:
        assert backend.infer(observation(60), timeout_s=5.0).seq == 60
        first.stop(signal.SIGKILL)  # a crash: no goodbye on the connection
        with pytest.raises(BackendError):
            backend.infer(observation(61), timeout_s=2.0)
        second = Server(workdir, "--backend-class", ECHO, "--params", str(params), port=port, name="restart-b")
        ready = time.monotonic()
        seq = iter(range(62, 10_000))

        def attempt() -> BackendReply | None:
            s = next(seq)
            try:
                reply = backend.infer(observation(s), timeout_s=1.0)
            except BackendError:
                return None
            assert reply.seq == s
            return reply

        # the same backend object, no reconnect call: the channel must find the new server by itself
        reply = wait_until(attempt, timeout_s=max_backoff_s + 10.0)
        assert reply is not None, f"no recovery after restart: {second.log()}"
        assert time.monotonic() - ready < max_backoff_s + 5.0
    finally:
        backend.close()
        if second is not None:
            assert second.stop() == 0, second.log()  # SIGTERM: clean shutdown, exit code 0


# -- units: wire conversion, status mapping, configuration -----------------------------------------


def test_sequence_mismatch_is_backend_error() -> None:
    with pytest.raises(BackendError, match="answered observation seq 8 while waiting for seq 7"):
        reply_from_proto(pb.InferReply(seq=8, text="1 2 3 4 5 6 7 8"), expected_seq=7)
    assert reply_from_proto(pb.InferReply(seq=7, text="1 2"), expected_seq=7).text == "1 2"


@pytest.mark.parametrize(("code", "exc_type", "fragment"), [
    (grpc.StatusCode.DEADLINE_EXCEEDED, BackendTimeout, "no answer within"),
    (grpc.StatusCode.UNAUTHENTICATED, BackendError, "token rejected by server; check backend.grpc.token_file"),
    (grpc.StatusCode.UNAVAILABLE, BackendError, "reconnects by itself"),
    (grpc.StatusCode.INVALID_ARGUMENT, BackendError, "rejected the observation"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, BackendError, "at capacity"),
    (grpc.StatusCode.UNIMPLEMENTED, BackendError, "does not implement rt2_ros.policy.v2.Policy"),
    (grpc.StatusCode.FAILED_PRECONDITION, BackendError, "refused the call: detail"),
    (grpc.StatusCode.INTERNAL, BackendError, "failed with INTERNAL"),
])
@pytest.mark.parametrize("in_band", [False, True], ids=["status", "stream-error"])
def test_status_mapping(code: grpc.StatusCode, exc_type: type, fragment: str, in_band: bool) -> None:
    ctx = {"target": "gpu:50051", "timeout_s": 0.25, "has_token": True, "tls": True}
    if in_band:
        msg = pb.InferReply(seq=3, error=pb.ReplyError(code=code.value[0], message="detail"))
        with pytest.raises(BackendError) as info:
            reply_from_proto(msg, expected_seq=3, **ctx)
        exc = info.value
    else:
        exc = error_from_status(code, "detail", **ctx)
    assert type(exc) is exc_type
    assert fragment in str(exc) and "gpu:50051" in str(exc)
    assert exc.grpc_code == code


@pytest.mark.parametrize(("shape", "expected"), [([2, 3], (2, 3)), ([6], (1, 6)), ([5], None), ([0, 7], None),
                                               ([3, 2, 1], None), ([], None)])
def test_action_chunk_shape_checked(shape: list[int], expected: tuple[int, int] | None) -> None:
    msg = pb.InferReply(seq=1, actions=pb.ActionChunk(values=[0.5] * 6, shape=shape))
    if expected is not None:
        assert reply_from_proto(msg, expected_seq=1).actions.shape == expected
    else:
        with pytest.raises(BackendError, match="malformed action chunk"):
            reply_from_proto(msg, expected_seq=1)


images = st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**32 - 1)).map(
    lambda t: np.random.default_rng(t[2]).integers(0, 256, size=(t[0], t[1], 3), dtype=np.uint8))
finite = st.floats(-10, 10, allow_nan=False)
stamps = st.floats(0, 1e10)
vectors = st.lists(finite, min_size=1, max_size=9).map(np.array)


@st.composite
def observations(draw: st.DrawFn) -> Observation:
    """Any observation the robot can send: 1..3 named cameras, any subset of the state pieces, stamps or not."""
    names = draw(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,9}", fullmatch=True), min_size=1, max_size=3, unique=True))
    frames = {name: draw(images) for name in names}
    image_stamps = {name: draw(stamps) for name in names if draw(st.booleans())}
    state: dict = {}
    state_stamps: dict[str, float] = {}
    if draw(st.booleans()):
        state["ee_position"] = np.array(draw(st.lists(finite, min_size=3, max_size=3)))
    if draw(st.booleans()):
        state["ee_orientation"] = np.array(draw(st.lists(finite, min_size=4, max_size=4)))
    if draw(st.booleans()):
        state["gripper"] = draw(st.floats(0, 1))
    for piece in ("joint_positions", "gripper_positions"):
        if draw(st.booleans()):
            state[piece] = draw(vectors)
    pieces = {"ee_pose": "ee_position" in state or "ee_orientation" in state, "gripper": "gripper" in state,
              "joint_positions": "joint_positions" in state, "gripper_positions": "gripper_positions" in state}
    for piece, present in pieces.items():
        if present and draw(st.booleans()):
            state_stamps[piece] = draw(stamps)
    return Observation(image=frames[names[0]], instruction=draw(st.text(max_size=40)),
                       seq=draw(st.integers(-(2**62), 2**62)), stamp=draw(stamps), images=frames,
                       image_stamps=image_stamps, state_stamps=state_stamps, **state)


@settings(max_examples=80, deadline=None)
@given(obs=observations(), encoding=st.sampled_from(["png", "raw"]))
def test_observation_wire_round_trip(obs: Observation, encoding: str) -> None:
    wire = pb.Observation.FromString(observation_to_proto(obs, encoding).SerializeToString())
    back = serve.observation_from_proto(wire, max_pixels=10_000)
    assert list(back.images) == list(obs.images)  # names, in order: the primary stays first
    for name, image in obs.images.items():
        np.testing.assert_array_equal(back.images[name], image)
    np.testing.assert_array_equal(back.image, obs.image)
    assert back.image_stamps == obs.image_stamps
    assert back.stamp == obs.image_stamps.get(obs.primary_camera, obs.stamp)
    assert (back.seq, back.instruction) == (obs.seq, obs.instruction)
    for name in ("ee_position", "ee_orientation", "gripper", "joint_positions", "gripper_positions"):
        mine, theirs = getattr(obs, name), getattr(back, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            np.testing.assert_array_equal(theirs, mine)
    assert back.state_stamps == obs.state_stamps


answers = st.one_of(
    st.text(max_size=60).map(lambda t: {"text": t}),
    st.lists(st.integers(0, 2**40), max_size=10).map(lambda ids: {"token_ids": tuple(ids)}),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**32 - 1)).map(
        lambda t: {"actions": np.random.default_rng(t[2]).normal(size=t[:2]).astype(np.float32)}),
)


@settings(max_examples=60, deadline=None)
@given(answer=answers, seq=st.integers(-(2**62), 2**62), inference_s=st.floats(0, 100))
def test_reply_wire_round_trip(answer: dict, seq: int, inference_s: float) -> None:
    reply = BackendReply(seq=seq, backend="echo", **answer)
    wire = serve.reply_to_proto(reply, seq, inference_s=inference_s, backend="echo", model="m")
    back = reply_from_proto(pb.InferReply.FromString(wire.SerializeToString()), expected_seq=seq)
    assert (back.seq, back.backend, back.server_time_s) == (seq, "grpc:echo", inference_s)
    if "actions" in answer:
        np.testing.assert_array_equal(back.actions, answer["actions"])
    else:
        key = next(iter(answer))
        assert getattr(back, key) == answer[key]


def _many_cameras(m) -> None:
    for i in range(serve.MAX_CAMERAS):
        m.images.add(camera=f"extra{i}", image=m.images[0].image)


@pytest.mark.parametrize(("mutate", "fragment"), [
    (lambda m: setattr(m.images[0].image, "raw_encoding", "bgr8"), "camera 'camera': raw_encoding must be 'rgb8'"),
    (lambda m: setattr(m.images[1].image, "data", m.images[1].image.data[:-1]), "camera 'wrist': RAW rgb8 4x4 "
                                                                                "needs 48 bytes, got 47"),
    (lambda m: setattr(m.images[1].image, "width", 100_000), "exceeds the server limit"),
    (lambda m: setattr(m.images[0].image, "format", pb.Image.FORMAT_UNSPECIFIED), "format must be"),
    (lambda m: setattr(m.images[1].image, "format", pb.Image.PNG), "camera 'wrist': cannot decode PNG data"),
    (lambda m: m.ClearField("images"), "images: the observation carries no camera image"),
    (lambda m: setattr(m.images[1], "camera", "camera"), "images[1].camera: duplicate camera name 'camera'"),
    (lambda m: setattr(m.images[0], "camera", ""), "images[0].camera: empty camera name"),
    (lambda m: setattr(m.images[1], "camera", "left wrist"), "images[1].camera: 'left wrist' is not a camera name"),
    (lambda m: m.images[1].ClearField("image"), "images[1] (camera 'wrist'): no image"),
    (_many_cameras, f"cameras exceed the server limit of {serve.MAX_CAMERAS}"),
    (lambda m: setattr(m.images[1], "stamp", float("nan")), "images[1].stamp (camera 'wrist'): non-finite stamp"),
    (lambda m: m.state.ee_position.extend([1.0, 2.0]), "state.ee_position: expected 3 values, got 5"),
    (lambda m: m.state.ee_orientation.pop(), "state.ee_orientation: expected 4 values, got 3"),
    (lambda m: m.state.ee_position.__setitem__(1, float("nan")), "state.ee_position: non-finite"),
    (lambda m: setattr(m.state, "gripper", float("inf")), "state.gripper: non-finite closedness"),
    (lambda m: m.state.joint_positions.__setitem__(3, float("-inf")), "state.joint_positions: non-finite"),
    (lambda m: m.state.gripper_positions.extend([0.0] * 300), "state.gripper_positions: 302 values exceed the "
                                                              "server limit of 256"),
    (lambda m: m.state.ClearField("joint_positions"), "state.joint_positions_stamp is set but the robot sent no "
                                                      "joint_positions"),
    (lambda m: setattr(m.state, "ee_pose_stamp", float("inf")), "state.ee_pose_stamp: non-finite stamp"),
])
def test_malformed_observation_rejected(mutate, fragment: str) -> None:
    msg = observation_to_proto(observation(1, width=4, height=4, ee=True, joints=True, cameras={"wrist": (4, 4)}),
                               "raw")
    serve.observation_from_proto(msg, max_pixels=10_000)  # valid as sent
    mutate(msg)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        serve.observation_from_proto(msg, max_pixels=10_000)


def test_required_cameras_lead_in_their_order() -> None:
    msg = observation_to_proto(observation(1, width=4, height=4, cameras={"wrist": (2, 2), "side": (3, 3)}), "raw")
    back = serve.observation_from_proto(msg, max_pixels=10_000, cameras=("side", "camera"))
    assert list(back.images) == ["side", "camera", "wrist"] and back.image.shape == (3, 3, 3)
    assert back.stamp == back.image_stamps["side"]
    with pytest.raises(ValueError, match=re.escape("needs cameras ['camera', 'top'] (rt2-serve --cameras) but ['top'] "
                                                   "did not come (the robot sent ['camera', 'wrist', 'side'])")):
        serve.observation_from_proto(msg, max_pixels=10_000, cameras=("camera", "top"))


@pytest.mark.parametrize(("options", "fragment"), [
    ({"token_file": "TOKEN"}, "the token would travel in clear text"),
    ({"tls": True, "client_cert": "x.crt"}, "client_cert and backend.grpc.client_key go together"),
    ({"ca_cert": "ca.crt"}, "backend.grpc.ca_cert is set but backend.grpc.tls is false"),
    ({"target": "gpu-box"}, "has no port"),
    ({"tls": True, "ca_cert": "/nonexistent/ca.crt"}, "backend.grpc.ca_cert: cannot read"),
    ({"image_encoding": "webp"}, "backend.grpc.image_encoding"),
])
def test_client_config_errors(options: dict, fragment: str, token_file: Path) -> None:
    options = {k: (str(token_file) if v == "TOKEN" else v) for k, v in options.items()}
    with pytest.raises((BackendConfigError, ValueError), match=re.escape(fragment)):
        client(options.pop("target", "127.0.0.1:1"), **options)


def test_wrong_tokenizer_profile_refused_at_start(plain_server: Server) -> None:
    class Other:
        profile = "openvla"

    with pytest.raises(BackendConfigError, match=re.escape("tokenizer.profile: rt2")):
        create_backend("grpc", {"target": plain_server.target}, Other())  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--token-file", "TOKEN"], "--token-file without TLS would send the token in clear text"),
    (["--tls-cert", "x.crt"], "--tls-cert and --tls-key go together"),
    (["--client-ca", "ca.crt"], "--client-ca (mTLS) needs --tls-cert"),
    (["--image-size", "224"], "--image-size: expected WIDTHxHEIGHT"),
    (["--cameras", "wrist,wrist"], "--cameras: a camera is listed twice in 'wrist,wrist'"),
    (["--cameras", "camera,,wrist"], "--cameras: expected camera names separated by commas"),
    (["--cameras", "left wrist"], "--cameras: expected camera names separated by commas"),
])
def test_serve_refuses_unsafe_or_bad_flags(args: list[str], fragment: str, params: Path, token_file: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    args = [str(token_file) if a == "TOKEN" else a for a in args]
    assert serve.main(["--backend-class", ECHO, "--params", str(params), "--port", "0", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_serve_insecure_token_allowed_explicitly(params: Path, token_file: Path) -> None:
    args = serve.build_parser().parse_args(["--backend-class", ECHO, "--params", str(params), "--token-file",
                                       str(token_file), "--allow-insecure-token"])
    assert serve.config_from_args(args).token == TOKEN.encode()


def test_params_section_selection(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("""
/robot:
  policy_node:
    ros__parameters:
      backend: {type: grpc, grpc: {target: "gpu:50051"}}
      tokenizer: {profile: rt2}
  safety_node:
    ros__parameters:
      safety: {max_linear_speed: 0.1}
""")
    flat = serve.load_params(path)
    assert flat["backend.grpc.target"] == "gpu:50051" and flat["tokenizer.profile"] == "rt2"
    assert serve.load_params(path, "safety_node") == {"safety.max_linear_speed": 0.1}
    path.write_text("a: {ros__parameters: {backend: {type: x}}}\nb: {ros__parameters: {backend: {type: y}}}\n")
    with pytest.raises(serve.ConfigError, match="pick one with --node"):
        serve.load_params(path)
    assert serve.load_params(path, "b") == {"backend.type": "y"}


def test_codegen_is_idempotent() -> None:
    from rt2_ros import grpc_codegen

    assert grpc_codegen.generate() == []  # already generated by load(): nothing rewritten
    assert not grpc_codegen.is_stale()


# -- the real embedded backend behind rt2-serve -------------------------------------------------------


def test_serve_embedded_backend(workdir: Path) -> None:
    params = workdir / "embedded.yaml"
    params.write_text("rt2_server:\n  ros__parameters:\n    backend: {type: embedded}\n    tokenizer: {profile: rt2}\n")
    server = Server(workdir, "--backend", "embedded", "--params", str(params), name="embedded")
    try:
        backend = client(server.target, image_encoding="png")
        try:
            assert backend.server_info.backend == "embedded"
            image = np.full((120, 160, 3), 90, dtype=np.uint8)
            image[50:70, 70:90] = (220, 20, 20)  # a red cube in view
            obs = Observation(image=image, instruction="pick up the red cube", seq=5, stamp=1.0,
                              ee_position=np.array([0.5, 0.0, 0.3]), ee_orientation=np.array([0.0, 1.0, 0.0, 0.0]),
                              gripper=0.0)
            reply = backend.infer(obs, timeout_s=5.0)
            # the remote answer is what the same policy answers in-process for the same observation
            local = create_backend("embedded", {}, tokenizer()).infer(obs, timeout_s=5.0)
            assert reply.seq == 5 and reply.text == local.text
            assert tokenizer().parse_text(reply.text).bins.shape == (8,)
            no_state = Observation(image=image, instruction="pick up the red cube", seq=6, stamp=1.1)
            with pytest.raises(BackendError, match="ee_position is missing"):
                backend.infer(no_state, timeout_s=5.0)
        finally:
            backend.close()
    finally:
        assert server.stop() == 0, server.log()
