"""``rt2-bringup``: start the rt2_ros nodes in one process, from the same YAML as the launch file.

For machines without ``ros2 launch`` (ROS 2 from PyPI wheels has no launch/launch_ros): it
builds the same nodes as ``launch/rt2.launch.py`` with the same params file, takes the managed
nodes to active (unless ``--no-autostart``), spins them on one executor and shuts down cleanly on
Ctrl-C / SIGTERM. The params file is checked
with PyYAML first, so a broken file gets a message naming the file and line instead of rcl's
parser error.

``rt2-bringup --check`` runs the nodes' own parameter checks on the params files without
starting anything (:func:`check_params`): the ParamSpecs with rclpy's type rules, unknown keys
(``autostart``, ``qos_overrides.*`` of the topics a node creates and the other backends'
options allowed as the nodes allow them), the cross-checks of configure (PolicyConfig, the
tokenizer, SafetyConfig, backend option specs). The offline tools (``rt2-tokens --config``,
``rt2-replay --params``) use the same check, so "it validates" means "the nodes start".
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NODE_NAMES = ("rt2_policy", "rt2_safety", "rt2_sim")
# Parameters rclpy declares on every node by itself (their overrides are never "unknown").
ROS_NODE_PARAMS = ("use_sim_time", "start_type_description_service")


class ParamsFileError(ValueError):
    """The params YAML is missing, unparsable or not shaped like a ROS 2 params file."""


# -- reading a params file as rcl does ------------------------------------------------------------
# rcl's parser (rcl_yaml_param_parser) types plain scalars its own way, not like PyYAML: `1e3` is a
# double (PyYAML: a string), `~` and `null` are strings, `y`/`n` are booleans, `1_000` a string, an
# empty value an error. These rules were measured against rcl (test/test_config_check.py compares them).
_RCL_TRUE = frozenset({"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"})
_RCL_FALSE = frozenset({"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"})
_RCL_INT = re.compile(r"[-+]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")  # strtol(base 0), whole text
_RCL_FLOAT = re.compile(r"[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|\.?inf(?:inity)?|\.?nan)",
                        re.IGNORECASE)  # strtod, whole text
_NO_VALUE = object()


def rcl_scalar(text: str) -> Any:
    """A plain (unquoted) YAML scalar typed as rcl types it: bool, int (64 bit), double or string."""
    if text in _RCL_TRUE:
        return True
    if text in _RCL_FALSE:
        return False
    if _RCL_INT.fullmatch(text):
        digits = text.lstrip("+-")
        base = 16 if digits[:2] in ("0x", "0X") else 8 if len(digits) > 1 and digits[0] == "0" else 10
        value = int(text, base)
        if -2**63 <= value < 2**63:
            return value  # larger ones overflow strtol: rcl reads them as doubles
    if _RCL_FLOAT.fullmatch(text):
        return float(re.sub(r"\.(?=inf|nan)", "", text, flags=re.IGNORECASE))
    return text


class _RclLoader(yaml.SafeLoader):
    """PyYAML with rcl's scalar typing (quoted scalars and mapping keys stay strings)."""


_RclLoader.yaml_implicit_resolvers = {}  # every plain scalar reaches _rcl_str as text


