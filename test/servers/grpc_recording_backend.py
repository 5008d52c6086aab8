"""A backend for ``rt2-serve`` that records what the gRPC server decoded (the matrix test's gRPC peer).

``rt2-serve --backend-class grpc_recording_backend:RecordingBackend --params <file>`` (this
directory on PYTHONPATH) hosts it behind the real gRPC server, so the robot side talks to the
real protocol v2 server code; this backend sees the :class:`~rt2_ros.actions.Observation` the
server decoded from the wire and appends one JSON line per request to ``backend.recorder.log``:
every camera by name (shape, dtype, centre pixel, stamp), the primary camera, every
proprioception piece and which stamps came with them, the instruction.

The cameras a model needs are checked by the server itself (``rt2-serve --cameras camera,wrist``
refuses an observation without one of them). It answers ``backend.recorder.answer`` (RT-2
number text, +x by default) so the safety node has an action to accept. Not registered in
``rt2_ros.backends.BACKENDS``: a test peer, not a model.
"""

from __future__ import annotations

import json

import numpy as np

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import Backend
from rt2_ros.params import ParamSpec

_P = "backend.recorder."
MOVE_X = "0 160 128 128 128 128 128 0"  # rt2 profile: +x, gripper open


def _vector(value: object) -> list[float] | None:
    return None if value is None else [round(float(v), 6) for v in np.asarray(value).reshape(-1)]


def summarise(observation: Observation) -> dict:
    """What the server decoded, as JSON-able values."""
    images = getattr(observation, "images", None) or {"camera": observation.image}
    stamps = getattr(observation, "image_stamps", {}) or {}
    cameras = {name: {"shape": list(img.shape), "dtype": str(img.dtype),
                      "centre": img[img.shape[0] // 2, img.shape[1] // 2].tolist(),
                      "stamp": stamps.get(name)}
               for name, img in images.items()}
    gripper = observation.gripper
    return {
        "seq": observation.seq, "instruction": observation.instruction, "cameras": cameras,
        "primary": next(iter(images)),
        "ee_position": _vector(observation.ee_position), "ee_orientation": _vector(observation.ee_orientation),
        "gripper": None if gripper is None else round(float(gripper), 6),
        "joint_positions": _vector(getattr(observation, "joint_positions", None)),
        "gripper_positions": _vector(getattr(observation, "gripper_positions", None)),
        "state_stamps": sorted(getattr(observation, "state_stamps", {}) or {}),
    }


class RecordingBackend(Backend):
    name = "recorder"
    OPTIONS = (
        ParamSpec(_P + "log", "string", "", "JSON-lines file that gets one line per request ('' = none)"),
        ParamSpec(_P + "answer", "string", MOVE_X, "the answer to every request (number text of the profile)"),
    )

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        if self.options["log"]:
            with open(self.options["log"], "a", encoding="utf-8") as f:
                f.write(json.dumps(summarise(observation)) + "\n")
        return BackendReply(seq=observation.seq, backend=self.name, text=self.options["answer"])
