"""PolicyCore: which frame is sent, which reply is trusted, how chunks are executed (no ROS)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.actions import BackendReply
from rt2_ros.backends import BackendTimeout
from rt2_ros.params import ConfigError
from rt2_ros.policy import PolicyConfig, PolicyCore
from rt2_ros.tokens import ActionTokenizer

MOVE = "0 160 128 128 128 128 128 0"
STOP = "1 128 128 128 128 128 128 0"
IMG = np.zeros((8, 8, 3), dtype=np.uint8)
PERIOD = 0.1  # 1 / policy.execute_rate_hz (default 10 Hz)
EPS = 1e-9


def make_core(**overrides) -> PolicyCore:
    # max_action_age_s (default 3.0) >= max_reply_age_s >= backend.timeout_s: the cross-checks hold.
    values = {"backend.type": "scripted", "backend.timeout_s": 0.5, "policy.max_reply_age_s": 0.5,
              "policy.max_frame_age_s": 0.3, **overrides}
    return PolicyCore(PolicyConfig.from_params(values), ActionTokenizer.from_profile("rt2"), backend_name="test")


def send(core: PolicyCore, now: float, stamp: float | None = None, age_s: float = 0.0):
    core.on_frame(IMG, stamp if stamp is not None else now, now, age_s=age_s)
    return core.next_request(now)


def answer(core: PolicyCore, req, now: float, text: str = MOVE):
    seq = req.observation.seq
    return core.on_reply(seq, BackendReply(seq, "test", text=text), None, now)


def chunk_reply(seq: int, xs) -> BackendReply:
    rows = np.zeros((len(xs), 7))
    rows[:, 0] = xs
    return BackendReply(seq=seq, backend="test", actions=rows)


def answer_chunk(core: PolicyCore, req, now: float, xs):
    return core.on_reply(req.observation.seq, chunk_reply(req.observation.seq, xs), None, now)


SCALE = ActionTokenizer.from_profile("rt2").translation_scale_m  # metres per unit of a continuous row


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
    out = answer(core, r1, 0.1)
    assert out.accepted and list(out.bins) == [int(t) for t in MOVE.split()]
    r2 = send(core, 0.2)
    assert r2.observation.seq == r1.observation.seq + 1
    action = core.pop_action(0.2)
    assert action is not None and action.translation[0] > 0 and action.observation_seq == r1.observation.seq


def test_same_frame_is_never_sent_twice_and_stale_frames_are_not_sent():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0, stamp=5.0)
    answer(core, r, 0.05)
    assert core.pop_action(0.05) is not None
    assert core.next_request(0.1) is None  # the frame with stamp 5.0 was already sent (and the pace allows one)
    core.on_frame(IMG, 6.0, 1.0, age_s=0.4)  # arrives already 0.4 s old (> max_frame_age_s 0.3)
    assert core.next_request(1.0) is None
    assert core.counters["frames_stale"] == 1


def test_a_camera_that_stops_after_its_last_frame_was_sent_is_counted_stale_once():
    core = make_core()  # max_frame_age_s 0.3
    core.set_instruction("pick")
    r = send(core, 0.0, stamp=5.0)
    answer(core, r, 0.05)
    for t in (0.1, 0.2, 0.25):  # the sent frame is still young: nothing to count, nothing to send
        assert core.next_request(t) is None
    assert core.counters["frames_stale"] == 0
    for t in (0.4, 0.5, 1.0, 2.0):  # no new frame: stale, counted once for that frame
        assert core.next_request(t) is None
    assert core.counters["frames_stale"] == 1 and core.camera_stale(2.0)


def test_late_reply_is_dropped():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = answer(core, r, 0.6)
    assert not out.accepted and out.reason == "late"
    assert core.pop_action(0.6) is None


def test_reply_to_previous_episode_is_dropped():
    core = make_core()
    core.set_instruction("first")
    r = send(core, 0.0)
    core.set_instruction("second")
    out = answer(core, r, 0.1)
    assert not out.accepted and out.reason == "stale_episode"  # the in-flight request was cancelled
    assert core.counters["replies_dropped_stale_episode"] == 1 and core.counters["replies_dropped_unknown_seq"] == 0
    assert core.pop_action(0.1) is None


def test_abandoned_request_reply_is_dropped_and_a_new_request_goes_out():
    core = make_core()
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    assert core.abandon_overdue(0.9) == []  # timeout 0.5 s + 0.5 s grace not yet over
    assert core.abandon_overdue(2.0) == [r1.observation.seq]
    r2 = send(core, 2.0)
    assert r2 is not None
    late = answer(core, r1, 2.1)
    assert not late.accepted and late.reason == "late"
    assert answer(core, r2, 2.1).accepted
    assert answer(core, r2, 2.2).reason == "unknown_seq"  # answered twice: the second matches no request


@pytest.mark.parametrize("answer_text, reason", [
    ("0 128 128", "invalid_tokens"), ("0 128 128 128 128 128 128 nan", "invalid_tokens"), ("", "invalid_tokens")])
def test_invalid_answers_never_become_actions(answer_text, reason):
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = answer(core, r, 0.1, answer_text)
    assert not out.accepted and out.reason == reason
    assert core.pop_action(0.1) is None


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
    answer(core, r, 0.1, STOP)
    assert core.pop_action(0.1).terminate
    assert core.finished and send(core, 0.2) is None
    core.set_instruction("again")
    assert send(core, 0.3) is not None


# -- chunk alignment: counts released actions ------------------------------------------------------
# The old rule counted execute ticks (every pop_action call advanced the step, even with an empty
# queue); the rule now counts *released* actions: a chunk skips exactly the actions that were
# released while its request was in flight. These two tests replace the tick-based one.

@pytest.mark.parametrize("released_in_flight", [0, 1, 2, 3])
def test_chunk_skips_as_many_actions_as_were_released_while_in_flight(released_in_flight):
    core = make_core(**{"policy.refill_threshold": 3, "policy.max_frame_age_s": 5.0})
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    assert answer_chunk(core, r1, 0.01, [0.9] * 3).accepted  # the old chunk: 3 actions, none released yet
    r2 = send(core, 0.1)  # queue (3) <= threshold: the next chunk is requested
    assert r2 is not None and r2.step_at_send == 0
    for i in range(released_in_flight):  # the arm runs the old chunk while r2 is in flight
        assert core.pop_action(0.1 + i * PERIOD).translation[0] == pytest.approx(0.9 * SCALE)
    assert answer_chunk(core, r2, 0.45, [0.1, 0.2, 0.3, 0.4, 0.5]).accepted
    assert core.counters["chunk_actions_skipped"] == released_in_flight
    xs = []
    t = 0.5
    while (a := core.pop_action(t)) is not None:
        xs.append(a.translation[0])
        t += PERIOD
    assert np.allclose(xs, np.array([0.1, 0.2, 0.3, 0.4, 0.5][released_in_flight:]) * SCALE)


def test_ticks_without_a_release_skip_no_chunk_actions():
    """The arm did not move while the request was in flight (empty queue): nothing of the chunk is skipped.
    (The tick-based rule skipped 2 actions here.)"""
    core = make_core(**{"policy.refill_threshold": 2})
    core.set_instruction("pick")
    r = send(core, 0.0)
    assert core.pop_action(0.1) is None and core.pop_action(0.2) is None  # two execute ticks, nothing queued
    assert answer_chunk(core, r, 0.25, [0.1, 0.2, 0.3, 0.4, 0.5]).accepted
    assert core.counters["chunk_actions_skipped"] == 0
    assert core.pop_action(0.25).translation[0] == pytest.approx(0.1 * SCALE)


def test_chunk_alignment_always_keeps_the_last_action():
    core = make_core(**{"policy.refill_threshold": 5, "policy.max_frame_age_s": 5.0})
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    assert answer_chunk(core, r1, 0.01, [0.9] * 5).accepted
    r2 = send(core, 0.1)
    for i in range(4):
        core.pop_action(0.1 + i * PERIOD)
    assert answer_chunk(core, r2, 0.45, [0.1, 0.2]).accepted  # 4 released in flight, only 2 in the new chunk
    assert core.counters["chunk_actions_skipped"] == 1
    assert core.pop_action(0.5).translation[0] == pytest.approx(0.2 * SCALE)


def test_next_request_goes_out_before_the_chunk_runs_out():
    core = make_core(**{"policy.refill_threshold": 2})
    core.set_instruction("pick")
    r = send(core, 0.0)
    assert answer_chunk(core, r, 0.05, [0.1] * 5).accepted
    t = 0.1
    requested_with = None
    while core.queued:
        req = send(core, t)
        if req is not None:
            requested_with = core.queued
            break
        core.pop_action(t)
        t += PERIOD
    assert requested_with == 2


@pytest.mark.parametrize("blend, expected_first", [("latest_only", 1.0), ("weighted_average", 0.5)])
def test_overlapping_chunks_are_blended(blend, expected_first):
    core = make_core(**{"policy.chunk_blend": blend, "policy.chunk_blend_weight": 0.5,
                        "policy.refill_threshold": 4})
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    assert answer_chunk(core, r1, 0.05, [0.0] * 4).accepted
    r2 = send(core, 0.1)  # queue (4) <= threshold: the next chunk is requested one period later (paced)
    assert answer_chunk(core, r2, 0.15, [1.0] * 4).accepted
    assert core.pop_action(0.15).translation[0] == pytest.approx(expected_first * SCALE)


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
            answer(core, req, now + (1.0 if kind == "late" else 0.0))
        elif kind == "instruction":
            core.set_instruction("another")
        else:
            action = core.pop_action(now)
            if action is not None:
                assert episode_of_seq[action.observation_seq] == core.episode_id


# -- request pacing ---------------------------------------------------------------------------------
def test_requests_are_paced_at_the_execute_period_on_a_grid():
    """Frames at 100 Hz, every reply an instant error (nothing queued): one request per period, on a grid
    that an early request (within a quarter period) does not shift."""
    core = make_core()
    core.set_instruction("pick")
    assert send(core, 0.0) is not None
    core.on_reply(1, None, BackendTimeout("x"), 0.0)
    assert send(core, 0.07) is None  # more than a quarter period early
    r = send(core, 0.08)  # 0.02 s early: within the tolerance
    assert r is not None
    core.on_reply(r.observation.seq, None, BackendTimeout("x"), 0.08)
    assert send(core, 0.17) is None  # the grid stays at 0.2 (not 0.08 + period)
    assert send(core, 0.18) is not None


def test_requests_never_exceed_one_per_period_with_a_fast_camera():
    core = make_core()
    core.set_instruction("pick")
    sent = []
    for i in range(200):  # 2 s of frames at 100 Hz
        t = i * 0.01
        req = send(core, t)
        if req is not None:
            sent.append(t)
            core.on_reply(req.observation.seq, None, BackendTimeout("x"), t)
    # The second request takes the early tolerance (0.08 s: first frame past 0.1 - 0.025); the grid keeps
    # its phase (0.2, 0.3, ...), so every later one also comes 0.02 s early: one per period from then on.
    assert sent[:3] == pytest.approx([0.0, 0.08, 0.18])
    assert np.allclose(np.diff(sent[1:]), PERIOD)
    assert len(sent) == 21


def test_a_pause_re_anchors_the_pace_and_no_burst_follows():
    core = make_core()
    core.set_instruction("pick")
    for t in (0.0, 0.1, 0.2):
        req = send(core, t)
        assert req is not None
        core.on_reply(req.observation.seq, None, BackendTimeout("x"), t)
    # No frame for 0.8 s (camera hiccup), then frames at 100 Hz again.
    sent = []
    for i in range(50):
        t = 1.0 + i * 0.01
        req = send(core, t)
        if req is not None:
            sent.append(t)
            core.on_reply(req.observation.seq, None, BackendTimeout("x"), t)
    # Re-anchored at 1.0: 1.0, 1.08 (early tolerance), 1.18, ... one per period; the slots missed in the
    # pause (0.3 ... 0.9) are not made up (without re-anchoring, every frame after 1.0 would be requested).
    assert sent == pytest.approx([1.0, 1.08, 1.18, 1.28, 1.38, 1.48])
    assert min(np.diff(sent)) >= 0.75 * PERIOD - EPS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 0.3), st.sampled_from(["error", "move", "chunk", "none"])),
                min_size=1, max_size=60))
def test_requests_average_at_most_one_per_period(events):
    """Whatever the frame timing and replies, between any two requests i < j, j - i <= span / period + 3/4
    (requests may come a quarter period early or half a period late on their grid, never more often)."""
    core = make_core(**{"policy.refill_threshold": 100})
    core.set_instruction("pick")
    now = 0.0
    sent = []
    for dt, kind in events:
        now += dt
        req = send(core, now)
        if req is not None:
            sent.append(now)
            seq = req.observation.seq
            if kind == "error":
                core.on_reply(seq, None, BackendTimeout("x"), now)
            elif kind == "move":
                answer(core, req, now)
            elif kind == "chunk":
                answer_chunk(core, req, now, [0.1] * 3)
            else:
                core.abandon_overdue(now + 10.0)
        core.pop_action(now)
    for i in range(len(sent)):
        for j in range(i + 1, len(sent)):
            assert j - i <= (sent[j] - sent[i]) / PERIOD + 0.75 + 1e-6


# -- release timing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("since_last_release", "at_once"), [(0.075 + 1e-6, True), (0.09, True), (0.2, True),
                                                              (0.07, False), (0.01, False)])
def test_a_one_action_reply_is_released_on_arrival_unless_the_last_release_was_recent(since_last_release, at_once):
    core = make_core()
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    answer(core, r1, 0.02)
    assert core.pop_action(0.02) is not None  # nothing released before: at once
    r2 = send(core, 0.1)
    arrival = 0.02 + since_last_release
    answer(core, r2, arrival)
    assert (core.pop_action(arrival) is not None) == at_once
    if not at_once:
        assert core.release_due_in(arrival) == pytest.approx(0.02 + 0.75 * PERIOD - arrival)
        assert core.pop_action(0.02 + 0.75 * PERIOD - 1e-6) is None  # not before 3/4 period after the last
        assert core.pop_action(0.02 + 0.75 * PERIOD + 1e-6) is not None


def test_a_chunk_is_released_one_action_per_call_at_most_one_per_three_quarter_period():
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0)
    assert answer_chunk(core, r, 0.03, [0.1, 0.2, 0.3]).accepted
    assert core.pop_action(0.03) is not None  # the first action of a chunk goes out on arrival
    assert core.pop_action(0.03) is None and core.pop_action(0.1) is None  # 0.07 s later: too soon
    assert core.pop_action(0.106).translation[0] == pytest.approx(0.2 * SCALE)
    assert core.queued == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["frame", "reply", "chunk", "pop", "pop", "instruction"]),
                          st.floats(0.0, 0.15)), max_size=60))
def test_at_most_one_release_per_three_quarter_period_whatever_arrives(events):
    core = make_core(**{"policy.refill_threshold": 5})
    core.set_instruction("pick")
    now = 0.0
    pending = []
    released = []
    for kind, dt in events:
        now += dt
        if kind == "frame":
            req = send(core, now)
            if req is not None:
                pending.append(req)
        elif kind in ("reply", "chunk") and pending:
            req = pending.pop(0)
            if kind == "reply":
                answer(core, req, now)
            else:
                answer_chunk(core, req, now, [0.1] * 4)
            if core.pop_action(now) is not None:  # as the node does on every queued reply
                released.append(now)
        elif kind == "instruction":
            core.set_instruction("another")
        elif kind == "pop" and core.pop_action(now) is not None:
            released.append(now)
    assert all(b - a >= 0.75 * PERIOD - 1e-9 for a, b in itertools.pairwise(released))


# -- freshness at release ---------------------------------------------------------------------------
def test_a_chunk_stops_being_released_once_its_observation_is_older_than_max_action_age():
    core = make_core(**{"policy.max_action_age_s": 1.0})
    core.set_instruction("pick")
    r = send(core, 0.0, age_s=0.2)  # the frame was already 0.2 s old when it was sent
    out = answer_chunk(core, r, 0.05, [0.1] * 30)
    assert out.accepted
    released = []
    for i in range(30):
        t = 0.05 + i * PERIOD
        core.on_frame(IMG, 100.0 + t, t)  # the camera stays fresh: only the observation's age matters
        if core.pop_action(t) is not None:
            released.append(t)
    # 0.2 s + (t - 0) <= 1.0 s: releases at 0.05 ... 0.75 s.
    assert len(released) == 8 and released[-1] == pytest.approx(0.75)
    assert core.counters["actions_expired"] == 22 and core.queued == 0
    assert core.counters["actions_dropped_camera_stale"] == 0


def test_a_queued_chunk_is_dropped_when_the_primary_camera_goes_stale():
    core = make_core(**{"policy.max_frame_age_s": 0.3})
    core.set_instruction("pick")
    r = send(core, 0.0)
    assert answer_chunk(core, r, 0.05, [0.1] * 10).accepted
    assert [core.pop_action(t) is not None for t in (0.05, 0.15, 0.25)] == [True] * 3
    assert core.pop_action(0.35) is None  # the last frame (t=0) is now 0.35 s old: the camera died
    assert core.counters["actions_dropped_camera_stale"] == 7 and core.queued == 0
    assert core.counters["actions_expired"] == 0
    core.on_frame(IMG, 10.0, 0.4)  # the camera comes back: the dropped chunk does not
    assert core.pop_action(0.45) is None


def test_expiry_is_checked_at_release_not_only_on_arrival():
    """A reply accepted as fresh (age <= max_reply_age_s) still expires while it waits for its release slot."""
    core = make_core(**{"backend.timeout_s": 0.5, "policy.max_reply_age_s": 0.5, "policy.max_action_age_s": 0.5,
                        "policy.max_frame_age_s": 5.0})
    core.set_instruction("pick")
    r1 = send(core, 0.0)
    answer(core, r1, 0.05)
    assert core.pop_action(0.05) is not None
    r2 = send(core, 0.1, age_s=0.49)
    assert answer(core, r2, 0.105).accepted  # 0.495 s old on arrival: accepted
    assert core.pop_action(0.105) is None and core.counters["actions_expired"] == 0  # too soon after 0.05
    assert core.pop_action(0.126) is None  # its slot: now 0.516 s old
    assert core.counters["actions_expired"] == 1 and core.queued == 0


def test_actions_left_waiting_in_the_queue_expire():
    """Actions the node did not release (e.g. the safety node was not executing the episode) do not run later."""
    core = make_core(**{"policy.max_action_age_s": 1.0, "policy.max_frame_age_s": 5.0})
    core.set_instruction("pick")
    r = send(core, 0.0)
    assert answer_chunk(core, r, 0.05, [0.1] * 4).accepted
    assert core.pop_action(1.01) is None
    assert core.counters["actions_expired"] == 4 and core.queued == 0


@settings(max_examples=300, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["frame", "frame", "old_frame", "reply", "chunk", "pop", "pop",
                                                   "pop"]), st.floats(0.0, 0.25)), max_size=60),
       max_action_age=st.floats(0.5, 1.5))
def test_a_released_action_is_never_older_than_its_bound_nor_released_on_a_stale_camera(events, max_action_age):
    core = make_core(**{"policy.max_action_age_s": max_action_age, "policy.refill_threshold": 3})
    core.set_instruction("pick")
    now = 0.0
    pending = []
    obs_age: dict[int, tuple[float, float]] = {}  # seq -> (sent_at, frame age at send)
    last_frame: tuple[float, float] | None = None  # (received_at, age on arrival)
    def release(now: float) -> None:
        action = core.pop_action(now)
        if action is not None:
            sent_at, age = obs_age[action.observation_seq]
            assert age + (now - sent_at) <= max_action_age + 1e-9
            assert last_frame is not None and last_frame[1] + now - last_frame[0] <= 0.3 + 1e-9

    for kind, dt in events:
        now += dt
        if kind in ("frame", "old_frame"):
            age = 0.25 if kind == "old_frame" else 0.0
            last_frame = (now, age)
            req = send(core, now, age_s=age)
            if req is not None:
                pending.append(req)
                obs_age[req.observation.seq] = (now, req.frame_age_at_send_s)
        elif kind in ("reply", "chunk") and pending:
            req = pending.pop(0)
            if kind == "reply":
                answer(core, req, now)
            else:
                answer_chunk(core, req, now, [0.1] * 6)
            release(now)  # as the node does on every queued reply
        elif kind == "pop":
            release(now)


# -- replies: size and config cross-checks ----------------------------------------------------------
@pytest.mark.parametrize(("rows", "accepted"), [(8, True), (9, False)])
def test_a_chunk_longer_than_max_chunk_length_is_rejected(rows, accepted):
    core = make_core(**{"policy.max_chunk_length": 8})
    core.set_instruction("pick")
    r = send(core, 0.0)
    out = answer_chunk(core, r, 0.05, [0.1] * rows)
    assert out.accepted == accepted
    if not accepted:
        assert out.reason == "invalid_tokens" and "policy.max_chunk_length" in out.detail
        assert core.counters["replies_invalid"] == 1 and core.queued == 0
        assert core.pop_action(0.05) is None
    else:
        assert core.queued == 8


@pytest.mark.parametrize(("values", "keys"), [
    ({"backend.timeout_s": 2.0, "policy.max_reply_age_s": 1.0}, ("policy.max_reply_age_s", "backend.timeout_s")),
    ({"backend.timeout_s": 0.5, "policy.max_reply_age_s": 2.0, "policy.max_action_age_s": 1.0},
     ("policy.max_action_age_s", "policy.max_reply_age_s")),
])
def test_config_cross_checks_name_both_keys(values, keys):
    with pytest.raises(ConfigError) as info:
        PolicyConfig.from_params({"backend.type": "scripted", **values})
    for key in keys:
        assert key in str(info.value)


def test_config_cross_checks_accept_equal_bounds():
    c = PolicyConfig.from_params({"backend.type": "scripted", "backend.timeout_s": 1.0,
                                  "policy.max_reply_age_s": 1.0, "policy.max_action_age_s": 1.0})
    assert c.backend_timeout_s == c.max_reply_age_s == c.max_action_age_s == 1.0
    defaults = PolicyConfig.from_params({"backend.type": "scripted"})  # the defaults satisfy the checks
    assert defaults.max_action_age_s == 1.0 and defaults.max_chunk_length == 100


# -- stamps carried along ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["text", "chunk"])
def test_actions_carry_the_stamp_of_the_observation_they_answer(kind):
    core = make_core()
    core.set_instruction("pick")
    r = send(core, 0.0, stamp=1234.5)
    out = answer(core, r, 0.05) if kind == "text" else answer_chunk(core, r, 0.05, [0.1, 0.2])
    assert out.frame_stamp == 1234.5
    assert out.actions and all(a.observation_stamp == 1234.5 for a in out.actions)
    assert core.pop_action(0.05).observation_stamp == 1234.5


def test_an_unanswered_action_has_no_observation_stamp():
    from rt2_ros.actions import ArmAction
    assert math.isnan(ArmAction.hold().observation_stamp)


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


def test_observation_carries_gripper_positions_and_the_stamp_of_each_state_piece():
    core = make_core(**{"policy.max_pose_age_s": 0.5})
    core.joint_max_age_s = 0.5
    core.set_instruction("pick")
    core.on_state(10.0, **POSE, stamp=100.0)
    core.on_state(10.1, gripper=0.25, joint_positions=[0.1, 0.2], gripper_positions=[0.03, 0.031], stamp=100.1)
    obs = send(core, 10.2).observation
    assert obs.gripper_positions.tolist() == [0.03, 0.031] and obs.gripper_positions.dtype == np.float64
    assert obs.state_stamps == {"ee_pose": 100.0, "gripper": 100.1, "joint_positions": 100.1,
                                "gripper_positions": 100.1}
    core.on_reply(obs.seq, None, BackendTimeout("x"), 10.2)
    # At 10.55 the pose (measured at 10.0) is 0.55 s old: left out, and so is its stamp.
    obs = send(core, 10.55).observation
    assert obs.ee_position is None and "ee_pose" not in obs.state_stamps
    assert set(obs.state_stamps) == {"gripper", "joint_positions", "gripper_positions"}


@pytest.mark.parametrize(("piece", "fields"), [
    ("ee_pose", ("ee_position", "ee_orientation")),
    ("gripper", ("gripper",)),
    ("joint_positions", ("joint_positions",)),
    ("gripper_positions", ("gripper_positions",)),
])
def test_stale_state_is_never_sent(piece, fields):
    """Each piece has its own stamp: a stale one is left out (None) and counted, the others still go."""
    core = make_core(**{"policy.max_pose_age_s": 0.3, "policy.max_frame_age_s": 5.0})
    core.joint_max_age_s = 0.3
    core.set_instruction("pick")
    # Everything measured at t=0 (age 0.1 s on arrival) ...
    core.on_state(0.0, **POSE, stamp=50.0, age_s=0.1)
    core.on_state(0.0, gripper=1.0, joint_positions=[0.5], gripper_positions=[0.0, 0.0], stamp=50.0, age_s=0.1)
    # ... then every piece but ``piece`` refreshed at t=1.
    if piece != "ee_pose":
        core.on_state(1.0, **POSE, stamp=51.0, age_s=0.0)
    if piece != "gripper":
        core.on_state(1.0, gripper=1.0, stamp=51.0)
    if piece != "joint_positions":
        core.on_state(1.0, joint_positions=[0.5], stamp=51.0)
    if piece != "gripper_positions":
        core.on_state(1.0, gripper_positions=[0.0, 0.0], stamp=51.0)
    obs = send(core, 1.05).observation
    all_fields = ("ee_position", "ee_orientation", "gripper", "joint_positions", "gripper_positions")
    assert [f for f in all_fields if getattr(obs, f) is None] == list(fields)
    assert core.counters[f"state_stale_{piece}"] == 1
    assert piece not in obs.state_stamps and set(obs.state_stamps.values()) == {51.0}


def test_age_on_arrival_counts_and_the_bound_is_inclusive():
    core = make_core(**{"policy.max_pose_age_s": 0.3})
    core.joint_max_age_s = 0.2
    core.set_instruction("pick")
    core.on_state(0.0, gripper=0.0, stamp=1.0, age_s=0.15)  # 0.15 s old on arrival
    assert send(core, 0.05).observation.gripper == 0.0  # 0.2 s old: at the bound, still sent
    core.on_reply(1, None, BackendTimeout("x"), 0.06)
    assert send(core, 0.15).observation.gripper is None  # 0.3 s old: stale (next paced slot)
    core.on_reply(2, None, BackendTimeout("x"), 0.16)
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
@given(ages=st.lists(st.floats(0.0, 2.0), min_size=4, max_size=4), wait=st.floats(0.0, 2.0),
       bound=st.floats(0.01, 2.0))
def test_an_observation_never_carries_state_older_than_its_bound(ages, wait, bound):
    core = make_core(**{"policy.max_pose_age_s": bound, "policy.max_frame_age_s": 10.0})
    core.joint_max_age_s = bound
    core.set_instruction("pick")
    core.on_state(0.0, **POSE, age_s=ages[0], stamp=1.0)
    core.on_state(0.0, gripper=0.5, age_s=ages[1], stamp=2.0)
    core.on_state(0.0, joint_positions=[0.1], age_s=ages[2], stamp=3.0)
    core.on_state(0.0, gripper_positions=[0.01, 0.01], age_s=ages[3], stamp=4.0)
    obs = send(core, wait).observation
    values = (obs.ee_position, obs.gripper, obs.joint_positions, obs.gripper_positions)
    for age, value, piece in zip(ages, values, ("ee_pose", "gripper", "joint_positions", "gripper_positions"),
                                 strict=True):
        assert (value is not None) == (age + wait <= bound) == (piece in obs.state_stamps)
