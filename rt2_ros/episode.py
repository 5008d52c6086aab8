"""The episode protocol between the policy and the safety node, without ROS.

One episode = one accepted instruction or ExecuteInstruction goal, named by a random UUID (never
a counter: a restarted node would start counting again and either side would mistake old for
new). The policy node announces it on ``episode``; the safety node executes only actions of the
episode it was last told is current and reports that episode in its status. The policy node
follows the safety node through :class:`EpisodeTracker`:

* It publishes actions only after the safety node *acknowledged* the episode (its status names
  the episode). No acknowledgement within ``policy.safety_ack_timeout_s`` ends the episode with
  FAULT: the safety node is missing, inactive or e-stopped under another episode.
* After the acknowledgement, a status that names the episode in ESTOPPED, FAULT, IDLE or
  INACTIVE ends it (e-stop, latched fault, reset, deactivation), and so does a status that names
  another episode (the safety node was restarted or reset): the policy stops requesting and
  clears its queue; only a fresh instruction starts motion again.
* TERMINATED for the episode ends it as done (the model's terminate token was executed).

Rejected: "execute the highest id seen" (a restarted policy node's low ids were dropped forever,
and a straggler of the previous episode could resume motion); re-announcing an episode to a
restarted safety node (the arm would resume a task after a crash without anybody asking).
"""

from __future__ import annotations

import enum
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

NO_EPISODE = bytes(16)

# Safety states (SafetyStatus.state_name) in which an acknowledged episode goes on.
_CONTINUE_STATES = frozenset({"RUNNING", "HOLDING"})


class Outcome(enum.IntEnum):
    """How an episode ended (= ExecuteInstruction result constants)."""

    TERMINATED = 0  # the model sent terminate and the safety node executed it
    TIME_LIMIT = 1
    CANCELLED = 2
    PREEMPTED = 3
    ESTOPPED = 4
    FAULT = 5
    ABORTED = 6  # the policy node itself stopped (deactivated, shut down)


def new_episode_id() -> bytes:
    return uuid.uuid4().bytes


def uuid_bytes(msg: Any) -> bytes:
    """An episode id as 16 bytes from its unique_identifier_msgs/UUID message (anything with ``.uuid``)."""
    return bytes(bytearray(msg.uuid))


def short_id(episode_id: bytes) -> str:
    """The first 8 hex digits: enough to tell episodes apart in a log line."""
    return "none" if episode_id == NO_EPISODE else episode_id.hex()[:8]


@dataclass
class Episode:
    episode_id: bytes
    instruction: str
    started_at: float  # monotonic s
    time_limit_s: float = 0.0  # 0: none
    acknowledged: bool = False
    safety_state: str = ""  # last state the safety node reported for this episode
    outcome: Outcome | None = None
    message: str = ""
    ended_at: float = math.nan
    counters: dict[str, int] = field(default_factory=dict)
    stamp: Any = None  # ROS time the episode was accepted (the node's builtin_interfaces/Time)


@dataclass(frozen=True)
class Ending:
    outcome: Outcome
    message: str


class EpisodeTracker:
    """The policy side's view of the current episode. Not thread-safe: one thread (the executor)."""

    def __init__(self, ack_timeout_s: float) -> None:
        self.ack_timeout_s = ack_timeout_s
        self.current: Episode | None = None
        self.safety_state = ""  # the safety node's last reported state, whatever the episode

    def start(self, instruction: str, now: float, time_limit_s: float = 0.0) -> tuple[Episode, Episode | None]:
        """A new episode; returns it and the one it preempted (already ended with PREEMPTED)."""
        old = self.end(Outcome.PREEMPTED, f"preempted by {instruction!r}", now)
        self.current = Episode(new_episode_id(), instruction, now, max(0.0, time_limit_s))
        return self.current, old

    def end(self, outcome: Outcome, message: str, now: float) -> Episode | None:
        """End the current episode (if any) and return it with its outcome set."""
        ep = self.current
        if ep is None:
            return None
        ep.outcome, ep.message, ep.ended_at = outcome, message, now
        self.current = None
        return ep

    @property
    def may_execute(self) -> bool:
        """Actions may be published: the safety node acknowledged the episode and is executing it."""
        ep = self.current
        return ep is not None and ep.acknowledged and ep.safety_state in _CONTINUE_STATES

    def on_safety_status(self, episode_id: bytes, state_name: str, reasons: str, now: float) -> Ending | None:
        """Follow one SafetyStatus; returns how the current episode must end, or None."""
        self.safety_state = state_name
        ep = self.current
        if ep is None:
            return None
        if episode_id == ep.episode_id:
            ep.acknowledged = True
            ep.safety_state = state_name
            detail = f": {reasons}" if reasons else ""
            if state_name == "TERMINATED":
                return Ending(Outcome.TERMINATED, "the model sent terminate")
            if state_name == "ESTOPPED":
                return Ending(Outcome.ESTOPPED, f"e-stop latched on the safety node{detail}")
            if state_name in _CONTINUE_STATES:
                return None
            return Ending(Outcome.FAULT, f"safety node is {state_name}{detail}")
        if ep.acknowledged:
            return Ending(Outcome.FAULT, f"the safety node no longer executes this episode (it is {state_name} "
                                         "without it: restarted, reset or deactivated); send a new instruction")
        return None  # not acknowledged yet: the status predates our announcement

    def check(self, now: float) -> Ending | None:
        """Time-based endings: no acknowledgement in time, or the goal's time limit."""
        ep = self.current
        if ep is None:
            return None
        if not ep.acknowledged and now - ep.started_at > self.ack_timeout_s:
            state = f" (its state: {self.safety_state})" if self.safety_state else " (no status received)"
            return Ending(Outcome.FAULT, f"the safety node did not take the episode within {self.ack_timeout_s:g} s"
                                         f"{state}; is rt2_safety running and active?")
        if ep.time_limit_s > 0.0 and now - ep.started_at > ep.time_limit_s:
            return Ending(Outcome.TIME_LIMIT, f"time limit of {ep.time_limit_s:g} s reached")
        return None