def _rcl_str(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    if node.style is not None:  # quoted
        return text
    return _NO_VALUE if text == "" else rcl_scalar(text)


def _rcl_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    out = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key (found by fuzzing)
            raise yaml.constructor.ConstructorError(None, None, "a key must be a name, not a list or mapping",
                                                    key_node.start_mark)
        out[key_node.value] = loader.construct_object(value_node, deep=True)
    return out


_RclLoader.add_constructor("tag:yaml.org,2002:str", _rcl_str)
_RclLoader.add_constructor("tag:yaml.org,2002:map", _rcl_mapping)


def _check_rcl_values(flat: Mapping[str, Any], where: str) -> None:
    """What rcl refuses (or reads as something else) in a params file, named by key."""
    for key, value in flat.items():
        if value is _NO_VALUE:
            raise ParamsFileError(f"{where}: {key}: no value (rcl refuses an empty value; for an empty string "
                                  f"write '')")
        if isinstance(value, list):
            kinds = {type(v) for v in value}
            if any(isinstance(v, (list, dict)) or v is _NO_VALUE for v in value):
                raise ParamsFileError(f"{where}: {key}: a list of lists or mappings is not a ROS 2 parameter")
            if len(kinds) > 1:
                mixed = " and ".join(sorted(k.__name__ for k in kinds))
                raise ParamsFileError(f"{where}: {key}: {value!r} mixes {mixed} values; ROS 2 lists hold one type "
                                      f"(write 1.0, not 1, in a list of doubles)")


def load_params_file(path: str | Path) -> dict:
    """Parse and shape-check a ROS 2 params file as rcl does; returns {node_name: {flat params}} in file order.

    Scalars are typed by rcl's rules (:func:`rcl_scalar`); an unknown node name, an empty value, a
    list mixing types and a list of lists are errors naming the file (and key).
    """
    from rt2_ros.params import flatten

    path = Path(path)
    if not path.is_file():
        raise ParamsFileError(f"params file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # found by fuzzing (test_fuzz.py)
        raise ParamsFileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        doc = yaml.load(text, Loader=_RclLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:  # one line: where and what
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsFileError(f"{path}: not valid YAML{at}: {what}") from exc
    if not isinstance(doc, dict):
        raise ParamsFileError(f"{path}: expected a mapping of node names, got {type(doc).__name__}")
    out = {}
    for node, body in doc.items():
        name = str(node).lstrip("/")
        if name not in NODE_NAMES and name != "**":
            raise ParamsFileError(f"{path}: unknown node {node!r}; rt2_ros nodes are {', '.join(NODE_NAMES)}")
        if not isinstance(body, dict) or not isinstance(body.get("ros__parameters"), dict):
            raise ParamsFileError(f"{path}: {node}: expected 'ros__parameters:' with a mapping under it")
        flat = flatten(body["ros__parameters"])
        _check_rcl_values(flat, f"{path}: {name}")
        out[name] = flat
    return out


# -- checking a params file as the nodes' configure does ----------------------------------------------
# Topics each node creates with rt2_ros.nodes.common.QOS_OVERRIDES: rclpy declares
# qos_overrides.<topic>.<publisher|subscription>.<policy> for exactly these, and an override for any
# other topic is an unknown parameter (test/test_config_check.py compares this with the real nodes).
def _qos_topics(node: str, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    if node == "rt2_policy":
        from rt2_ros.cameras import cameras_from_params

        cameras = [(cam.subscribed_topic, "subscription") for cam in cameras_from_params(params)]
        return [("arm_action", "publisher"), *cameras, ("ee_pose", "subscription"), ("joint_states", "subscription")]
    if node == "rt2_safety":
        out = [("servo_node/delta_twist_cmds", "publisher")] if params["output.twist"] else []
        out += [("target_pose", "publisher")] if params["output.pose"] else []
        return [*out, ("gripper_command", "publisher"), ("arm_action", "subscription"), ("ee_pose", "subscription")]
    return []


def _qos_specs(node: str, params: Mapping[str, Any], remaps: Sequence[str]) -> list:
    from rt2_ros.params import ParamSpec

    def fq(name: str) -> str:
        return "/" + name.lstrip("/")

    rules = []
    for rule in remaps:
        target, _, mapping = rule.rpartition(":") if rule.count(":") > 1 else ("", "", rule)
        src, sep, dst = mapping.partition(":=")
        if sep and target in ("", node):
            rules.append((fq(src), fq(dst)))
    specs = []
    for topic, entity in _qos_topics(node, params):
        name = fq(topic)
        for src, dst in rules:
            if name == src:
                name = dst
                break
        prefix = f"qos_overrides.{name}.{entity}."
        specs += [ParamSpec(prefix + "depth", "int", 10, "QoS depth", low=0),
                  ParamSpec(prefix + "history", "string", "keep_last", "QoS history",
                            choices=("keep_last", "keep_all", "system_default")),
                  ParamSpec(prefix + "reliability", "string", "reliable", "QoS reliability",
                            choices=("reliable", "best_effort", "system_default", "best_available"))]
    return specs


def node_specs(node: str, backend_type: str | None = None, camera_names: Sequence[str] = ()) -> tuple:
    """The ParamSpecs ``node`` declares (rt2_policy: with the options of ``backend_type`` and of each camera
    in ``camera_names``)."""
    if node == "rt2_policy":
        from rt2_ros.cameras import CAMERA_NAMES, camera_specs
        from rt2_ros.nodes.common import AUTOSTART_PARAM
        from rt2_ros.nodes.policy_node import NODE_PARAMS
        from rt2_ros.policy import POLICY_PARAMS
        from rt2_ros.tokens import TOKENIZER_PARAMS

        specs = (*POLICY_PARAMS, *TOKENIZER_PARAMS, *NODE_PARAMS, CAMERA_NAMES, AUTOSTART_PARAM)
        for name in camera_names:
            specs += camera_specs(name)
        if backend_type is not None:
            from rt2_ros.backends import backend_class

            specs += tuple(backend_class(backend_type).OPTIONS)
        return specs
    if node == "rt2_safety":
        from rt2_ros.nodes.common import AUTOSTART_PARAM
        from rt2_ros.nodes.safety_node import OUTPUT_PARAMS
        from rt2_ros.safety import SAFETY_PARAMS

        return (*SAFETY_PARAMS, *OUTPUT_PARAMS, AUTOSTART_PARAM)
    if node == "rt2_sim":
        from rt2_ros.nodes.sim_node import NODE_PARAMS as SIM_NODE_PARAMS
        from rt2_ros.sim.tabletop import SIM_PARAMS

        return (*SIM_PARAMS, *SIM_NODE_PARAMS)
    raise ValueError(f"unknown node {node!r}; rt2_ros nodes are {', '.join(NODE_NAMES)}")


@dataclass
class CheckedParams:
    """What :func:`check_params` found valid: each node's parameters as it would run with them."""

    nodes: dict[str, dict[str, Any]]  # node -> every declared parameter, defaults filled in
    notes: list[str] = field(default_factory=list)  # what could not be checked here, and why
    configured: list[str] = field(default_factory=list)  # the nodes the files have a section (or /**) for


def merged_params(paths: Iterable[str | Path]) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], Path]]:
    """{node: flat values} of layered params files as rcl applies them: sections in file order, later
    files after earlier ones, a ``/**`` section for every node; and the file that set each (node, key)."""
    loaded = [(Path(p), load_params_file(p)) for p in paths]
    values: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], Path] = {}
    for node in NODE_NAMES:
        for path, sections in loaded:
            for name, flat in sections.items():
                if name in (node, "**"):
                    values.setdefault(node, {}).update(flat)
                    origin.update({(node, k): path for k in flat})
    return values, origin


