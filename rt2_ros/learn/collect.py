"""``rt2-collect``: demonstrations from the simulator with the reference policy, as a LeRobot dataset.

Why without ROS: the node pipeline runs in real time (one episode ~15 s); the same closed loop
without DDS runs as fast as the CPU renders and steps physics, in parallel processes. What it
keeps from the node pipeline is what decides the recorded tokens and the motion they cause:

* the policy answers at ``policy.execute_rate_hz`` (10 Hz, one answer per camera frame) and the
  safety filter (:class:`rt2_ros.safety.SafetyFilter`, default limits) turns each answer into
  twists at ``safety.command_rate_hz`` (30 Hz) that the simulator integrates (MoveIt Servo
  semantics, :class:`rt2_ros.sim.tabletop.TabletopSim`);
* answers are parsed and decoded by the same tokenizer (:mod:`rt2_ros.tokens`, ``rt2`` profile) as
  in the policy node, so the recorded bins are what the nodes would execute;
* success is judged as ``rt2-demo`` judges it (the named cube in the tray, or lifted).

Not modelled: the one-frame delay between a camera frame and its action on the arm (the answer is
executed right after it is computed) and DDS jitter.

Randomisation (:func:`make_scene`, deterministic per seed): 2-4 cubes of the four colours, the
target among them, tray and cubes anywhere over the reachable table area (``sim.placement:
workspace``), colour shades, 0-3 distractor objects, lighting and a camera pose jittered by a few
centimetres (the reference policy is told the jittered pose as its calibration; a learned policy
is not). Perturbations (a fraction of the episodes, ``--perturbation-rate``) make the reference
policy show recoveries while the recorded tokens stay its corrective answers:

* ``action_noise``: for 3-6 steps the *executed* action is the answer plus 1-2 cm of random
  translation; the policy is told the resulting commanded target and steers back;
* ``nudge``: while the hand descends on the target cube, the cube is pushed 8-11 cm aside (clear of
  the fingers): the grasp closes on nothing, the policy sees the empty gripper and re-approaches;
* ``drop``: just after lift-off the cube falls out of the gripper: the policy re-approaches.

Collection seeds start at 0 (``--seed``); rt2-eval's held-out seeds start at 1 000 000.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rt2_ros.learn.dataset import DatasetError, Episode, Frame, write_lerobot

INSTRUCTIONS_PLACE = (
    "pick up the {color} cube and put it in the tray",
    "put the {color} cube in the tray",
    "place the {color} block into the tray",
    "move the {color} cube to the tray",
)
INSTRUCTIONS_LIFT = ("pick up the {color} cube", "lift the {color} block")
LIFT_FRACTION = 0.2  # share of "pick it up" (no tray) instructions
PERTURBATIONS = ("action_noise", "nudge", "drop")
CAMERA_EYE_JITTER_M = 0.03  # +- per axis, main camera position
CAMERA_TARGET_JITTER_M = 0.03  # +- per axis, the point it looks at
MAX_DISTRACTORS = 3
COLOR_JITTER = 0.25  # sim.color_jitter of randomised scenes
LIGHTING_JITTER = 1.0  # sim.lighting_jitter of randomised scenes
MAX_STEPS = 300  # 30 s at 10 Hz; a pick-and-place takes ~100 steps
# The reference policy finds a 4 cm cube as a colour blob of >= backend.embedded.min_blob_area_px pixels; below
# 64 px the far cubes of a jittered, dimmed scene fall under it (measured: at 48 px it misses some seeds).
REFERENCE_MIN_IMAGE_SIZE = 64
TIMEOUT_S = 1.0  # backend.timeout_s


def _default(specs: Sequence[Any], name: str) -> Any:
    return next(s.default for s in specs if s.name == name)


def _rates() -> tuple[float, float]:
    """(policy rate, safety command rate) in Hz: the nodes' defaults (config/rt2.yaml)."""
    from rt2_ros.policy import POLICY_PARAMS
    from rt2_ros.safety import SAFETY_PARAMS

    return _default(POLICY_PARAMS, "policy.execute_rate_hz"), _default(SAFETY_PARAMS, "safety.command_rate_hz")


