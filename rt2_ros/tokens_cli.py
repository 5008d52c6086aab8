"""``rt2-tokens``: decode a model answer or encode an action from the shell.

Why: when a robot does something odd, the first question is "what did those eight numbers
mean under *this* config?". This CLI answers it with the exact tokenizer the policy node
builds (same ``tokenizer.*`` keys, read straight from the node's params YAML), without ROS.

    rt2-tokens decode --profile rt2 "1 128 91 241 5 101 127 217"
    rt2-tokens decode --profile openvla --ids 31872 31872 31872 31872 31872 31872 31744
    rt2-tokens encode --profile rt2 --translation 0.01 0 0 --rotation 0 0 0 --gripper 1 --terminate
    rt2-tokens decode --config config/rt2.yaml "Plan: pick the apple. Action: 0 128 ..."

Exit codes: 0 ok, 2 invalid answer / action / config (one line on stderr naming the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rt2_ros.actions import ArmAction
from rt2_ros.params import ConfigError, flatten
from rt2_ros.token_profiles import PROFILES
from rt2_ros.tokens import ActionTokenizer, TokenError, rotvec_to_rpy, rpy_to_rotvec

PROG = "rt2-tokens"
EXIT_BAD_INPUT = 2


def load_tokenizer_config(path: str) -> dict[str, Any]:
    """The flat ``tokenizer.*`` keys of a ROS params YAML (``<node>: ros__parameters: tokenizer: {...}``).

    A plain parameter tree (``tokenizer: {...}`` at the top) is accepted too. Raises ConfigError
    when the file is unreadable, has no tokenizer section, or two nodes configure it differently.
    """
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, Mapping):
        raise ConfigError(f"--config: {path!r} must hold a mapping of parameters")
    sections = {name: flat for name, flat in _parameter_sets(tree, "") if flat}
    if not sections:
        raise ConfigError(f"--config: {path!r} has no tokenizer.* parameters")
    distinct = {json.dumps(v, sort_keys=True) for v in sections.values()}
    if len(distinct) > 1:
        raise ConfigError(f"--config: {path!r} configures the tokenizer differently in {sorted(sections)}; "
                          "keep one tokenizer section")
    return next(iter(sections.values()))


def _parameter_sets(tree: Mapping[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """(node path, tokenizer keys) for every ``ros__parameters`` block, or for the file itself if none."""
    found: list[tuple[str, dict[str, Any]]] = []
    for key, value in tree.items():
        if key == "ros__parameters" and isinstance(value, Mapping):
            found.append((where or "/", _tokenizer_keys(value)))
        elif isinstance(value, Mapping):
            found.extend(_parameter_sets(value, f"{where}/{key}"))
    if not found and not where:
        found.append(("/", _tokenizer_keys(tree)))
    return found


def _tokenizer_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten(params).items() if k.startswith("tokenizer.")}


def action_summary(tokenizer: ActionTokenizer, action: ArmAction, bins: np.ndarray, plan: str = "") -> dict[str, Any]:
    """A JSON-ready description of a decoded action."""
    def r(x: Any) -> Any:  # nanometre resolution is plenty and keeps the output readable
        return [round(float(v), 9) for v in x] if np.ndim(x) else round(float(x), 9)

    return {
        "profile": tokenizer.profile,
        "bins": [int(b) for b in bins],
        "plan": plan,
        "translation_m": r(action.translation),
        "rotation_rad": r(action.rotation),
        "rotation_rpy_rad": r(rotvec_to_rpy(action.rotation)),
        "gripper": r(action.gripper),
        "gripper_relative": action.gripper_relative,
        "terminate": action.terminate,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Decode or encode RT-2 / RT-1 / OpenVLA action tokens.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--profile", choices=sorted(PROFILES),
                        help="tokenizer profile (default: the --config file's, else rt2)")
    common.add_argument("--config", metavar="PARAMS.yaml", help="read tokenizer.* from a ROS params YAML file")
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser("decode", parents=[common], help="model answer -> action (JSON)")
    dec.add_argument("answer", nargs="+", help='number text, e.g. "1 128 91 241 5 101 127 217" (one or more args)')
    dec.add_argument("--ids", action="store_true", help="the answer is vocabulary token ids, not bins")

    enc = sub.add_parser("encode", parents=[common], help="action -> tokens")
    enc.add_argument("--translation", nargs=3, type=float, required=True, metavar=("X", "Y", "Z"),
                     help="metres per step, base frame")
    rot = enc.add_mutually_exclusive_group()
    rot.add_argument("--rotation", nargs=3, type=float, metavar=("RX", "RY", "RZ"),
                     help="rotation vector (axis * angle), rad per step (default 0 0 0)")
    rot.add_argument("--rpy", nargs=3, type=float, metavar=("ROLL", "PITCH", "YAW"),
                     help="roll, pitch, yaw about static x, y, z, rad per step")
    enc.add_argument("--gripper", type=float, required=True,
                     help="closedness 0 (open) .. 1 (closed); a change -1..1 with gripper_mode relative")
    enc.add_argument("--terminate", action="store_true", help="set the terminate token")
    enc.add_argument("--json", action="store_true", help="print bins, text and token ids as JSON")
    return parser


def _tokenizer(args: argparse.Namespace) -> ActionTokenizer:
    cfg = load_tokenizer_config(args.config) if args.config else {}
    if args.profile:
        cfg["tokenizer.profile"] = args.profile
    return ActionTokenizer.from_config(cfg)


def _decode(args: argparse.Namespace, tok: ActionTokenizer) -> dict[str, Any]:
    if args.ids:
        try:
            ids = [int(t) for t in " ".join(args.answer).split()]
        except ValueError:
            raise TokenError("non_integer", "token ids must be integers") from None
        bins, plan = tok.bins_from_ids(ids), ""
    else:
        parsed = tok.parse_text(" ".join(args.answer))
        bins, plan = parsed.bins, parsed.plan
    return action_summary(tok, tok.decode(bins), bins, plan)


def _encode(args: argparse.Namespace, tok: ActionTokenizer) -> str:
    if args.rpy is not None:
        rotation = rpy_to_rotvec(np.asarray(args.rpy))
    else:
        rotation = np.asarray(args.rotation if args.rotation is not None else [0.0, 0.0, 0.0])
    action = ArmAction(np.asarray(args.translation), rotation, args.gripper, terminate=args.terminate,
                       gripper_relative=tok.gripper_relative)
    bins = tok.encode(action)
    text = tok.format_text(bins)
    if not args.json:
        return text
    return json.dumps({"profile": tok.profile, "tokens": text, "bins": [int(b) for b in bins],
                       "token_ids": [int(i) for i in tok.ids_from_bins(bins)]})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tok = _tokenizer(args)
        if args.command == "decode":
            print(json.dumps(_decode(args, tok)))
        else:
            print(_encode(args, tok))
    except (TokenError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
