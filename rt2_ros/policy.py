"""The policy loop without ROS: which observation to send, which reply to trust, what to execute.

DESIGN.md: "latency is a safety property". This module owns every rule about time:

* only the newest camera frame is sent, and only if it is fresh (``policy.max_frame_age_s``); with
  several cameras (rt2_ros.cameras) a request goes out per new primary frame, holding the newest
  frame of every camera under the alignment rule stated there;
* proprioception (end-effector pose, gripper, joint positions) carries its stamp and is sent only
  while fresh (``policy.max_pose_age_s``, the node's ``joints.max_age_s``): an observation never
  carries a stale state; a stale piece is left out (None) and counted (``state_stale_<piece>``);
* every request carries a sequence id; a reply is matched to its request, and a reply that
  answers an abandoned (timed-out), older or previous-episode request is dropped and counted;
* a reply whose observation is older than ``policy.max_reply_age_s`` when it arrives is dropped
  ("late"): an action computed for where the arm was is not executed where the arm is now;
* replies become a queue of actions released at most one per ``1 / policy.execute_rate_hz``
  (:meth:`PolicyCore.pop_action`): a one-action reply (RT-2) is released when it arrives, the
  first action of a chunk too, the rest one period apart; requests are paced at the same rate.
  Chunking backends (OpenVLA, openpi) return several; the next request goes out while
  ``policy.refill_threshold`` actions remain, a new chunk is aligned to the step its observation
  was taken at (actions meant for steps already executed are skipped) and blended with what is
  left of the old one; a chunk longer than ``policy.max_chunk_length`` is rejected;
* freshness is checked again at release: once an action's observation is older than
  ``policy.max_action_age_s``, or the primary camera has gone stale, the queue is dropped
  (counted): a queued chunk never runs on after the camera died.

The ROS node (``rt2_ros.nodes.policy_node``) only feeds frames, instructions and clock readings
in and publishes what comes out; the backend call itself runs on a worker thread there.
Rejected: executing a reply "whenever it comes" (LeRobot/OpenVLA bridges) — that is the
late-reply bug users report.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from rt2_ros.actions import DEFAULT_CAMERA, ArmAction, BackendReply, Observation
from rt2_ros.backends import BACKENDS
from rt2_ros.cameras import CameraConfig, FrameInfo, align
from rt2_ros.params import ConfigError, ParamSpec, resolve
from rt2_ros.text import clean_text
from rt2_ros.tokens import ActionTokenizer, TokenError

POLICY_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("backend.type", "string", "embedded", "Which VLA backend answers observations",
              choices=tuple(BACKENDS)),
    ParamSpec("backend.timeout_s", "double", 1.0, "Deadline of one backend request", "s", 0.05, 120.0),
    ParamSpec("policy.execute_rate_hz", "double", 10.0,
              "Rate at which queued actions are released to the safety node (one action per step)", "Hz", 0.5, 100.0),
    ParamSpec("policy.max_frame_age_s", "double", 0.5,
              "A camera frame older than this is never sent (stale camera -> no request -> watchdog hold)",
              "s", 0.01, 10.0),
    ParamSpec("policy.max_reply_age_s", "double", 1.0,
              "A reply whose camera frame is older than this when the reply arrives is dropped as late", "s",
              0.05, 120.0),
    ParamSpec("policy.refill_threshold", "int", 1,
              "Send the next request when at most this many queued actions remain", "actions", 0, 100),
    ParamSpec("policy.chunk_blend", "string", "latest_only",
              "How a new action chunk merges with the rest of the old one",
              choices=("latest_only", "weighted_average")),
    ParamSpec("policy.chunk_blend_weight", "double", 0.5,
              "weighted_average: weight of the new chunk on overlapping steps", "", 0.0, 1.0),
    ParamSpec("policy.base_frame", "string", "panda_link0", "Frame id of published arm actions (robot base)"),
    ParamSpec("policy.max_pose_age_s", "double", 0.5,
              "An ee_pose older than this when a request goes out is not sent (the observation carries no pose)",
              "s", 0.01, 10.0),
    ParamSpec("policy.max_action_age_s", "double", 1.0,
              "An action whose camera frame is older than this when it is due is dropped (counted "
              "actions_expired); >= policy.max_reply_age_s, <= the safety node's safety.max_action_age_s",
              "s", 0.05, 120.0),
    ParamSpec("policy.max_chunk_length", "int", 100,
              "A reply with more actions than this is rejected (invalid); bounds the queue", "actions", 1, 10000),
)

#: the part of a period by which a release or request may come early (timer and reply jitter)
_EARLY_FRACTION = 0.25
_FORGOTTEN_KEPT = 64  # forgotten requests remembered to count a straggling reply by its cause


@dataclass(frozen=True)
class PolicyConfig:
    backend_type: str
    backend_timeout_s: float
    execute_rate_hz: float
    max_frame_age_s: float
    max_reply_age_s: float
    refill_threshold: int
    chunk_blend: str
    chunk_blend_weight: float
    base_frame: str
    max_pose_age_s: float = 0.5
    max_action_age_s: float = 1.0
    max_chunk_length: int = 100

    @property
    def period_s(self) -> float:
        return 1.0 / self.execute_rate_hz

    @classmethod
    def from_params(cls, values: dict) -> PolicyConfig:
        """Build from flat ``backend.*``/``policy.*`` keys (other sections are ignored here); related
        keys are cross-checked (ConfigError names them)."""
        mine = {k: v for k, v in values.items() if k in {s.name for s in POLICY_PARAMS}}
        p = resolve(POLICY_PARAMS, mine)
        if p["policy.max_reply_age_s"] < p["backend.timeout_s"]:
            raise ConfigError(
                f"policy.max_reply_age_s ({p['policy.max_reply_age_s']} s) is below backend.timeout_s "
                f"({p['backend.timeout_s']} s): replies that arrive within the timeout would be dropped as late; "
                "raise policy.max_reply_age_s (and policy.max_action_age_s, which must stay >= it) or lower "
                "backend.timeout_s")
        if p["policy.max_action_age_s"] < p["policy.max_reply_age_s"]:
            raise ConfigError(
                f"policy.max_action_age_s ({p['policy.max_action_age_s']} s) is below policy.max_reply_age_s "
                f"({p['policy.max_reply_age_s']} s): replies accepted as fresh would be dropped before they run; "
                "raise policy.max_action_age_s or lower policy.max_reply_age_s")
        return cls(p["backend.type"], p["backend.timeout_s"], p["policy.execute_rate_hz"],
                   p["policy.max_frame_age_s"], p["policy.max_reply_age_s"], p["policy.refill_threshold"],
                   p["policy.chunk_blend"], p["policy.chunk_blend_weight"], p["policy.base_frame"],
                   p["policy.max_pose_age_s"], p["policy.max_action_age_s"], p["policy.max_chunk_length"])


@dataclass(frozen=True)
class Request:
    """An observation on its way to the backend."""

    observation: Observation
    episode_id: int
    sent_at: float  # monotonic seconds
    frame_age_at_send_s: float
    step_at_send: int  # execute-step counter when the frame was sent (chunk alignment)


@dataclass(frozen=True)
class ReplyOutcome:
    """What became of one reply; the node publishes it (tokens message, log line)."""

    seq: int
    accepted: bool
    reason: str  # "ok" or why it was dropped/rejected: late, stale_episode, unknown_seq, invalid_tokens, ...
    detail: str = ""
    bins: np.ndarray | None = None
    plan: str = ""
    text: str = ""
    actions: tuple[ArmAction, ...] = ()
    latency_s: float = math.nan
    server_time_s: float = math.nan
    backend: str = ""
    frame_stamp: float = math.nan  # ROS time of the camera frame the reply answers (accepted replies)

    def __post_init__(self) -> None:
        # Text from the backend goes into ROS messages and log lines: valid UTF-8, bounded, no secrets.
        for name in ("reason", "detail", "plan", "text", "backend"):
            object.__setattr__(self, name, clean_text(getattr(self, name)))


@dataclass
class _Frame:
    image: np.ndarray
    stamp: float  # ROS time, seconds
    received_at: float  # monotonic
    age_at_receipt_s: float

    def age(self, now: float) -> float:
        return self.age_at_receipt_s + (now - self.received_at)


@dataclass(frozen=True)
class _Queued:
    action: ArmAction
    request: Request  # whose observation it answers (its age at any moment)

    def age(self, now: float) -> float:
        return self.request.frame_age_at_send_s + (now - self.request.sent_at)


@dataclass(frozen=True)
class _StatePiece:
    value: object
    stamp: float  # ROS time of the measurement, seconds
    received_at: float  # monotonic
    age_at_receipt_s: float

    def age(self, now: float) -> float:
        return self.age_at_receipt_s + (now - self.received_at)


@dataclass
class PolicyCore:
    """Sequencing, freshness, chunk queue. Not thread-safe: call from one thread (the node's)."""

    config: PolicyConfig
    tokenizer: ActionTokenizer
    backend_name: str = "backend"
    counters: Counter = field(default_factory=Counter)
    joint_max_age_s: float = 0.5  # bound of gripper and joint positions (the node's joints.max_age_s)
    cameras: tuple[CameraConfig, ...] = (CameraConfig(DEFAULT_CAMERA),)  # primary first (rt2_ros.cameras)

    def __post_init__(self) -> None:
        self.instruction = ""
        self.episode_id = 0
        self.finished = False  # terminate executed: no requests until a new instruction
        self._seq = 0
        self._frames: dict[str, _Frame] = {}
        self._last_sent_frame_stamp: float | None = None
        self._blocked_frame_stamp: float | None = None  # primary frame already counted as blocked
        self._state: dict[str, _StatePiece] = {}
        self._in_flight: dict[int, Request] = {}
        # Requests forgotten before their reply (instruction changed, abandoned at the deadline): seq ->
        # (drop reason, detail, sent at), so a straggling reply is counted by its real cause.
        self._forgotten: OrderedDict[int, tuple[str, str, float]] = OrderedDict()
        self._queue: deque[_Queued] = deque()
        self._step = 0
        self._next_request_at = -math.inf  # monotonic; requests are paced at the execute rate
        self._last_request_at = -math.inf
        self._last_release_at = -math.inf
        self.last_latency_s = math.nan

    @property
    def primary_camera(self) -> str:
        return self.cameras[0].name

    # -- inputs ---------------------------------------------------------------------------------
    def set_instruction(self, text: str) -> int:
        """A new instruction starts a new episode (even if the text repeats); empty -> idle."""
        self.instruction = text.strip()
        self.episode_id += 1
        self.finished = False
        self._queue.clear()
        for seq, req in self._in_flight.items():
            self._forget(seq, req, "stale_episode", "instruction changed while the request was in flight")
        self._in_flight.clear()
        return self.episode_id

    def stop(self) -> None:
        """End the episode on this side: no requests, an empty queue, in-flight replies dropped as stale."""
        self.set_instruction("")

    def on_frame(self, image: np.ndarray, stamp: float, now: float, age_s: float = 0.0, camera: str = "") -> None:
        """Keep only the latest frame of ``camera`` ("" = the primary); ``age_s`` is its age (ROS now -
        header stamp) on arrival."""
        name = camera or self.primary_camera
        if name not in {c.name for c in self.cameras}:
            raise ValueError(f"on_frame: unknown camera {name!r} (configured: {[c.name for c in self.cameras]})")
        self._frames[name] = _Frame(image, stamp, now, max(0.0, age_s))

    def camera_stale(self, now: float) -> bool:
        """The primary camera has no frame younger than its bound (no request can go out)."""
        frame = self._frames.get(self.primary_camera)
        return frame is None or frame.age(now) > self.cameras[0].age_bound(self.config.max_frame_age_s)

    def on_state(self, now: float, *, ee_position=None, ee_orientation=None, gripper: float | None = None,
                 joint_positions=None, gripper_positions=None, stamp: float = math.nan, age_s: float = 0.0) -> None:
        """Store measured state taken at ROS time ``stamp``; ``age_s`` is its age (ROS now - stamp) on
        arrival, ``now`` the monotonic clock. A pose needs both position and orientation (one message)."""
        age = max(0.0, float(age_s))
        if (ee_position is None) != (ee_orientation is None):
            raise ValueError("on_state: ee_position and ee_orientation come together (one pose message)")
        if ee_position is not None:
            pose = (np.asarray(ee_position, dtype=np.float64).reshape(3),
                    np.asarray(ee_orientation, dtype=np.float64).reshape(4))
            self._state["ee_pose"] = _StatePiece(pose, stamp, now, age)
        if gripper is not None:
            self._state["gripper"] = _StatePiece(float(gripper), stamp, now, age)
        for piece, value in (("joint_positions", joint_positions), ("gripper_positions", gripper_positions)):
            if value is not None:
                self._state[piece] = _StatePiece(np.asarray(value, dtype=np.float64).reshape(-1), stamp, now, age)

    def state_max_age_s(self, piece: str) -> float:
        return self.config.max_pose_age_s if piece == "ee_pose" else self.joint_max_age_s

    def fresh_state(self, now: float) -> dict:
        """The Observation state fields whose pieces are within their age bound at ``now`` (others None),
        with ``state_stamps``: the ROS stamp of each piece included."""
        fresh: dict[str, object] = {}
        stamps: dict[str, float] = {}
        for piece, entry in self._state.items():
            if entry.age(now) <= self.state_max_age_s(piece):
                fresh[piece] = entry.value
                stamps[piece] = entry.stamp
        pose = fresh.get("ee_pose")
        return {"ee_position": None if pose is None else pose[0],
                "ee_orientation": None if pose is None else pose[1],
                "gripper": fresh.get("gripper"), "joint_positions": fresh.get("joint_positions"),
                "gripper_positions": fresh.get("gripper_positions"), "state_stamps": stamps}

    # -- requests -------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.instruction) and not self.finished

    def abandon_overdue(self, now: float) -> list[int]:
        """Forget requests past their deadline (their replies, if any, count as late)."""
        overdue = [s for s, r in self._in_flight.items() if now - r.sent_at > self.config.backend_timeout_s + 0.5]
        for s in overdue:
            self._forget(s, self._in_flight.pop(s), "late", "answered after its request was abandoned at the deadline")
            self.counters["requests_abandoned"] += 1
        return overdue

    def _forget(self, seq: int, req: Request, reason: str, detail: str) -> None:
        self._forgotten[seq] = (reason, detail, req.sent_at)
        while len(self._forgotten) > _FORGOTTEN_KEPT:
            self._forgotten.popitem(last=False)

    def next_request(self, now: float) -> Request | None:
        """The observation to send now, or None (nothing to do, busy, or no fresh frame)."""
        if not self.active or self._in_flight or len(self._queue) > self.config.refill_threshold:
            return None
        period = self.config.period_s
        if now < self._next_request_at - _EARLY_FRACTION * period or \
                now - self._last_request_at < (1.0 - _EARLY_FRACTION) * period:
            return None  # paced at the execute rate: one action per period is all that can run
        frame = self._frames.get(self.primary_camera)
        if frame is None:
            return None
        age = frame.age(now)
        if frame.stamp == self._last_sent_frame_stamp:  # never send the same frame twice: wait for a new one
            if age > self.cameras[0].age_bound(self.config.max_frame_age_s):
                self._count_blocked(frame, "frames_stale")  # the camera stopped after its last frame went out
            return None
        if age > self.cameras[0].age_bound(self.config.max_frame_age_s):
            self._count_blocked(frame, "frames_stale")
            return None
        chosen, blocked = align(self.cameras, {n: FrameInfo(f.stamp, f.age(now)) for n, f in self._frames.items()},
                                self.config.max_frame_age_s)
        if blocked:
            self._count_blocked(frame, f"frames_{blocked}")
            return None
        self._seq += 1
        state = self.fresh_state(now)
        for piece, entry in self._state.items():
            if entry.age(now) > self.state_max_age_s(piece):
                self.counters[f"state_stale_{piece}"] += 1  # left out of this observation
        images = {n: self._frames[n].image for n in chosen}
        obs = Observation(image=frame.image, instruction=self.instruction, seq=self._seq, stamp=frame.stamp,
                          images=images, image_stamps={n: self._frames[n].stamp for n in chosen}, **state)
        req = Request(obs, self.episode_id, now, age, self._step)
        self._in_flight[obs.seq] = req
        self._last_sent_frame_stamp = frame.stamp
        self._next_request_at = self._next_on_grid(self._next_request_at, now)
        self._last_request_at = now
        self.counters["requests_sent"] += 1
        return req

    def _count_blocked(self, frame: _Frame, counter: str) -> None:
        """Count a primary frame that cannot go out once, not at every poll that finds it blocked."""
        if self._blocked_frame_stamp != frame.stamp:
            self._blocked_frame_stamp = frame.stamp
            self.counters[counter] += 1

    def _next_on_grid(self, due: float, now: float) -> float:
        """The next due time one period after ``due``; re-anchored at ``now`` once behind by half a period
        (a pause must not be followed by a burst)."""
        period = self.config.period_s
        return due + period if now - due < 0.5 * period else now + period

    # -- replies --------------------------------------------------------------------------------
    def on_reply(self, seq: int, reply: BackendReply | None, error: BaseException | None, now: float
                 ) -> ReplyOutcome:
        """Match a reply (or the error of its request) to its request and queue its actions."""
        req = self._in_flight.pop(seq, None)
        if req is None:
            forgotten = self._forgotten.pop(seq, None)
            if forgotten is not None:
                reason, detail, sent_at = forgotten
                return self._drop(seq, reason, detail, reply, now - sent_at)
            return self._drop(seq, "unknown_seq", "reply to no request of this node", reply)
        latency = now - req.sent_at
        self.last_latency_s = latency
        if error is not None:
            self.counters["backend_errors"] += 1
            return ReplyOutcome(seq, False, "backend_error", f"{type(error).__name__}: {error}",
                                latency_s=latency, backend=self.backend_name)
        assert reply is not None
        if reply.seq != seq:
            return self._drop(seq, "seq_mismatch", f"backend answered seq {reply.seq}", reply, latency)
        if req.episode_id != self.episode_id:
            return self._drop(seq, "stale_episode", "instruction changed while the request was in flight",
                              reply, latency)
        age = req.frame_age_at_send_s + latency
        if age > self.config.max_reply_age_s:
            return self._drop(seq, "late", f"frame was {age:.2f}s old at reply (max {self.config.max_reply_age_s}s)",
                              reply, latency)
        try:
            bins, plan, actions = self._decode(reply, seq)
        except (TokenError, ValueError) as exc:
            self.counters["replies_invalid"] += 1
            return ReplyOutcome(seq, False, "invalid_tokens", str(exc), text=reply.text or "", latency_s=latency,
                                server_time_s=reply.server_time_s, backend=reply.backend)
        stamp = req.observation.stamp
        actions = [dataclasses.replace(a, observation_stamp=stamp) for a in actions]
        self._enqueue(actions, req)
        self.counters["replies_accepted"] += 1
        return ReplyOutcome(seq, True, "ok", "", bins, plan, reply.text or "", tuple(actions), latency,
                            reply.server_time_s, reply.backend, req.observation.stamp)

    def _drop(self, seq: int, reason: str, detail: str, reply: BackendReply | None, latency: float = math.nan
              ) -> ReplyOutcome:
        self.counters[f"replies_dropped_{reason}"] += 1
        return ReplyOutcome(seq, False, reason, detail, text=(reply.text or "") if reply else "", latency_s=latency,
                            backend=reply.backend if reply else self.backend_name)

    def _decode(self, reply: BackendReply, seq: int) -> tuple[np.ndarray | None, str, list[ArmAction]]:
        answers = sum(x is not None for x in (reply.text, reply.token_ids, reply.actions))
        if answers != 1:
            raise ValueError(f"reply must carry exactly one of text/token_ids/actions, got {answers}")
        if reply.text is not None:
            parsed = self.tokenizer.parse_text(reply.text)
            return parsed.bins, parsed.plan, [self.tokenizer.decode(parsed.bins, observation_seq=seq)]
        if reply.token_ids is not None:
            bins = self.tokenizer.bins_from_ids(reply.token_ids)
            return bins, "", [self.tokenizer.decode(bins, observation_seq=seq)]
        chunk = np.asarray(reply.actions, dtype=np.float64)
        if chunk.ndim == 1:
            chunk = chunk[None, :]
        if chunk.ndim != 2 or chunk.shape[0] == 0:
            raise ValueError(f"action chunk must have shape (horizon, dim), got {chunk.shape}")
        if chunk.shape[0] > self.config.max_chunk_length:
            raise ValueError(f"action chunk of {chunk.shape[0]} actions exceeds policy.max_chunk_length "
                             f"({self.config.max_chunk_length})")
        return None, "", [self.tokenizer.decode_continuous(row, observation_seq=seq) for row in chunk]

    def _enqueue(self, actions: list[ArmAction], req: Request) -> None:
        if len(actions) == 1:
            # One action per reply (RT-2 style): it is the next step, after those already queued.
            self._queue.append(_Queued(actions[0], req))
            return
        # A chunk: actions meant for steps that already ran while the request was in flight are
        # skipped (the last one is always kept), and the chunk supersedes the old chunk's rest.
        skip = min(max(0, self._step - req.step_at_send), len(actions) - 1)
        new = list(actions[skip:])
        self.counters["chunk_actions_skipped"] += skip
        old = [q.action for q in self._queue]
        if self.config.chunk_blend == "weighted_average" and old:
            w = self.config.chunk_blend_weight
            for i in range(min(len(old), len(new))):
                a, b = old[i], new[i]
                if a.terminate or b.terminate or a.gripper_relative != b.gripper_relative:
                    continue  # terminate and gripper mode switches are never averaged away
                new[i] = dataclasses.replace(b, translation=w * b.translation + (1 - w) * a.translation,
                                             rotation=w * b.rotation + (1 - w) * a.rotation)
        self._queue = deque(_Queued(a, req) for a in new)

    # -- execution ------------------------------------------------------------------------------
    def release_due_in(self, now: float) -> float:
        """Seconds until the next action may be released (<= 0: now)."""
        return self._last_release_at + (1.0 - _EARLY_FRACTION) * self.config.period_s - now

    def pop_action(self, now: float) -> ArmAction | None:
        """The action to release at monotonic ``now``, or None (empty, too soon after the last one, or expired).

        Call it when a reply was queued and from a timer at the execute period: an action is released
        as soon as it is queued unless the previous one went out less than 3/4 of a period ago.
        """
        if not self.active or not self._queue or self.release_due_in(now) > 0:
            return None
        if self.camera_stale(now):
            self.counters["actions_dropped_camera_stale"] += len(self._queue)
            self._queue.clear()
            return None
        while self._queue and self._queue[0].age(now) > self.config.max_action_age_s:
            self._queue.popleft()  # a fresher reply queued behind an expired one may still run
            self.counters["actions_expired"] += 1
        if not self._queue:
            return None
        head = self._queue.popleft()
        self._step += 1
        self._last_release_at = now
        action = head.action
        if action.terminate:
            self.finished = True
            self._queue.clear()
            self.counters["episodes_terminated"] += 1
        return action

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