def check_node_params(node: str, given: Mapping[str, Any], remaps: Sequence[str] = (),
                      notes: list[str] | None = None) -> dict[str, Any]:
    """Validate the params-file values ``given`` for ``node`` exactly as the node's start-up and configure
    do (types as rclpy, ranges, unknown keys, cross-checks), without creating a node; returns every
    declared parameter's value. Raises ConfigError naming the key. Not done here: what configure
    does beyond checking (build the backend: model files, keys, connections; build the simulator)."""
    from rt2_ros.params import ConfigError, resolve

    specs = node_specs(node)
    # rcl reads an empty list as "no value": where the default is not empty the nodes refuse it
    # (common.read); elsewhere (e.g. keep_out_boxes) it means the default.
    defaults = {s.name: s.default for s in specs}
    for k, v in given.items():
        if isinstance(v, list) and not v and defaults.get(k) not in (None, [], ""):
            raise ConfigError(f"{k}: an empty value in the params file; give the values (default "
                              f"{defaults[k]!r}) or remove the key")
    values = {k: v for k, v in given.items() if not (isinstance(v, list) and not v)}
    allow = ("qos_overrides.",)
    if node == "rt2_policy":  # backend.type and cameras.names decide which options exist, as in configure
        from rt2_ros.backends import BACKENDS
        from rt2_ros.cameras import CAMERA_NAMES, check_names

        (type_spec,) = [s for s in specs if s.name == "backend.type"]
        backend_type = type_spec.validate(values.get("backend.type", type_spec.default))
        cameras = check_names(CAMERA_NAMES.validate(values.get(CAMERA_NAMES.name, CAMERA_NAMES.default)))
        specs = node_specs(node, backend_type, cameras)
        allow += tuple(f"backend.{t}." for t in BACKENDS if t != backend_type)
    for key in ROS_NODE_PARAMS:  # declared by rclpy itself, as booleans
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"{key}: expected true/false, got {values[key]!r}")
    own = {k: v for k, v in values.items() if k not in ROS_NODE_PARAMS}
    params = resolve(specs, own, allow_unknown_prefixes=allow)
    qos = {k: v for k, v in own.items() if k.startswith("qos_overrides.")}
    if qos:
        qos_specs = _qos_specs(node, params, remaps)
        try:
            resolve(qos_specs, qos)
        except ConfigError as exc:
            if not str(exc).startswith("unknown"):
                raise
            unknown = sorted(k for k in qos if k not in {s.name for s in qos_specs})
            topics = sorted({s.name.rsplit(".", 1)[0].removeprefix("qos_overrides.") for s in qos_specs})
            raise ConfigError(f"unknown parameter(s): {', '.join(unknown)}; {node} accepts qos_overrides for "
                              f"{', '.join(topics) or 'no topic'} (depth, history, reliability)") from None
    params = {k: v for k, v in params.items() if not k.startswith(allow) or k in {s.name for s in specs}}
    if node == "rt2_policy":
        _check_policy(params, notes if notes is not None else [])
    elif node == "rt2_safety":
        from rt2_ros.safety import SafetyConfig

        SafetyConfig.from_params({k: v for k, v in params.items() if k.startswith("safety.")})
    elif node == "rt2_sim":
        from rt2_ros.sim.tabletop import SIM_PARAMS

        resolve(SIM_PARAMS, {k: v for k, v in params.items() if k in {s.name for s in SIM_PARAMS}})
    return params


