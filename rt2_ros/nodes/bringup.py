"""``rt2-bringup``: start the rt2_ros nodes in one process, from the same YAML as the launch file.

For machines without ``ros2 launch`` (ROS 2 from PyPI wheels has no launch/launch_ros): it
builds the same nodes as ``launch/rt2.launch.py`` with the same params file, spins them on one
executor and shuts down cleanly on Ctrl-C / SIGTERM. The params file is checked
with PyYAML first, so a broken file gets a message naming the file and line instead of rcl's
parser error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

NODE_NAMES = ("rt2_policy", "rt2_safety", "rt2_sim")


class ParamsFileError(ValueError):
    """The params YAML is missing, unparsable or not shaped like a ROS 2 params file."""


def load_params_file(path: str | Path) -> dict:
    """Parse and shape-check a ROS 2 params file; returns {node_name: {flat params}}."""
    from rt2_ros.params import flatten

    path = Path(path)
    if not path.is_file():
        raise ParamsFileError(f"params file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ParamsFileError(f"{path}: expected a mapping of node names, got {type(doc).__name__}")
    out = {}
    for node, body in doc.items():
        name = str(node).lstrip("/")
        if name not in NODE_NAMES and name != "**":
            raise ParamsFileError(f"{path}: unknown node {node!r}; rt2_ros nodes are {', '.join(NODE_NAMES)}")
        if not isinstance(body, dict) or not isinstance(body.get("ros__parameters"), dict):
            raise ParamsFileError(f"{path}: {node}: expected 'ros__parameters:' with a mapping under it")
        out[name] = flatten(body["ros__parameters"])
    return out


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
    p.add_argument("-r", "--remap", action="append", default=[], metavar="FROM:=TO",
                   help="topic remapping applied to all nodes, e.g. camera/image:=/camera/color/image_raw")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params_paths = [Path(p) for p in args.params] or [default_params_file()]
    try:
        for path in params_paths:
            load_params_file(path)
    except ParamsFileError as exc:
        print(f"rt2-bringup: {exc}", file=sys.stderr)
        return 2
    for r in args.remap:
        if ":=" not in r:
            print(f"rt2-bringup: bad remap {r!r}; expected FROM:=TO", file=sys.stderr)
            return 2

    from rclpy.parameter import Parameter

    from rt2_ros.nodes.common import run_nodes

    ros_args = ["--ros-args"]
    for path in params_paths:
        ros_args += ["--params-file", str(path)]
    for r in args.remap:
        ros_args += ["-r", r]

    def build(nodes: list) -> None:
        if not args.no_safety:
            from rt2_ros.nodes.safety_node import SafetyNode
            nodes.append(SafetyNode())
        if args.sim:
            from rt2_ros.nodes.sim_node import SimNode
            nodes.append(SimNode())
        if not args.no_policy:
            from rt2_ros.nodes.policy_node import PolicyNode
            overrides = [Parameter("backend.type", value=args.backend)] if args.backend else []
            nodes.append(PolicyNode(parameter_overrides=overrides))

    def ready(nodes: list) -> None:
        names = ", ".join(n.get_name() for n in nodes)
        print(f"rt2-bringup: running {names} with {', '.join(map(str, params_paths))} (Ctrl-C stops)", flush=True)

    return run_nodes(build, ros_args, name="rt2-bringup:", on_ready=ready)

if __name__ == "__main__":
    raise SystemExit(main())
