"""The safety filter: every policy action passes through here before it can move the arm.

Why a separate, pure module: the safety logic must be exhaustively testable (property tests
drive tens of thousands of random token sequences through it) and must not depend on ROS
timing, executors or message types. The ROS safety node only feeds it actions, clock ticks,
measured poses and operator events, and publishes the :class:`SafeCommand` it returns.

Model of control (MoveIt Servo style):

* Policy actions arrive slowly (1–10 Hz) as per-step deltas. :meth:`SafetyFilter.on_action`
  turns each into a *commanded target pose*: previous commanded target + clipped delta. The
  target accumulates on the commanded pose, not the measured one, so tracking lag or sensor
  noise does not feed back into the targets (no drift, no integrator wind-up through the
  measurement).
* :meth:`SafetyFilter.tick` runs at the command rate (30–50 Hz) and emits a twist: P-control
  from the current position toward the target, limited in speed and acceleration, and
  limited so that the motion over the look-ahead horizon cannot leave the workspace box or
  enter a keep-out box. The twist is re-published every tick, freshly computed, because
  MoveIt Servo drops stale commands.
* *Hold* always means: zero twist immediately (the acceleration limit never delays a stop;
  MoveIt Servo and the arm controller do the physical deceleration), the target frozen at the
  current pose, the gripper command frozen where it is (never opened: that would drop a
  grasped object).
* The gripper command may be *unknown* (None): a new filter does not know whether the gripper
  holds an object, and a (re)started safety node that commanded "open" on its own would drop
  what the arm held when it crashed. Nothing is commanded until an action gives an absolute
  gripper value (taken at once, not ramped from an invented one); relative gripper actions
  are ignored while unknown.
* Freshness is judged where data is used, on the caller's clock (the node converts ROS stamps
  to ``time.monotonic()`` at arrival: ``t = now - (ros_now - stamp)``), not only where it
  arrives. "Executing" an action means two things, and the age bound holds for both: applying
  its delta to the target (on arrival, :meth:`SafetyFilter.on_action`) and pursuing that
  target (every :meth:`SafetyFilter.tick`). An action whose camera frame is older than
  ``max_action_age_s`` is refused on arrival, and a target stops being pursued (hold) the first
  tick its frame is older than that, however recently it arrived. The measured pose is used
  only while younger than ``max_pose_age_s``: past that, hold — no dead reckoning toward a
  target on a pose nobody measured. Unknown ages (no stamp) count as too old; stamps ahead of
  the clock by more than ``max_future_stamp_s`` are refused (clock trouble, not freshness).
* Bursts: at most one step per ``min_action_interval_s`` (by arrival) reaches the target;
  further actions in that interval are dropped and counted, so a queue that flushes N actions
  at once moves the target one step, not N (a per-action step limit alone would allow N).
  Dropping was preferred to queueing them (that would execute old steps late) and to a rate
  limit on the target (that would still execute all N, just later).
* Limits can change at run time (:meth:`SafetyFilter.check_config`,
  :meth:`SafetyFilter.update_config`): speeds, steps and timeouts take effect on the next
  tick; a new workspace/keep-out geometry is refused while it would exclude the arm or its
  target, and otherwise holds a running episode so the next action starts from the arm's pose.

State machine (see docs/safety.md for the diagram): IDLE -> RUNNING on ``start_episode``;
RUNNING <-> HOLDING on watchdog, stale pose or target, or a rejected action vs. a fresh valid
action; TERMINATED on a terminate action (until the next ``start_episode``); FAULT on
``fault()`` (self-clearing by the next valid action unless latched); ESTOPPED on ``estop()``,
which wins over everything and is left only through ``reset_estop()`` (-> IDLE, a new episode
is then required).

Rejected alternatives: accumulating deltas on the *measured* pose (feeds tracking lag back
into the target: the arm creeps); sending pose targets straight to the controller (no speed
or acceleration limits between policy steps, and no watchdog between them); teleporting a
target that lands inside a keep-out box to the geometrically nearest face (that face can be
on the far side of the box, asking the arm to cross it and breaking the per-step limit) —
instead the step is stopped on the face it would enter through and slides along it.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from transforms3d import quaternions as tq

from rt2_ros.actions import ArmAction
from rt2_ros.params import ConfigError, ParamSpec, resolve

_AXES = ("x", "y", "z")
# Targets pushed out of a keep-out box sit this far outside its face, so float round-off can
# never put them on the inside. 0.1 mm is far below any arm's repeatability.
_FACE_MARGIN_M = 1e-4
# Relative slack in segment/box tests (parameter t in [0, 1]); round-off, not a physical size.
_T_EPS = 1e-9

SAFETY_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("safety.workspace_min", "double_array", [0.25, -0.35, 0.02],
              "Lower corner (x, y, z) of the box the end effector must stay in, robot base frame", "m",
              low=-5.0, high=5.0, length=3),
    ParamSpec("safety.workspace_max", "double_array", [0.75, 0.35, 0.55],
              "Upper corner (x, y, z) of the box the end effector must stay in, robot base frame", "m",
              low=-5.0, high=5.0, length=3),
    ParamSpec("safety.keep_out_boxes", "double_array", [],
              "Boxes the end effector must never enter, 6 values per box: min x, y, z, max x, y, z "
              "(base frame); empty = none", "m", low=-5.0, high=5.0),
    ParamSpec("safety.max_step_translation_m", "double", 0.05,
              "Longest translation one policy action may add to the target (longer steps are shortened, "
              "direction kept)", "m", low=0.0, high=0.5),
    ParamSpec("safety.max_step_rotation_rad", "double", 0.25,
              "Largest rotation one policy action may add to the target orientation", "rad",
              low=0.0, high=math.pi),
    ParamSpec("safety.max_linear_speed_m_s", "double", 0.25,
              "Largest commanded end-effector speed", "m/s", low=0.0, high=2.0),
    ParamSpec("safety.max_angular_speed_rad_s", "double", 1.0,
              "Largest commanded end-effector angular speed", "rad/s", low=0.0, high=10.0),
    ParamSpec("safety.max_linear_accel_m_s2", "double", 2.0,
              "Largest change of the commanded linear velocity per second (speeding up or turning; "
              "safety stops are immediate)", "m/s^2", low=0.0, high=50.0),
    ParamSpec("safety.max_angular_accel_rad_s2", "double", 6.0,
              "Largest change of the commanded angular velocity per second (safety stops are immediate)",
              "rad/s^2", low=0.0, high=100.0),
    ParamSpec("safety.max_gripper_rate_per_s", "double", 1.0,
              "Largest change of the commanded gripper closedness per second", "1/s", low=0.0, high=100.0),
    ParamSpec("safety.watchdog_timeout_s", "double", 1.0,
              "Hold when no valid policy action arrived for this long", "s", low=0.01, high=60.0),
    ParamSpec("safety.position_gain_per_s", "double", 4.0,
              "P gain of the twist toward the target (position and orientation): velocity = gain * error",
              "1/s", low=0.0, high=50.0),
    ParamSpec("safety.goal_tolerance_m", "double", 0.002,
              "Position error below which the linear velocity is zero (no dithering at the target)", "m",
              low=0.0, high=0.05),
    ParamSpec("safety.goal_tolerance_rad", "double", 0.01,
              "Orientation error below which the angular velocity is zero", "rad", low=0.0, high=0.5),
    ParamSpec("safety.boundary_tolerance_m", "double", 0.005,
              "How far a measured position may lie outside the workspace or inside a keep-out box (sensor "
              "noise, tracking error) and still be treated as on the boundary; deeper -> no linear motion, "
              "and start_episode is refused", "m", low=0.0, high=0.05),
    ParamSpec("safety.max_outside_workspace_m", "double", 0.03,
              "How far the measured position may lie outside the workspace during an episode before the filter "
              "latches a FAULT and holds (no command of the filter puts the arm there: a collision, a controller "
              "that does not follow, another commander); cleared by clear_fault (the node's ~/reset) or a new "
              "episode", "m", low=0.0, high=0.5),
    ParamSpec("safety.command_rate_hz", "double", 30.0,
              "Rate at which tick() is called and twists are published (e.g. MoveIt Servo's rate)", "Hz",
              low=1.0, high=1000.0),
    ParamSpec("safety.lookahead_s", "double", 0.1,
              "Longest time one twist may act (set to the controller's command timeout, MoveIt Servo "
              "incoming_command_timeout): the workspace/keep-out check looks this far ahead, and longer "
              "gaps between ticks count as this long", "s", low=0.001, high=1.0),
    ParamSpec("safety.max_action_age_s", "double", 1.2,
              "Oldest camera frame an action may answer (ArmAction.observation_stamp) when it is executed: "
              "older on arrival -> refused (stale_action), and the target it set is no longer pursued once "
              "its frame is older (hold). The backstop of the policy node's policy.max_action_age_s (1.0 s by "
              "default), which must not exceed it (rt2-bringup checks both nodes' files)", "s",
              low=0.05, high=10.0),
    ParamSpec("safety.max_future_stamp_s", "double", 0.05,
              "Clock tolerance between processes: an action stamped further ahead of this node's clock is "
              "refused (future_action), an ee_pose stamped further ahead is not used", "s", low=0.0, high=1.0),
    ParamSpec("safety.max_pose_age_s", "double", 0.25,
              "Oldest measured ee_pose (by its header stamp) the arm may move on: older -> hold (no_fresh_pose), "
              "no dead reckoning; an episode needs a fresh one to start", "s", low=0.01, high=1.0),
    ParamSpec("safety.min_action_interval_s", "double", 0.05,
              "Shortest time between two executed actions (by arrival): any further action within it is "
              "dropped (burst), so N actions delivered at once move the target one step. Keep it below the "
              "policy period (1 / policy.execute_rate_hz) minus delivery jitter; 0 disables", "s",
              low=0.0, high=1.0),
)


class SafetyState(enum.IntEnum):
    """What the filter lets the arm do. Only RUNNING produces motion."""

    IDLE = 0  # no instruction: hold
    RUNNING = 1  # executing fresh, valid policy actions
    HOLDING = 2  # episode active but no fresh valid action (watchdog, rejected action, cleared fault)
    TERMINATED = 3  # the policy said "done": hold until the next start_episode
    ESTOPPED = 4  # latched emergency stop: hold until reset_estop(), then a new episode
    FAULT = 5  # external fault (backend, controller): hold; see SafetyFilter.fault


@dataclass(frozen=True)
class SafetyConfig:
    """Validated safety limits (field names = parameter names without ``safety.``; SI units)."""

    workspace_min: tuple[float, float, float]  # m, base frame
    workspace_max: tuple[float, float, float]  # m, base frame
    keep_out_boxes: tuple[tuple[float, float, float, float, float, float], ...]  # m, (min xyz, max xyz) each
    max_step_translation_m: float
    max_step_rotation_rad: float
    max_linear_speed_m_s: float
    max_angular_speed_rad_s: float
    max_linear_accel_m_s2: float
    max_angular_accel_rad_s2: float
    max_gripper_rate_per_s: float  # closedness / s
    watchdog_timeout_s: float
    position_gain_per_s: float
    goal_tolerance_m: float
    goal_tolerance_rad: float
    boundary_tolerance_m: float
    max_outside_workspace_m: float
    command_rate_hz: float
    lookahead_s: float
    max_action_age_s: float
    max_future_stamp_s: float
    max_pose_age_s: float
    min_action_interval_s: float

    @classmethod
    def from_params(cls, values: Mapping[str, Any] | None = None) -> SafetyConfig:
        """Build from a flat ``{"safety.<key>": value}`` dict (missing keys take their defaults).

        Raises :class:`ConfigError` naming the key for unknown keys, wrong types, out-of-range
        values and inconsistent combinations (min >= max, malformed boxes, ...).
        """
        resolved = resolve(SAFETY_PARAMS, dict(values or {}))
        kwargs: dict[str, Any] = {}
        for name, value in resolved.items():
            key = name.removeprefix("safety.")
            if key == "keep_out_boxes":
                if len(value) % 6:
                    raise ConfigError(f"{name}: expected 6 values per box (min x y z, max x y z), "
                                      f"got {len(value)} values")
                value = tuple(tuple(float(v) for v in value[i:i + 6]) for i in range(0, len(value), 6))
            elif isinstance(value, list):
                value = tuple(float(v) for v in value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_params(self) -> dict[str, Any]:
        """The flat ``safety.*`` dict this config was built from (round-trips through from_params)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "keep_out_boxes":
                value = [v for box in value for v in box]
            elif isinstance(value, tuple):
                value = list(value)
            out[f"safety.{f.name}"] = value
        return out

    def __post_init__(self) -> None:
        # Cross-checks that a single-parameter range cannot express; each names the key to fix.
        lo, hi = self.workspace_min, self.workspace_max
        for i, axis in enumerate(_AXES):
            if not lo[i] < hi[i]:
                raise ConfigError(f"safety.workspace_min: {axis} = {lo[i]} must be below "
                                  f"safety.workspace_max {axis} = {hi[i]}")
        for k, box in enumerate(self.keep_out_boxes):
            if len(box) != 6 or not all(math.isfinite(v) for v in box):
                raise ConfigError(f"safety.keep_out_boxes: box {k} must be 6 finite numbers, got {box}")
            for i, axis in enumerate(_AXES):
                if not box[i] < box[i + 3]:
                    raise ConfigError(f"safety.keep_out_boxes: box {k} has min {axis} = {box[i]} not below "
                                      f"max {axis} = {box[i + 3]}")
            if all(box[i] <= lo[i] and box[i + 3] >= hi[i] for i in range(3)):
                raise ConfigError(f"safety.keep_out_boxes: box {k} covers the whole workspace; the arm could "
                                  f"never move")
        if self.max_outside_workspace_m < self.boundary_tolerance_m:
            raise ConfigError(f"safety.max_outside_workspace_m: {self.max_outside_workspace_m} m must not be below "
                              f"safety.boundary_tolerance_m = {self.boundary_tolerance_m} m")
        period = 1.0 / self.command_rate_hz
        if self.lookahead_s < period:
            raise ConfigError(f"safety.lookahead_s: {self.lookahead_s} s is shorter than one command period "
                              f"(1 / safety.command_rate_hz = {period:.4g} s); commands would expire between ticks")
        if self.watchdog_timeout_s <= period:
            raise ConfigError(f"safety.watchdog_timeout_s: {self.watchdog_timeout_s} s must be longer than one "
                              f"command period (1 / safety.command_rate_hz = {period:.4g} s)")
        # A policy paced at the slowest rate the burst limit lets through must still feed the
        # watchdog and keep its targets fresh; otherwise the arm could only ever hold.
        for other in ("watchdog_timeout_s", "max_action_age_s"):
            if self.min_action_interval_s >= getattr(self, other):
                raise ConfigError(f"safety.min_action_interval_s: {self.min_action_interval_s} s must be shorter "
                                  f"than safety.{other} = {getattr(self, other)} s")


