"""Named cameras of the policy node, without ROS: their parameters and the rule that aligns them.

A VLA may read several cameras (openpi's LIBERO and DROID policies read a base camera and a
wrist camera). The params YAML lists them by name; the first is the *primary* camera, the
one whose frames drive the requests (one request per new primary frame):

.. code-block:: yaml

    cameras:
      names: [camera, wrist]            # [camera] is the zero-config default (topic camera/image)
      wrist:
        topic: wrist_camera/image       # default <name>/image
        transport: raw                  # raw | compressed (subscribes <topic>/compressed)
        required: true                  # false: requests go out without it when it is missing
        max_skew_s: 0.1                 # its frame's stamp within this of the primary frame's

**Alignment rule** (:func:`align`): an observation holds the newest frame of every camera. The
primary frame must be new (never sent before) and younger than its ``max_age_s``; every other
camera's newest frame must be younger than its ``max_age_s`` and stamped within ``max_skew_s`` of
the primary frame. A required camera that fails this blocks the request (counted by cause); an
optional one is left out of the observation. Rejected: waiting for a frame set with matching
stamps (hardware sync is rare on the arms users have; waiting adds latency to every step) and
interpolating images (a model must see a real frame).

ROS parameter names cannot hold a list of dicts, so each camera's options live under
``cameras.<name>.*``, declared once ``cameras.names`` is read (as backend options are).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rt2_ros.actions import DEFAULT_CAMERA
from rt2_ros.params import ConfigError, ParamSpec

CAMERA_NAMES = ParamSpec(
    "cameras.names", "string_array", [DEFAULT_CAMERA],
    "Cameras whose frames go into every observation, by name; the first is the primary camera (one request per "
    "new primary frame). Each has options cameras.<name>.*")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # usable inside a ROS parameter name and a topic name


def camera_specs(name: str) -> tuple[ParamSpec, ...]:
    """The ``cameras.<name>.*`` options of one camera."""
    p = f"cameras.{name}."
    return (
        ParamSpec(p + "topic", "string", f"{name}/image",
                  "Image topic (sensor_msgs/Image); with transport compressed the node subscribes <topic>/compressed"),
        ParamSpec(p + "transport", "string", "raw", "raw: sensor_msgs/Image on <topic>; compressed: "
                  "sensor_msgs/CompressedImage (JPEG/PNG) on <topic>/compressed", choices=("raw", "compressed")),
        ParamSpec(p + "qos", "string", "sensor_data",
                  "Subscription QoS: sensor_data (best effort, matches any publisher) or reliable (only reliable "
                  "publishers; large raw frames that best effort loses on FastDDS arrive)",
                  choices=("sensor_data", "reliable")),
        ParamSpec(p + "required", "bool", True,
                  "true: no request goes out without a fresh, aligned frame of this camera; false: the observation "
                  "leaves it out. The primary camera is always required"),
        ParamSpec(p + "max_age_s", "double", 0.0,
                  "A frame older than this (ROS now - header stamp) is never sent; 0 = policy.max_frame_age_s",
                  "s", 0.0, 10.0),
        ParamSpec(p + "max_skew_s", "double", 0.1,
                  "A frame is used only when its stamp is within this of the primary frame's stamp (not used for "
                  "the primary camera)", "s", 0.001, 10.0),
    )


#: for the parameter reference: the list, then one camera's options written with a placeholder name
DOC_SPECS: tuple[ParamSpec, ...] = (CAMERA_NAMES, *camera_specs("<name>"))


@dataclass(frozen=True)
class CameraConfig:
    name: str
    topic: str = f"{DEFAULT_CAMERA}/image"
    transport: str = "raw"
    qos: str = "sensor_data"
    required: bool = True
    max_age_s: float = 0.0  # 0 = policy.max_frame_age_s
    max_skew_s: float = 0.1

    @property
    def subscribed_topic(self) -> str:
        return self.topic if self.transport == "raw" else self.topic.rstrip("/") + "/compressed"

    def age_bound(self, default_max_age_s: float) -> float:
        return self.max_age_s or default_max_age_s


def check_names(names: list[str]) -> tuple[str, ...]:
    """``cameras.names`` validated: at least one, lowercase identifiers, no duplicates (ConfigError)."""
    if not names:
        raise ConfigError("cameras.names: at least one camera is needed (the first is the primary camera)")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise ConfigError(f"cameras.names: {bad} are not valid camera names (lowercase letters, digits, "
                          "underscores, starting with a letter)")
    if len(set(names)) != len(names):
        raise ConfigError(f"cameras.names: duplicate names in {names}")
    if "names" in names:  # its options cameras.names.* would collide with the list itself
        raise ConfigError("cameras.names: 'names' cannot be a camera name; choose another")
    return tuple(names)


def cameras_from_params(values: dict) -> tuple[CameraConfig, ...]:
    """The configured cameras, primary first, from validated ``cameras.*`` parameters (ConfigError names the key)."""
    names = check_names(list(values["cameras.names"]))
    cams = []
    topics: dict[str, str] = {}
    for i, name in enumerate(names):
        p = f"cameras.{name}."
        cam = CameraConfig(name, values[p + "topic"].strip(), values[p + "transport"], values[p + "qos"],
                           values[p + "required"], values[p + "max_age_s"], values[p + "max_skew_s"])
        if not cam.topic:
            raise ConfigError(f"{p}topic: must not be empty")
        if i == 0 and not cam.required:
            raise ConfigError(f"{p}required: {name} is the primary camera (first in cameras.names) and is "
                              "always required; make another camera primary or set it to true")
        if cam.subscribed_topic in topics:
            raise ConfigError(f"{p}topic: cameras {topics[cam.subscribed_topic]} and {name} both subscribe "
                              f"{cam.subscribed_topic}")
        topics[cam.subscribed_topic] = name
        cams.append(cam)
    return tuple(cams)


@dataclass(frozen=True)
class FrameInfo:
    """What :func:`align` needs to know about a camera's newest frame."""

    stamp: float  # ROS time of the frame, s
    age_s: float  # ROS now - stamp, s


def align(cameras: tuple[CameraConfig, ...], frames: dict[str, FrameInfo], default_max_age_s: float
          ) -> tuple[list[str], str]:
    """The cameras to put into an observation, or why none may go out (module docstring: alignment rule).

    ``frames`` holds the newest frame of each camera that has one; the primary camera's frame is
    assumed new and fresh (the caller checked). Returns (cameras to send, primary first; "") or
    ([], "<cause>_<camera>") with cause missing / stale / skewed for a required camera.
    """
    primary = frames[cameras[0].name]
    chosen = [cameras[0].name]
    for cam in cameras[1:]:
        frame = frames.get(cam.name)
        if frame is None:
            cause = "missing"
        elif frame.age_s > cam.age_bound(default_max_age_s):
            cause = "stale"
        elif abs(frame.stamp - primary.stamp) > cam.max_skew_s:
            cause = "skewed"
        else:
            chosen.append(cam.name)
            continue
        if cam.required:
            return [], f"{cause}_{cam.name}"
    return chosen, ""


__all__ = ["CAMERA_NAMES", "CameraConfig", "FrameInfo", "align", "camera_specs", "cameras_from_params",
           "check_names"]
