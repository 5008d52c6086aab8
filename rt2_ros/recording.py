"""Episode recording (MCAP with ROS 2 CDR messages) and offline replay of tokenizer + safety filter.

Why: every run, simulated or on a real arm, should leave a file that answers "what did the
robot see, what did the model say, what did we send to the arm, and why". Users open it with
the tools they already have: ``ros2 bag info/play`` (rosbag2's MCAP storage plugin) and
Foxglove. ``rt2-replay`` then re-runs the tokenizer and the safety filter on the recorded
model answers, so an integrator who changes ``tokenizer.*`` or ``safety.*`` parameters sees,
step by step, what would have changed before the arm ever moves with them.

File format (the rosbag2 MCAP layout, so both tools read it natively): MCAP profile ``ros2``;
one channel per topic with message encoding ``cdr`` and the publishers' QoS in the channel
metadata (``offered_qos_profiles``; ``ros2 bag play`` needs it to replay latched topics such as
``/rt2_safety/status`` as latched); one schema per type with encoding ``ros2msg`` holding the full
``.msg`` text plus every dependency, separated by ``=====...`` / ``MSG: pkg/Type`` lines as
rosbag2 writes them. Messages are serialized by ``rclpy.serialization`` (the real type
support, byte-identical to what went over DDS; the recorder node even stores the raw bytes it
received). Run metadata (instruction, the parameters the nodes ran with) goes into MCAP
metadata records ``rt2_ros`` and ``rt2_ros.params``.

Rejected: rosbag2's own Python API (not on PyPI, and it would tie recording to a full ROS
install); ``mcap_ros2.writer`` (re-encodes messages with its own CDR encoder from the schema
text and cannot set the channel QoS metadata); pickle/npz episode dumps (no tool opens them,
and unpickling is code execution). Reading for replay uses ``mcap_ros2``'s decoder with the
schema stored in the file, so an old recording stays readable after our messages evolve.

This module imports rclpy only lazily (inside :meth:`EpisodeRecorder.write` for message
objects and for type lookups); reading and replay need no ROS at all.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from rt2_ros.actions import ArmAction
from rt2_ros.episode import NO_EPISODE, short_id

# -- topics and QoS ---------------------------------------------------------------------------------

#: what ``rt2-record`` records by default: topic -> ROS 2 type ("pkg/msg/Type")
DEFAULT_TOPICS: dict[str, str] = {
    "/camera/image": "sensor_msgs/msg/Image",
    "/wrist_camera/image": "sensor_msgs/msg/Image",  # rt2_sim publishes it (sim_node.wrist_camera)
    "/instruction": "std_msgs/msg/String",
    "/episode": "rt2_ros_interfaces/msg/Episode",
    "/rt2_policy/action_tokens": "rt2_ros_interfaces/msg/ActionTokens",
    "/arm_action": "rt2_ros_interfaces/msg/ArmAction",
    "/rt2_safety/status": "rt2_ros_interfaces/msg/SafetyStatus",
    "/servo_node/delta_twist_cmds": "geometry_msgs/msg/TwistStamped",
    "/target_pose": "geometry_msgs/msg/PoseStamped",
    "/ee_pose": "geometry_msgs/msg/PoseStamped",
    "/gripper_command": "std_msgs/msg/Float64",
    "/estop": "std_msgs/msg/Bool",
}


@dataclass(frozen=True)
class QosSpec:
    """A publisher QoS as rmw enum values (what rosbag2 stores in ``offered_qos_profiles``)."""

    history: int  # rmw_qos_history_policy_t: 1 keep_last, 2 keep_all
    depth: int
    reliability: int  # rmw_qos_reliability_policy_t: 1 reliable, 2 best_effort
    durability: int  # rmw_qos_durability_policy_t: 1 transient_local, 2 volatile


#: the QoS kinds the rt2_ros nodes publish with (must equal rt2_ros.nodes.common; a test checks it)
QOS_KINDS: dict[str, QosSpec] = {
    "latched": QosSpec(history=1, depth=1, reliability=1, durability=1),  # LATCHED_QOS
    "action": QosSpec(history=1, depth=10, reliability=1, durability=2),  # ACTION_QOS
    "command": QosSpec(history=1, depth=1, reliability=1, durability=2),  # COMMAND_QOS
    "event": QosSpec(history=1, depth=10, reliability=1, durability=2),  # EVENT_QOS
    "sensor_data": QosSpec(history=1, depth=5, reliability=2, durability=2),  # qos_profile_sensor_data
    "default": QosSpec(history=1, depth=10, reliability=1, durability=2),  # create_publisher(..., 10)
}

#: topic -> QoS kind its publisher uses (topics not listed: "default")
DEFAULT_QOS: dict[str, str] = {
    "/camera/image": "sensor_data",
    "/camera/image/compressed": "sensor_data",
    "/wrist_camera/image": "sensor_data",
    "/wrist_camera/image/compressed": "sensor_data",
    "/instruction": "event",
    "/episode": "event",
    "/rt2_policy/action_tokens": "default",
    "/arm_action": "action",
    "/rt2_safety/status": "latched",
    "/servo_node/delta_twist_cmds": "command",
    "/target_pose": "command",
    "/ee_pose": "sensor_data",
    "/gripper_command": "command",
    "/estop": "sensor_data",  # best effort: records an e-stop from a writer of any QoS
    "/joint_states": "sensor_data",
}

#: metadata record names written by EpisodeRecorder
META_RUN = "rt2_ros"
META_PARAMS = "rt2_ros.params"

# Parameter names whose *value* would be a secret; never written to a file (rt2_ros itself only
# takes names of environment variables or files for secrets, this is a second line of defence).
_SECRET_PARAM_LEAVES = frozenset({"api_key", "apikey", "key", "password", "passwd", "secret", "token",
                                  "auth_token", "bearer_token", "access_token"})

_DELIMITER = "=" * 80


class RecordingError(RuntimeError):
    """A recording cannot be written: bad path, unknown topic, wrong message type, missing definition."""


class RecordingReadError(ValueError):
    """A file cannot be read as an rt2_ros / rosbag2 MCAP recording."""


# -- message types and definitions ----------------------------------------------------------------------
_PRIMITIVES = frozenset({"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16",
                         "int32", "uint32", "int64", "uint64", "string", "wstring"})
_TYPE_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)/(?:msg/)?([A-Za-z][A-Za-z0-9_]*)$")


def normalize_type_name(msg_type: Any) -> str:
    """``"pkg/msg/Type"`` for a message class, an instance's class name or ``"pkg/Type"`` text."""
    if isinstance(msg_type, str):
        m = _TYPE_RE.match(msg_type.strip())
        if not m:
            raise RecordingError(f"not a ROS 2 message type name: {msg_type!r} (expected pkg/msg/Type)")
        return f"{m.group(1)}/msg/{m.group(2)}"
    if isinstance(msg_type, type) and hasattr(msg_type, "get_fields_and_field_types"):
        return f"{msg_type.__module__.split('.')[0]}/msg/{msg_type.__name__}"
    raise RecordingError(f"not a ROS 2 message type: {msg_type!r}")


def import_message_type(type_name: str) -> type:
    """The rclpy message class for ``"pkg/msg/Type"`` (imports ``pkg.msg``)."""
    pkg, _, name = normalize_type_name(type_name).split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise RecordingError(f"message type {type_name} is not installed ({exc}); source the workspace that "
                             f"provides {pkg}") from exc