def _check_policy(params: dict[str, Any], notes: list[str]) -> None:
    from rt2_ros.cameras import cameras_from_params
    from rt2_ros.joints import JointConfig
    from rt2_ros.policy import PolicyConfig
    from rt2_ros.tokens import ActionTokenizer

    PolicyConfig.from_params(params)
    JointConfig.from_params(params)
    cameras_from_params(params)
    tokenizer = {k: v for k, v in params.items() if k.startswith("tokenizer.")}
    stats = tokenizer.get("tokenizer.dataset_statistics", "")
    if stats and tokenizer.get("tokenizer.profile") == "openvla" and not Path(stats).is_file():
        notes.append(f"rt2_policy: tokenizer.dataset_statistics {stats} is not on this machine: checked the "
                     f"tokenizer without it (the node reads it at configure)")
        tokenizer.update({"tokenizer.dataset_statistics": "", "tokenizer.unnorm_key": ""})
    ActionTokenizer.from_config(tokenizer)
    backend_type = params.get("backend.type")
    if backend_type:
        from rt2_ros.backends import BackendConfigError, backend_class
        from rt2_ros.params import ConfigError

        prefix = f"backend.{backend_type}."
        try:
            backend_class(backend_type).check_options({k[len(prefix):]: v for k, v in params.items()
                                                       if k.startswith(prefix)})
        except BackendConfigError as exc:
            raise ConfigError(str(exc)) from None


