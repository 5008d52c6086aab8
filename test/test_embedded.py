"""Tests for the embedded reference policy (rt2_ros.backends.embedded), incl. a closed loop without ROS:
sim render -> EmbeddedBackend -> RT-2 number text -> tokenizer -> SafetyFilter -> twist -> sim."""

from __future__ import annotations

from collections import deque

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.actions import Observation
from rt2_ros.backends import BackendConfigError, BackendError, BackendTimeout, create_backend
from rt2_ros.backends.embedded import (
    EMBEDDED_OPTIONS,
    EmbeddedBackend,
    InstructionNotUnderstood,
    Phase,
    find_blob,
    parse_instruction,
)
from rt2_ros.safety import SafetyConfig, SafetyFilter
from rt2_ros.sim.tabletop import TabletopSim
from rt2_ros.tokens import ActionTokenizer

SERVO_DT = 1.0 / 30.0
POLICY_DT = 0.2  # 5 Hz, OpenVLA-like
MAX_STEPS = 150  # a full pick-and-place takes ~70-90 steps
HSV = {s.name.rsplit("_", 1)[-1]: s.default for s in EMBEDDED_OPTIONS if "hsv_" in s.name}


@pytest.fixture(scope="module")
def tokenizer():
    return ActionTokenizer.from_profile("rt2")


@pytest.fixture(scope="module")
def sim():
    s = TabletopSim({"sim.collision_visuals": True})
    yield s
    s.close()


@pytest.fixture()
def backend(tokenizer):
    b = create_backend("embedded", {}, tokenizer)
    yield b
    b.close()


def _observe(sim: TabletopSim, instruction: str, seq: int, image: np.ndarray | None = None) -> Observation:
    pos, quat = sim.ee_pose()
    return Observation(sim.render() if image is None else image, instruction, seq, sim.time_s, ee_position=pos,
                       ee_orientation=quat, gripper=sim.gripper_closedness())


def run_episode(sim: TabletopSim, backend: EmbeddedBackend, tokenizer: ActionTokenizer, instruction: str,
                max_steps: int = MAX_STEPS) -> list[str]:
    """Closed loop at 5 Hz policy / 30 Hz servo; returns the reply texts (last one terminates or max_steps)."""
    safety = SafetyFilter(SafetyConfig.from_params({}))
    pos, quat = sim.ee_pose()
    assert safety.start_episode(pos, quat, sim.gripper_closedness(), sim.time_s, pose_time=sim.time_s)
    texts = []
    for seq in range(max_steps):
        frame_time = sim.time_s  # the frame is rendered now; the action answers it
        reply = backend.infer(_observe(sim, instruction, seq), timeout_s=1.0)
        texts.append(reply.text)
        (action,) = tokenizer.decode_reply(reply)
        safety.on_action(action, sim.time_s, observation_time=frame_time)
        if action.terminate:
            break
        for _ in range(round(POLICY_DT / SERVO_DT)):
            pos, quat = sim.ee_pose()
            cmd = safety.tick(sim.time_s, pos, quat, pose_time=sim.time_s)
            sim.apply_twist(cmd.linear_velocity, cmd.angular_velocity, 0.0, SERVO_DT)
            sim.set_gripper(cmd.gripper)
            sim.step(SERVO_DT)
    return texts


# ---------------------------------------------------------------------------------------- closed loop
@pytest.mark.parametrize(("instruction", "cube", "seed"), [
    ("pick up the red cube and put it in the tray", "red_cube", 0),
    ("put the blue block into the bowl", "blue_cube", 3),
])
def test_closed_loop_pick_and_place_succeeds(sim, backend, tokenizer, instruction, cube, seed):
    sim.reset(seed)
    backend.reset()
    texts = run_episode(sim, backend, tokenizer, instruction)
    final = tokenizer.parse_text(texts[-1])
    assert tokenizer.decode(final.bins).terminate, f"no terminate within {MAX_STEPS} steps: {texts[-1]}"
    assert sim.is_in_tray(cube), f"{cube} at {sim.object_positions()[cube]}, tray at {sim.object_positions()['tray']}"
    others = [n for n in sim.object_positions() if n not in (cube, "tray")]
    assert not any(sim.is_in_tray(n) for n in others)
    plans = [tokenizer.parse_text(t).plan for t in texts]
    # chain of thought walks through the phases in order
    for first, later in [("move above", "grasp"), ("grasp", "carry"), ("carry", "release"), ("release", "retreat")]:
        firsts = [i for i, p in enumerate(plans) if p.startswith(first)]
        laters = [i for i, p in enumerate(plans) if p.startswith(later)]
        assert firsts and laters and max(firsts) < min(laters), (first, later)


