"""Episode recording (MCAP) and rt2-replay.

Writer units use real rclpy messages and read the file back with the ``mcap`` reader and the
``mcap_ros2`` decoder (what Foxglove-style tools do: decode from the schema text stored in the
file), so a broken schema or serialization shows up as a failed round trip. Replay runs on
synthetic recordings built from tokenizer output, with expectations computed from the inputs.
The DDS test runs ``rt2-record`` in its own process on an isolated domain.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

rclpy = pytest.importorskip("rclpy")

from geometry_msgs.msg import PoseStamped  # noqa: E402
from mcap.reader import make_reader  # noqa: E402
from mcap_ros2.decoder import DecoderFactory  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from rt2_ros import recording  # noqa: E402
from rt2_ros.episode import short_id  # noqa: E402
from rt2_ros.nodes.common import uuid_msg  # noqa: E402
from rt2_ros.recording import (  # noqa: E402
    DEFAULT_TOPICS,
    EpisodeRecorder,
    RecordingError,
    RecordingReadError,
    import_message_type,
    iter_messages,
    message_definition,
    read_metadata,
    read_topics,
    recorded_params,
    replay,
    replay_main,
)
from rt2_ros.tokens import ActionTokenizer  # noqa: E402
from rt2_ros_interfaces.msg import ActionTokens, ArmAction, Episode, SafetyStatus  # noqa: E402
from test.ros_helpers import REPO, Probe, isolate_ros_domain, stop  # noqa: E402

# -- random messages of any type --------------------------------------------------------------------
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-2**15, 2**15 - 1), "uint16": (0, 2**16 - 1),
               "int32": (-2**31, 2**31 - 1), "uint32": (0, 2**32 - 1), "int64": (-2**63, 2**63 - 1),
               "uint64": (0, 2**64 - 1), "octet": (0, 255), "char": (0, 255)}


def _value(type_text: str, rng: np.random.Generator, depth: int = 0):
    seq = re.match(r"^sequence<(.+?)(?:, (\d+))?>$", type_text)
    if seq:
        n = int(rng.integers(0, 4))
        if seq.group(1) in ("uint8", "octet"):
            return bytes(int(b) for b in rng.integers(0, 256, size=n))
        return [_value(seq.group(1), rng, depth + 1) for _ in range(n)]
    fixed = re.match(r"^(.+)\[(\d+)\]$", type_text)  # e.g. uint8[16], the bytes of a UUID
    if fixed:
        return [_value(fixed.group(1), rng, depth + 1) for _ in range(int(fixed.group(2)))]
    if type_text in _INT_RANGES:
        lo, hi = _INT_RANGES[type_text]
        return [lo, hi, 0, int(rng.integers(max(lo, -1000), min(hi, 1000) + 1))][int(rng.integers(0, 4))]
    if type_text == "boolean":
        return bool(rng.integers(0, 2))
    if type_text in ("double", "float"):
        big = 1e300 if type_text == "double" else 3e38
        v = [0.0, -1.5, big, math.nan, float(rng.normal())][int(rng.integers(0, 5))]
        return float(np.float32(v)) if type_text == "float" else v
    if type_text == "string":
        return "".join(rng.choice(list("abc XYZ09_é:/")) for _ in range(int(rng.integers(0, 12))))
    return _filled(import_message_type(type_text), rng, depth + 1)


def _filled(cls, rng: np.random.Generator, depth: int = 0):
    msg = cls()
    for name, type_text in cls.get_fields_and_field_types().items():
        setattr(msg, name, _value(type_text, rng, depth))
    return msg


def _same(original, decoded, where: str = "msg") -> None:
    """Field-by-field equality of an rclpy message and an mcap_ros2 decoded one."""
    if hasattr(original, "get_fields_and_field_types"):
        for name in original.get_fields_and_field_types():
            _same(getattr(original, name), getattr(decoded, name), f"{where}.{name}")
        return
    if isinstance(original, (bytes, bytearray)) or type(original).__name__ == "array" or (
            isinstance(original, np.ndarray)):
        original, decoded = list(original), list(decoded)
    if isinstance(original, list):
        assert len(original) == len(decoded), where
        for i, (a, b) in enumerate(zip(original, decoded, strict=True)):
            _same(a, b, f"{where}[{i}]")
        return
    if isinstance(original, float) and math.isnan(original):
        assert math.isnan(decoded), where
        return
    assert original == decoded, f"{where}: {original!r} != {decoded!r}"


def _read_all(path: Path):
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        header = reader.get_header()
        summary = reader.get_summary()
        messages = [(schema, channel, message, decoded)
                    for schema, channel, message, decoded in reader.iter_decoded_messages()]
    return header, summary, messages


# -- writer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topic", sorted(DEFAULT_TOPICS))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_default_type_round_trips(topic, seed):
    rng = np.random.default_rng(seed)
    type_name = DEFAULT_TOPICS[topic]
    originals = [_filled(import_message_type(type_name), rng) for _ in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.mcap"
        with EpisodeRecorder(path, {topic: type_name}) as rec:
            for i, msg in enumerate(originals):
                assert rec.write(topic, msg, log_time_ns=1_000 + i)
        header, _, messages = _read_all(path)
    assert header.profile == "ros2"
    assert [m[2].log_time for m in messages] == [1_000, 1_001, 1_002]
    for (schema, channel, _, decoded), original in zip(messages, originals, strict=True):
        assert (schema.name, schema.encoding, channel.message_encoding) == (type_name, "ros2msg", "cdr")
        assert channel.topic == topic
        _same(original, decoded)


@pytest.mark.parametrize("type_name", sorted(set(DEFAULT_TOPICS.values())))
def test_definition_lists_every_dependency_once(type_name):
    text = message_definition(type_name)
    blocks = text.split("\n" + "=" * 80 + "\n")
    names = [re.match(r"MSG: (\S+)\n", b).group(1) for b in blocks[1:]]
    assert len(names) == len(set(names)), "a dependency is repeated"
    pkg, _, name = type_name.split("/")
    own = (Path(sys.prefix) / "share" / pkg / "msg" / f"{name}.msg").read_text()
    assert blocks[0] == own, "the schema must start with the type's own .msg text"
    # Every non-primitive field type of every block has its own block.
    defined = {f"{pkg}/{name}", *names}
    for block, block_name in zip(blocks, [f"{pkg}/{name}", *names], strict=True):
        for dep in recording._msg_dependencies(block.split("\n", 1)[1] if block.startswith("MSG:") else block,
                                               block_name.split("/")[0]):
            assert dep in defined, f"{block_name} uses {dep}, which has no MSG block"


@pytest.mark.parametrize("type_name", ["sensor_msgs/msg/Image", "rt2_ros_interfaces/msg/SafetyStatus",
                                       "rt2_ros_interfaces/msg/ActionTokens", "rt2_ros_interfaces/msg/Episode",
                                       "visualization_msgs/msg/MarkerArray"])
def test_definition_without_msg_files_is_rebuilt_from_the_class(type_name, monkeypatch):
    from mcap_ros2._dynamic import generate_dynamic
    from rclpy.serialization import serialize_message

    monkeypatch.setattr(recording, "_find_interface_file", lambda *a, **k: None)
    text = message_definition(type_name)
    assert "#" not in text  # comments cannot come from the class: proves the fallback ran
    original = _filled(import_message_type(type_name), np.random.default_rng(7))
    decoded = generate_dynamic(type_name, text)[type_name](serialize_message(original))
    _same(original, decoded)


def test_channels_carry_qos_and_type_hash(tmp_path):
    path = tmp_path / "qos.mcap"
    with EpisodeRecorder(path, DEFAULT_TOPICS):
        pass
    _, summary, _ = _read_all(path)
    by_topic = {c.topic: c for c in summary.channels.values()}
    assert set(by_topic) == set(DEFAULT_TOPICS)
    for topic, channel in by_topic.items():
        (profile,) = yaml.safe_load(channel.metadata["offered_qos_profiles"])
        spec = recording.QOS_KINDS[recording.DEFAULT_QOS.get(topic, "default")]
        assert (profile["history"], profile["depth"], profile["reliability"], profile["durability"]) == (
            spec.history, spec.depth, spec.reliability, spec.durability)
        assert channel.metadata["topic_type_hash"].startswith("RIHS01_")


def test_qos_kinds_match_the_nodes():
    from rclpy.qos import qos_profile_sensor_data

    from rt2_ros.nodes.common import ACTION_QOS, COMMAND_QOS, EVENT_QOS, LATCHED_QOS

    for kind, profile in {"latched": LATCHED_QOS, "action": ACTION_QOS, "command": COMMAND_QOS,
                          "event": EVENT_QOS, "sensor_data": qos_profile_sensor_data}.items():
        spec = recording.QOS_KINDS[kind]
        assert (spec.history, spec.depth, spec.reliability, spec.durability) == (
            int(profile.history), profile.depth, int(profile.reliability), int(profile.durability)), kind


def test_pose_age_bound_is_safety_max_pose_age_s():
    # ee_pose_timeout_s is gone: the pose age bound is safety.max_pose_age_s, a SafetyConfig key the
    # safety node declares, and the replay takes it from the SafetyConfig it builds (no copy of the default).
    from rt2_ros.nodes.safety_node import OUTPUT_PARAMS
    from rt2_ros.safety import SAFETY_PARAMS, SafetyConfig

    assert "ee_pose_timeout_s" not in {s.name for s in (*SAFETY_PARAMS, *OUTPUT_PARAMS)}
    assert "safety.max_pose_age_s" in {s.name for s in SAFETY_PARAMS}
    assert not hasattr(recording, "EE_POSE_TIMEOUT_DEFAULT_S")
    assert recording.REPLAY_KEYS["rt2_safety"] == "safety.*"
    for age in (0.1, SafetyConfig.from_params().max_pose_age_s):
        for delay, starts in ((age * 0.9, True), (age * 1.1, False)):
            sim = recording._SafetyReplay(SafetyConfig.from_params({"safety.max_pose_age_s": age}))
            sim.on_pose(0.0, (0.5, 0.0, 0.3), (1.0, 0.0, 0.0, 0.0), pose_time=0.0)
            sim.on_episode(delay, bytes(16 * [1]), True)
            assert (sim.filter.counters["faults"] == 0) == starts, (age, delay)


def test_metadata_params_and_instruction(tmp_path):
    params = {"tokenizer.profile": "rt1", "tokenizer.low": [-1.0, -2.0], "safety.watchdog_timeout_s": 0.7,
              "output.twist": True, "backend.openai.api_key_env": "VLLM_API_KEY", "backend.x.api_key": "s3cret",
              "tokenizer.token_ids": [], "unset": None}
    path = tmp_path / "meta.mcap"
    with EpisodeRecorder(path, {"/instruction": String}, params=params, instruction="pick the cube") as rec:
        rec.add_metadata("rt2_ros", {"instruction": "place it"})  # a later record wins
    meta = read_metadata(path)
    assert meta["rt2_ros"]["instruction"] == "place it"
    assert meta["rt2_ros"]["recorder"] == "EpisodeRecorder"
    expected = {k: v for k, v in params.items() if k not in ("backend.x.api_key", "unset")}
    assert recorded_params(path) == expected


@pytest.mark.parametrize("camera_hz, limit_hz", [(10.0, 2.0), (30.0, 5.0), (10.0, 10.0), (10.0, 0.0), (5.0, 20.0)])
def test_rate_limit_keeps_the_requested_rate(tmp_path, camera_hz, limit_hz):
    path = tmp_path / "rate.mcap"
    n, period_ns = 60, int(1e9 / camera_hz)
    jitter = np.random.default_rng(1).integers(-period_ns // 20, period_ns // 20, size=n)
    times = [k * period_ns + int(j) + 10**9 for k, j in enumerate(jitter)]
    frame = _filled(import_message_type("sensor_msgs/msg/Image"), np.random.default_rng(0))
    with EpisodeRecorder(path, {"/camera/image": "sensor_msgs/msg/Image"},
                         rate_limits_hz={"/camera/image": limit_hz}) as rec:
        kept = [t for t in times if rec.write("/camera/image", frame, t)]
        assert rec.skipped.get("/camera/image", 0) == n - len(kept)
    assert [m.log_time_ns for m in iter_messages(path)] == kept
    if limit_hz <= 0 or limit_hz >= camera_hz:
        assert kept == times
    else:
        span_s = (kept[-1] - kept[0]) * 1e-9
        assert np.diff(kept).min() * 1e-9 >= 0.75 / limit_hz
        assert span_s * limit_hz * 0.9 <= len(kept) - 1 <= span_s * limit_hz + 1


def test_bad_use_raises_clear_errors(tmp_path):
    with pytest.raises(RecordingError, match="absolute"):
        EpisodeRecorder(tmp_path / "a.mcap", {"camera/image": "sensor_msgs/msg/Image"})
    with pytest.raises(RecordingError, match="not installed"):
        EpisodeRecorder(tmp_path / "b.mcap", {"/x": "no_such_msgs/msg/Thing"})
    assert not (tmp_path / "b.mcap").exists(), "a failed start must not leave a half-made file"
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(RecordingError, match=r"file.txt is a file, not a directory"):  # not "File exists"
        EpisodeRecorder(tmp_path / "file.txt" / "c.mcap", {"/instruction": String})
    with pytest.raises(RecordingError, match=r"file.txt is a file, not a directory"):
        EpisodeRecorder(tmp_path / "file.txt" / "deeper" / "c.mcap", {"/instruction": String})
    rec = EpisodeRecorder(tmp_path / "d.mcap", {"/instruction": String})
    with pytest.raises(RecordingError, match="not recorded"):
        rec.write("/other", String(data="x"))
    with pytest.raises(RecordingError, match="records std_msgs/msg/String, got a geometry_msgs/msg/PoseStamped"):
        rec.write("/instruction", PoseStamped())
    rec.close()
    rec.close()  # idempotent
    with pytest.raises(RecordingError, match="closed"):
        rec.write("/instruction", String(data="late"))
    assert [m.message.data for m in iter_messages(tmp_path / "d.mcap")] == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_is_a_recording_error():
    rec = EpisodeRecorder("/dev/full", {"/instruction": String}, flush_period_s=0.0)
    with pytest.raises(RecordingError, match="cannot write /dev/full: No space left"):
        rec.write("/instruction", String(data="x" * 10_000))
    with pytest.raises(RecordingError, match="cannot finalise /dev/full"):
        rec.close()
    assert rec.closed and Path("/dev/full").exists()


def test_killed_recorder_leaves_readable_messages(tmp_path):
    path = tmp_path / "killed.mcap"
    rec = EpisodeRecorder(path, {"/instruction": String}, flush_period_s=0.0)
    for i in range(5):
        rec.write("/instruction", String(data=f"m{i}"), 1000 + i)
    # No close(): the process "died" here. Copy what is on disk now.
    snapshot = tmp_path / "snapshot.mcap"
    snapshot.write_bytes(path.read_bytes())
    rec.close()
    problems: list[str] = []
    assert [m.message.data for m in iter_messages(snapshot, truncated=problems)] == [f"m{i}" for i in range(5)]
    assert problems and "never finalised" in problems[0]
    with pytest.raises(RecordingReadError):
        read_topics(snapshot)


# -- replay ---------------------------------------------------------------------------------------------
T0_NS = 1_700_000_000 * 10**9
RECORDED = {"tokenizer.profile": "rt2", "safety.max_step_translation_m": 0.05, "safety.watchdog_timeout_s": 1.0}


def _stamp(msg_stamp, ns: int | None) -> None:
    """Set a builtin_interfaces/Time to ``ns`` (None: leave it zero, i.e. unset)."""
    if ns is not None:
        msg_stamp.sec, msg_stamp.nanosec = divmod(ns, 10**9)


def _pose_msg(x: float = 0.5, y: float = 0.0, z: float = 0.3, stamp_ns: int | None = None) -> PoseStamped:
    p = PoseStamped()
    _stamp(p.header.stamp, stamp_ns)
    p.pose.position.x, p.pose.position.y, p.pose.position.z = x, y, z
    p.pose.orientation.w = 1.0
    return p


EP1, EP2 = bytes(range(1, 17)), bytes(range(101, 117))  # two episode ids (UUIDs)


def _episode_msg(episode_id: bytes, active: bool = True, instruction: str = "pick up the cube",
                 reason: str = "") -> Episode:
    return Episode(episode_id=uuid_msg(episode_id), active=active, instruction=instruction, reason=reason)


def _action_msg(a, episode: bytes, observation_ns: int | None = None) -> ArmAction:
    m = ArmAction(observation_seq=a.observation_seq, episode_id=uuid_msg(episode), gripper=float(a.gripper),
                  gripper_relative=a.gripper_relative, terminate=a.terminate)
    _stamp(m.observation_stamp, observation_ns)
    m.translation.x, m.translation.y, m.translation.z = (float(v) for v in a.translation)
    m.rotation.x, m.rotation.y, m.rotation.z = (float(v) for v in a.rotation)
    return m


def make_episode(path: Path, answers: list, params: dict | None = None, *, chunk_rows: int = 0,
                 episodes: tuple = ((1, _episode_msg(EP1)),), episode_of=lambda offset_ns: EP1,
                 poses: bool = True, flush_period_s: float = 1.0, observation_lag_ns: int | None = 10**8,
                 pose_lag_ns: int | None = 0) -> list:
    """A recording as the nodes would produce it: the instruction, episode announcements
    (log time offset ns, Episode message), 50 Hz ee_pose (unless not ``poses``; header stamp
    ``pose_lag_ns`` before its log time, zero if None), one reply per 0.1 s from 0.2 s on (text
    answers; an invalid one gets no arm action; the arm action follows its reply by 50 ms,
    answers the camera frame taken ``observation_lag_ns`` before the reply (its
    observation_stamp; zero if None) and belongs to ``episode_of(its offset)``), statuses at
    both ends. Returns the recorded ArmActions."""
    params = dict(RECORDED if params is None else params)
    tok = ActionTokenizer.from_config({k: v for k, v in params.items() if k.startswith("tokenizer.")})
    duration_ns = (len(answers) + chunk_rows + 5) * 10**8
    actions = []

    def frame_ns(reply_ns: int) -> int | None:
        return None if observation_lag_ns is None else reply_ns - observation_lag_ns

    with EpisodeRecorder(path, DEFAULT_TOPICS, params=params, instruction="pick",
                         flush_period_s=flush_period_s) as rec:
        rec.write("/rt2_safety/status", SafetyStatus(actions_accepted=4), T0_NS)
        rec.write("/instruction", String(data="pick up the cube"), T0_NS)
        for offset, msg in episodes:
            rec.write("/episode", msg, T0_NS + offset)
        for t in range(T0_NS, T0_NS + duration_ns, 20 * 10**6) if poses else ():
            rec.write("/ee_pose", _pose_msg(stamp_ns=None if pose_lag_ns is None else t - pose_lag_ns), t)
        for i, answer in enumerate(answers):
            seq, t = i + 1, T0_NS + (i + 2) * 10**8
            try:
                parsed = tok.parse_text(answer)
            except ValueError:
                rec.write("/rt2_policy/action_tokens", ActionTokens(observation_seq=seq, text=answer, profile="rt2"), t)
                continue
            rec.write("/rt2_policy/action_tokens", ActionTokens(observation_seq=seq, text=answer, profile="rt2",
                                                                tokens=[int(b) for b in parsed.bins]), t)
            action = tok.decode(parsed.bins, observation_seq=seq)
            actions.append(action)
            rec.write("/arm_action", _action_msg(action, episode_of(t + 5 * 10**7 - T0_NS), frame_ns(t)),
                      t + 5 * 10**7)
        for k in range(chunk_rows):  # a continuous chunk: no tokens to re-decode
            seq, t = len(answers) + 1, T0_NS + (len(answers) + 2 + k) * 10**8
            if k == 0:
                rec.write("/rt2_policy/action_tokens", ActionTokens(observation_seq=seq, backend="openpi"), t)
            action = tok.decode_continuous([0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], observation_seq=seq)
            actions.append(action)
            rec.write("/arm_action", _action_msg(action, episode_of(t + 5 * 10**7 - T0_NS), frame_ns(t)),
                      t + 5 * 10**7)
        rec.write("/rt2_safety/status", SafetyStatus(actions_accepted=4 + len(actions)), T0_NS + duration_ns)
    return actions


BINS = st.lists(st.integers(0, 255), min_size=7, max_size=7)
ANSWERS = st.lists(st.tuples(st.sampled_from([0, 0, 0, 1]), BINS).map(lambda tb: " ".join(map(str, [tb[0], *tb[1]]))),
                   min_size=1, max_size=12)


@settings(max_examples=15, deadline=None)
@given(answers=ANSWERS, scale=st.sampled_from([0.01, 0.03, 0.05]))
def test_replay_reproduces_the_run_and_flags_a_changed_scale(answers, scale):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ep.mcap"
        actions = make_episode(path, answers)
        same = replay(path)
        changed = replay(path, candidate={**RECORDED, "tokenizer.translation_scale_m": scale})
    assert same.ok and same.mismatches == 0 and len(same.steps) == len(actions)
    assert all(s.match for s in same.steps)
    # A terminate step carries no motion; every other step with a non-zero translation must differ.
    moving = sum(1 for a in actions if not a.terminate and np.any(a.translation != 0.0))
    assert changed.mismatches == moving
    assert changed.ok == (moving == 0)
    for s in changed.steps:
        if s.match is False:
            np.testing.assert_allclose(s.redecoded.translation, s.recorded.translation * scale / 0.02, atol=1e-12)


def test_replay_main_exit_codes_and_table(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 200 128 128 128 128 128 255", "0 60 128 200 128 128 128 0", "1 128 128 128 128 128 128 0"])
    assert replay_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "instruction: 'pick up the cube'" in out
    assert re.search(r"^\s+1\s+\S+\s+1\s+0 200 128 128 128 128 128 255\s+\(\+", out, re.M)
    assert replay_main([str(path), "--set", "tokenizer.translation_scale_m=0.03"]) == 1
    out = capsys.readouterr().out
    assert "tokenizer.translation_scale_m: 0.0 -> 0.03" in out and " NO " in out and "CHANGED" in out
    assert replay_main([str(path), "--set", "tokenizer.profile=rt9"]) == 2
    assert "tokenizer.profile" in capsys.readouterr().err
    assert replay_main([str(path), "--set", "policy.execute_rate_hz=3"]) == 2


def test_replay_with_a_params_file_shows_safety_changes(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    answers = ["0 255 128 128 128 128 128 0"] * 3 + ["0 128 128 128 128 128 128 0"]
    actions = make_episode(path, answers)
    params = tmp_path / "tight.yaml"
    params.write_text(yaml.safe_dump({"rt2_policy": {"ros__parameters": {"tokenizer": {"profile": "rt2"}}},
                                      "rt2_safety": {"ros__parameters": {"safety": {"max_step_translation_m": 0.01}}}}))
    report = replay(path, candidate=recording._params_from_file(str(params)))
    assert report.mismatches == 0
    long_steps = [i for i, a in enumerate(actions) if np.linalg.norm(a.translation) > 0.01]
    assert [s.index - 1 for s in report.steps if s.verdict_changed] == long_steps
    for i in long_steps:
        assert "clipped:step_translation" in report.steps[i].verdict
        assert "clipped:step_translation" not in report.steps[i].recorded_verdict
    assert report.counters["actions_clipped"] == len(long_steps) + report.recorded_counters["actions_clipped"]
    assert replay_main([str(path), "--params", str(params)]) == 1
    assert "(recorded params: ok)" in capsys.readouterr().out


def test_replay_handles_chunks_invalid_replies_and_now_valid_ones(tmp_path):
    path = tmp_path / "ep.mcap"
    answers = ["0 128 128 128 128 128 128 0", "0 300 128 128 128 128 128 0", "0 200 128 128 128 128 128 0"]
    actions = make_episode(path, answers, chunk_rows=3)
    report = replay(path)
    assert report.ok and report.unexecuted_replies == 1 and report.now_valid_seqs == ()
    assert [s.match for s in report.steps] == [True, True, None, None, None]
    assert len(report.steps) == len(actions)
    # With 512 bins the reply "300" becomes valid: the run would have changed.
    wide = replay(path, candidate={**RECORDED, "tokenizer.n_bins": 512})
    assert wide.now_valid_seqs == (2,)
    assert not wide.ok


def test_replay_follows_the_episode_announcements(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    actions = make_episode(path, ["0 140 128 128 128 128 128 0"] * 4)
    report = replay(path)
    assert [s.verdict for s in report.steps] == [("ok",)] * len(actions)
    assert {s.episode_id for s in report.steps} == {short_id(EP1)} == {"01020304"}
    assert report.episodes == ((short_id(EP1), "pick up the cube"),)
    assert report.instructions == ("pick up the cube",)
    assert replay_main([str(path)]) == 0
    assert "  episode 01020304: 'pick up the cube'" in capsys.readouterr().out


def test_episode_ended_by_the_policy_drops_its_late_actions(tmp_path):
    path = tmp_path / "ep.mcap"
    # The policy ends the episode at 0.6 s (e.g. cancelled); its actions logged after that are
    # stragglers: the safety node is IDLE and drops them as stale, and so must the replay.
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 8,
                 episodes=((1, _episode_msg(EP1)), (6 * 10**8 + 1, _episode_msg(EP1, False, reason="cancelled"))))
    report = replay(path)
    times = [s.time_s for s in report.steps]
    assert min(times) < 0.6 < max(times)
    assert all(s.verdict == ("ok",) for s in report.steps if s.time_s < 0.6)
    assert all(s.verdict == ("dropped:stale_episode",) for s in report.steps if s.time_s > 0.6)
    assert report.ok  # the same with recorded and candidate params
    assert any("stale_episode" in n for n in report.notes)


def test_new_episode_preempts_the_running_one(tmp_path):
    path = tmp_path / "ep.mcap"
    # A second episode at 0.6 s: the first one's remaining actions are stale, the new one's run
    # (it starts holding, from the measured pose; its first action resumes).
    switch = 6 * 10**8
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 8,
                 episodes=((1, _episode_msg(EP1)), (switch + 1, _episode_msg(EP2, instruction="stop"))),
                 episode_of=lambda offset: EP1 if offset < switch + 10**8 else EP2)
    report = replay(path)
    by_episode = {}
    for s in report.steps:
        by_episode.setdefault(s.episode_id, []).append(s.verdict)
    old, new = by_episode[short_id(EP1)], by_episode[short_id(EP2)]
    assert old[-1] == ("dropped:stale_episode",) and set(old[:-1]) == {("ok",)}
    assert new and set(new) == {("ok",)}
    assert report.instructions == ("pick up the cube", "stop")
    assert report.counters["episodes"] == 2


def test_actions_of_an_unannounced_episode_are_dropped(tmp_path):
    path = tmp_path / "ep.mcap"
    # E.g. a safety node restarted mid-episode: it never heard of the episode the actions name.
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 3, episode_of=lambda offset: EP2)
    report = replay(path)
    assert [s.verdict for s in report.steps] == [("dropped:unknown_episode",)] * 3
    assert report.counters["actions_accepted"] == 0
    assert any("unknown_episode 3" in n for n in report.notes)


def test_recording_without_episode_messages_starts_episodes_at_their_first_action(tmp_path):
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 3, episodes=())
    report = replay(path)
    assert [s.verdict for s in report.steps] == [("ok",)] * 3
    assert any("no /episode messages" in n for n in report.notes)
    assert report.instructions == ("pick up the cube",)  # from /instruction


def test_episode_without_a_fresh_pose_faults(tmp_path):
    path = tmp_path / "ep.mcap"
    # No ee_pose at all (the arm driver is not publishing): the episode cannot start, the fault
    # latches and the episode's actions are ignored.
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 2, poses=False)
    report = replay(path)
    assert report.counters["faults"] == 1 and report.counters["actions_accepted"] == 0
    assert [s.verdict for s in report.steps] == [("ignored:fault",)] * 2


def test_recorded_status_counters_are_reported(tmp_path):
    path = tmp_path / "ep.mcap"
    actions = make_episode(path, ["0 140 128 128 128 128 128 0"] * 4)
    report = replay(path)
    assert report.status_counters["actions_accepted"] == len(actions)
    assert report.recorded_counters["actions_accepted"] == len(actions)


def _as_legacy_recording(path: Path) -> None:
    """Rewrite ``path`` as a recording made before ArmAction had ``observation_stamp``: that
    schema (the field's line removed) and its messages re-encoded without the field."""
    from mcap.reader import make_reader as _reader
    from mcap.writer import Writer
    from mcap_ros2._dynamic import serialize_dynamic

    name = "rt2_ros_interfaces/msg/ArmAction"
    reader = _reader(open(path, "rb"), decoder_factories=[DecoderFactory()])  # noqa: SIM115 - read fully below
    summary = reader.get_summary()
    out = path.with_suffix(".tmp")
    with open(out, "wb") as f:
        w = Writer(f)
        w.start(profile="ros2", library="test")
        schema_ids, encoders = {}, {}
        for sid, sc in summary.schemas.items():
            data = sc.data
            if sc.name == name:
                lines = data.decode().splitlines(keepends=True)
                old = [ln for ln in lines if not ln.startswith("builtin_interfaces/Time observation_stamp")]
                assert len(old) == len(lines) - 1
                data = "".join(old).encode()
                encoders[sid] = serialize_dynamic(name, data.decode())[name]
            schema_ids[sid] = w.register_schema(sc.name, sc.encoding, data)
        channel_ids = {cid: w.register_channel(c.topic, c.message_encoding, schema_ids[c.schema_id], c.metadata)
                       for cid, c in summary.channels.items()}
        for schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=False):
            data = encoders[schema.id](decoded) if schema.id in encoders else message.data
            w.add_message(channel_ids[channel.id], message.log_time, data, message.publish_time)
        for record in reader.iter_metadata():
            w.add_metadata(record.name, record.metadata)
        w.finish()
    out.replace(path)


