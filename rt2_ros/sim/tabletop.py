"""The simulator core: a Franka Panda at a table with coloured cubes, a tray, a fixed camera and a wrist camera.

Why it exists: the whole policy loop (camera -> backend -> tokens -> safety -> servo) must be
runnable and testable on a laptop with no robot, no GPU and no network. ``TabletopSim`` is the
stand-in for "the robot plus MoveIt Servo plus a camera"; the ROS simulator node is a thin
adapter around it (topics in, :meth:`apply_twist` / :meth:`set_gripper` / :meth:`step`; topics
out, :meth:`render` / :meth:`joint_state` / :meth:`ee_pose`).

Design choices:

* **pybullet, DIRECT mode, TinyRenderer** (CPU only). MuJoCo/Isaac were rejected: pybullet ships
  the Panda, table, tray and cubes in ``pybullet_data`` and needs no GPU or licence files.
* **The pybullet world frame is the robot base frame**: Panda base at the origin, the table top
  at z = 0, x forward, z up. The default safety workspace (x 0.25..0.75, y -0.35..0.35,
  z 0.02..0.55 m) is then exactly the space above the table in front of the robot.
* **MoveIt Servo semantics for twists**: a command whose stamp is older than
  ``sim.command_timeout_s`` (0.1 s, Servo's default) is dropped and the arm holds. Twists are
  integrated on the *commanded* end-effector pose, never the measured one (integrating the
  measured pose makes the arm sag under gravity and drift), clamped to ``sim.workspace_*``,
  then solved by damped IK with joint limits and a rest pose and sent as position targets.
  The commanded pose never leads the measured one by more than ``sim.max_command_lead_m`` /
  ``sim.max_command_lead_rad``: Servo steps from the arm's current state, so a command the arm
  cannot follow (a joint limit, a collision, a cube pressed into the table) does not pile up.
  Without the bound the commanded orientation kept turning while the hand could not.
  And like Servo at a joint limit, the arm halts on a commanded pose it cannot reach: an IK
  solution whose hand lies more than ``sim.ik_tolerance_m`` / ``_rad`` from the commanded pose
  (checked on a kinematics-only copy of the arm) is not sent, and the command stays at the last
  reachable pose. Without that check the IK, asked for an orientation the joints cannot give,
  gave up position for it: a 1 rad/s twist held for 8 s swung the hand 0.19-0.60 m (docs/sim.md).
* **Grasping**: physical (finger pad friction ``sim.finger_friction``, finger force
  ``sim.finger_force``); it holds 4 cm cubes through pick-and-place at the default speeds.
  For harsher motions, ``sim.grasp_assist`` (off by default) adds a fixed constraint between
  the hand and a cube while the gripper is commanded closed *and* both fingers touch that
  cube, removed as soon as the gripper opens. A documented simulation aid (docs/sim.md);
  the policy never sees it.
* **Wrist camera**: a second pinhole camera fixed to the Panda hand (``panda_hand``), beside the
  hand and looking along the gripper past the fingertips, as wrist cameras on real Pandas are
  mounted (DROID's, openpi's wrist inputs). Fingers, the grasped object and what lies under the
  gripper are in view. Its mount is given as an eye and a look-at point in the hand frame
  (``sim.wrist_camera_position`` / ``sim.wrist_camera_target``), not as a quaternion: that is
  how one places a simulated camera, and the image's up is then fixed by the rule "the side of
  the hand the camera sits on is up", which keeps the fingers at the bottom of the image.
  Rendered on request only (:meth:`TabletopSim.render` with ``camera="wrist"``), at its own
  size, so a node that does not publish it pays nothing.
* **Randomisation for demonstrations** (all off by default: a seed gives the scene and the pixels
  it always gave): ``sim.placement: workspace`` puts the tray and the cubes anywhere on
  ``sim.placement_min..max`` (reachable, in the default camera's view), ``sim.min_object_spacing_m``
  apart so the open fingers fit between objects; ``sim.color_jitter`` varies the shades (up to
  0.25 within the reference policy's HSV ranges), ``sim.distractors`` adds dull objects no instruction names,
  ``sim.lighting_jitter`` moves and scales the light. Appearance draws come from a random stream
  of their own, so switching them on never moves an object. rt2-collect (rt2_ros.learn.collect)
  jitters the camera pose through the ``sim.camera_*`` parameters.
"""

from __future__ import annotations

import colorsys
import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybullet_data
import transforms3d.axangles as tax
import transforms3d.quaternions as tq

from rt2_ros.params import ParamSpec, resolve
from rt2_ros.sim.camera import CameraError, PinholeCamera, camera_param_specs, focal_from_fov, look_at


