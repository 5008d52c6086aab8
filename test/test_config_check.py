"""One validation path: ``rt2-bringup --check`` (rt2_ros.nodes.bringup.check_params) refuses exactly
what the nodes refuse, and the offline tools (``rt2-tokens --config``, ``rt2-replay --params``) use it.

Each case is a params file layered on ``config/rt2.yaml``; it goes through the check and through the
real nodes, built in this process on their own rclpy context with ``--params-file`` (construction,
where rclpy checks types and ranges, then ``trigger_configure``, where the node checks the rest).
Both must accept it, or both refuse it naming the same key. No node spins: nothing is started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from rt2_ros.nodes.bringup import (  # noqa: E402
    NODE_NAMES,
    ParamsFileError,
    check_params,
    load_params_file,
    node_specs,
    rcl_scalar,
)
from rt2_ros.params import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
MAIN = CONFIG / "rt2.yaml"


def _node_classes():
    from rt2_ros.nodes.policy_node import PolicyNode
    from rt2_ros.nodes.safety_node import SafetyNode
    from rt2_ros.nodes.sim_node import SimNode

    return {"rt2_policy": PolicyNode, "rt2_safety": SafetyNode, "rt2_sim": SimNode}


def _shared_qos_profiles() -> list:
    """The module-level QoSProfiles the nodes create topics with. rclpy applies ``qos_overrides`` to
    the profile object it is given, in place, so a node configured here with an override changes them
    for the rest of this process (see test_qos_overrides_stay_with_their_node)."""
    from rclpy.qos import qos_profile_sensor_data

    from rt2_ros.nodes import common

    return [common.ACTION_QOS, common.COMMAND_QOS, common.LATCHED_QOS, common.EVENT_QOS, qos_profile_sensor_data]


_QOS_FIELDS = ("history", "depth", "reliability", "durability")


def node_verdicts(paths: list[Path], nodes: list[str]) -> dict[str, str | None]:
    """{node: None if it starts and configures with ``paths``, else its error} — the real nodes."""
    saved = [(q, {f: getattr(q, f) for f in _QOS_FIELDS}) for q in _shared_qos_profiles()]
    try:
        return _node_verdicts(paths, nodes)
    finally:  # undo what qos_overrides did to the shared profiles (other tests of this process use them)
        for profile, values in saved:
            for name, value in values.items():
                setattr(profile, name, value)


def _node_verdicts(paths: list[Path], nodes: list[str]) -> dict[str, str | None]:
    from rclpy.context import Context
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.signals import SignalHandlerOptions

    ctx = Context()
    args = ["--ros-args"] + [a for p in paths for a in ("--params-file", str(p))]
    try:
        rclpy.init(args=args, context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as exc:  # rcl refuses the file itself (rclpy.exceptions.RCLError)
        return {n: f"rcl: {exc}" for n in nodes}
    out: dict[str, str | None] = {}
    try:
        for name in nodes:
            node = None
            try:
                node = _node_classes()[name](context=ctx)
                if hasattr(node, "trigger_configure") and \
                        node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    out[name] = node.configure_error
                else:
                    out[name] = None
            except ConfigError as exc:
                out[name] = str(exc)
            finally:
                if node is not None:
                    if hasattr(node, "close"):
                        node.close()
                    node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)
    return out


# (id, params file layered on config/rt2.yaml, the key both must name or None when both accept it)
CASES = [
    ("int for a double", "rt2_safety: {ros__parameters: {safety: {watchdog_timeout_s: 2}}}",
     "safety.watchdog_timeout_s"),
    ("int list for a double array", "rt2_safety: {ros__parameters: {safety: {workspace_min: [0, 0, 0]}}}",
     "safety.workspace_min"),
    ("double for an int", "rt2_policy: {ros__parameters: {tokenizer: {n_bins: 256.0}}}", "tokenizer.n_bins"),
    ("scalar out of range", "rt2_safety: {ros__parameters: {safety: {watchdog_timeout_s: 100.0}}}",
     "safety.watchdog_timeout_s"),
    ("list element out of range", "rt2_safety: {ros__parameters: {safety: {workspace_min: [0.2, 0.0, -9.0]}}}",
     "safety.workspace_min"),
    ("unknown key", "rt2_safety: {ros__parameters: {safety: {watchdog_timeout: 1.0}}}", "safety.watchdog_timeout"),
    ("string choice", "rt2_policy: {ros__parameters: {tokenizer: {profile: rt3}}}", "tokenizer.profile"),
    ("unknown backend", "rt2_policy: {ros__parameters: {backend: {type: magic}}}", "backend.type"),
    ("autostart",
     "rt2_policy: {ros__parameters: {autostart: false}}\nrt2_safety: {ros__parameters: {autostart: false}}", None),
    ("autostart not a bool", "rt2_safety: {ros__parameters: {autostart: 1}}", "autostart"),
    ("use_sim_time", "rt2_policy: {ros__parameters: {use_sim_time: true}}", None),
    ("qos override of a topic the node creates",
     "rt2_policy: {ros__parameters: {qos_overrides: {/arm_action: {publisher: {depth: 20}}}}}\n"
     "rt2_safety: {ros__parameters: {qos_overrides: {/ee_pose: {subscription: {reliability: best_effort}}}}}", None),
    ("qos override of another topic",
     "rt2_policy: {ros__parameters: {qos_overrides: {/instruction: {subscription: {depth: 5}}}}}",
     "qos_overrides./instruction.subscription.depth"),
    ("qos override of a publisher the node does not create",
     "rt2_safety: {ros__parameters: {output: {twist: false}, "
     "qos_overrides: {/servo_node/delta_twist_cmds: {publisher: {depth: 2}}}}}",
     "qos_overrides./servo_node/delta_twist_cmds.publisher.depth"),
    ("qos override of the other camera transport",
     "rt2_policy: {ros__parameters: {qos_overrides: {/camera/image/compressed: {subscription: {depth: 2}}}}}",
     "qos_overrides./camera/image/compressed.subscription.depth"),
    ("qos depth not an int", "rt2_policy: {ros__parameters: {qos_overrides: {/arm_action: {publisher: {depth: 2.0}}}}}",
     "qos_overrides./arm_action.publisher.depth"),
    ("options of another backend", "rt2_policy: {ros__parameters: {backend: {grpc: {target: 'gpu:50051'}}}}", None),
    ("bad option of the chosen backend",
     "rt2_policy: {ros__parameters: {backend: {type: scripted, scripted: {repeat: 1}}}}", "backend.scripted.repeat"),
    ("workspace cross-check", "rt2_safety: {ros__parameters: {safety: {workspace_min: [0.8, -0.35, 0.02]}}}",
     "safety.workspace_min"),
    ("keep-out boxes of 6", "rt2_safety: {ros__parameters: {safety: {keep_out_boxes: [0.1, 0.1, 0.1, 0.2, 0.2]}}}",
     "safety.keep_out_boxes"),
    ("tokenizer cross-check", "rt2_policy: {ros__parameters: {tokenizer: {terminate_bin: 0}}}",
     "tokenizer.terminate_bin"),
    ("rcl reads 1e1 as a double", "rt2_policy: {ros__parameters: {policy: {execute_rate_hz: 1e1}}}", None),
    ("an empty list where the default is not empty",
     "rt2_safety: {ros__parameters: {safety: {workspace_min: []}}}", "safety.workspace_min"),
    ("an empty list where the default is empty", "rt2_safety: {ros__parameters: {safety: {keep_out_boxes: []}}}",
     None),
    ("wildcard section reaches every node", "/**: {ros__parameters: {tokenizer: {profile: rt1}}}", "tokenizer.profile"),
    ("simulator int", "rt2_sim: {ros__parameters: {sim_node: {seed: 3}}}", None),
    ("simulator double for an int", "rt2_sim: {ros__parameters: {sim_node: {seed: 3.0}}}", "sim_node.seed"),
    ("the simulator is not managed", "rt2_sim: {ros__parameters: {autostart: false}}", "autostart"),
    ("mixed list", "rt2_safety: {ros__parameters: {safety: {workspace_min: [0.25, 0, 0.02]}}}",
     "safety.workspace_min"),
    ("empty value", "rt2_safety:\n  ros__parameters:\n    safety:\n      watchdog_timeout_s:\n",
     "safety.watchdog_timeout_s"),
    # transport security (issue 12): refused at configure, so refused by the check, not a note
    ("grpc without tls to another machine",
     "rt2_policy: {ros__parameters: {backend: {type: grpc, grpc: {target: '10.0.0.5:50051'}}}}",
     "backend.grpc.allow_plaintext"),
    ("http to another machine",
     "rt2_policy: {ros__parameters: {backend: {type: openvla_http, openvla_http: {url: 'http://gpu-box:8000'}}}}",
     "backend.openvla_http.allow_plaintext"),
    ("http to another machine, allowed",
     "rt2_policy: {ros__parameters: {backend: {type: openvla_http, "
     "openvla_http: {url: 'http://gpu-box:8000', allow_plaintext: true}}}}", None),
    ("a token without tls",
     "rt2_policy: {ros__parameters: {backend: {type: grpc, grpc: {token_file: /etc/rt2/token.txt}}}}",
     "backend.grpc.token_file"),
    ("a CA bundle for a ws:// url",
     "rt2_policy: {ros__parameters: {backend: {type: openpi, openpi: {url: 'ws://127.0.0.1:8000', "
     "ca_cert_file: /etc/rt2/ca.crt}}}}", "backend.openpi.ca_cert_file"),
]


@pytest.mark.parametrize(("text", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_check_refuses_exactly_what_the_nodes_refuse(tmp_path, text, key):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text + "\n")
    paths = [MAIN, overlay]
    try:
        checked = check_params(paths)
        check_error = None
        nodes = list(checked.nodes)
    except (ParamsFileError, ConfigError) as exc:
        check_error = str(exc)
        nodes = [n for n in NODE_NAMES if n != "rt2_sim" or "rt2_sim" in text or "/**" in text]
    verdicts = node_verdicts(paths, nodes)
    refused = {n: e for n, e in verdicts.items() if e is not None}
    if key is None:
        assert check_error is None and not refused, (check_error, refused)
    else:
        assert check_error is not None and key in check_error, check_error
        assert refused and all(key in e or e.startswith("rcl:") for e in refused.values()), refused
        assert f"(set in {overlay})" in check_error or "rt2-bringup" in check_error or str(overlay) in check_error


def test_the_check_knows_every_parameter_the_nodes_declare(tmp_path):
    # Configured with the defaults (and the scripted backend), each node has declared exactly the
    # check's specs, the rclpy ones and the qos_overrides the check allows.
    from rt2_ros.nodes.bringup import _qos_specs, check_node_params

    overlay = tmp_path / "scripted.yaml"
    overlay.write_text("rt2_policy: {ros__parameters: {backend: {type: scripted}}}\n")
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    ctx = Context()
    rclpy.init(args=["--ros-args", "--params-file", str(overlay)], context=ctx,
               signal_handler_options=SignalHandlerOptions.NO)
    try:
        for name, cls in _node_classes().items():
            node = cls(context=ctx)
            try:
                if hasattr(node, "trigger_configure"):
                    node.trigger_configure()
                declared = set(node._parameters) - {"use_sim_time", "start_type_description_service"}
                given = {"backend.type": "scripted"} if name == "rt2_policy" else {}
                params = check_node_params(name, given)
                specs = {s.name for s in node_specs(name, params.get("backend.type"), params.get("cameras.names", ()))}
                qos = {s.name for s in _qos_specs(name, params, ())}
                assert declared == specs | qos, (name, declared ^ (specs | qos))
            finally:
                if hasattr(node, "close"):
                    node.close()
                node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)


@pytest.mark.parametrize("text", ["Y", "y", "N", "n", "True", "yes", "on", "off", "NO", "010", "0o10", "+5",
                                  "-0x1f", "1.", "5.0", ".5e-2", "1E3", "1e3", "inf", "-.inf", ".inf", "1_0", "0",
                                  "-0", "08", "1e", "0b11", "9999999999999999999999", "infinity", "2001-12-14",
                                  "1:20", "~", "null", "Null", "abc"])
def test_scalars_are_typed_as_rcl_types_them(tmp_path, text):
    from rclpy.context import Context
    from rclpy.node import Node

    path = tmp_path / "p.yaml"
    path.write_text(f"rt2_sim:\n  ros__parameters:\n    k: {text}\n    q: '{text}'\n")
    ctx = Context()
    rclpy.init(args=["--ros-args", "--params-file", str(path)], context=ctx)
    try:
        node = Node("rt2_sim", context=ctx, automatically_declare_parameters_from_overrides=True)
        rcl, quoted = node.get_parameter("k").value, node.get_parameter("q").value
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=ctx)
    ours = load_params_file(path)["rt2_sim"]
    assert type(ours["k"]) is type(rcl) and (ours["k"] == rcl or ours["k"] != ours["k"]), (text, rcl, ours["k"])
    assert ours["q"] == quoted == text  # quoted: always a string
    assert rcl_scalar(text) == ours["k"] or ours["k"] != ours["k"]


def _bringup(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rt2_ros.nodes.bringup", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_bringup_check_cli(tmp_path):
    # Shipped files pass (test_config_files.py checks every one in-process; here two as a user runs it).
    for overlay in (CONFIG / "backends" / "grpc.yaml", CONFIG / "backends" / "local.yaml"):
        out = _bringup("--check", "--params", "config/rt2.yaml", "--params", str(overlay.relative_to(REPO)))
        assert out.returncode == 0, out.stderr
        assert f"valid for rt2_policy (backend {overlay.stem}), rt2_safety, rt2_sim" in out.stdout
        assert "nothing started" in out.stdout and out.stderr == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rt2_safety": {"ros__parameters": {"safety": {"watchdog_timeout_s": 2}}}}))
    out = _bringup("--check", "--params", "config/rt2.yaml", "--params", str(bad))
    assert out.returncode == 2 and out.stdout == ""
    assert "rt2_safety: safety.watchdog_timeout_s: expected a floating-point number, got the integer 2" in out.stderr
    assert f"(set in {bad})" in out.stderr and out.stderr.count("\n") == 1
    # docs/tokens.md used `policy_node:`: an rt2_ros node is named rt2_policy.
    bad.write_text("policy_node:\n  ros__parameters:\n    tokenizer:\n      profile: rt2\n")
    out = _bringup("--check", "--params", str(bad))
    assert out.returncode == 2 and "unknown node 'policy_node'" in out.stderr
    # --backend is checked like the node takes it: an unknown backend names backend.type
    out = _bringup("--check", "--params", "config/rt2.yaml", "--backend", "magic")
    assert out.returncode == 2 and "backend.type" in out.stderr
    # remapped topics: their qos_overrides follow the remap, as rcl renames the topic
    bad.write_text("rt2_policy: {ros__parameters: {qos_overrides: {/cam/raw: {subscription: {depth: 1}}}}}\n")
    assert _bringup("--check", "--params", str(bad)).returncode == 2
    out = _bringup("--check", "--params", str(bad), "-r", "camera/image:=/cam/raw")
    assert out.returncode == 0, out.stderr


def test_the_pure_core_refuses_an_integer_for_a_double_as_rclpy_does():
    from rt2_ros.safety import SafetyConfig
    from rt2_ros.tokens import ActionTokenizer

    with pytest.raises(ConfigError, match=r"safety.watchdog_timeout_s: .*integer 2; write 2.0"):
        SafetyConfig.from_params({"safety.watchdog_timeout_s": 2})
    with pytest.raises(ConfigError, match=r"safety.workspace_min: .*integers"):
        SafetyConfig.from_params({"safety.workspace_min": [0, 0, 0]})
    with pytest.raises(ConfigError, match=r"tokenizer\.translation_scale_m"):
        ActionTokenizer.from_config({"tokenizer.translation_scale_m": 1})
    assert SafetyConfig.from_params({"safety.watchdog_timeout_s": 2.0}).watchdog_timeout_s == 2.0


@pytest.mark.parametrize(("text", "row"), [
    ("rt2_safety: {ros__parameters: {safety: {watchdog_timeout: 1.0}}}",
     "configuration error: unknown parameter(s) for node rt2_safety: safety.watchdog_timeout"),
    ("rt2_safety: {ros__parameters: {safety: {watchdog_timeout_s: 100.0}}}",
     "configuration error: safety.watchdog_timeout_s: Invalid parameter value (100.0) for parameter. Reason: "
     "Parameter safety.watchdog_timeout_s out of range Min: 0.01, Max: 60.0"),
    ("rt2_safety: {ros__parameters: {safety: {workspace_min: [0.2, 0.0, -9.0]}}}",
     "safety.workspace_min[]: -9.0 is below the minimum -5.0"),
    ("rt2_safety: {ros__parameters: {safety: {watchdog_timeout_s: 2}}}",
     "configuration error: safety.watchdog_timeout_s: Trying to set parameter ... of type 'INTEGER', "
     "expecting type 'DOUBLE'"),
])
def test_troubleshooting_quotes_what_the_node_prints(tmp_path, text, row):
    # README's troubleshooting table quotes these errors; the node must print them that way
    # (rt2-bringup prints "rt2-bringup: configuration error: <the node's error>").
    assert row in (REPO / "README.md").read_text()
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text + "\n")
    (error,) = [e for e in node_verdicts([overlay], ["rt2_safety"]).values()]
    printed = f"rt2-bringup: configuration error: {error}"
    at = 0
    for fragment in row.split(" ... "):
        found = printed.find(fragment, at)
        assert found >= 0, f"{fragment!r} not in {printed!r}"
        at = found + len(fragment)


def test_qos_overrides_stay_with_their_node(tmp_path):
    from rt2_ros.nodes import common

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("rt2_policy: {ros__parameters: {qos_overrides: {/arm_action: {publisher: {depth: 20}}}}}\n")
    before = common.ACTION_QOS.depth
    try:
        assert _node_verdicts([overlay], ["rt2_policy"]) == {"rt2_policy": None}
        assert common.ACTION_QOS.depth == before, "the policy's override leaked into the shared ACTION_QOS"
    finally:
        common.ACTION_QOS.depth = before


@pytest.mark.parametrize(("overlay", "message"), [
    ("rt2_safety: {ros__parameters: {safety: {max_action_age_s: 0.5}}}",
     "policy.max_action_age_s (1.0 s) exceeds rt2_safety safety.max_action_age_s (0.5 s)"),
    ("rt2_policy: {ros__parameters: {policy: {execute_rate_hz: 20.0}}}",
     "safety.min_action_interval_s (0.05 s) is not below 0.037 s"),
    ("rt2_policy: {ros__parameters: {backend: {timeout_s: 3.0}}}",
     "policy.max_reply_age_s (1.0 s) is below backend.timeout_s (3.0 s)"),
])
def test_bounds_the_two_nodes_share_are_cross_checked(tmp_path, overlay, message):
    from rt2_ros.nodes.bringup import check_params
    from rt2_ros.params import ConfigError

    extra = tmp_path / "extra.yaml"
    extra.write_text(overlay + "\n")
    with pytest.raises(ConfigError) as err:
        check_params([REPO / "config" / "rt2.yaml", extra])
    assert message in str(err.value)