class CollectError(RuntimeError):
    """A user-facing problem (bad option, unusable input)."""


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of an episode (see the module docstring)."""

    kind: str  # one of PERTURBATIONS
    start_step: int  # action_noise: first noisy step
    steps: int  # action_noise: noisy steps
    magnitude_m: float  # action_noise: per-step noise; nudge / drop: displacement of the cube
    angle_rad: float  # nudge / drop: direction of the displacement (base frame, from +x)


@dataclass(frozen=True)
class Scene:
    """A randomised episode set-up: build the simulator with :meth:`build_sim`."""

    seed: int
    instruction: str
    target: str  # the named cube, e.g. "red_cube"
    sim_config: dict[str, Any]  # sim.* parameters
    reference_options: dict[str, Any]  # backend.embedded.* options (its camera calibration = the scene's camera)
    perturbation: Perturbation | None = None

    def build_sim(self):
        from rt2_ros.sim.tabletop import TabletopSim

        return TabletopSim(self.sim_config, seed=self.seed)


def make_scene(seed: int, *, randomize: bool = True, perturbation_rate: float = 0.0) -> Scene:
    """The episode set-up of ``seed`` (deterministic). ``randomize=False``: the demo's scene (four cubes at
    their nominal spots +- sim.object_jitter_m, default camera and light) with a seeded instruction.
    ``perturbation_rate``: probability that the episode gets a perturbation."""
    from rt2_ros.sim.camera import DEFAULT_CAMERA_EYE, DEFAULT_CAMERA_FOV_Y_DEG, DEFAULT_CAMERA_TARGET, PinholeCamera
    from rt2_ros.sim.tabletop import CUBE_COLORS

    if seed < 0:
        raise CollectError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= perturbation_rate <= 1.0:
        raise CollectError(f"perturbation rate must be in 0..1, got {perturbation_rate}")
    rng = np.random.default_rng([seed, 16])
    colors = [name.removesuffix("_cube") for name in CUBE_COLORS]
    if randomize:
        present = sorted(rng.choice(len(colors), size=int(rng.integers(2, len(colors) + 1)), replace=False))
        objects = [f"{colors[i]}_cube" for i in present]
    else:
        objects = list(CUBE_COLORS)
    target = str(objects[int(rng.integers(len(objects)))])
    color = target.removesuffix("_cube")
    templates = INSTRUCTIONS_LIFT if rng.random() < LIFT_FRACTION else INSTRUCTIONS_PLACE
    instruction = templates[int(rng.integers(len(templates)))].format(color=color)
    sim_config: dict[str, Any] = {"sim.objects": objects}
    reference: dict[str, Any] = {}
    if randomize:
        eye = np.asarray(DEFAULT_CAMERA_EYE) + rng.uniform(-CAMERA_EYE_JITTER_M, CAMERA_EYE_JITTER_M, 3)
        look = np.asarray(DEFAULT_CAMERA_TARGET) + rng.uniform(-CAMERA_TARGET_JITTER_M, CAMERA_TARGET_JITTER_M, 3)
        cam = PinholeCamera.from_look_at(224, 224, DEFAULT_CAMERA_FOV_Y_DEG, eye, look)
        pose = {"camera_position": [float(x) for x in cam.position],
                "camera_orientation": [float(x) for x in cam.orientation]}
        sim_config.update({"sim.placement": "workspace", "sim.color_jitter": COLOR_JITTER,
                           "sim.lighting_jitter": LIGHTING_JITTER,
                           "sim.distractors": int(rng.integers(0, MAX_DISTRACTORS + 1)),
                           **{f"sim.{k}": v for k, v in pose.items()}})
        reference.update(pose)
    perturbation = None
    if rng.random() < perturbation_rate:
        kind = PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]
        if kind == "action_noise":
            perturbation = Perturbation(kind, int(rng.integers(5, 40)), int(rng.integers(3, 7)),
                                        float(rng.uniform(0.01, 0.02)), 0.0)
        else:
            perturbation = Perturbation(kind, 0, 0, float(rng.uniform(0.08, 0.11) if kind == "nudge"
                                                          else rng.uniform(0.0, 0.03)),
                                        float(rng.uniform(-math.pi, math.pi)))
    return Scene(seed, instruction, target, sim_config, reference, perturbation)


def reference_policy(scene: Scene | None = None, tokenizer=None):
    """The embedded reference policy, calibrated to ``scene``'s camera (default: the default camera)."""
    from rt2_ros.backends import create_backend
    from rt2_ros.tokens import ActionTokenizer

    return create_backend("embedded", dict(scene.reference_options) if scene else {},
                          tokenizer or ActionTokenizer.from_profile("rt2"))


