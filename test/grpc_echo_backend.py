"""A deterministic test backend for rt2-serve (``--backend-class grpc_echo_backend:EchoBackend``).

It is not registered in ``rt2_ros.backends.BACKENDS``: it exists so the gRPC tests can check what
the server received (every camera's name, size, digest and stamp; every proprioception piece and
its stamp) without a model. The answer is
an RT-2 chain-of-thought text whose plan describes the observation and whose 8 action bins are
a function of the sequence id and the image, so every reply is checkable by the test.

The instruction steers it:
  ``sleep:<s>``      answer after ``s`` seconds (a slow model, for deadline tests);
  ``ids``            answer with token ids instead of text;
  ``actions``        answer with a (2, 7) continuous action chunk;
  ``fail``           raise BackendError (a model failure);
  ``budget``         answer the text ``budget <timeout_s>``: the budget rt2-serve handed the model.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import Backend, BackendError
from rt2_ros.params import ParamSpec

ECHO_MODEL = "echo-test-model"


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def expected_bins(seq: int, image: np.ndarray) -> list[int]:
    """The 8 bins the echo backend answers for observation ``seq`` (terminate bin first, always 0)."""
    base = int(image.astype(np.int64).sum() % 256)
    return [0] + [(seq * 7 + base + 31 * i) % 256 for i in range(1, 8)]


def _floats(values: object) -> str:
    """Comma-separated exact reprs (no spaces), "none" for a piece that was not sent."""
    if values is None:
        return "none"
    return ",".join(repr(float(v)) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))


def plan_text(observation: Observation) -> str:
    """Space-separated fields without spaces (the instruction last); test_grpc.plan_fields parses it."""
    img = observation.image
    cameras = ",".join(f"{name}:{frame.shape[1]}x{frame.shape[0]}:{image_digest(frame)}:"
                       f"{_floats(observation.image_stamps.get(name))}" for name, frame in observation.images.items())
    stamps = ",".join(f"{piece}={stamp!r}" for piece, stamp in observation.state_stamps.items()) or "none"
    return (f"size {img.shape[1]}x{img.shape[0]} sha {image_digest(img)} mean {img.mean():.4f} "
            f"stamp {observation.stamp!r} cameras {cameras} ee {_floats(observation.ee_position)} "
            f"quat {_floats(observation.ee_orientation)} gripper {_floats(observation.gripper)} "
            f"joints {_floats(observation.joint_positions)} fingers {_floats(observation.gripper_positions)} "
            f"stamps {stamps} instruction {observation.instruction!r}")


class EchoBackend(Backend):
    name = "echo"
    OPTIONS = (
        ParamSpec("backend.echo.model_name", "string", ECHO_MODEL, "model name reported in GetInfo"),
    )

    def __init__(self, options: dict, tokenizer: object) -> None:
        super().__init__(options, tokenizer)
        self.model_name = options["model_name"]
        self.resets = 0

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        instruction = observation.instruction
        if instruction.startswith("sleep:"):
            time.sleep(min(float(instruction.split(":", 1)[1]), 10.0))  # a slow model that ignores deadlines
        if instruction == "fail":
            raise BackendError("echo backend was told to fail")
        if instruction == "budget":
            return BackendReply(seq=observation.seq, backend=self.name, text=f"budget {timeout_s!r}")
        bins = expected_bins(observation.seq, observation.image)
        if instruction == "ids":
            return BackendReply(seq=observation.seq, backend=self.name, token_ids=tuple(32000 - b for b in bins))
        if instruction == "actions":
            chunk = np.array([[b / 255.0 for b in bins[1:]], [-b / 255.0 for b in bins[1:]]], dtype=np.float32)
            return BackendReply(seq=observation.seq, backend=self.name, actions=chunk)
        text = f"Plan: {plan_text(observation)}. Action: " + " ".join(str(b) for b in bins)
        return BackendReply(seq=observation.seq, backend=self.name, text=text)

    def reset(self) -> None:
        self.resets += 1
