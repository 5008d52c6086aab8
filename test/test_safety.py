"""Tests for rt2_ros.safety: the invariants a roboticist relies on, checked on random input.

The main property test decodes 10,000 random RT-2 answers (text -> tokenizer -> ArmAction),
feeds them through the filter with random start poses, random tick intervals, terminates,
NaN actions, e-stops and watchdog gaps, integrates the commanded twist itself, and checks
every limit on every tick. Unit tests pin the timing and state-machine details.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transforms3d import quaternions as tq

from rt2_ros.actions import ArmAction
from rt2_ros.params import ConfigError, markdown_table
from rt2_ros.safety import SAFETY_PARAMS, SafeCommand, SafetyConfig, SafetyFilter, SafetyState, Verdict
from rt2_ros.tokens import ActionTokenizer

EPS = 1e-9
BOX_A = [0.40, -0.10, 0.00, 0.50, 0.10, 0.20]
BOX_B = [0.60, 0.15, 0.30, 0.70, 0.35, 0.45]
IDENTITY = (1.0, 0.0, 0.0, 0.0)
HOLD_OK = ("hold:", "limited:workspace", "limited:keep_out", "limited:outside_workspace")


# -- helpers -------------------------------------------------------------------------------------------
def make_filter(**overrides: object) -> SafetyFilter:
    return SafetyFilter(SafetyConfig.from_params({f"safety.{k}": v for k, v in overrides.items()}))


def act(f: SafetyFilter, action: object, now: object, age: float = 0.0) -> Verdict:
    """``f.on_action`` for an action whose camera frame was taken ``age`` seconds before ``now``."""
    obs = now - age if isinstance(now, (int, float)) and not isinstance(now, bool) else 0.0
    return f.on_action(action, now, observation_time=obs)  # type: ignore[arg-type]


class Arm:
    """A perfect arm for tests about other rules: it follows each commanded twist exactly (for at most
    lookahead_s, as MoveIt Servo) and reports its pose on every tick, so the pose is always fresh."""

    def __init__(self, f: SafetyFilter, p: object, q: object = IDENTITY, now: float = 0.0) -> None:
        self.f, self.p, self.q, self.t = f, np.array(p, dtype=np.float64), np.array(q, dtype=np.float64), now
        self.v, self.w = np.zeros(3), np.zeros(3)

    def tick(self, now: float) -> SafeCommand:
        dt = min(now - self.t, self.f.config.lookahead_s)
        self.p, self.q, self.t = self.p + self.v * dt, rotate(self.q, self.w * dt), now
        cmd = self.f.tick(now, self.p, self.q)
        self.v, self.w = cmd.linear_velocity, cmd.angular_velocity
        return cmd


def norm(v: np.ndarray) -> float:
    return float(np.linalg.norm(v))


@functools.cache
def _bounds(cfg: SafetyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    boxes = np.array(cfg.keep_out_boxes, dtype=np.float64).reshape(-1, 6)
    return np.array(cfg.workspace_min), np.array(cfg.workspace_max), boxes[:, :3], boxes[:, 3:]


def in_workspace(cfg: SafetyConfig, p: np.ndarray, eps: float = EPS) -> bool:
    lo, hi, _, _ = _bounds(cfg)
    return bool(np.all(p >= lo - eps) and np.all(p <= hi + eps))


def in_keep_out(cfg: SafetyConfig, p: np.ndarray, eps: float = EPS) -> bool:
    """Strictly inside some keep-out box by more than ``eps`` (touching a face is allowed)."""
    _, _, box_lo, box_hi = _bounds(cfg)
    return bool(np.any(np.all((p > box_lo + eps) & (p < box_hi - eps), axis=-1)))


def safe(cfg: SafetyConfig, *points: np.ndarray) -> bool:
    """All ``points`` inside the workspace and outside every keep-out box (vectorised: hot loop)."""
    pts = np.array(points)
    lo, hi, box_lo, box_hi = _bounds(cfg)
    if not (np.all(pts >= lo - EPS) and np.all(pts <= hi + EPS)):
        return False
    inside = (pts[:, None, :] > box_lo + EPS) & (pts[:, None, :] < box_hi - EPS)
    return not bool(np.any(np.all(inside, axis=-1)))


def rotation_angle(q_from: np.ndarray, q_to: np.ndarray) -> float:
    d = tq.qmult(q_to, tq.qinverse(q_from))
    return 2.0 * math.atan2(norm(d[1:]), abs(d[0]))


def rotate(q: np.ndarray, rotvec: np.ndarray) -> np.ndarray:
    """q advanced by a base-frame rotation vector (the test's own integrator, independent of safety.py)."""
    angle = norm(rotvec)
    if angle == 0.0:
        return q
    r = tq.axangle2quat(rotvec / angle, angle)
    out = tq.qmult(r, q)
    return out / norm(out)


def is_zero(cmd: SafeCommand) -> bool:
    return not cmd.moving and not np.any(cmd.linear_velocity) and not np.any(cmd.angular_velocity)


def random_quaternion(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    return q / norm(q)


def random_safe_point(rng: np.random.Generator, cfg: SafetyConfig, near: np.ndarray | None = None,
                      radius: float = 0.0) -> np.ndarray:
    lo, hi = np.array(cfg.workspace_min), np.array(cfg.workspace_max)
    if near is not None:
        lo, hi = np.maximum(lo, near - radius), np.minimum(hi, near + radius)
    while True:
        p = rng.uniform(lo, hi)
        # a start pose touching a box face is legal, but keep the random ones clearly outside
        if not in_keep_out(cfg, p, eps=-1e-3):
            return p


def push_behind_box(rng: np.random.Generator, cfg: SafetyConfig, p: np.ndarray, target: np.ndarray) -> np.ndarray:
    if cfg.keep_out_boxes and rng.random() < 0.7:
        box = np.array(cfg.keep_out_boxes[int(rng.integers(len(cfg.keep_out_boxes)))])
        centre, half = 0.5 * (box[:3] + box[3:]), 0.5 * (box[3:] - box[:3])
        away = centre - target
        if norm(away) > 1e-6:
            candidate = centre + away / norm(away) * (norm(half) + rng.uniform(0.005, 0.05))
            candidate = np.clip(candidate, cfg.workspace_min, cfg.workspace_max)
            if not in_keep_out(cfg, candidate, eps=-1e-3):
                return candidate
    return random_safe_point(rng, cfg, near=p, radius=0.15)


# -- the big property test ------------------------------------------------------------------------
CONFIGS = {
    "default": {},
    "keep_out": {"safety.keep_out_boxes": BOX_A + BOX_B},
    "tight_fast": {"safety.keep_out_boxes": BOX_A, "safety.max_step_translation_m": 0.01,
                   "safety.max_step_rotation_rad": 0.05, "safety.max_linear_speed_m_s": 0.05,
                   "safety.max_angular_speed_rad_s": 0.3, "safety.max_linear_accel_m_s2": 0.3,
                   "safety.max_angular_accel_rad_s2": 1.0, "safety.position_gain_per_s": 20.0,
                   "safety.max_gripper_rate_per_s": 0.2, "safety.command_rate_hz": 50.0,
                   "safety.lookahead_s": 0.05, "safety.watchdog_timeout_s": 0.4},
}
TOKENIZERS = (
    ActionTokenizer.from_profile("rt2"),
    # 15x the default scale: most steps exceed the step limits, so clipping is exercised.
    ActionTokenizer.from_profile("rt2", translation_scale_m=0.3, rotation_scale_rad=1.5),
    ActionTokenizer.from_profile("rt2", gripper_mode="relative"),
)
N_ANSWERS = 10_000
ANSWERS_PER_EPISODE = 4


class Model:
    """What the test expects the filter to do (kept deliberately simpler than the filter)."""

    def __init__(self) -> None:
        self.mode = "running"  # running | held | terminated | estopped
        self.last_accept = 0.0
        self.rejected = self.terminations = self.estops = 0
        self.keep_out_limited = 0  # ticks where a keep-out box cut the twist
        self.gripper: float | None = None  # the filter's gripper command as the model expects it
        self.gripper_jumps = self.gripper_unknown_ignored = self.restarts = 0
        # freshness: when the pose was last measured, when the frame behind the target was taken,
        # when the last step was applied (burst limit); refusals and holds by cause
        self.pose_time = self.target_obs = self.last_step = -math.inf
        self.causes: Counter[str] = Counter()

    def start(self, now: float) -> None:
        self.mode, self.last_accept = "running", now
        self.pose_time, self.target_obs, self.last_step = now, -math.inf, -math.inf

    def tick_hold(self, cfg: SafetyConfig, now: float) -> str:
        """The hold reason the filter must give on this tick of a running episode ("" = none)."""
        if now - self.last_accept >= cfg.watchdog_timeout_s:
            return "hold:watchdog"
        if now - self.pose_time > cfg.max_pose_age_s:
            return "hold:no_fresh_pose"
        if now - self.target_obs > cfg.max_action_age_s:
            return "hold:stale_action"
        return ""

    def refusal(self, cfg: SafetyConfig, now: float, obs: float | None) -> str:
        """The freshness or rate cause for which a finite, non-terminate action is not executed."""
        if obs is None:
            return "no_observation_stamp"
        if obs - now > cfg.max_future_stamp_s:
            return "future_action"
        if now - obs > cfg.max_action_age_s:
            return "stale_action"
        if now - self.pose_time > cfg.max_pose_age_s:
            return "no_fresh_pose"
        if now - self.last_step < cfg.min_action_interval_s:
            return "burst"
        return ""


def check_tick(cfg: SafetyConfig, cmd: SafeCommand, model: Model, now: float, dt: float,
               v_prev: np.ndarray, w_prev: np.ndarray, g_prev: float | None, p: np.ndarray) -> None:
    v, w = cmd.linear_velocity, cmd.angular_velocity
    dt_eff = min(dt, cfg.lookahead_s)
    model.keep_out_limited += "limited:keep_out" in cmd.reasons
    if model.mode == "running" and (hold := model.tick_hold(cfg, now)):
        model.mode = "held"  # the watchdog, a stale pose or a stale target must hold on this very tick
        assert cmd.reasons == (hold,), (cmd.reasons, hold)
        if hold != "hold:watchdog":
            model.causes[hold] += 1
    if model.mode != "running":
        assert is_zero(cmd), (model.mode, cmd)
        expected = {"held": SafetyState.HOLDING, "terminated": SafetyState.TERMINATED,
                    "estopped": SafetyState.ESTOPPED}[model.mode]
        assert cmd.state == expected
    else:
        assert cmd.state == SafetyState.RUNNING, cmd
    # speed limits, and acceleration: never speeds up faster than allowed; any other change
    # beyond accel * dt only when a safety limit cut the twist down
    assert norm(v) <= cfg.max_linear_speed_m_s + EPS
    assert norm(w) <= cfg.max_angular_speed_rad_s + EPS
    assert norm(v) <= norm(v_prev) + cfg.max_linear_accel_m_s2 * dt_eff + EPS
    if not any(r.startswith(HOLD_OK) for r in cmd.reasons):
        assert norm(v - v_prev) <= cfg.max_linear_accel_m_s2 * dt_eff + EPS, cmd.reasons
        assert norm(w - w_prev) <= cfg.max_angular_accel_rad_s2 * dt_eff + EPS, cmd.reasons
    if g_prev is None or model.mode != "running":
        # unknown stays unknown (never an invented "open") until an absolute action sets it, which
        # is taken as is; a hold never changes the gripper command
        assert cmd.gripper == model.gripper, (g_prev, model.gripper, cmd)
    else:
        assert cmd.gripper is not None and 0.0 <= cmd.gripper <= 1.0
        assert abs(cmd.gripper - g_prev) <= cfg.max_gripper_rate_per_s * dt_eff + EPS
    model.gripper = cmd.gripper
    # no motion on old data: a moving twist only on a fresh pose and a fresh target
    if cmd.moving:
        assert now - model.pose_time <= cfg.max_pose_age_s and now - model.target_obs <= cfg.max_action_age_s
    # the target, the current position and the whole look-ahead segment are safe
    ahead = v * cfg.lookahead_s
    assert safe(cfg, cmd.target_position, p, p + 0.25 * ahead, p + 0.5 * ahead, p + ahead), (p, v)


def observation_age(rng: np.random.Generator, cfg: SafetyConfig) -> float | None:
    """How old the camera frame behind an action is on arrival: mostly a normal model latency,
    sometimes too old, stamped in the future beyond the tolerance, or unknown (None)."""
    r = rng.random()
    if r < 0.03:
        return cfg.max_action_age_s + float(rng.uniform(0.001, 1.0))
    if r < 0.05:
        return -(cfg.max_future_stamp_s + float(rng.uniform(0.001, 0.5)))
    if r < 0.06:
        return None
    return float(rng.uniform(-cfg.max_future_stamp_s, 0.4))


def run_episode(f: SafetyFilter, tok: ActionTokenizer, rng: np.random.Generator, model: Model,
                now: float, seq: int) -> tuple[float, int]:
    cfg = f.config
    if f.state == SafetyState.ESTOPPED:
        assert not f.start_episode(random_safe_point(rng, cfg), IDENTITY, 0.0, now)  # estop wins
        assert f.reset_estop()
        assert f.state == SafetyState.IDLE
        assert f.tick(now).linear_velocity.tolist() == [0.0, 0.0, 0.0]
    p = random_safe_point(rng, cfg)
    q = random_quaternion(rng)
    g_start = None if rng.random() < 0.3 else float(rng.uniform(0.0, 1.0))  # None: keep the filter's own
    assert f.start_episode(p, q, g_start, now)
    if g_start is not None:
        model.gripper = g_start
    assert f.gripper_command == model.gripper
    g_prev = model.gripper
    model.start(now)
    # How often the arm driver's pose arrives: every tick, with gaps, or never after the start
    # (then the filter may dead-reckon only up to max_pose_age_s, and holds after that)
    p_measure = float(rng.choice([1.0, 0.9, 0.6, 0.0], p=[0.4, 0.3, 0.2, 0.1]))
    v_prev, w_prev = np.zeros(3), np.zeros(3)
    for _ in range(ANSWERS_PER_EPISODE):
        event = rng.random()
        n_ticks = int(rng.integers(1, 6))
        if event < 0.03:
            f.estop("property test")
            model.estops += model.mode != "estopped"
            model.mode = "estopped"
            f.fault("ignored while e-stopped")  # must not change anything
            assert f.state == SafetyState.ESTOPPED
        elif event < 0.06:
            action = ArmAction(rng.normal(0, 0.01, 3), rng.normal(0, 0.1, 3), 0.5, observation_seq=seq)
            bad = np.concatenate([action.translation, action.rotation, [action.gripper]])
            bad[rng.integers(0, 7)] = rng.choice([np.nan, np.inf, -np.inf])
            verdict = act(f, ArmAction(bad[:3], bad[3:6], bad[6], observation_seq=seq), now)
            assert not verdict.accepted
            if model.mode == "running" or model.mode == "held":
                assert verdict.reasons == ("rejected:non_finite",)
                model.rejected += 1
                model.mode = "held"
        else:
            bins = rng.integers(0, tok.n_bins, tok.n_dims)
            bins[0] = tok.terminate_bin if rng.random() < 0.05 else tok.continue_bin
            action = tok.decode(tok.parse_text(tok.format_text(bins)).bins, observation_seq=seq)
            before_p, before_q = f.target_position, f.target_orientation
            age = observation_age(rng, cfg)
            obs = None if age is None else now - age
            verdict = f.on_action(action, now, observation_time=obs)
            refusal = model.refusal(cfg, now, obs)
            if model.mode == "estopped":
                assert verdict.reasons == ("ignored:estopped",) and not verdict.accepted
            elif model.mode == "terminated":
                assert verdict.reasons == ("ignored:terminated",) and not verdict.accepted
            elif action.terminate:
                assert verdict.accepted and verdict.reasons == ("terminate",)  # stopping needs no fresh data
                model.mode = "terminated"
                model.terminations += 1
            elif refusal:
                assert not verdict.accepted
                model.causes[refusal] += 1
                if refusal == "burst":  # dropped: the step already applied stands, no hold
                    assert verdict.reasons == ("dropped:burst",)
                    np.testing.assert_array_equal(f.target_position, before_p)
                else:  # hold: the target froze at the arm's pose (if it was running), nothing added
                    assert verdict.reasons == (f"rejected:{refusal}",)
                    model.rejected += 1
                    if model.mode == "running":
                        model.causes[f"hold:{refusal}"] += 1  # a trip
                    model.mode = "held"
            else:
                assert verdict.accepted, verdict
                model.mode, model.last_accept, model.last_step = "running", now, now
                model.target_obs = obs
                if model.gripper is not None:
                    assert "ignored:gripper_unknown" not in verdict.reasons
                elif action.gripper_relative:
                    assert "ignored:gripper_unknown" in verdict.reasons
                    model.gripper_unknown_ignored += 1
                else:
                    model.gripper = min(max(action.gripper, 0.0), 1.0)
                    model.gripper_jumps += 1
                assert f.gripper_command == model.gripper
                assert norm(f.target_position - before_p) <= cfg.max_step_translation_m + EPS
                assert rotation_angle(before_q, f.target_orientation) <= cfg.max_step_rotation_rad + 1e-7
            assert safe(cfg, f.target_position)
        if rng.random() < 0.05:  # the policy goes silent: the watchdog must hold the arm
            n_ticks = int(cfg.watchdog_timeout_s / cfg.lookahead_s) + 4
        seq += 1
        for _ in range(n_ticks):
            # mostly regular ticks; sometimes the executor stalls for longer than the look-ahead
            stall = rng.random() < 0.02
            dt = float(rng.uniform(1.0, 3.0) if stall else rng.uniform(0.1, 1.0)) * cfg.lookahead_s
            now += dt
            # The arm follows the commanded twist exactly, for at most lookahead_s (then the
            # controller drops the stale command, as MoveIt Servo does).
            p = p + v_prev * min(dt, cfg.lookahead_s)
            q = rotate(q, w_prev * min(dt, cfg.lookahead_s))
            measured = bool(rng.random() < p_measure)
            if measured:
                model.pose_time = now
                if rng.random() < 0.03:
                    # someone pushes the arm to another (safe) place; often right behind a keep-out
                    # box, so that the straight path back to the target cuts through the box
                    p = push_behind_box(rng, cfg, p, f.target_position)
            cmd = f.tick(now, p if measured else None, q if measured else None)
            check_tick(cfg, cmd, model, now, dt, v_prev, w_prev, g_prev, p)
            v_prev, w_prev, g_prev = cmd.linear_velocity, cmd.angular_velocity, cmd.gripper
    if rng.random() < 0.3:
        f.stop_episode("next instruction")
        assert f.state in (SafetyState.IDLE, SafetyState.ESTOPPED)
        assert is_zero(f.tick(now + 0.01))
        now += 0.01
    return now + 1.0, seq


def test_random_token_sequences_never_violate_limits() -> None:
    """10,000 random decoded RT-2 answers, random start poses, terminates, NaNs, e-stops, watchdog gaps,
    node restarts (a fresh filter: gripper unknown), stale / future / unstamped actions, bursts and pose
    gaps: every refusal and hold is predicted by a simple model, with its cause."""
    rng = np.random.default_rng(20240611)
    filters = {name: SafetyFilter(SafetyConfig.from_params(values)) for name, values in CONFIGS.items()}
    models = {name: Model() for name in CONFIGS}
    retired = {name: Counter[str]() for name in CONFIGS}  # counters of filters replaced by a restart
    retired_drops = {name: Counter[str]() for name in CONFIGS}
    names = list(CONFIGS)
    now, seq = 100.0, 0
    for _ in range(N_ANSWERS // ANSWERS_PER_EPISODE):
        name = names[int(rng.integers(len(names)))]
        tok = TOKENIZERS[int(rng.integers(len(TOKENIZERS)))]
        if rng.random() < 0.05:  # the safety node restarts: it must not know (or invent) the gripper state
            retired[name].update(filters[name].counters)
            retired_drops[name].update(filters[name].drop_counts)
            filters[name] = SafetyFilter(filters[name].config)
            models[name].gripper = None
            models[name].restarts += 1
            assert is_zero(filters[name].tick(now)) and filters[name].tick(now).gripper is None
        now, seq = run_episode(filters[name], tok, rng, models[name], now, seq)
    clipped = keep_out_limited = 0
    for name, f in filters.items():
        c, m = retired[name] + Counter(f.counters), models[name]
        assert c["actions_rejected"] == m.rejected  # every NaN and freshness refusal counted, nothing else
        assert retired_drops[name] + Counter(f.drop_counts) == m.causes  # each by its cause
        assert c["actions_dropped"] == m.causes["burst"]
        assert c["terminations"] == m.terminations
        assert c["estops"] == m.estops
        clipped += c["actions_clipped"]
        assert m.rejected > 0 and m.terminations > 0 and m.estops > 0 and c["watchdog_trips"] > 0
        keep_out_limited += m.keep_out_limited
    assert clipped > 100  # the large-scale tokenizer really exercised the limits
    assert keep_out_limited > 50  # pushed arms really had to go around boxes
    assert sum(m.restarts for m in models.values()) > 10
    assert sum(m.gripper_jumps for m in models.values()) > 10  # unknown -> known on an absolute action
    assert sum(m.gripper_unknown_ignored for m in models.values()) > 10  # relative while unknown
    causes = sum((m.causes for m in models.values()), Counter[str]())
    for cause in ("no_observation_stamp", "future_action", "stale_action", "no_fresh_pose", "burst",
                  "hold:no_fresh_pose", "hold:stale_action"):
        assert causes[cause] > 10, causes  # every freshness rule was exercised


# -- hypothesis: arbitrary (also absurd) actions -----------------------------------------------------
finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)
big = st.floats(min_value=-10.0, max_value=10.0)
vectors = st.lists(st.one_of(big, finite_or_not), min_size=3, max_size=3)
actions = st.builds(ArmAction, translation=vectors, rotation=vectors, gripper=st.one_of(big, finite_or_not),
                    gripper_relative=st.booleans())


@settings(max_examples=300, derandomize=True, deadline=None)
@given(start=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
       gripper=st.one_of(st.none(), st.floats(-1.0, 2.0)),
       steps=st.lists(actions, min_size=1, max_size=8))
def test_any_action_keeps_target_safe_and_steps_bounded(start: tuple[float, float, float], gripper: float | None,
                                                        steps: list[ArmAction]) -> None:
    f = make_filter(keep_out_boxes=BOX_A + BOX_B, min_action_interval_s=0.0)  # 8 actions in 70 ms
    cfg = f.config
    p0 = np.array(cfg.workspace_min) + np.array(start) * (np.array(cfg.workspace_max) - np.array(cfg.workspace_min))
    if in_keep_out(cfg, p0, eps=-cfg.boundary_tolerance_m):
        return  # start poses inside a box are refused; tested separately
    assert f.start_episode(p0, IDENTITY, gripper, 0.0)
    g_cmd = None if gripper is None else min(max(gripper, 0.0), 1.0)  # a fresh filter knows no gripper
    assert f.gripper_command == g_cmd
    for i, action in enumerate(steps):
        before_p, before_q = f.target_position, f.target_orientation
        verdict = act(f, action, 0.01 * i)
        if not action.is_finite():
            assert not verdict.accepted and verdict.reasons == ("rejected:non_finite",)
            assert f.state == SafetyState.HOLDING
        else:
            assert verdict.accepted
            # the command only changes here when it was unknown: then it takes an absolute value at once
            assert ("ignored:gripper_unknown" in verdict.reasons) == (g_cmd is None and action.gripper_relative)
            if g_cmd is None and not action.gripper_relative:
                g_cmd = min(max(action.gripper, 0.0), 1.0)
            assert norm(f.target_position - before_p) <= cfg.max_step_translation_m + EPS
            assert rotation_angle(before_q, f.target_orientation) <= cfg.max_step_rotation_rad + 1e-7
            # the straight path from the old to the new target never crosses a keep-out box
            for s in np.linspace(0.0, 1.0, 21):
                assert not in_keep_out(cfg, before_p + s * (f.target_position - before_p))
        assert safe(cfg, f.target_position)
        assert f.gripper_command == g_cmd


# -- configuration ----------------------------------------------------------------------------------------
def test_config_round_trips_and_defaults_are_valid() -> None:
    cfg = SafetyConfig.from_params({})
    assert SafetyConfig.from_params(cfg.to_params()) == cfg
    with_boxes = SafetyConfig.from_params({"safety.keep_out_boxes": BOX_A + BOX_B})
    assert with_boxes.keep_out_boxes == (tuple(BOX_A), tuple(BOX_B))
    assert SafetyConfig.from_params(with_boxes.to_params()) == with_boxes
    assert {s.name for s in SAFETY_PARAMS} == set(cfg.to_params())


@pytest.mark.parametrize(("values", "key"), [
    ({"safety.workspace_min": [0.8, -0.35, 0.02]}, "safety.workspace_min"),
    ({"safety.workspace_max": [0.75, 0.35]}, "safety.workspace_max"),
    ({"safety.workspace_max": [0.75, "a", 0.5]}, "safety.workspace_max"),
    ({"safety.keep_out_boxes": [0.4, 0.0, 0.0, 0.5, 0.1]}, "safety.keep_out_boxes"),
    ({"safety.keep_out_boxes": [0.5, 0.0, 0.0, 0.4, 0.1, 0.1]}, "safety.keep_out_boxes"),
    ({"safety.keep_out_boxes": [0.0, -1.0, -1.0, 1.0, 1.0, 1.0]}, "safety.keep_out_boxes"),
    ({"safety.max_linear_speed_m_s": -0.1}, "safety.max_linear_speed_m_s"),
    ({"safety.max_linear_speed_m_s": float("nan")}, "safety.max_linear_speed_m_s"),
    ({"safety.watchdog_timeout_s": "1.0"}, "safety.watchdog_timeout_s"),
    ({"safety.watchdog_timeout_s": 0.02, "safety.command_rate_hz": 30.0}, "safety.watchdog_timeout_s"),
    ({"safety.lookahead_s": 0.01, "safety.command_rate_hz": 30.0}, "safety.lookahead_s"),
    ({"safety.max_step_translaton_m": 0.05}, "safety.max_step_translaton_m"),
    ({"safety.min_action_interval_s": 0.5, "safety.watchdog_timeout_s": 0.5}, "safety.min_action_interval_s"),
    ({"safety.min_action_interval_s": 0.3, "safety.max_action_age_s": 0.2}, "safety.min_action_interval_s"),
    ({"safety.max_pose_age_s": 2.0}, "safety.max_pose_age_s"),
    ({"safety.max_action_age_s": 0.0}, "safety.max_action_age_s"),
    ({"safety.max_future_stamp_s": -0.1}, "safety.max_future_stamp_s"),
    ({"safety.max_outside_workspace_m": 0.004, "safety.boundary_tolerance_m": 0.005},
     "safety.max_outside_workspace_m"),
])
def test_config_errors_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SafetyConfig.from_params(values)


# -- watchdog -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timeout", [0.2, 1.0, 2.5])
@pytest.mark.parametrize("rate", [30.0, 50.0])
def test_watchdog_holds_within_timeout_and_counts_once(timeout: float, rate: float) -> None:
    f = make_filter(watchdog_timeout_s=timeout, command_rate_hz=rate, max_action_age_s=10.0)  # watchdog first
    t_action = 10.0
    assert f.start_episode([0.4, 0.2, 0.3], IDENTITY, 0.0, t_action - 0.05)
    arm = Arm(f, [0.4, 0.2, 0.3], now=t_action - 0.05)
    assert act(f, ArmAction([0.05, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0), t_action).accepted
    period = 1.0 / rate
    now, first_hold = t_action, None
    while now < t_action + timeout + 5 * period:
        now += period
        cmd = arm.tick(now)
        if first_hold is None and cmd.state == SafetyState.HOLDING:
            first_hold = now
        if now - t_action < timeout - 1e-9:
            assert cmd.state == SafetyState.RUNNING
            assert cmd.moving or norm(f.target_position - [0.45, 0.2, 0.3]) < 1e-12
    assert first_hold is not None
    assert timeout <= first_hold - t_action <= timeout + period + 1e-9  # first tick at/after the timeout
    assert f.counters["watchdog_trips"] == 1  # counted once per trip, not per tick
    assert f.drop_counts == {}  # neither the pose nor the action was too old
    assert is_zero(arm.tick(now + period))
    # a fresh action resumes; the target restarts from where the arm stopped, not from a stale target
    stopped_at = f.target_position
    assert act(f, ArmAction([0.0, 0.0, 0.01], [0.0, 0.0, 0.0], 0.0), now + 2 * period).accepted
    assert f.state == SafetyState.RUNNING
    np.testing.assert_allclose(f.target_position, stopped_at + np.array([0.0, 0.0, 0.01]))
    assert arm.tick(now + 3 * period).moving


def test_stalled_tick_counts_as_lookahead_only() -> None:
    """After a 2 s executor stall the twist and gripper change as after one look-ahead period."""
    f = make_filter(watchdog_timeout_s=10.0, max_action_age_s=5.0)
    cfg = f.config
    assert f.start_episode([0.3, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    for t in (0.0, 0.1):
        assert act(f, ArmAction([0.05, 0.0, 0.0], [0.0, 0.0, 0.25], 1.0), t).accepted
    cmd = f.tick(2.0, [0.3, 0.0, 0.3], IDENTITY)  # the pose arrived after the stall
    assert norm(cmd.linear_velocity) == pytest.approx(cfg.max_linear_accel_m_s2 * cfg.lookahead_s)
    assert norm(cmd.angular_velocity) == pytest.approx(cfg.max_angular_accel_rad_s2 * cfg.lookahead_s)
    assert cmd.gripper == pytest.approx(cfg.max_gripper_rate_per_s * cfg.lookahead_s)


def test_watchdog_starts_at_episode_start() -> None:
    f = make_filter(watchdog_timeout_s=0.5)
    assert f.start_episode([0.4, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    assert f.tick(0.49, [0.4, 0.0, 0.3], IDENTITY).state == SafetyState.RUNNING
    assert f.tick(0.5, [0.4, 0.0, 0.3], IDENTITY).reasons == ("hold:watchdog",)


# -- freshness: action age, pose age, bursts -------------------------------------------------------------------
POSE = [0.45, 0.0, 0.3]


def running(**overrides: object) -> tuple[SafetyFilter, Arm]:
    """An episode started at t = 0 from POSE, with a perfect arm reporting fresh poses."""
    f = make_filter(**overrides)
    assert f.start_episode(POSE, IDENTITY, 0.0, 0.0)
    return f, Arm(f, POSE)


@pytest.mark.parametrize("obs", [None, float("nan"), float("inf"), "yesterday"])
def test_action_of_unknown_age_is_rejected_and_holds(obs: object) -> None:
    f, now, arm = moving_filter()
    before = f.counters["actions_rejected"]
    verdict = f.on_action(ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now + 0.05, observation_time=obs)  # type: ignore[arg-type]
    assert not verdict.accepted and verdict.reasons == ("rejected:no_observation_stamp",)
    assert f.state == SafetyState.HOLDING and f.hold_reason.startswith("no_observation_stamp: ")
    assert f.counters["actions_rejected"] == before + 1 and f.drop_counts == {"no_observation_stamp": 1,
                                                                            "hold:no_observation_stamp": 1}
    assert "no_observation_stamp" in f.last_refusal
    assert is_zero(arm.tick(arm.t + 1 / 30))
    # the same action with its stamp resumes
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), arm.t + 0.1).accepted
    assert arm.tick(arm.t + 1 / 30).moving


@pytest.mark.parametrize("max_age", [0.3, 1.0, 2.5])
def test_action_older_than_the_bound_on_arrival_is_rejected(max_age: float) -> None:
    f, arm = running(max_action_age_s=max_age, watchdog_timeout_s=5.0)
    arm.tick(0.05)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.1, age=max_age).accepted  # at the bound: still fresh
    np.testing.assert_allclose(f.target_position, [0.46, 0.0, 0.3])
    verdict = act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.2, age=max_age + 1e-6)
    assert verdict.reasons == ("rejected:stale_action",) and f.state == SafetyState.HOLDING
    assert f.hold_reason.startswith("stale_action: camera frame ") and "safety.max_action_age_s" in f.hold_reason
    assert f.drop_counts == {"stale_action": 1, "hold:stale_action": 1}
    assert f.target_position[0] < 0.46 + EPS  # nothing of the stale step was applied
    for i in range(1, 10):
        assert is_zero(arm.tick(0.2 + i / 30))


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.2])
def test_action_stamped_in_the_future_beyond_the_tolerance_is_rejected(tolerance: float) -> None:
    f, arm = running(max_future_stamp_s=tolerance)
    arm.tick(0.05)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.1, age=-tolerance + 1e-9).accepted  # clock jitter
    arm.tick(0.15)
    verdict = act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.2, age=-tolerance - 1e-3)
    assert verdict.reasons == ("rejected:future_action",) and f.state == SafetyState.HOLDING
    assert f.drop_counts == {"future_action": 1, "hold:future_action": 1} and "in the future" in f.hold_reason


