"""The one interface every VLA backend implements.

A backend is synchronous and blocking by design: the policy node calls :meth:`Backend.infer`
from a worker thread (never the ROS executor), with a timeout, so each backend stays a plain
client that is easy to test without ROS.
"""

from __future__ import annotations

import abc
import logging
import os
import stat
from typing import TYPE_CHECKING

from rt2_ros.actions import BackendReply, Observation
from rt2_ros.params import ConfigError, ParamSpec, resolve

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


# -- helpers shared by the backend clients ---------------------------------------------------------
_log = logging.getLogger(__name__)


def describe_exception(exc: BaseException) -> str:
    """A short cause such as 'Connection refused' instead of a nested urllib3/httpx essay."""
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Connection reset", "certificate verify failed"):
        if marker in text:
            return marker
    first = text.splitlines()[0] if text else type(exc).__name__
    return snippet(first)


def snippet(text: str, limit: int = 200) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= limit else one_line[:limit] + "…"


def resolve_options(specs: tuple[ParamSpec, ...], prefix: str, options: dict) -> dict:
    """Validate ``options`` (keys without ``prefix``), fill defaults; errors name the full key.

    create_backend() validates too; repeating it here makes direct construction (tests,
    notebooks) just as safe and fills defaults for keys the caller left out.
    """
    try:
        resolved = resolve(specs, {prefix + k: v for k, v in options.items()})
    except ConfigError as exc:
        raise BackendConfigError(str(exc)) from None
    return {k[len(prefix):]: v for k, v in resolved.items()}


def load_secret(env_name: str, file_path: str, prefix: str) -> str:
    """The secret named by an env var or stored in a file ('' when neither is set); never logged."""
    if env_name and file_path:
        raise BackendConfigError(f"{prefix}api_key_env and {prefix}api_key_file are both set; choose one")
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise BackendConfigError(f"{prefix}api_key_env: environment variable {env_name} is not set or empty")
        return value
    if file_path:
        try:
            with open(file_path, encoding="utf-8") as f:
                value = f.read().strip()
            mode = os.stat(file_path).st_mode
        except OSError as exc:
            raise BackendConfigError(f"{prefix}api_key_file: cannot read {file_path!r}: {exc.strerror}") from None
        if not value:
            raise BackendConfigError(f"{prefix}api_key_file: {file_path!r} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            _log.warning("%sapi_key_file %s is readable by other users; chmod 600 it", prefix, file_path)
        return value
    return ""


def credential_specs(prefix: str, *, key_use: str, scheme: str, secret: str = "API key") -> tuple[ParamSpec, ...]:
    """The ``api_key_env`` / ``api_key_file`` / ``ca_cert_file`` options of a network backend.

    Declared once here so the three clients cannot drift apart in names, types or defaults;
    ``key_use`` says what the secret is and how it is sent (e.g. "the API key sent as
    'Authorization: Api-Key KEY'"), ``scheme`` which TLS URL scheme the CA file verifies ("https"
    or "wss"), ``secret`` the short noun for the key ("API key", "bearer token"). Read them with
    :func:`load_secret`.
    """
    return (
        ParamSpec(prefix + "api_key_env", "string", "",
                  f"Name of an environment variable holding {key_use}; empty with an empty api_key_file = "
                  "no key (a server without auth)."),
        ParamSpec(prefix + "api_key_file", "string", "",
                  f"Path of a file holding that {secret} (alternative to api_key_env; chmod 600)."),
        ParamSpec(prefix + "ca_cert_file", "string", "",
                  f"PEM CA bundle to verify {scheme}:// servers with a private CA; empty = system CAs."),
    )