def test_closed_loop_pick_up_without_destination_lifts_and_terminates(sim, backend, tokenizer):
    sim.reset(5)
    texts = run_episode(sim, backend, tokenizer, "pick up the green cube")
    assert tokenizer.decode(tokenizer.parse_text(texts[-1]).bins).terminate
    lift = next(s.default for s in EMBEDDED_OPTIONS if s.name.endswith("lift_height_m"))
    assert sim.object_positions()["green_cube"][2] > lift - 0.05  # still held up there
    assert sim.gripper_closedness() < 0.9  # closed on the cube, not on air
    assert not any("tray" in tokenizer.parse_text(t).plan for t in texts)


# ---------------------------------------------------------------------------------------- bad instructions / inputs
@pytest.mark.parametrize(("instruction", "phrase"), [
    ("pick up the purple dog", "purple dog"),
    ("grab the red ball", "red ball"),
    ("put the red cube on the plate", "plate"),
    ("put the red cube on the blue cube", "blue cube"),
    ("dance", "dance"),
])
def test_unknown_object_terminates_immediately_with_a_note(sim, backend, tokenizer, instruction, phrase):
    sim.reset(0)
    reply = backend.infer(_observe(sim, instruction, 0), 1.0)
    parsed = tokenizer.parse_text(reply.text)
    assert tokenizer.decode(parsed.bins).terminate
    assert phrase in parsed.plan and ("cannot" in parsed.plan)
    action = tokenizer.decode(parsed.bins)
    assert np.allclose(action.translation, 0.0, atol=1e-3)
    assert backend.phase is Phase.DONE


def test_unknown_object_without_terminate_token_holds(sim):
    tok = ActionTokenizer.from_profile("openvla")
    b = create_backend("embedded", {}, tok)
    sim.reset(0)
    reply = b.infer(_observe(sim, "pick up the purple dog", 0), 1.0)
    action = tok.decode(tok.parse_text(reply.text).bins)
    assert not action.terminate and np.allclose(action.translation, 0.0, atol=2e-3)
    assert "purple dog" in tok.parse_text(reply.text).plan


def test_missing_ee_position_raises_backend_error(sim, backend):
    sim.reset(0)
    obs = Observation(sim.render(), "pick up the red cube", 0, 0.0)
    with pytest.raises(BackendError, match="ee_position"):
        backend.infer(obs, 1.0)


@pytest.mark.parametrize("bad", [np.array([0.4, np.nan, 0.3]), np.array([0.4, 0.1]), np.array([np.inf, 0, 0])])
def test_malformed_ee_position_raises_backend_error(sim, backend, bad):
    obs = Observation(sim.render(), "pick up the red cube", 0, 0.0, ee_position=bad)
    with pytest.raises(BackendError, match="ee_position"):
        backend.infer(obs, 1.0)


def test_invisible_object_holds_then_gives_up(tokenizer):
    max_lost = next(s.default for s in EMBEDDED_OPTIONS if s.name.endswith("max_lost_steps"))
    with TabletopSim({"sim.collision_visuals": True, "sim.objects": ["red_cube"]}) as s:
        b = create_backend("embedded", {}, tokenizer)
        image = s.render()
        actions = [tokenizer.decode_reply(b.infer(_observe(s, "put the yellow cube in the tray", i, image), 1.0))[0]
                   for i in range(max_lost)]
    assert all(np.allclose(a.translation, 0.0, atol=1e-3) and not a.terminate for a in actions[:-1])
    assert actions[-1].terminate


def test_timeout_is_enforced(sim, backend):
    with pytest.raises(BackendTimeout):
        backend.infer(_observe(sim, "pick up the red cube", 0), timeout_s=0.0)