@dataclass(frozen=True)
class Verdict:
    """What happened to one policy action.

    ``reasons`` use ``<kind>:<detail>``: ``clipped:*`` (applied after limiting), ``rejected:*``
    (not applied, arm holds), ``ignored:*`` (not applied because of the state), or ``terminate``.
    """

    accepted: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class SafeCommand:
    """What the controller gets on one tick (base frame, SI units)."""

    linear_velocity: np.ndarray  # (3,) m/s
    angular_velocity: np.ndarray  # (3,) rad/s, rotation-vector rate
    target_position: np.ndarray  # (3,) m, commanded target (for markers / PoseStamped mode)
    target_orientation: np.ndarray  # (4,) quaternion w, x, y, z
    gripper: float | None  # commanded closedness 0..1 (rate-limited); None = unknown: send no gripper command
    state: SafetyState
    reasons: tuple[str, ...]  # "hold:<why>", "limited:<what>", "rejected:<what>"
    moving: bool  # any non-zero velocity or a gripper change this tick


# -- geometry helpers -------------------------------------------------------------------------------
def _norm(v: np.ndarray) -> float:
    # math.hypot: no overflow for huge finite input (1e200) and ~5x faster than np.linalg.norm on (3,).
    return math.hypot(*v)


def _quat_from_rotvec(rotvec: np.ndarray) -> np.ndarray:
    angle = _norm(rotvec)
    if angle < 1e-12:
        return np.array([1.0, 0.0, 0.0, 0.0])
    return tq.axangle2quat(rotvec / angle, angle, is_normalized=True)