def _import_pybullet_quietly():
    """pybullet prints its build time to file descriptor 2 on import: noise in every tool's output
    (``rt2-bringup --check``, ``python -m rt2_ros.params``) that imports the simulator's parameters."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import pybullet
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return pybullet


pb = _import_pybullet_quietly()


class SimError(RuntimeError):
    """The simulator could not be built or stepped (pybullet failure, missing assets)."""


class SimCommandError(ValueError):
    """A command was malformed (wrong shape, NaN/inf); it was ignored and the arm holds."""


# ---------------------------------------------------------------------------------------- scene facts
PANDA_URDF = "franka_panda/panda.urdf"
ARM_JOINTS = (0, 1, 2, 3, 4, 5, 6)
FINGER_JOINTS = (9, 10)
HAND_LINK = 8
EE_LINK = 11  # panda_grasptarget: between the finger pads
FINGER_TRAVEL_M = 0.04  # each finger, open
JOINT_NAMES = (*(f"panda_joint{i}" for i in range(1, 8)), "panda_finger_joint1", "panda_finger_joint2")
ARM_FORCES_N = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)  # URDF effort limits (N m)
REST_POSE = (0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.785)  # elbow up, hand down: IK null-space target
TABLE_TOP_Z_IN_URDF = 0.625  # table/table.urdf: top of the 0.05 m slab centred at 0.6
TRAY_URDF_SCALE = 0.4  # traybox.urdf is 0.6 m square; 0.24 m fits the workspace
TRAY_HALF_INNER_M = 0.25 * TRAY_URDF_SCALE  # wall centres at +-0.25 in the URDF
TRAY_RIM_Z_M = 0.128 * TRAY_URDF_SCALE
DOWN_QUAT_WXYZ = (0.0, 1.0, 0.0, 0.0)  # grasp frame z pointing down, fingers opening along base y
# The wrist camera's near clipping plane: the fingers are 6-12 cm from the default mount, the
# hand's lower edge closer still; the fixed camera's 5 cm would cut them away.
WRIST_CAMERA_NEAR_M = 0.01
CAMERAS = ("main", "wrist")  # names render() and segmentation() take

CUBE_COLORS: dict[str, tuple[float, float, float, float]] = {
    "red_cube": (0.9, 0.05, 0.05, 1.0),
    "green_cube": (0.05, 0.75, 0.1, 1.0),
    "blue_cube": (0.05, 0.15, 0.95, 1.0),
    "yellow_cube": (0.95, 0.85, 0.05, 1.0),
}
TRAY_COLOR = (0.55, 0.25, 0.85, 1.0)  # purple tint over the tray texture; no cube has this hue
# Nominal (x, y) on the table before jitter, base frame, m: all inside the default workspace,
# cubes >= 0.1 m apart and clear of the tray so jittered objects never overlap.
NOMINAL_XY: dict[str, tuple[float, float]] = {
    "red_cube": (0.42, -0.18),
    "green_cube": (0.60, -0.22),
    "blue_cube": (0.45, 0.00),
    "yellow_cube": (0.63, -0.05),
    "tray": (0.58, 0.20),
}

PLACEMENTS = ("nominal", "workspace")
MAX_DISTRACTORS = 6
# Distractor shapes (pybullet_data URDF, scale) and colours: low saturation (<= 0.3) so no HSV range of
# the reference policy (saturation >= 0.39) can take one for a cube or the tray.
DISTRACTOR_SHAPES = (("cube_small.urdf", 0.7), ("block.urdf", 1.0), ("sphere_small.urdf", 0.8))
DISTRACTOR_MAX_SATURATION = 0.3
# pybullet TinyRenderer's lighting coefficients when none are given (ambient, diffuse, specular)
DEFAULT_LIGHT_COEFFS = (0.6, 0.35, 0.05)

SIM_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("sim.physics_hz", "int", 240, "physics steps per simulated second", "Hz", 60, 2000),
    ParamSpec("sim.command_timeout_s", "double", 0.1,
              "twist commands whose stamp is older than this are dropped and the arm holds (MoveIt Servo)",
              "s", 0.001, 10.0),
    ParamSpec("sim.workspace_min", "double_array", [0.25, -0.35, 0.02],
              "lower corner of the box the commanded end-effector position is clamped to (base frame)",
              "m", -2.0, 2.0, length=3),
    ParamSpec("sim.workspace_max", "double_array", [0.75, 0.35, 0.55],
              "upper corner of the commanded end-effector box (base frame)", "m", -2.0, 2.0, length=3),
    ParamSpec("sim.max_linear_speed", "double", 0.5, "twist linear speed is clipped to this", "m/s", 0.0, 5.0),
    ParamSpec("sim.max_angular_speed", "double", 1.5, "twist angular speed is clipped to this", "rad/s", 0.0, 10.0),
    ParamSpec("sim.max_command_lead_m", "double", 0.05,
              "the integrated commanded position stays within this distance of the measured one (no wind-up "
              "against a limit or a collision)", "m", 0.001, 1.0),
    ParamSpec("sim.max_command_lead_rad", "double", 0.3,
              "the integrated commanded orientation stays within this angle of the measured one", "rad", 0.001,
              math.pi),
    ParamSpec("sim.ik_tolerance_m", "double", 0.01,
              "a twist whose commanded pose the IK reaches no closer than this is not executed (the arm halts)",
              "m", 0.0001, 0.5),
    ParamSpec("sim.ik_tolerance_rad", "double", 0.1,
              "the same for the commanded orientation", "rad", 0.0001, math.pi),
    ParamSpec("sim.home_position", "double_array", [0.45, 0.0, 0.35],
              "end-effector position after reset, gripper pointing down (base frame)", "m", -2.0, 2.0, length=3),
    ParamSpec("sim.objects", "string_array", list(CUBE_COLORS), "cubes placed on the table (the tray is always there)",
              choices=tuple(CUBE_COLORS)),
    ParamSpec("sim.cube_size", "double", 0.04, "cube edge length", "m", 0.02, 0.07),
    ParamSpec("sim.object_jitter_m", "double", 0.02, "uniform +- jitter of each object's x and y at reset (seeded)",
              "m", 0.0, 0.05),
    ParamSpec("sim.object_yaw_jitter_rad", "double", 0.3, "uniform +- jitter of each cube's yaw at reset (seeded)",
              "rad", 0.0, math.pi),
    ParamSpec("sim.placement", "string", "nominal",
              "object placement at reset: nominal (fixed spots + sim.object_jitter_m) or workspace (tray and cubes "
              "uniformly over sim.placement_min..max, sim.min_object_spacing_m apart; seeded)",
              choices=PLACEMENTS),
    ParamSpec("sim.placement_min", "double_array", [0.32, -0.28],
              "lower (x, y) corner of the table area objects are placed in with sim.placement workspace "
              "(base frame; the default area is reachable and in the default camera's view)", "m", -2.0, 2.0,
              length=2),
    ParamSpec("sim.placement_max", "double_array", [0.70, 0.28],
              "upper (x, y) corner of the sim.placement workspace area (base frame)", "m", -2.0, 2.0, length=2),
    ParamSpec("sim.min_object_spacing_m", "double", 0.08,
              "smallest centre distance between objects (cubes, distractors) with sim.placement workspace; "
              "each also stays this far from the tray's walls", "m", 0.03, 0.3),
    ParamSpec("sim.color_jitter", "double", 0.0,
              "0: the fixed colours; > 0: each reset varies every cube's and the tray's hue (+- 0.05 x this of "
              "the hue circle), saturation and value (x 1 - this .. 1), and tints the table (seeded); up to 0.25 the "
              "colours stay inside the embedded policy's default HSV ranges", "", 0.0, 0.5),
    ParamSpec("sim.distractors", "int", 0,
              "extra objects no instruction names (grey/white/brown blocks, sticks and balls: saturation below "
              "every colour the reference policy looks for), placed at random on the table at each reset", "",
              0, MAX_DISTRACTORS),
    ParamSpec("sim.lighting_jitter", "double", 0.0,
              "0: pybullet's default light; > 0: each reset draws a light direction (up to 60 deg x this from "
              "overhead) and scales ambient/diffuse/specular light by 1 - 0.25 x this .. 1 + 0.4 x this (seeded; "
              "cameras render with it)", "", 0.0, 1.0),
    ParamSpec("sim.finger_force", "double", 60.0, "force of each finger motor", "N", 1.0, 200.0),
    ParamSpec("sim.finger_friction", "double", 2.0, "lateral friction coefficient of the finger pads", "", 0.1, 10.0),
    ParamSpec("sim.grasp_assist", "bool", False,
              "attach a cube to the hand while the gripper is commanded closed and both fingers touch it "
              "(simulation aid against slipping grasps; see docs/sim.md)"),
    ParamSpec("sim.collision_visuals", "bool", True,
              "render the Panda with its collision meshes (coarser, plain white; rendering 2-3x faster, which "
              "keeps the camera at its rate on a laptop CPU); false: the detailed visual meshes"),
    *camera_param_specs("sim.camera_", "simulated camera"),
    ParamSpec("sim.wrist_camera_width", "int", 128, "wrist camera image width", "px", 16, 1024),
    ParamSpec("sim.wrist_camera_height", "int", 128, "wrist camera image height", "px", 16, 1024),
    ParamSpec("sim.wrist_camera_fov", "double", 75.0, "wrist camera vertical field of view", "deg", 10.0, 150.0),
    ParamSpec("sim.wrist_camera_position", "double_array", [0.07, 0.0, 0.04],
              "wrist camera optical centre in the hand frame (panda_hand: z along the gripper towards the "
              "fingertips, fingers opening along y); the side it sits on is the top of the image",
              "m", -0.5, 0.5, length=3),
    ParamSpec("sim.wrist_camera_target", "double_array", [0.0, 0.0, 0.15],
              "point the wrist camera looks at, in the hand frame (the default: 4.5 cm beyond the point between "
              "the finger pads, so fingers and grasped object sit in the lower half of the image)",
              "m", -1.0, 1.0, length=3),
)


@dataclass(frozen=True)
class JointState:
    """Joint names, positions (rad; m for fingers) and velocities (rad/s; m/s)."""

    names: tuple[str, ...]
    positions: np.ndarray
    velocities: np.ndarray

    def __iter__(self):  # allows ``names, q, dq = sim.joint_state()``
        return iter((self.names, self.positions, self.velocities))


def _xyzw(q_wxyz: Sequence[float]) -> list[float]:
    return [float(q_wxyz[1]), float(q_wxyz[2]), float(q_wxyz[3]), float(q_wxyz[0])]


def _wxyz(q_xyzw: Sequence[float]) -> np.ndarray:
    return np.array([q_xyzw[3], q_xyzw[0], q_xyzw[1], q_xyzw[2]], dtype=np.float64)


def _vector(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise SimCommandError(f"{name} must be 3 numbers, got {value!r}; command ignored") from None
    if not np.all(np.isfinite(arr)):
        raise SimCommandError(f"{name} contains NaN/inf ({arr}); command ignored")
    return arr


class TabletopSim:
    """A Panda tabletop in pybullet DIRECT mode; see the module docstring for frames and semantics.

    ``config`` is a flat dict of ``sim.*`` keys (validated against :data:`SIM_PARAMS`, defaults
    filled in). ``time_s`` is the simulated time since the last reset (s). Not thread-safe:
    call it from one thread (the ROS adapter's timer).
    """

    def __init__(self, config: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        self.config = resolve(SIM_PARAMS, dict(config or {}))
        c = self.config
        self.camera = PinholeCamera.from_params(c, "sim.camera_")
        self.dt_physics = 1.0 / c["sim.physics_hz"]
        self._ws_min = np.asarray(c["sim.workspace_min"], dtype=np.float64)
        self._ws_max = np.asarray(c["sim.workspace_max"], dtype=np.float64)
        if np.any(self._ws_min >= self._ws_max):
            raise ValueError(f"sim.workspace_min {self._ws_min} must be below sim.workspace_max {self._ws_max}")
        self._wrist_mount = _wrist_mount(c)
        self._grasp_cid: int | None = None
        self._held: str | None = None
        self._cid = pb.connect(pb.DIRECT)
        if self._cid < 0:
            raise SimError("pybullet could not start a DIRECT physics server")
        try:
            self._build_scene()
        except pb.error as exc:
            self.close()
            raise SimError(f"building the pybullet scene failed: {exc}") from exc
        self.time_s = 0.0
        self._pending_s = 0.0
        self.reset(seed)

    # ------------------------------------------------------------------ construction
    def _build_scene(self) -> None:
        c, cid = self.config, self._cid
        data = pybullet_data.getDataPath()
        pb.setAdditionalSearchPath(data, physicsClientId=cid)
        pb.setGravity(0.0, 0.0, -9.81, physicsClientId=cid)
        pb.setPhysicsEngineParameter(fixedTimeStep=self.dt_physics, physicsClientId=cid)
        self._table = pb.loadURDF("table/table.urdf", [0.4, 0.0, -TABLE_TOP_Z_IN_URDF], useFixedBase=True,
                                  physicsClientId=cid)
        self._robot = self._load_panda(data, c["sim.collision_visuals"])
        # The same arm alone in a second physics server: forward kinematics of an IK answer without
        # touching the simulated one (pybullet has no FK function).
        self._kin_cid = pb.connect(pb.DIRECT)
        if self._kin_cid < 0:  # pb.error: __init__ then closes the main server too
            raise pb.error("pybullet could not start the kinematics DIRECT physics server")
        self._kin_robot = pb.loadURDF(os.path.join(data, PANDA_URDF), useFixedBase=True,
                                      physicsClientId=self._kin_cid)
        limits = [pb.getJointInfo(self._robot, j, physicsClientId=cid)[8:10] for j in ARM_JOINTS + FINGER_JOINTS]
        self._lower = [float(lo) for lo, _ in limits]
        self._upper = [float(hi) for _, hi in limits]
        self._ranges = [hi - lo for lo, hi in zip(self._lower, self._upper, strict=True)]
        self._rest = [*REST_POSE, FINGER_TRAVEL_M, FINGER_TRAVEL_M]
        for j in FINGER_JOINTS:
            pb.changeDynamics(self._robot, j, lateralFriction=c["sim.finger_friction"], spinningFriction=0.01,
                              frictionAnchor=True, physicsClientId=cid)
        self._tray = pb.loadURDF("tray/traybox.urdf", [*NOMINAL_XY["tray"], 0.0], useFixedBase=True,
                                 globalScaling=TRAY_URDF_SCALE, physicsClientId=cid)
        pb.changeVisualShape(self._tray, -1, rgbaColor=TRAY_COLOR, physicsClientId=cid)
        self._cubes: dict[str, int] = {}
        scale = c["sim.cube_size"] / 0.05  # cube_small.urdf is 0.05 m
        for name in c["sim.objects"]:
            body = pb.loadURDF("cube_small.urdf", [*NOMINAL_XY[name], 0.5 * c["sim.cube_size"]],
                               globalScaling=scale, physicsClientId=cid)
            pb.changeVisualShape(body, -1, rgbaColor=CUBE_COLORS[name], physicsClientId=cid)
            pb.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.01, rollingFriction=0.001,
                              physicsClientId=cid)
            self._cubes[name] = body
        self._distractors: list[int] = []
        for i in range(c["sim.distractors"]):
            urdf, shape_scale = DISTRACTOR_SHAPES[i % len(DISTRACTOR_SHAPES)]
            body = pb.loadURDF(urdf, [0.0, 0.0, -1.0], globalScaling=shape_scale, physicsClientId=cid)
            pb.changeDynamics(body, -1, lateralFriction=1.0, spinningFriction=0.01, rollingFriction=0.01,
                              physicsClientId=cid)
            self._distractors.append(body)
        self._light_args: dict[str, Any] = {}  # extra getCameraImage lighting arguments (sim.lighting_jitter)

    def _load_panda(self, data: str, collision_visuals: bool) -> int:
        path = os.path.join(data, PANDA_URDF)
        if not collision_visuals:
            return pb.loadURDF(path, useFixedBase=True, physicsClientId=self._cid)
        # A URDF copy whose visual meshes are the collision meshes: far fewer triangles for
        # TinyRenderer. Absolute mesh paths because the copy lives in a temporary directory.
        with open(path, encoding="utf-8") as f:
            text = f.read()
        mesh_dir = os.path.join(data, "franka_panda", "meshes")
        text = text.replace("package://meshes/visual/", "package://meshes/collision/")
        text = text.replace("package://meshes/", mesh_dir + os.sep)
        with tempfile.TemporaryDirectory(prefix="rt2_ros_sim_") as tmp:
            tmp_path = os.path.join(tmp, "panda_collision_visuals.urdf")
            with open(tmp_path, "w", encoding="utf-8") as f:
                f.write(text)
            return pb.loadURDF(tmp_path, useFixedBase=True, physicsClientId=self._cid)

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int | None = None) -> None:
        """Home the arm (gripper open), place objects with seeded jitter, clear commands."""
        cid, c = self._cid, self.config
        rng = np.random.default_rng(seed)
        self._release()
        for j, q in zip(ARM_JOINTS, REST_POSE, strict=True):
            pb.resetJointState(self._robot, j, q, 0.0, physicsClientId=cid)
        for j in FINGER_JOINTS:
            pb.resetJointState(self._robot, j, FINGER_TRAVEL_M, 0.0, physicsClientId=cid)
        home = np.clip(np.asarray(c["sim.home_position"], dtype=np.float64), self._ws_min, self._ws_max)
        down = np.asarray(DOWN_QUAT_WXYZ, dtype=np.float64)
        for _ in range(10):  # converge IK from the rest pose, then teleport the joints there
            q = self._solve_ik(home, down)
            for j, qj in zip(ARM_JOINTS, q, strict=True):
                pb.resetJointState(self._robot, j, qj, 0.0, physicsClientId=cid)
        tray_xy, cube_poses, distractor_poses = self._placement(rng)
        pb.resetBasePositionAndOrientation(self._tray, [*tray_xy, 0.0], [0, 0, 0, 1], physicsClientId=cid)
        half = 0.5 * c["sim.cube_size"]
        bodies = [*self._cubes.values(), *self._distractors]
        for body, (xy, yaw) in zip(bodies, [*cube_poses, *distractor_poses], strict=True):
            z = half if body in self._cubes.values() else 0.0
            pb.resetBasePositionAndOrientation(body, [*xy, z], pb.getQuaternionFromEuler([0, 0, yaw]),
                                               physicsClientId=cid)
            pb.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0], physicsClientId=cid)
        for body in self._distractors:  # rest them on the table whatever their shape
            lo, _ = pb.getAABB(body, physicsClientId=cid)
            pos, orn = pb.getBasePositionAndOrientation(body, physicsClientId=cid)
            pb.resetBasePositionAndOrientation(body, [pos[0], pos[1], pos[2] - lo[2] + 0.001], orn,
                                               physicsClientId=cid)
        self._randomise_appearance(seed)
        self._target_pos = home.copy()
        self._target_quat = down.copy()
        self._reachable_pos, self._reachable_quat = home.copy(), down.copy()
        self._gripper_cmd = 0.0
        self._last_command_applied = True
        self._send_arm_targets(self._solve_ik(self._target_pos, self._target_quat))
        self._send_gripper_targets()
        self.time_s = 0.0
        self._pending_s = 0.0
        self.step(0.1)  # let contacts settle

    def _placement(self, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[np.ndarray, float]],
                                                             list[tuple[np.ndarray, float]]]:
        """Tray (x, y), then (x, y, yaw) of each cube and each distractor, drawn from ``rng``.

        ``nominal`` draws exactly as before these options existed (tray, then each cube's x, y and
        yaw), so a seed gives the same scene it always gave; distractors are drawn after that.
        """
        c = self.config
        yaw_jitter = c["sim.object_yaw_jitter_rad"]
        if c["sim.placement"] == "nominal":
            jitter = c["sim.object_jitter_m"]
            tray_xy = np.asarray(NOMINAL_XY["tray"]) + rng.uniform(-0.5 * jitter, 0.5 * jitter, 2)
            cubes = []
            for name in self._cubes:
                xy = np.asarray(NOMINAL_XY[name]) + rng.uniform(-jitter, jitter, 2)
                cubes.append((xy, float(rng.uniform(-yaw_jitter, yaw_jitter))))
            area = (np.asarray(c["sim.workspace_min"][:2]), np.asarray(c["sim.workspace_max"][:2]))
        else:
            area = (np.asarray(c["sim.placement_min"]), np.asarray(c["sim.placement_max"]))
            margin = TRAY_HALF_INNER_M + 0.02  # the walls stand just outside the inner half width
            lo, hi = area[0] + margin, area[1] - margin
            if np.any(lo > hi):
                raise SimError(f"sim.placement_min {area[0].tolist()} .. sim.placement_max {area[1].tolist()} "
                               f"is too small for the {2 * margin:.2f} m tray")
            tray_xy = rng.uniform(lo, hi)
            spots = self._free_spots(rng, tray_xy, [], len(self._cubes), *area)
            cubes = [(xy, float(rng.uniform(-yaw_jitter, yaw_jitter))) for xy in spots]
        spots = self._free_spots(rng, tray_xy, [xy for xy, _ in cubes], len(self._distractors), *area)
        distractors = [(xy, float(rng.uniform(-math.pi, math.pi))) for xy in spots]
        return tray_xy, cubes, distractors

    def _free_spots(self, rng: np.random.Generator, tray_xy: np.ndarray, taken: list[np.ndarray], count: int,
                    lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
        """``count`` table spots in ``lo..hi`` at least sim.min_object_spacing_m from each other, from the
        ``taken`` spots and from the tray's walls (rejection sampling)."""
        spacing = self.config["sim.min_object_spacing_m"]
        keep_out = TRAY_HALF_INNER_M + spacing
        out: list[np.ndarray] = []
        for _ in range(count):
            for _attempt in range(1000):
                xy = rng.uniform(lo, hi)
                clear_of_tray = bool(np.any(np.abs(xy - tray_xy) > keep_out))
                if clear_of_tray and all(np.linalg.norm(xy - o) >= spacing for o in [*taken, *out]):
                    out.append(xy)
                    break
            else:
                raise SimError(f"cannot place {count} objects {spacing} m apart (sim.min_object_spacing_m) "
                               f"beside the tray in {lo.tolist()} .. {hi.tolist()} (sim.placement_min/max); "
                               f"enlarge the area or place fewer objects")
        return out

    def _randomise_appearance(self, seed: int | None) -> None:
        """Colours (sim.color_jitter), distractor colours and lighting (sim.lighting_jitter), from a stream
        of their own so that turning them on never moves an object."""
        c, cid = self.config, self._cid
        rng = np.random.default_rng(None if seed is None else [abs(int(seed)), 7])
        j = c["sim.color_jitter"]
        for name, body in self._cubes.items():
            pb.changeVisualShape(body, -1, rgbaColor=_jittered(CUBE_COLORS[name], j, rng), physicsClientId=cid)
        pb.changeVisualShape(self._tray, -1, rgbaColor=_jittered(TRAY_COLOR, j, rng), physicsClientId=cid)
        if j > 0:
            grey = rng.uniform(0.55, 1.0)
            tint = (grey, grey * rng.uniform(0.85, 1.0), grey * rng.uniform(0.7, 1.0), 1.0)
            pb.changeVisualShape(self._table, -1, rgbaColor=tint, physicsClientId=cid)
        for body in self._distractors:
            rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, DISTRACTOR_MAX_SATURATION),
                                      rng.uniform(0.15, 0.95))
            pb.changeVisualShape(body, -1, rgbaColor=(*rgb, 1.0), textureUniqueId=-1, physicsClientId=cid)
        light = c["sim.lighting_jitter"]
        self._light_args = {}
        if light > 0:
            tilt = rng.uniform(0.0, math.radians(60.0) * light)
            azimuth = rng.uniform(-math.pi, math.pi)
            direction = [math.sin(tilt) * math.cos(azimuth), math.sin(tilt) * math.sin(azimuth), math.cos(tilt)]
            # dimmer than -25 % the darkest shades leave the embedded policy's yellow range (V >= 80)
            ambient, diffuse, specular = (k * rng.uniform(1 - 0.25 * light, 1 + 0.4 * light)
                                          for k in DEFAULT_LIGHT_COEFFS)
            self._light_args = {"lightDirection": direction, "lightAmbientCoeff": ambient,
                                "lightDiffuseCoeff": diffuse, "lightSpecularCoeff": specular}

    def distractor_positions(self) -> list[np.ndarray]:
        """Ground-truth positions of the distractor objects (base frame, m)."""
        return [self._body_position(body) for body in self._distractors]

    def move_object(self, name: str, xy: Sequence[float]) -> None:
        """Put cube ``name`` down at table position ``xy`` (base frame, m), at rest: a perturbation for
        demonstrations (an object nudged or dropped). Releases grasp assist's hold on it."""
        if name not in self._cubes:
            raise KeyError(f"unknown cube {name!r}; known: {sorted(self._cubes)}")
        if self._held == name:
            self._release()
        body = self._cubes[name]
        _, orn = pb.getBasePositionAndOrientation(body, physicsClientId=self._cid)
        pb.resetBasePositionAndOrientation(body, [float(xy[0]), float(xy[1]), 0.5 * self.config["sim.cube_size"]],
                                           orn, physicsClientId=self._cid)
        pb.resetBaseVelocity(body, [0, 0, 0], [0, 0, 0], physicsClientId=self._cid)

    # ------------------------------------------------------------------ commands
    def apply_twist(self, linear: Sequence[float], angular: Sequence[float], stamp_age_s: float, dt: float) -> bool:
        """Integrate an end-effector twist (base frame; m/s, rad/s) over ``dt`` seconds on the commanded pose.

        Returns False (and changes nothing: the arm holds) when the command is stale, i.e.
        ``stamp_age_s`` exceeds ``sim.command_timeout_s`` or lies that far in the future.
        Raises SimCommandError for NaN/inf or wrongly shaped input (also without moving).
        """
        v = _vector(linear, "linear")
        w = _vector(angular, "angular")
        if not (math.isfinite(stamp_age_s) and math.isfinite(dt)) or dt < 0:
            raise SimCommandError(f"stamp_age_s={stamp_age_s} and dt={dt} must be finite, dt >= 0; command ignored")
        timeout = self.config["sim.command_timeout_s"]
        if abs(stamp_age_s) > timeout:
            self._last_command_applied = False
            return False
        v = _clip_norm(v, self.config["sim.max_linear_speed"])
        w = _clip_norm(w, self.config["sim.max_angular_speed"])
        self._target_pos = np.clip(self._target_pos + v * dt, self._ws_min, self._ws_max)
        angle = float(np.linalg.norm(w)) * dt
        if angle > 1e-12:  # base-frame angular velocity: left-multiply the rotation
            delta = tax.axangle2mat(w / np.linalg.norm(w), angle)
            self._target_quat = tq.mat2quat(delta @ tq.quat2mat(self._target_quat))
        self._limit_command_lead()
        q = self._solve_ik(self._target_pos, self._target_quat)
        if self._reaches(q, self._target_pos, self._target_quat):
            self._send_arm_targets(q)
            self._reachable_pos, self._reachable_quat = self._target_pos.copy(), self._target_quat.copy()
        else:  # halt: keep the joint targets and go back to the last pose the arm could take
            self._target_pos, self._target_quat = self._reachable_pos.copy(), self._reachable_quat.copy()
        self._last_command_applied = True
        return True

    def set_ee_target(self, position: Sequence[float], orientation_wxyz: Sequence[float] | None = None) -> np.ndarray:
        """Command an absolute end-effector pose (PoseStamped-style); returns the clamped position used."""
        pos = _vector(position, "position")
        if orientation_wxyz is not None:
            quat = np.asarray(orientation_wxyz, dtype=np.float64).reshape(4)
            if not np.all(np.isfinite(quat)) or np.linalg.norm(quat) < 1e-6:
                raise SimCommandError(f"orientation {quat} is not a valid quaternion (w, x, y, z); command ignored")
            self._target_quat = quat / np.linalg.norm(quat)
        self._target_pos = np.clip(pos, self._ws_min, self._ws_max)
        self._send_arm_targets(self._solve_ik(self._target_pos, self._target_quat))
        return self._target_pos.copy()

    def set_gripper(self, closedness: float) -> None:
        """Command the gripper: 0 = fully open (0.08 m between fingers), 1 = fully closed."""
        value = float(closedness)
        if not math.isfinite(value):
            raise SimCommandError(f"gripper closedness {closedness!r} is not finite; command ignored")
        self._gripper_cmd = min(1.0, max(0.0, value))
        self._send_gripper_targets()
        if self._gripper_cmd < 0.5:
            self._release()

    def step(self, dt: float) -> int:
        """Advance physics by ``dt`` seconds; returns the number of physics steps taken.

        Whole physics steps are taken and the remainder is carried over to the next call, so
        simulated time tracks the sum of the ``dt`` values exactly (a 30 Hz caller gets 240 Hz
        physics as 8 steps per call; a faster caller sometimes gets none).
        """
        if not (math.isfinite(dt) and dt >= 0):
            raise SimCommandError(f"step dt={dt} must be finite and >= 0")
        self._pending_s += dt
        n = math.floor(self._pending_s / self.dt_physics + 1e-9)
        self._pending_s = max(0.0, self._pending_s - n * self.dt_physics)
        for _ in range(n):
            pb.stepSimulation(physicsClientId=self._cid)
        self.time_s += n * self.dt_physics
        if n and self.config["sim.grasp_assist"] and self._gripper_cmd >= 0.5 and self._grasp_cid is None:
            self._try_attach()
        return n

    # ------------------------------------------------------------------ state
    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Measured grasp-frame pose: position (3,) m and quaternion (w, x, y, z), base frame."""
        state = pb.getLinkState(self._robot, EE_LINK, computeForwardKinematics=True, physicsClientId=self._cid)
        return np.asarray(state[4], dtype=np.float64), _wxyz(state[5])

    def commanded_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """The integrated commanded grasp-frame pose (what the arm is servoing to)."""
        return self._target_pos.copy(), self._target_quat.copy()

    def joint_state(self) -> JointState:
        """Names, positions and velocities of the 7 arm joints and the 2 finger joints."""
        states = pb.getJointStates(self._robot, ARM_JOINTS + FINGER_JOINTS, physicsClientId=self._cid)
        return JointState(JOINT_NAMES, np.array([s[0] for s in states]), np.array([s[1] for s in states]))

    def gripper_closedness(self) -> float:
        """Measured closedness 0..1 from the finger positions."""
        states = pb.getJointStates(self._robot, FINGER_JOINTS, physicsClientId=self._cid)
        opening = sum(s[0] for s in states) / (2 * FINGER_TRAVEL_M)
        return float(min(1.0, max(0.0, 1.0 - opening)))

    @property
    def gripper_command(self) -> float:
        return self._gripper_cmd

    @property
    def object_names(self) -> tuple[str, ...]:
        return (*self._cubes, "tray")

    def object_positions(self) -> dict[str, np.ndarray]:
        """Ground-truth object positions (base frame, m): cube centres and the tray's floor centre."""
        out = {name: self._body_position(body) for name, body in self._cubes.items()}
        out["tray"] = self._body_position(self._tray)
        return out

    def is_in_tray(self, name: str) -> bool:
        """True if cube ``name`` lies inside the tray's walls and below its rim (ground truth)."""
        if name not in self._cubes:
            raise KeyError(f"unknown cube {name!r}; known: {sorted(self._cubes)}")
        cube, tray = self._body_position(self._cubes[name]), self._body_position(self._tray)
        inside_xy = bool(np.all(np.abs(cube[:2] - tray[:2]) < TRAY_HALF_INNER_M))
        return inside_xy and -0.01 < cube[2] < TRAY_RIM_Z_M

    def held_object(self) -> str | None:
        """The cube attached by grasp assist, if any."""
        return self._held

    def last_command_applied(self) -> bool:
        """False if the most recent twist was dropped as stale."""
        return self._last_command_applied

    def wrist_camera(self) -> PinholeCamera:
        """The wrist camera as it is now: intrinsics from ``sim.wrist_camera_*``, pose from the measured hand pose."""
        c, (mount_pos, mount_quat) = self.config, self._wrist_mount
        hand = pb.getLinkState(self._robot, HAND_LINK, computeForwardKinematics=True, physicsClientId=self._cid)
        hand_pos, hand_quat = np.asarray(hand[4], dtype=np.float64), _wxyz(hand[5])
        width, height = c["sim.wrist_camera_width"], c["sim.wrist_camera_height"]
        f = focal_from_fov(height, c["sim.wrist_camera_fov"])
        return PinholeCamera(width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0,
                             hand_pos + tq.quat2mat(hand_quat) @ mount_pos, tq.qmult(hand_quat, mount_quat))

    def render(self, width: int | None = None, height: int | None = None, *, camera: str = "main") -> np.ndarray:
        """An RGB uint8 (H, W, 3) image from the fixed (``"main"``) or the ``"wrist"`` camera, intrinsics
        scaled to the size asked for (default: the camera's configured size)."""
        cam, near = self._camera_at(camera, width, height)
        _, _, rgba, _, _ = pb.getCameraImage(cam.width, cam.height, cam.opengl_view_matrix(),
                                             cam.opengl_projection_matrix(near=near), renderer=pb.ER_TINY_RENDERER,
                                             physicsClientId=self._cid, **self._light_args)
        return np.ascontiguousarray(np.reshape(np.asarray(rgba, dtype=np.uint8), (cam.height, cam.width, 4))[:, :, :3])

    def segmentation(self, width: int | None = None, height: int | None = None, *,
                     camera: str = "main") -> dict[str, np.ndarray]:
        """Ground-truth boolean masks per object name (for tests and evaluation, not for policies)."""
        cam, near = self._camera_at(camera, width, height)
        *_, seg = pb.getCameraImage(cam.width, cam.height, cam.opengl_view_matrix(),
                                    cam.opengl_projection_matrix(near=near), renderer=pb.ER_TINY_RENDERER,
                                    physicsClientId=self._cid)
        seg = np.reshape(np.asarray(seg), (cam.height, cam.width))
        bodies = {**self._cubes, "tray": self._tray}
        return {name: seg == body for name, body in bodies.items()}

    def _camera_at(self, camera: str, width: int | None, height: int | None) -> tuple[PinholeCamera, float]:
        """The named camera at the size asked for, and its near clipping distance (m)."""
        if camera == "main":
            cam, near = self.camera, 0.05
        elif camera == "wrist":
            cam, near = self.wrist_camera(), WRIST_CAMERA_NEAR_M
        else:
            raise ValueError(f"unknown camera {camera!r}; known: {', '.join(CAMERAS)}")
        return cam.scaled(width or cam.width, height or cam.height), near

    def close(self) -> None:
        """Disconnect the physics server (idempotent)."""
        for attr in ("_kin_cid", "_cid"):
            if getattr(self, attr, -1) >= 0:
                with contextlib.suppress(pb.error):  # already gone (e.g. interpreter shutdown)
                    pb.disconnect(physicsClientId=getattr(self, attr))
                setattr(self, attr, -1)

    def __enter__(self) -> TabletopSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _body_position(self, body: int) -> np.ndarray:
        return np.asarray(pb.getBasePositionAndOrientation(body, physicsClientId=self._cid)[0], dtype=np.float64)

    def _limit_command_lead(self) -> None:
        """Pull the commanded pose back to within sim.max_command_lead_m / _rad of the measured pose."""
        p, q = self.ee_pose()
        lead = self._target_pos - p
        dist = float(np.linalg.norm(lead))
        if dist > self.config["sim.max_command_lead_m"]:
            self._target_pos = np.clip(p + lead * (self.config["sim.max_command_lead_m"] / dist),
                                       self._ws_min, self._ws_max)
        axis, angle = _rotation_between(q, self._target_quat)
        if angle > self.config["sim.max_command_lead_rad"]:
            self._target_quat = tq.qmult(tq.axangle2quat(axis, self.config["sim.max_command_lead_rad"]), q)

    def _reaches(self, q: list[float], position: np.ndarray, quat_wxyz: np.ndarray) -> bool:
        """Whether joint positions ``q`` put the grasp frame within sim.ik_tolerance_* of the pose."""
        for j, qj in zip(ARM_JOINTS, q, strict=True):
            pb.resetJointState(self._kin_robot, j, qj, physicsClientId=self._kin_cid)
        state = pb.getLinkState(self._kin_robot, EE_LINK, computeForwardKinematics=True,
                                physicsClientId=self._kin_cid)
        if np.linalg.norm(np.asarray(state[4]) - position) > self.config["sim.ik_tolerance_m"]:
            return False
        return _rotation_between(_wxyz(state[5]), quat_wxyz)[1] <= self.config["sim.ik_tolerance_rad"]

    def _solve_ik(self, position: np.ndarray, quat_wxyz: np.ndarray) -> list[float]:
        q = pb.calculateInverseKinematics(
            self._robot, EE_LINK, [float(x) for x in position], _xyzw(quat_wxyz),
            lowerLimits=self._lower, upperLimits=self._upper, jointRanges=self._ranges, restPoses=self._rest,
            maxNumIterations=100, residualThreshold=1e-5, physicsClientId=self._cid)
        arm = np.clip(np.asarray(q[:len(ARM_JOINTS)]), self._lower[:7], self._upper[:7])
        return [float(x) for x in arm]

    def _send_arm_targets(self, q: list[float]) -> None:
        pb.setJointMotorControlArray(self._robot, ARM_JOINTS, pb.POSITION_CONTROL, targetPositions=q,
                                     forces=ARM_FORCES_N, physicsClientId=self._cid)

    def _send_gripper_targets(self) -> None:
        opening = FINGER_TRAVEL_M * (1.0 - self._gripper_cmd)
        force = self.config["sim.finger_force"]
        pb.setJointMotorControlArray(self._robot, FINGER_JOINTS, pb.POSITION_CONTROL, targetPositions=[opening] * 2,
                                     forces=[force] * 2, physicsClientId=self._cid)

    def _try_attach(self) -> None:
        cid = self._cid
        for name, body in self._cubes.items():
            touching = all(pb.getContactPoints(self._robot, body, j, -1, physicsClientId=cid) for j in FINGER_JOINTS)
            if not touching:
                continue
            hand = pb.getLinkState(self._robot, HAND_LINK, computeForwardKinematics=True, physicsClientId=cid)
            obj_pos, obj_orn = pb.getBasePositionAndOrientation(body, physicsClientId=cid)
            inv_pos, inv_orn = pb.invertTransform(hand[4], hand[5])
            rel_pos, rel_orn = pb.multiplyTransforms(inv_pos, inv_orn, obj_pos, obj_orn)
            self._grasp_cid = pb.createConstraint(self._robot, HAND_LINK, body, -1, pb.JOINT_FIXED, [0, 0, 0],
                                                  rel_pos, [0, 0, 0], rel_orn, [0, 0, 0, 1], physicsClientId=cid)
            pb.changeConstraint(self._grasp_cid, maxForce=50.0, physicsClientId=cid)
            self._held = name
            return

    def _release(self) -> None:
        if self._grasp_cid is not None:
            pb.removeConstraint(self._grasp_cid, physicsClientId=self._cid)
        self._grasp_cid = None
        self._held = None