@pytest.mark.parametrize(("options", "key"), [
    ({"camera_fx": -5.0}, "camera_fx"), ({"approach_heigth_m": 0.1}, "approach_heigth_m"),
    ({"hsv_red": [0, 10, 0]}, "hsv_red"),
])
@pytest.mark.parametrize("build", [lambda o, t: create_backend("embedded", o, t), EmbeddedBackend])
def test_bad_options_name_the_key(tokenizer, options, key, build):
    with pytest.raises(BackendConfigError, match=key):
        build(options, tokenizer)


# ---------------------------------------------------------------------------------------- phase machine (kinematic)
class KinematicArm:
    """A perfect arm: applies each decoded delta exactly (no physics), for fast phase-machine tests."""

    def __init__(self, position, gripper_reading):
        self.position = np.asarray(position, dtype=np.float64)
        self.gripper_reading = gripper_reading
        self.t = 0.0

    def observe(self, image, instruction, seq):
        return Observation(image, instruction, seq, self.t, ee_position=self.position.copy(),
                           ee_orientation=np.array([0.0, 1.0, 0.0, 0.0]), gripper=self.gripper_reading(self.t))

    def apply(self, action):
        self.position = self.position + action.translation
        self.t += POLICY_DT


def test_missed_grasps_are_retried_then_abandoned(sim, tokenizer):
    """A gripper that always reads fully closed (closed on air) -> re-approach, then give up."""
    retries = 1
    b = create_backend("embedded", {"max_grasp_retries": retries}, tokenizer)
    sim.reset(0)
    image = sim.render()
    arm = KinematicArm(sim.ee_pose()[0], lambda t: 1.0)
    plans = []
    for seq in range(300):
        reply = b.infer(arm.observe(image, "pick up the red cube", seq), 1.0)
        plans.append(tokenizer.parse_text(reply.text).plan)
        action = tokenizer.decode_reply(reply)[0]
        if action.terminate:
            break
        arm.apply(action)
    assert "failed to grasp" in plans[-1]
    starts = [i for i in range(1, len(plans)) if plans[i].startswith("grasp") and not plans[i - 1].startswith("grasp")]
    assert len(starts) == retries + 1


class LaggyArm(KinematicArm):
    """The downstream of the ROS loop in miniature: each decoded delta reaches the commanded target
    ``delay`` steps late (camera frame age, the execute queue) and the arm follows the target with a
    first-order lag (the safety node's P-control): ``position += alpha * (target - position)`` a step."""

    def __init__(self, position, gripper_reading, delay: int, alpha: float):
        super().__init__(position, gripper_reading)
        self.target = self.position.copy()
        self.alpha = alpha
        self.pipe: deque[np.ndarray] = deque(np.zeros(3) for _ in range(delay))
        self.targets = [self.target.copy()]

    def apply(self, action):
        self.pipe.append(np.asarray(action.translation, dtype=np.float64))
        self.target = self.target + self.pipe.popleft()
        self.position = self.position + self.alpha * (self.target - self.position)
        self.targets.append(self.target.copy())
        self.t += POLICY_DT

    def safety_hold(self):
        """What a safety hold does downstream: the target freezes at the current pose, deltas in the pipe are lost."""
        self.target = self.position.copy()
        self.pipe = deque(np.zeros(3) for _ in self.pipe)


def _option(name: str):
    return next(s.default for s in EMBEDDED_OPTIONS if s.name.endswith("." + name))


def _run_laggy(backend, tokenizer, image, arm, instruction="pick up the red cube", max_steps=250, hold_at=None):
    plans = []
    for seq in range(max_steps):
        if seq == hold_at:
            arm.safety_hold()
        reply = backend.infer(arm.observe(image, instruction, seq), 1.0)
        plans.append(tokenizer.parse_text(reply.text).plan)
        action = tokenizer.decode_reply(reply)[0]
        if action.terminate:
            break
        arm.apply(action)
    return plans


