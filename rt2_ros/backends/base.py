"""The one interface every VLA backend implements.

A backend is synchronous and blocking by design: the policy node calls :meth:`Backend.infer`
from a worker thread (never the ROS executor), with a timeout, so each backend stays a plain
client that is easy to test without ROS.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.params import ParamSpec

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer


class BackendError(RuntimeError):
    """The backend failed to answer (unreachable, server error, malformed reply)."""


class BackendTimeout(BackendError):
    """The backend did not answer within the request timeout."""


class BackendConfigError(ValueError):
    """Invalid backend options; the message names the offending key (e.g. ``backend.url``)."""


class Backend(abc.ABC):
    """Observation in, model answer out."""

    #: short name used in messages and logs, e.g. "embedded", "grpc"
    name: str = "backend"

    #: the options this backend accepts under ``backend.<name>.*`` in the params YAML
    OPTIONS: tuple[ParamSpec, ...] = ()

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        """``options``: this backend's validated option dict (keys without the prefix);
        ``tokenizer``: the configured action tokenizer (for prompts, grammars, id maps)."""
        self.options = options
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        """Answer one observation within ``timeout_s`` or raise BackendError/BackendTimeout."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """A new episode starts (new instruction); stateful backends clear their state."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets, channels, models."""
