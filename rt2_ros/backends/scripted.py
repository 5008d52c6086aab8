"""``scripted`` backend: answers with a fixed list of model answers, for wiring checks and tests.

Before a real model drives a real arm, integrators check the wiring with known motions:
"move +x 1 cm per step, then close the gripper, then terminate". This backend replays such a
list of answers (number text as a VLA would emit, e.g. "0 140 128 128 128 128 128 255"),
optionally with a per-answer delay to rehearse latency, stalls and late replies. It goes
through exactly the same parsing, validation, safety filter and controller path as a model.
"""

from __future__ import annotations

import threading
import time

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import Backend, BackendConfigError, BackendError, BackendTimeout
from rt2_ros.params import ParamSpec


class ScriptedBackend(Backend):
    name = "scripted"
    OPTIONS = (
        ParamSpec("backend.scripted.answers", "string_array", ["0 128 128 128 128 128 128 0"],
                  "Answers replayed in order, one per request (model answer text)"),
        ParamSpec("backend.scripted.delays_s", "double_array", [0.0],
                  "Delay before each answer (cycled); a delay beyond the timeout rehearses a stall", "s", 0.0, 600.0),
        ParamSpec("backend.scripted.repeat", "bool", True,
                  "After the last answer start again (false: keep repeating the last one)"),
    )

    def __init__(self, options: dict, tokenizer) -> None:
        super().__init__(options, tokenizer)
        self._answers = list(options["answers"])
        self._delays = list(options["delays_s"]) or [0.0]
        if not self._answers:
            raise BackendConfigError("backend.scripted.answers: needs at least one answer")
        self._index = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        with self._lock:
            i = self._index
            self._index += 1
        n = len(self._answers)
        answer = self._answers[i % n] if self.options["repeat"] else self._answers[min(i, n - 1)]
        delay = self._delays[i % len(self._delays)]
        start = time.monotonic()
        if self._closed.wait(min(delay, timeout_s)):
            raise BackendError("scripted backend closed")
        if delay > timeout_s:
            raise BackendTimeout(f"scripted answer {i} delayed {delay:.2f} s > timeout {timeout_s:.2f} s")
        return BackendReply(seq=observation.seq, backend=self.name, text=answer,
                            server_time_s=time.monotonic() - start)

    def reset(self) -> None:
        with self._lock:
            self._index = 0

    def close(self) -> None:
        self._closed.set()
