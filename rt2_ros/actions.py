"""Typed observations and actions shared by the core, the backends and the nodes.

Canonical units, whatever the model's convention (the tokenizer converts into these):

* translation: metres per policy step, in the robot base frame, shape (3,), float64;
* rotation: a rotation vector (axis * angle) in radians per policy step, base frame, shape (3,);
  a rotation vector rather than roll-pitch-yaw because it maps straight onto an angular
  velocity for a Twist and has no ordering convention to get wrong;
* gripper: closedness in [0, 1], 0 = fully open, 1 = fully closed; when ``gripper_relative``
  is true it is a signed change of closedness in [-1, 1] instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

#: name of the one camera of the zero-config setup (topic camera/image)
DEFAULT_CAMERA = "camera"


@dataclass(frozen=True)
class ArmAction:
    """One detokenized end-effector action (see module docstring for units)."""

    translation: np.ndarray  # (3,) m, base frame
    rotation: np.ndarray  # (3,) rad, rotation vector, base frame
    gripper: float  # closedness 0..1 (or delta -1..1 when gripper_relative)
    terminate: bool = False
    gripper_relative: bool = False
    observation_seq: int = -1  # sequence id of the observation this answers
    observation_stamp: float = float("nan")  # ROS time (s) of that observation's primary camera frame

    def __post_init__(self) -> None:
        object.__setattr__(self, "translation", np.asarray(self.translation, dtype=np.float64).reshape(3))
        object.__setattr__(self, "rotation", np.asarray(self.rotation, dtype=np.float64).reshape(3))
        object.__setattr__(self, "gripper", float(self.gripper))

    def is_finite(self) -> bool:
        return bool(np.all(np.isfinite(self.translation)) and np.all(np.isfinite(self.rotation))
                    and np.isfinite(self.gripper))

    @classmethod
    def hold(cls, observation_seq: int = -1) -> ArmAction:
        """A zero-motion action (gripper unchanged)."""
        return cls(np.zeros(3), np.zeros(3), 0.0, gripper_relative=True, observation_seq=observation_seq)


def _check_rgb(name: str, img: object) -> None:
    if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(
            f"Observation image {name!r} must be a uint8 HxWx3 RGB array, got "
            f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")


@dataclass(frozen=True)
class Observation:
    """What is sent to a VLA backend for one policy step.

    Cameras: ``images`` maps each camera's configured name (``cameras.names``) to its frame,
    primary camera first; ``image`` is the primary camera's frame (what single-image backends send)
    and ``stamp`` its ROS stamp. An optional camera whose frame was missing or stale is absent from
    ``images``. Built with only ``image``, ``images`` is ``{"camera": image}`` (the default name).

    Proprioception is optional and only ever fresh (rt2_ros.policy leaves a stale piece out);
    ``state_stamps`` holds the ROS stamp of each piece sent ("ee_pose", "gripper", "joint_positions").
    """

    image: np.ndarray  # (H, W, 3) uint8 RGB, primary camera
    instruction: str
    seq: int  # monotonically increasing per policy node
    stamp: float  # seconds (ROS time of the primary camera frame)
    # Optional proprioception: end-effector position (3,) m and quaternion (w, x, y, z).
    ee_position: np.ndarray | None = None
    ee_orientation: np.ndarray | None = None
    gripper: float | None = None  # measured closedness 0..1
    # Optional arm joint positions (rad or m) in the order of the policy node's joints.arm_names.
    joint_positions: np.ndarray | None = None
    # Optional raw gripper joint positions (m or rad) in the order of joints.gripper_names
    # (e.g. LIBERO's two Panda finger positions).
    gripper_positions: np.ndarray | None = None
    images: Mapping[str, np.ndarray] = field(default_factory=dict)  # every camera by name, primary first
    image_stamps: Mapping[str, float] = field(default_factory=dict)  # ROS stamp of each camera's frame
    state_stamps: Mapping[str, float] = field(default_factory=dict)  # ROS stamp of each proprioception piece
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rgb("image", self.image)
        if not self.images:
            object.__setattr__(self, "images", {DEFAULT_CAMERA: self.image})
        else:
            object.__setattr__(self, "images", dict(self.images))
            first = next(iter(self.images))
            if self.images[first] is not self.image:
                raise ValueError(f"Observation.images must start with the primary camera's frame (image); "
                                 f"its first camera {first!r} holds another array")
            for name, img in self.images.items():
                _check_rgb(name, img)
        if not self.image_stamps:
            object.__setattr__(self, "image_stamps", {next(iter(self.images)): self.stamp})
        object.__setattr__(self, "image_stamps", dict(self.image_stamps))
        object.__setattr__(self, "state_stamps", dict(self.state_stamps))

    @property
    def primary_camera(self) -> str:
        """Name of the primary camera (the first configured one)."""
        return next(iter(self.images))


@dataclass(frozen=True)
class BackendReply:
    """A backend's answer to one observation.

    Exactly one of ``text``, ``token_ids`` or ``actions`` carries the answer:
    * ``text``: the model's decoded answer, e.g. "1 128 91 241 5 101 127 217" or
      "Plan: pick the apple. Action: 1 128 ..." (parsed by the tokenizer);
    * ``token_ids``: raw vocabulary ids (mapped to bins by the tokenizer profile);
    * ``actions``: an already continuous action chunk, shape (horizon, dim) in the
      profile's model units (e.g. OpenVLA / openpi servers), converted by the tokenizer.
    """

    seq: int
    backend: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    actions: np.ndarray | None = None
    server_time_s: float = float("nan")  # inference time measured by the server, if known
