"""``rt2-record``: record an rt2_ros run (simulated or real arm) to an MCAP file.

Subscribes to the rt2 topics (camera and wrist camera, instruction, episode announcements, model
tokens, arm actions, safety status, controller commands, measured end-effector pose; see
:data:`rt2_ros.recording.DEFAULT_TOPICS`) with the reliability/durability their publishers use,
so latched topics (safety status, e-stop) arrive even when they were published before the
recorder started; instructions and episodes are volatile events, recorded from the moment the
recorder runs (start it before sending the instruction). Messages are taken
as raw CDR bytes (``raw=True``): nothing is decoded and re-encoded, a camera frame costs one
copy, and the file holds exactly what went over DDS. The parameters of the running
``rt2_policy`` and ``rt2_safety`` nodes are fetched over their parameter services as soon as
they appear (polled every 0.2 s) and stored as metadata, which is what ``rt2-replay`` compares
against; once all are stored the recorder prints ``rt2-record: stored the parameters of ...``
(``rt2-demo`` waits for that line before it sends the instruction). On stop, parameters still
missing are waited for while their node answers (up to 5 s); the metadata names the nodes whose
parameters are in the file (``params_from``) and those that are not (``params_missing``).

Ctrl-C / SIGTERM / ``--duration`` end the recording; the file is always finalised. The file is
flushed every second, so even a killed recorder leaves a file ``mcap recover`` can repair.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rt2_ros.recording import (
    DEFAULT_QOS,
    DEFAULT_TOPICS,
    META_PARAMS,
    META_RUN,
    QOS_KINDS,
    EpisodeRecorder,
    RecordingError,
    import_message_type,
    normalize_type_name,
)

_IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
_PARAM_POLL_PERIOD_S = 0.2
_PARAM_CALL_TIMEOUT_S = 5.0
# On stop, how long to wait for parameters not fetched yet from nodes that are still there.
_PARAM_FINAL_WAIT_S = 5.0
# The recorder's own queue is deeper than the publishers' so a slow write (a big frame) does
# not make DDS drop the small messages that arrive meanwhile; depth never affects matching.
_MIN_SUBSCRIPTION_DEPTH = 50
_ROS_INTERNAL_PARAMS = frozenset({"use_sim_time", "start_type_description_service"})


def parse_topics(items: Sequence[str] | None) -> dict[str, str]:
    """``--topics`` entries (``/topic`` for a known rt2 topic, or ``/topic:pkg/msg/Type``) -> topic: type."""
    if not items:
        return dict(DEFAULT_TOPICS)
    out: dict[str, str] = {}
    for item in items:
        topic, sep, type_text = item.partition(":")
        topic = topic if topic.startswith("/") else "/" + topic
        if sep:
            out[topic] = normalize_type_name(type_text)
        elif topic in DEFAULT_TOPICS:
            out[topic] = DEFAULT_TOPICS[topic]
        else:
            raise RecordingError(f"--topics {item}: not an rt2 topic; give its type as {topic}:pkg/msg/Type")
    return out


def default_output() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path("episodes") / f"rt2_{stamp}.mcap"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rt2-record", description="Record an rt2_ros run to an MCAP file that "
                                "`ros2 bag info/play` and Foxglove open; replay it with rt2-replay.")
    p.add_argument("--out", default=None, help="output file (default: episodes/rt2_<date>_<time>.mcap)")
    p.add_argument("--topics", nargs="+", default=None, metavar="TOPIC[:TYPE]",
                   help="topics to record instead of the default rt2 set; other topics as /name:pkg/msg/Type")
    p.add_argument("--image-rate", type=float, default=0.0, metavar="HZ",
                   help="keep at most HZ frames per second of each camera topic (0 = every frame; 2 keeps files "
                        "~5x smaller with a 10 Hz camera)")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="stop after S seconds (0 = until Ctrl-C)")
    p.add_argument("--param-nodes", nargs="*", default=["rt2_policy", "rt2_safety"], metavar="NODE",
                   help="nodes whose parameters are stored as metadata (default: rt2_policy rt2_safety; none: "
                        "give the option without names)")
    p.add_argument("--compression", choices=("zstd", "lz4", "none"), default="zstd", help="chunk compression")
    return p


@dataclass
class _ParamFetch:
    """Progress of reading one node's parameters (list, then get; a call that hangs is retried)."""

    client: Any
    future: Any = None  # the call in flight, None when idle
    started: float = 0.0  # monotonic time the call in flight was sent
    pending: dict[str, Any] | None = None  # one-name-at-a-time phase: name -> value
    queue: list[str] = field(default_factory=list)  # one-name-at-a-time phase: names still to get

    def reset(self) -> None:
        if self.future is not None and not self.future.done():
            self.future.cancel()
        self.future, self.pending, self.queue = None, None, []