@pytest.mark.parametrize("age", [0.0, 0.4, 0.9])
@pytest.mark.parametrize("rate", [30.0, 50.0])
def test_target_is_not_pursued_once_its_frame_is_too_old(age: float, rate: float) -> None:
    """"Executed" also means every tick that drives toward the target: the hold comes on the first tick
    at which the frame behind the target is older than max_action_age_s, not at the watchdog."""
    f, arm = running(command_rate_hz=rate, max_linear_speed_m_s=0.01, watchdog_timeout_s=5.0)
    max_age, period = f.config.max_action_age_s, 1.0 / rate
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.1, age=age).accepted  # 5 s of motion at 1 cm/s
    expires, now, first_hold = 0.1 - age + max_age, 0.1, None
    while now < expires + 5 * period:
        now += period
        cmd = arm.tick(now)
        if now - (0.1 - age) <= max_age:
            assert cmd.state == SafetyState.RUNNING and cmd.moving
        elif first_hold is None:
            first_hold = now
            assert cmd.reasons == ("hold:stale_action",) and is_zero(cmd)
        else:
            assert is_zero(cmd) and cmd.state == SafetyState.HOLDING
    assert first_hold is not None and expires < first_hold <= expires + period + 1e-9
    assert f.drop_counts == {"hold:stale_action": 1} and f.counters["watchdog_trips"] == 0
    assert f.hold_reason.startswith("stale_action: the target's camera frame is ")
    assert f.target_position[0] < 0.45 + 0.05 - 0.01  # frozen where the arm stopped, short of the target
    # a fresh action resumes from there
    stopped_at = f.target_position
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now + 0.01).accepted
    np.testing.assert_allclose(f.target_position, stopped_at + np.array([0.01, 0.0, 0.0]))
    assert arm.tick(now + 0.02).moving