def check_params(paths: Sequence[str | Path], *, backend: str = "", nodes: Iterable[str] = (),
                 remaps: Sequence[str] = ()) -> CheckedParams:
    """Check layered params files for every rt2_ros node they configure (and for ``nodes``) exactly as
    each node checks them at start-up and configure, without starting anything.

    ``backend`` overrides ``backend.type`` (``rt2-bringup --backend``); ``remaps`` are ``-r`` rules
    (they rename the topics whose ``qos_overrides`` are allowed). Raises ParamsFileError (file shape)
    or ConfigError, whose message starts with the node and names the key and the file that set it.
    """
    from rt2_ros.params import ConfigError

    values, origin = merged_params(paths)
    result = CheckedParams({}, configured=[n for n in NODE_NAMES if n in values])
    if backend:
        values.setdefault("rt2_policy", {})["backend.type"] = backend
    wanted = [n for n in NODE_NAMES if n in values or n in set(nodes)]
    for node in wanted:
        try:
            result.nodes[node] = check_node_params(node, values.get(node, {}), remaps, result.notes)
        except ConfigError as exc:
            text = str(exc)
            # the keys at fault: before any "; ..." explanation, without "did you mean" hints
            subject = re.sub(r"\(did you mean [^)]*\)", "", text.split(";", 1)[0]).replace("[]", "")
            named = {key for (n, key) in origin
                     if n == node and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", subject)}
            where = sorted({str(origin[(node, key)]) for key in named})
            raise ConfigError(f"{node}: {text}" + (f" (set in {', '.join(where)})" if where else "")) from exc
    _check_across_nodes(result.nodes)
    return result


def _check_across_nodes(nodes: Mapping[str, Mapping[str, Any]]) -> None:
    """Bounds that the two nodes must agree on; each node alone cannot see the other's parameters."""
    from rt2_ros.params import ConfigError
    from rt2_ros.policy import _EARLY_FRACTION

    policy, safety = nodes.get("rt2_policy"), nodes.get("rt2_safety")
    if policy is None or safety is None:
        return
    if policy["policy.max_action_age_s"] > safety["safety.max_action_age_s"]:
        raise ConfigError(
            f"rt2_policy policy.max_action_age_s ({policy['policy.max_action_age_s']} s) exceeds rt2_safety "
            f"safety.max_action_age_s ({safety['safety.max_action_age_s']} s): actions the policy releases would "
            "be refused as stale; lower the first or raise the second")
    closest = (1.0 - _EARLY_FRACTION) / policy["policy.execute_rate_hz"]  # two releases are at least this apart
    if safety["safety.min_action_interval_s"] >= closest:
        raise ConfigError(
            f"rt2_safety safety.min_action_interval_s ({safety['safety.min_action_interval_s']} s) is not below "
            f"{closest:.3f} s, the closest two actions come at rt2_policy policy.execute_rate_hz "
            f"({policy['policy.execute_rate_hz']} Hz): paced actions would be dropped as bursts")


def default_params_file() -> Path:
    """config/rt2.yaml of this install (share/rt2_ros/config) or of the source tree."""
    here = Path(__file__).resolve()
    candidates = [Path(sys.prefix) / "share" / "rt2_ros" / "config" / "rt2.yaml",
                  here.parents[2] / "config" / "rt2.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rt2-bringup", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--params", action="append", default=[],
                   help="ROS 2 params YAML; repeat to layer files, later ones win (default: the installed "
                        "config/rt2.yaml), e.g. --params config/rt2.yaml --params config/backends/grpc.yaml")
    p.add_argument("--backend", default="", help="override backend.type of the policy node")
    p.add_argument("--sim", action="store_true", help="also start the simulated tabletop arm (rt2_sim)")
    p.add_argument("--no-policy", action="store_true", help="do not start the policy node")
    p.add_argument("--no-safety", action="store_true", help="do not start the safety node")
    p.add_argument("--no-autostart", action="store_true",
                   help="leave the managed nodes unconfigured (a lifecycle manager or `ros2 lifecycle set` "
                        "configures and activates them)")
    p.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                   help="topic remapping applied to all nodes, e.g. camera/image:=/camera/color/image_raw")
    p.add_argument("--check", action="store_true",
                   help="only check the params files as the nodes' start-up and configure would (types, ranges, "
                        "unknown keys, cross-checks) and exit: 0 valid, 2 invalid (the key named); starts nothing")
    return p