@pytest.mark.parametrize("legacy", ["zero_stamp", "no_field"])
def test_actions_without_observation_stamp_are_refused_with_one_note(tmp_path, capsys, legacy):
    # Recordings made before ArmAction had observation_stamp (or by a publisher that left it zero):
    # the safety node refuses an action of unknown age, so the replay does too, and says why once.
    path = tmp_path / "old.mcap"
    answers = ["0 140 128 128 128 128 128 0"] * 3 + ["1 128 128 128 128 128 128 0"]
    make_episode(path, answers, params={**RECORDED, "ee_pose_timeout_s": 0.5},
                 observation_lag_ns=None if legacy == "zero_stamp" else 10**8)
    if legacy == "no_field":
        _as_legacy_recording(path)
        assert not hasattr(next(iter_messages(path, ["/arm_action"])).message, "observation_stamp")
    report = replay(path)
    assert [s.verdict for s in report.steps] == [("rejected:no_observation_stamp",)] * 3 + [("terminate",)]
    assert report.counters["actions_rejected"] == report.recorded_counters["actions_rejected"] == 3
    assert report.ok  # the recorded and the replay params agree: both refuse
    stamp_notes = [n for n in report.notes if "observation_stamp" in n]
    assert len(stamp_notes) == 1 and stamp_notes[0].startswith("4 of 4 arm actions carry no observation_stamp")
    retired = [n for n in report.notes if "ee_pose_timeout_s" in n]  # the old key, in the old file's metadata
    assert len(retired) == 1 and "safety.max_pose_age_s" in retired[0]
    assert replay_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("carry no observation_stamp") == 1
    assert "rejected:no_observation_stamp" in out and "ee_pose_timeout_s=0.5" in out