def test_a_lowered_action_age_bound_applies_on_the_next_tick() -> None:
    f, arm = running()
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.1, age=0.3).accepted
    assert arm.tick(0.2).moving
    f.update_config(changed(f, max_action_age_s=0.35))
    assert arm.tick(0.25).reasons == ("hold:stale_action",)  # frame 0.45 s old


@pytest.mark.parametrize("terminate_age", [None, 5.0, -5.0])
def test_terminate_needs_no_fresh_data(terminate_age: float | None) -> None:
    f, _ = running()
    obs = None if terminate_age is None else 0.1 - terminate_age
    verdict = f.on_action(ArmAction([np.nan, 0, 0], [0, 0, 0], 0.0, terminate=True), 0.1, observation_time=obs)
    assert verdict.accepted and f.state == SafetyState.TERMINATED and f.drop_counts == {}


@pytest.mark.parametrize("max_pose_age", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("rate", [30.0, 50.0])
def test_pose_loss_holds_within_one_period_of_its_age_bound(max_pose_age: float, rate: float) -> None:
    """ee_pose stops mid-motion: the filter dead-reckons only while the last pose is younger than
    max_pose_age_s, then holds (counted once, reason in hold_reason), refuses actions, and resumes only
    on a fresh action after poses are back."""
    f, arm = running(command_rate_hz=rate, max_pose_age_s=max_pose_age, max_linear_speed_m_s=0.02,
                     watchdog_timeout_s=5.0, max_action_age_s=5.0)
    period = 1.0 / rate
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.0).accepted
    now = 0.0
    for _ in range(5):
        now += period
        assert arm.tick(now).moving
    last_pose, first_hold, n_after = now, None, 0
    while now < last_pose + max_pose_age + 5 * period:
        now += period
        cmd = f.tick(now)  # no measurement
        if now - last_pose <= max_pose_age:
            assert cmd.moving and cmd.state == SafetyState.RUNNING  # dead reckoning, within the bound
        elif first_hold is None:
            first_hold = now
            assert cmd.reasons == ("hold:no_fresh_pose",)
        else:
            n_after += 1
        assert (first_hold is None) or is_zero(cmd)
    assert first_hold is not None and last_pose + max_pose_age < first_hold <= last_pose + max_pose_age + period + EPS
    assert f.drop_counts == {"hold:no_fresh_pose": 1} and n_after >= 4
    assert f.hold_reason.startswith("no_fresh_pose: last ee_pose ") and "safety.max_pose_age_s" in f.hold_reason
    # fresh actions while the pose is stale are refused, and counted
    verdict = act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now)
    assert verdict.reasons == ("rejected:no_fresh_pose",)
    assert f.drop_counts == {"hold:no_fresh_pose": 1, "no_fresh_pose": 1}  # already held: no second trip
    # the pose comes back: still holding ...
    arm.p, arm.t = np.array(f.target_position), now
    for _ in range(5):
        now += period
        assert is_zero(arm.tick(now))
    # ... until the next fresh action
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now).accepted
    assert arm.tick(now + period).moving


