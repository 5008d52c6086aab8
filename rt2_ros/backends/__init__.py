"""VLA backends: where an observation goes and an answer comes back.

Each backend is selected by ``backend.type`` in the params YAML and built by
:func:`create_backend`. Backends import their heavy or optional dependencies lazily, so
choosing ``embedded`` never needs grpc, torch or an HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rt2_ros.backends.base import Backend, BackendConfigError, BackendError, BackendTimeout, resolve_options

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

# type name -> "module:Class"; one line per backend, the only place that lists them.
BACKENDS: dict[str, str] = {
    "embedded": "rt2_ros.backends.embedded:EmbeddedBackend",
    "local": "rt2_ros.backends.local_hf:LocalHFBackend",
    "grpc": "rt2_ros.backends.grpc_client:GrpcBackend",
    "openvla_http": "rt2_ros.backends.openvla_http:OpenVLAHttpBackend",
    "openpi": "rt2_ros.backends.openpi:OpenPIBackend",
    "openai": "rt2_ros.backends.openai_compat:OpenAICompatBackend",
    "scripted": "rt2_ros.backends.scripted:ScriptedBackend",
    "simulated_model": "rt2_ros.backends.simulated_model:SimulatedModelBackend",
}


def backend_class(backend_type: str) -> type[Backend]:
    """The Backend subclass registered as ``backend_type`` (imports its module)."""
    try:
        target = BACKENDS[backend_type]
    except KeyError:
        raise BackendConfigError(
            f"backend.type: unknown backend {backend_type!r}; choose one of {sorted(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def create_backend(backend_type: str, options: dict, tokenizer: ActionTokenizer) -> Backend:
    """Build the backend named ``backend_type``.

    ``options`` holds the keys under ``backend.<type>.`` (prefix stripped); they are
    validated against the backend's ``OPTIONS`` schema, so errors name the full key.
    """
    cls = backend_class(backend_type)
    prefix = f"backend.{backend_type}."
    if not cls.OPTIONS and options:
        raise BackendConfigError(f"{prefix}{next(iter(options))}: backend {backend_type!r} takes no options")
    return cls(resolve_options(cls.OPTIONS, prefix, options), tokenizer)


__all__ = [
    "BACKENDS", "Backend", "BackendConfigError", "BackendError", "BackendTimeout", "backend_class", "create_backend",
]