@settings(max_examples=12, deadline=None)
@given(delay=st.integers(0, 3), alpha=st.floats(0.15, 1.0))
def test_lagging_arm_reaches_every_goal_without_overshoot(sim, tokenizer, delay, alpha):
    """Deltas come from the commanded target, so a delayed, lagging arm never overshoots (the old
    measured-pose deltas made an integrator behind a delay: loops over the tray, a hand pushed into
    the table) and the episode still completes."""
    sim.reset(0)
    image = sim.render()
    b = create_backend("embedded", {}, tokenizer)
    arm = LaggyArm(sim.ee_pose()[0], lambda t: 0.5, delay, alpha)  # 0.5: closed on a cube
    plans = _run_laggy(b, tokenizer, image, arm)
    assert plans[-1].startswith("done with the red cube"), plans[-5:]
    targets = np.array(arm.targets)
    grasp, lift = _option("grasp_height_m"), _option("lift_height_m")
    quantum = 0.04 / 255  # one rt2 translation bin
    assert targets[:, 2].min() >= grasp - 2 * quantum  # never commanded below the grasp height
    assert targets[:, 2].max() <= max(targets[0, 2], lift + 2 * quantum)
    assert b.reanchors == 0  # lag alone is not mistaken for a reset target


def test_commanded_target_is_reanchored_after_a_safety_hold(sim, tokenizer):
    """A hold freezes the downstream target short of where the policy believes it is; once the arm
    has settled there, the policy re-anchors on the measured pose and finishes the task."""
    sim.reset(0)
    image = sim.render()
    b = create_backend("embedded", {}, tokenizer)
    arm = LaggyArm(sim.ee_pose()[0], lambda t: 0.5, delay=2, alpha=0.3)
    plans = _run_laggy(b, tokenizer, image, arm, hold_at=6)  # mid-approach, deltas in flight
    assert b.reanchors >= 1
    assert plans[-1].startswith("done with the red cube"), plans[-5:]
    assert np.array(arm.targets)[:, 2].min() >= _option("grasp_height_m") - 2 * 0.04 / 255


def test_holding_still_does_not_drift_with_quantisation(sim, tokenizer):
    """Zero motion encodes to bin 127, which decodes to -0.08 mm: answers are accounted as decoded,
    so a long hold (here the grasp wait) dithers around the goal instead of creeping away."""
    sim.reset(0)
    image = sim.render()
    b = create_backend("embedded", {"grasp_wait_s": 6.0}, tokenizer)
    arm = KinematicArm(sim.ee_pose()[0], lambda t: 0.5)
    positions = []
    for seq in range(200):
        reply = b.infer(arm.observe(image, "pick up the red cube", seq), 1.0)
        if b.phase is Phase.GRASP:
            positions.append(arm.position.copy())
        elif positions:
            break
        arm.apply(tokenizer.decode_reply(reply)[0])
    assert len(positions) >= 25
    drift = np.abs(np.array(positions) - positions[0]).max()
    assert drift <= 2 * 0.04 / 255


def test_reset_and_new_instruction_restart_the_episode(sim, backend, tokenizer):
    sim.reset(0)
    image = sim.render()
    arm = KinematicArm(sim.ee_pose()[0], lambda t: 0.5)
    for seq in range(40):
        arm.apply(tokenizer.decode_reply(backend.infer(arm.observe(image, "pick up the red cube", seq), 1.0))[0])
    assert backend.phase is not Phase.APPROACH
    backend.reset()
    assert backend.phase is Phase.APPROACH
    for seq in range(40, 80):
        arm.apply(tokenizer.decode_reply(backend.infer(arm.observe(image, "pick up the red cube", seq), 1.0))[0])
    assert backend.phase is not Phase.APPROACH
    backend.infer(arm.observe(image, "pick up the blue cube", 80), 1.0)
    assert backend.phase is Phase.APPROACH


def test_token_id_form_answers_with_ids(sim):
    tok = ActionTokenizer.from_profile("rt2", token_form="ids")
    b = create_backend("embedded", {}, tok)
    sim.reset(0)
    reply = b.infer(_observe(sim, "pick up the red cube", 0), 1.0)
    assert reply.text is None and reply.token_ids is not None
    (action,) = tok.decode_reply(reply)
    assert np.linalg.norm(action.translation) > 0.005  # moving toward the cube


# ---------------------------------------------------------------------------------------- perception
@pytest.mark.parametrize("color", ["red", "green", "blue", "yellow"])
@pytest.mark.parametrize("seed", [0, 4])
def test_cubes_are_localised_within_a_centimetre(sim, color, seed):
    sim.reset(seed)
    image = sim.render()
    blob = find_blob(image, HSV[color], 6)
    assert blob is not None
    height = next(s.default for s in EMBEDDED_OPTIONS if s.name.endswith("object_center_height_m"))
    xy = sim.camera.pixel_to_table_plane(blob[0], blob[1], height)[:2]
    assert np.linalg.norm(xy - sim.object_positions()[f"{color}_cube"][:2]) < 0.01