@pytest.mark.parametrize(("lag_s", "cause"), [(1.5, "stale_action"), (-0.3, "future_action")])
def test_action_freshness_is_judged_by_its_observation_stamp(tmp_path, capsys, lag_s, cause):
    # The log times are as fresh as ever; only the stamp of the camera frame says how old the data is.
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 3, observation_lag_ns=int(lag_s * 1e9))
    report = replay(path)
    assert [s.verdict for s in report.steps] == [(f"rejected:{cause}",)] * 3
    assert not any("observation_stamp" in n for n in report.notes)
    fix = "safety.max_action_age_s=2.0" if cause == "stale_action" else "safety.max_future_stamp_s=0.5"
    assert replay_main([str(path), "--set", fix]) == 1
    out = capsys.readouterr().out
    assert out.count(f"ok  (recorded params: rejected:{cause})") == 3


def test_pose_freshness_is_judged_by_its_header_stamp(tmp_path, capsys):
    # ee_pose logged on time but measured 0.3 s earlier: older than safety.max_pose_age_s (0.25 s),
    # so no episode can start, as on the safety node; a larger bound accepts it.
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 2, pose_lag_ns=3 * 10**8)
    report = replay(path)
    assert report.counters["faults"] == 1 and [s.verdict for s in report.steps] == [("ignored:fault",)] * 2
    relaxed = replay(path, candidate={**RECORDED, "safety.max_pose_age_s": 0.5})
    assert [s.verdict for s in relaxed.steps] == [("ok",)] * 2 and relaxed.counters["faults"] == 0
    assert "safety.max_pose_age_s: 0.25 -> 0.5" in relaxed.changed_params
    # Zero-stamped poses are not used at all (unknown age), with a note.
    unstamped = tmp_path / "unstamped.mcap"
    make_episode(unstamped, ["0 140 128 128 128 128 128 0"] * 2, pose_lag_ns=None)
    report = replay(unstamped)
    assert report.counters["faults"] == 1 and [s.verdict for s in report.steps] == [("ignored:fault",)] * 2
    assert any("/ee_pose messages not used" in n and "zero header stamp" in n for n in report.notes)
    # The retired key cannot be set; the message names its replacement.
    assert replay_main([str(path), "--set", "ee_pose_timeout_s=0.5"]) == 2
    err = capsys.readouterr().err
    assert "ee_pose_timeout_s" in err and "safety.max_pose_age_s" in err