def _reply_bins(tokenizer, reply) -> np.ndarray:
    """The bins of a reply as the policy node parses them (text or token ids)."""
    if reply.text is not None:
        return tokenizer.parse_text(reply.text).bins
    if reply.token_ids is not None:
        return tokenizer.bins_from_ids(reply.token_ids)
    raise CollectError(f"backend {reply.backend!r} answered with continuous actions: no tokens to record")


@dataclass
class _Perturber:
    """Applies a scene's perturbation once its trigger condition holds (simulator ground truth)."""

    scene: Scene
    rng: np.random.Generator
    applied: bool = False

    def noise(self, step: int) -> np.ndarray | None:
        """The translation noise for this step's executed action, or None."""
        p = self.scene.perturbation
        if p is None or p.kind != "action_noise" or not p.start_step <= step < p.start_step + p.steps:
            return None
        self.applied = True
        direction = self.rng.normal(size=3)
        direction[2] *= 0.5  # mostly sideways: the policy never digs into the table because of it
        return p.magnitude_m * direction / max(np.linalg.norm(direction), 1e-9)

    def maybe_move_object(self, sim) -> None:
        """nudge / drop: move the target cube once its trigger holds."""
        p = self.scene.perturbation
        if p is None or self.applied or p.kind not in ("nudge", "drop"):
            return
        cube = sim.object_positions()[self.scene.target]
        ee, _ = sim.ee_pose()
        if p.kind == "nudge":
            descending = np.linalg.norm(ee[:2] - cube[:2]) < 0.03 and ee[2] < 0.10 and sim.gripper_command < 0.5
            if not descending:
                return
        elif not (cube[2] > 0.06 and sim.gripper_command >= 0.5 and not sim.is_in_tray(self.scene.target)):
            return
        xy = self._free_spot(sim, cube[:2], p)
        if xy is not None:
            sim.move_object(self.scene.target, xy)
            self.applied = True

    def _free_spot(self, sim, origin: np.ndarray, p: Perturbation) -> np.ndarray | None:
        """``origin`` displaced by ``p`` (trying other directions if needed), on the placement area and clear of
        the tray and other objects; None if there is no such spot."""
        from rt2_ros.sim.tabletop import TRAY_HALF_INNER_M

        c = sim.config
        lo, hi = np.asarray(c["sim.placement_min"]), np.asarray(c["sim.placement_max"])
        others = [xy[:2] for name, xy in sim.object_positions().items() if name not in (self.scene.target, "tray")]
        others += [xy[:2] for xy in sim.distractor_positions()]
        tray = sim.object_positions()["tray"][:2]
        spacing = c["sim.min_object_spacing_m"]  # the placement's own rule: room for the open fingers
        for k in range(12):
            angle = p.angle_rad + k * math.pi / 6
            xy = origin + p.magnitude_m * np.array([math.cos(angle), math.sin(angle)])
            inside = bool(np.all(xy >= lo) and np.all(xy <= hi))
            clear_tray = bool(np.any(np.abs(xy - tray) > TRAY_HALF_INNER_M + spacing))
            if inside and clear_tray and all(np.linalg.norm(xy - o) >= spacing for o in others):
                return xy
        return None


