"""The rt2_ros gRPC protocol (``policy.proto``) and its generated Python modules.

``policy_pb2`` / ``policy_pb2_grpc`` are generated at setup by ``python -m rt2_ros.grpc_codegen``
and are not committed (they must match the installed protobuf/grpcio). In a source checkout
where they are missing or older than ``policy.proto``, :func:`load` generates them once, so
``pytest`` works without a prior ``make``; an installed package already ships them.

No pickle anywhere in this protocol: unpickling bytes from a peer executes code the peer
chose, which is exactly the hole in LeRobot's async inference (pickled observations and
actions over an insecure gRPC channel). Protobuf messages are data only.
"""

from __future__ import annotations

import logging
from types import ModuleType

_log = logging.getLogger("rt2_ros.backends.proto")

#: bumped on a breaking change to policy.proto (reported by GetInfo), together with its package name
PROTOCOL_VERSION = 2
#: full gRPC service name, also the name its health status is registered under
SERVICE_NAME = f"rt2_ros.policy.v{PROTOCOL_VERSION}.Policy"
#: trailing metadata key of a refusal for a protocol-version mismatch; the value is the refusing side's version
VERSION_TRAILER = "rt2_ros-protocol-version"


def service_name(version: int) -> str:
    """The gRPC service name of protocol ``version`` (its package name embeds the version)."""
    return f"rt2_ros.policy.v{version}.Policy"


def load() -> tuple[ModuleType, ModuleType]:
    """``(policy_pb2, policy_pb2_grpc)``, generating them first if missing or stale."""
    from rt2_ros import grpc_codegen

    try:
        stale = grpc_codegen.is_stale()
    except OSError:  # installed without the .proto: use whatever was generated at build time
        stale = False
    if stale:
        missing = not all(p.exists() for proto in grpc_codegen.PROTOS for p in grpc_codegen.generated_files(proto))
        try:
            changed = grpc_codegen.generate()
        except (grpc_codegen.CodegenError, OSError) as exc:
            if missing:
                raise ImportError(f"rt2_ros gRPC code is missing and could not be generated ({exc}); "
                                  "run `python -m rt2_ros.grpc_codegen`") from exc
            # e.g. a read-only install whose file times make it look stale: the shipped code is fine
            _log.warning("could not regenerate the rt2_ros gRPC code (%s); using the existing modules", exc)
            changed = []
        if changed:
            _log.info("generated rt2_ros gRPC code: %s", ", ".join(p.name for p in changed))
    try:
        from rt2_ros.backends.proto import policy_pb2, policy_pb2_grpc
    except ImportError as exc:
        raise ImportError(f"cannot import the generated rt2_ros gRPC code ({exc}); "
                          "run `python -m rt2_ros.grpc_codegen`") from exc
    package = policy_pb2.DESCRIPTOR.package
    if f"{package}.Policy" != SERVICE_NAME:  # e.g. v1 code left in an install whose .proto is gone
        raise ImportError(f"the generated rt2_ros gRPC code is for {package}, this rt2_ros speaks {SERVICE_NAME}; "
                          "run `python -m rt2_ros.grpc_codegen`")
    return policy_pb2, policy_pb2_grpc


__all__ = ["PROTOCOL_VERSION", "SERVICE_NAME", "VERSION_TRAILER", "load", "service_name"]