def test_pose_age_is_judged_by_its_stamp_not_its_arrival() -> None:
    f, _ = running(max_action_age_s=5.0)
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.0).accepted
    assert f.tick(0.03, POSE, IDENTITY, pose_time=0.0).moving  # measured 30 ms ago
    assert f.tick(0.06, POSE, IDENTITY, pose_time=-0.5).moving  # older than the pose held: not adopted
    assert f.pose_time == 0.0
    assert f.tick(0.2).moving  # dead reckoning on the pose of t = 0
    cmd = f.tick(0.3, POSE, IDENTITY, pose_time=0.3 - 0.26)  # arrives now, but measured 0.26 s ago
    assert cmd.reasons == ("hold:no_fresh_pose",) and is_zero(cmd)
    assert f.pose_time == pytest.approx(0.04)


@pytest.mark.parametrize(("pose_time", "reason"), [(0.1 + 0.06, "rejected:measured_pose_future"),
                                                   (float("nan"), "rejected:measured_pose_time")])
def test_pose_with_a_bad_stamp_gives_a_hold_tick(pose_time: float, reason: str) -> None:
    f, _ = running()
    cmd = f.tick(0.1, POSE, IDENTITY, pose_time=pose_time)
    assert cmd.reasons == (reason,) and is_zero(cmd)


@pytest.mark.parametrize("pose_age", [0.26, -0.06])
def test_episode_does_not_start_on_a_stale_or_future_pose(pose_age: float) -> None:
    f = make_filter()
    assert not f.start_episode(POSE, IDENTITY, 0.0, 1.0, pose_time=1.0 - pose_age)
    assert f.last_reasons == ("rejected:start_pose_stale",) and f.state == SafetyState.IDLE
    assert f.start_episode(POSE, IDENTITY, 0.0, 1.0, pose_time=1.0 - 0.2)


