"""The episode protocol's policy side (rt2_ros.episode), without ROS."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.episode import NO_EPISODE, EpisodeTracker, Outcome, short_id

STATES = ("IDLE", "RUNNING", "HOLDING", "TERMINATED", "ESTOPPED", "FAULT", "INACTIVE")


def started(ack_timeout: float = 2.0):
    tracker = EpisodeTracker(ack_timeout)
    ep, old = tracker.start("pick up the red block", now=0.0)
    assert old is None
    return tracker, ep


def test_ids_are_random_and_never_the_empty_id():
    tracker = EpisodeTracker(1.0)
    ids = {tracker.start("x", now=float(i))[0].episode_id for i in range(200)}
    assert len(ids) == 200 and NO_EPISODE not in ids
    assert short_id(NO_EPISODE) == "none"


def test_nothing_is_executed_before_the_safety_node_names_the_episode():
    tracker, ep = started()
    assert not tracker.may_execute
    # A status from before our announcement (the previous episode, or none) is not an acknowledgement.
    assert tracker.on_safety_status(NO_EPISODE, "IDLE", "", 0.1) is None
    assert not tracker.may_execute
    assert tracker.on_safety_status(ep.episode_id, "HOLDING", "", 0.2) is None
    assert tracker.may_execute and ep.acknowledged


def test_no_acknowledgement_in_time_is_a_fault_naming_the_state():
    tracker, _ = started(ack_timeout=0.5)
    tracker.on_safety_status(NO_EPISODE, "INACTIVE", "", 0.1)
    assert tracker.check(0.4) is None
    ending = tracker.check(0.6)
    assert ending is not None and ending.outcome == Outcome.FAULT and "INACTIVE" in ending.message


@pytest.mark.parametrize(("state", "outcome"), [
    ("TERMINATED", Outcome.TERMINATED), ("ESTOPPED", Outcome.ESTOPPED), ("FAULT", Outcome.FAULT),
    ("IDLE", Outcome.FAULT), ("INACTIVE", Outcome.FAULT)])
def test_safety_states_end_the_episode(state, outcome):
    tracker, ep = started()
    tracker.on_safety_status(ep.episode_id, "RUNNING", "", 0.1)
    ending = tracker.on_safety_status(ep.episode_id, state, "estop: button", 0.2)
    assert ending is not None and ending.outcome == outcome


def test_e_stop_before_the_acknowledgement_ends_it_too():
    tracker, ep = started()
    ending = tracker.on_safety_status(ep.episode_id, "ESTOPPED", "", 0.1)
    assert ending is not None and ending.outcome == Outcome.ESTOPPED


def test_a_restarted_or_reset_safety_node_ends_an_acknowledged_episode():
    tracker, ep = started()
    tracker.on_safety_status(ep.episode_id, "RUNNING", "", 0.1)
    ending = tracker.on_safety_status(NO_EPISODE, "IDLE", "", 0.2)  # the restarted node knows no episode
    assert ending is not None and ending.outcome == Outcome.FAULT and "restarted" in ending.message


def test_a_new_episode_preempts_the_old_one():
    tracker, first = started()
    second, old = tracker.start("put it in the tray", now=1.0)
    assert old is first and first.outcome == Outcome.PREEMPTED
    assert second.episode_id != first.episode_id and tracker.current is second
    # The old episode's status no longer concerns the tracker.
    assert tracker.on_safety_status(first.episode_id, "TERMINATED", "", 1.1) is None


def test_time_limit():
    tracker = EpisodeTracker(10.0)
    ep, _ = tracker.start("x", now=0.0, time_limit_s=3.0)
    tracker.on_safety_status(ep.episode_id, "RUNNING", "", 0.1)
    assert tracker.check(2.9) is None
    ending = tracker.check(3.1)
    assert ending is not None and ending.outcome == Outcome.TIME_LIMIT


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["start", "status_mine", "status_other", "check", "end"]),
                          st.sampled_from(STATES), st.floats(0.0, 1.0)), max_size=40))
def test_execution_only_while_the_safety_node_runs_this_episode(events):
    """Property: may_execute implies the last status named the current episode in RUNNING or HOLDING."""
    tracker = EpisodeTracker(0.5)
    now = 0.0
    last_status: tuple[bytes, str] | None = None
    for kind, state, dt in events:
        now += dt
        ending = None
        if kind == "start":
            tracker.start("task", now)
        elif kind == "status_mine" and tracker.current is not None:
            last_status = (tracker.current.episode_id, state)
            ending = tracker.on_safety_status(tracker.current.episode_id, state, "", now)
        elif kind == "status_other":
            last_status = (NO_EPISODE, state)
            ending = tracker.on_safety_status(NO_EPISODE, state, "", now)
        elif kind == "check":
            ending = tracker.check(now)
        elif kind == "end":
            tracker.end(Outcome.CANCELLED, "test", now)
        if ending is not None:
            tracker.end(ending.outcome, ending.message, now)
        if tracker.may_execute:
            assert tracker.current is not None and last_status is not None
            assert last_status[0] == tracker.current.episode_id and last_status[1] in ("RUNNING", "HOLDING")