_BACKGROUND_RGB = (205, 180, 140)  # beige, like the sim table
_COLORS_RGB = {"red": (230, 10, 10), "green": (15, 190, 25), "blue": (15, 40, 240), "yellow": (240, 215, 15)}


@settings(max_examples=40, deadline=None)
@given(color=st.sampled_from(sorted(_COLORS_RGB)), x=st.integers(0, 150), y=st.integers(0, 100),
       w=st.integers(3, 30), h=st.integers(3, 30))
def test_find_blob_returns_the_rectangle_centre(color, x, y, w, h):
    img = np.full((140, 190, 3), _BACKGROUND_RGB, dtype=np.uint8)
    img[y:y + h, x:x + w] = _COLORS_RGB[color]
    blob = find_blob(img, HSV[color], 6)
    assert blob is not None
    assert blob[0] == pytest.approx(x + (w - 1) / 2, abs=1e-6) and blob[1] == pytest.approx(y + (h - 1) / 2, abs=1e-6)
    assert blob[2] == w * h
    others = [c for c in _COLORS_RGB if c != color]
    assert all(find_blob(img, HSV[c], 6) is None for c in others)


def test_find_blob_prefers_the_largest_blob_and_ignores_specks():
    img = np.full((100, 100, 3), _BACKGROUND_RGB, dtype=np.uint8)
    img[10:14, 10:14] = _COLORS_RGB["red"]  # 16 px
    img[50:60, 70:80] = _COLORS_RGB["red"]  # 100 px
    u, v, area = find_blob(img, HSV["red"], 6)
    assert (u, v, area) == (74.5, 54.5, 100)
    speck = np.full((50, 50, 3), _BACKGROUND_RGB, dtype=np.uint8)
    speck[5:7, 5:7] = _COLORS_RGB["red"]
    assert find_blob(speck, HSV["red"], 6) is None
    # hue wrap-around: a magenta-ish red (H ~ 175) is still red
    hue175 = cv2.cvtColor(np.array([[[175, 230, 200]]], dtype=np.uint8), cv2.COLOR_HSV2RGB)[0, 0]
    img2 = np.full((40, 40, 3), _BACKGROUND_RGB, dtype=np.uint8)
    img2[10:20, 10:20] = hue175
    assert find_blob(img2, HSV["red"], 6) is not None


# ---------------------------------------------------------------------------------------- instruction parsing
@pytest.mark.parametrize(("instruction", "color", "phrase", "place"), [
    ("pick up the red cube and put it in the tray", "red", "red cube", True),
    ("Put the BLUE block into the bowl.", "blue", "blue block", True),
    ("move the yellow cube to the tray", "yellow", "yellow cube", True),
    ("pick up the green cube", "green", "green cube", False),
    ("grab the red one", "red", "red cube", False),
    ("lift the red cube from the table", "red", "red cube", False),
    ("place green in the tray", "green", "green cube", True),
])
def test_parse_instruction(instruction, color, phrase, place):
    task = parse_instruction(instruction)
    assert (task.color, task.object_phrase, task.place_in_tray) == (color, phrase, place)


@pytest.mark.parametrize(("instruction", "phrase"), [
    ("pick up the purple dog", "purple dog"), ("grab a red ball", "red ball"),
    ("put the red cube on the plate", "plate"), ("open the drawer", "open the drawer"),
])
def test_parse_instruction_rejects_unknown_things(instruction, phrase):
    with pytest.raises(InstructionNotUnderstood) as info:
        parse_instruction(instruction)
    assert info.value.phrase == phrase


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_plan_text_always_parses(text):
    """Whatever the instruction (colons, newlines, 'Action:'), the answer stays valid RT-2 text."""
    tok = ActionTokenizer.from_profile("rt2")
    b = EmbeddedBackend({}, tok)
    image = np.full((64, 64, 3), _BACKGROUND_RGB, dtype=np.uint8)
    obs = Observation(image, text, 0, 0.0, ee_position=np.array([0.45, 0.0, 0.35]))
    reply = b.infer(obs, 1.0)
    tok.parse_text(reply.text)  # raises TokenError if the plan broke the format
