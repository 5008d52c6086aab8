"""``rt2-tokens``: decode a model answer or encode an action from the shell.

Why: when a robot does something odd, the first question is "what did those eight numbers
mean under *this* config?". This CLI answers it with the exact tokenizer the policy node
builds (same ``tokenizer.*`` keys, read straight from the node's params YAML, which is checked
exactly as ``rt2-bringup --check`` checks it), without a running ROS system.

    rt2-tokens decode --profile rt2 "1 128 91 241 5 101 127 217"
    rt2-tokens decode --profile openvla --ids 31872 31872 31872 31872 31872 31872 31744
    rt2-tokens encode --profile rt2 --translation 0.01 0 0 --rotation 0 0 0 --gripper 1 --terminate
    rt2-tokens decode --config config/rt2.yaml "Plan: pick the apple. Action: 0 128 ..."

``encode`` refuses an action the tokens cannot express (e.g. 5 m with 0.02 m per unit) unless
``--clip``, which encodes the nearest bins and says which values it clipped.
Exit codes: 0 ok, 2 invalid answer / action / config (one line on stderr naming the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from rt2_ros.actions import ArmAction
from rt2_ros.params import ConfigError
from rt2_ros.token_profiles import PROFILES
from rt2_ros.tokens import ActionTokenizer, TokenError, rotvec_to_rpy, rpy_to_rotvec

PROG = "rt2-tokens"
EXIT_BAD_INPUT = 2


def load_tokenizer_config(path: str) -> dict[str, Any]:
    """The ``tokenizer.*`` parameters of ``rt2_policy`` in a ROS 2 params file, as the node would run with them.

    The file is checked exactly as ``rt2-bringup --check`` checks it (every node it configures:
    node names, types, ranges, unknown keys, cross-checks), so a file this accepts is one the nodes
    start with. Raises ConfigError naming the file, node and key.
    """
    from rt2_ros.nodes.bringup import ParamsFileError, check_params

    try:
        checked = check_params([path])
    except ParamsFileError as exc:
        raise ConfigError(f"--config: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"--config: {path}: {exc}") from None
    if "rt2_policy" not in checked.nodes:
        raise ConfigError(f"--config: {path} does not configure rt2_policy (the tokenizer is its "
                          "tokenizer.* parameters: rt2_policy: ros__parameters: tokenizer: {...})")
    return {k: v for k, v in checked.nodes["rt2_policy"].items() if k.startswith("tokenizer.")}


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
    enc.add_argument("--clip", action="store_true",
                     help="encode values beyond what the tokens express as the nearest bin (as RT-1 does) and say "
                          "so on stderr; without it such an action is refused (exit 2)")
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
    beyond = tok.out_of_range(action)
    if beyond and not args.clip:
        raise TokenError("out_of_range", f"the tokens cannot express {'; '.join(beyond)} (model units: "
                         "translation / tokenizer.translation_scale_m, rotation / rotation_scale_rad, gripper "
                         "by tokenizer.gripper_convention); --clip encodes the nearest bins")
    if beyond:
        print(f"{PROG}: clipped {'; '.join(beyond)} to the nearest bin (model units)", file=sys.stderr)
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
