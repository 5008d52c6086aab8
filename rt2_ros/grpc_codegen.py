"""Generate the Python gRPC code for ``rt2_ros/backends/proto/policy.proto``.

Run ``python -m rt2_ros.grpc_codegen`` (the Makefile and ``setup.py``'s build step do). The
generated ``*_pb2*.py`` files are not committed: they must match the installed protobuf and
grpcio runtimes, so they are produced by the ``grpcio-tools`` that is installed next to them.

Why the .proto sits inside the Python package: protoc writes ``import`` lines from the path
of the .proto relative to its include root, so with the include root at the directory that
holds ``rt2_ros/`` the generated service module reads
``from rt2_ros.backends.proto import policy_pb2``, a correct package import with no
post-processing (rewriting generated imports with regexes was rejected as fragile).

Idempotent and safe to run concurrently: protoc writes into a temporary directory, and a
file in the package is replaced (atomically, ``os.replace``) only when its content changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

_log = logging.getLogger("rt2_ros.grpc_codegen")

#: directory that contains the ``rt2_ros`` package: protoc's include root and output root
ROOT = Path(__file__).resolve().parent.parent
#: the .proto files, relative to ROOT
PROTOS: tuple[str, ...] = ("rt2_ros/backends/proto/policy.proto",)
OUT_DIR = ROOT / "rt2_ros" / "backends" / "proto"


class CodegenError(RuntimeError):
    """protoc failed or grpcio-tools is missing."""


def generated_files(proto: str) -> tuple[Path, ...]:
    """The files protoc generates for ``proto`` (relative to ROOT)."""
    stem = ROOT / proto[: -len(".proto")]
    return stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2_grpc.py")


def is_stale() -> bool:
    """True when a generated file is missing or older than its .proto."""
    for proto in PROTOS:
        src = (ROOT / proto).stat().st_mtime
        for out in generated_files(proto):
            if not out.exists() or out.stat().st_mtime < src:
                return True
    return False


def generate() -> list[Path]:
    """Run protoc for every .proto; return the files that changed (empty when up to date)."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise CodegenError("grpcio-tools is not installed; `pip install grpcio-tools` and rerun "
                           "`python -m rt2_ros.grpc_codegen`") from exc
    # protoc's own include dir (google/protobuf/*.proto); `python -m grpc_tools.protoc` adds it
    # itself, the in-process call does not.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    changed: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="rt2_codegen_") as tmp:
        for proto in PROTOS:
            # no --pyi_out: stubs would not match .gitignore's *_pb2*.py, and the code treats messages as Any
            args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}", str(ROOT / proto)]
            rc = protoc.main(args)
            if rc != 0:
                raise CodegenError(f"protoc failed on {proto} (exit code {rc}); see the messages above")
            for out in generated_files(proto):
                fresh = Path(tmp) / out.relative_to(ROOT)
                if not fresh.exists():
                    raise CodegenError(f"protoc did not produce {out.relative_to(ROOT)}")
                if out.exists() and out.read_bytes() == fresh.read_bytes():
                    out.touch()  # up to date: refresh the mtime so is_stale() agrees
                    continue
                # copy next to the target, then rename: readers never see a half-written module
                staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                shutil.copyfile(fresh, staging)
                os.replace(staging, out)
                changed.append(out)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rt2_ros.grpc_codegen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated code is missing or stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = is_stale()
        state = "missing or stale; run python -m rt2_ros.grpc_codegen" if stale else "up to date"
        print(f"rt2_ros gRPC code: {state}")
        return 1 if stale else 0
    try:
        changed = generate()
    except (CodegenError, OSError) as exc:
        print(f"rt2_ros.grpc_codegen: error: {exc}", file=sys.stderr)
        return 1
    if changed:
        print("rt2_ros.grpc_codegen: wrote " + ", ".join(str(p.relative_to(ROOT)) for p in changed))
    else:
        print("rt2_ros.grpc_codegen: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