def _success(sim, instruction: str) -> tuple[bool, str]:
    """rt2-demo's verdict from the simulator's ground truth."""
    from rt2_ros.demo import ObjectState, _task_success

    objects = {name: ObjectState(tuple(float(v) for v in pos), name != "tray" and sim.is_in_tray(name))
               for name, pos in sim.object_positions().items()}
    return _task_success(objects, instruction)


def run_episode(seed: int, policy=None, image_size: int = 64, *, scene: Scene | None = None,
                perturbation_rate: float = 0.0, randomize: bool = True, max_steps: int = MAX_STEPS,
                timeout_s: float = TIMEOUT_S, tokenizer=None, render_size: int | None = None) -> Episode:
    """One closed-loop episode without ROS (module docstring), recorded.

    ``policy``: anything with ``infer(Observation, timeout_s) -> BackendReply`` (a Backend); None = the
    reference policy calibrated to the scene's camera. The observation holds the main camera as
    ``camera`` and the wrist camera as ``wrist_camera``, both rendered at ``image_size`` px square, and
    the measured end-effector pose and gripper. A reply that does not parse is dropped (the arm holds,
    as in the policy node) and not recorded. ``scene``: default ``make_scene(seed, ...)``.
    ``render_size``: render both cameras at this square size and resize them to ``image_size`` with
    :func:`rt2_ros.imaging.resize` — the pixels of a node pipeline whose camera publishes ``render_size``
    frames and whose backend resizes them; None (default): render at ``image_size`` directly (~5x faster
    than 224 px, and not the same pixels as a downscaled 224 px frame).
    ``Episode.info`` holds steps, terminated, verdict, dropped replies and grasp retries.
    """
    from rt2_ros.actions import ArmAction, Observation
    from rt2_ros.backends.base import BackendError
    from rt2_ros.imaging import resize
    from rt2_ros.safety import SafetyConfig, SafetyFilter
    from rt2_ros.tokens import ActionTokenizer, TokenError

    own_policy = policy is None
    if image_size < (REFERENCE_MIN_IMAGE_SIZE if own_policy else 16):
        raise CollectError(f"image size {image_size} px is too small"
                           + (f" for the reference policy (>= {REFERENCE_MIN_IMAGE_SIZE})" if own_policy else ""))
    scene = scene or make_scene(seed, randomize=randomize, perturbation_rate=perturbation_rate)
    tokenizer = tokenizer or ActionTokenizer.from_profile("rt2")
    if own_policy:
        policy = reference_policy(scene, tokenizer)
    elif hasattr(policy, "reset"):
        policy.reset()
    policy_hz, command_hz = _rates()
    ticks = max(1, round(command_hz / policy_hz))
    dt = 1.0 / policy_hz / ticks
    perturber = _Perturber(scene, np.random.default_rng([scene.seed, 17]))
    sim = scene.build_sim()
    frames: list[Frame] = []
    dropped = 0
    terminated = False
    try:
        safety = SafetyFilter(SafetyConfig.from_params({}))
        pos, quat = sim.ee_pose()
        safety.start_episode(pos, quat, sim.gripper_closedness(), sim.time_s, pose_time=sim.time_s)
        t0 = sim.time_s
        for step in range(max_steps):
            if render_size:
                main, wrist = (resize(sim.render(render_size, render_size, camera=cam), image_size, image_size)
                               for cam in ("main", "wrist"))
            else:
                main = sim.render(image_size, image_size)
                wrist = sim.render(image_size, image_size, camera="wrist")
            pos, quat = sim.ee_pose()
            grip = sim.gripper_closedness()
            obs = Observation(main, scene.instruction, step, sim.time_s, ee_position=pos, ee_orientation=quat,
                              gripper=grip, images={"camera": main, "wrist_camera": wrist})
            try:
                reply = policy.infer(obs, timeout_s)
                bins = _reply_bins(tokenizer, reply)
                (action, *_) = tokenizer.decode_reply(reply)
            except (TokenError, BackendError, ValueError):
                dropped += 1
                action = None
            if action is not None:
                frames.append(Frame(images={"camera": main, "wrist_camera": wrist},
                                    state=np.concatenate([pos, quat, [grip]]).astype(np.float32),
                                    action_tokens=np.asarray(bins, np.int64), timestamp=sim.time_s - t0))
                noise = perturber.noise(step)
                executed = action if noise is None else ArmAction(action.translation + noise, action.rotation,
                                                                  action.gripper, action.terminate,
                                                                  action.gripper_relative, action.observation_seq)
                safety.on_action(executed, sim.time_s, observation_time=sim.time_s)
                if noise is not None and hasattr(policy, "set_commanded_target"):
                    policy.set_commanded_target(safety.target_position, safety.target_orientation)
                if action.terminate:
                    terminated = True
                    break
            for _ in range(ticks):
                pos, quat = sim.ee_pose()
                cmd = safety.tick(sim.time_s, pos, quat, pose_time=sim.time_s)
                sim.apply_twist(cmd.linear_velocity, cmd.angular_velocity, 0.0, dt)
                if cmd.gripper is not None:
                    sim.set_gripper(cmd.gripper)
                sim.step(dt)
                perturber.maybe_move_object(sim)
        sim.step(0.5)  # let a released cube come to rest before judging
        success, verdict = _success(sim, scene.instruction)
        success = success and terminated
    finally:
        sim.close()
        if own_policy:
            policy.close()
    info = {"steps": len(frames), "terminated": terminated, "verdict": verdict, "dropped_replies": dropped,
            "grasp_retries": int(getattr(policy, "grasp_retries", 0))}
    return Episode(scene.instruction, success, scene.seed, frames,
                   perturbation=scene.perturbation.kind if scene.perturbation and perturber.applied else "",
                   info=info)


