"""The command-line tools as a user meets them: signals, waiting, and the messages of their rough edges.

``rt2-say --wait`` and ``rt2-status`` run in their own processes, as a user starts them, against
an ``rt2-bringup`` stack (scripted backend) on the test's private ROS domain; SIGINT (Ctrl-C) and
SIGTERM must end them with the intended exit code (130 for rt2-say, which cancels its goal; 0 for
rt2-status) and never with rclpy's ``ExternalShutdownException`` traceback.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from rt2_ros.nodes.common import LATCHED_QOS  # noqa: E402
from rt2_ros_interfaces.msg import SafetyStatus  # noqa: E402
from test.ros_helpers import REPO, Probe, isolate_ros_domain, start_bringup, stop, uid, write_params  # noqa: E402

MOVE_X = "0 132 128 128 128 128 128 0"  # small +x steps, gripper open (rt2 profile); repeated: never ends


class Cli:
    """A tool in its own process, its stdout and stderr lines collected as they come."""

    def __init__(self, module: str, *args: str, env: dict | None = None) -> None:
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.out: list[str] = []
        self.err: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, text=True,
                                     env=dict(env or os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            (self.out if name == "out" else self.err).append(line)
            self.lines.put((name, line))

    def wait_line(self, text: str, timeout: float) -> str:
        """Until a line containing ``text`` (stdout or stderr) arrived; AssertionError with the output if not."""
        deadline = time.monotonic() + timeout
        seen = [line for line in self.out + self.err if text in line]
        while not seen:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                raise AssertionError(f"no line with {text!r} (exit {self.proc.poll()}):\n{self.text}")
            try:
                _, line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if text in line:
                seen.append(line)
        return seen[0]

    def signal(self, sig: int, timeout: float = 15.0) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running {timeout} s after {signal.Signals(sig).name}:\n{self.text}") from None
        for reader in self.readers:  # the pipes' last lines (a fixed sleep missed them under load)
            reader.join(5.0)
        return code

    @property
    def text(self) -> str:
        return "--- stdout\n" + "".join(self.out) + "--- stderr\n" + "".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """rt2-bringup (scripted backend, a never-ending +x script) with the probe playing camera and arm."""
    isolate_ros_domain()
    probe = Probe("rt2_cli_test_probe")
    probe.record(SafetyStatus, "/rt2_safety/status", LATCHED_QOS, "status")
    probe.publish_fake_sensors()
    tmp = tmp_path_factory.mktemp("cli")
    params = write_params(tmp / "params.yaml", policy={
        "backend.type": "scripted", "backend.scripted.answers": [MOVE_X], "backend.scripted.repeat": True,
        "policy.execute_rate_hz": 10.0}, safety={"safety.watchdog_timeout_s": 1.0})
    baselines, t0 = probe.match_baselines("both"), time.monotonic()
    proc = start_bringup(params, log=tmp / "bringup.log")
    try:
        probe.wait_started(proc, "both", baselines, t0, tmp / "bringup.log")
        yield probe
    finally:
        stop(proc)
        probe.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rt2_say_wait_cancels_its_goal_on_a_signal_and_exits_130(stack, sig):
    say = Cli("rt2_ros.nodes.say", "push the block", "--wait", "--timeout", "60")
    try:
        say.wait_line("rt2-say: executing 'push the block'", 30.0)
        # The goal runs: the safety node executes its episode (feedback lines follow).
        stack.wait_for(lambda: (s := stack.latest("status")) is not None and s.instruction == "push the block"
                       and s.state_name in ("RUNNING", "HOLDING"), 15.0, "the episode of the goal to run")
        episode = uid(stack.latest("status").episode_id)
        code = say.signal(sig)
    finally:
        say.kill()
    assert code == 130, say.text
    assert "Traceback" not in say.text and "ExternalShutdownException" not in say.text, say.text
    assert "rt2-say: cancelled" in "".join(say.err), say.text
    # The goal was cancelled, not left running: the safety node leaves the episode (the arm holds).
    stack.wait_for(lambda: (s := stack.latest("status")) is not None
                   and (uid(s.episode_id) != episode or s.state_name not in ("RUNNING", "HOLDING")),
                   10.0, "the cancelled episode to end")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rt2_status_live_exits_0_on_a_signal(stack, sig):
    status = Cli("rt2_ros.nodes.status", "--period", "0.2")
    try:
        status.wait_line("safety=", 20.0)  # live: a line per period
        status.wait_line("safety=", 5.0)
        code = status.signal(sig)
    finally:
        status.kill()
    assert code == 0, status.text
    assert "Traceback" not in status.text and "ExternalShutdownException" not in status.text, status.text


def test_rt2_say_says_early_that_it_waits_and_ctrl_c_exits_130():
    # No server on this action name: after two seconds rt2-say says what it waits for (it used
    # to be silent for the whole --connect-timeout), and Ctrl-C while waiting is still exit 130.
    isolate_ros_domain()
    say = Cli("rt2_ros.nodes.say", "anyone?", "--wait", "--action", "/rt2_cli_test_nobody/execute_instruction",
              "--connect-timeout", "30")
    try:
        t0 = time.monotonic()
        say.wait_line("rt2-say: waiting for the ExecuteInstruction server /rt2_cli_test_nobody/execute_instruction "
                      "(up to 30 s)", 10.0)
        assert time.monotonic() - t0 < 5.0
        code = say.signal(signal.SIGINT)
    finally:
        say.kill()
    assert code == 130 and "Traceback" not in say.text, say.text
    # The topic path says so too, then gives up with the reason.
    said = subprocess.run([sys.executable, "-m", "rt2_ros.nodes.say", "anyone?", "--topic", "/rt2_cli_test_nobody",
                           "--connect-timeout", "3"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=30)
    assert said.returncode == 1
    assert said.stderr.splitlines()[0].startswith("rt2-say: waiting for the policy node to subscribe to "
                                                  "/rt2_cli_test_nobody (up to 3 s)")
    assert "nobody subscribes to /rt2_cli_test_nobody after 3 s" in said.stderr


def test_rt2_status_once_without_nodes_says_why():
    # A domain no test stack uses: no safety node there.
    domain = (isolate_ros_domain() + 37) % 100 + 1
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "rt2_ros.nodes.status", "--once", "--wait", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stdout.strip() == "safety=? rate=0.0Hz"
    assert out.stderr.strip() == (f"rt2-status: no /rt2_safety/status within 1 s; is rt2-bringup (or the launch file) "
                                  f"running, on this ROS_DOMAIN_ID ({domain})?")


def _record(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rt2_ros.nodes.record", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_rt2_record_out_under_a_file_says_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    out = _record("--out", str(tmp_path / "file" / "a.mcap"), "--duration", "1")
    assert out.returncode == 2
    assert out.stderr.strip().endswith(f"cannot write {tmp_path}/file/a.mcap: {tmp_path}/file is a file, "
                                       "not a directory"), out.stderr
    assert "File exists" not in out.stderr


def test_rt2_record_says_whose_parameters_the_file_lacks(tmp_path):
    isolate_ros_domain()
    path = tmp_path / "ghost.mcap"
    out = _record("--out", str(path), "--duration", "1", "--topics", "/instruction", "--param-nodes", "rt2_ghost")
    assert out.returncode == 0, out.stderr
    assert "rt2-record: warning: no parameters of rt2_ghost in" in out.stderr
    from rt2_ros.recording import META_RUN, read_metadata

    run = read_metadata(path)[META_RUN]
    assert json.loads(run["params_from"]) == [] and json.loads(run["params_missing"]) == ["rt2_ghost"]


def test_python_m_rt2_ros_params_prints_the_tables():
    out = subprocess.run([sys.executable, "-m", "rt2_ros.params"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0
    assert out.stdout == (Path(REPO) / "docs" / "parameters.md").read_text()
