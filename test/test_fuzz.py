"""Short coverage-guided fuzzing of every parser of outside bytes, in ``make test`` (issue 12, part 5).

Each target of :mod:`test.fuzz_targets` runs for a few seconds under atheris/libFuzzer in its own
process (two at a time on this 2-core machine); a crash, hang or memory blow-up fails the test with
the reproducer and the traceback. The long run is ``tools/fuzz.py`` (bench/results/fuzz.md). The
inputs that fuzzing found crashing are kept below as regression tests, followed by hypothesis properties over structured
inputs that byte-level fuzzing rarely builds (continuous rows at the range edges, number answers
against the constrained-decoding grammar).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import msgpack
import pytest

pytest.importorskip("atheris", reason="atheris is in requirements.txt; run make setup")

from test.fuzz_targets import _GRAMMAR_SURFACES, REPO, TARGETS, run

SECONDS = 3
# A target that ran at all tries hundreds of inputs in 3 s (mcap_replay, a whole replay per input: 250-400
# on the shared 2-core machine; the others thousands); fewer means it did not really run.
MIN_INPUTS = 100


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


# -- found by fuzzing, fixed: regression tests ----------------------------------------------------------------
def test_decode_image_of_no_bytes_is_an_image_error():
    from rt2_ros.imaging import ImageEncodeError, decode_image

    try:
        decode_image(b"")
    except ImageEncodeError:
        return
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__}: {exc}") from None


# A 631-byte JPEG whose header declares 10000x10000 pixels. rt2-serve decodes it completely before the
# --max-pixels check: ~0.6 GB and 1.5 s for this one (20000x20000: 2.4 GB, 5 s; 30000x30000: 5.2 GB, 10 s,
# measured), so one small request can take the server's memory. The child measures its own peak RSS.
_BOMB = """
import resource, sys
import numpy as np
from rt2_ros.actions import Observation
from rt2_ros.backends.grpc_client import observation_to_proto
from rt2_ros.serve import observation_from_proto
frame = np.full((8, 8, 3), 100, np.uint8)
msg = observation_to_proto(Observation(image=frame, instruction="pick", seq=1, stamp=1.0), "jpeg")
jpeg = bytearray(msg.images[0].image.data)
sof = jpeg.find(b"\\xff\\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
jpeg[sof + 5:sof + 9] = (10000).to_bytes(2, "big") * 2
msg.images[0].image.data = bytes(jpeg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    observation_from_proto(msg, 64 * 64)
    sys.exit("accepted")
except ValueError as exc:
    print(exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_small_jpeg_declaring_huge_dimensions_is_refused_before_decoding():
    out = subprocess.run([sys.executable, "-c", _BOMB], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr[-2000:]
    message, grown_mb = out.stdout.strip().splitlines()[-2:]
    assert "exceeds the server limit" in message, message
    # decoding 10000x10000 RGB needs 300 MB for the pixels alone; refusing from the header needs none
    assert int(grown_mb) < 100, f"refusing the 631-byte image grew the process by {grown_mb} MB"


# -- properties over structured inputs, where byte-level fuzzing rarely lands (hypothesis) ----------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rt2_ros.token_profiles import PROFILES  # noqa: E402

_PROFILE_NAMES = sorted(PROFILES)
_edge_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0),
                         st.sampled_from([-1.0, 1.0, -1.0000001, 1.0000001, 1.5707963, -1.5707964, 0.0]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(_PROFILE_NAMES), values=st.lists(_edge_floats, min_size=0, max_size=9))
def test_a_continuous_row_outside_the_ranges_gives_no_action(profile, values):
    """decode_continuous never clips a bad row into an action: wrong length, NaN/inf or out of range raise."""
    import math

    from rt2_ros.tokens import ActionTokenizer, TokenError

    tok = ActionTokenizer.from_profile(profile)
    valid = len(values) == 7 and all(math.isfinite(v) and lo <= v <= hi for v, lo, hi
                                     in zip(values, tok.continuous_low, tok.continuous_high, strict=False))
    try:
        action = tok.decode_continuous(values)
    except TokenError:
        assert not valid, f"{profile}: a valid row {values} was refused"
        return
    assert valid, f"{profile}: the invalid row {values} became an action {action}"
    assert action.is_finite() and not tok.out_of_range(action), (values, action, tok.out_of_range(action))


@functools.cache
def _text_grammar(profile: str):
    from rt2_ros.constrained import text_grammar
    from rt2_ros.tokens import ActionTokenizer

    tok = ActionTokenizer.from_profile(profile)
    return tok, text_grammar(tok, _GRAMMAR_SURFACES)


_near_bins = st.one_of(st.integers(0, 255), st.sampled_from([-1, 0, 1, 2, 3, 254, 255, 256, 1000, 10**12]))
# 7 or 8 bins, the first 0 or 1 (continue / terminate of the RT profiles): valid answers of each profile
_mostly_valid = st.lists(st.integers(0, 255), min_size=7, max_size=8).map(lambda b: [b[0] % 2, *b[1:]])
_separators = st.lists(st.sampled_from([" ", "  ", "\t", "\n", ", "]), min_size=10, max_size=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=st.sampled_from(_PROFILE_NAMES),
       numbers=st.one_of(st.lists(_near_bins, max_size=10), _mostly_valid),
       zero_pad=st.booleans(), seps=st.one_of(st.just([" "] * 10), _separators))
def test_grammar_and_tokenizer_agree_on_number_answers(profile, numbers, zero_pad, seps):
    """The text grammar (local backend) accepts an answer only if the policy node's parser does; and it
    accepts every canonical answer the parser accepts (else constrained decoding could not say it)."""
    from rt2_ros.tokens import TokenError

    tok, grammar = _text_grammar(profile)
    by_surface = {s: i for i, s in sorted(_GRAMMAR_SURFACES.items(), reverse=True)}
    words = [f"0{n}" if zero_pad and n >= 0 else str(n) for n in numbers]
    text = "".join(w + s for w, s in zip(words, seps, strict=False)).rstrip()
    try:
        parsed_ok = list(tok.parse_text(text).bins) == numbers
    except TokenError:
        parsed_ok = False
    # spell the text with single-character tokens where the toy vocabulary has them
    ids = [by_surface.get(ch) for ch in text]
    accepted = None not in ids and (state := grammar.walk(ids)) is not None and grammar.accepts(state)
    if accepted:
        assert parsed_ok, f"{profile}: the grammar accepts {text!r}, the tokenizer does not"
    canonical = " ".join(map(str, numbers))
    if parsed_ok and text == canonical:
        assert accepted, f"{profile}: the grammar cannot spell the valid answer {text!r}"


def test_a_recording_whose_schema_lacks_a_field_is_a_read_error(tmp_path: Path):
    from rt2_ros.recording import RecordingReadError, replay
    from test.fuzz_targets import _mcap_seeds

    real = _mcap_seeds()[-1]  # a real recording, uncompressed
    assert b"Quaternion orientation" in real  # geometry_msgs/Pose in the /ee_pose schema
    path = tmp_path / "renamed-field.mcap"
    path.write_bytes(real.replace(b"Quaternion orientation", b"Quaternion orientatioz"))  # same length: still valid
    with pytest.raises(RecordingReadError, match="/ee_pose"):
        replay(path)


def test_a_recording_whose_log_time_jumps_replays_in_bounded_time(tmp_path: Path):
    # Found by fuzzing (mcap_replay timeout): a damaged log time 10^9 s after the rest made rt2-replay tick
    # the safety filter at 30 Hz through the whole gap (~3*10^10 ticks); it now skips a settled gap.
    from rt2_ros.recording import replay
    from test.fuzz_targets import _uncompressed
    from test.test_recording import make_episode

    real = tmp_path / "episode.mcap"
    make_episode(real, ["0 128 128 128 128 128 128 255", "0 140 128 128 128 128 128 255"])
    path = tmp_path / "jump.mcap"
    path.write_bytes(_uncompressed(real, keep_every_pose=1, last_jump_ns=10**18))
    t0 = time.monotonic()
    result = replay(path)
    assert time.monotonic() - t0 < 5.0
    assert result is not None
