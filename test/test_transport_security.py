"""Issue 12, parts 1-3: plaintext only where it cannot be intercepted, TLS material checked at
start-up, and rt2-serve's limits (per-client concurrent calls, rate-limited refusal log).

Every refusal is checked by its message: the option or flag, the file, and what to do. The
server tests run ``python -m rt2_ros.serve`` as a separate process (test_grpc.Server).
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from rt2_ros.actions import Observation
from rt2_ros.backends import BackendConfigError, create_backend
from rt2_ros.backends.grpc_client import observation_to_proto
from rt2_ros.backends.proto import load
from rt2_ros.backends.transport_security import is_loopback, load_ca_bundle, load_cert_and_key
from rt2_ros.serve import peer_host
from rt2_ros.tokens import ActionTokenizer
from test.test_grpc import ECHO, REPO, Server, make_certs, write_params

pb, pb_grpc = load()

# backend -> (address option, plaintext URL/target of another machine, its secure form, extra options)
NETWORK_BACKENDS = {
    "grpc": ("target", "10.0.0.5:50051", None, {"connect_timeout_s": 0.2}),
    "openvla_http": ("url", "http://10.0.0.5:8000", "https://10.0.0.5:8000", {}),
    "openpi": ("url", "ws://10.0.0.5:8000", "wss://10.0.0.5:8000", {}),
    "openai": ("base_url", "http://10.0.0.5:8000/v1", "https://10.0.0.5:8000/v1", {"model": "m"}),
}
# the CA option of each backend (grpc also takes a client certificate and key)
CA_OPTION = {"grpc": "ca_cert", "openvla_http": "ca_cert_file", "openpi": "ca_cert_file", "openai": "ca_cert_file"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates")
    d = tmp_path_factory.mktemp("certs")
    out = make_certs(d)
    (d / "junk.pem").write_text("not a certificate\n")
    (d / "broken.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    return {**out, "junk.pem": d / "junk.pem", "broken.crt": d / "broken.crt", "missing": d / "missing.pem"}


def tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


def build(backend: str, **options):
    b = create_backend(backend, options, tokenizer())
    b.close()


# -- the pure rules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True), (None, True),
    ("10.0.0.5", False), ("0.0.0.0", False), ("::", False), ("gpu-box", False), ("localhost.evil.com", False),
    ("192.168.1.2", False)])
def test_is_loopback(host, local):
    assert is_loopback(host) is local


@pytest.mark.parametrize("peer, host", [("ipv4:10.0.0.5:40000", "10.0.0.5"), ("ipv6:[::1]:5000", "::1"),
                                        ("ipv6:[fe80::1%eth0]:7", "fe80::1%eth0"), ("unix:/tmp/s", "unix")])
def test_peer_host(peer, host):
    assert peer_host(peer) == host


def test_tls_material_is_parsed_and_the_key_must_match(certs):
    assert b"BEGIN CERTIFICATE" in load_ca_bundle("k", str(certs["ca.crt"]))
    cert, key = load_cert_and_key("c", str(certs["client.crt"]), "k", str(certs["client.key"]))
    assert b"BEGIN CERTIFICATE" in cert and b"PRIVATE KEY" in key
    with pytest.raises(BackendConfigError, match=r"k: the private key in .*server\.key.* does not belong to the "
                                                 r"certificate in .*client\.crt"):
        load_cert_and_key("c", str(certs["client.crt"]), "k", str(certs["server.key"]))
    with pytest.raises(BackendConfigError, match=r"^k: .*junk\.pem.* is not a PEM CA bundle"):
        load_ca_bundle("k", str(certs["junk.pem"]))
    with pytest.raises(BackendConfigError, match=r"^k: .*broken\.crt.* holds a certificate that does not parse"):
        load_ca_bundle("k", str(certs["broken.crt"]))
    with pytest.raises(BackendConfigError, match=r"^k: cannot read .*missing\.pem"):
        load_ca_bundle("k", str(certs["missing"]))
    with pytest.raises(BackendConfigError, match=r"^k: .*client\.crt.* is not a PEM private key"):
        load_cert_and_key("c", str(certs["client.crt"]), "k", str(certs["client.crt"]))


# -- every network backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", sorted(NETWORK_BACKENDS))
def test_plaintext_to_another_machine_is_refused_unless_allowed(backend, caplog):
    option, remote, secure, extra = NETWORK_BACKENDS[backend]
    key = f"backend.{backend}.allow_plaintext"
    with pytest.raises(BackendConfigError, match=rf"^backend.{backend}.{option} '{re.escape(remote)}'.* is not on "
                                                 rf"this machine .*unencrypted.*answer with actions.*{key}: true"):
        build(backend, **{option: remote}, **extra)
    with caplog.at_level(logging.WARNING):
        build(backend, **{option: remote, "allow_plaintext": True}, **extra)  # the operator took the risk
    assert any(key in r.getMessage() and "unencrypted" in r.getMessage() for r in caplog.records)
    caplog.clear()
    build(backend, **{option: remote.replace("10.0.0.5", "127.0.0.1")}, **extra)  # loopback: nothing to intercept
    build(backend, **{option: remote.replace("10.0.0.5", "[::1]")}, **extra)
    build(backend, **({option: secure} if secure else {option: remote, "tls": True}), **extra)  # TLS: no consent
    assert not any("unencrypted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend, url", [("openvla_http", "http://[::1"), ("openpi", "wss://"),
                                          ("openai", "ftp://10.0.0.5/v1"), ("openpi", "10.0.0.5:8000")])
def test_a_url_that_names_no_server_is_refused_not_taken_for_this_machine(backend, url):
    option, _, _, extra = NETWORK_BACKENDS[backend]
    with pytest.raises(BackendConfigError, match=rf"^backend.{backend}.{option}: expected .*got '{re.escape(url)}'"):
        build(backend, **{option: url}, **extra)


def test_the_docs_quote_the_refusal_as_the_backend_words_it():
    doc = (REPO / "docs" / "compat_backends.md").read_text()
    quoted = re.search(r"```text\n(backend\.openvla_http\.url 'http://10\.0\.0\.5:8000' .*?)```", doc, re.S)
    assert quoted, "docs/compat_backends.md no longer quotes the plaintext refusal"
    with pytest.raises(BackendConfigError) as refused:
        build("openvla_http", url="http://10.0.0.5:8000")
    assert " ".join(quoted.group(1).split()) == " ".join(str(refused.value).split())


@pytest.mark.parametrize("backend", sorted(NETWORK_BACKENDS))
@pytest.mark.parametrize("bad", ["junk.pem", "broken.crt", "missing"])
def test_a_bad_ca_bundle_is_refused_at_start_up_naming_the_key_and_file(backend, bad, certs):
    option, remote, secure, extra = NETWORK_BACKENDS[backend]
    tls = {option: secure} if secure else {option: remote, "tls": True}
    key = f"backend.{backend}.{CA_OPTION[backend]}"
    with pytest.raises(BackendConfigError, match=rf"^{key}: .*{bad.replace('.', '[.]')}"):
        build(backend, **tls, **{CA_OPTION[backend]: str(certs[bad])}, **extra)


@pytest.mark.parametrize("backend", ["openvla_http", "openpi", "openai"])
def test_a_ca_bundle_with_a_plaintext_url_is_refused(backend, certs):
    option, remote, _, extra = NETWORK_BACKENDS[backend]
    with pytest.raises(BackendConfigError, match=rf"backend.{backend}.ca_cert_file: only used with"):
        build(backend, **{option: remote.replace("10.0.0.5", "127.0.0.1")}, ca_cert_file=str(certs["ca.crt"]),
              **extra)


def test_grpc_client_certificate_and_key_are_checked_at_start_up(certs):
    tls = {"target": "127.0.0.1:1", "tls": True, "ca_cert": str(certs["ca.crt"]), "connect_timeout_s": 0.2}
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_key: the private key in .*server\.key.* "
                                                 r"does not belong to the certificate in .*client\.crt"):
        build("grpc", **tls, client_cert=str(certs["client.crt"]), client_key=str(certs["server.key"]))
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_cert: .*junk\.pem.* is not a PEM certificate"):
        build("grpc", **tls, client_cert=str(certs["junk.pem"]), client_key=str(certs["client.key"]))
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_cert: .*broken\.crt.* does not parse"):
        build("grpc", **tls, client_cert=str(certs["broken.crt"]), client_key=str(certs["client.key"]))
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_key: .*junk\.pem.* is not a PEM private key"):
        build("grpc", **tls, client_cert=str(certs["client.crt"]), client_key=str(certs["junk.pem"]))
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_key: cannot read .*missing\.pem"):
        build("grpc", **tls, client_cert=str(certs["client.crt"]), client_key=str(certs["missing"]))
    with pytest.raises(BackendConfigError, match=r"backend.grpc.client_cert: cannot read .*missing\.pem"):
        build("grpc", **tls, client_cert=str(certs["missing"]), client_key=str(certs["client.key"]))
    build("grpc", **tls, client_cert=str(certs["client.crt"]), client_key=str(certs["client.key"]))


def test_the_config_check_refuses_a_plaintext_remote_backend(tmp_path):
    """``rt2-bringup --check`` refuses what the node would refuse, before anything starts."""
    params = tmp_path / "remote.yaml"
    params.write_text(textwrap.dedent("""
        rt2_policy:
          ros__parameters:
            backend:
              type: openvla_http
              openvla_http:
                url: http://gpu-box:8000
        """))
    cmd = [sys.executable, "-m", "rt2_ros.nodes.bringup", "--params", str(REPO / "config/rt2.yaml"), "--params",
           str(params), "--check"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO),
                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out
    assert "backend.openvla_http.allow_plaintext" in out.stderr and "gpu-box" in out.stderr, out.stderr
    params.write_text(params.read_text() + "        allow_plaintext: true\n")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO),
                         "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out


# -- through the nodes ------------------------------------------------------------------------------------
def test_the_policy_node_refuses_a_plaintext_remote_server_while_the_safety_node_holds(tmp_path):
    """The safety node runs alone (rt2-bringup --no-policy); a policy node (--no-safety) configured for
    an unencrypted server on another machine exits 2 at start-up naming the option, and the arm never
    gets an action: the safety node stays up, accepts nothing and commands only zero twists. The
    same file with allow_plaintext starts the policy node (the refusal is the plaintext rule)."""
    pytest.importorskip("rclpy")
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import String

    from rt2_ros.nodes.common import COMMAND_QOS, EVENT_QOS, LATCHED_QOS
    from rt2_ros_interfaces.msg import SafetyStatus
    from test.ros_helpers import Probe, isolate_ros_domain, start_bringup, stop
    from test.ros_helpers import write_params as write_node_params

    isolate_ros_domain()
    main = REPO / "config" / "rt2.yaml"
    probe = Probe("rt2_transport_probe")
    probe.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    probe.record(TwistStamped, "/servo_node/delta_twist_cmds", COMMAND_QOS, "twist")
    stop_sensors = probe.publish_fake_sensors()  # camera and arm driver
    instruction = probe.publisher(String, "/instruction", EVENT_QOS)
    safety_log = tmp_path / "safety.log"
    t0 = time.monotonic()
    safety = start_bringup(main, "--no-policy", log=safety_log)
    try:
        probe.wait_for(lambda: safety.poll() is not None or bool(probe.since("status", t0)), 30.0,
                       "the safety node's status")
        assert safety.poll() is None, safety_log.read_text()
        refused = {"grpc": {"backend.type": "grpc", "backend.grpc.target": "10.0.0.5:50051"},
                   "openvla_http": {"backend.type": "openvla_http", "backend.openvla_http.url": "http://10.0.0.5:8000"}}
        for backend, policy in refused.items():
            overlay = write_node_params(tmp_path / f"{backend}.yaml", policy=policy)
            log = tmp_path / f"policy_{backend}.log"
            t_start = time.monotonic()
            proc = start_bringup(main, "--params", str(overlay), "--no-safety", log=log)
            try:
                rc = proc.wait(60)
            finally:
                stop(proc)
            text = log.read_text()
            assert rc == 2, text
            assert re.search(rf"rt2-bringup: configuration error: .*backend\.{backend}\.(target|url) '[^']*10\.0\.0\.5"
                             rf".*not on this machine.*backend\.{backend}\.allow_plaintext: true", text), text
            print(f"{backend}: policy process refused and exited 2 in {time.monotonic() - t_start:.2f} s")
        # An operator's instruction finds no policy; the arm holds.
        instruction.publish(String(data="pick up the block"))
        t_check = time.monotonic()
        probe.wait_for(lambda: len(probe.since("status", t_check)) >= 3, 10.0, "three more safety statuses")
        statuses = probe.since("status", t0)
        assert all(m.actions_accepted == 0 and m.state_name != "RUNNING" for m in statuses), \
            {(m.state_name, m.actions_accepted) for m in statuses}
        twists = probe.since("twist", t0)
        assert all(not any((t.twist.linear.x, t.twist.linear.y, t.twist.linear.z, t.twist.angular.x,
                            t.twist.angular.y, t.twist.angular.z)) for t in twists), "a non-zero twist was sent"
        assert safety.poll() is None, safety_log.read_text()

        # The control: the operator's consent is the only difference, and the policy node runs.
        allowed = write_node_params(tmp_path / "allowed.yaml", policy={**refused["openvla_http"],
                                                                       "backend.openvla_http.allow_plaintext": True})
        log = tmp_path / "policy_allowed.log"
        proc = start_bringup(main, "--params", str(allowed), "--no-safety", log=log)
        try:
            probe.wait_for(lambda: proc.poll() is not None or "rt2-bringup: running" in log.read_text(), 30.0,
                           "the allowed policy node to run")
            assert proc.poll() is None, log.read_text()
        finally:
            assert stop(proc) == 0, log.read_text()
        assert "backend.openvla_http.allow_plaintext: true" in log.read_text(), log.read_text()
    finally:
        rc = stop(safety)
        stop_sensors()
        probe.close()
    assert rc == 0, safety_log.read_text()


# -- rt2-serve: start-up refusals ----------------------------------------------------------------------------
def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    params = write_params(tmp_path / "params.yaml")
    return subprocess.run([sys.executable, "-m", "rt2_ros.serve", "--backend-class", ECHO, "--params", str(params),
                           "--port", "0", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PYTHONPATH": f"{REPO}:{REPO / 'test'}", "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("flags, missing", [
    ([], "TLS (--tls-cert/--tls-key) and client authentication (--token-file or --client-ca)"),
    (["tls"], "client authentication (--token-file or --client-ca)"),
    (["token", "--allow-insecure-token"], "TLS (--tls-cert/--tls-key)"),
])
def test_rt2_serve_on_a_network_address_needs_tls_and_client_auth(tmp_path, certs, flags, missing):
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    expand = {"tls": ["--tls-cert", str(certs["server.crt"]), "--tls-key", str(certs["server.key"])],
              "token": ["--token-file", str(token)]}
    args = [a for f in flags for a in expand.get(f, [f])]
    out = serve(tmp_path, "--host", "0.0.0.0", *args)
    assert out.returncode == 2, out
    assert f"rt2-serve: error: --host 0.0.0.0 is reachable from other machines, so rt2-serve needs {missing}" \
        in out.stderr, out.stderr
    assert "--insecure" in out.stderr


def test_rt2_serve_insecure_on_a_network_address_starts_with_a_warning(tmp_path):
    server = Server(tmp_path, "--backend-class", ECHO, "--params", str(write_params(tmp_path / "p.yaml")),
                    "--host", "0.0.0.0", "--insecure", name="insecure")
    try:
        assert "--insecure: serving on 0.0.0.0 without TLS and client authentication" in server.log()
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("flag, file, error", [
    ("--tls-key", "client.key", r"--tls-key: the private key in .*client\.key.* does not belong to the certificate "
                                r"in .*server\.crt"),
    ("--tls-cert", "junk.pem", r"--tls-cert: .*junk\.pem.* is not a PEM certificate"),
    ("--client-ca", "broken.crt", r"--client-ca: .*broken\.crt.* holds a certificate that does not parse"),
    ("--client-ca", "missing", r"--client-ca: cannot read .*missing\.pem"),
])
def test_rt2_serve_checks_its_tls_material_at_start_up(tmp_path, certs, flag, file, error):
    files = {"--tls-cert": certs["server.crt"], "--tls-key": certs["server.key"], "--client-ca": certs["ca.crt"]}
    files[flag] = certs[file]
    out = serve(tmp_path, *[a for f, p in files.items() for a in (f, str(p))])
    assert out.returncode == 2, out
    assert "rt2-serve: error: " in out.stderr and re.search(error, out.stderr), out.stderr


# -- rt2-serve: limits -------------------------------------------------------------------------------------
def request(instruction: str, seq: int = 1):
    obs = Observation(image=np.zeros((8, 8, 3), np.uint8), instruction=instruction, seq=seq, stamp=1.0)
    return observation_to_proto(obs)


def test_per_client_call_limit_refuses_at_once_and_frees_the_slot_however_a_call_ends(tmp_path):
    server = Server(tmp_path, "--backend-class", ECHO, "--params", str(write_params(tmp_path / "p.yaml")),
                    "--max-calls-per-client", "2", "--workers", "8", name="limit")
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.PolicyStub(channel)
    try:
        slow = [stub.Infer.future(request("sleep:1.5", i), timeout=10) for i in (1, 2)]
        time.sleep(0.3)  # both calls admitted (one computing, one waiting for the model)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(request("fast", 3), timeout=10)
        refused_in = time.monotonic() - t0
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 2 concurrent calls from 127.0.0.1 (rt2-serve --max-calls-per-client)" in \
            refused.value.details()
        assert refused_in < 0.5, refused_in  # refused at once, not queued behind the model
        for f in slow:
            f.cancel()  # a cancelled call frees its slot
        assert stub.Infer(request("fast", 4), timeout=5).HasField("text")

        # Streams held by a client process that is then killed: the slots come back.
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time, grpc
            sys.path[:0] = [{str(REPO)!r}]
            from rt2_ros.backends.proto import load
            pb, pb_grpc = load()
            stub = pb_grpc.PolicyStub(grpc.insecure_channel({server.target!r}))
            def idle():
                while True:
                    time.sleep(60)
                    yield pb.Observation()
            calls = [stub.InferStream(idle()) for _ in range(2)]
            time.sleep(0.5)
            print("holding", flush=True)
            time.sleep(120)
            """)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(grpc.RpcError) as held:
            stub.Infer(request("fast", 5), timeout=5)
        assert held.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        t_kill = time.monotonic()
        while True:
            try:
                stub.Infer(request("fast", 6), timeout=5)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() - t_kill < 5.0, "the killed client's slots were not freed within 5 s"
                time.sleep(0.05)
        print(f"slots freed {time.monotonic() - t_kill:.3f} s after the client was killed")
    finally:
        channel.close()
        assert server.stop() == 0, server.log()
    assert "refused (per-client limit)" in server.log_path.read_text()