def _rotvec_from_quat(q: np.ndarray) -> np.ndarray:
    """Rotation vector of unit quaternion ``q`` along the shortest path (angle in [0, pi])."""
    if q[0] < 0.0:
        q = -q
    s = _norm(q[1:])
    if s < 1e-15:
        return np.zeros(3)
    # atan2 instead of acos: accurate for the tiny angles that dominate at the goal.
    angle = 2.0 * math.atan2(s, float(q[0]))
    return q[1:] / s * angle


def _finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, or None (bool, None, NaN, inf and non-numbers are all bad times)."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _clip_norm(v: np.ndarray, limit: float) -> tuple[np.ndarray, bool]:
    n = _norm(v)
    if n > limit:
        return v * (limit / n), True
    return v, False


def _segment_entry(p: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, int] | None:
    """Where the segment ``p -> p + d`` first enters the open box ``(lo, hi)``.

    Returns ``(t, axis)`` (entry parameter in [0, 1) and the axis whose face it crosses),
    ``(0.0, -1)`` when ``p`` is already inside, or ``None`` when the segment stays outside
    (touching a face counts as outside). Slab method.
    """
    t_near, t_far, axis = -math.inf, math.inf, -1
    for i in range(3):
        if d[i] == 0.0:
            if not lo[i] < p[i] < hi[i]:
                return None
            continue
        t1, t2 = (lo[i] - p[i]) / d[i], (hi[i] - p[i]) / d[i]
        if t1 > t2:
            t1, t2 = t2, t1
        if t1 > t_near:
            t_near, axis = t1, i
        t_far = min(t_far, t2)
    if min(t_far, 1.0) - max(t_near, 0.0) <= _T_EPS:
        return None
    if t_near < 0.0:  # also covers d == 0 with p inside (t_near stays -inf)
        return 0.0, -1
    return t_near, axis


_Boxes = list[tuple[np.ndarray, np.ndarray]]


def _geometry(config: SafetyConfig) -> tuple[np.ndarray, np.ndarray, _Boxes]:
    """Workspace corners and keep-out boxes of ``config`` as arrays."""
    boxes = [(np.array(b[:3], dtype=np.float64), np.array(b[3:], dtype=np.float64)) for b in config.keep_out_boxes]
    return np.array(config.workspace_min, dtype=np.float64), np.array(config.workspace_max, dtype=np.float64), boxes


def _same_geometry(a: SafetyConfig, b: SafetyConfig) -> bool:
    return (a.workspace_min, a.workspace_max, a.keep_out_boxes) == (b.workspace_min, b.workspace_max, b.keep_out_boxes)


def _inside_any(p: np.ndarray, boxes: _Boxes) -> bool:
    return any(bool(np.all(p > lo) and np.all(p < hi)) for lo, hi in boxes)


def _safe_point_in(p: np.ndarray, ws_lo: np.ndarray, ws_hi: np.ndarray, boxes: _Boxes,
                   tol: float) -> np.ndarray | None:
    """A target near ``p`` inside the workspace ``(ws_lo, ws_hi)`` and clear of ``boxes`` (by the
    face margin), or None when ``p`` is deeper than ``tol`` inside a box."""
    q = np.clip(p, ws_lo, ws_hi)
    for _ in range(len(boxes) + 1):
        moved = False
        for lo, hi in boxes:
            if not (np.all(q > lo - _FACE_MARGIN_M) and np.all(q < hi + _FACE_MARGIN_M)):
                continue
            depth = np.concatenate([q - lo, hi - q])  # how far to each face (min x y z, max x y z)
            for k in np.argsort(depth, kind="stable"):
                if depth[k] > tol:
                    return None
                axis = int(k) % 3
                candidate = q.copy()
                candidate[axis] = lo[axis] - _FACE_MARGIN_M if k < 3 else hi[axis] + _FACE_MARGIN_M
                if ws_lo[axis] <= candidate[axis] <= ws_hi[axis]:
                    q, moved = candidate, True
                    break
            else:
                return None
        if not moved:
            break
    if np.any(q < ws_lo) or np.any(q > ws_hi) or _inside_any(q, boxes):
        return None
    return q


