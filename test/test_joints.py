"""rt2_ros.joints: JointState names/positions -> arm joint positions and gripper closedness (no ROS)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.joints import JointConfig, JointStateError, closedness, map_joint_state
from rt2_ros.params import ConfigError

FINGERS = ("panda_finger_joint1", "panda_finger_joint2")
ARM = tuple(f"panda_joint{i}" for i in range(1, 8))
PANDA = JointConfig(arm_names=ARM, gripper_names=FINGERS, gripper_open_position=0.04, gripper_closed_position=0.0)


def panda_msg(arm=(0.1, -0.2, 0.3, -2.0, 0.0, 1.6, 0.8), fingers=(0.04, 0.04)):
    return list(ARM) + list(FINGERS), list(arm) + list(fingers)


@pytest.mark.parametrize(("fingers", "expected"), [
    ((0.04, 0.04), 0.0),  # fully open
    ((0.0, 0.0), 1.0),  # fully closed
    ((0.02, 0.02), 0.5),
    ((0.04, 0.0), 0.5),  # mean over the fingers
    ((0.05, 0.05), 0.0),  # past open: clipped
    ((-0.001, -0.001), 1.0),  # past closed: clipped
])
def test_gripper_closedness_of_the_panda_fingers(fingers, expected):
    reading = map_joint_state(*panda_msg(fingers=fingers), PANDA)
    assert reading.gripper == pytest.approx(expected)


def test_arm_positions_come_in_the_configured_order_whatever_the_message_order():
    names, positions = panda_msg()
    order = np.random.default_rng(0).permutation(len(names))
    reading = map_joint_state([names[i] for i in order], [positions[i] for i in order], PANDA)
    assert reading.joint_positions.tolist() == pytest.approx([0.1, -0.2, 0.3, -2.0, 0.0, 1.6, 0.8])
    assert reading.joint_positions.dtype == np.float64
    subset = JointConfig(arm_names=("panda_joint4", "panda_joint1"))
    assert map_joint_state(names, positions, subset).joint_positions.tolist() == pytest.approx([-2.0, 0.1])


def test_gripper_positions_come_raw_in_the_configured_order():
    names, positions = panda_msg(fingers=(0.01, 0.03))
    order = np.random.default_rng(1).permutation(len(names))
    shuffled = [names[i] for i in order], [positions[i] for i in order]
    reading = map_joint_state(*shuffled, PANDA)
    assert reading.gripper_positions.tolist() == pytest.approx([0.01, 0.03])  # metres, not closedness
    assert reading.gripper_positions.dtype == np.float64
    assert reading.gripper == pytest.approx(0.5)
    reversed_fingers = JointConfig(arm_names=ARM, gripper_names=FINGERS[::-1])
    assert map_joint_state(*shuffled, reversed_fingers).gripper_positions.tolist() == pytest.approx([0.03, 0.01])


@pytest.mark.parametrize(("config", "names", "arm_none", "gripper_none"), [
    (JointConfig(), list(ARM), True, True),  # default: no arm joints configured; message without fingers
    (PANDA, list(ARM), False, True),  # an arm-only message (one publisher per controller)
    (PANDA, list(FINGERS), True, False),  # a gripper-only message
    (PANDA, ["other_joint"], True, True),  # about other joints entirely
    (JointConfig(arm_names=ARM, gripper_names=()), list(ARM) + list(FINGERS), False, True),  # no gripper joints
])
def test_groups_absent_from_a_message_stay_unknown(config, names, arm_none, gripper_none):
    reading = map_joint_state(names, [0.01] * len(names), config)
    assert (reading.joint_positions is None) == arm_none
    assert (reading.gripper is None) == gripper_none
    assert (reading.gripper_positions is None) == gripper_none  # positions and closedness come together


@pytest.mark.parametrize(("names", "positions", "match"), [
    (list(ARM[:3]) + list(FINGERS), [0.0] * 5, r"arm joints .* but not \['panda_joint4'"),
    ([*ARM, "panda_finger_joint1"], [0.0] * 8, r"gripper joints \['panda_finger_joint1'\] but not "
                                                      r"\['panda_finger_joint2'\]"),
    (list(ARM) + list(FINGERS), [0.0] * 7 + [math.nan, 0.0], r"non-finite position of gripper joints "
                                                             r"\['panda_finger_joint1'\]"),
    (list(ARM) + list(FINGERS), [math.inf] + [0.0] * 8, r"non-finite position of arm joints \['panda_joint1'\]"),
    (list(ARM) + list(FINGERS), [0.0] * 8, r"9 names but 8 positions"),
    (list(ARM) + list(FINGERS) + ["panda_joint1"], [0.0] * 10, r"duplicate joint names \['panda_joint1'\]"),
])
def test_incomplete_or_invalid_messages_are_errors_naming_the_joints(names, positions, match):
    with pytest.raises(JointStateError, match=match):
        map_joint_state(names, positions, PANDA)


def test_nan_of_an_unconfigured_joint_is_not_an_error():
    names, positions = panda_msg()
    reading = map_joint_state([*names, "wheel"], [*positions, math.nan], PANDA)
    assert reading.gripper == 0.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gripper_open_position": 0.0, "gripper_closed_position": 0.0}, "closedness would be undefined"),
    ({"arm_names": ("a", "a")}, "duplicate"),
    ({"arm_names": ("a", "")}, "empty joint name"),
    ({"arm_names": ("panda_finger_joint1",)}, "both arm and gripper"),
])
def test_bad_joint_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JointConfig(**kwargs)


def test_from_params_names_the_key():
    values = {"joints.arm_names": [], "joints.gripper_names": list(FINGERS), "joints.gripper_open_position": 0.0,
              "joints.gripper_closed_position": 0.0}
    with pytest.raises(ConfigError, match=r"joints\.gripper_open_position"):
        JointConfig.from_params(values)
    values["joints.gripper_closed_position"] = 0.04  # a gripper whose joints grow when closing is fine
    assert JointConfig.from_params(values).gripper_closed_position == 0.04


@settings(max_examples=200, deadline=None)
@given(positions=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=4),
       open_pos=st.floats(-1.0, 1.0), span=st.floats(1e-3, 1.0), flip=st.booleans())
def test_closedness_is_in_range_and_monotonic(positions, open_pos, span, flip):
    closed_pos = open_pos - span if flip else open_pos + span
    c = closedness(positions, open_pos, closed_pos)
    assert 0.0 <= c <= 1.0
    # Moving every joint towards "closed" never makes the gripper less closed.
    step = (closed_pos - open_pos) * 0.1
    assert closedness([p + step for p in positions], open_pos, closed_pos) >= c - 1e-12
    # The end positions are exactly open and closed.
    assert closedness([open_pos] * len(positions), open_pos, closed_pos) == 0.0
    assert closedness([closed_pos] * len(positions), open_pos, closed_pos) == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-3.0, 3.0), min_size=9, max_size=9), seed=st.integers(0, 2**16))
def test_mapping_does_not_depend_on_message_order(values, seed):
    names = list(ARM) + list(FINGERS)
    order = np.random.default_rng(seed).permutation(len(names))
    a = map_joint_state(names, values, PANDA)
    b = map_joint_state([names[i] for i in order], [values[i] for i in order], PANDA)
    assert a.joint_positions.tolist() == b.joint_positions.tolist() == values[:7]
    assert a.gripper == b.gripper
    assert a.gripper_positions.tolist() == b.gripper_positions.tolist() == values[7:]


def test_the_simulator_publishes_the_panda_finger_joints():
    """The sim's joint_states (rt2_ros.nodes.sim_node publishes TabletopSim.joint_state()) carry the
    joints the policy node's defaults name; an open gripper reads as closedness 0."""
    from rt2_ros.nodes.policy_node import NODE_PARAMS
    from rt2_ros.sim.tabletop import JOINT_NAMES, TabletopSim

    defaults = {s.name: s.default for s in NODE_PARAMS if s.name.startswith("joints.")}
    config = JointConfig.from_params({**defaults, "joints.arm_names": list(JOINT_NAMES[:7])})
    assert set(config.gripper_names) <= set(JOINT_NAMES)
    sim = TabletopSim({}, seed=0)
    try:
        js = sim.joint_state()
        reading = map_joint_state(js.names, js.positions, config)
        assert reading.gripper == pytest.approx(0.0, abs=0.05)
        assert reading.gripper == pytest.approx(sim.gripper_closedness())  # the sim's own measure
        sim.set_gripper(1.0)
        for _ in range(100):
            sim.step(0.02)
        js = sim.joint_state()
        closed = map_joint_state(js.names, js.positions, config).gripper
        assert closed > 0.9 and closed == pytest.approx(sim.gripper_closedness())
        assert reading.joint_positions.shape == (7,)
    finally:
        sim.close()