def test_replay_without_params_metadata_assumes_defaults(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"], params={})
    report = replay(path)
    assert report.ok and report.params_recorded == () and report.params_assumed == ("rt2_policy", "rt2_safety")
    assert replay_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("run parameters: rt2_policy (tokenizer.*) and rt2_safety (safety.*) NOT in the "
            "recording: their defaults are assumed") in out
    assert "as recorded" not in out


@pytest.mark.parametrize("params_from", [None, ["rt2_policy"]])
def test_replay_of_a_partial_recording_names_what_it_assumed(tmp_path, capsys, params_from):
    # Only rt2_policy's parameters made it into the file (the recorder stopped before it fetched
    # rt2_safety's): the replay must say so, never "as recorded".
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 2, params={"tokenizer.profile": "rt2"})
    if params_from is not None:  # as rt2-record writes it
        with_meta = tmp_path / "meta.mcap"
        make_episode(with_meta, ["0 140 128 128 128 128 128 0"] * 2,
                     params={"tokenizer.profile": "rt2", "safety.watchdog_timeout_s": 0.9})
        path = with_meta
        _append_run_metadata(path, {"params_from": json.dumps(params_from), "params_missing": '["rt2_safety"]'})
    report = replay(path)
    assert report.params_recorded == ("rt2_policy",) and report.params_assumed == ("rt2_safety",)
    assert replay_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("run parameters: rt2_policy (tokenizer.*) as recorded; rt2_safety (safety.*) NOT in "
            "the recording: its defaults are assumed") in out
    assert "replay parameters: the run parameters, unchanged" in out
    if params_from is not None:  # a safety key without rt2_safety in params_from is not taken as recorded
        assert "safety.watchdog_timeout_s" not in out