def _outside_box(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """How far ``p`` lies outside the box [lo, hi] along the worst axis (0 inside), m."""
    return float(max(np.max(lo - p), np.max(p - hi), 0.0))


def _fmt_point(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in p) + ")"


class SafetyFilter:
    """Turns policy actions into bounded, watchdog-guarded twist commands. Not thread-safe:
    call it from one thread (the node's executor with a mutually exclusive callback group).

    Guarantees (for a position estimate that starts inside the workspace and ticks at least
    every ``lookahead_s``; property-tested in test/test_safety.py):

    * the commanded target is always inside the workspace box and outside every keep-out box;
    * ``position + v * dt`` for any ``dt <= lookahead_s`` stays inside the workspace and outside
      the keep-out boxes, so the integrated commanded motion never leaves the safe set;
    * one action moves the target by at most ``max_step_translation_m`` / ``max_step_rotation_rad``;
    * ``|v| <= max_linear_speed_m_s``, ``|w| <= max_angular_speed_rad_s``; the velocity changes
      by at most ``accel * dt`` except when a safety limit (hold, boundary) cuts it down;
    * only RUNNING produces motion; estop wins over everything;
    * no motion on old data: a non-zero twist only while the last measured pose is at most
      ``max_pose_age_s`` old and the camera frame behind the target at most ``max_action_age_s``;
    * at most one action per ``min_action_interval_s`` moves the target;
    * the gripper command is never invented: unknown (None) until an absolute gripper action
      sets it, never changed by a hold, and never returns to unknown.
    """

    def __init__(self, config: SafetyConfig) -> None:
        self._cfg = config
        self._ws_lo, self._ws_hi, self._boxes = _geometry(config)
        self._episode = SafetyState.IDLE  # IDLE, RUNNING, HOLDING or TERMINATED
        self._estopped = False
        self._fault: tuple[str, bool] | None = None  # (reason, latched)
        self._hold_reason = "no episode"
        # Pose estimate: last measured pose, else the integral of the commanded twist.
        self._p_est = 0.5 * (self._ws_lo + self._ws_hi)
        self._q_est = np.array([1.0, 0.0, 0.0, 0.0])
        self._target_p = self._p_est.copy()
        self._target_q = self._q_est.copy()
        # Gripper command and target, None while unknown (both None or both set): a restarted
        # node must not assume "open" — commanding it would drop a grasped object.
        self._g_cmd: float | None = None
        self._g_target: float | None = None
        self._v_prev = np.zeros(3)
        self._w_prev = np.zeros(3)
        self._last_action_time = -math.inf
        self._last_tick_time: float | None = None
        self._last_seq = -1
        self._last_reasons: tuple[str, ...] = ()
        # Freshness (all on the caller's clock, the one of ``now``): when the measured pose was
        # taken, when the camera frame behind the commanded target was taken, and when the last
        # step was applied to the target (burst limit). -inf: never / none.
        self._pose_time = -math.inf
        self._target_obs_time = -math.inf
        self._last_step_time = -math.inf
        self._drops: Counter[str] = Counter()
        self._refusal = ""  # "<cause>: <detail>" of the last freshness refusal (for a log line)
        self._counters = {name: 0 for name in (
            "actions_accepted", "actions_rejected", "actions_clipped", "actions_ignored", "actions_dropped",
            "watchdog_trips", "estops", "terminations", "faults", "episodes")}

    # -- read-only views --------------------------------------------------------------------------
    @property
    def config(self) -> SafetyConfig:
        return self._cfg

    @property
    def state(self) -> SafetyState:
        if self._estopped:
            return SafetyState.ESTOPPED
        if self._fault is not None:
            return SafetyState.FAULT
        return self._episode

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the event counters (for diagnostics)."""
        return dict(self._counters)

    @property
    def drop_counts(self) -> dict[str, int]:
        """Freshness and rate refusals by cause, since the filter was made: actions not executed
        (``stale_action``, ``future_action``, ``no_observation_stamp``, ``no_fresh_pose``, ``burst``)
        and trips of a RUNNING episode into HOLDING for one of these (``hold:<cause>``, once per
        trip, whether a tick found the pose or the target too old or a refused action did)."""
        return dict(self._drops)

    @property
    def last_refusal(self) -> str:
        """``"<cause>: <detail>"`` of the last action refused for freshness or as a burst ("" if none yet)."""
        return self._refusal

    @property
    def pose_time(self) -> float | None:
        """When the pose the filter moves on was measured (clock of ``now``); None: never."""
        return None if math.isinf(self._pose_time) else self._pose_time

    @property
    def target_observation_time(self) -> float | None:
        """When the camera frame behind the commanded target was taken (the newest accepted
        action's ``observation_time``); None while no action of this episode set the target."""
        return None if math.isinf(self._target_obs_time) else self._target_obs_time

    @property
    def last_reasons(self) -> tuple[str, ...]:
        """Reasons of the most recent action verdict or operator event (ticks report their own)."""
        return self._last_reasons

    @property
    def _fault_latched(self) -> bool:
        return self._fault is not None and self._fault[1]

    @property
    def hold_reason(self) -> str:
        """Why the arm is not RUNNING ("" while RUNNING), e.g. "watchdog", "estop: button"."""
        return "" if self.state == SafetyState.RUNNING else self._hold_reason

    @property
    def last_action_time(self) -> float | None:
        """``now`` of the last accepted action (or of the episode start); None before any episode.
        The watchdog measures from here."""
        return None if math.isinf(self._last_action_time) else self._last_action_time

    @property
    def target_position(self) -> np.ndarray:
        """The commanded target (m, base frame); the workspace centre before the first episode."""
        return self._target_p.copy()

    @property
    def target_orientation(self) -> np.ndarray:
        return self._target_q.copy()

    @property
    def gripper_command(self) -> float | None:
        """The current gripper command (closedness 0..1), None while unknown."""
        return self._g_cmd

    def diagnostics(self) -> dict[str, str]:
        """Flat key/value status for a diagnostic_msgs/DiagnosticStatus."""
        out = {"state": self.state.name, "hold_reason": self.hold_reason,
               "last_reasons": ",".join(self._last_reasons),
               "target_position": " ".join(f"{v:.4f}" for v in self._target_p),
               "gripper_command": "unknown" if self._g_cmd is None else f"{self._g_cmd:.3f}"}
        out.update({k: str(v) for k, v in self._counters.items()})
        out.update({f"dropped:{k}": str(v) for k, v in sorted(self._drops.items())})
        return out

    # -- operator / episode events -------------------------------------------------------------------
    def start_episode(self, position: Any, orientation_wxyz: Any, gripper: float | None, now: float,
                      pose_time: float | None = None) -> bool:
        """Begin executing a new instruction from the given (measured) pose.

        From any state except ESTOPPED (a new instruction also ends TERMINATED, clears a FAULT
        and restarts a running episode). The commanded target := the given pose, the gripper
        command := ``gripper`` (clamped to 0..1; None keeps the filter's own last command, which
        is None — unknown — if no gripper value was ever known), the watchdog starts at ``now``.
        ``pose_time``: when the pose was measured (default ``now``). Refused (returns False,
        ``last_reasons`` says why; a running episode is stopped) when the pose is not finite, the
        quaternion is degenerate, the pose is older than ``max_pose_age_s`` or stamped in the
        future beyond ``max_future_stamp_s`` (``rejected:start_pose_stale``), or the position lies
        outside the workspace or inside a keep-out box by more than ``boundary_tolerance_m`` — the
        filter never drags the arm into its workspace on its own.
        """
        if self._estopped:
            self._last_reasons = ("ignored:estopped",)
            return False
        why = ""
        try:
            p = np.asarray(position, dtype=np.float64).reshape(-1)
            q = np.asarray(orientation_wxyz, dtype=np.float64).reshape(-1)
            g = None if gripper is None else float(gripper)
            t = float(now)
            t_pose = t if pose_time is None else float(pose_time)
        except (TypeError, ValueError):
            p, q, g, t, t_pose = np.zeros(0), np.zeros(0), math.nan, math.nan, math.nan
        if p.shape != (3,) or q.shape != (4,):
            why = "rejected:start_pose_shape"
        elif not (np.all(np.isfinite(p)) and np.all(np.isfinite(q)) and (g is None or math.isfinite(g))
                  and math.isfinite(t) and math.isfinite(t_pose)):
            why = "rejected:start_non_finite"
        elif _norm(q) < 1e-6:
            why = "rejected:start_orientation_degenerate"
        elif not -self._cfg.max_future_stamp_s <= t - t_pose <= self._cfg.max_pose_age_s:
            why = "rejected:start_pose_stale"
        elif np.any(p < self._ws_lo - self._cfg.boundary_tolerance_m) or np.any(
                p > self._ws_hi + self._cfg.boundary_tolerance_m):
            why = "rejected:start_outside_workspace"
        safe_p = None if why else self._safe_point(p)
        if not why and safe_p is None:
            why = "rejected:start_in_keep_out"
        if why or safe_p is None:
            if self._episode in (SafetyState.RUNNING, SafetyState.HOLDING):
                self._enter_hold(SafetyState.IDLE, why)
            self._last_reasons = (why,)
            return False
        q = q / _norm(q)
        self._fault = None
        self._episode = SafetyState.RUNNING
        self._hold_reason = ""
        self._p_est, self._q_est = p.copy(), q.copy()
        self._target_p, self._target_q = safe_p, q.copy()
        if g is not None:
            self._g_cmd = min(max(g, 0.0), 1.0)
        self._g_target = self._g_cmd  # no ramp left over from the previous episode
        self._v_prev, self._w_prev = np.zeros(3), np.zeros(3)
        self._last_action_time = t
        self._last_tick_time = t
        self._last_seq = -1
        self._pose_time = min(t_pose, t)
        self._target_obs_time = -math.inf  # no action of this episode yet: nothing to pursue
        self._last_step_time = -math.inf
        self._counters["episodes"] += 1
        self._last_reasons = ("start",)
        return True

    def stop_episode(self, reason: str) -> None:
        """Clear the instruction: -> IDLE and hold (ESTOPPED stays ESTOPPED; a FAULT stays shown
        until cleared, then IDLE)."""
        if not self._estopped:
            self._enter_hold(SafetyState.IDLE, f"stopped: {reason}")
        self._last_reasons = (f"stop:{reason}",)

    def hold(self, reason: str) -> None:
        """Pause a running episode: RUNNING -> HOLDING (zero twist, target frozen at the current
        pose); the next valid action resumes. Other states are left as they are. Used when a new
        instruction arrives: the motion stops at once, but the first action of the new episode
        may already have arrived (instruction and actions travel on different topics)."""
        if self._episode == SafetyState.RUNNING and not self._estopped and self._fault is None:
            self._enter_hold(SafetyState.HOLDING, f"hold: {reason}")
        self._last_reasons = (f"hold:{reason}",)

    def estop(self, reason: str) -> None:
        """Latch the emergency stop: zero twist on every tick until :meth:`reset_estop`, actions and
        new episodes ignored. Counted once per latch (calling it repeatedly is harmless)."""
        if not self._estopped:
            self._counters["estops"] += 1
        self._enter_hold(SafetyState.IDLE, f"estop: {reason}")
        self._estopped = True
        self._fault = None
        self._last_reasons = (f"estop:{reason}",)

    def reset_estop(self) -> bool:
        """Release the e-stop latch -> IDLE (nothing moves until a new :meth:`start_episode`).
        Returns False when no e-stop was latched."""
        if not self._estopped:
            return False
        self._estopped = False
        self._hold_reason = "estop reset; waiting for a new episode"
        self._last_reasons = ("estop_reset",)
        return True

    def fault(self, reason: str, latch: bool = False) -> None:
        """Hold because of a fault outside the action stream (backend error, controller error).

        ``latch=False`` (transient faults, e.g. a backend timeout or disconnect): the next valid
        action clears the fault and resumes RUNNING — a valid action is proof that the cause is
        gone. ``latch=True`` (faults needing a decision, e.g. the controller reports an error):
        actions are ignored until :meth:`clear_fault` or a new :meth:`start_episode`. Ignored
        while e-stopped. Counted once per fault episode.
        """
        if self._estopped:
            return
        if self._fault is None:
            self._counters["faults"] += 1
        latched = latch or self._fault_latched
        self._enter_hold(self._episode, f"fault: {reason}")
        if self._episode == SafetyState.RUNNING:
            self._episode = SafetyState.HOLDING
        self._fault = (reason, latched)
        self._last_reasons = (f"fault:{reason}",)

    def clear_fault(self) -> bool:
        """Clear a (latched or not) fault: an active episode goes to HOLDING and resumes with the
        next valid action. Returns False when there was no fault or the e-stop is latched."""
        if self._fault is None or self._estopped:
            return False
        self._fault = None
        self._hold_reason = "fault cleared; waiting for a fresh action"
        self._last_reasons = ("fault_cleared",)
        return True

    # -- live limits ------------------------------------------------------------------------------------
    def check_config(self, config: SafetyConfig) -> str:
        """Empty when ``config`` may replace the current limits now, else a one-line reason naming the key.

        While an episode is active (RUNNING or HOLDING, also under a FAULT), a new workspace or
        new keep-out boxes must still contain the arm's pose estimate and the commanded target
        (up to ``boundary_tolerance_m`` outside the workspace or inside a box, as at
        start_episode): the filter never drags the arm into a new workspace on its own. All other
        changes are always allowed (SafetyConfig checked their consistency when it was built).
        """
        if not isinstance(config, SafetyConfig):
            return f"safety: expected a SafetyConfig, got {type(config).__name__}"
        if _same_geometry(config, self._cfg) or self._episode not in (SafetyState.RUNNING, SafetyState.HOLDING):
            return ""
        ws_lo, ws_hi, boxes = _geometry(config)
        tol = config.boundary_tolerance_m
        for what, p in (("the arm's position", self._p_est), ("the commanded target", self._target_p)):
            where = f"{what} {_fmt_point(p)} m would be outside the new workspace"
            for i, axis in enumerate(_AXES):
                if p[i] > ws_hi[i] + tol:
                    return f"safety.workspace_max: {where} ({axis} max {ws_hi[i]:.3f} m)"
                if p[i] < ws_lo[i] - tol:
                    return f"safety.workspace_min: {where} ({axis} min {ws_lo[i]:.3f} m)"
            if _safe_point_in(p, ws_lo, ws_hi, boxes, tol) is None:
                inside = [k for k, (lo, hi) in enumerate(boxes) if np.all(p > lo) and np.all(p < hi)]
                box = f"new keep-out box {inside[0]}" if inside else "the new keep-out boxes"
                return f"safety.keep_out_boxes: {what} {_fmt_point(p)} m would be inside {box}"
        return ""

    def update_config(self, config: SafetyConfig) -> None:
        """Replace the limits (call :meth:`check_config` first; raises ConfigError if it refuses).

        Speeds, steps, accelerations, gains, tolerances, watchdog, command rate and look-ahead
        take effect on the next tick/action; the previous twist is cut to the new speed limits,
        so the next tick already obeys them. A changed workspace or keep-out geometry re-freezes
        the target at the current pose (projected into the new safe set): a RUNNING episode goes
        to HOLDING (``hold: limits changed``) and the next valid action resumes under the new
        limits — a target planned under the old ones is never executed.
        """
        why = self.check_config(config)
        if why:
            raise ConfigError(why)
        geometry_changed = not _same_geometry(config, self._cfg)
        self._cfg = config
        self._ws_lo, self._ws_hi, self._boxes = _geometry(config)
        self._v_prev, _ = _clip_norm(self._v_prev, config.max_linear_speed_m_s)
        self._w_prev, _ = _clip_norm(self._w_prev, config.max_angular_speed_rad_s)
        if not geometry_changed:
            self._last_reasons = ("config_updated",)
            return
        if self._episode == SafetyState.RUNNING and not self._estopped and self._fault is None:
            self._enter_hold(SafetyState.HOLDING, "hold: limits changed")
            self._last_reasons = ("hold:limits_changed",)
            return
        # Held or no episode: nothing moves now, but the next action (HOLDING) builds on this target,
        # and markers show it, so it moves into the new safe set, at the arm's pose.
        safe = self._safe_point(self._p_est)
        if safe is None:  # the arm is deep in a new box: only without an active episode (check_config),
            # so this target is only shown, never commanded; start_episode will refuse this pose
            safe = _safe_point_in(self._p_est, self._ws_lo, self._ws_hi, self._boxes, math.inf)
        if safe is not None:
            self._target_p = safe
        self._target_q = self._q_est.copy()
        self._last_reasons = ("config_updated",)

    # -- policy actions ---------------------------------------------------------------------------------
    def on_action(self, action: ArmAction, now: float, observation_time: float | None = None) -> Verdict:
        """Apply one decoded policy action (a per-step delta) to the commanded target.

        ``now``: arrival time (monotonic); ``observation_time``: when the camera frame the action
        answers was taken, on the clock of ``now`` (the node converts ArmAction.observation_stamp:
        ``now - (ros_now - stamp)``); None = unknown.

        In order:

        1. ESTOPPED, latched FAULT, IDLE or TERMINATED: ignored (``ignored:<state>``), counted.
        2. Not an ArmAction / non-finite ``now``: rejected, hold (HOLDING), counted.
        3. ``terminate``: -> TERMINATED, hold, no motion until the next start_episode (the other
           fields of a terminate action are not used, even if malformed, and neither is its age:
           stopping is always allowed).
        4. NaN/inf anywhere: ``rejected:non_finite``, hold (HOLDING), counted.
        5. Freshness, each ``rejected:<cause>``, hold (HOLDING), counted in ``actions_rejected`` and
           in :attr:`drop_counts` under ``<cause>``: unknown (None / non-finite) observation time:
           ``no_observation_stamp`` (the arm never moves on data of unknown age); frame more than
           ``max_future_stamp_s`` ahead of ``now``: ``future_action``; frame older than
           ``max_action_age_s`` (``now - observation_time > max_action_age_s``): ``stale_action``;
           measured pose older than ``max_pose_age_s``: ``no_fresh_pose``.
        6. An observation_seq older than the last accepted one: ``rejected:out_of_order`` (equal
           is allowed: one observation can yield a chunk of actions).
        7. Burst: less than ``min_action_interval_s`` after the last applied step of this episode
           (``now - last < min_action_interval_s``): ``dropped:burst``, counted in
           ``actions_dropped`` and :attr:`drop_counts`; no hold (the step already applied stands),
           and the watchdog is not fed.
        8. Otherwise accepted (resumes RUNNING from HOLDING or a non-latched FAULT; restarts the
           watchdog): the delta's translation and rotation norms are clipped to the per-step
           limits (``clipped:step_translation`` / ``clipped:step_rotation``, direction kept);
           new target = previous commanded target + delta (NOT the measured pose), clipped
           per axis into the workspace (``clipped:workspace_x_max`` ...), and stopped on the
           face of any keep-out box it would enter, sliding along it (``clipped:keep_out_<k>``);
           target orientation = exp(rotation) * previous target (base-frame rotation vector);
           gripper target = value (absolute) or target + value (``gripper_relative``), clamped
           to 0..1 (``clipped:gripper``). While the gripper is unknown, an absolute value sets
           command and target at once (a ramp would start from an invented value, e.g. "open"),
           and a relative one leaves it unknown (``ignored:gripper_unknown``; the rest of the
           action still applies).
        """
        if self._estopped:
            return self._ignore("ignored:estopped")
        if self._fault_latched:
            return self._ignore("ignored:fault")
        if self._episode == SafetyState.IDLE:
            return self._ignore("ignored:idle")
        if self._episode == SafetyState.TERMINATED:
            return self._ignore("ignored:terminated")
        if not isinstance(action, ArmAction):
            return self._reject("rejected:invalid_action")
        now = _finite_or_none(now)
        if now is None:
            return self._reject("rejected:non_finite_time")
        if action.terminate:
            self._fault = None
            self._enter_hold(SafetyState.TERMINATED, "terminated by the policy")
            self._counters["terminations"] += 1
            self._counters["actions_accepted"] += 1
            self._last_reasons = ("terminate",)
            return Verdict(True, self._last_reasons)
        if not action.is_finite():
            return self._reject("rejected:non_finite")
        cfg = self._cfg
        obs = _finite_or_none(observation_time)
        if obs is None:
            return self._refuse("no_observation_stamp", "the action does not say when its camera frame was taken")
        if obs - now > cfg.max_future_stamp_s:
            return self._refuse("future_action", f"camera frame stamped {obs - now:.3f} s in the future "
                                                 f"(> safety.max_future_stamp_s {cfg.max_future_stamp_s} s)")
        if now - obs > cfg.max_action_age_s:
            return self._refuse("stale_action", f"camera frame {now - obs:.3f} s old on arrival "
                                                f"(> safety.max_action_age_s {cfg.max_action_age_s} s)")
        if now - self._pose_time > cfg.max_pose_age_s:
            return self._refuse("no_fresh_pose", self._pose_age_text(now))
        if 0 <= action.observation_seq < self._last_seq:
            return self._reject("rejected:out_of_order")
        if now - self._last_step_time < cfg.min_action_interval_s:
            self._counters["actions_dropped"] += 1
            self._drops["burst"] += 1
            self._refusal = (f"burst: {now - self._last_step_time:.3f} s after the last applied step "
                             f"(< safety.min_action_interval_s {cfg.min_action_interval_s} s)")
            self._last_reasons = ("dropped:burst",)
            return Verdict(False, self._last_reasons)

        reasons: list[str] = []
        delta, clipped = _clip_norm(action.translation, self._cfg.max_step_translation_m)
        if clipped:
            reasons.append("clipped:step_translation")
        rot, clipped = _clip_norm(action.rotation, self._cfg.max_step_rotation_rad)
        if clipped:
            reasons.append("clipped:step_rotation")

        prev = self._target_p
        wanted = prev + delta
        new = np.clip(wanted, self._ws_lo, self._ws_hi)
        for i, axis in enumerate(_AXES):
            if wanted[i] > self._ws_hi[i]:
                reasons.append(f"clipped:workspace_{axis}_max")
            elif wanted[i] < self._ws_lo[i]:
                reasons.append(f"clipped:workspace_{axis}_min")
        step, hits, blocked = self._limit_keep_out(prev, new - prev)
        if blocked:
            return self._reject("rejected:keep_out")
        reasons.extend(f"clipped:keep_out_{k}" for k in sorted(hits))

        g_new: float | None = None
        if action.gripper_relative and self._g_target is None:
            reasons.append("ignored:gripper_unknown")  # a change of an unknown value is no value
        else:
            g = action.gripper + (self._g_target if action.gripper_relative and self._g_target is not None else 0.0)
            if not 0.0 <= g <= 1.0:
                reasons.append("clipped:gripper")
            g_new = min(max(g, 0.0), 1.0)

        self._target_p = prev + step
        q = tq.qmult(_quat_from_rotvec(rot), self._target_q)
        self._target_q = q / _norm(q)
        if g_new is not None:
            if self._g_cmd is None:
                self._g_cmd = g_new  # first known value: commanded as is, not ramped from a guess
            self._g_target = g_new
        self._fault = None
        if self._episode == SafetyState.HOLDING:
            self._episode = SafetyState.RUNNING
        self._hold_reason = ""
        self._last_action_time = now
        self._last_step_time = now
        self._target_obs_time = obs
        if action.observation_seq >= 0:
            self._last_seq = action.observation_seq
        self._counters["actions_accepted"] += 1
        if any(r.startswith("clipped:") for r in reasons):
            self._counters["actions_clipped"] += 1
        self._last_reasons = tuple(reasons)
        return Verdict(True, self._last_reasons)

    # -- the command-rate loop ---------------------------------------------------------------------------
    def tick(self, now: float, measured_position: Any = None, measured_orientation: Any = None,
             pose_time: float | None = None) -> SafeCommand:
        """The command for this instant; call at ``command_rate_hz`` with a monotonic ``now``.

        * The pose estimate advances by the previous twist over ``min(dt, lookahead_s)``, or is
          replaced by the measured pose when given; ``pose_time`` says when it was measured (clock
          of ``now``; default ``now``). A measurement older than the one already held is not
          adopted. A malformed/non-finite measurement, one stamped more than
          ``max_future_stamp_s`` ahead, or a clock that went backwards gives a hold for this tick
          (``rejected:*``).
        * State not RUNNING -> hold: zero twist immediately (``hold:<state>``).
        * Then, each -> HOLDING (target frozen at the current pose estimate), hold, counted once
          per trip; the next valid (and fresh) action resumes:

          - watchdog: no accepted action for ``watchdog_timeout_s`` (``now - last >= timeout``),
            ``hold:watchdog``; with ticks every 1/rate s within one tick period of the timeout;
          - the last measured pose is older than ``max_pose_age_s`` (``now - pose_time >
            max_pose_age_s``): ``hold:no_fresh_pose`` (no dead reckoning beyond that age);
          - the camera frame behind the target is older than ``max_action_age_s``
            (``now - observation_time > max_action_age_s``): ``hold:stale_action`` — a target is
            never pursued on data older than the bound, however long ago the action arrived.
        * Else linear: v = gain * (target - position), zero within ``goal_tolerance_m``,
          norm-limited to the max speed, then to ``accel * dt`` change from the previous
          twist, then each component limited so that ``position + v * lookahead_s`` stays in the
          workspace and outside keep-out boxes (the arm slides along walls instead of stalling).
          Angular: the same from the rotation vector of ``q_target * q_current^-1``.
        * The gripper command moves toward its target at ``max_gripper_rate_per_s`` (stays None
          while unknown).
        """
        cfg = self._cfg
        now = _finite_or_none(now)
        if now is None:
            return self._hold_tick(("rejected:non_finite_time",))
        dt = (now - self._last_tick_time) if self._last_tick_time is not None else 1.0 / cfg.command_rate_hz
        self._last_tick_time = now
        if dt < 0.0:
            return self._hold_tick(("rejected:time_went_backwards",))
        # A twist acts at most lookahead_s (the controller drops it after that), so a stalled
        # tick neither over-integrates nor licenses a big velocity jump.
        dt = min(dt, cfg.lookahead_s)
        self._integrate(dt)
        problem = self._take_measurement(measured_position, measured_orientation, now, pose_time)
        if problem:
            return self._hold_tick((problem,))
        if measured_position is not None and self._episode in (SafetyState.RUNNING, SafetyState.HOLDING):
            outside = _outside_box(self._p_est, self._ws_lo, self._ws_hi)
            if outside > cfg.max_outside_workspace_m and not self._fault_latched:
                self.fault(f"arm_outside_workspace: the measured position {_fmt_point(self._p_est)} m is "
                           f"{outside * 1000:.0f} mm outside the workspace (> safety.max_outside_workspace_m "
                           f"{cfg.max_outside_workspace_m} m); bring the arm back, then reset or start a new "
                           f"episode", latch=True)
                return self._hold_tick(("fault:arm_outside_workspace",))  # only on the tick that latched it

        state = self.state
        if state != SafetyState.RUNNING:
            return self._hold_tick((f"hold:{state.name.lower()}",))
        if now - self._last_action_time >= cfg.watchdog_timeout_s:
            self._counters["watchdog_trips"] += 1
            self._enter_hold(SafetyState.HOLDING, "watchdog: no fresh valid action")
            return self._hold_tick(("hold:watchdog",))
        if now - self._pose_time > cfg.max_pose_age_s:
            self._drops["hold:no_fresh_pose"] += 1
            self._enter_hold(SafetyState.HOLDING, f"no_fresh_pose: {self._pose_age_text(now)}")
            return self._hold_tick(("hold:no_fresh_pose",))
        if now - self._target_obs_time > cfg.max_action_age_s and not math.isinf(self._target_obs_time):
            self._drops["hold:stale_action"] += 1
            self._enter_hold(SafetyState.HOLDING, f"stale_action: the target's camera frame is "
                                                  f"{now - self._target_obs_time:.3f} s old "
                                                  f"(> safety.max_action_age_s {cfg.max_action_age_s} s)")
            return self._hold_tick(("hold:stale_action",))

        reasons: list[str] = []
        v = self._linear_velocity(dt, reasons)
        w = self._angular_velocity(dt, reasons)
        g_prev = self._g_cmd
        if g_prev is not None and self._g_target is not None:
            max_dg = cfg.max_gripper_rate_per_s * dt
            self._g_cmd = min(max(self._g_target, g_prev - max_dg), g_prev + max_dg)
        self._v_prev, self._w_prev = v, w
        moving = bool(np.any(v != 0.0) or np.any(w != 0.0) or self._g_cmd != g_prev)
        return SafeCommand(v.copy(), w.copy(), self._target_p.copy(), self._target_q.copy(), self._g_cmd,
                           SafetyState.RUNNING, tuple(reasons), moving)

    # -- internals ---------------------------------------------------------------------------------------
    def _linear_velocity(self, dt: float, reasons: list[str]) -> np.ndarray:
        cfg = self._cfg
        p = self._p_est
        error = self._target_p - p
        v_des = np.zeros(3) if _norm(error) <= cfg.goal_tolerance_m else cfg.position_gain_per_s * error
        v_des, limited = _clip_norm(v_des, cfg.max_linear_speed_m_s)
        if limited:
            reasons.append("limited:linear_speed")
        dv, limited = _clip_norm(v_des - self._v_prev, cfg.max_linear_accel_m_s2 * dt)
        if limited:
            reasons.append("limited:linear_accel")
        v = self._v_prev + dv

        # Boundaries, from the position projected onto the safe set: a measurement slightly
        # outside (noise) is treated as on the wall; never move further out on such an axis.
        h = cfg.lookahead_s
        tol = cfg.boundary_tolerance_m
        outside_hi, outside_lo = p > self._ws_hi, p < self._ws_lo
        d = v * h
        outward = (outside_hi & (d > 0)) | (outside_lo & (d < 0))
        d[outward] = 0.0
        base = np.clip(p, self._ws_lo, self._ws_hi)
        end = base + d
        if np.any(outward) or np.any(end > self._ws_hi) or np.any(end < self._ws_lo):
            reasons.append("limited:workspace")
            d = np.clip(end, self._ws_lo, self._ws_hi) - base
        if np.any(p < self._ws_lo - tol) or np.any(p > self._ws_hi + tol):
            reasons.append("limited:outside_workspace")
        base_ko = self._project_shallow(base, tol)
        if base_ko is None:
            reasons.append("hold:inside_keep_out")
            return np.zeros(3)
        d2, hits, blocked = self._limit_keep_out(base_ko, d)
        if blocked:
            reasons.append("hold:inside_keep_out")
            return np.zeros(3)
        if hits:
            reasons.append("limited:keep_out")
        return d2 / h

    def _angular_velocity(self, dt: float, reasons: list[str]) -> np.ndarray:
        cfg = self._cfg
        q_err = tq.qmult(self._target_q, tq.qinverse(self._q_est))
        err = _rotvec_from_quat(q_err / _norm(q_err))
        w_des = np.zeros(3) if _norm(err) <= cfg.goal_tolerance_rad else cfg.position_gain_per_s * err
        w_des, limited = _clip_norm(w_des, cfg.max_angular_speed_rad_s)
        if limited:
            reasons.append("limited:angular_speed")
        dw, limited = _clip_norm(w_des - self._w_prev, cfg.max_angular_accel_rad_s2 * dt)
        if limited:
            reasons.append("limited:angular_accel")
        return self._w_prev + dw

    def _integrate(self, dt: float) -> None:
        """Advance the pose estimate by the twist commanded on the previous tick."""
        if dt <= 0.0:
            return
        self._p_est = self._p_est + self._v_prev * dt
        if np.any(self._w_prev != 0.0):
            q = tq.qmult(_quat_from_rotvec(self._w_prev * dt), self._q_est)
            self._q_est = q / _norm(q)

    def _take_measurement(self, position: Any, orientation: Any, now: float, pose_time: Any) -> str:
        """Adopt a measured pose taken at ``pose_time`` (default ``now``); returns a rejection
        reason ("" when fine or absent). One older than the pose already held is ignored."""
        if position is None and orientation is None:
            return ""
        t = now if pose_time is None else _finite_or_none(pose_time)
        if t is None:
            return "rejected:measured_pose_time"
        if t - now > self._cfg.max_future_stamp_s:
            return "rejected:measured_pose_future"
        if t < self._pose_time:
            return ""  # an older measurement than the one the estimate already starts from
        if position is not None:
            p = np.asarray(position, dtype=np.float64).reshape(-1)
            if p.shape != (3,) or not np.all(np.isfinite(p)):
                return "rejected:measured_position"
            self._p_est = p.copy()
        if orientation is not None:
            q = np.asarray(orientation, dtype=np.float64).reshape(-1)
            if q.shape != (4,) or not np.all(np.isfinite(q)) or _norm(q) < 1e-6:
                return "rejected:measured_orientation"
            self._q_est = q / _norm(q)
        self._pose_time = min(t, now)
        return ""

    def _pose_age_text(self, now: float) -> str:
        if math.isinf(self._pose_time):
            return "no ee_pose measured"
        return (f"last ee_pose {now - self._pose_time:.3f} s old "
                f"(> safety.max_pose_age_s {self._cfg.max_pose_age_s} s)")

    def _hold_tick(self, reasons: tuple[str, ...]) -> SafeCommand:
        """Zero twist now (stopping is never acceleration-limited); gripper command frozen."""
        self._v_prev, self._w_prev = np.zeros(3), np.zeros(3)
        return SafeCommand(np.zeros(3), np.zeros(3), self._target_p.copy(), self._target_q.copy(), self._g_cmd,
                           self.state, reasons, False)

    def _enter_hold(self, episode_state: SafetyState, why: str) -> None:
        """Switch the episode state and freeze the target at the current pose (so resuming only
        executes new deltas, never stale ones); the gripper target freezes at its command."""
        self._episode = episode_state
        self._hold_reason = why
        safe = self._safe_point(self._p_est)
        if safe is not None:  # else keep the previous target, which is safe by construction
            self._target_p = safe
        self._target_q = self._q_est.copy()
        self._g_target = self._g_cmd

    def _ignore(self, reason: str) -> Verdict:
        self._counters["actions_ignored"] += 1
        self._last_reasons = (reason,)
        return Verdict(False, self._last_reasons)

    def _refuse(self, cause: str, detail: str) -> Verdict:
        """A freshness rejection: ``rejected:<cause>``, counted by cause, hold with the detail."""
        self._drops[cause] += 1
        self._refusal = f"{cause}: {detail}"
        self._counters["actions_rejected"] += 1
        if self.state == SafetyState.RUNNING:
            self._drops[f"hold:{cause}"] += 1  # a trip, as when a tick finds the pose or target too old
            self._enter_hold(SafetyState.HOLDING, f"{cause}: {detail}")
        self._last_reasons = (f"rejected:{cause}",)
        return Verdict(False, self._last_reasons)

    def _reject(self, reason: str) -> Verdict:
        self._counters["actions_rejected"] += 1
        if self._episode == SafetyState.RUNNING:
            self._enter_hold(SafetyState.HOLDING, reason)
        self._last_reasons = (reason,)
        return Verdict(False, self._last_reasons)

    def _inside_keep_out(self, p: np.ndarray) -> bool:
        return _inside_any(p, self._boxes)

    def _project_shallow(self, p: np.ndarray, tol: float) -> np.ndarray | None:
        """``p`` pushed onto the nearest face of any keep-out box it is at most ``tol`` inside;
        None when it is deeper inside one (or pushing lands inside another)."""
        p = p.copy()
        for lo, hi in self._boxes:
            if not (np.all(p > lo) and np.all(p < hi)):
                continue
            depth_lo, depth_hi = p - lo, hi - p
            i_lo, i_hi = int(np.argmin(depth_lo)), int(np.argmin(depth_hi))
            if depth_lo[i_lo] <= depth_hi[i_hi]:
                axis, face, depth = i_lo, lo[i_lo], depth_lo[i_lo]
            else:
                axis, face, depth = i_hi, hi[i_hi], depth_hi[i_hi]
            if depth > tol:
                return None
            p[axis] = face
        return None if self._inside_keep_out(p) else p

    def _safe_point(self, p: np.ndarray) -> np.ndarray | None:
        """A target near ``p`` inside the workspace and clear of keep-out boxes (by the face
        margin), or None when ``p`` is deeper than ``boundary_tolerance_m`` inside a box."""
        return _safe_point_in(p, self._ws_lo, self._ws_hi, self._boxes, self._cfg.boundary_tolerance_m)

    def _limit_keep_out(self, p: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, set[int], bool]:
        """Shorten the components of step ``d`` from ``p`` so that ``p -> p + d`` enters no keep-out box.

        At the first box the segment would enter, the component along that face's normal is cut
        so the step ends on the face; the other components are kept (sliding). Repeats until the
        segment is clear. Components only ever shrink, so a step that was inside the (convex)
        workspace stays inside. Returns (step, indices of boxes hit, blocked) — blocked when ``p``
        itself is inside a box (then the step is zero).
        """
        d = np.array(d, dtype=np.float64)
        hits: set[int] = set()
        for _ in range(3 * len(self._boxes) + 1):
            first: tuple[float, int, int] | None = None
            for k, (lo, hi) in enumerate(self._boxes):
                entry = _segment_entry(p, d, lo, hi)
                if entry is None:
                    continue
                if entry[1] < 0:
                    return np.zeros(3), hits, True
                if first is None or entry[0] < first[0]:
                    first = (entry[0], entry[1], k)
            if first is None:
                return d, hits, False
            _, axis, k = first
            lo, hi = self._boxes[k]
            face = lo[axis] if d[axis] > 0 else hi[axis]
            d[axis] = face - p[axis]
            hits.add(k)
        return np.zeros(3), hits, True  # could not resolve (pathological box layout): do not move
