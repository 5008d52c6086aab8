"""Proprioception from sensor_msgs/JointState, without ROS: joint positions and gripper closedness.

A JointState message names its joints; the policy node is configured with the arm joints whose
positions a backend may want (``joints.arm_names``, in the order the policy expects) and the
gripper joints (``joints.gripper_names``, e.g. the two Panda fingers) with the positions meaning
fully open and fully closed (``joints.gripper_open_position`` / ``joints.gripper_closed_position``,
metres for prismatic fingers, radians for revolute ones). :func:`map_joint_state` turns one
message into

* ``joint_positions``: the arm joints' positions in the configured order (rad or m, as published),
  or None when no arm joints are configured or the message carries none of them;
* ``gripper``: closedness 0..1 (0 = open, 1 = closed; see rt2_ros.actions), the mean over the
  gripper joints of ``(position - open) / (closed - open)`` clipped to [0, 1], or None when the
  message carries none of the gripper joints;
* ``gripper_positions``: the gripper joints' raw positions in the configured order (what
  LIBERO-style states carry: the two finger positions), None with ``gripper``.

Drivers may publish partial messages (one per controller: arm and gripper apart), so a message
without any joint of a group leaves that group unknown (None); a message carrying only some of a
group's joints, a NaN/inf position, a duplicate name, or names and positions of different lengths
is an error (:class:`JointStateError`, naming the joints): half a group is never mixed with
another message's half.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rt2_ros.params import ConfigError


class JointStateError(ValueError):
    """A JointState message cannot give the configured joints (missing, duplicate or non-finite)."""


@dataclass(frozen=True)
class JointConfig:
    arm_names: tuple[str, ...] = ()
    gripper_names: tuple[str, ...] = ("panda_finger_joint1", "panda_finger_joint2")
    gripper_open_position: float = 0.04
    gripper_closed_position: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "arm_names", tuple(self.arm_names))
        object.__setattr__(self, "gripper_names", tuple(self.gripper_names))
        for group, names in (("arm_names", self.arm_names), ("gripper_names", self.gripper_names)):
            if any(not n for n in names):
                raise ValueError(f"joints.{group}: empty joint name in {list(names)}")
            if len(set(names)) != len(names):
                raise ValueError(f"joints.{group}: duplicate joint names in {list(names)}")
        both = sorted(set(self.arm_names) & set(self.gripper_names))
        if both:
            raise ValueError(f"joints: {both} named as both arm and gripper joints")
        if not (math.isfinite(self.gripper_open_position) and math.isfinite(self.gripper_closed_position)):
            raise ValueError("joints.gripper_open_position / gripper_closed_position must be finite")
        if self.gripper_names and self.gripper_open_position == self.gripper_closed_position:
            raise ValueError(f"joints.gripper_open_position and joints.gripper_closed_position are both "
                             f"{self.gripper_open_position}: the gripper's closedness would be undefined")

    @classmethod
    def from_params(cls, values: dict) -> JointConfig:
        """From the policy node's validated ``joints.*`` parameters; ConfigError names the key."""
        try:
            return cls(tuple(values["joints.arm_names"]), tuple(values["joints.gripper_names"]),
                       values["joints.gripper_open_position"], values["joints.gripper_closed_position"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class JointReading:
    joint_positions: np.ndarray | None  # (len(arm_names),) float64, configured order
    gripper: float | None  # closedness 0..1
    gripper_positions: np.ndarray | None = None  # (len(gripper_names),) float64, configured order


def closedness(positions: Sequence[float], open_position: float, closed_position: float) -> float:
    """Mean closedness of gripper joints, 0 = open ... 1 = closed, clipped to [0, 1]."""
    pos = np.asarray(positions, dtype=np.float64)
    frac = (pos - open_position) / (closed_position - open_position)
    return float(np.clip(frac.mean(), 0.0, 1.0))


def _group(index: dict[str, int], positions: Sequence[float], wanted: tuple[str, ...], what: str
           ) -> np.ndarray | None:
    present = [n for n in wanted if n in index]
    if not present:
        return None
    if len(present) != len(wanted):
        missing = [n for n in wanted if n not in index]
        raise JointStateError(f"joint_states carries {what} joints {present} but not {missing}")
    values = np.array([float(positions[index[n]]) for n in wanted], dtype=np.float64)
    bad = [n for n, v in zip(wanted, values, strict=True) if not math.isfinite(v)]
    if bad:
        raise JointStateError(f"joint_states: non-finite position of {what} joints {bad}")
    return values


def map_joint_state(names: Sequence[str], positions: Sequence[float], config: JointConfig) -> JointReading:
    """The configured arm joint positions and gripper closedness in one JointState message (module docstring)."""
    names = list(names)
    if len(positions) != len(names):
        raise JointStateError(f"joint_states: {len(names)} names but {len(positions)} positions")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise JointStateError(f"joint_states: duplicate joint names {dup}")
    index = {n: i for i, n in enumerate(names)}
    arm = _group(index, positions, config.arm_names, "arm") if config.arm_names else None
    grip = _group(index, positions, config.gripper_names, "gripper") if config.gripper_names else None
    gripper = None if grip is None else closedness(grip, config.gripper_open_position, config.gripper_closed_position)
    return JointReading(arm, gripper, grip)