# ---------------------------------------------------------------------------------------------- collection
def _worker(job: tuple[int, int, float, bool, int, int | None]) -> Episode:
    seed, image_size, perturbation_rate, randomize, max_steps, render_size = job
    return run_episode(seed, None, image_size, perturbation_rate=perturbation_rate, randomize=randomize,
                       max_steps=max_steps, render_size=render_size)


class _Progress:
    """tqdm when installed, else one status line rewritten in place."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.ok = total, 0, 0
        self.start = time.monotonic()
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="ep", desc="rt2-collect", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, episode: Episode) -> None:
        self.done += 1
        self.ok += int(episode.success)
        text = f"{self.ok}/{self.done} successful"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            print(f"\rrt2-collect: {self.done}/{self.total} episodes, {text}, {rate:.2f} ep/s", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


@dataclass
class CollectSummary:
    """What a collection run did (counted over all episodes run, written or not)."""

    episodes: int = 0
    successes: int = 0
    perturbed: int = 0
    recovered: int = 0  # perturbed and still successful
    retried: int = 0  # episodes in which the policy re-approached after a missed grasp or stalled descent
    frames: int = 0  # frames written
    written: int = 0  # episodes written
    seconds: float = 0.0
    bytes: int = 0
    processes: int = 1
    image_size: int = 0
    perturbation_rate: float = 0.0

    def add(self, ep: Episode) -> None:
        self.episodes += 1
        self.successes += int(ep.success)
        self.perturbed += int(bool(ep.perturbation))
        self.recovered += int(bool(ep.perturbation) and ep.success)
        self.retried += int(ep.info.get("grasp_retries", 0) > 0)

    def rows(self) -> list[tuple[str, str]]:
        n = max(self.episodes, 1)
        return [
            ("episodes", f"{self.episodes} (processes: {self.processes}, images: {self.image_size} px, "
                         f"perturbation rate {self.perturbation_rate:g})"),
            ("successful", f"{self.successes} ({100.0 * self.successes / n:.1f} %)"),
            ("perturbed / of which successful", f"{self.perturbed} / {self.recovered}"),
            ("episodes with a re-grasp (recovery)", f"{self.retried} ({100.0 * self.retried / n:.1f} %)"),
            ("wall time", f"{self.seconds:.1f} s: {self.episodes / max(self.seconds, 1e-9):.2f} episodes/s, "
                          f"{self.frames / max(self.seconds, 1e-9):.1f} policy steps/s"),
            ("written", f"{self.written} episodes, {self.frames} frames, {self.bytes / 1e6:.1f} MB "
                        f"({self.bytes / max(self.written, 1) / 1e3:.0f} kB/episode)"),
        ]

    def markdown(self) -> str:
        import os
        import platform

        machine = (f"{platform.node() or 'unknown host'}: {platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}")
        lines = ["| rt2-collect | |", "|---|---|", *(f"| {k} | {v} |" for k, v in self.rows())]
        return "\n".join([*lines, "", f"Machine: {machine}", ""])


def collect(out: Path, episodes: int, seed: int = 0, processes: int = 1, image_size: int = 64, *,
            perturbation_rate: float = 0.5, randomize: bool = True, max_steps: int = MAX_STEPS,
            successful_only: bool = False, overwrite: bool = False, progress: bool = True,
            summary: CollectSummary | None = None, render_size: int | None = None) -> Path:
    """Collect ``episodes`` episodes (seeds ``seed`` .. ``seed + episodes - 1``) in ``processes`` processes
    into a LeRobot dataset at ``out``. Failed episodes are kept (``success`` false) unless
    ``successful_only``."""
    if episodes < 1:
        raise CollectError(f"--episodes must be >= 1, got {episodes}")
    if processes < 1:
        raise CollectError(f"--processes must be >= 1, got {processes}")
    make_scene(seed, perturbation_rate=perturbation_rate)  # option errors here, not in a worker
    if image_size < REFERENCE_MIN_IMAGE_SIZE:
        raise CollectError(f"--image-size {image_size} is too small for the reference policy "
                           f"(>= {REFERENCE_MIN_IMAGE_SIZE} px); downscale the dataset for training instead")
    summary = summary if summary is not None else CollectSummary()
    summary.processes, summary.image_size, summary.perturbation_rate = processes, image_size, perturbation_rate
    jobs = [(s, image_size, perturbation_rate, randomize, max_steps, render_size) for s in range(seed, seed + episodes)]
    bar = _Progress(len(jobs)) if progress else None
    start = time.monotonic()

    def stream(results: Iterator[Episode]) -> Iterator[Episode]:
        for ep in results:
            summary.add(ep)
            if bar is not None:
                bar.update(ep)
            if ep.success or not successful_only:
                summary.frames += len(ep.frames)
                summary.written += 1
                yield ep

    fps, _ = _rates()
    try:
        if processes == 1:
            write_lerobot(stream(map(_worker, jobs)), out, fps, overwrite=overwrite)
        else:
            # spawn: workers start clean (no inherited pybullet or torch state); chunks of 1 keep all busy
            with multiprocessing.get_context("spawn").Pool(processes) as pool:
                write_lerobot(stream(pool.imap(_worker, jobs, chunksize=1)), out, fps, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.monotonic() - start
    summary.bytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return Path(out)


# ---------------------------------------------------------------------------------------------- CLI
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="rt2-collect",
        description="Collect demonstrations of the reference policy in the simulator (no ROS, parallel "
                    "processes) into a LeRobot dataset (v3.0 layout), or export rt2-record MCAP files to one.",
        epilog="Examples:\n  rt2-collect --out data/demos --episodes 300 --processes 2\n"
               "  rt2-collect --from-mcap run1.mcap run2.mcap --out data/robot --instruction 'pick up the red cube'\n"
               "Seeds: collection uses --seed .. --seed+N-1 (default from 0); rt2-eval's held-out seeds start at "
               "1000000.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    sim = p.add_argument_group("simulated demonstrations")
    sim.add_argument("--episodes", type=int, default=40, help="number of episodes (default: 40)")
    sim.add_argument("--seed", type=int, default=0, help="first scene seed (default: 0)")
    sim.add_argument("--processes", type=int, default=2, help="parallel worker processes (default: 2)")
    sim.add_argument("--image-size", type=int, default=64, help="square image size of both cameras, px (default: 64)")
    sim.add_argument("--render-size", type=int, default=None, metavar="PX",
                     help="render the cameras at PX and downscale to --image-size (the pixels of a node pipeline "
                          "with PX camera frames; ~3x slower); default: render at --image-size")
    sim.add_argument("--perturbation-rate", type=float, default=0.5,
                     help="share of episodes with a perturbation to recover from (default: 0.5)")
    sim.add_argument("--no-randomize", action="store_true",
                     help="the demo's fixed scene (nominal placement, default camera/light) instead of random scenes")
    sim.add_argument("--max-steps", type=int, default=MAX_STEPS,
                     help=f"policy steps per episode (default: {MAX_STEPS})")
    sim.add_argument("--successful-only", action="store_true", help="write only successful episodes")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.add_argument("--report", type=Path, default=None, metavar="FILE",
                     help="also write the run's summary (speed, success and recovery rates) as a Markdown table")
    rec = p.add_argument_group("robot recordings")
    rec.add_argument("--from-mcap", type=Path, nargs="+", metavar="FILE",
                     help="export these rt2-record MCAP files (each may hold several episodes) instead of simulating")
    rec.add_argument("--instruction", default=None,
                     help="instruction of the exported episodes when the recording has none on its topic")
    rec.add_argument("--fps", type=float, default=None,
                     help="frames per second of the export (default: the nodes' policy rate, 10)")
    rec.add_argument("--success", choices=("true", "false"), default="false",
                     help="success flag of the exported episodes (a recording does not say; default: false)")
    rec.add_argument("--resize", dest="image_size_export", type=int, default=None, metavar="PX",
                     help="resize exported camera frames to PX x PX (default: as recorded)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.from_mcap:
            from rt2_ros.learn.dataset import export_mcap

            fps = args.fps or _rates()[0]
            notes: list[str] = []
            out = export_mcap(args.from_mcap, args.out, fps=fps, instruction=args.instruction,
                              success=args.success == "true", image_size=args.image_size_export,
                              overwrite=args.overwrite, notes=notes)
            print(f"rt2-collect: exported {len(args.from_mcap)} recording(s) to {out}")
            for line in notes:
                print(f"  {line}")
            return 0
        summary = CollectSummary()
        out = collect(args.out, args.episodes, args.seed, args.processes, args.image_size,
                      perturbation_rate=args.perturbation_rate, randomize=not args.no_randomize,
                      max_steps=args.max_steps, successful_only=args.successful_only, overwrite=args.overwrite,
                      progress=not args.quiet, summary=summary, render_size=args.render_size)
    except (CollectError, DatasetError) as exc:
        print(f"rt2-collect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rt2-collect: interrupted; the dataset at --out is incomplete", file=sys.stderr)
        return 130
    print(f"rt2-collect: wrote {out}")
    report = summary.markdown()
    print(report, end="")
    if args.report:
        try:
            args.report.write_text(report, encoding="utf-8")
        except OSError as exc:
            print(f"rt2-collect: cannot write --report {args.report}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
