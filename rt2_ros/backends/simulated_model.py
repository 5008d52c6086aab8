"""``backend.type: simulated_model`` — a model-cost simulator for serving benchmarks and fleet tests.

It stands in for a VLA whose forward pass costs ``base_s + per_item_s * batch`` seconds for a
batch of observations (the shape of a GPU forward pass: a fixed cost plus a small cost per row),
and answers every observation with the zero-motion action in the configured tokenizer's form
(number text or token ids), so the answers parse and pass the safety filter like a model's.
Without it a serving benchmark measures the model, not the server; with it, bench/fleet.py
compares how rt2-serve and rt2-fleet-serve share one model between robots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import Backend, BackendError, BackendTimeout, resolve_options
from rt2_ros.constrained import zero_motion_bins
from rt2_ros.params import ParamSpec

_P = "backend.simulated_model."


class SimulatedModelBackend(Backend):
    """Sleeps ``base_s + per_item_s * batch`` per forward pass, then answers zero motion."""

    name = "simulated_model"
    OPTIONS = (
        ParamSpec(_P + "base_s", "double", 0.05, "Fixed cost of one forward pass, whatever the batch size.", "s",
                  0.0, 60.0),
        ParamSpec(_P + "per_item_s", "double", 0.005, "Added cost per observation in a batch.", "s", 0.0, 60.0),
    )

    def __init__(self, options: dict, tokenizer) -> None:
        super().__init__(resolve_options(self.OPTIONS, _P, options), tokenizer)
        bins = zero_motion_bins(tokenizer)
        if getattr(tokenizer, "token_form", "text") == "ids":
            self._answer = {"token_ids": tuple(int(i) for i in np.asarray(tokenizer.ids_from_bins(bins)))}
        else:
            self._answer = {"text": tokenizer.format_text(bins)}
        self._closed = threading.Event()
        self._device = threading.Lock()  # one forward pass at a time, as on one accelerator

    def forward_time_s(self, batch: int) -> float:
        """The simulated cost of one forward pass over ``batch`` observations."""
        return self.options["base_s"] + self.options["per_item_s"] * batch

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        result = self.infer_batch([observation], timeout_s)[0]
        if isinstance(result, BackendError):
            raise result
        return result

    def infer_batch(self, observations: Sequence[Observation], timeout_s: float) -> list[BackendReply | BackendError]:
        cost = self.forward_time_s(len(observations))
        start = time.monotonic()
        if not self._device.acquire(timeout=max(0.0, timeout_s)):
            raise BackendTimeout(f"simulated_model: the device stayed busy for the whole {timeout_s:.3f} s budget")
        try:
            if cost > timeout_s - (time.monotonic() - start):
                raise BackendTimeout(f"simulated_model: a batch of {len(observations)} costs {cost:.3f} s, over the "
                                     f"{timeout_s:.3f} s budget")
            if self._closed.wait(cost):
                raise BackendError("simulated_model: backend is closed")
        finally:
            self._device.release()
        elapsed = time.monotonic() - start
        return [BackendReply(seq=o.seq, backend=self.name, server_time_s=elapsed, **self._answer)
                for o in observations]

    def close(self) -> None:
        self._closed.set()
