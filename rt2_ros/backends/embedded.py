"""The ``embedded`` backend: a hand-written reference policy that speaks RT-2 action tokens.

This is NOT a learned model and NOT a VLA. It is a small scripted pick-and-place controller
(colour segmentation + a pinhole camera model + a phase state machine) that answers every
observation with real RT-2 action tokens as number text, e.g.
``"Plan: grasp the red cube. Action: 0 128 127 121 127 127 127 0"``. It exists so the whole
robot-side pipeline (tokens -> detokenizer -> safety filter -> servo -> arm) can be run and
tested with no network, no GPU and no weights, and as a baseline that shows what "working"
looks like before a real model is plugged in.

How it works, per observation:

1. Parse the instruction (once per episode): a colour word (red, green, blue, yellow) with an
   optional shape word (cube, block) names the object; "tray" or "bowl" after a preposition
   names the destination; no destination means "pick it up and lift it".
2. Find the object (and the tray) in the image with HSV thresholds (OpenCV), take the largest
   blob's centroid and cast its pixel ray onto a horizontal plane at the object's centre height,
   using the configured camera model (``backend.embedded.camera_*``: intrinsics and the camera
   pose in the robot base frame - on a real robot, your calibration).
3. Run the phase machine approach -> descend -> grasp -> lift -> (move above tray -> lower ->
   release -> retreat) -> terminate. Phase goals are checked against the measured end-effector
   position (``Observation.ee_position``, required); a missed grasp (the gripper closes on nothing,
   or the object slips out while lifting) or a descent that stalls above the grasp height (a
   finger came down on something) re-opens, rises and re-approaches from a fresh image, up to
   ``max_grasp_retries`` times; the per-step delta is computed from the
   *commanded* target the policy has built up (see below), clipped to the tokenizer's range.
4. Encode with the configured tokenizer (``tokenizer.encode`` then ``format_text``), so the
   answer goes through exactly the same parsing and detokenization as a real model's.

Why deltas come from the commanded target, not the measured pose: downstream, each delta is
added to a commanded target (safety filter) that the arm tracks with a lag (P-control, speed
and acceleration limits), and each answer reaches the arm one or two steps after its camera
frame (frame age, the execute queue). A delta ``gain * (goal - measured)`` therefore asks
again for motion that is already commanded but not yet executed: an integrator behind a
delay, which overshoots and loops (measured on the ROS demo: 6 cm median target/pose gap,
spirals over the tray, dropped cubes). So the policy keeps its own copy of the commanded
target: it starts at the measured pose, adds every delta *as the tokenizer decodes it* (so
quantisation never accumulates), and steps toward the goal from there; the arm's lag then
only delays arrival, it cannot cause overshoot. If the downstream target was reset behind the
policy's back (a safety hold freezes it at the current pose, a late reply is dropped, a
workspace wall clips it), the arm stops short while the policy's copy says "there": after
``settle_time_s`` without motion the copy is re-anchored on the measured pose.
Rejected: a lower gain on measured-pose deltas (slow, and still oscillates once the latency
grows); predicting the arm's lag from a model of the controller (its gains, speed limits and
the queue timing are not the policy's to know).

Limits (by design; see docs/sim.md): top-down grasps only, no yaw alignment, one object per
colour, objects must be visible to the camera before the descent, colour thresholds need
tuning for real lighting, no obstacle avoidance beyond rising before moving sideways.

Rejected: shipping a tiny learned model as the default (weights to download, CPU inference
too slow for a test loop, and its failures would hide pipeline bugs); reading simulator
ground truth (the policy must work from the same image a real model sees, so that a real
camera setup can use it unchanged).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import transforms3d.quaternions as tq

from rt2_ros.actions import ArmAction, BackendReply, Observation
from rt2_ros.backends.base import Backend, BackendConfigError, BackendError, BackendTimeout, resolve_options
from rt2_ros.params import ParamSpec
from rt2_ros.sim.camera import CameraError, PinholeCamera, camera_param_specs

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

_P = "backend.embedded."

#: object colour words the parser knows; each has an HSV range option ``backend.embedded.hsv_<colour>``
OBJECT_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPE_WORDS = frozenset({"cube", "cubes", "block", "blocks", "one"})
DESTINATION_WORDS = frozenset({"tray", "bowl"})
DESTINATION_PREPOSITIONS = frozenset({"in", "into", "inside", "on", "onto", "to", "toward", "towards"})
FILLER_WORDS = frozenset({"the", "a", "an", "it", "that", "this", "of", "please"})
VERBS = ("pick up", "pick", "grab", "grasp", "take", "lift", "put", "place", "move", "bring", "get", "drop", "set")

_HSV_DOC = ("HSV range (OpenCV scale: H 0-179, S and V 0-255) as h_low, h_high, s_low, s_high, v_low, v_high; "
            "h_low > h_high wraps around (red)")

EMBEDDED_OPTIONS: tuple[ParamSpec, ...] = (
    *camera_param_specs(_P + "camera_", "embedded policy camera (enter your calibration)"),
    ParamSpec(_P + "table_height_m", "double", 0.0, "table surface height in the robot base frame", "m", -2.0, 2.0),
    ParamSpec(_P + "object_center_height_m", "double", 0.02,
              "height of an object's visual centre above the table (cube centre; pixel rays meet this plane)",
              "m", 0.0, 0.5),
    ParamSpec(_P + "tray_plane_height_m", "double", 0.04,
              "height above the table where the tray's pixel centroid is un-projected (the visible inner walls "
              "pull the centroid away from the camera; ~0.8 x the rim height cancels that for the sim tray)",
              "m", 0.0, 0.5),
    ParamSpec(_P + "grasp_height_m", "double", 0.02, "end-effector (grasp frame) height above the table to grasp at",
              "m", 0.0, 0.5),
    ParamSpec(_P + "approach_height_m", "double", 0.15, "hover height above the table before descending", "m",
              0.02, 1.0),
    ParamSpec(_P + "lift_height_m", "double", 0.22, "height to lift a grasped object to (and carry it at)", "m",
              0.02, 1.0),
    ParamSpec(_P + "place_height_m", "double", 0.10, "end-effector height above the table to release over the tray",
              "m", 0.0, 1.0),
    ParamSpec(_P + "retreat_height_m", "double", 0.25, "height to retreat to after releasing", "m", 0.02, 1.0),
    ParamSpec(_P + "position_tolerance_m", "double", 0.012,
              "a phase goal counts as reached within this distance per axis", "m", 0.001, 0.1),
    ParamSpec(_P + "max_step_m", "double", 0.02,
              "largest translation per answer (also limited by the tokenizer's range)", "m", 0.001, 0.5),
    ParamSpec(_P + "max_rotation_step_rad", "double", 0.1,
              "largest orientation correction per answer (also limited by the tokenizer's range)", "rad", 0.0, 1.0),
    ParamSpec(_P + "gain", "double", 1.0,
              "fraction of the remaining distance between the phase goal and the commanded target added per "
              "answer (before max_step_m); the commanded target, not the lagging measured pose, so 1 does "
              "not overshoot", "", 0.05, 1.0),
    ParamSpec(_P + "settle_time_s", "double", 1.0,
              "if the measured pose has not moved (settle_motion_m) for this long while it is further than "
              "position_tolerance_m from the commanded target the policy believes in, that target was reset "
              "downstream (safety hold, dropped reply, wall): re-anchor it on the measured pose", "s", 0.1, 10.0),
    ParamSpec(_P + "settle_motion_m", "double", 0.003,
              "largest end-effector displacement that still counts as 'not moving' for settle_time_s", "m",
              0.0001, 0.05),
    ParamSpec(_P + "grasp_orientation", "double_array", [0.0, 1.0, 0.0, 0.0],
              "end-effector orientation held during the task, quaternion (w, x, y, z) in the base frame "
              "(default: grasp frame z pointing down); used only when the observation has ee_orientation",
              "", -1.0, 1.0, length=4),
    ParamSpec(_P + "grasp_wait_s", "double", 1.5, "time the gripper is given to close before lifting", "s",
              0.0, 10.0),
    ParamSpec(_P + "release_wait_s", "double", 1.0, "time the gripper is given to open before retreating", "s",
              0.0, 10.0),
    ParamSpec(_P + "empty_grasp_closedness", "double", 0.9,
              "measured closedness above which a grasp is considered to have missed (needs Observation.gripper)",
              "", 0.0, 1.0),
    ParamSpec(_P + "max_grasp_retries", "int", 2, "re-approaches after a missed grasp before giving up", "", 0, 10),
    ParamSpec(_P + "max_lost_steps", "int", 5,
              "answers in a row the object (or tray) may be unseen before the policy gives up and terminates",
              "", 1, 1000),
    ParamSpec(_P + "min_blob_area_px", "int", 6, "smallest colour blob accepted as an object (at the image size)",
              "px", 1, 100000),
    ParamSpec(_P + "hsv_red", "int_array", [170, 8, 150, 255, 60, 255], f"red objects: {_HSV_DOC}", "", 0, 255,
              length=6),
    ParamSpec(_P + "hsv_green", "int_array", [45, 80, 150, 255, 50, 255], f"green objects: {_HSV_DOC}", "", 0, 255,
              length=6),
    ParamSpec(_P + "hsv_blue", "int_array", [105, 128, 150, 255, 50, 255], f"blue objects: {_HSV_DOC}", "", 0, 255,
              length=6),
    ParamSpec(_P + "hsv_yellow", "int_array", [22, 35, 150, 255, 80, 255], f"yellow objects: {_HSV_DOC}", "", 0, 255,
              length=6),
    ParamSpec(_P + "hsv_tray", "int_array", [125, 155, 100, 255, 15, 255],
              f"the tray (destination); default: the simulator's purple tray. {_HSV_DOC}", "", 0, 255, length=6),
)


class Phase(enum.Enum):
    APPROACH = "approach"
    DESCEND = "descend"
    GRASP = "grasp"
    LIFT = "lift"
    TRANSPORT = "transport"
    LOWER = "lower"
    RELEASE = "release"
    RETREAT = "retreat"
    DONE = "done"


#: the chain-of-thought plan text of each phase ({obj} = "red cube")
PLAN_TEXT: dict[Phase, str] = {
    Phase.APPROACH: "move above the {obj}",
    Phase.DESCEND: "descend to the {obj}",
    Phase.GRASP: "grasp the {obj}",
    Phase.LIFT: "lift the {obj}",
    Phase.TRANSPORT: "carry the {obj} to the tray",
    Phase.LOWER: "lower the {obj} into the tray",
    Phase.RELEASE: "release the {obj}",
    Phase.RETREAT: "retreat from the tray",
}


class InstructionNotUnderstood(ValueError):
    """The instruction names no object (or destination) this policy knows; ``phrase`` is the culprit."""

    def __init__(self, phrase: str, message: str) -> None:
        super().__init__(message)
        self.phrase = phrase


@dataclass(frozen=True)
class Task:
    """What the instruction asks for."""

    color: str  # one of OBJECT_COLORS
    object_phrase: str  # e.g. "red cube" (for plan text)
    place_in_tray: bool  # False: pick up and lift, then terminate


def parse_instruction(instruction: str) -> Task:
    """Parse "pick up the red cube and put it in the tray" style instructions.

    Raises InstructionNotUnderstood (with the offending phrase) for unknown objects or destinations.
    """
    words = re.findall(r"[a-z]+", instruction.lower())
    color_at = next((i for i, w in enumerate(words) if w in OBJECT_COLORS), None)
    if color_at is None:
        phrase = _object_phrase(instruction)
        raise InstructionNotUnderstood(phrase, f"cannot find {phrase!r}: name a {'/'.join(OBJECT_COLORS)} cube")
    color = words[color_at]
    rest = words[color_at + 1:]
    if rest and rest[0] not in SHAPE_WORDS and rest[0] not in DESTINATION_PREPOSITIONS | {"and", "then", "from"}:
        phrase = f"{color} {rest[0]}"
        raise InstructionNotUnderstood(phrase, f"cannot find {phrase!r}: only cubes/blocks are known")
    shape = "block" if rest and rest[0] in {"block", "blocks"} else "cube"
    tail = rest[1:] if rest and rest[0] in SHAPE_WORDS else rest
    place = False
    prep_at = next((i for i, w in enumerate(tail) if w in DESTINATION_PREPOSITIONS), None)
    if prep_at is not None:
        target = [w for w in tail[prep_at + 1:] if w not in FILLER_WORDS]
        if target and target[0] in DESTINATION_WORDS:
            place = True
        else:
            phrase = " ".join(target[:3]) or tail[prep_at]
            raise InstructionNotUnderstood(phrase, f"cannot place it {tail[prep_at]} {phrase!r}: "
                                                   f"only the tray (or bowl) is a known destination")
    return Task(color, f"{color} {shape}", place)


def _object_phrase(instruction: str) -> str:
    """Best-effort object phrase for error messages: "pick up the purple dog" -> "purple dog"."""
    text = " ".join(re.findall(r"[A-Za-z0-9'-]+", instruction.lower()))
    for verb in VERBS:
        if text.startswith(verb + " "):
            text = text[len(verb) + 1:]
            break
    text = re.sub(r"^(?:up\s+)?(?:(?:the|a|an)\s+)?", "", text)
    text = re.split(r"\s+(?:and|in|into|on|onto|to|from|inside|then)\s+", text)[0]
    return text.strip()[:40] or instruction.strip()[:40]


def find_blob(image_rgb: np.ndarray, hsv_range: list[int], min_area_px: int) -> tuple[float, float, int] | None:
    """Centroid (u, v) in pixels and area of the largest blob inside ``hsv_range``, or None."""
    hsv = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2HSV)
    h_lo, h_hi, s_lo, s_hi, v_lo, v_hi = (int(x) for x in hsv_range)
    if h_lo <= h_hi:
        mask = cv2.inRange(hsv, (h_lo, s_lo, v_lo), (h_hi, s_hi, v_hi))
    else:  # hue wraps (red)
        mask = cv2.inRange(hsv, (h_lo, s_lo, v_lo), (179, s_hi, v_hi)) | cv2.inRange(
            hsv, (0, s_lo, v_lo), (h_hi, s_hi, v_hi))
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[best, cv2.CC_STAT_AREA])
    if area < min_area_px:
        return None
    return float(centroids[best][0]), float(centroids[best][1]), area


def _unit_quaternion(value: Any) -> np.ndarray | None:
    """``value`` as a unit quaternion (w, x, y, z), or None when absent or malformed."""
    if value is None:
        return None
    q = np.asarray(value, dtype=np.float64).reshape(-1)
    if q.shape != (4,) or not np.all(np.isfinite(q)) or np.linalg.norm(q) < 1e-6:
        return None
    return q / np.linalg.norm(q)


def _rotvec_between(q_from: np.ndarray, q_to: np.ndarray) -> np.ndarray:
    """Base-frame rotation vector r with exp(r) * q_from = q_to (shortest path)."""
    q = tq.qmult(q_to, tq.qinverse(q_from))
    if q[0] < 0:
        q = -q
    s = float(np.linalg.norm(q[1:]))
    if s < 1e-12:
        return np.zeros(3)
    return q[1:] / s * 2.0 * math.atan2(s, float(q[0]))


class EmbeddedBackend(Backend):
    """Scripted colour-segmentation pick-and-place policy answering with RT-2 tokens (not a learned model)."""

    name = "embedded"
    OPTIONS = EMBEDDED_OPTIONS

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        # create_backend() has validated the options already; resolving again fills defaults when
        # the class is built directly (tests, notebooks) and costs nothing.
        opts = resolve_options(EMBEDDED_OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        try:
            self.camera = PinholeCamera.from_params({_P + k: v for k, v in opts.items()}, _P + "camera_")
        except CameraError as exc:
            raise BackendConfigError(str(exc)) from None
        q = np.asarray(self._opt("grasp_orientation"), dtype=np.float64)
        if np.linalg.norm(q) < 1e-6:
            raise BackendConfigError(f"{_P}grasp_orientation: quaternion (w, x, y, z) has zero length")
        self._grasp_q = q / np.linalg.norm(q)
        self._t_lo, self._t_hi, self._max_rot = self._tokenizer_limits()
        self.reset()

    def _opt(self, key: str) -> Any:
        return self.options[key]

    def _tokenizer_limits(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Per-axis translation range and the largest safe rotation step the tokenizer can express."""
        relative = bool(getattr(self.tokenizer, "gripper_relative", False))
        big = 1e3
        hi = self.tokenizer.decode(self.tokenizer.encode(ArmAction(np.full(3, big), np.zeros(3), 0.0,
                                                                   gripper_relative=relative)))
        lo = self.tokenizer.decode(self.tokenizer.encode(ArmAction(np.full(3, -big), np.zeros(3), 0.0,
                                                                   gripper_relative=relative)))
        max_rot = float("inf")
        for axis in range(3):  # smallest per-axis rotation the token range allows, either sign
            for sign in (1.0, -1.0):
                rot = np.zeros(3)
                rot[axis] = sign * 1.0  # 1 rad: beyond any sensible per-step range, yet no wrap-around
                got = self.tokenizer.decode(self.tokenizer.encode(ArmAction(np.zeros(3), rot, 0.0,
                                                                            gripper_relative=relative)))
                max_rot = min(max_rot, abs(float(got.rotation[axis])))
        if not (np.all(hi.translation > 0) and np.all(lo.translation < 0)):
            raise BackendConfigError(f"{_P}*: the tokenizer cannot express motion in both directions "
                                     f"(range {lo.translation} .. {hi.translation} m); check tokenizer.low/high")
        return lo.translation, hi.translation, max_rot

    # ------------------------------------------------------------------ episode state
    def reset(self) -> None:
        self._instruction: str | None = None
        self._task: Task | None = None
        self._problem = ""  # why the episode cannot proceed ("" = fine)
        self._phase = Phase.APPROACH
        self._phase_start = (math.nan, math.nan)  # (observation stamp, time.monotonic()) at phase entry
        self._object_xy: np.ndarray | None = None
        self._tray_xy: np.ndarray | None = None
        self._lost = 0
        self._retries = 0
        self._gripper = 0.0  # commanded closedness of the current phase
        # The commanded target as built up by this policy's own answers (see the module docstring):
        # None until the first observation of the episode anchors it on the measured pose.
        self._cmd_p: np.ndarray | None = None
        self._cmd_q: np.ndarray | None = None
        self._still_at: np.ndarray | None = None  # measured position where the arm was last seen moving
        self._still_since = (math.nan, math.nan)  # (stamp, monotonic) since when it has not moved
        self.reanchors = 0  # how often the commanded target had to be re-anchored (diagnostics, tests)
        self._reanchored_in_phase = False  # in DESCEND: the arm stalled short of the grasp height

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def grasp_retries(self) -> int:
        """Re-approaches after a missed or slipped grasp in this episode (recoveries)."""
        return self._retries

    # ------------------------------------------------------------------ inference
    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        start = time.monotonic()
        ee = self._ee_position(observation)
        if observation.instruction != self._instruction:
            self.reset()
            self._instruction = observation.instruction
            try:
                self._task = parse_instruction(observation.instruction)
            except InstructionNotUnderstood as exc:
                self._problem = str(exc)
                self._phase = Phase.DONE
        if self._phase is not Phase.DONE:
            self._look(observation.image)
        plan, action = self._decide(observation, ee)
        bins = self.tokenizer.encode(action)
        self._account(self.tokenizer.decode(bins))
        if getattr(self.tokenizer, "token_form", "text") == "ids":  # PaLM-E / OpenVLA style: ids, no plan
            ids = tuple(int(i) for i in self.tokenizer.ids_from_bins(bins))
            reply = BackendReply(seq=observation.seq, backend=self.name, token_ids=ids)
        else:
            reply = BackendReply(seq=observation.seq, backend=self.name, text=self._answer_text(plan, bins))
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise BackendTimeout(f"embedded policy took {elapsed:.3f} s > timeout {timeout_s:.3f} s")
        return dataclasses.replace(reply, server_time_s=elapsed)

    def _ee_position(self, observation: Observation) -> np.ndarray:
        if observation.ee_position is None:
            raise BackendError("the embedded reference policy needs proprioception: Observation.ee_position is "
                               "missing; feed the end-effector pose (base frame) to the policy node")
        ee = np.asarray(observation.ee_position, dtype=np.float64).reshape(-1)
        if ee.shape != (3,) or not np.all(np.isfinite(ee)):
            raise BackendError(f"Observation.ee_position must be 3 finite numbers (m, base frame), got {ee}")
        return ee

    def _look(self, image: np.ndarray) -> None:
        """Update the object / tray estimates from the image where the phase allows it."""
        task = self._task
        if task is None:
            return
        h, w = image.shape[:2]
        cam = self.camera.scaled(w, h)
        table = self._opt("table_height_m")
        min_area = self._opt("min_blob_area_px")
        # The object estimate is frozen once the descent starts (the hand then occludes it);
        # the tray estimate is taken while the arm is away from it.
        if self._phase is Phase.APPROACH:
            blob = find_blob(image, self._opt(f"hsv_{task.color}"), min_area)
            xy = self._unproject(cam, blob, table + self._opt("object_center_height_m"))
            if xy is not None:
                self._object_xy = xy
        arm_away_from_tray = self._phase in (Phase.APPROACH, Phase.DESCEND, Phase.GRASP, Phase.LIFT)
        if task.place_in_tray and (arm_away_from_tray or self._tray_xy is None):
            blob = find_blob(image, self._opt("hsv_tray"), min_area)
            xy = self._unproject(cam, blob, table + self._opt("tray_plane_height_m"))
            if xy is not None:
                self._tray_xy = xy

    @staticmethod
    def _unproject(cam: PinholeCamera, blob: tuple[float, float, int] | None, z: float) -> np.ndarray | None:
        """Base-frame (x, y) of a blob centroid on the plane at height ``z``; None if unseen or off-plane."""
        if blob is None:
            return None
        try:
            return cam.pixel_to_table_plane(blob[0], blob[1], z)[:2]
        except CameraError:
            return None

    def _decide(self, observation: Observation, ee: np.ndarray) -> tuple[str, ArmAction]:
        """(plan text, action) for this step; advances the phase machine."""
        if self._phase is Phase.DONE:
            return self._terminate_plan(), self._terminate()
        task = self._task
        assert task is not None  # parse succeeded, otherwise DONE
        now = (float(observation.stamp), time.monotonic())
        if math.isnan(self._phase_start[0]):
            self._phase_start = now
        table = self._opt("table_height_m")
        tol = self._opt("position_tolerance_m")
        self._track_commanded(ee, observation, now)
        cmd = self._cmd_p
        assert cmd is not None

        # Localisation: wait (holding) a few steps for the object / tray to be seen.
        needs_tray = task.place_in_tray and self._phase in (Phase.TRANSPORT, Phase.LOWER)
        missing = (self._object_xy is None and self._phase is Phase.APPROACH) or (needs_tray and self._tray_xy is None)
        if missing:
            self._lost += 1
            what = f"the {task.object_phrase}" if self._object_xy is None else "the tray"
            if self._lost >= self._opt("max_lost_steps"):
                self._problem = f"cannot see {what}"
                self._phase = Phase.DONE
                return self._terminate_plan(), self._terminate()
            return f"look for {what}", self._action(cmd, observation)  # hold the commanded target
        self._lost = 0

        for _ in range(len(Phase)):  # advance through every phase whose goal is already met
            goal = self._goal(cmd, table)
            if goal is None or not self._phase_done(ee, goal, now, tol, observation):
                break
        if self._phase is Phase.DONE:
            return self._terminate_plan(), self._terminate()
        goal = self._goal(cmd, table)
        assert goal is not None
        return PLAN_TEXT[self._phase].format(obj=task.object_phrase), self._action(goal, observation)

    def _goal(self, cmd: np.ndarray, table: float) -> np.ndarray | None:
        """The end-effector position goal of the current phase (base frame); ``cmd`` is the commanded
        target, from which the path is planned (the arm follows it with a lag)."""
        p = self._phase
        if p is Phase.DONE:
            return None
        if p is Phase.APPROACH:
            xy = self._object_xy
            hover = table + self._opt("approach_height_m")
            # Rise before moving sideways so the hand never sweeps low across the table.
            far = np.linalg.norm(cmd[:2] - xy) > 3 * self._opt("position_tolerance_m")
            if far and cmd[2] < hover - 2 * self._opt("position_tolerance_m"):
                return np.array([cmd[0], cmd[1], hover])
            return np.array([xy[0], xy[1], hover])
        if p in (Phase.DESCEND, Phase.GRASP):
            xy = self._object_xy
            return np.array([xy[0], xy[1], table + self._opt("grasp_height_m")])
        if p is Phase.LIFT:
            xy = self._object_xy
            return np.array([xy[0], xy[1], table + self._opt("lift_height_m")])
        tray = self._tray_xy
        if p is Phase.TRANSPORT:
            return np.array([tray[0], tray[1], table + self._opt("lift_height_m")])
        if p in (Phase.LOWER, Phase.RELEASE):
            return np.array([tray[0], tray[1], table + self._opt("place_height_m")])
        return np.array([tray[0], tray[1], table + self._opt("retreat_height_m")])  # RETREAT

    def _in_phase_s(self, now: tuple[float, float]) -> float:
        """Seconds since the phase began (see :meth:`_elapsed_s`)."""
        return self._elapsed_s(self._phase_start, now)

    def _phase_done(self, ee: np.ndarray, goal: np.ndarray, now: tuple[float, float], tol: float,
                    obs: Observation) -> bool:
        """Check the current phase's exit condition; on success switch phase and return True."""
        p = self._phase
        task = self._task
        assert task is not None
        reached = bool(np.all(np.abs(ee - goal) < tol))
        nxt: Phase | None = None
        if p is Phase.APPROACH and reached:
            nxt = Phase.DESCEND
        elif p is Phase.DESCEND and reached:
            self._gripper = 1.0
            nxt = Phase.GRASP
        elif p is Phase.DESCEND and self._reanchored_in_phase:
            nxt = self._missed_grasp()  # the descent stalled above the grasp height: a finger sits on something
        elif p is Phase.GRASP and self._in_phase_s(now) >= self._opt("grasp_wait_s"):
            if obs.gripper is not None and obs.gripper > self._opt("empty_grasp_closedness"):
                nxt = self._missed_grasp()  # closed on nothing
            else:
                nxt = Phase.LIFT
        elif p is Phase.LIFT and reached:
            if obs.gripper is not None and obs.gripper > self._opt("empty_grasp_closedness"):
                nxt = self._missed_grasp()  # the object slipped out while lifting
            else:
                nxt = Phase.TRANSPORT if task.place_in_tray else Phase.DONE
        elif p is Phase.TRANSPORT and reached:
            nxt = Phase.LOWER
        elif p is Phase.LOWER and reached:
            self._gripper = 0.0
            nxt = Phase.RELEASE
        elif p is Phase.RELEASE and self._in_phase_s(now) >= self._opt("release_wait_s"):
            nxt = Phase.RETREAT
        elif p is Phase.RETREAT and reached:
            nxt = Phase.DONE
        if nxt is None:
            return False
        self._phase = nxt
        self._phase_start = now
        self._reanchored_in_phase = False
        return True

    def _missed_grasp(self) -> Phase:
        """Re-open and re-approach from the latest image, or give up after max_grasp_retries."""
        assert self._task is not None
        self._retries += 1
        self._gripper = 0.0
        if self._retries > self._opt("max_grasp_retries"):
            self._problem = f"failed to grasp the {self._task.object_phrase} {self._retries} times"
            return Phase.DONE
        return Phase.APPROACH

    def _action(self, goal: np.ndarray, obs: Observation) -> ArmAction:
        """Per-step delta from the commanded target toward ``goal`` (clipped), the orientation
        correction toward ``grasp_orientation`` (also from the commanded orientation) and the gripper."""
        assert self._cmd_p is not None
        step = self._opt("gain") * (goal - self._cmd_p)
        norm = float(np.linalg.norm(step))
        if norm > self._opt("max_step_m"):
            step *= self._opt("max_step_m") / norm
        step = np.clip(step, self._t_lo, self._t_hi)
        rotation = np.zeros(3)
        if self._cmd_q is not None:
            rotation = self._opt("gain") * _rotvec_between(self._cmd_q, self._grasp_q)
            limit = min(self._opt("max_rotation_step_rad"), self._max_rot)
            angle = float(np.linalg.norm(rotation))
            if angle > limit:
                rotation *= limit / angle
        return self._with_gripper(ArmAction(step, rotation, self._gripper), obs)

    # ------------------------------------------------------------------ commanded target bookkeeping
    def _track_commanded(self, ee: np.ndarray, obs: Observation, now: tuple[float, float]) -> None:
        """Anchor the commanded target on the measured pose at the start, and re-anchor it when the
        arm has settled away from it (the downstream target was reset; module docstring)."""
        q_meas = _unit_quaternion(obs.ee_orientation)
        if self._cmd_p is None:
            self._anchor(ee, q_meas, now)
            return
        # The settle clock runs only while the arm is away from the commanded target AND not moving:
        # standing still at the target (grasping) and the first moments of a new motion (the answer
        # is still on its way to the controller) are normal.
        away = bool(np.any(np.abs(self._cmd_p - ee) > self._opt("position_tolerance_m")))
        moved = self._still_at is None or np.linalg.norm(ee - self._still_at) > self._opt("settle_motion_m")
        if not away or moved:
            self._still_at, self._still_since = ee.copy(), now
            return
        if self._elapsed_s(self._still_since, now) >= self._opt("settle_time_s"):
            self.reanchors += 1
            self._reanchored_in_phase = True
            self._anchor(ee, q_meas, now)

    def set_commanded_target(self, position: Any, orientation_wxyz: Any = None) -> None:
        """Continue from this commanded target (base frame): for a caller that knows the downstream target
        moved by something other than this policy's answers (rt2_ros.learn.collect perturbs the executed
        actions to record corrections), so the next answers correct the deviation at once instead of
        after ``settle_time_s``. Ignored before the episode's first observation anchored the target."""
        if self._cmd_p is None:
            return
        p = np.asarray(position, dtype=np.float64).reshape(-1)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise BackendError(f"commanded target position must be 3 finite numbers, got {p}")
        self._cmd_p = p.copy()
        q = _unit_quaternion(orientation_wxyz)
        if q is not None and self._cmd_q is not None:
            self._cmd_q = q

    def _anchor(self, ee: np.ndarray, q_meas: np.ndarray | None, now: tuple[float, float]) -> None:
        self._cmd_p = ee.copy()
        self._cmd_q = q_meas
        self._still_at, self._still_since = ee.copy(), now

    def _account(self, executed: ArmAction) -> None:
        """Add the answer, as the tokenizer decodes it (what the safety filter will add), to the
        commanded target."""
        if executed.terminate or self._cmd_p is None:
            return
        self._cmd_p = self._cmd_p + np.asarray(executed.translation, dtype=np.float64)
        if self._cmd_q is not None:
            rot = np.asarray(executed.rotation, dtype=np.float64)
            angle = float(np.linalg.norm(rot))
            if angle > 1e-12:  # base-frame rotation vector: left-multiply, as the safety filter does
                q = tq.qmult(tq.axangle2quat(rot / angle, angle), self._cmd_q)
                self._cmd_q = q / np.linalg.norm(q)

    @staticmethod
    def _elapsed_s(since: tuple[float, float], now: tuple[float, float]) -> float:
        """Seconds from ``since`` to ``now`` by observation stamps (camera time, right for replays and
        simulated time); by the wall clock if the stamps stand still (callers that never set them)."""
        by_stamp = now[0] - since[0]
        return by_stamp if by_stamp > 0 else now[1] - since[1]

    def _with_gripper(self, action: ArmAction, obs: Observation) -> ArmAction:
        if not getattr(self.tokenizer, "gripper_relative", False):
            return action
        current = obs.gripper if obs.gripper is not None else (1.0 - self._gripper)  # unknown: command it fully
        delta = float(np.clip(self._gripper - current, -1.0, 1.0))
        return ArmAction(action.translation, action.rotation, delta, gripper_relative=True)

    def _terminate(self) -> ArmAction:
        """Terminate; for profiles without a terminate token (openvla) a zero-motion hold instead."""
        relative = bool(getattr(self.tokenizer, "gripper_relative", False))
        return ArmAction(np.zeros(3), np.zeros(3), 0.0 if relative else self._gripper,
                         terminate=bool(self.tokenizer.has_terminate), gripper_relative=relative)

    def _terminate_plan(self) -> str:
        if self._problem:
            return self._problem
        task = self._task
        return f"done with the {task.object_phrase}" if task else "done"

    def _answer_text(self, plan: str, bins: np.ndarray) -> str:
        # The plan is one line without ':' so the tokenizer's "Plan: ... Action: ..." split stays unambiguous.
        clean = " ".join(plan.replace(":", " -").split())
        return f"Plan: {clean}. Action: {self.tokenizer.format_text(bins)}"


__all__ = ["EMBEDDED_OPTIONS", "EmbeddedBackend", "InstructionNotUnderstood", "Phase", "Task", "find_blob",
           "parse_instruction"]