@pytest.mark.parametrize("n", [2, 10, 100])
def test_a_burst_moves_the_target_one_step(n: int) -> None:
    f, arm = running()
    arm.tick(0.05)
    verdicts = [act(f, ArmAction([0.05, 0, 0], [0, 0, 0.25], 0.0), 0.1) for _ in range(n)]
    assert verdicts[0].accepted and all(v.reasons == ("dropped:burst",) for v in verdicts[1:])
    np.testing.assert_allclose(f.target_position, [0.50, 0.0, 0.3])  # one step of 5 cm, not n
    assert rotation_angle(np.array(IDENTITY), f.target_orientation) == pytest.approx(0.25)
    assert f.drop_counts == {"burst": n - 1} and f.counters["actions_dropped"] == n - 1
    assert f.counters["actions_rejected"] == 0 and f.state == SafetyState.RUNNING  # no hold: the step stands
    assert "burst" in f.last_refusal and arm.tick(0.12).moving
    # the next policy period takes the next step
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), 0.1 + f.config.min_action_interval_s).accepted
    np.testing.assert_allclose(f.target_position, [0.55, 0.0, 0.3])


@settings(max_examples=200, derandomize=True, deadline=None)
@given(gaps=st.lists(st.one_of(st.just(0.0), st.floats(0.0, 0.12)), min_size=1, max_size=40))
def test_the_target_advances_at_most_one_step_per_interval(gaps: list[float]) -> None:
    f = make_filter(max_action_age_s=10.0, max_pose_age_s=1.0, watchdog_timeout_s=10.0)
    cfg = f.config
    assert f.start_episode(POSE, IDENTITY, 0.0, 0.0)
    now, accepted_at = 0.0, []
    for gap in gaps:
        now += gap
        f.tick(now, POSE, IDENTITY)
        if act(f, ArmAction([0.0, 0.01, 0.0], [0, 0, 0], 0.0), now).accepted:
            accepted_at.append(now)
    assert all(b - a >= cfg.min_action_interval_s for a, b in itertools.pairwise(accepted_at))
    span = accepted_at[-1] - accepted_at[0]
    assert len(accepted_at) <= 1 + span / cfg.min_action_interval_s + EPS
    assert f.target_position[1] == pytest.approx(0.01 * len(accepted_at))


def test_a_new_episode_takes_its_first_action_at_once() -> None:
    f, _ = running()
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.1).accepted
    assert f.start_episode(POSE, IDENTITY, 0.0, 0.11)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.12).accepted  # not a burst of the old episode


def test_burst_limit_zero_is_off() -> None:
    f, _ = running(min_action_interval_s=0.0)
    for _ in range(3):
        assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.1).accepted
    np.testing.assert_allclose(f.target_position, [0.48, 0.0, 0.3])


# -- keep-out boxes and workspace ----------------------------------------------------------------------------
def test_keep_out_target_stops_on_entry_face_and_slides() -> None:
    f = make_filter(keep_out_boxes=BOX_A)
    assert f.start_episode([0.38, 0.0, 0.1], IDENTITY, 0.0, 0.0)
    verdict = act(f, ArmAction([0.04, 0.0, 0.02], [0, 0, 0], 0.0), 0.1)
    assert verdict.accepted and "clipped:keep_out_0" in verdict.reasons
    # stopped on the x face it would have entered through (not teleported to another face) ...
    np.testing.assert_allclose(f.target_position, [0.40, 0.0, 0.12])
    # ... and the tangential part of the step is kept: it slides along the face
    act(f, ArmAction([0.01, 0.03, 0.0], [0, 0, 0], 0.0), 0.2)
    np.testing.assert_allclose(f.target_position, [0.40, 0.03, 0.12])


def test_motion_slides_around_a_box_between_arm_and_target() -> None:
    f = make_filter(keep_out_boxes=BOX_A)
    cfg = f.config
    assert f.start_episode([0.35, 0.0, 0.24], IDENTITY, 0.0, 0.0)
    act(f, ArmAction([0.0, 0.0, 0.01], [0, 0, 0], 0.0), 0.0)  # target (0.35, 0, 0.25), above-left
    p = np.array([0.55, 0.0, 0.10])  # the arm is measured right of the box: the straight line cuts it
    v, now, limited = np.zeros(3), 0.0, False
    for _ in range(150):
        now += 1 / 30
        p = p + v / 30
        cmd = f.tick(now, p, IDENTITY)
        limited |= "limited:keep_out" in cmd.reasons
        assert not in_keep_out(cfg, p) and not in_keep_out(cfg, p + cmd.linear_velocity * cfg.lookahead_s)
        v = cmd.linear_velocity
        act(f, ArmAction.hold(), now)  # keep the watchdog fed
    assert limited
    assert norm(p - f.target_position) <= cfg.goal_tolerance_m + 1e-3  # it got around the box


@pytest.mark.parametrize(("position", "reason"), [
    ([0.45, 0.0, 0.10], "rejected:start_in_keep_out"),
    ([0.10, 0.0, 0.10], "rejected:start_outside_workspace"),
    ([0.40, 0.0, 0.70], "rejected:start_outside_workspace"),
    ([np.nan, 0.0, 0.1], "rejected:start_non_finite"),
    ([0.4, 0.0], "rejected:start_pose_shape"),
    ("not a pose", "rejected:start_pose_shape"),
])
def test_start_refused_outside_the_safe_set(position: list[float], reason: str) -> None:
    f = make_filter(keep_out_boxes=BOX_A)
    assert not f.start_episode(position, IDENTITY, 0.0, 0.0)
    assert f.last_reasons == (reason,)
    assert f.state == SafetyState.IDLE and is_zero(f.tick(0.1))


def test_start_within_tolerance_is_pulled_onto_the_boundary() -> None:
    f = make_filter(keep_out_boxes=BOX_A)
    cfg = f.config
    assert f.start_episode([0.40 + 0.5 * cfg.boundary_tolerance_m, 0.0, 0.1], IDENTITY, 0.0, 0.0)
    assert safe(cfg, f.target_position) and f.target_position[0] < 0.40
    assert f.start_episode([0.75 + 0.5 * cfg.boundary_tolerance_m, 0.0, 0.1], IDENTITY, 0.0, 0.0)
    assert f.target_position[0] == pytest.approx(0.75)


def test_measured_deep_inside_keep_out_blocks_linear_motion() -> None:
    f = make_filter(keep_out_boxes=BOX_A)
    assert f.start_episode([0.35, 0.0, 0.1], IDENTITY, 0.0, 0.0)
    act(f, ArmAction([-0.02, 0.0, 0.0], [0, 0, 0.1], 0.0), 0.0)
    cmd = f.tick(0.05, [0.45, 0.0, 0.1], IDENTITY)
    assert "hold:inside_keep_out" in cmd.reasons
    assert not np.any(cmd.linear_velocity) and np.any(cmd.angular_velocity)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("side", [-1, 1])
def test_measured_outside_workspace_never_moves_further_out(axis: int, side: int) -> None:
    f = make_filter()
    cfg = f.config
    lo, hi = np.array(cfg.workspace_min), np.array(cfg.workspace_max)
    centre = 0.5 * (lo + hi)
    assert f.start_episode(centre, IDENTITY, 0.0, 0.0)
    outside = centre.copy()
    outside[axis] = (hi if side > 0 else lo)[axis] + side * 0.02
    # push the commanded twist outward first, then report the arm outside (e.g. pushed by a person)
    arm = Arm(f, centre)
    for i in range(1, 20):
        step = np.zeros(3)
        step[axis] = side * 0.05
        if i % 3 == 1:  # a 10 Hz policy
            act(f, ArmAction(step, [0, 0, 0], 0.0), i / 30)
        cmd = arm.tick(i / 30)
    cmd = f.tick(20 / 30, outside, IDENTITY)
    assert side * cmd.linear_velocity[axis] <= 0.0
    assert "limited:outside_workspace" in cmd.reasons


def test_arm_measured_far_outside_the_workspace_latches_a_fault_until_cleared() -> None:
    # No command of the filter puts the arm there (a collision, a controller that does not follow, a
    # simulator whose IK swung the hand 0.7 m out): hold and say so, do not steer from there.
    f, arm = running()
    cfg = f.config
    for i in range(1, 4):
        act(f, ArmAction([0.01, 0.0, 0.0], [0, 0, 0], 0.0), i / 10)
        assert f.state == SafetyState.RUNNING and not is_zero(arm.tick(i / 10))
    far = np.array([cfg.workspace_max[0] + cfg.max_outside_workspace_m + 0.01, *POSE[1:]])
    cmd = f.tick(0.4, far, IDENTITY)
    assert is_zero(cmd) and f.state == SafetyState.FAULT
    assert "arm_outside_workspace" in f.hold_reason and "40 mm outside" in f.hold_reason, f.hold_reason
    assert f.counters["faults"] == 1
    assert not act(f, ArmAction([-0.01, 0.0, 0.0], [0, 0, 0], 0.0), 0.45).accepted  # latched: actions ignored
    assert is_zero(f.tick(0.5, far, IDENTITY)) and f.counters["faults"] == 1  # counted once
    assert f.clear_fault() and f.state == SafetyState.HOLDING
    f.tick(0.55, far, IDENTITY)  # still out there: latched again
    assert f.state == SafetyState.FAULT
    assert f.clear_fault()
    arm.p = np.array(POSE)  # brought back by hand
    f.tick(0.6, arm.p, IDENTITY)
    assert act(f, ArmAction([0.01, 0.0, 0.0], [0, 0, 0], 0.0), 0.65).accepted
    assert f.state == SafetyState.RUNNING and not is_zero(arm.tick(0.7))


def test_arm_just_outside_the_workspace_is_limited_not_faulted() -> None:
    f, _ = running()
    act(f, ArmAction([0.01, 0.0, 0.0], [0, 0, 0], 0.0), 0.1)
    near = np.array(POSE, dtype=np.float64)
    near[2] = f.config.workspace_min[2] - 0.5 * f.config.max_outside_workspace_m
    cmd = f.tick(0.15, near, IDENTITY)
    assert f.state == SafetyState.RUNNING and "limited:outside_workspace" in cmd.reasons


def test_workspace_clip_reason_names_axis_and_side() -> None:
    f = make_filter()
    assert f.start_episode([0.74, 0.0, 0.03], IDENTITY, 0.0, 0.0)
    verdict = act(f, ArmAction([0.03, 0.0, -0.03], [0, 0, 0], 0.0), 0.0)
    assert verdict.accepted
    assert set(verdict.reasons) == {"clipped:workspace_x_max", "clipped:workspace_z_min"}
    np.testing.assert_allclose(f.target_position, [0.75, 0.0, 0.02])