def token_server(tmp_path: Path, certs: dict[str, Path], name: str, *flags: str):
    """An rt2-serve with TLS and the token "the-right-token", and a TLS channel to it (no token)."""
    token = tmp_path / "token"
    token.write_text("the-right-token\n")
    token.chmod(0o600)
    server = Server(tmp_path, "--backend-class", ECHO, "--params", str(write_params(tmp_path / "p.yaml")),
                    "--tls-cert", str(certs["server.crt"]), "--tls-key", str(certs["server.key"]),
                    "--token-file", str(token), *flags, name=name)
    creds = grpc.ssl_channel_credentials(root_certificates=certs["ca.crt"].read_bytes())
    channel = grpc.secure_channel(f"localhost:{server.port}", creds)
    return server, channel, pb_grpc.PolicyStub(channel)


def test_a_flood_of_bad_tokens_is_counted_and_logged_at_a_bounded_rate(tmp_path, certs):
    # --workers 16: gRPC's concurrent-RPC cap (= --workers) counts a refused call for a moment after the
    # caller has its answer, so 8 callers at --workers 8 sometimes got RESOURCE_EXHAUSTED instead
    server, channel, stub = token_server(tmp_path, certs, "flood", "--workers", "16")
    n = 1000
    try:
        def bad(i: int) -> grpc.StatusCode:
            try:
                stub.Infer(request("fast", i), timeout=5, metadata=(("authorization", "Bearer wrong"),))
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        t0 = time.monotonic()
        with futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(bad, range(n)))
        wall = time.monotonic() - t0
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        ok = stub.Infer(request("fast", n + 1), timeout=5, metadata=(("authorization", "Bearer the-right-token"),))
        assert ok.HasField("text")  # the flood did not lock out the right client
    finally:
        channel.close()
        assert server.stop() == 0, server.log()
    log = server.log_path.read_text()
    lines = [line for line in log.splitlines() if "refused /rt2_ros.policy" in line]
    # the first refusal, then at most one line per 10 s (the flood took `wall` seconds)
    assert 1 <= len(lines) <= 1 + int(wall // 10) + 1, (len(lines), wall)
    assert "invalid bearer token" in lines[0] and "wrong" not in log
    assert f"{n} refused (auth)" in log, log[-2000:]
    print(f"{n} bad-token calls in {wall:.2f} s -> {len(lines)} log line(s)")


def test_the_token_is_checked_before_a_client_slot_is_taken(tmp_path, certs):
    """Unauthenticated calls never occupy the slots of the client they come from."""
    server, channel, stub = token_server(tmp_path, certs, "order", "--max-calls-per-client", "1")
    good = (("authorization", "Bearer the-right-token"),)
    try:
        slow = stub.Infer.future(request("sleep:1.0"), timeout=10, metadata=good)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Infer(request("fast"), timeout=5, metadata=(("authorization", "Bearer wrong"),))
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED  # not RESOURCE_EXHAUSTED
        assert slow.result().HasField("text")
    finally:
        channel.close()
        assert server.stop() == 0, server.log()