def _check(args: argparse.Namespace, params_paths: list[Path]) -> int:
    from rt2_ros.params import ConfigError

    started = [n for n, skip in (("rt2_safety", args.no_safety), ("rt2_policy", args.no_policy),
                                 ("rt2_sim", not args.sim)) if not skip]
    files = " + ".join(map(str, params_paths))
    try:
        checked = check_params(params_paths, backend=args.backend, nodes=started, remaps=args.remap)
    except (ParamsFileError, ConfigError) as exc:
        print(f"rt2-bringup: {files}: invalid: {exc}", file=sys.stderr)
        return 2
    names = [n + (f" (backend {checked.nodes[n]['backend.type']})" if n == "rt2_policy" else "")
             for n in checked.nodes]
    print(f"rt2-bringup: {files}: valid for {', '.join(names)} (checked as the nodes check it; nothing started)")
    backend = checked.nodes.get("rt2_policy", {}).get("backend.type")
    if backend not in (None, "embedded", "scripted"):
        checked.notes.append(f"rt2_policy: the {backend} backend's files, keys and server are used when the node "
                             "configures, not checked here")
    for note in checked.notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params_paths = [Path(p) for p in args.params] or [default_params_file()]
    for r in args.remap:
        if ":=" not in r:
            print(f"rt2-bringup: bad remap {r!r}; expected FROM:=TO", file=sys.stderr)
            return 2
    if args.check:
        return _check(args, params_paths)
    try:
        for path in params_paths:
            load_params_file(path)
    except ParamsFileError as exc:
        print(f"rt2-bringup: {exc}", file=sys.stderr)
        return 2

    from rclpy.parameter import Parameter

    from rt2_ros.nodes.common import run_nodes, use_async_publication

    if not args.no_safety:
        use_async_publication()  # the safety node's command stream must never stall (see common.py)

    ros_args = ["--ros-args"]
    for path in params_paths:
        ros_args += ["--params-file", str(path)]
    for r in args.remap:
        ros_args += ["-r", r]

    autostart = [Parameter("autostart", value=False)] if args.no_autostart else []

    def build(nodes: list) -> None:
        if not args.no_safety:
            from rt2_ros.nodes.safety_node import SafetyNode
            nodes.append(SafetyNode(parameter_overrides=autostart))
        if args.sim:
            from rt2_ros.nodes.sim_node import SimNode
            nodes.append(SimNode())
        if not args.no_policy:
            from rt2_ros.nodes.policy_node import PolicyNode
            overrides = [Parameter("backend.type", value=args.backend)] if args.backend else []
            nodes.append(PolicyNode(parameter_overrides=overrides + autostart))

    def ready(nodes: list) -> None:
        names = ", ".join(n.get_name() for n in nodes)
        print(f"rt2-bringup: running {names} with {', '.join(map(str, params_paths))} (Ctrl-C stops)", flush=True)

    return run_nodes(build, ros_args, name="rt2-bringup:", on_ready=ready)

if __name__ == "__main__":
    raise SystemExit(main())