# -- gripper ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("hz", [30.0, 50.0])
def test_gripper_moves_at_most_at_its_rate(rate: float, hz: float) -> None:
    # one action drives the gripper for up to 2 s: its age bound must allow that
    f = make_filter(max_gripper_rate_per_s=rate, command_rate_hz=hz, watchdog_timeout_s=5.0, max_action_age_s=5.0)
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    act(f, ArmAction([0, 0, 0], [0, 0, 0], 1.0), 0.0)
    g, n, arm = 0.0, 0, Arm(f, [0.5, 0.0, 0.3])
    while g < 1.0 - 1e-9:
        n += 1
        cmd = arm.tick(n / hz)
        assert cmd.gripper - g == pytest.approx(min(rate / hz, 1.0 - g))
        g = cmd.gripper
    assert n == math.ceil(hz / rate - 1e-9)


def test_relative_gripper_is_clamped() -> None:
    f = make_filter()
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, 0.7, 0.0)
    verdict = act(f, ArmAction([0, 0, 0], [0, 0, 0], 0.6, gripper_relative=True), 0.0)
    assert verdict.reasons == ("clipped:gripper",)
    arm = Arm(f, [0.5, 0.0, 0.3])
    for i in range(1, 60):
        cmd = arm.tick(i / 30)
    assert cmd.gripper == 1.0


def test_new_filter_commands_no_gripper_until_an_absolute_action() -> None:
    """A restarted node must not command "open" on its own: the gripper may be holding an object."""
    f = make_filter(max_gripper_rate_per_s=0.5)
    assert f.gripper_command is None and f.tick(0.0).gripper is None
    assert f.diagnostics()["gripper_command"] == "unknown"
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, None, 0.0)
    assert f.tick(0.03).gripper is None
    # a relative gripper change of an unknown value: the rest of the action applies, the gripper stays unknown
    verdict = act(f, ArmAction([0.01, 0.0, 0.0], [0, 0, 0], -0.3, gripper_relative=True), 0.05)
    assert verdict.accepted and verdict.reasons == ("ignored:gripper_unknown",)
    np.testing.assert_allclose(f.target_position, [0.51, 0.0, 0.3])
    assert f.counters["actions_clipped"] == 0  # nothing was clipped
    arm = Arm(f, [0.5, 0.0, 0.3], now=0.03)
    for i in range(2, 10):
        cmd = arm.tick(i / 30)
        assert cmd.gripper is None and cmd.state == SafetyState.RUNNING
    assert act(f, ArmAction.hold(), 0.4).reasons == ("ignored:gripper_unknown",)
    assert f.diagnostics()["gripper_command"] == "unknown"


@pytest.mark.parametrize(("value", "expected"), [(0.0, 0.0), (0.35, 0.35), (1.0, 1.0), (1.7, 1.0), (-0.2, 0.0)])
@pytest.mark.parametrize("state_before", ["running", "holding"])
def test_first_absolute_gripper_value_is_taken_at_once(value: float, expected: float, state_before: str) -> None:
    """No ramp from an invented value: ramping from 0 (open) would open a closed gripper on the way."""
    f = make_filter(max_gripper_rate_per_s=0.1)
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, None, 0.0)
    if state_before == "holding":
        f.hold("new instruction")
        assert f.tick(0.02).gripper is None
    verdict = act(f, ArmAction([0, 0, 0], [0, 0, 0], value), 0.05)
    assert verdict.accepted and ("clipped:gripper" in verdict.reasons) == (value != expected)
    assert f.gripper_command == expected
    assert f.tick(0.06).gripper == expected
    assert f.diagnostics()["gripper_command"] == f"{expected:.3f}"
    # once known, changes are rate-limited again, relative ones included
    assert act(f, ArmAction([0, 0, 0], [0, 0, 0], 0.5 if expected < 0.5 else -0.5, gripper_relative=True),
                       0.1).reasons in ((), ("clipped:gripper",))
    cmd = f.tick(0.1)
    assert abs(cmd.gripper - expected) == pytest.approx(0.1 * (0.1 - 0.06))


@pytest.mark.parametrize("previous", [None, 0.0, 0.8])
def test_start_episode_without_gripper_keeps_the_last_command(previous: float | None) -> None:
    f = make_filter(max_gripper_rate_per_s=1.0)
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, previous, 0.0)
    f.stop_episode("next instruction")
    assert f.start_episode([0.5, 0.1, 0.3], IDENTITY, None, 1.0)
    assert f.gripper_command == previous and f.tick(1.03).gripper == previous
    if previous is not None:
        # a ramp in progress is not continued by the next episode either: the target is the command
        act(f, ArmAction([0, 0, 0], [0, 0, 0], 1.0 - previous), 1.05)
        g = f.tick(1.1).gripper
        assert g is not None and g != previous
        assert f.start_episode([0.5, 0.1, 0.3], IDENTITY, None, 1.2)
        assert f.tick(1.23).gripper == g and f.tick(1.26).gripper == g


@pytest.mark.parametrize("start", [None, 0.0])
@pytest.mark.parametrize("hold", ["watchdog", "estop", "fault", "terminate", "stop", "hold", "nan", "limits"])
def test_holds_never_change_the_gripper_command(start: float | None, hold: str) -> None:
    f = make_filter(watchdog_timeout_s=0.5)
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, start, 0.0)
    if start is not None:
        act(f, ArmAction([0, 0, 0], [0, 0, 0], 1.0), 0.0)  # mid-ramp toward closed
    g = f.tick(0.1).gripper
    assert (g is None) == (start is None) and g != 1.0
    now = 0.1
    if hold == "watchdog":
        now = 0.6
    elif hold == "estop":
        f.estop("button")
    elif hold == "fault":
        f.fault("backend timeout")
    elif hold == "terminate":
        act(f, ArmAction([0, 0, 0], [0, 0, 0], 0.0, terminate=True), now)
    elif hold == "stop":
        f.stop_episode("operator")
    elif hold == "hold":
        f.hold("new instruction")
    elif hold == "nan":
        act(f, ArmAction([np.nan, 0, 0], [0, 0, 0], 0.0), now)
    else:
        f.update_config(SafetyConfig.from_params({"safety.workspace_max": [0.7, 0.35, 0.55]}))
    for i in range(1, 30):
        cmd = f.tick(now + i / 30)
        assert cmd.state != SafetyState.RUNNING and cmd.gripper == g


def test_start_refused_for_a_non_finite_gripper() -> None:
    f = make_filter()
    assert not f.start_episode([0.5, 0.0, 0.3], IDENTITY, float("nan"), 0.0)
    assert f.last_reasons == ("rejected:start_non_finite",) and f.gripper_command is None


# -- state machine: terminate, e-stop, faults, bad input -------------------------------------------------------
def moving_filter(**overrides: object) -> tuple[SafetyFilter, float, Arm]:
    f = make_filter(**overrides)
    assert f.start_episode([0.3, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    arm, now = Arm(f, [0.3, 0.0, 0.3]), 0.0
    for i in range(12):  # ticks at 30 Hz, an action on every third (10 Hz)
        now = (i + 1) / 30
        if i % 3 == 0:
            assert act(f, ArmAction([0.05, 0.0, 0.0], [0, 0, 0.2], 1.0), now).accepted
        cmd = arm.tick(now)
    assert norm(cmd.linear_velocity) > 0.1  # really moving fast
    return f, now, arm  # the last action 67 ms before now, the last (fresh) pose at now


def test_estop_wins_over_everything() -> None:
    f, now, _ = moving_filter()
    f.estop("button")
    f.estop("button again")
    assert f.counters["estops"] == 1
    assert is_zero(f.tick(now + 0.01))  # immediately, no deceleration ramp
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now).reasons == ("ignored:estopped",)
    assert not f.start_episode([0.4, 0.0, 0.3], IDENTITY, 0.0, now)
    f.fault("backend")
    assert not f.clear_fault()
    assert f.state == SafetyState.ESTOPPED and is_zero(f.tick(now + 0.05))
    assert f.reset_estop() and not f.reset_estop()
    assert f.state == SafetyState.IDLE and is_zero(f.tick(now + 0.1))
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now + 0.1).reasons == ("ignored:idle",)
    assert is_zero(f.tick(now + 0.15))
    assert f.start_episode([0.4, 0.0, 0.3], IDENTITY, 0.0, now + 0.2)
    act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now + 0.2)
    assert f.tick(now + 0.25).moving


def test_terminate_holds_until_new_episode() -> None:
    f, now, _ = moving_filter()
    verdict = act(f, ArmAction([np.nan, 0, 0], [0, 0, 0], 0.0, terminate=True), now)
    assert verdict.accepted and verdict.reasons == ("terminate",)
    for i in range(1, 40):
        assert is_zero(f.tick(now + i / 30))
        assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now + i / 30).reasons == ("ignored:terminated",)
    assert f.state == SafetyState.TERMINATED and f.counters["terminations"] == 1
    assert f.start_episode([0.4, 0.0, 0.3], IDENTITY, 0.0, now + 2.0)
    assert act(f, ArmAction([0.05, 0, 0], [0, 0, 0], 0.0), now + 2.0).accepted
    assert f.tick(now + 2.05).moving


@pytest.mark.parametrize("field", ["translation", "rotation", "gripper"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_holds_and_is_counted(field: str, bad: float) -> None:
    f, now, _ = moving_filter()
    parts = {"translation": [0.01, 0.0, 0.0], "rotation": [0.0, 0.0, 0.0], "gripper": 0.5}
    parts[field] = bad if field == "gripper" else [0.0, bad, 0.0]
    verdict = act(f, ArmAction(**parts), now)
    assert not verdict.accepted and verdict.reasons == ("rejected:non_finite",)
    assert f.counters["actions_rejected"] == 1
    assert f.state == SafetyState.HOLDING and is_zero(f.tick(now + 0.01))
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.5), now + 0.02).accepted
    assert f.state == SafetyState.RUNNING