def _wrist_mount(config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The wrist camera's optical frame in the hand frame: position (3,) m and quaternion (w, x, y, z).

    Image up is the direction from the gripper axis (hand z) towards the camera, so the fingers
    appear at the bottom; a camera on the axis takes hand +x as up.
    """
    eye = np.asarray(config["sim.wrist_camera_position"], dtype=np.float64)
    target = np.asarray(config["sim.wrist_camera_target"], dtype=np.float64)
    side = np.array([eye[0], eye[1], 0.0])
    up = side / np.linalg.norm(side) if np.linalg.norm(side) > 1e-6 else np.array([1.0, 0.0, 0.0])
    try:
        return eye, look_at(eye, target, up)
    except CameraError as exc:
        raise ValueError(f"sim.wrist_camera_position {eye.tolist()} / sim.wrist_camera_target {target.tolist()}: "
                         f"{exc}") from None


def _jittered(rgba: Sequence[float], amount: float, rng: np.random.Generator) -> tuple[float, ...]:
    """``rgba`` with hue shifted by up to +- 0.05 x amount of the circle and saturation and value scaled
    by 1 - amount .. 1; ``rgba`` itself (and no draws) for amount 0."""
    if amount <= 0:
        return tuple(rgba)
    h, s, v = colorsys.rgb_to_hsv(*rgba[:3])
    h = (h + rng.uniform(-0.05, 0.05) * amount) % 1.0
    s *= rng.uniform(1.0 - amount, 1.0)
    v *= rng.uniform(1.0 - amount, 1.0)
    return (*colorsys.hsv_to_rgb(h, s, v), rgba[3])


def _rotation_between(q_from: np.ndarray, q_to: np.ndarray) -> tuple[np.ndarray, float]:
    """Axis and angle (0..pi, the shorter way round) of the base-frame rotation taking q_from to q_to (w, x, y, z)."""
    axis, angle = tq.quat2axangle(tq.qmult(q_to, tq.qinverse(q_from)))
    return (-axis, 2 * math.pi - angle) if angle > math.pi else (axis, angle)


def _clip_norm(vec: np.ndarray, limit: float) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec if norm <= limit or norm == 0.0 else vec * (limit / norm)


__all__ = ["CUBE_COLORS", "SIM_PARAMS", "JointState", "SimCommandError", "SimError", "TabletopSim"]
