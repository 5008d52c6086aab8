"""PolicyCore: which frame is sent, which reply is trusted, how chunks are executed (no ROS)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.actions import BackendReply
from rt2_ros.backends import BackendTimeout
from rt2_ros.policy import PolicyConfig, PolicyCore
from rt2_ros.tokens import ActionTokenizer

MOVE = "0 160 128 128 128 128 128 0"
STOP = "1 128 128 128 128 128 128 0"
IMG = np.zeros((8, 8, 3), dtype=np.uint8)


def make_core(**overrides) -> PolicyCore:
    values = {"backend.type": "scripted", "backend.timeout_s": 1.0, "policy.max_reply_age_s": 0.5,
              "policy.max_frame_age_s": 0.3, **overrides}
    return PolicyCore(PolicyConfig.from_params(values), ActionTokenizer.from_profile("rt2"), backend_name="test")


def send(core: PolicyCore, now: float, stamp: float | None = None):
    core.on_frame(IMG, stamp if stamp is not None else now, now)
    return core.next_request(now)


def chunk_reply(seq: int, xs) -> BackendReply:
    rows = np.zeros((len(xs), 7))
    rows[:, 0] = xs
    return BackendReply(seq=seq, backend="test", actions=rows)


def test_no_request_without_instruction_or_frame():
    core = make_core()
    assert send(core, 0.0) is None  # no instruction
    core.set_instruction("pick")
    assert core.next_request(0.0) is None or core.in_flight == 1  # a frame was stored above
    core2 = make_core()
    core2.set_instruction("pick")
    assert core2.next_request(0.0) is None  # no frame yet


def test_reply_becomes_one_action_and_sequence_ids_increase():
    core = make_core()
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    out = core.on_reply(r1.observation.seq, BackendReply(r1.observation.seq, "test", text=MOVE), None, 0.1)
    assert out.accepted and list(out.bins) == [int(t) for t in MOVE.split()]
    r2 = send(core, 0.2)
    assert r2.observation.seq == r1.observation.seq + 1
    action = core.pop_action()
    assert action is not None and action.translation[0] > 0 and action.observation_seq == r1.observation.seq


def test_same_frame_is_never_sent_twice_and_stale_frames_are_not_sent():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0, stamp=5.0)
    core.on_reply(r.observation.seq, BackendReply(r.observation.seq, "test", text=MOVE), None, 0.05)
    core.pop_action()
    assert core.next_request(0.1) is None  # the frame with stamp 5.0 was already sent
    core.on_frame(IMG, 6.0, 1.0, age_s=0.4)  # arrives already 0.4 s old (> max_frame_age_s 0.3)
    assert core.next_request(1.0) is None
    assert core.counters["frames_stale"] == 1


def test_late_reply_is_dropped():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = core.on_reply(r.observation.seq, BackendReply(r.observation.seq, "test", text=MOVE), None, 0.6)
    assert not out.accepted and out.reason == "late"
    assert core.pop_action() is None


def test_reply_to_previous_episode_is_dropped():
    core = make_core()
    core.set_instruction("first")
    r = send(core, 0.0)
    core.set_instruction("second")
    out = core.on_reply(r.observation.seq, BackendReply(r.observation.seq, "test", text=MOVE), None, 0.1)
    assert not out.accepted and out.reason == "unknown_seq"  # the in-flight request was cancelled
    assert core.pop_action() is None


def test_abandoned_request_reply_is_dropped_and_a_new_request_goes_out():
    core = make_core()
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    assert core.abandon_overdue(2.0) == [r1.observation.seq]  # timeout 1.0 s + grace
    r2 = send(core, 2.0)
    assert r2 is not None
    late = core.on_reply(r1.observation.seq, BackendReply(r1.observation.seq, "test", text=MOVE), None, 2.1)
    assert not late.accepted and late.reason == "unknown_seq"
    assert core.on_reply(r2.observation.seq, BackendReply(r2.observation.seq, "test", text=MOVE), None, 2.1).accepted


@pytest.mark.parametrize("answer, reason", [
    ("0 128 128", "invalid_tokens"), ("0 128 128 128 128 128 128 nan", "invalid_tokens"), ("", "invalid_tokens")])
def test_invalid_answers_never_become_actions(answer, reason):
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = core.on_reply(r.observation.seq, BackendReply(r.observation.seq, "test", text=answer), None, 0.1)
    assert not out.accepted and out.reason == reason
    assert core.pop_action() is None


def test_backend_error_and_seq_mismatch():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = core.on_reply(r.observation.seq, None, BackendTimeout("slow"), 0.9)
    assert out.reason == "backend_error" and core.counters["backend_errors"] == 1
    r = send(core, 1.0)
    out = core.on_reply(r.observation.seq, BackendReply(r.observation.seq + 7, "test", text=MOVE), None, 1.1)
    assert out.reason == "seq_mismatch"


def test_terminate_finishes_the_episode_until_a_new_instruction():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    core.on_reply(r.observation.seq, BackendReply(r.observation.seq, "test", text=STOP), None, 0.1)
    assert core.pop_action().terminate
    assert core.finished and send(core, 0.2) is None
    core.set_instruction("again")
    assert send(core, 0.3) is not None


def test_chunk_is_aligned_to_the_steps_executed_while_in_flight():
    core = make_core(**{"policy.refill_threshold": 2})
    core.set_instruction("pick")
    r = send(core, 0.0)
    core.pop_action(), core.pop_action()  # two execute steps pass while the request is in flight
    core.on_reply(r.observation.seq, chunk_reply(r.observation.seq, [0.1, 0.2, 0.3, 0.4, 0.5]), None, 0.2)
    assert core.counters["chunk_actions_skipped"] == 2
    xs = [core.pop_action().translation[0] for _ in range(3)]
    scale = ActionTokenizer.from_profile("openvla").translation_scale_m  # same default scale for rt2 rows
    assert np.allclose(xs, np.array([0.3, 0.4, 0.5]) * scale)


def test_next_request_goes_out_before_the_chunk_runs_out():
    core = make_core(**{"policy.refill_threshold": 2})
    core.set_instruction("pick")
    r = send(core, 0.0)
    core.on_reply(r.observation.seq, chunk_reply(r.observation.seq, [0.1] * 5), None, 0.05)
    t = 0.1
    requested_with = None
    while core.queued:
        req = send(core, t)
        if req is not None:
            requested_with = core.queued
            break
        core.pop_action()
        t += 0.1
    assert requested_with == 2


@pytest.mark.parametrize("blend, expected_first", [("latest_only", 1.0), ("weighted_average", 0.5)])
def test_overlapping_chunks_are_blended(blend, expected_first):
    core = make_core(**{"policy.chunk_blend": blend, "policy.chunk_blend_weight": 0.5,
                        "policy.refill_threshold": 4})
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    core.on_reply(r1.observation.seq, chunk_reply(r1.observation.seq, [0.0] * 4), None, 0.05)
    r2 = send(core, 0.06)  # queue (4) <= threshold: the next chunk is requested at once
    core.on_reply(r2.observation.seq, chunk_reply(r2.observation.seq, [1.0] * 4), None, 0.1)
    scale = ActionTokenizer.from_profile("rt2").translation_scale_m
    assert core.pop_action().translation[0] == pytest.approx(expected_first * scale)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["frame", "reply", "pop", "instruction", "late"]),
                          st.floats(0.0, 0.2)), max_size=40))
def test_executed_actions_always_answer_the_current_episode(events):
    """Whatever the interleaving, every executed action comes from a reply of the current episode."""
    core = make_core()
    core.set_instruction("pick")
    now = 0.0
    pending = []
    episode_of_seq = {}
    for kind, dt in events:
        now += dt
        if kind == "frame":
            req = send(core, now)
            if req is not None:
                pending.append(req)
                episode_of_seq[req.observation.seq] = core.episode_id
        elif kind in ("reply", "late") and pending:
            req = pending.pop(0)
            at = now + (1.0 if kind == "late" else 0.0)
            core.on_reply(req.observation.seq, BackendReply(req.observation.seq, "test", text=MOVE), None, at)
        elif kind == "instruction":
            core.set_instruction("another")
        else:
            action = core.pop_action()
            if action is not None:
                assert episode_of_seq[action.observation_seq] == core.episode_id


# -- proprioception age rule ------------------------------------------------------------------------
POSE = dict(ee_position=(0.45, 0.0, 0.3), ee_orientation=(1.0, 0.0, 0.0, 0.0))


def test_fresh_state_is_sent_with_the_frame():
    core = make_core(**{"policy.max_pose_age_s": 0.5})
    core.joint_max_age_s = 0.5
    core.set_instruction("pick")
    core.on_state(10.0, **POSE, stamp=100.0, age_s=0.05)
    core.on_state(10.0, gripper=0.25, joint_positions=[0.1, 0.2], stamp=100.0, age_s=0.05)
    obs = send(core, 10.2).observation
    assert obs.ee_position.tolist() == [0.45, 0.0, 0.3] and obs.ee_orientation.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert obs.gripper == 0.25 and obs.joint_positions.tolist() == [0.1, 0.2]
    assert not any(k.startswith("state_stale") for k in core.counters)


@pytest.mark.parametrize(("piece", "fields"), [
    ("ee_pose", ("ee_position", "ee_orientation")),
    ("gripper", ("gripper",)),
    ("joint_positions", ("joint_positions",)),
])
def test_stale_state_is_never_sent(piece, fields):
    """Each piece has its own stamp: a stale one is left out (None) and counted, the others still go."""
    core = make_core(**{"policy.max_pose_age_s": 0.3, "policy.max_frame_age_s": 5.0})
    core.joint_max_age_s = 0.3
    core.set_instruction("pick")
    # Everything measured at t=0 (age 0.1 s on arrival) ...
    core.on_state(0.0, **POSE, stamp=50.0, age_s=0.1)
    core.on_state(0.0, gripper=1.0, joint_positions=[0.5], stamp=50.0, age_s=0.1)
    # ... then every piece but ``piece`` refreshed at t=1.
    if piece != "ee_pose":
        core.on_state(1.0, **POSE, stamp=51.0, age_s=0.0)
    if piece != "gripper":
        core.on_state(1.0, gripper=1.0, stamp=51.0)
    if piece != "joint_positions":
        core.on_state(1.0, joint_positions=[0.5], stamp=51.0)
    obs = send(core, 1.05).observation
    all_fields = ("ee_position", "ee_orientation", "gripper", "joint_positions")
    assert [f for f in all_fields if getattr(obs, f) is None] == list(fields)
    assert core.counters[f"state_stale_{piece}"] == 1


def test_age_on_arrival_counts_and_the_bound_is_inclusive():
    core = make_core(**{"policy.max_pose_age_s": 0.3})
    core.joint_max_age_s = 0.2
    core.set_instruction("pick")
    core.on_state(0.0, gripper=0.0, stamp=1.0, age_s=0.15)  # 0.15 s old on arrival
    assert send(core, 0.05).observation.gripper == 0.0  # 0.2 s old: at the bound, still sent
    core.on_reply(1, None, BackendTimeout("x"), 0.06)
    assert send(core, 0.1).observation.gripper is None  # 0.25 s old: stale
    core.on_reply(2, None, BackendTimeout("x"), 0.11)
    core.on_state(0.2, gripper=0.5, stamp=1.2, age_s=-0.1)  # clock skew: a future stamp counts as age 0
    assert send(core, 0.3).observation.gripper == 0.5


def test_live_bound_changes_apply_to_stored_state():
    core = make_core(**{"policy.max_pose_age_s": 0.1, "policy.max_frame_age_s": 5.0})
    core.set_instruction("pick")
    core.on_state(0.0, **POSE, stamp=1.0)
    assert send(core, 0.5).observation.ee_position is None
    core.on_reply(1, None, BackendTimeout("x"), 0.51)
    core.config = PolicyConfig.from_params({"backend.type": "scripted", "policy.max_pose_age_s": 1.0})
    assert send(core, 0.6).observation.ee_position is not None


def test_pose_needs_position_and_orientation_together():
    core = make_core()
    with pytest.raises(ValueError, match="together"):
        core.on_state(0.0, ee_position=(0.0, 0.0, 0.0))


@settings(max_examples=200, deadline=None)
@given(ages=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3), wait=st.floats(0.0, 2.0),
       bound=st.floats(0.01, 2.0))
def test_an_observation_never_carries_state_older_than_its_bound(ages, wait, bound):
    core = make_core(**{"policy.max_pose_age_s": bound, "policy.max_frame_age_s": 10.0})
    core.joint_max_age_s = bound
    core.set_instruction("pick")
    core.on_state(0.0, **POSE, age_s=ages[0])
    core.on_state(0.0, gripper=0.5, age_s=ages[1])
    core.on_state(0.0, joint_positions=[0.1], age_s=ages[2])
    obs = send(core, wait).observation
    for age, value in zip(ages, (obs.ee_position, obs.gripper, obs.joint_positions), strict=True):
        assert (value is not None) == (age + wait <= bound)