def test_out_of_order_action_is_rejected_but_a_chunk_from_one_observation_is_not() -> None:
    f = make_filter()
    assert f.start_episode([0.4, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    arm = Arm(f, [0.4, 0.0, 0.3])
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0, observation_seq=5), 0.1).accepted
    arm.tick(0.15)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0, observation_seq=5), 0.2).accepted
    arm.tick(0.25)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0, observation_seq=4), 0.3).reasons == (
        "rejected:out_of_order",)
    arm.tick(0.35)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0, observation_seq=-1), 0.4).accepted  # unknown seq


def test_transient_fault_clears_with_next_valid_action() -> None:
    f, now, _ = moving_filter()
    f.fault("backend timeout")
    assert f.state == SafetyState.FAULT and is_zero(f.tick(now + 0.01))
    assert f.counters["faults"] == 1
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now + 0.02).accepted
    assert f.state == SafetyState.RUNNING and f.tick(now + 0.05).moving


def test_latched_fault_ignores_actions_until_cleared() -> None:
    f, now, _ = moving_filter()
    f.fault("controller error", latch=True)
    f.fault("controller error again")  # a later non-latching call cannot unlatch it
    assert f.counters["faults"] == 1
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now).reasons == ("ignored:fault",)
    assert is_zero(f.tick(now + 0.01))
    assert f.clear_fault() and f.state == SafetyState.HOLDING
    assert is_zero(f.tick(now + 0.02))
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now + 0.03).accepted
    assert f.tick(now + 0.05).moving


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"measured_position": [np.nan, 0.0, 0.3]}, "rejected:measured_position"),
    ({"measured_position": [0.4, 0.0]}, "rejected:measured_position"),
    ({"measured_orientation": [0.0, 0.0, 0.0, 0.0]}, "rejected:measured_orientation"),
    ({"measured_orientation": [1.0, np.inf, 0.0, 0.0]}, "rejected:measured_orientation"),
])
def test_bad_measurement_gives_a_hold_tick(kwargs: dict, reason: str) -> None:
    f, now, _ = moving_filter()
    cmd = f.tick(now + 0.03, **kwargs)
    assert is_zero(cmd) and cmd.reasons == (reason,)
    assert f.state == SafetyState.RUNNING  # transient: the next good tick continues


def test_clock_going_backwards_holds() -> None:
    f, now, _ = moving_filter()
    cmd = f.tick(now - 0.5)
    assert is_zero(cmd) and cmd.reasons == ("rejected:time_went_backwards",)
    assert is_zero(f.tick(float("nan")))


@pytest.mark.parametrize("now", [float("nan"), float("inf"), None, "soon"])
def test_action_with_a_bad_time_is_rejected(now: object) -> None:
    f, _, _ = moving_filter()
    verdict = act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), now)  # type: ignore[arg-type]
    assert verdict.reasons == ("rejected:non_finite_time",) and f.state == SafetyState.HOLDING


def test_stop_episode_holds() -> None:
    f, now, _ = moving_filter()
    f.stop_episode("operator")
    assert f.state == SafetyState.IDLE and is_zero(f.tick(now + 0.01))
    assert f.hold_reason == "stopped: operator"


# -- control quality ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hz", [30.0, 50.0])
def test_ramps_up_within_accel_and_converges_to_target(hz: float) -> None:
    # six steps at once and one target for 5 s: neither the burst limit nor the age bound is the subject
    f = make_filter(command_rate_hz=hz, watchdog_timeout_s=10.0, max_action_age_s=10.0, min_action_interval_s=0.0)
    cfg = f.config
    assert f.start_episode([0.3, -0.2, 0.1], IDENTITY, 0.0, 0.0)
    for _ in range(6):
        act(f, ArmAction([0.02, 0.02, 0.02], [0.0, 0.0, 0.25], 0.0), 0.0)
    p, q = np.array([0.3, -0.2, 0.1]), np.array(IDENTITY)
    v, w = np.zeros(3), np.zeros(3)
    dt = 1.0 / hz
    for i in range(1, int(5 * hz)):
        p, q = p + v * dt, rotate(q, w * dt)
        cmd = f.tick(i * dt, p, q)
        assert norm(cmd.linear_velocity - v) <= cfg.max_linear_accel_m_s2 * dt + EPS
        assert norm(cmd.angular_velocity - w) <= cfg.max_angular_accel_rad_s2 * dt + EPS
        v, w = cmd.linear_velocity, cmd.angular_velocity
    assert norm(p - f.target_position) <= cfg.goal_tolerance_m + 1e-4
    assert rotation_angle(q, f.target_orientation) <= cfg.goal_tolerance_rad + 1e-4
    np.testing.assert_allclose(f.target_position, [0.42, -0.08, 0.22])
    assert rotation_angle(np.array(IDENTITY), f.target_orientation) == pytest.approx(1.5)
    assert not cmd.moving


def test_docs_parameter_table_is_current() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "safety.md").read_text()
    assert markdown_table(SAFETY_PARAMS) in doc, "regenerate the table in docs/safety.md"


