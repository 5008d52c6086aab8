"""What every rt2_ros node shares: declared parameters from ParamSpecs, the main() idiom, images.

Parameters: each node declares its ParamSpecs with a ParameterDescriptor (description with units,
ranges), reads them back and validates them with the same ``resolve`` the pure core uses, so a
bad value fails at start-up with the key named. Overrides in the params file that no spec
declares are an error too (rclpy would otherwise ignore a typo silently); the standard
``qos_overrides.<topic>...`` keys of topics created with :data:`QOS_OVERRIDES` are declared by rclpy.
:class:`LiveParameters` lets ``ros2 param set`` change the parameters a node names as live, checked
by the same specs and the node's cross-checks, and refuses the others with the reason.

Lifecycle: the nodes are managed (``rclpy.lifecycle``); :func:`run_nodes` takes those with
``autostart: true`` through configure and activate, and a failed configure ends the process
with exit code 2 and the error (under a lifecycle manager, with autostart off, the node stays
unconfigured instead). :func:`guarded` wraps callbacks so an unexpected exception ends in a
hold and one log line, never in a dead node.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from unique_identifier_msgs.msg import UUID

from rt2_ros.params import ConfigError, ParamSpec, resolve

_PARAM_TYPES = {
    "bool": (ParameterType.PARAMETER_BOOL, Parameter.Type.BOOL),
    "int": (ParameterType.PARAMETER_INTEGER, Parameter.Type.INTEGER),
    "double": (ParameterType.PARAMETER_DOUBLE, Parameter.Type.DOUBLE),
    "string": (ParameterType.PARAMETER_STRING, Parameter.Type.STRING),
    "double_array": (ParameterType.PARAMETER_DOUBLE_ARRAY, Parameter.Type.DOUBLE_ARRAY),
    "int_array": (ParameterType.PARAMETER_INTEGER_ARRAY, Parameter.Type.INTEGER_ARRAY),
    "string_array": (ParameterType.PARAMETER_STRING_ARRAY, Parameter.Type.STRING_ARRAY),
}

# Latched topics (instruction, status): reliable + transient-local so late joiners get the last one.
LATCHED_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Arm actions: reliable and deep enough that a slow subscriber never loses a step of a chunk.
ACTION_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
# Controller commands: reliable, shallow; a command that cannot be delivered now is worthless later.
COMMAND_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
# Episode announcements and instructions: reliable, volatile. Volatile on purpose: a (re)started
# node must not pick up an old instruction or episode and resume a task nobody asked for now.
EVENT_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)
# E-stop readers, one per kind of writer, because DDS only matches a reader whose requests the writer
# meets: transient-local gets the last value of a latched writer (a button held before this node
# started), reliable-volatile matches a writer of the ROS default QoS, best-effort matches a
# sensor-QoS writer. A reliable writer matches several of them; latching is idempotent.
ESTOP_QOS = (
    LATCHED_QOS,
    QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
               durability=DurabilityPolicy.VOLATILE),
    QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT,
               durability=DurabilityPolicy.VOLATILE),
)
# Topics created with this accept the standard qos_overrides.<topic>.<entity>.<policy> parameters.
QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()

AUTOSTART = "autostart"
AUTOSTART_PARAM = ParamSpec(AUTOSTART, "bool", True,
                            "Configure and activate this managed node at start-up (false: a lifecycle manager does)")
LIFECYCLE_PARAMS = (AUTOSTART_PARAM,)


def uuid_msg(episode_id: bytes) -> UUID:
    return UUID(uuid=list(episode_id))


def _descriptor(spec: ParamSpec) -> ParameterDescriptor:
    desc = spec.description + (f" [{spec.units}]" if spec.units else "")
    if spec.choices:
        desc += f" (one of: {', '.join(spec.choices)})"
    d = ParameterDescriptor(name=spec.name, type=_PARAM_TYPES[spec.type][0], description=desc)
    if spec.type == "double" and spec.low is not None and spec.high is not None:
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high), step=0.0)]
    if spec.type == "int" and spec.low is not None and spec.high is not None:
        d.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=0)]
    return d


def declare(node: Node, specs: Iterable[ParamSpec]) -> None:
    """Declare ``specs`` on ``node`` (those not declared yet); a bad override raises ConfigError naming the key."""
    for spec in specs:
        if node.has_parameter(spec.name):
            continue
        default = spec.default
        try:
            if isinstance(default, list) and not default:
                # rclpy cannot infer a type from an empty list: declare by type, keep the default here.
                node.declare_parameter(spec.name, _PARAM_TYPES[spec.type][1], _descriptor(spec))
            else:
                node.declare_parameter(spec.name, default, _descriptor(spec))
        except Exception as exc:  # rclpy raises several unrelated types for a bad override
            raise ConfigError(f"{spec.name}: {exc}") from exc


def read(node: Node, specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """The current values of declared ``specs``, validated (ConfigError names the key)."""
    specs = list(specs)
    values: dict[str, Any] = {}
    for spec in specs:
        given = node._parameter_overrides.get(spec.name)  # rclpy keeps the params-file values here
        if given is not None and given.type_ == Parameter.Type.NOT_SET and spec.default not in (None, [], ""):
            # rcl reads `key: []` as "no value"; silently running on the default (a workspace!) is worse.
            raise ConfigError(f"{spec.name}: an empty value in the params file; give the values (default "
                              f"{spec.default!r}) or remove the key")
        try:
            value = node.get_parameter(spec.name).value
        except ParameterUninitializedException:
            value = None  # declared by type and not overridden: the spec's default applies
        values[spec.name] = spec.default if value is None else \
            (list(value) if spec.type.endswith("_array") else value)
    return resolve(specs, values)


def declare_and_read(node: Node, specs: Iterable[ParamSpec]) -> dict[str, Any]:
    """Declare ``specs`` on ``node`` and return their validated values (ConfigError names the key)."""
    specs = list(specs)
    declare(node, specs)
    return read(node, specs)


class LiveParameters:
    """``ros2 param set`` for a configured node: live keys are validated and applied, others refused.

    While the node is unconfigured every declared parameter may be set (configure validates them
    all). Once configured, a key in ``live`` is checked by its ParamSpec, then by ``check(changes)``
    (the node's cross-checks; returns "" or the reason), then ``apply(changes)`` runs; a key not in
    ``live`` is refused with the way to change it (cleanup, set, configure).
    """

    def __init__(self, node: Node, specs: Iterable[ParamSpec], live: Iterable[str],
                 check: Callable[[dict[str, Any]], str], apply: Callable[[dict[str, Any]], None]) -> None:
        self._node = node
        self._specs = {s.name: s for s in specs}
        self._live = frozenset(live)
        self._check, self._apply = check, apply
        self.configured = False
        node.add_on_set_parameters_callback(self._on_set)

    def _on_set(self, params: list[Parameter]) -> SetParametersResult:
        if not self.configured:
            return SetParametersResult(successful=True)
        changes: dict[str, Any] = {}
        for p in params:
            if p.name not in self._live:
                return SetParametersResult(successful=False, reason=(
                    f"{p.name} is not live: deactivate and clean up the node, set it, then configure and activate "
                    f"(live parameters: {', '.join(sorted(self._live))})"))
            value = list(p.value) if isinstance(p.value, (list, tuple)) or hasattr(p.value, "tolist") else p.value
            try:
                changes[p.name] = self._specs[p.name].validate(value)
            except ConfigError as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        try:
            reason = self._check(changes)
        except ConfigError as exc:
            reason = str(exc)
        if reason:
            return SetParametersResult(successful=False, reason=reason)
        self._apply(changes)
        self._node.get_logger().info("parameters changed live: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        return SetParametersResult(successful=True)


def guarded(node: Node, name: str, on_error: Callable[[BaseException], None] | None = None,
            counter: Counter | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a callback: an unexpected exception is counted, logged once per (callback, type), and
    ``on_error`` puts the node into a safe state (a hold). rclpy would re-raise it from spin and
    end the process, and with it the safety node's command stream."""
    seen: set[str] = set()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # the point: nothing escapes into the executor
                if counter is not None:
                    counter[f"callback_errors:{name}"] += 1
                kind = type(exc).__name__
                if kind not in seen:
                    seen.add(kind)
                    node.get_logger().error(f"{name}: unexpected {kind}: {exc!s:.300}; holding (logged once)")
                if on_error is not None:
                    try:
                        on_error(exc)
                    except Exception as inner_exc:
                        node.get_logger().error(f"{name}: hold after the error failed too: {inner_exc!s:.200}",
                                                throttle_duration_sec=5.0)
                return None
        return inner
    return wrap


def _own_copy(qos: Any) -> Any:
    """rclpy applies qos_overrides to the profile object it is given, in place: a shared module-level
    profile would carry one node's override to every later topic of the process."""
    return copy.copy(qos) if isinstance(qos, QoSProfile) else qos


class ConfiguredEntities:
    """What a managed node creates in configure and destroys in cleanup: its publishers,
    subscriptions, services and named timers (a named timer can be re-made at a new period)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._entities: list[tuple[Callable[[Any], Any], Any]] = []
        self._timers: dict[str, Any] = {}

    def _keep(self, destroy: Callable[[Any], Any], entity: Any) -> Any:
        self._entities.append((destroy, entity))
        return entity

    def publisher(self, msg_type: Any, topic: str, qos: Any, **kwargs: Any) -> Any:
        return self._keep(self._node.destroy_publisher,
                          self._node.create_publisher(msg_type, topic, _own_copy(qos), **kwargs))

    def subscription(self, msg_type: Any, topic: str, callback: Callable[[Any], Any], qos: Any,
                     **kwargs: Any) -> Any:
        return self._keep(self._node.destroy_subscription,
                          self._node.create_subscription(msg_type, topic, callback, _own_copy(qos), **kwargs))

    def service(self, *args: Any, **kwargs: Any) -> Any:
        return self._keep(self._node.destroy_service, self._node.create_service(*args, **kwargs))

    def timer(self, name: str, period_s: float, callback: Callable[[], Any]) -> None:
        """Create the timer ``name``, replacing one of that name (a live rate change)."""
        old = self._timers.pop(name, None)
        if old is not None:
            self._node.destroy_timer(old)
        self._timers[name] = self._node.create_timer(period_s, callback)

    def has_timer(self, name: str) -> bool:
        return name in self._timers

    def one_shot(self, name: str, callback: Callable[[], Any]) -> None:
        """Create the idle timer ``name``: it fires ``callback`` once per :meth:`arm`."""
        def fire() -> None:
            self._timers[name].cancel()
            callback()

        old = self._timers.pop(name, None)
        if old is not None:
            self._node.destroy_timer(old)
        self._timers[name] = self._node.create_timer(1.0, fire, autostart=False)

    def arm(self, name: str, delay_s: float) -> None:
        """Fire the one-shot timer ``name`` once, ``delay_s`` from now (re-arming moves it)."""
        timer = self._timers.get(name)
        if timer is not None:
            timer.timer_period_ns = max(1, int(delay_s * 1e9))
            timer.reset()

    def reset_timer(self, name: str) -> None:
        """Restart the countdown of timer ``name`` from now (no-op if there is none)."""
        timer = self._timers.get(name)
        if timer is not None:
            timer.reset()

    def guard_condition(self, callback: Callable[[], Any]) -> Any:
        """A guard condition whose ``trigger()`` (thread-safe) runs ``callback`` on the executor."""
        return self._keep(self._node.destroy_guard_condition, self._node.create_guard_condition(callback))

    def destroy_all(self) -> None:
        for timer in self._timers.values():
            self._node.destroy_timer(timer)
        self._timers.clear()
        for destroy, entity in reversed(self._entities):
            destroy(entity)
        self._entities.clear()


def configure_failure(node: Node, exc: BaseException) -> TransitionCallbackReturn:
    """Log a failed configure (the node stays unconfigured) and remember it for autostart."""
    node.configure_error = str(exc)  # type: ignore[attr-defined]
    node.get_logger().error(f"configure failed, node stays unconfigured: {exc}")
    return TransitionCallbackReturn.FAILURE


def autostart(node: Node) -> None:
    """Take a lifecycle node with ``autostart: true`` to active; a failed configure -> ConfigError."""
    if not isinstance(node, LifecycleNode) or not node.get_parameter(AUTOSTART).value:
        return
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        raise ConfigError(getattr(node, "configure_error", "") or f"{node.get_name()}: configure failed")
    if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
        raise ConfigError(f"{node.get_name()}: activate failed")


def reject_unknown_overrides(node: Node, allow_prefixes: tuple[str, ...] = ()) -> None:
    """Fail on params-file keys that no spec declared (typos must not be silently ignored).

    Call it after the node created its topics: rclpy declares the ``qos_overrides.*`` keys of
    topics created with :data:`QOS_OVERRIDES` then, and an override for any other topic is unknown.
    """
    declared = set(node._parameters)  # rclpy keeps declared parameters here
    unknown = sorted(k for k in node._parameter_overrides
                     if k not in declared and k not in ("use_sim_time", "start_type_description_service")
                     and not k.startswith(allow_prefixes))
    if unknown:
        raise ConfigError(f"unknown parameter(s) for node {node.get_name()}: {', '.join(unknown)}")


# Fast DDS (rmw_fastrtps_cpp) publishes synchronously by default: publish() sends to every matched
# reader in the caller's thread and can block there. Measured on the safety node while a reader's
# process had just started and was then SIGSTOPped: publish() of the 30 Hz command timer blocked
# 1.0-1.3 s (0.3 s with the UDP transport only) using ~1 ms CPU and < 1 ms run-queue wait, i.e.
# waiting inside Fast DDS, not starved (1 s is the shared-memory port health-check timeout).
# Asynchronous mode only queues the sample and a Fast DDS thread sends it: no publish() block was
# seen then. Read when the participant is created, so set before rclpy.init; the user's value wins.
PUBLICATION_MODE_ENV = "RMW_FASTRTPS_PUBLICATION_MODE"


def use_async_publication() -> None:
    """Make this process's Fast DDS publishers asynchronous (a node whose timer must never stall).

    It shortens, but does not remove, the stall behind a stopped reader on this machine: a Fast DDS
    thread can still wait ~1 s in the shared-memory transport, and the depth-1 writer then blocks or
    refuses publish() (README "The command stream under a stuck reader": open work)."""
    os.environ.setdefault(PUBLICATION_MODE_ENV, "ASYNCHRONOUS")


def run_node(factory: Callable[[], Node], args: list[str] | None = None) -> int:
    """The standard rclpy main for one node: init, build, spin, clean shutdown; ConfigError -> exit 2."""
    return run_nodes(lambda nodes: nodes.append(factory()), args)


def run_nodes(build: Callable[[list[Node]], None], args: list[str] | None = None, *, name: str = "[rt2_ros]",
              on_ready: Callable[[list[Node]], None] | None = None) -> int:
    """Init rclpy, let ``build`` append nodes, spin them on one executor until SIGINT/SIGTERM.

    Our signal handlers, not rclpy's: rclpy's shut the context down on SIGINT before ``close()``
    runs, so the safety node could not send its last zero twist (and exited 1 under ros2 launch).
    SIGINT (Ctrl-C, ros2 launch) and SIGTERM abort the start-up, or once spinning set a flag the
    spin loop checks every 0.1 s: an exception raised from a handler while spinning can land
    inside rclpy's C++ message conversion and crash the node. While the nodes close, further
    signals are ignored: a terminal's Ctrl-C reaches a launched node twice (terminal, ros2 launch).
    Nodes built before a failure are closed too. Returns 0, or 2 on a ConfigError.
    """
    stop = threading.Event()
    spinning = False

    def on_signal(signum: int, frame: Any) -> None:
        if not spinning:
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    nodes: list[Node] = []
    # Single-threaded: backend calls already run on the policy node's own worker threads, and
    # rclpy's MultiThreadedExecutor cost 2.7x the CPU for the same nodes (docs/sim.md).
    executor = SingleThreadedExecutor()
    try:
        build(nodes)
        for node in nodes:
            autostart(node)
            executor.add_node(node)
        if on_ready is not None:
            on_ready(nodes)
        spinning = True
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except ConfigError as exc:
        print(f"{name} configuration error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Stop callbacks first, then let each node leave a safe state, then destroy.
        executor.shutdown(timeout_sec=2.0)
        close_nodes(reversed(nodes))
        rclpy.try_shutdown()
    return 0


def close_nodes(nodes: Iterable[Node]) -> None:
    """Let each node leave a safe state (``close()``: e.g. the safety node's last zero twist), then destroy it."""
    for node in nodes:
        close = getattr(node, "close", None)
        if close is not None:
            close()
        node.destroy_node()


# -- images ---------------------------------------------------------------------------------------
class ImageConversionError(ValueError):
    """A camera message could not be turned into an RGB array (encoding, size, corrupt data)."""


_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC3": 3, "8UC1": 1}


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/Image`` -> uint8 HxWx3 RGB (numpy view + channel fix; cv_bridge is not needed)."""
    enc = msg.encoding
    if enc not in _CHANNELS:
        raise ImageConversionError(f"unsupported image encoding {enc!r}; use one of {sorted(_CHANNELS)}")
    ch = _CHANNELS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"empty image {w}x{h}")
    if step < w * ch or len(msg.data) < step * h:
        raise ImageConversionError(f"image data too short: {len(msg.data)} bytes for {w}x{h} {enc} step {step}")
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8, count=step * h).reshape(h, step)[:, : w * ch]
    img = buf.reshape(h, w, ch)
    if enc in ("bgr8", "8UC3"):
        img = img[:, :, ::-1]
    elif enc == "rgba8":
        img = img[:, :, :3]
    elif enc == "bgra8":
        img = img[:, :, 2::-1]
    elif ch == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG/PNG) -> uint8 HxWx3 RGB."""
    import cv2

    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ImageConversionError(f"could not decode compressed image (format {msg.format!r}, {data.size} bytes)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rgb_to_image_msg(image: np.ndarray, stamp: Any, frame_id: str) -> Any:
    """uint8 HxWx3 RGB -> ``sensor_msgs/Image`` rgb8."""
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(image.shape[0]), int(image.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return msg


def sec_to_stamp(seconds: float) -> Time:
    """A builtin_interfaces/Time from ROS seconds (NaN or negative: zero, the "unknown" stamp)."""
    if not math.isfinite(seconds) or seconds <= 0.0:
        return Time()
    nanos = round(seconds * 1e9)
    return Time(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)


def stamp_to_sec(stamp: Any) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9