def _share_prefixes() -> list[Path]:
    """Install prefixes to search for ``share/<pkg>/msg/<Type>.msg``: AMENT_PREFIX_PATH, then this
    Python's prefix (a pip venv with ROS wheels has no AMENT_PREFIX_PATH)."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    for p in (Path(sys.prefix), Path(sys.base_prefix)):
        if p not in prefixes:
            prefixes.append(p)
    return prefixes


def _package_prefix_of_module(pkg: str) -> Path | None:
    """``<prefix>`` of ``<prefix>/lib/pythonX.Y/site-packages/<pkg>`` (colcon / apt installs)."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).resolve()
    return path.parents[3] if len(path.parents) > 3 else None


def _find_interface_file(pkg: str, name: str, suffix: str, prefixes: Sequence[Path]) -> Path | None:
    candidates = list(prefixes)
    module_prefix = _package_prefix_of_module(pkg)
    if module_prefix is not None:
        candidates.append(module_prefix)
    for prefix in candidates:
        path = prefix / "share" / pkg / "msg" / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _msg_dependencies(text: str, package: str) -> list[str]:
    """Non-primitive field types of a .msg text as sorted ``pkg/Type`` names."""
    deps: set[str] = set()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        parts = line.split()
        if len(parts) < 2:
            continue
        base = re.sub(r"\[[^\]]*\]$", "", parts[0])  # T[], T[3], T[<=5]
        base = re.sub(r"<=\d+$", "", base)  # string<=10
        if base in _PRIMITIVES:
            continue
        if "/" not in base:
            base = f"{package}/{base}"  # a type of the same package, e.g. "Pose" in geometry_msgs
        m = _TYPE_RE.match(base)
        if m:
            deps.add(f"{m.group(1)}/{m.group(2)}")
    return sorted(deps)


_IDL_TO_MSG = {"double": "float64", "float": "float32", "boolean": "bool", "octet": "byte",
               "long double": "float64"}


def _definition_from_class(type_name: str) -> str:
    """A .msg text rebuilt from the Python class (fallback when no .msg file is installed, e.g. an
    IDL-only package). Field types and names are exact; comments and constants are lost (they do
    not affect the CDR layout)."""
    cls = import_message_type(type_name)
    lines = []
    for fname, ftype in cls.get_fields_and_field_types().items():
        m = re.match(r"^sequence<(.+?)(?:, (\d+))?>$", ftype)
        suffix = ""
        if m:
            ftype, suffix = m.group(1), f"[<={m.group(2)}]" if m.group(2) else "[]"
        else:
            a = re.match(r"^(.+)\[(\d+)\]$", ftype)
            if a:
                ftype, suffix = a.group(1), f"[{a.group(2)}]"
        ftype = re.sub(r"^(w?string)<(\d+)>$", r"\1<=\2", ftype)
        lines.append(f"{_IDL_TO_MSG.get(ftype, ftype)}{suffix} {fname}")
    return "\n".join(lines) + "\n"


def message_definition(type_name: str, prefixes: Sequence[Path] | None = None) -> str:
    """The full ``ros2msg`` schema text for ``type_name`` as rosbag2 writes it.

    The type's own ``.msg`` text, then every dependency once (depth first, sorted per level),
    each introduced by a line of 80 ``=`` and ``MSG: pkg/Type``. Definitions come from
    ``share/<pkg>/msg/<Type>.msg`` of the install; a type without a .msg file is rebuilt from its
    Python class. Raises :class:`RecordingError` when neither is available.
    """
    prefixes = list(prefixes) if prefixes is not None else _share_prefixes()
    root = normalize_type_name(type_name)
    seen: set[str] = set()

    def text_of(pkg: str, name: str) -> str:
        path = _find_interface_file(pkg, name, ".msg", prefixes)
        if path is not None:
            return path.read_text(encoding="utf-8")
        return _definition_from_class(f"{pkg}/msg/{name}")

    def expand(pkg: str, name: str, depth: int) -> str:
        if depth > 50:
            raise RecordingError(f"message definition of {root} nests deeper than 50 levels")
        text = text_of(pkg, name)
        out = text
        for dep in _msg_dependencies(text, pkg):
            if dep in seen:
                continue
            seen.add(dep)
            dep_pkg, dep_name = dep.split("/")
            out += f"\n{_DELIMITER}\nMSG: {dep}\n" + expand(dep_pkg, dep_name, depth + 1)
        return out

    pkg, _, name = root.split("/")
    return expand(pkg, name, 0)


def type_hash(type_name: str, prefixes: Sequence[Path] | None = None) -> str:
    """The ``RIHS01_...`` type description hash from ``share/<pkg>/msg/<Type>.json`` ("" if absent)."""
    pkg, _, name = normalize_type_name(type_name).split("/")
    path = _find_interface_file(pkg, name, ".json", list(prefixes) if prefixes is not None else _share_prefixes())
    if path is None:
        return ""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        for entry in doc.get("type_hashes", []):
            if entry.get("type_name") == normalize_type_name(type_name):
                return str(entry.get("hash_string", ""))
    except (OSError, ValueError, AttributeError):
        return ""  # a hash is a convenience for rosbag2; never fail a recording over it
    return ""


def offered_qos_yaml(kind: str) -> str:
    """rosbag2's ``offered_qos_profiles`` YAML for a QoS kind (integer enum form: every rosbag2
    from Humble on parses it; unspecified durations are 0/0 = the rmw default)."""
    if kind not in QOS_KINDS:
        raise RecordingError(f"unknown QoS kind {kind!r}; use one of {sorted(QOS_KINDS)}")
    q = QOS_KINDS[kind]
    zero = "\n    sec: 0\n    nsec: 0"
    return (f"- history: {q.history}\n  depth: {q.depth}\n  reliability: {q.reliability}\n"
            f"  durability: {q.durability}\n  deadline:{zero}\n  lifespan:{zero}\n  liveliness: 0\n"
            f"  liveliness_lease_duration:{zero}\n  avoid_ros_namespace_conventions: false\n")


