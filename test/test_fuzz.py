"""Short coverage-guided fuzzing of every parser of outside bytes, in ``make test`` (issue 12, part 5).

Each target of :mod:`test.fuzz_targets` runs for a few seconds under atheris/libFuzzer in its own
process (two at a time on this 2-core machine); a crash, hang or memory blow-up fails the test with
the reproducer and the traceback. The long run is ``tools/fuzz.py`` (bench/results/fuzz.md). The
inputs that fuzzing found crashing are kept below as plain regression tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import msgpack
import pytest

pytest.importorskip("atheris", reason="atheris is in requirements.txt; run make setup")

from test.fuzz_targets import REPO, TARGETS, run

SECONDS = 3
# A target that ran at all tries thousands of inputs in 3 s; fewer means it did not really run.
MIN_INPUTS = 200


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("fuzz")
    with futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(TARGETS, pool.map(lambda t: run(t, SECONDS, work), TARGETS), strict=True))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzzing_finds_no_crash(results, target):
    r = results[target]
    trace = r.output[r.output.find("Traceback"):][:3000] if "Traceback" in r.output else r.output[-3000:]
    assert r.ok, f"{target} ({TARGETS[target].parses}): exit {r.returncode}, reproducer {r.crash}\n{trace}"
    assert r.inputs >= MIN_INPUTS and r.coverage > 0, (r.inputs, r.coverage, r.output[-2000:])
    print(f"{target}: {r.inputs} inputs, cov {r.coverage}, ft {r.features}, {r.seconds:.1f} s")


# -- what fuzzing found (fixed), kept as regression tests --------------------------------------------------
FOUND = {
    # numpy parses a dtype string like "<,8" with ast: SyntaxError escaped the msgpack-numpy decoder
    "openpi_reply": msgpack.packb({"actions": {b"__ndarray__": True, b"data": bytes(168), b"dtype": "<,8",
                                               b"shape": [3, 7]}}),
    # openpi_client's msgpack_numpy: np.ndarray(buffer, dtype "0f8", shape -1) kills the process (SIGFPE)
    "openpi_reply-sigfpe": msgpack.packb({"actions": {b"__ndarray__": True, b"data": bytes(168), b"dtype": "0f8",
                                                      b"shape": -1}}),
    # the same through json-numpy
    "openvla_reply": b'{"action": {"__numpy__": "exSuR+F6hD97FK5H4XqEP3sUrkfkfheoQ/exSuR+F6hD97FK5H4XqEPw==", '
                     b'"dtype": ",1,0,0<f8", "shape": [2, 7]}}',
    # a params file that is not UTF-8: UnicodeDecodeError instead of ParamsFileError / ConfigError
    "params_yaml": b"rt2_policy:\n  ros__parameters:\n    backend: {type: embedded}\n# \xb3\n",
    # a mapping as a key: TypeError (unhashable) from the params loader instead of ParamsFileError
    "params_yaml-mapping-key": b"rt2_policy:\n  ros__parameters:\n    ? {a: 1}\n    : 3\n",
}


@pytest.fixture(scope="module")
def found_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each found input through its target in a child process (one of them used to kill the process)."""
    work = tmp_path_factory.mktemp("found")

    def one(case: str) -> subprocess.CompletedProcess:
        path = work / case
        path.write_bytes(FOUND[case])
        return subprocess.run([sys.executable, "-m", "test.fuzz_targets", case.split("-")[0], str(path)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))

    with futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(FOUND, pool.map(one, FOUND), strict=True))


@pytest.mark.parametrize("case", sorted(FOUND))
def test_inputs_fuzzing_found_are_handled(found_runs, case):
    out = found_runs[case]
    assert out.returncode == 0, out.stderr[-3000:]


def test_an_mcap_naming_a_non_ros_type_is_a_read_error(tmp_path: Path):
    import io

    from mcap.writer import Writer

    from rt2_ros.recording import RecordingReadError, read_topics

    out = io.BytesIO()
    w = Writer(out)
    w.start(profile="ros2", library="test")
    schema = w.register_schema(name="std_msm/gssg/Bool", encoding="ros2msg", data=b"bool data")
    w.register_channel(topic="/estop", message_encoding="cdr", schema_id=schema)
    w.finish()
    path = tmp_path / "bad.mcap"
    path.write_bytes(out.getvalue())
    with pytest.raises(RecordingReadError, match="not a ROS 2 message type name"):
        read_topics(path)