def _append_run_metadata(path: Path, values: dict) -> None:
    """Rewrite ``path`` with one more ``rt2_ros`` metadata record (as a later rt2-record update)."""
    from mcap.reader import make_reader as _reader
    from mcap.writer import Writer

    data = path.read_bytes()
    reader = _reader(open(path, "rb"))  # noqa: SIM115 - read fully below
    summary = reader.get_summary()
    out = path.with_suffix(".tmp")
    with open(out, "wb") as f:
        w = Writer(f)
        w.start(profile="ros2", library="test")
        schema_ids = {sid: w.register_schema(sc.name, sc.encoding, sc.data) for sid, sc in summary.schemas.items()}
        channel_ids = {cid: w.register_channel(c.topic, c.message_encoding, schema_ids[c.schema_id], c.metadata)
                       for cid, c in summary.channels.items()}
        for _, channel, message in reader.iter_messages(log_time_order=False):
            w.add_message(channel_ids[channel.id], message.log_time, message.data, message.publish_time)
        for record in reader.iter_metadata():
            w.add_metadata(record.name, record.metadata)
        w.add_metadata("rt2_ros", values)
        w.finish()
    assert data  # the original was read before it is replaced
    out.replace(path)


def test_replay_of_a_recording_without_actions_is_not_a_match(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    make_episode(path, [])  # instruction, episode, poses, statuses: no model reply, no arm action
    report = replay(path)
    assert not report.ok and report.steps == ()
    assert replay_main([str(path)]) == 2
    out = capsys.readouterr().out
    assert "result: NOTHING TO REPLAY" in out and "MATCH" not in out


def test_replay_counts_replies_the_replay_tokenizer_cannot_decode(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 3)  # rt2: 8 tokens; openvla expects 7
    assert replay_main([str(path), "--set", "tokenizer.profile=openvla"]) == 1
    out = capsys.readouterr().out
    assert "steps: 3 (re-decodable 0, invalid with the replay tokenizer 3)" in out
    assert "replay parameters: the run parameters with --set tokenizer.profile=openvla" in out


def test_replay_params_file_is_checked_as_the_nodes_check_it(tmp_path, capsys):
    path = tmp_path / "ep.mcap"
    make_episode(path, ["0 140 128 128 128 128 128 0"] * 2)
    cases = {"rt2_safety:\n  ros__parameters:\n    safety:\n      watchdog_timeout_s: 2\n":
             "safety.watchdog_timeout_s: expected a floating-point number, got the integer 2",
             "policy_node:\n  ros__parameters:\n    tokenizer:\n      profile: rt2\n": "unknown node 'policy_node'",
             "rt2_safety:\n  ros__parameters:\n    tokenizer:\n      profile: rt2\n":
             "rt2_safety: unknown parameter(s): tokenizer.profile"}
    for text, message in cases.items():
        params = tmp_path / "p.yaml"
        params.write_text(text)
        assert replay_main([str(path), "--params", str(params)]) == 2, text
        err = capsys.readouterr().err
        assert err.startswith("rt2-replay: invalid parameters:") and message in err, err
    params.write_text("rt2_safety:\n  ros__parameters:\n    safety:\n      watchdog_timeout_s: 2.0\n")
    assert replay_main([str(path), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert (f"replay parameters: {params} (rt2_safety (safety.*); rt2_policy not in it: "
            "defaults; keys it does not set: defaults)") in out
    assert "safety.watchdog_timeout_s: 1.0 -> 2.0" in out


def test_replay_of_a_cut_file_uses_what_it_holds(tmp_path, capsys):
    path, cut = tmp_path / "ep.mcap", tmp_path / "cut.mcap"
    actions = make_episode(path, ["0 140 128 128 128 128 128 0"] * 10, flush_period_s=0.0)
    data = path.read_bytes()
    # One chunk per message (flushed after every write): cut where the 5th arm action's chunk starts.
    action_times = [m.log_time_ns for m in iter_messages(path) if m.topic == "/arm_action"]
    _, summary, _ = _read_all(path)
    offsets = {c.message_start_time: c.chunk_start_offset for c in summary.chunk_indexes}
    cut.write_bytes(data[:offsets[action_times[4]] + 20])  # into a record: cut mid-write
    assert replay_main([str(cut)]) == 0
    out = capsys.readouterr().out
    assert "never finalised" in out and "ends in the middle of a record" in out
    assert "EndOfFile" not in out and "unpack requires" not in out  # the reader's bare causes, translated
    assert "mcap recover" in out
    assert int(re.search(r"(\d+) executed steps", out).group(1)) == 4 < len(actions)
    cut.write_bytes(data[:offsets[action_times[0]]])  # messages, but no arm action
    assert replay_main([str(cut)]) == 2
    assert "nothing to replay" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"not an mcap file at all", b"\x89MCAP0\r\n" + b"\x00" * 3])
def test_unreadable_file_exits_2(tmp_path, capsys, content):
    path = tmp_path / "bad.mcap"
    path.write_bytes(content)
    assert replay_main([str(path)]) == 2
    assert "rt2-replay:" in capsys.readouterr().err
    assert replay_main([str(tmp_path / "missing.mcap")]) == 2


# -- rt2-record over DDS --------------------------------------------------------------------------------
def _start_recorder(out: Path, log: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    fh = open(log, "w")  # noqa: SIM115 - closed by the OS with the process
    return subprocess.Popen([sys.executable, "-m", "rt2_ros.nodes.record", "--out", str(out), *args],
                            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def probe():
    isolate_ros_domain()
    p = Probe("rt2_record_test_probe")
    yield p
    p.close()


def test_rt2_record_records_what_is_published(probe, tmp_path):
    from rclpy.duration import Duration
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from rt2_ros.nodes.common import ACTION_QOS, EVENT_QOS, LATCHED_QOS

    node = probe.node
    status_pub = node.create_publisher(SafetyStatus, "/rt2_safety/status", LATCHED_QOS)
    status_pub.publish(SafetyStatus(state_name="IDLE", faults=2, drop_causes=["unknown_episode"], drop_counts=[7]))
    # ^ before the recorder exists: latched. Instructions and episodes are volatile events.
    instruction_pub = node.create_publisher(String, "/instruction", EVENT_QOS)
    episode_pub = node.create_publisher(Episode, "/episode", EVENT_QOS)
    action_pub = node.create_publisher(ArmAction, "/arm_action", ACTION_QOS)
    tokens_pub = node.create_publisher(ActionTokens, "/rt2_policy/action_tokens", 10)
    image_pub = node.create_publisher(Image, "/camera/image", qos_profile_sensor_data)
    # A stand-in policy node whose parameters the recorder must fetch.
    fake = rclpy.create_node("rt2_policy", parameter_overrides=[
        Parameter("tokenizer.translation_scale_m", value=0.03), Parameter("tokenizer.profile", value="rt1")],
        automatically_declare_parameters_from_overrides=True)
    # Declared without a value, as the nodes do for empty lists: rclpy then answers a batch
    # request with no values at all, so the recorder must fall back to one name at a time.
    fake.declare_parameter("tokenizer.low", Parameter.Type.DOUBLE_ARRAY)
    executor = SingleThreadedExecutor()
    executor.add_node(fake)
    spinning = threading.Event()
    spinning.set()

    def spin() -> None:
        while spinning.is_set():
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()

    out, log = tmp_path / "run.mcap", tmp_path / "record.log"
    proc = _start_recorder(out, log, "--param-nodes", "rt2_policy")
    try:
        pubs = (instruction_pub, episode_pub, action_pub, tokens_pub, image_pub)
        probe.wait_for(lambda: proc.poll() is not None or all(p.get_subscription_count() >= 1 for p in pubs),
                       20.0, "rt2-record to subscribe")
        assert proc.poll() is None, log.read_text()
        deadline = time.monotonic() + 10.0
        while "parameters of rt2_policy" not in log.read_text():
            assert time.monotonic() < deadline, f"parameters not fetched:\n{log.read_text()}"
            time.sleep(0.05)  # polling a log file: there is no event to wait on across processes
        instruction_pub.publish(String(data="stack the blocks"))
        episode_pub.publish(_episode_msg(EP1, instruction="stack the blocks"))
        frame = _filled(Image, np.random.default_rng(3))
        for _ in range(3):
            image_pub.publish(frame)
        for seq in (1, 2, 3):
            tokens_pub.publish(ActionTokens(observation_seq=seq, text=f"0 {seq} 128 128 128 128 128 0"))
            action_pub.publish(ArmAction(observation_seq=seq, episode_id=uuid_msg(EP1), gripper=0.25 * seq))
        for pub in (tokens_pub, action_pub, instruction_pub, episode_pub, status_pub):
            assert pub.wait_for_all_acked(Duration(seconds=5)), "the recorder did not acknowledge"
    finally:
        code = stop(proc)
        spinning.clear()
        thread.join(2.0)
        executor.remove_node(fake)
        fake.destroy_node()
    assert code == 0, log.read_text()
    assert "wrote" in log.read_text()
    assert read_topics(out) == DEFAULT_TOPICS  # the summary exists: the file was finalised
    by_topic: dict[str, list] = {}
    for m in iter_messages(out):
        by_topic.setdefault(m.topic, []).append(m.message)
    assert [a.observation_seq for a in by_topic["/arm_action"]] == [1, 2, 3]
    assert [a.gripper for a in by_topic["/arm_action"]] == [0.25, 0.5, 0.75]
    assert {bytes(bytearray(a.episode_id.uuid)) for a in by_topic["/arm_action"]} == {EP1}
    (episode,) = by_topic["/episode"]
    assert (bytes(bytearray(episode.episode_id.uuid)), episode.active, episode.instruction) == (
        EP1, True, "stack the blocks")
    (status,) = by_topic["/rt2_safety/status"]
    assert (status.faults, list(status.drop_causes), list(status.drop_counts)) == (2, ["unknown_episode"], [7])
    assert [t.text for t in by_topic["/rt2_policy/action_tokens"]][-1] == "0 3 128 128 128 128 128 0"
    assert [i.data for i in by_topic["/instruction"]] == ["stack the blocks"]
    assert 1 <= len(by_topic["/camera/image"]) <= 3
    _same(frame, by_topic["/camera/image"][0])
    assert recorded_params(out) == {"tokenizer.translation_scale_m": 0.03, "tokenizer.profile": "rt1"}
    meta = read_metadata(out)["rt2_ros"]
    assert meta["instruction"] == "stack the blocks"  # from the episode announcement
    assert json.loads(meta["instructions"]) == ["stack the blocks"]


def test_rt2_record_stops_after_duration(probe, tmp_path):
    out, log = tmp_path / "short.mcap", tmp_path / "short.log"
    proc = _start_recorder(out, log, "--duration", "1.0", "--param-nodes", "--topics", "/instruction",
                           "/joint_states:sensor_msgs/msg/JointState")
    try:
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        stop(proc)
    assert read_topics(out) == {"/instruction": "std_msgs/msg/String", "/joint_states": "sensor_msgs/msg/JointState"}
    assert "stopped (duration)" in log.read_text()
