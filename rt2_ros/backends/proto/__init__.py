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

#: bumped on a breaking change to policy.proto (reported by GetInfo)
PROTOCOL_VERSION = 1
#: full gRPC service name, also the name its health status is registered under
SERVICE_NAME = "rt2_ros.policy.v1.Policy"


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
    return policy_pb2, policy_pb2_grpc


__all__ = ["PROTOCOL_VERSION", "SERVICE_NAME", "load"]