def _metadata_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def public_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without values that look like secrets and without unset (None) values."""
    return {k: v for k, v in params.items()
            if v is not None and k.rsplit(".", 1)[-1].lower() not in _SECRET_PARAM_LEAVES}


# -- writing ----------------------------------------------------------------------------------------------
class EpisodeRecorder:
    """Write ROS 2 messages to an MCAP file that ``ros2 bag`` and Foxglove open.

    ``topics`` maps topic names to message types (a class such as ``sensor_msgs.msg.Image`` or a
    name such as ``"sensor_msgs/msg/Image"``). ``qos`` maps topics to a :data:`QOS_KINDS` name (the
    publisher's QoS, stored for ``ros2 bag play``; default :data:`DEFAULT_QOS`, else ``default``).
    ``rate_limits_hz`` keeps at most that many messages per second of a topic (by log time),
    e.g. ``{"/camera/image": 2.0}`` to keep files small. ``params`` (flat dotted keys, e.g. the
    ``tokenizer.*`` and ``safety.*`` values the nodes ran with) and ``instruction`` are written
    as metadata; ``rt2-replay`` uses the params as the recorded configuration.

    The file is finalised (summary, indexes) by :meth:`close`; chunks are flushed at least every
    ``flush_period_s`` so a crash loses at most that much (``mcap recover`` repairs the rest).
    Thread-safe. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, topics: Mapping[str, Any], *, qos: Mapping[str, str] | None = None,
                 rate_limits_hz: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None,
                 instruction: str | None = None, recorder: str = "EpisodeRecorder", compression: str = "zstd",
                 flush_period_s: float = 1.0) -> None:
        from mcap.writer import CompressionType, Writer

        modes = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
        if compression not in modes:
            raise RecordingError(f"compression {compression!r} is not one of {sorted(modes)}")
        self.path = Path(path)
        self._lock = threading.Lock()
        self._qos = dict(DEFAULT_QOS)
        self._qos.update(qos or {})
        self._rate_limits = {t: float(hz) for t, hz in (rate_limits_hz or {}).items()}
        for t, hz in self._rate_limits.items():
            if not (math.isfinite(hz) and hz >= 0.0):
                raise RecordingError(f"rate limit of {t} must be >= 0 Hz (0 = every message), got {hz}")
        self._flush_period_s = float(flush_period_s)
        self._last_flush = time.monotonic()
        self._due_ns: dict[str, int] = {}  # topic -> next log time a rate-limited message is due
        self._channels: dict[str, tuple[int, str]] = {}  # topic -> (channel id, type name)
        self._schemas: dict[str, int] = {}  # type name -> schema id
        self.counts: dict[str, int] = {}  # topic -> messages written
        self.skipped: dict[str, int] = {}  # topic -> messages dropped by the rate limit
        self._closed = False
        existing = next((p for p in self.path.parents if p.exists()), None)
        if existing is not None and not existing.is_dir():  # mkdir would only say "File exists"
            raise RecordingError(f"cannot write {self.path}: {existing} is a file, not a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._stream: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._writer = Writer(self._stream, compression=modes[compression])
        import rt2_ros

        self._writer.start(profile="ros2", library=f"rt2_ros {rt2_ros.__version__}")
        try:
            for topic, msg_type in topics.items():
                self._add_topic_locked(topic, msg_type)
        except RecordingError:
            self._abort()
            raise
        run = {"recorder": recorder, "rt2_ros_version": rt2_ros.__version__,
               "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "hostname": socket.gethostname(), "ros_distro": os.environ.get("ROS_DISTRO", "")}
        if instruction is not None:
            run["instruction"] = instruction
        self.add_metadata(META_RUN, run)
        if params:
            self.add_metadata(META_PARAMS, public_params(params))

    # -- topics -------------------------------------------------------------------------------------
    def add_topic(self, topic: str, msg_type: Any, qos: str | None = None) -> None:
        """Register another topic (channel) while recording."""
        with self._lock:
            self._check_open()
            if qos is not None:
                self._qos[topic] = qos
            self._add_topic_locked(topic, msg_type)

    def _add_topic_locked(self, topic: str, msg_type: Any) -> None:
        if not isinstance(topic, str) or not topic.startswith("/"):
            raise RecordingError(f"topic names must be absolute (start with '/'), got {topic!r}")
        type_name = normalize_type_name(msg_type)
        if topic in self._channels:
            if self._channels[topic][1] != type_name:
                raise RecordingError(f"{topic} is already recorded as {self._channels[topic][1]}, not {type_name}")
            return
        kind = self._qos.get(topic, "default")
        qos_yaml = offered_qos_yaml(kind)
        if type_name not in self._schemas:
            definition = message_definition(type_name)
            self._schemas[type_name] = self._writer.register_schema(type_name, "ros2msg", definition.encode())
        metadata = {"offered_qos_profiles": qos_yaml}
        digest = type_hash(type_name)
        if digest:
            metadata["topic_type_hash"] = digest
        channel = self._writer.register_channel(topic, "cdr", self._schemas[type_name], metadata)
        self._channels[topic] = (channel, type_name)
        self.counts.setdefault(topic, 0)

    @property
    def topics(self) -> dict[str, str]:
        """topic -> ``pkg/msg/Type`` of every registered topic."""
        return {t: c[1] for t, c in self._channels.items()}

    # -- writing ------------------------------------------------------------------------------------
    def write(self, topic: str, msg: Any, log_time_ns: int | None = None, publish_time_ns: int | None = None
              ) -> bool:
        """Record one message (an rclpy message object, or its CDR bytes as a raw subscription
        delivers them). Times are nanoseconds (ROS time; default: now, wall clock);
        ``publish_time_ns`` defaults to ``log_time_ns``. Returns False when the topic's rate
        limit dropped the message. Raises :class:`RecordingError` for an unregistered topic or a
        message of the wrong type."""
        if log_time_ns is None:
            log_time_ns = time.time_ns()
        log_time_ns = int(log_time_ns)
        with self._lock:
            self._check_open()
            entry = self._channels.get(topic)
            if entry is None:
                raise RecordingError(f"topic {topic} is not recorded; register it with add_topic() first")
            channel, type_name = entry
            if not self._keep(topic, log_time_ns):
                self.skipped[topic] = self.skipped.get(topic, 0) + 1
                return False
            if isinstance(msg, (bytes, bytearray, memoryview)):
                data = bytes(msg)
            else:
                got = normalize_type_name(type(msg))
                if got != type_name:
                    raise RecordingError(f"{topic} records {type_name}, got a {got}")
                from rclpy.serialization import serialize_message

                data = serialize_message(msg)
            try:
                self._writer.add_message(channel_id=channel, log_time=log_time_ns, data=data,
                                         publish_time=int(log_time_ns if publish_time_ns is None else publish_time_ns),
                                         sequence=self.counts[topic] & 0xFFFFFFFF)
                now = time.monotonic()
                if now - self._last_flush >= self._flush_period_s:
                    self._writer.flush()
                    self._last_flush = now
            except OSError as exc:  # disk full, file system gone: name the file, keep the cause
                raise RecordingError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
            self.counts[topic] += 1
            return True

    def _keep(self, topic: str, log_time_ns: int) -> bool:
        hz = self._rate_limits.get(topic, 0.0)
        if hz <= 0.0:
            return True
        # Keep-times on a grid of 1/hz, with a quarter period of slack: a jittery 10 Hz camera
        # limited to 10 Hz keeps every frame, limited to 2 Hz keeps one in five. After a gap
        # (stalled source) the grid restarts instead of letting a burst through.
        period = int(1e9 / hz)
        due = self._due_ns.get(topic)
        if due is not None and log_time_ns < due - period // 4:
            return False
        self._due_ns[topic] = due + period if due is not None and log_time_ns - due < period else log_time_ns + period
        return True

    def add_metadata(self, name: str, values: Mapping[str, Any]) -> None:
        """Write an MCAP metadata record (strings stay strings, other values are JSON). Records
        with the same name are merged by :func:`read_metadata`, later values winning."""
        with self._lock:
            self._check_open()
            try:
                self._writer.add_metadata(name, {str(k): _metadata_value(v) for k, v in values.items()})
            except OSError as exc:
                raise RecordingError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    # -- closing ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finalise the file (summary and indexes). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                try:
                    self._writer.finish()
                finally:
                    self._stream.close()  # closes the file even when its last flush fails
            except OSError as exc:
                raise RecordingError(f"cannot finalise {self.path}: {exc.strerror or exc}; `mcap recover` may "
                                     f"restore its messages") from exc

    def _abort(self) -> None:
        """Give up during construction: no half-made file is left behind."""
        self._closed = True
        self._stream.close()
        if self.path.is_file():  # never a device or pipe the caller pointed us at
            self.path.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RecordingError(f"recording {self.path} is already closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordedMessage:
    """One decoded message (``message`` has the fields of the ROS type, decoded from the file's schema)."""

    topic: str
    type_name: str  # "pkg/msg/Type"
    log_time_ns: int
    publish_time_ns: int
    message: Any


_MCAP_MAGIC = b"\x89MCAP0\r\n"


def _damage(exc: BaseException) -> str:
    """What a reader exception means for the file, in words (the mcap library's own are bare
    causes such as ``EndOfFile:`` or ``unpack requires a buffer of 8 bytes``)."""
    name = type(exc).__name__
    if name == "EndOfFile" or isinstance(exc, struct.error):
        return "it ends in the middle of a record (cut off)"
    if "zstd" in name.lower() or "lz4" in name.lower():
        return "a compressed chunk is damaged and cannot be decompressed"
    return f"a damaged record ({name}: {str(exc)[:200]})"


def _recover_hint(path: str | Path) -> str:
    return f"`mcap recover {path} -o recovered.mcap` may restore more"


def _open_reader(path: str | Path, stream: IO[bytes]) -> tuple[Any, bool]:
    """An mcap reader for ``stream`` and whether the file was finalised. A file that does not end
    with the MCAP magic was never closed (recorder killed): it is read front to back instead of
    through its (missing) summary."""
    from mcap.reader import NonSeekingReader, SeekingReader
    from mcap_ros2.decoder import DecoderFactory

    head = stream.read(len(_MCAP_MAGIC))
    if head != _MCAP_MAGIC:
        raise RecordingReadError(f"{path}: not an MCAP file (it does not start with the MCAP magic bytes)")
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(size - len(_MCAP_MAGIC))
    finalised = size >= 2 * len(_MCAP_MAGIC) and stream.read(len(_MCAP_MAGIC)) == _MCAP_MAGIC
    stream.seek(0)
    try:
        if finalised:
            return SeekingReader(stream, decoder_factories=[DecoderFactory()]), True
        return NonSeekingReader(stream, decoder_factories=[DecoderFactory()]), False
    except Exception as exc:  # mcap raises several unrelated types for a damaged file
        raise RecordingReadError(f"{path}: not a readable MCAP file: {_damage(exc)}") from exc


def _open_file(path: str | Path) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise RecordingReadError(f"cannot open {path}: {exc.strerror or exc}") from exc


def read_metadata(path: str | Path) -> dict[str, dict[str, str]]:
    """All metadata records by name (records with the same name merged in file order). From a
    file that was never finalised: the records before the point where it breaks off."""
    with _open_file(path) as f:
        reader, finalised = _open_reader(path, f)
        out: dict[str, dict[str, str]] = {}
        try:
            for record in reader.iter_metadata():
                out.setdefault(record.name, {}).update(record.metadata)
        except Exception as exc:  # corrupt or truncated: mcap/zstd/struct errors alike
            if finalised:
                raise RecordingReadError(f"{path}: cannot read metadata: {_damage(exc)}") from exc
    return out


def recorded_params(path: str | Path) -> dict[str, Any]:
    """The flat parameters stored by the recorder (``{}`` when none were recorded)."""
    out: dict[str, Any] = {}
    for key, text in read_metadata(path).get(META_PARAMS, {}).items():
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text  # a plain string value
    return out


def iter_messages(path: str | Path, topics: Iterable[str] | None = None,
                  truncated: list[str] | None = None) -> Iterator[RecordedMessage]:
    """Decoded messages in file order (``topics``: only these).

    A file that ends early (the recorder was killed) yields what it holds; the problem is
    appended to ``truncated`` when a list is given, else raised as :class:`RecordingReadError`.
    A file that breaks before its first message always raises.
    """
    wanted = set(topics) if topics is not None else None
    with _open_file(path) as f:
        reader, finalised = _open_reader(path, f)
        count = 0
        try:
            for schema, channel, message, decoded in reader.iter_decoded_messages(
                    topics=wanted, log_time_order=False):
                count += 1
                yield RecordedMessage(channel.topic, normalize_type_name(schema.name) if schema else "",
                                      int(message.log_time), int(message.publish_time), decoded)
        except Exception as exc:  # truncated chunk, bad CRC, undecodable schema: all "unreadable"
            problem = (f"{path}: read stopped after {count} messages: {_damage(exc)}"
                       + ("" if finalised else "; the file was never finalised (the recorder was killed, or it is "
                          f"an incomplete copy); {_recover_hint(path)}"))
            if count == 0 or truncated is None:
                raise RecordingReadError(problem) from exc
            truncated.append(problem)
            return
        if not finalised:
            problem = f"{path}: the file was never finalised (recorder killed?); read {count} messages"
            if truncated is None:
                raise RecordingReadError(problem)
            truncated.append(problem)


def read_topics(path: str | Path) -> dict[str, str]:
    """topic -> ``pkg/msg/Type`` of every channel in the file."""
    with _open_file(path) as f:
        reader, finalised = _open_reader(path, f)
        if not finalised:
            raise RecordingReadError(f"{path}: the file was never finalised (recorder killed?); run `mcap recover`")
        try:
            summary = reader.get_summary()
        except Exception as exc:  # corrupt summary section
            raise RecordingReadError(f"{path}: cannot read the summary: {_damage(exc)}") from exc
        if summary is None:
            raise RecordingReadError(f"{path}: no summary section (recording not closed?); run `mcap recover`")
        try:
            return {c.topic: normalize_type_name(summary.schemas[c.schema_id].name)
                    for c in summary.channels.values() if c.schema_id in summary.schemas}
        except RecordingError as exc:  # the file names a type that is not a ROS 2 message type
            raise RecordingReadError(f"{path}: {exc}") from None


# -- replay ------------------------------------------------------------------------------------------------
# Re-decoding the same bins is deterministic; the tolerance only absorbs the float32 gripper
# field of ArmAction messages. 1e-7 m / rad is far below anything an arm can execute.
_SETTLED_S = 60.0  # replay: after this long without a message the safety filter only holds (see advance)
_MATCH_ATOL = 1e-7
_GRIPPER_ATOL = 1e-6


#: the nodes whose parameters a replay uses, and which of their keys
REPLAY_NODES = ("rt2_policy", "rt2_safety")
REPLAY_KEYS = {"rt2_policy": "tokenizer.*", "rt2_safety": "safety.*"}
# rt2_safety parameters of earlier versions that a recording's metadata may still hold -> what replaced them
_RETIRED_KEYS = {"ee_pose_timeout_s": "safety.max_pose_age_s (judged by the ee_pose header stamp)"}


@dataclass(frozen=True)
class ReplayStep:
    """One executed arm action of the recording, re-decoded and re-filtered."""

    index: int  # 1-based step number
    time_s: float  # log time since the first message of the recording
    observation_seq: int
    episode_id: str  # the action's episode, short hex form (rt2_ros.episode.short_id; "none" for no episode)
    tokens: tuple[int, ...]  # recorded bins (empty for continuous chunks)
    recorded: ArmAction  # what the policy node published
    redecoded: ArmAction | None  # what the candidate tokenizer makes of the recorded answer
    redecode_note: str  # why there is no re-decoded action ("" when there is one)
    match: bool | None  # None: nothing to re-decode (continuous chunk or no ActionTokens recorded)
    verdict: tuple[str, ...]  # safety filter with the candidate params, on the re-decoded action
    recorded_verdict: tuple[str, ...]  # safety filter with the recorded params, on the recorded action

    @property
    def verdict_changed(self) -> bool:
        return self.verdict != self.recorded_verdict


@dataclass(frozen=True)
class ReplayReport:
    """Everything ``rt2-replay`` prints; ``ok`` decides its exit code."""

    path: str
    duration_s: float
    instructions: tuple[str, ...]
    steps: tuple[ReplayStep, ...]
    replies: int  # ActionTokens messages
    unexecuted_replies: int  # replies without a published arm action (dropped late/stale/invalid)
    now_valid_seqs: tuple[int, ...]  # unexecuted because invalid, valid with the candidate tokenizer
    changed_params: tuple[str, ...]  # "key: recorded -> candidate"
    counters: dict[str, int]  # candidate safety run
    recorded_counters: dict[str, int]  # safety run with the recorded params
    status_counters: dict[str, int] | None  # change of /rt2_safety/status counters over the recording
    notes: tuple[str, ...] = ()
    episodes: tuple[tuple[str, str], ...] = ()  # (short id, instruction) of each announced episode, in order
    params_recorded: tuple[str, ...] = ()  # nodes whose parameters the run parameters come from (the file's)
    params_assumed: tuple[str, ...] = REPLAY_NODES  # nodes whose parameters are not in the file: defaults assumed
    candidate_source: str = ""  # where the replay parameters come from ("" = the run parameters, unchanged)

    @property
    def mismatches(self) -> int:
        return sum(1 for s in self.steps if s.match is False)

    @property
    def verdict_changes(self) -> int:
        return sum(1 for s in self.steps if s.verdict_changed)

    @property
    def ok(self) -> bool:
        """The replay parameters reproduce the run; never for a recording without arm actions."""
        return bool(self.steps) and self.mismatches == 0 and self.verdict_changes == 0 and not self.now_valid_seqs


class ReplayConfigError(ValueError):
    """Replay parameters are invalid (the message names the key)."""



def _replay_node(key: str) -> str | None:
    if key.startswith("tokenizer."):
        return "rt2_policy"
    if key.startswith("safety."):
        return "rt2_safety"
    return None


def recorded_param_nodes(path: str | Path, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The nodes (of :data:`REPLAY_NODES`) whose parameters the recording holds: its ``params_from``
    metadata (rt2-record), else those whose keys are present (older files, EpisodeRecorder(params=))."""
    run = read_metadata(path).get(META_RUN, {})
    params = recorded_params(path) if params is None else params
    if "params_from" in run:
        try:
            named = set(json.loads(run["params_from"]))
        except (ValueError, TypeError):
            named = set()
        return tuple(n for n in REPLAY_NODES if n in named)
    return tuple(n for n in REPLAY_NODES if any(_replay_node(k) == n for k in params))


def _split_params(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.*, safety.*) of a flat parameter dict; other keys (e.g. a retired
    ``ee_pose_timeout_s`` in an old recording's metadata) are not used."""
    tok = {k: v for k, v in flat.items() if k.startswith("tokenizer.") and v is not None}
    saf = {k: v for k, v in flat.items() if k.startswith("safety.") and v is not None}
    return tok, saf


def _build_filters(flat: Mapping[str, Any]) -> tuple[Any, Any]:
    from rt2_ros.params import ConfigError
    from rt2_ros.safety import SafetyConfig
    from rt2_ros.tokens import ActionTokenizer

    tok, saf = _split_params(flat)
    try:
        return ActionTokenizer.from_config(tok), SafetyConfig.from_params(saf)
    except ConfigError as exc:
        raise ReplayConfigError(str(exc)) from exc


def _stamp_ns(stamp: Any) -> int | None:
    """A recorded ``builtin_interfaces/Time`` in ns; None when absent (a message recorded before the
    field existed) or zero (unset: unknown age), as the safety node takes it."""
    if stamp is None:
        return None
    ns = int(getattr(stamp, "sec", 0)) * 10**9 + int(getattr(stamp, "nanosec", 0))
    return ns if ns > 0 else None


def _arm_action_from_msg(msg: Any) -> ArmAction:
    t, r = msg.translation, msg.rotation
    return ArmAction(translation=(t.x, t.y, t.z), rotation=(r.x, r.y, r.z), gripper=float(msg.gripper),
                     terminate=bool(msg.terminate), gripper_relative=bool(msg.gripper_relative),
                     observation_seq=int(msg.observation_seq))


def _same_action(a: ArmAction, b: ArmAction) -> bool:
    if a.terminate or b.terminate:
        return a.terminate == b.terminate  # the motion fields of a terminate action are never used
    return (a.gripper_relative == b.gripper_relative
            and bool(np.allclose(a.translation, b.translation, rtol=0.0, atol=_MATCH_ATOL))
            and bool(np.allclose(a.rotation, b.rotation, rtol=0.0, atol=_MATCH_ATOL))
            and abs(a.gripper - b.gripper) <= _GRIPPER_ATOL)


def _redecode(tokenizer: Any, tokens_msg: Any, seq: int) -> tuple[ArmAction | None, str]:
    """The candidate tokenizer's action for a recorded reply, or (None, why not)."""
    from rt2_ros.tokens import TokenError

    try:
        if tokens_msg.text:
            return tokenizer.decode(tokenizer.parse_text(tokens_msg.text).bins, observation_seq=seq), ""
        if len(tokens_msg.tokens):
            return tokenizer.decode(np.asarray(list(tokens_msg.tokens), dtype=np.int64), observation_seq=seq), ""
    except TokenError as exc:
        return None, f"invalid: {exc}"
    return None, ""


def _episode_key(value: Any) -> bytes:
    """A recorded episode id as 16 bytes: a ``unique_identifier_msgs/UUID`` as decoded from the
    file, or the uint64 counter of recordings made before the UUID episode protocol."""
    if isinstance(value, int):
        return value.to_bytes(16, "big")
    return bytes(bytearray(getattr(value, "uuid", value)))


class _SafetyReplay:
    """The safety node's event handling around a SafetyFilter, driven by recorded log times.

    As rt2_ros.nodes.safety_node: an active ``/episode`` starts the filter episode from the
    measured pose (none younger than ``safety.max_pose_age_s``: a latched fault) and holds until
    the first action; an inactive one for the current episode stops it; an arm action of any
    other episode is dropped (``dropped:stale_episode`` for an episode that ended, else
    ``dropped:unknown_episode``). ``implicit_episodes`` (recordings without ``/episode`` messages,
    made before the protocol): the first action of a new episode id announces that episode.

    Times are seconds on the replay time base (log time since the recording's first message).
    The recorder logs a message at its ROS receive time, so a ROS stamp converts as the node
    converts it at arrival (``now - (ros_now - stamp)``): ``(stamp - t0)``. The caller passes
    converted times: ``pose_time`` of each ee_pose (its header stamp) and ``observation_time``
    of each action (its ``observation_stamp``), None for a zero or missing stamp.
    """

    def __init__(self, config: Any, implicit_episodes: bool = False) -> None:
        from rt2_ros.safety import SafetyFilter

        self.filter = SafetyFilter(config)
        self.config = config
        self.period = 1.0 / config.command_rate_hz
        self.implicit_episodes = implicit_episodes
        self.episode_id = NO_EPISODE
        self.ended: set[bytes] = set()
        self.pose: tuple[tuple[float, ...], tuple[float, ...], float] | None = None  # p, q(wxyz), pose time
        self.next_tick: float | None = None
        self.drops: dict[str, int] = {}
        self.poses_ignored: dict[str, int] = {}  # why ee_poses were not used ("no_stamp", "future") -> count

    def _fresh_pose(self, t: float) -> tuple[tuple[float, ...], tuple[float, ...], float] | None:
        if self.pose is None or t - self.pose[2] > self.config.max_pose_age_s:
            return None
        return self.pose

    def advance(self, t: float) -> None:
        """Run the command-rate ticks up to time ``t`` (each with the last pose and its time, fresh or
        not: the filter holds once it is older than ``safety.max_pose_age_s``). A gap of more than
        _SETTLED_S without messages is ticked through for _SETTLED_S and then skipped on the same grid:
        by then the watchdog and the pose age hold the arm, and ticking a damaged file's log time jump
        (found by fuzzing: 10^9 s, ~3*10^10 ticks) would never end."""
        if self.next_tick is None:
            self.next_tick = t
        if t - self.next_tick > _SETTLED_S:
            self._tick_until(self.next_tick + _SETTLED_S)
            self.next_tick += math.floor((t - self.next_tick) / self.period) * self.period
        self._tick_until(t)

    def _tick_until(self, t: float) -> None:
        while self.next_tick <= t:
            if self.pose is None:
                self.filter.tick(self.next_tick)
            else:
                self.filter.tick(self.next_tick, self.pose[0], self.pose[1], pose_time=self.pose[2])
            self.next_tick += self.period

    def on_pose(self, t: float, position: tuple[float, ...], orientation: tuple[float, ...],
                pose_time: float | None) -> None:
        """An ee_pose logged at ``t``, measured at ``pose_time`` (None: zero stamp, not used)."""
        if pose_time is None:
            self.poses_ignored["no_stamp"] = self.poses_ignored.get("no_stamp", 0) + 1
            return
        if pose_time - t > self.config.max_future_stamp_s:
            self.poses_ignored["future"] = self.poses_ignored.get("future", 0) + 1
            return
        if self.pose is not None and pose_time < self.pose[2]:
            return  # an older pose than the one held (reordered delivery)
        self.pose = (position, orientation, pose_time)

    def on_episode(self, t: float, episode_id: bytes, active: bool, reason: str = "") -> None:
        from rt2_ros.safety import SafetyState

        if not active:
            if episode_id == self.episode_id:
                self.ended.add(self.episode_id)
                self.episode_id = NO_EPISODE
                self.filter.stop_episode(reason or "ended by the policy node")
            return
        if self.episode_id != NO_EPISODE:
            self.ended.add(self.episode_id)
        self.episode_id = episode_id
        pose = self._fresh_pose(t)
        if self.filter.state == SafetyState.ESTOPPED:
            return  # the episode is current, its actions are ignored until a reset
        if pose is None:
            self.filter.fault("no fresh end-effector pose on ee_pose; cannot start the episode", latch=True)
        elif self.filter.start_episode(pose[0], pose[1], None, t, pose_time=pose[2]):
            self.filter.hold("waiting for the first action")

    def on_estop(self, pressed: bool) -> None:
        if pressed:
            self.filter.estop("estop topic")

    def on_action(self, t: float, action: ArmAction, episode_id: bytes,
                  observation_time: float | None) -> tuple[str, ...]:
        if (self.implicit_episodes and episode_id not in (self.episode_id, NO_EPISODE)
                and episode_id not in self.ended):
            self.on_episode(t, episode_id, True)
        if episode_id != self.episode_id or episode_id == NO_EPISODE:
            cause = "stale_episode" if episode_id in self.ended else "unknown_episode"
            self.drops[cause] = self.drops.get(cause, 0) + 1
            return (f"dropped:{cause}",)
        verdict = self.filter.on_action(action, t, observation_time=observation_time)
        return tuple(verdict.reasons) if verdict.reasons else (("ok",) if verdict.accepted else ("rejected",))

    @property
    def counters(self) -> dict[str, int]:
        return self.filter.counters


_STATUS_COUNTERS = ("actions_accepted", "actions_rejected", "actions_clipped", "watchdog_trips", "estops",
                    "terminations")


def replay(path: str | Path, recorded: Mapping[str, Any] | None = None,
           candidate: Mapping[str, Any] | None = None, candidate_source: str = "",
           recorded_nodes: Sequence[str] | None = None) -> ReplayReport:
    """Re-run tokenizer and safety filter over a recording.

    ``recorded``: the flat parameters the run used (default: the file's ``rt2_ros.params``
    metadata; a node whose parameters are not in it is assumed to have run with its defaults,
    and the report names it; ``recorded_nodes`` says whose parameters ``recorded`` holds,
    default: those whose keys it has). ``candidate``: the parameters to evaluate (default: the
    recorded ones), ``candidate_source`` says where they come from (for the report). Keys used:
    ``tokenizer.*`` and ``safety.*``.

    Each recorded ``/arm_action`` is a step. Its ``ActionTokens`` (same observation_seq) are
    re-decoded with the candidate tokenizer and compared with the recorded action. Two safety
    filters replay the same event stream (episodes, measured ee poses, e-stops, actions at
    their recorded times, command-rate ticks between them): one with the recorded params on the
    recorded actions, one with the candidate params on the re-decoded actions; their verdicts
    are compared. Freshness is judged as the safety node judges it: each action by its
    ``observation_stamp`` (zero or absent, as in recordings made before ArmAction had one:
    refused as ``no_observation_stamp``, with a note), each ee_pose by its header stamp.
    Episodes come from the recorded ``/episode`` announcements, as the safety node takes them (a
    recording without any is replayed with each new episode id starting an episode at its first
    action, with a note). Raises :class:`RecordingReadError` / :class:`ReplayConfigError`.
    """
    notes: list[str] = []
    if recorded is None:
        recorded = recorded_params(path)
        have = recorded_param_nodes(path, recorded)
    else:
        recorded = dict(recorded)
        have = tuple(n for n in REPLAY_NODES if any(_replay_node(k) == n for k in recorded)) \
            if recorded_nodes is None else tuple(n for n in REPLAY_NODES if n in recorded_nodes)
    # A node whose parameters are not in the file ran with values we do not know: its defaults stand in.
    recorded = {k: v for k, v in recorded.items() if _replay_node(k) in have or _replay_node(k) is None}
    assumed = tuple(n for n in REPLAY_NODES if n not in have)
    candidate = dict(recorded if candidate is None else candidate)
    rec_tok, rec_safety = _build_filters(recorded)
    cand_tok, cand_safety = _build_filters(candidate)
    changed = _changed_params(recorded, candidate)
    retired = {k: v for k, v in recorded.items() if k in _RETIRED_KEYS} if "rt2_safety" in have else {}
    for key, value in sorted(retired.items()):
        notes.append(f"the run had {key}={value!r}, a parameter the safety node no longer has: replaced by "
                     f"{_RETIRED_KEYS[key]}; the replay uses safety.max_pose_age_s={rec_safety.max_pose_age_s!r}")

    truncated: list[str] = []
    messages = sorted(iter_messages(path, truncated=truncated), key=lambda m: m.log_time_ns)
    notes.extend(truncated)
    t0 = messages[0].log_time_ns if messages else 0
    duration = (messages[-1].log_time_ns - t0) * 1e-9 if messages else 0.0

    implicit = not any(_classify(m) == "episode" for m in messages)
    if implicit and any(_classify(m) == "action" for m in messages):
        notes.append("no /episode messages recorded (a recording made before the episode protocol, or /episode "
                     "not recorded): each new episode id starts an episode at its first action, instructions "
                     "are not replayed")
    base = _SafetyReplay(rec_safety, implicit)
    cand = _SafetyReplay(cand_safety, implicit)

    def replay_time(stamp: Any) -> float | None:
        """A recorded ROS stamp on the replay time base (None: zero or absent, i.e. unknown)."""
        ns = _stamp_ns(stamp)
        return None if ns is None else (ns - t0) * 1e-9

    unstamped_actions = 0
    replies: dict[int, Any] = {}  # observation_seq -> latest ActionTokens
    executed: set[int] = set()
    steps: list[ReplayStep] = []
    instructions: list[str] = []  # of announced episodes
    topic_instructions: list[str] = []  # on /instruction (shown when no episode was announced)
    episodes: dict[str, str] = {}  # short id -> instruction
    statuses: list[Any] = []
    n_replies = 0
    profiles: set[str] = set()
    for m in messages:
        t = (m.log_time_ns - t0) * 1e-9
        kind = _classify(m)
        if kind is None:
            continue
        try:
            base.advance(t)
            cand.advance(t)
            msg = m.message
            if kind == "tokens":
                n_replies += 1
                replies[int(msg.observation_seq)] = msg
                if msg.profile:
                    profiles.add(msg.profile)
            elif kind == "pose":
                p, q = msg.pose.position, msg.pose.orientation
                pose_time = replay_time(getattr(getattr(msg, "header", None), "stamp", None))
                for sim in (base, cand):
                    sim.on_pose(t, (p.x, p.y, p.z), (q.w, q.x, q.y, q.z), pose_time)
            elif kind == "episode":
                episode_id = _episode_key(msg.episode_id)
                if msg.active:
                    instructions.append(msg.instruction)
                    episodes.setdefault(short_id(episode_id), msg.instruction)
                for sim in (base, cand):
                    sim.on_episode(t, episode_id, bool(msg.active), msg.reason)
            elif kind == "instruction":
                if msg.data.strip():
                    topic_instructions.append(msg.data)
            elif kind == "estop":
                for sim in (base, cand):
                    sim.on_estop(bool(msg.data))
            elif kind == "status":
                statuses.append(msg)
            elif kind == "action":
                rec_action = _arm_action_from_msg(msg)
                seq = rec_action.observation_seq
                executed.add(seq)
                tokens_msg = replies.get(seq)
                redecoded, note, match = None, "no ActionTokens recorded for this observation", None
                if tokens_msg is not None:
                    redecoded, note = _redecode(cand_tok, tokens_msg, seq)
                    if redecoded is not None:
                        match = _same_action(rec_action, redecoded)
                    elif note:
                        match = False
                    else:
                        note = "continuous action chunk: nothing to re-decode"
                episode_id = _episode_key(msg.episode_id)
                # Absent in recordings made before ArmAction had the field; zero when a publisher left it unset.
                observed = replay_time(getattr(msg, "observation_stamp", None))
                unstamped_actions += observed is None
                recorded_verdict = base.on_action(t, rec_action, episode_id, observed)
                if match is False and redecoded is None:
                    verdict: tuple[str, ...] = ("not_executed:invalid_tokens",)
                else:
                    # Equal actions go in as recorded, so float noise can never flip a verdict.
                    verdict = cand.on_action(t, rec_action if match is not False else redecoded, episode_id, observed)
                steps.append(ReplayStep(len(steps) + 1, t, seq, short_id(episode_id),
                                        tuple(int(v) for v in (tokens_msg.tokens if tokens_msg is not None else ())),
                                        rec_action, redecoded, note, match, verdict, recorded_verdict))
        except (AttributeError, TypeError) as exc:
            # the file's own schema decoded it: a schema of the right name may still lack a field we read
            raise RecordingReadError(f"{m.topic}: a {m.type_name} message without the fields of that type "
                                     f"({exc}); written with other message definitions?") from None

    now_valid: list[int] = []
    unexecuted = [(s, r) for s, r in replies.items() if s not in executed]
    for seq, msg in unexecuted:
        was, _ = _redecode(rec_tok, msg, seq)
        now, _ = _redecode(cand_tok, msg, seq)
        if was is None and now is not None and msg.text:
            now_valid.append(seq)
    recorded_profile = getattr(rec_tok, "profile", "")
    if profiles and recorded_profile not in profiles:
        notes.append(f"ActionTokens say profile {', '.join(sorted(profiles))}, but the recorded parameters give "
                     f"{recorded_profile}: the recording's params metadata may be incomplete")
    if not steps:
        if truncated:
            raise RecordingReadError(f"{truncated[0]}; no arm action before that point, nothing to replay")
        notes.append("no /arm_action messages in the recording: nothing to replay (was the policy running, and "
                     "did rt2-record record /arm_action?)")
    if unstamped_actions:
        notes.append(f"{unstamped_actions} of {len(steps)} arm actions carry no observation_stamp (zero, or a "
                     "recording made before ArmAction had the field): the safety node refuses an action of unknown "
                     "age, and so does the replay (rejected:no_observation_stamp); such a recording cannot show "
                     "what the filter would have executed")
    for cause, text in (("no_stamp", "a zero header stamp (unknown age)"),
                        ("future", "a header stamp further ahead of the log time than safety.max_future_stamp_s "
                                   "(recorded params)")):
        if base.poses_ignored.get(cause):
            notes.append(f"{base.poses_ignored[cause]} /ee_pose messages not used, as the safety node ignores them: "
                         f"{text}")
    if base.drops:
        notes.append("arm actions of an episode the safety node was not executing, dropped as the node does: "
                     + ", ".join(f"{cause} {n}" for cause, n in sorted(base.drops.items())))
    status_counters = None
    if len(statuses) >= 2:
        status_counters = {k: int(getattr(statuses[-1], k)) - int(getattr(statuses[0], k)) for k in _STATUS_COUNTERS}
        replayed = base.counters
        if any(status_counters[k] != replayed[k] for k in ("actions_accepted", "actions_rejected")):
            notes.append("the safety replay with the recorded params does not reproduce the recorded "
                         "/rt2_safety/status counts (see below): timing-dependent verdicts may differ from the run")
    return ReplayReport(str(path), duration, tuple(instructions or topic_instructions), tuple(steps), n_replies,
                        len(unexecuted), tuple(sorted(now_valid)), changed, cand.counters, base.counters,
                        status_counters, tuple(notes), tuple(episodes.items()), have, assumed, candidate_source)


def _classify(m: RecordedMessage) -> str | None:
    t = m.type_name
    if t == "rt2_ros_interfaces/msg/ArmAction":
        return "action"
    if t == "rt2_ros_interfaces/msg/ActionTokens":
        return "tokens"
    if t == "rt2_ros_interfaces/msg/SafetyStatus":
        return "status"
    if t == "rt2_ros_interfaces/msg/Episode":
        return "episode"
    if t == "geometry_msgs/msg/PoseStamped" and m.topic.endswith("ee_pose"):
        return "pose"
    if t == "std_msgs/msg/String" and m.topic.endswith("instruction"):
        return "instruction"
    if t == "std_msgs/msg/Bool" and m.topic.endswith("estop"):
        return "estop"
    return None


def _changed_params(recorded: Mapping[str, Any], candidate: Mapping[str, Any]) -> tuple[str, ...]:
    from rt2_ros.safety import SAFETY_PARAMS
    from rt2_ros.tokens import TOKENIZER_PARAMS

    defaults = {s.name: s.default for s in (*TOKENIZER_PARAMS, *SAFETY_PARAMS)}
    out = []
    for key in sorted(defaults):
        a, b = recorded.get(key, defaults[key]), candidate.get(key, defaults[key])
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return tuple(out)


# -- report ---------------------------------------------------------------------------------------------
def format_action(a: ArmAction | None) -> str:
    """Compact action text: translation mm, rotation mrad, gripper; "TERMINATE" for terminate."""
    if a is None:
        return "-"
    if a.terminate:
        return "TERMINATE"
    t = ",".join(f"{v * 1e3:+.1f}" for v in a.translation)
    r = ",".join(f"{v * 1e3:+.0f}" for v in a.rotation)
    g = f"dg{a.gripper:+.2f}" if a.gripper_relative else f"g{a.gripper:.2f}"
    return f"({t})mm ({r})mrad {g}"


def _nodes_text(nodes: Sequence[str]) -> str:
    return " and ".join(f"{n} ({REPLAY_KEYS[n]})" for n in nodes)


def describe_run_params(recorded: Sequence[str], assumed: Sequence[str]) -> str:
    """Which node's parameters a replay had from the recording and which it assumed (defaults)."""
    if not assumed:
        return f"{_nodes_text(recorded)} as recorded"
    missing = (f"{_nodes_text(assumed)} NOT in the recording: {'their' if len(assumed) > 1 else 'its'} defaults "
               "are assumed, which may not be what ran")
    return f"{_nodes_text(recorded)} as recorded; {missing}" if recorded else missing


def format_report(report: ReplayReport, only_changes: bool = False) -> str:
    """The human-readable table and summary ``rt2-replay`` prints."""
    lines = [f"recording: {report.path} ({report.duration_s:.1f} s, {report.replies} model replies, "
             f"{len(report.steps)} executed steps)"]
    for text in dict.fromkeys(report.instructions):
        lines.append(f"instruction: {text!r}")
    lines.append("run parameters: " + describe_run_params(report.params_recorded, report.params_assumed))
    lines.append(f"replay parameters: {report.candidate_source or 'the run parameters, unchanged'}")
    if report.changed_params:
        lines.append("parameters changed for the replay:")
        lines.extend(f"  {c}" for c in report.changed_params)
    lines.extend(f"note: {n}" for n in report.notes)
    header = (f"{'step':>4} {'t[s]':>7} {'seq':>5}  {'tokens':<31} {'recorded action':<42} "
              f"{'re-decoded':<42} {'match':<5}  safety verdict")
    lines += ["", header, "-" * len(header)]
    instruction_of = dict(report.episodes)
    episode = None
    for s in report.steps:
        if only_changes and s.match is not False and not s.verdict_changed:
            continue
        if s.episode_id != episode:  # a line per episode, before its first row shown
            episode = s.episode_id
            text = instruction_of.get(episode)
            lines.append(f"  episode {episode}" + (f": {text!r}" if text is not None else
                                                    " (never announced on /episode)" if report.episodes else ""))
        tokens = " ".join(str(v) for v in s.tokens) or "-"
        if s.match is None:
            redecoded, match = "(" + (s.redecode_note.split(":")[0] or "n/a") + ")", "n/a"
        elif s.redecoded is None:
            redecoded, match = s.redecode_note, "NO"
        else:
            redecoded, match = ("same" if s.match else format_action(s.redecoded)), ("yes" if s.match else "NO")
        verdict = ",".join(s.verdict)
        if s.verdict_changed:
            verdict += f"  (recorded params: {','.join(s.recorded_verdict)})"
        lines.append(f"{s.index:>4} {s.time_s:>7.2f} {s.observation_seq:>5}  {tokens:<31} "
                     f"{format_action(s.recorded):<42} {redecoded[:42]:<42} {match:<5}  {verdict}")
    c, rc = report.counters, report.recorded_counters
    redecoded = sum(1 for s in report.steps if s.redecoded is not None)
    invalid = sum(1 for s in report.steps if s.match is False and s.redecoded is None)
    nothing = sum(1 for s in report.steps if s.match is None)
    kinds = [f"re-decodable {redecoded}"] + ([f"invalid with the replay tokenizer {invalid}"] if invalid else []) \
        + ([f"no tokens to re-decode {nothing}"] if nothing else [])
    lines += ["", f"steps: {len(report.steps)} ({', '.join(kinds)}), action mismatches: {report.mismatches}, "
                  f"safety verdict changes: {report.verdict_changes}",
              f"safety with replay params: accepted {c['actions_accepted']}, clipped {c['actions_clipped']}, "
              f"rejected {c['actions_rejected']}, watchdog trips {c['watchdog_trips']}, "
              f"terminations {c['terminations']}",
              f"safety with recorded params: accepted {rc['actions_accepted']}, clipped {rc['actions_clipped']}, "
              f"rejected {rc['actions_rejected']}, watchdog trips {rc['watchdog_trips']}, "
              f"terminations {rc['terminations']}"]
    if report.status_counters is not None:
        sc = report.status_counters
        lines.append(f"recorded /rt2_safety/status (change over the recording): accepted +{sc['actions_accepted']}, "
                     f"clipped +{sc['actions_clipped']}, rejected +{sc['actions_rejected']}, "
                     f"watchdog trips +{sc['watchdog_trips']}")
    lines.append(f"model replies not executed (late, stale or invalid): {report.unexecuted_replies}"
                 + (f"; valid with the replay params: seq {', '.join(map(str, report.now_valid_seqs))}"
                    if report.now_valid_seqs else ""))
    if not report.steps:
        lines.append("result: NOTHING TO REPLAY - the recording holds no arm action")
    else:
        lines.append("result: " + ("MATCH - the replay params reproduce the recorded run" if report.ok else
                                   "CHANGED - the replay params would have changed the run (see rows marked NO or "
                                   "with a recorded-params verdict)"))
    return "\n".join(lines)


# -- rt2-replay --------------------------------------------------------------------------------------------
def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ReplayConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. tokenizer.translation_scale_m=0.03")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ReplayConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return out


def _load_params_file(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(tokenizer.* of rt2_policy and safety.* of rt2_safety as the nodes would run
    with a ROS 2 params file, the nodes the file configures). The file is checked exactly as
    ``rt2-bringup --check`` checks it: a file the nodes would refuse is refused here too."""
    from rt2_ros.nodes.bringup import ParamsFileError, check_params
    from rt2_ros.params import ConfigError

    try:
        checked = check_params([path], nodes=REPLAY_NODES)
    except (ParamsFileError, ConfigError) as exc:
        raise ReplayConfigError(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from exc
    out = {k: v for k, v in checked.nodes["rt2_policy"].items() if k.startswith("tokenizer.")}
    out.update({k: v for k, v in checked.nodes["rt2_safety"].items() if k.startswith("safety.")})
    return out, tuple(n for n in REPLAY_NODES if n in checked.configured)


def _params_from_file(path: str) -> dict[str, Any]:
    """tokenizer.* of rt2_policy and safety.* of rt2_safety from a ROS 2 params file."""
    return _load_params_file(path)[0]


def build_replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rt2-replay",
        description="Re-run the tokenizer and the safety filter over an rt2_ros recording (MCAP) and show what "
                    "different parameters would have changed. Exit 0: the replay reproduces the recording; "
                    "1: actions or safety verdicts differ; 2: nothing to replay (unreadable file, no arm action) "
                    "or invalid parameters.")
    p.add_argument("file", help="recording (.mcap) written by rt2-record, rt2-demo or ros2 bag record -s mcap")
    p.add_argument("--params", default=None,
                   help="ROS 2 params YAML to evaluate (tokenizer.* of rt2_policy, safety.* of rt2_safety; keys it "
                        "does not set take their defaults), checked as rt2-bringup --check checks it; default: the "
                        "parameters stored in the recording")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter on top, e.g. --set tokenizer.translation_scale_m=0.03 (repeatable)")
    p.add_argument("--only-changes", action="store_true", help="print only steps whose action or verdict changed")
    return p


def replay_main(argv: list[str] | None = None) -> int:
    """``rt2-replay FILE.mcap [--params config/rt2.yaml] [--set KEY=VALUE ...]``."""
    args = build_replay_parser().parse_args(argv)
    try:
        recorded = recorded_params(args.file)
        have = recorded_param_nodes(args.file, recorded)
        # as replay() takes them (a retired rt2_safety key only for its note)
        run = {k: v for k, v in recorded.items()
               if _replay_node(k) in have or (k in _RETIRED_KEYS and "rt2_safety" in have)}
        source = ""
        if args.params:
            candidate, configured = _load_params_file(args.params)
            unset = [n for n in REPLAY_NODES if n not in configured]
            source = f"{args.params} ({_nodes_text(configured) or 'no rt2_policy or rt2_safety section'}; " + \
                (f"{' and '.join(unset)} not in it: defaults; " if unset else "") + "keys it does not set: defaults)"
        else:
            candidate = dict(run)
        given = _parse_set(args.set)
        unknown = [k for k in given if _replay_node(k) is None]
        if unknown:
            hint = f" ({unknown[0]} was replaced by {_RETIRED_KEYS[unknown[0]]})" if unknown[0] in _RETIRED_KEYS else ""
            raise ReplayConfigError(f"--set {unknown[0]}: replay only evaluates tokenizer.* and safety.*{hint}")
        candidate.update(given)
        if given:
            source = (source or "the run parameters") + " with --set " + ", ".join(args.set)
        report = replay(args.file, recorded=run, candidate=candidate, candidate_source=source, recorded_nodes=have)
    except RecordingReadError as exc:
        print(f"rt2-replay: {exc}", file=sys.stderr)
        return 2
    except ReplayConfigError as exc:
        print(f"rt2-replay: invalid parameters: {exc}", file=sys.stderr)
        return 2
    print(format_report(report, only_changes=args.only_changes))
    if not report.steps:
        return 2  # nothing was compared: never a pass
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(replay_main())