def test_hold_pauses_a_running_episode_and_the_next_action_resumes():
    from rt2_ros.actions import ArmAction
    from rt2_ros.safety import SafetyConfig, SafetyFilter, SafetyState

    f = SafetyFilter(SafetyConfig.from_params({}))
    assert f.start_episode([0.5, 0.0, 0.3], [0.0, 1.0, 0.0, 0.0], 0.0, now=0.0)
    act(f, ArmAction([0.03, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0, observation_seq=1), now=0.0)
    assert np.any(f.tick(0.05).linear_velocity != 0.0)
    f.hold("new instruction")
    assert f.state == SafetyState.HOLDING
    assert np.all(f.tick(0.1).linear_velocity == 0.0)
    act(f, ArmAction([0.02, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0, observation_seq=2), now=0.15)
    assert f.state == SafetyState.RUNNING
    f.estop("test")
    f.hold("ignored while e-stopped")
    assert f.state == SafetyState.ESTOPPED


# -- live limits ----------------------------------------------------------------------------------------------------
def changed(f: SafetyFilter, **overrides: object) -> SafetyConfig:
    """``f``'s config with some keys changed (as the node builds it from `ros2 param set`)."""
    values = f.config.to_params()
    values.update({f"safety.{k}": v for k, v in overrides.items()})
    return SafetyConfig.from_params(values)


@pytest.mark.parametrize(("speed", "angular"), [(0.05, 0.1), (0.01, 1.0), (0.0, 0.0), (0.2, 0.05)])
def test_lowered_speed_limit_takes_effect_on_the_next_tick(speed: float, angular: float) -> None:
    f, now, arm = moving_filter()
    assert norm(arm.tick(now + 1 / 30).linear_velocity) > speed
    new = changed(f, max_linear_speed_m_s=speed, max_angular_speed_rad_s=angular)
    assert f.check_config(new) == ""
    f.update_config(new)
    assert f.config == new and f.state == SafetyState.RUNNING  # not a geometry change: no hold
    for i in range(2, 30):
        if i % 3 == 0:  # the policy keeps the target fresh
            assert act(f, ArmAction.hold(), now + i / 30).accepted
        cmd = arm.tick(now + i / 30)
        assert cmd.state == SafetyState.RUNNING
        assert norm(cmd.linear_velocity) <= speed + EPS and norm(cmd.angular_velocity) <= angular + EPS


def test_shrunken_workspace_containing_the_arm_is_accepted_and_clips_the_next_target() -> None:
    f = make_filter(watchdog_timeout_s=10.0, max_action_age_s=5.0)
    p = np.array([0.45, 0.0, 0.3])
    assert f.start_episode(p, IDENTITY, 0.0, 0.0)
    v, now = np.zeros(3), 0.0
    for i in range(1, 10):  # moving in +x toward a target at 0.465 (a 10 Hz policy)
        now = i / 30
        if i % 3 == 1:
            assert act(f, ArmAction([0.005, 0.0, 0.0], [0, 0, 0], 0.0), now).accepted
        p = p + v / 30
        v = f.tick(now, p, IDENTITY).linear_velocity
    assert v[0] > 0.0 and p[0] < 0.5
    new = changed(f, workspace_max=[0.5, 0.35, 0.55])
    assert f.check_config(new) == ""
    f.update_config(new)
    # the old target is dropped: hold at the arm's pose, resume from there under the new limits
    assert f.state == SafetyState.HOLDING and f.hold_reason == "hold: limits changed"
    assert f.last_reasons == ("hold:limits_changed",)
    np.testing.assert_allclose(f.target_position, p)
    assert is_zero(f.tick(now + 1 / 30, p, IDENTITY))
    verdict = act(f, ArmAction([0.05, 0.0, 0.0], [0, 0, 0], 0.0), now + 0.05)
    assert verdict.accepted and "clipped:workspace_x_max" in verdict.reasons
    assert f.state == SafetyState.RUNNING and f.target_position[0] == pytest.approx(0.5)
    v = np.zeros(3)
    for i in range(2, 60):
        p = p + v / 30
        cmd = f.tick(now + i / 30, p, IDENTITY)
        v = cmd.linear_velocity
        assert p[0] <= 0.5 + EPS and p[0] + v[0] * new.lookahead_s <= 0.5 + EPS
    assert p[0] == pytest.approx(0.5, abs=new.goal_tolerance_m + 1e-4)


ARM_AT = [0.7, 0.0, 0.3]
EXCLUDE_ARM = [
    ({"workspace_max": [0.6, 0.35, 0.55]}, "safety.workspace_max",
     "the arm's position (0.70, 0.00, 0.30) m would be outside the new workspace"),
    ({"workspace_max": [0.6, 0.35, 0.55], "boundary_tolerance_m": 0.05, "max_outside_workspace_m": 0.05},
     "safety.workspace_max",
     "the arm's position (0.70, 0.00, 0.30) m would be outside the new workspace"),
    ({"workspace_min": [0.25, 0.05, 0.02]}, "safety.workspace_min", "the arm's position (0.70, 0.00, 0.30) m"),
    ({"keep_out_boxes": [0.65, -0.05, 0.25, 0.75, 0.05, 0.35]}, "safety.keep_out_boxes",
     "the arm's position (0.70, 0.00, 0.30) m would be inside new keep-out box 0"),
]
# the arm still fits, but the target it is heading for (x = 0.74) does not
EXCLUDE_TARGET = [
    ({"workspace_max": [0.705, 0.35, 0.55]}, "safety.workspace_max", "the commanded target (0.74, 0.00, 0.30) m"),
    ({"keep_out_boxes": [0.30, -0.3, 0.0, 0.35, 0.3, 0.1, 0.72, -0.05, 0.25, 0.8, 0.05, 0.35]},
     "safety.keep_out_boxes", "the commanded target (0.74, 0.00, 0.30) m would be inside new keep-out box 1"),
]


def heading_right() -> SafetyFilter:
    """An arm measured at ARM_AT with its target 4 cm further in +x."""
    f = make_filter(watchdog_timeout_s=10.0)
    assert f.start_episode(ARM_AT, IDENTITY, 0.0, 0.0)
    act(f, ArmAction([0.04, 0.0, 0.0], [0, 0, 0], 0.0), 0.0)
    f.tick(1 / 30, ARM_AT, IDENTITY)
    return f


@pytest.mark.parametrize(("overrides", "key", "what"), EXCLUDE_ARM + EXCLUDE_TARGET)
@pytest.mark.parametrize("state", ["running", "holding"])
def test_limits_that_would_exclude_the_arm_or_its_target_are_refused(overrides: dict, key: str, what: str,
                                                                      state: str) -> None:
    f = heading_right()
    if state == "holding":
        f.fault("backend timeout")  # an episode under a fault is still active
        if "target" in what:  # a hold froze the target at the arm, which fits: accepted
            assert f.check_config(changed(f, **overrides)) == ""
            return
    before = (f.config, f.state, f.target_position)
    new = changed(f, **overrides)
    why = f.check_config(new)
    assert why.startswith(f"{key}: ") and what in why and "\n" not in why, why
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        f.update_config(new)
    assert (f.config, f.state) == before[:2]  # nothing changed
    np.testing.assert_array_equal(f.target_position, before[2])
    # the same limits are fine without an active episode; start_episode then refuses the pose instead
    f.stop_episode("operator")
    assert f.check_config(new) == ""
    f.update_config(new)
    assert f.config == new and safe(new, f.target_position)


@pytest.mark.parametrize("overrides", [
    {"max_step_translation_m": 0.001}, {"max_linear_accel_m_s2": 0.1}, {"position_gain_per_s": 0.5},
    {"goal_tolerance_m": 0.01}, {"boundary_tolerance_m": 0.0}, {"command_rate_hz": 50.0}, {"lookahead_s": 0.5},
    {"max_gripper_rate_per_s": 0.0},
    # the geometry may change as long as it keeps the arm and its target
    {"workspace_min": [0.0, -1.0, 0.0], "workspace_max": [1.0, 1.0, 1.0]},
])
def test_other_limits_are_always_accepted_mid_episode(overrides: dict) -> None:
    f, _, _ = moving_filter()
    new = changed(f, **overrides)
    assert f.check_config(new) == ""
    f.update_config(new)
    assert f.config == new
    if "workspace_min" in overrides:
        assert f.state == SafetyState.HOLDING and f.hold_reason == "hold: limits changed"
    else:
        assert f.state == SafetyState.RUNNING and f.last_reasons == ("config_updated",)


def test_new_step_limit_applies_to_the_next_action() -> None:
    f = make_filter()
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    f.update_config(changed(f, max_step_translation_m=0.01, max_step_rotation_rad=0.05))
    before_p, before_q = f.target_position, f.target_orientation
    verdict = act(f, ArmAction([0.05, 0.0, 0.0], [0.0, 0.0, 0.2], 0.0), 0.1)
    assert set(verdict.reasons) == {"clipped:step_translation", "clipped:step_rotation"}
    assert norm(f.target_position - before_p) == pytest.approx(0.01)
    assert rotation_angle(before_q, f.target_orientation) == pytest.approx(0.05)


@pytest.mark.parametrize(("old", "new", "hold_at"), [(2.0, 0.3, 0.45), (2.0, 0.6, 0.6), (0.5, 2.0, 2.0),
                                                     (1.0, 0.08, 0.45)])
def test_watchdog_timeout_change_takes_effect(old: float, new: float, hold_at: float) -> None:
    """Changed at t = 0.4 s; the last action was at t = 0: the new timeout counts from that action,
    on the very next tick (every 50 ms)."""
    f = make_filter(watchdog_timeout_s=old, command_rate_hz=20.0, max_action_age_s=10.0)
    assert f.start_episode([0.5, 0.0, 0.3], IDENTITY, 0.0, 0.0)
    assert act(f, ArmAction([0.01, 0, 0], [0, 0, 0], 0.0), 0.0).accepted
    arm = Arm(f, [0.5, 0.0, 0.3])
    assert arm.tick(0.4).state == SafetyState.RUNNING
    f.update_config(changed(f, watchdog_timeout_s=new))
    for i in range(9, 60):
        cmd = arm.tick(i * 0.05)
        if i * 0.05 < hold_at - 1e-9:
            assert cmd.state == SafetyState.RUNNING, i
        else:
            assert cmd.reasons == ("hold:watchdog",), i
            break
    assert f.counters["watchdog_trips"] == 1


def test_check_config_rejects_a_non_config() -> None:
    f = make_filter()
    assert f.check_config({"safety.max_linear_speed_m_s": 0.1}) != ""  # type: ignore[arg-type]


point_strategy = st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))


@settings(max_examples=250, derandomize=True, deadline=None)
@given(start=point_strategy, drive=st.tuples(st.floats(-0.05, 0.05), st.floats(-0.05, 0.05), st.floats(-0.05, 0.05)),
       shrink_lo=point_strategy, shrink_hi=point_strategy, box_at=st.one_of(st.none(), point_strategy),
       box_size=st.floats(0.01, 0.15),
       # (denormal limits like 1e-308 m/s only make numpy warn about overflowing slab divisions)
       speed=st.one_of(st.just(0.0), st.floats(1e-3, 0.5)), angular=st.one_of(st.just(0.0), st.floats(1e-3, 2.0)),
       more=st.lists(st.tuples(st.floats(-0.05, 0.05), st.floats(-0.05, 0.05), st.floats(-0.05, 0.05)),
                     min_size=1, max_size=5))
def test_live_limit_changes_keep_every_limit(start: tuple[float, float, float], drive: tuple[float, float, float],
                                             shrink_lo: tuple[float, float, float],
                                             shrink_hi: tuple[float, float, float],
                                             box_at: tuple[float, float, float] | None, box_size: float,
                                             speed: float, angular: float,
                                             more: list[tuple[float, float, float]]) -> None:
    """Random new limits mid-motion: accepted exactly when the arm and target still fit, and then every
    tick obeys the *new* limits (the arm starts at most boundary_tolerance_m outside them)."""
    f = make_filter(keep_out_boxes=BOX_A, watchdog_timeout_s=10.0)
    cfg = f.config
    lo, hi = np.array(cfg.workspace_min), np.array(cfg.workspace_max)
    p = lo + np.array(start) * (hi - lo)
    if in_keep_out(cfg, p, eps=-1e-3):
        return
    q = np.array(IDENTITY)
    assert f.start_episode(p, q, 0.5, 0.0)
    v, w, now = np.zeros(3), np.zeros(3), 0.0
    for _ in range(6):  # get moving (also turning) toward a target a few steps away
        act(f, ArmAction(drive, [0.0, 0.1, 0.0], 0.5), now)
        now += 1 / 30
        p, q = p + v / 30, rotate(q, w / 30)
        cmd = f.tick(now, p, q)
        v, w = cmd.linear_velocity, cmd.angular_velocity
    # new workspace: each side moved in by up to 60 % of the half-span, or out by up to 20 %
    new_lo = lo + (np.array(shrink_lo) * 0.8 - 0.2) * 0.5 * (hi - lo)
    new_hi = hi - (np.array(shrink_hi) * 0.8 - 0.2) * 0.5 * (hi - lo)
    boxes: list[float] = []
    if box_at is not None:
        centre = lo + np.array(box_at) * (hi - lo)
        boxes = [*(centre - box_size), *(centre + box_size)]
    try:
        new = changed(f, workspace_min=new_lo.tolist(), workspace_max=new_hi.tolist(), keep_out_boxes=boxes,
                      max_linear_speed_m_s=speed, max_angular_speed_rad_s=angular)
    except ConfigError:  # the box covers the whole new workspace: SafetyConfig refuses it (tested above)
        return
    tol = new.boundary_tolerance_m
    points = (p, f.target_position)
    definitely_bad = any(not in_workspace(new, x, eps=tol + 1e-9) or in_keep_out(new, x, eps=tol + 1e-9)
                         for x in points)
    definitely_ok = all(in_workspace(new, x, eps=tol - 1e-9) and not in_keep_out(new, x, eps=-1e-3) for x in points)
    why = f.check_config(new)
    if definitely_bad:
        assert why.split(":")[0] in ("safety.workspace_min", "safety.workspace_max", "safety.keep_out_boxes"), why
    if definitely_ok:
        assert why == ""
    if why:
        with pytest.raises(ConfigError):
            f.update_config(new)
        assert f.config == cfg
        return
    f.update_config(new)
    assert f.state == SafetyState.HOLDING and safe(new, f.target_position)
    for step in more:
        before = f.target_position
        assert act(f, ArmAction(step, [0.0, 0.0, 0.1], 0.5), now).accepted
        assert norm(f.target_position - before) <= new.max_step_translation_m + EPS
        assert safe(new, f.target_position)
        for _ in range(5):
            now += 1 / 30
            p, q = p + v / 30, rotate(q, w / 30)
            cmd = f.tick(now, p, q)
            v, w = cmd.linear_velocity, cmd.angular_velocity
            assert norm(v) <= speed + EPS and norm(w) <= angular + EPS
            assert safe(new, cmd.target_position)
            ahead = p + v * new.lookahead_s  # never further than the tolerance outside the new limits
            assert in_workspace(new, ahead, eps=tol + EPS) and not in_keep_out(new, ahead, eps=tol + EPS), (p, v)