class RecordNode:
    """The ROS side: subscriptions that hand raw messages to an :class:`EpisodeRecorder`.

    A plain object owning its rclpy nodes and executor (rather than a Node subclass) so that
    :func:`main` builds and closes recorder and nodes in a fixed order. The parameter clients
    live on a second node that is destroyed once the parameters are stored: each client adds
    entities to the wait set of every spin, and the recorder should spend its time writing.
    """

    def __init__(self, recorder: EpisodeRecorder, topics: dict[str, str], param_nodes: Sequence[str],
                 node_name: str = "rt2_record") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.parameter_client import AsyncParameterClient
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

        self.recorder = recorder
        self.node = rclpy.create_node(node_name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.instructions: list[str] = []
        for topic, type_name in topics.items():
            spec = QOS_KINDS[DEFAULT_QOS.get(topic, "default")]
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=max(spec.depth, _MIN_SUBSCRIPTION_DEPTH),
                             reliability=ReliabilityPolicy(spec.reliability),
                             durability=DurabilityPolicy(spec.durability))
            self.node.create_subscription(import_message_type(type_name), topic, partial(self._on_message, topic),
                                          qos, raw=True)
        # The run's instructions (metadata): from the episode announcements, which cover goals and
        # the instruction topic alike; from the instruction topic only when /episode is not recorded.
        self._episode_topics = {t for t, ty in topics.items() if ty == "rt2_ros_interfaces/msg/Episode"}
        self._string_topics = set() if self._episode_topics else {
            t for t, ty in topics.items() if ty == "std_msgs/msg/String" and t.endswith("instruction")}
        self.params: dict[str, dict[str, Any]] = {}  # node name -> its parameters, once fetched
        self._param_node = rclpy.create_node(f"{node_name}_params") if param_nodes else None
        self._param_fetches = {name: _ParamFetch(AsyncParameterClient(self._param_node, name))
                               for name in param_nodes}
        if self._param_node is not None:
            self._param_node.create_timer(_PARAM_POLL_PERIOD_S, self._poll_params)
            self.executor.add_node(self._param_node)
        # Until they are fetched, the file says whose parameters it lacks (a killed recorder's too).
        recorder.add_metadata(META_RUN, {"params_from": [], "params_missing": list(param_nodes)})

    def spin_once(self, timeout_s: float) -> None:
        """Handle one callback (or wait up to ``timeout_s``)."""
        self.executor.spin_once(timeout_sec=timeout_s)
        if self._param_node is not None and not self.params_missing:
            self.executor.remove_node(self._param_node)
            self._param_node.destroy_node()
            self._param_node = None

    @property
    def params_missing(self) -> list[str]:
        """The nodes whose parameters are not stored yet."""
        return [name for name in self._param_fetches if name not in self.params]

    def finish_params(self, timeout_s: float) -> list[str]:
        """Before the file closes: keep fetching the missing parameters of nodes that are still
        there (their parameter services answer) for up to ``timeout_s``; returns those still missing."""
        deadline = time.monotonic() + timeout_s
        while self.params_missing and time.monotonic() < deadline:
            reachable = [n for n in self.params_missing if self._param_fetches[n].client.services_are_ready()]
            if not reachable:
                break
            self.spin_once(0.05)
        return self.params_missing

    def _now_ns(self) -> int:
        # ROS time: sim time under use_sim_time (0 before the first /clock), never a mix of clocks
        return self.node.get_clock().now().nanoseconds

    def _on_message(self, topic: str, data: bytes) -> None:
        self.recorder.write(topic, data, self._now_ns())
        text = None
        if topic in self._episode_topics:
            from rclpy.serialization import deserialize_message

            from rt2_ros_interfaces.msg import Episode

            episode = deserialize_message(data, Episode)
            text = episode.instruction if episode.active else None
        elif topic in self._string_topics:
            from rclpy.serialization import deserialize_message
            from std_msgs.msg import String

            text = deserialize_message(data, String).data
        if text is not None and (not self.instructions or self.instructions[-1] != text):
            self.instructions.append(text)
            self.recorder.add_metadata(META_RUN, {"instruction": text, "instructions": self.instructions})

    # -- parameters of the running nodes ------------------------------------------------------------
    def _poll_params(self) -> None:
        for name, fetch in self._param_fetches.items():
            if name in self.params:
                continue
            if fetch.future is not None:
                if time.monotonic() - fetch.started > _PARAM_CALL_TIMEOUT_S:
                    fetch.reset()  # the node vanished mid-call; try again on the next poll
                continue
            if not fetch.client.services_are_ready():
                continue
            fetch.future, fetch.started = fetch.client.list_parameters([], 0), time.monotonic()
            fetch.future.add_done_callback(partial(self._on_list, name, fetch.future))

    def _on_list(self, name: str, call: Any, future: Any) -> None:
        fetch = self._param_fetches[name]
        if fetch.future is not call or future.cancelled() or future.exception() is not None:
            return
        names = list(future.result().result.names)
        fetch.future = fetch.client.get_parameters(names)
        fetch.future.add_done_callback(partial(self._on_get, name, names, fetch.future))

    def _on_get(self, name: str, names: list[str], call: Any, future: Any) -> None:
        fetch = self._param_fetches[name]
        if fetch.future is not call or future.cancelled() or future.exception() is not None:
            return
        values = list(future.result().values)
        if len(values) == len(names):
            self._store_params(name, dict(zip(names, values, strict=True)))
            return
        # rclpy answers a batch with nothing at all when one parameter is declared without a
        # value (e.g. an empty list declared by type): ask again one name at a time, one request
        # in flight. A burst of requests lost answers: the service's response queue keeps 10, and
        # a node has more parameters than that.
        fetch.pending, fetch.queue = {}, list(names)
        self._get_next(name, fetch)

    def _get_next(self, name: str, fetch: _ParamFetch) -> None:
        assert fetch.pending is not None
        if not fetch.queue:
            self._store_params(name, {k: v for k, v in fetch.pending.items() if v is not None})
            return
        key = fetch.queue.pop(0)
        fetch.future, fetch.started = fetch.client.get_parameters([key]), time.monotonic()
        fetch.future.add_done_callback(partial(self._on_get_one, name, key, fetch.pending))

    def _on_get_one(self, name: str, key: str, pending: dict[str, Any], future: Any) -> None:
        fetch = self._param_fetches[name]
        if fetch.pending is not pending or future.cancelled() or future.exception() is not None:
            return
        values = list(future.result().values)
        pending[key] = values[0] if values else None  # None: declared but unset
        self._get_next(name, fetch)

    def _store_params(self, name: str, raw: dict[str, Any]) -> None:
        from rclpy.parameter import parameter_value_to_python

        values = {}
        for key, value in raw.items():
            # rclpy's own per-node parameters say nothing about the run
            if key in _ROS_INTERNAL_PARAMS or key.startswith("qos_overrides."):
                continue
            try:
                values[key] = parameter_value_to_python(value)
            except RuntimeError:
                continue  # a parameter type this rclpy cannot convert: not worth failing for
        self._param_fetches[name].reset()
        self.params[name] = values
        merged: dict[str, Any] = {}
        for node_values in self.params.values():
            merged.update(node_values)
        self.recorder.add_metadata(META_PARAMS, merged)
        self.recorder.add_metadata(META_RUN, {"params_from": sorted(self.params),
                                              "params_missing": self.params_missing})
        self.node.get_logger().info(f"stored {len(values)} parameters of {name}")
        if not self.params_missing:  # one line a supervisor (rt2-demo) can wait for
            print(f"rt2-record: stored the parameters of {', '.join(sorted(self.params))}", flush=True)

    def destroy(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        for node in (self._param_node, self.node):
            if node is not None:
                node.destroy_node()


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions
    from rclpy.utilities import remove_ros_args

    raw_args = sys.argv if argv is None else ["rt2-record", *argv]
    args = build_parser().parse_args(remove_ros_args(raw_args)[1:])
    if args.duration < 0 or args.image_rate < 0:
        print("rt2-record: --duration and --image-rate must be >= 0", file=sys.stderr)
        return 2
    try:
        topics = parse_topics(args.topics)
    except RecordingError as exc:
        print(f"rt2-record: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_output()
    rate_limits = {t: args.image_rate for t, ty in topics.items() if ty in _IMAGE_TYPES and args.image_rate > 0}

    stop = {"why": ""}

    def request_stop(signum: int, _frame: Any) -> None:
        stop["why"] = signal.Signals(signum).name

    # Our own handlers (not rclpy's): a signal only sets a flag, the loop below ends within
    # 0.1 s and the file is finalised on every path.
    rclpy.init(args=raw_args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    recorder: EpisodeRecorder | None = None
    node: RecordNode | None = None
    errors: list[str] = []
    try:
        recorder = EpisodeRecorder(out, topics, rate_limits_hz=rate_limits, recorder="rt2-record",
                                   compression=args.compression)
        node = RecordNode(recorder, topics, args.param_nodes or [])
        node.node.get_logger().info(
            f"recording {len(topics)} topics to {out}" + (f" for {args.duration:g} s" if args.duration else "")
            + (f", camera at most {args.image_rate:g} Hz" if rate_limits else "") + " (Ctrl-C stops)")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop["why"] and rclpy.ok():
            if deadline is not None and time.monotonic() >= deadline:
                stop["why"] = "duration"
                break
            node.spin_once(0.1)
        if node.params_missing:
            # A recording must say what produced it: wait (briefly) for nodes that are still there.
            missing = node.finish_params(_PARAM_FINAL_WAIT_S)
            if missing:
                print(f"rt2-record: warning: no parameters of {', '.join(missing)} in {out} (no answer on the "
                      "parameter services: not running, or on another ROS_DOMAIN_ID); rt2-replay will assume the "
                      "defaults", file=sys.stderr, flush=True)
    except RecordingError as exc:
        errors.append(str(exc))
    finally:
        if node is not None:
            node.destroy()  # no callback may run into a closed recorder
        if recorder is not None:
            try:
                recorder.close()
            except RecordingError as exc:
                errors.append(str(exc))
        rclpy.try_shutdown()
    for error in errors:
        print(f"rt2-record: {error}", file=sys.stderr)
    if recorder is None or errors:
        return 2
    counts = ", ".join(f"{t} {n}" for t, n in recorder.counts.items() if n)
    print(f"rt2-record: stopped ({stop['why'] or 'shutdown'}); wrote {sum(recorder.counts.values())} messages to "
          f"{out}" + (f": {counts}" if counts else " (no messages: are the nodes running on this ROS_DOMAIN_ID?)"),
          flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
