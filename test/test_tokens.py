"""Tests for rt2_ros.tokens / token_profiles / tokens_cli.

Reference values are computed by hand from the published definitions (RT-1 action_tokenizer,
OpenVLA ActionTokenizer + predict_action un-normalisation); properties run over every profile.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rt2_ros.actions import ArmAction, BackendReply
from rt2_ros.params import ConfigError, markdown_table
from rt2_ros.token_profiles import GRIPPER_CONVENTIONS, PROFILES
from rt2_ros.tokens import (
    TOKEN_ERROR_REASONS,
    TOKENIZER_PARAMS,
    ActionTokenizer,
    TokenError,
    rotvec_to_rpy,
    rpy_to_rotvec,
)
from rt2_ros.tokens_cli import load_tokenizer_config, main

REPO = Path(__file__).resolve().parents[1]
CASES = ("rt2", "rt1", "openvla", "openvla_stats")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A tiny OpenVLA dataset_statistics.json; asymmetric ranges so a swapped q01/q99 or sign shows.
Q01 = [-0.02, -0.03, -0.01, -0.10, -0.08, -0.20, 0.0]
Q99 = [0.03, 0.02, 0.04, 0.12, 0.09, 0.15, 1.0]
MASK = [True] * 6 + [False]  # OpenVLA leaves the gripper un-normalised


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "dataset_statistics.json"
    path.write_text(json.dumps({"bridge_orig": {"action": {"q01": Q01, "q99": Q99, "mask": MASK}}}))
    return path


@pytest.fixture(scope="module")
def toks(stats_path: Path) -> dict[str, ActionTokenizer]:
    return {
        "rt2": ActionTokenizer.from_profile("rt2"),
        "rt1": ActionTokenizer.from_profile("rt1"),
        "openvla": ActionTokenizer.from_profile("openvla"),
        "openvla_stats": ActionTokenizer.from_profile("openvla", dataset_statistics=str(stats_path)),
    }


def rt2() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


def motion_bins(tok: ActionTokenizer, motion: list[int]) -> list[int]:
    return ([tok.continue_bin] if tok.has_terminate else []) + motion


# --- hand-computed reference values ----------------------------------------------------------

def test_rt1_reference_values() -> None:
    tok = ActionTokenizer.from_profile("rt1")
    ts, rs = tok.translation_scale_m, tok.rotation_scale_rad
    # dx = 0.5 in [-1, 1]: int((0.5 + 1) / 2 * 255) = int(191.25) = 191
    # dy = -0.3: int(0.7 / 2 * 255) = int(89.25) = 89;  dz = 1.0 (max): 255
    # droll = pi/4 in [-pi/2, pi/2]: int(0.75 * 255) = 191; dpitch = -pi/2: 0; dyaw = 0: int(127.5) = 127
    # gripper closedness 1 (closed) = +1 in RT-1's [-1, 1]: 255
    rpy = np.array([math.pi / 4, -math.pi / 2 + 1e-9, 0.0]) * rs
    action = ArmAction(np.array([0.5, -0.3, 1.0]) * ts, rpy_to_rotvec(rpy), 1.0, terminate=True)
    bins = tok.encode(action)
    # RT-1 terminate_episode class 0 = terminate
    assert bins.tolist() == [0, 191, 89, 255, 191, 0, 127, 255]
    # decode: t / 255 * (max - min) + min:  191 -> 191/255*2-1 = 0.4980392...
    decoded = tok.decode(bins)
    assert decoded.translation[0] == pytest.approx((191 / 255 * 2 - 1) * ts, abs=1e-15)
    assert decoded.terminate is True
    assert tok.decode([1, 191, 89, 255, 191, 0, 127, 255]).terminate is False


def test_rt2_reference_answer() -> None:
    tok = rt2()
    action = tok.decode(tok.parse_text("1 128 91 241 5 101 127 217").bins)
    # first token 1 = terminate; dx bin 128 -> 128/255*2-1 = 1/255 model units * 0.02 m
    assert action.terminate is True
    assert action.translation[0] == pytest.approx(1 / 255 * 0.02)
    assert action.translation[1] == pytest.approx((91 / 255 * 2 - 1) * 0.02)
    # gripper 217 -> g = 217/255*2-1 (-1 open, +1 closed) -> closedness (g+1)/2 = 217/255
    assert action.gripper == pytest.approx(217 / 255)
    # rotation: rpy (5, 101, 127) -> angles t/255*pi - pi/2, * 0.1 rad
    expected_rpy = (np.array([5, 101, 127]) / 255 * math.pi - math.pi / 2) * 0.1
    assert rotvec_to_rpy(action.rotation) == pytest.approx(expected_rpy, abs=1e-12)


@given(st.floats(-1.5, 1.5, allow_nan=False))
@PROPERTY
def test_rt1_encoding_matches_published_int_formula(a: float) -> None:
    tok = ActionTokenizer.from_profile("rt1", translation_scale_m=1.0)
    got = int(tok.encode(ArmAction([a, 0, 0], np.zeros(3), 0.0))[1])
    x = (min(max(a, -1.0), 1.0) + 1.0) / 2.0 * 255  # published: int((clip(a)-min)/(max-min)*255)
    # Identical except within 1e-6 bin below an edge, where we deliberately round up (round-off).
    assert got == int(x) or (got == int(x) + 1 and x - int(x) > 1 - 1e-6)


def test_openvla_reference_values() -> None:
    tok = ActionTokenizer.from_profile("openvla")  # vocab 32000, as Llama-2 OpenVLA
    edges = np.linspace(-1, 1, 256)  # step 2/255
    # a = 0.0: edges[127] = -1/255 <= 0 < edges[128] = 1/255 -> digitize = 128 -> id 32000 - 128 = 31872
    # a = 0.5: 0.5 is in [edges[191], edges[192]) (191.25 steps above -1) -> 192 -> id 31808
    # a = 1.0: digitize = 256 -> id 31744;  a = -1.0: digitize = 1 -> id 31999
    values = np.array([0.0, 0.5, 1.0, -1.0, 0.0, 0.0, 1.0])
    ids = tok.ids_from_bins(tok.bins_from_values(values))
    assert ids.tolist() == [31872, 31808, 31744, 31999, 31872, 31872, 31744]
    # decode: d = 32000 - id; centre index clip(d - 1, 0, 254)
    centres = (edges[:-1] + edges[1:]) / 2
    back = tok.values_from_bins(tok.bins_from_ids(ids))
    assert back == pytest.approx(centres[[127, 191, 254, 0, 127, 127, 254]], abs=1e-12)
    assert back[0] == pytest.approx(0.0, abs=1e-12)
    assert back[2] == pytest.approx(1 - 1 / 255)


@given(st.lists(st.floats(-1.2, 1.2, allow_nan=False), min_size=7, max_size=7))
@PROPERTY
def test_openvla_matches_published_digitize(values: list[float]) -> None:
    tok = ActionTokenizer.from_profile("openvla")
    edges = np.linspace(-1, 1, 256)
    published_ids = 32000 - np.digitize(np.clip(values, -1, 1), edges)
    assert tok.ids_from_bins(tok.bins_from_values(np.array(values))).tolist() == published_ids.tolist()
    centres = (edges[:-1] + edges[1:]) / 2
    published_back = centres[np.clip(32000 - published_ids - 1, 0, 254)]
    assert tok.values_from_bins(tok.bins_from_ids(published_ids)) == pytest.approx(published_back, abs=1e-12)


def test_openvla_unnormalisation_reference(toks: dict[str, ActionTokenizer]) -> None:
    tok = toks["openvla_stats"]
    assert tok.translation_scale_m == 1.0  # statistics give dataset units (m, rad)
    # bin 127 -> n = 0 -> a = 0.5*(0+1)*(q99-q01)+q01: dx = 0.5*0.05-0.02 = 0.005, dy = -0.005, dz = 0.015
    action = tok.decode([127] * 6 + [255])
    assert action.translation == pytest.approx([0.005, -0.005, 0.015], abs=1e-12)
    # bin 255 -> centre n = 1 - 1/255 -> dx = 0.5*(2 - 1/255)*0.05 - 0.02 = 0.03 - 0.025/255
    assert tok.decode([255] * 7).translation[0] == pytest.approx(0.03 - 0.025 / 255, abs=1e-12)
    # gripper (mask false) stays n = 1 - 1/255, 1 = open -> closedness 1/255
    assert action.gripper == pytest.approx(1 / 255)


def test_openvla_without_statistics_is_identity_with_normalised_scale(toks: dict[str, ActionTokenizer]) -> None:
    tok = toks["openvla"]
    assert tok.statistics is None
    assert tok.translation_scale_m == 0.02 and tok.rotation_scale_rad == 0.1
    assert tok.decode([255] * 7).translation[0] == pytest.approx((1 - 1 / 255) * 0.02)


def test_rt2_uses_rt1_binning() -> None:
    a, b = rt2(), ActionTokenizer.from_profile("rt1")
    motion = [0, 17, 128, 255, 3, 200, 99]
    assert a.values_from_bins(motion_bins(a, motion)) == pytest.approx(b.values_from_bins(motion_bins(b, motion)))
    assert (a.terminate_bin, a.continue_bin) == (1, 0)
    assert (b.terminate_bin, b.continue_bin) == (0, 1)


# --- properties over every profile ----------------------------------------------------------

def _gripper_domain(tok: ActionTokenizer) -> tuple[float, float]:
    lo, hi = tok.low[-1], tok.high[-1]
    if tok.gripper_convention in ("one_open_zero_closed", "zero_open_one_closed"):
        return max(lo, 0.0), min(hi, 1.0)
    return max(lo, -1.0), min(hi, 1.0)


@st.composite
def model_values(draw: st.DrawFn, tok: ActionTokenizer) -> np.ndarray:
    """7 motion values inside the profile's ranges, in model units (dataset units with statistics)."""
    m = slice(1, None) if tok.has_terminate else slice(None)
    low, high = tok.low[m].copy(), tok.high[m].copy()
    low[-1], high[-1] = _gripper_domain(tok)
    fractions = np.array(draw(st.lists(st.floats(0, 1), min_size=7, max_size=7)))
    values = low + fractions * (high - low)
    return tok.statistics.unnormalise(values) if tok.statistics is not None else values


@pytest.mark.parametrize("case", CASES)
@given(data=st.data())
@PROPERTY
def test_decode_encode_round_trip_within_bin(toks: dict[str, ActionTokenizer], case: str, data: st.DataObject) -> None:
    tok = toks[case]
    values = data.draw(model_values(tok))
    terminate = tok.has_terminate and data.draw(st.booleans())
    action = tok.action_from_values(values, terminate)
    decoded = tok.decode(tok.encode(action))
    assert decoded.terminate == action.terminate

    m = slice(1, None) if tok.has_terminate else slice(None)
    step = (tok.high[m] - tok.low[m]) / (tok.n_bins - 1)  # one bin, model (normalised) units
    norm = tok.statistics.normalise if tok.statistics is not None else (lambda v: v)
    err = norm(values) - norm(tok.values_from_action(decoded))
    if tok.binning == "edges":  # RT-1 truncates and decodes to the lower edge: 0 <= err < 1 bin
        # (-1e-6 bin: values that close below an edge count as on it, see token_profiles)
        assert np.all(err > -1e-6 * step - 1e-12) and np.all(err < step + 1e-9), err / step
        bound = step
    else:  # OpenVLA decodes to bin centres: |err| <= half a bin
        assert np.all(np.abs(err) <= step / 2 + 1e-9), err / step
        bound = step / 2
    # the same bound in physical units (metres; radians of roll/pitch/yaw)
    slope = np.ones(7) if tok.statistics is None else np.where(
        tok.statistics.mask, (tok.statistics.q99 - tok.statistics.q01) / 2, 1.0)
    t_bound = bound[0:3] * slope[0:3] * tok.translation_scale_m
    assert np.all(np.abs(decoded.translation - action.translation) <= t_bound + 1e-12)
    r_bound = bound[3:6] * slope[3:6] * tok.rotation_scale_rad
    assert np.all(np.abs(rotvec_to_rpy(decoded.rotation) - rotvec_to_rpy(action.rotation)) <= r_bound + 1e-9)


@pytest.mark.parametrize("case", CASES)
@given(data=st.data())
@PROPERTY
def test_bins_survive_decode_then_encode(toks: dict[str, ActionTokenizer], case: str, data: st.DataObject) -> None:
    tok = toks[case]
    motion = data.draw(st.lists(st.integers(0, tok.n_bins - 1), min_size=7, max_size=7))
    flag = [data.draw(st.sampled_from([tok.terminate_bin, tok.continue_bin]))] if tok.has_terminate else []
    bins = np.array(flag + motion)
    again = tok.encode(tok.decode(bins))
    if tok.binning == "edges":
        assert again.tolist() == bins.tolist()
        return
    # OpenVLA's last bin (reached only at exactly +1) shares the centre of the one below
    expected = np.minimum(bins, tok.n_bins - 2)
    assert again[:-1].tolist() == expected[:-1].tolist()
    # gripper g in [0, 1] (1 = open): bins with a negative centre clip to fully closed (g = 0, bin 127)
    assert again[-1] == max(expected[-1], 127)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dim", range(7))
def test_decode_is_monotonic_per_dimension(toks: dict[str, ActionTokenizer], case: str, dim: int) -> None:
    tok = toks[case]
    rows = []
    for b in range(tok.n_bins):
        motion = [100] * 7
        motion[dim] = b
        rows.append(tok.values_from_bins(np.array(motion_bins(tok, motion)))[dim])
    diffs = np.diff(rows)
    if tok.binning == "edges":
        assert np.all(diffs > 0)
    else:
        assert np.all(diffs[:-1] > 0) and diffs[-1] == 0  # last two bins share a centre
    # and in physical units: translation rises with its bin; gripper closedness moves one way
    actions = [tok.decode(motion_bins(tok, [100] * dim + [b] + [100] * (6 - dim))) for b in range(tok.n_bins)]
    if dim < 3:
        assert np.all(np.diff([a.translation[dim] for a in actions]) >= 0)
    elif dim < 6:
        assert np.all(np.diff([rotvec_to_rpy(a.rotation)[dim - 3] for a in actions]) >= -1e-12)
    else:
        closedness = np.diff([a.gripper for a in actions])
        assert np.all(closedness >= 0) or np.all(closedness <= 0)


# --- conventions -------------------------------------------------------------------------------

@pytest.mark.parametrize(("convention", "open_value", "closed_value"), [
    ("minus1_open", -1.0, 1.0),
    ("plus1_open", 1.0, -1.0),
    ("one_open_zero_closed", 1.0, 0.0),
    ("zero_open_one_closed", 0.0, 1.0),
])
@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_gripper_conventions(convention: str, open_value: float, closed_value: float, mode: str) -> None:
    tok = ActionTokenizer.from_profile("rt2", gripper_convention=convention, gripper_mode=mode)
    opened = tok.decode_continuous([0, 0, 0, 0, 0, 0, open_value])
    closed = tok.decode_continuous([0, 0, 0, 0, 0, 0, closed_value])
    if mode == "absolute":
        assert (opened.gripper, closed.gripper) == (0.0, 1.0)
    else:  # relative: the convention's extremes are "open fully" (-1) and "close fully" (+1)
        assert (opened.gripper, closed.gripper) == (-1.0, 1.0)
    assert opened.gripper_relative is (mode == "relative")
    # the inverse is exact
    assert tok.values_from_action(closed)[6] == pytest.approx(closed_value)


def test_gripper_mode_mismatch_is_refused() -> None:
    with pytest.raises(TokenError) as err:
        rt2().encode(ArmAction.hold())  # hold() is a relative-gripper action
    assert err.value.reason == "gripper_mode"


def _rot_matrix_from_rpy(r: float, p: float, y: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(r), math.sin(r), math.cos(p), math.sin(p), math.cos(y), math.sin(y)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx  # static x, then y, then z


def _rot_matrix_from_rotvec(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if angle == 0:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx  # Rodrigues


@given(st.lists(st.floats(-1, 1), min_size=3, max_size=3))
@PROPERTY
def test_rotation_conventions(rot: list[float]) -> None:
    rs = 0.3
    rpy_tok = ActionTokenizer.from_profile("rt2", rotation_scale_rad=rs)
    aa_tok = ActionTokenizer.from_profile("rt2", rotation_scale_rad=rs, rotation_convention="axis_angle")
    values = [0, 0, 0, *rot, -1]
    # rpy: the rotation vector must describe the same rotation as roll-pitch-yaw (static xyz)
    got = rpy_tok.decode_continuous(values).rotation
    assert _rot_matrix_from_rotvec(got) == pytest.approx(_rot_matrix_from_rpy(*(np.array(rot) * rs)), abs=1e-12)
    # axis_angle: the three values already are the rotation vector
    assert aa_tok.decode_continuous(values).rotation == pytest.approx(np.array(rot) * rs)


def test_scales_are_config() -> None:
    tok = ActionTokenizer.from_profile("rt2", translation_scale_m=0.05, rotation_scale_rad=0.2,
                                       rotation_convention="axis_angle")
    action = tok.decode_continuous([1, -1, 0.5, 0.5, 0, 0, -1])
    assert action.translation == pytest.approx([0.05, -0.05, 0.025])
    assert action.rotation == pytest.approx([0.1, 0, 0])
    assert rt2().translation_scale_m == 0.02 and rt2().rotation_scale_rad == 0.1


def test_per_dimension_ranges_are_config() -> None:
    low = [0.0, -0.5, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0]  # floats: ROS 2 refuses integers for a double array
    high = [1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    tok = ActionTokenizer.from_profile("rt2", low=low, high=high, gripper_convention="zero_open_one_closed",
                                       translation_scale_m=1.0)
    assert tok.decode([0, 255, 0, 0, 0, 0, 0, 255]).translation[0] == pytest.approx(0.5)
    assert tok.decode([0, 255, 0, 0, 0, 0, 0, 255]).gripper == pytest.approx(1.0)


def test_custom_terminate_coding() -> None:
    tok = ActionTokenizer.from_profile("rt2", terminate_bin=2, continue_bin=1)
    assert tok.decode([2] + [0] * 7).terminate and not tok.decode([1] + [0] * 7).terminate
    with pytest.raises(TokenError) as err:
        tok.decode([0] * 8)
    assert err.value.reason == "out_of_range"


def test_encode_clips_and_refuses_bad_actions(toks: dict[str, ActionTokenizer]) -> None:
    tok = rt2()
    assert tok.encode(ArmAction([10, -10, 0], np.zeros(3), 0.0)).tolist()[1:3] == [255, 0]
    with pytest.raises(TokenError) as err:
        tok.encode(ArmAction([math.nan, 0, 0], np.zeros(3), 0.0))
    assert err.value.reason == "non_finite"
    with pytest.raises(TokenError) as err:
        toks["openvla"].encode(ArmAction(np.zeros(3), np.zeros(3), 0.0, terminate=True))
    assert err.value.reason == "out_of_range"


# --- strict validation -------------------------------------------------------------------------

MALFORMED_TEXT = [
    ("", "empty"),
    ("   \n ", "empty"),
    ("Plan: pick the apple.", "empty"),
    ("Plan: pick the apple. Action:", "empty"),
    ("1 128 91 241 5 101 127", "wrong_count"),
    ("1 128 91 241 5 101 127 217 3", "wrong_count"),
    ("1 128 12.5 241 5 101 127 217", "non_integer"),
    ("1 abc 91 241 5 101 127 217", "non_integer"),
    ("1 +5 91 241 5 101 127 217", "non_integer"),
    ("1 1e2 91 241 5 101 127 217", "non_integer"),
    ("1 \u0663 91 241 5 101 127 217", "non_integer"),  # Arabic-Indic 3: int() would accept it
    ("1,128,91,241,5,101,127,217", "non_integer"),
    ("1 128 91 241 5 101 127 256", "out_of_range"),
    ("1 -1 91 241 5 101 127 217", "out_of_range"),
    ("1 99999999999999999999999 91 241 5 101 127 217", "out_of_range"),
    ("2 128 91 241 5 101 127 217", "out_of_range"),  # terminate must be 0 or 1
    ("1 128 nan 241 5 101 127 217", "non_finite"),
    ("1 128 inf 241 5 101 127 217", "non_finite"),
    ("1 128 -Infinity 241 5 101 127 217", "non_finite"),
    ("NaN", "non_finite"),
    ("1 128 91 241 5 101 127 217 foo", "trailing_junk"),
    ("1 128 91 241 5 101 127 217</s>", "trailing_junk"),
    ("1 128 91 241 5 101 127 217.", "trailing_junk"),
    ("1 128 91 241 5 101 127 217 3 x", "trailing_junk"),
    ("1 2 Plan: pick. Action: 1 128 91 241 5 101 127 217", "mixed_forms"),
    ("Plan: a Action: 1 128 91 241 5 101 127 217 Action: 1 128 91 241 5 101 127 217", "mixed_forms"),
    ("Action: 1 128 91 241 5 101 127 217 Plan: later", "mixed_forms"),
    ("Plan: a. Plan: b. Action: 1 128 91 241 5 101 127 217", "mixed_forms"),
    ("sure! Action: 1 128 91 241 5 101 127 217", "mixed_forms"),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED_TEXT)
def test_malformed_text_rejected_with_reason(text: str, reason: str) -> None:
    with pytest.raises(TokenError) as err:
        rt2().parse_text(text)
    assert err.value.reason == reason
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "plan"), [
    ("1 128 91 241 5 101 127 217", ""),
    ("  1\t128 91 241 5 101 127 217\n", ""),
    ("Plan: pick the apple. Action: 1 128 91 241 5 101 127 217", "pick the apple."),
    ("plan:  move left, then down\nAction: 1 128 91 241 5 101 127 217", "move left, then down"),
    ("Action: 1 128 91 241 5 101 127 217", ""),
])
def test_valid_text_forms(text: str, plan: str) -> None:
    parsed = rt2().parse_text(text)
    assert parsed.bins.tolist() == [1, 128, 91, 241, 5, 101, 127, 217]
    assert parsed.plan == plan and parsed.text == text


def test_openvla_text_has_seven_tokens(toks: dict[str, ActionTokenizer]) -> None:
    with pytest.raises(TokenError) as err:
        toks["openvla"].parse_text("1 128 91 241 5 101 127 217")
    assert err.value.reason == "wrong_count"
    assert toks["openvla"].parse_text("128 91 241 5 101 127 255").bins.tolist()[-1] == 255


@pytest.mark.parametrize(("ids", "reason"), [
    ([], "empty"),
    ([31872] * 6, "wrong_count"),
    ([31872] * 8, "wrong_count"),
    ([31872] * 6 + [5], "unknown_id"),
    ([31872] * 6 + [32000], "unknown_id"),
    ([31872] * 6 + [-1], "unknown_id"),
    ([31872] * 6 + [31872.5], "non_integer"),
    ([31872] * 6 + [math.nan], "non_finite"),
    ([31872] * 6 + ["31872"], "non_integer"),
    ([31872] * 6 + [True], "non_integer"),
    ("31872 " * 7, "non_integer"),
    ([[31872] * 7], "wrong_count"),
])
def test_malformed_ids_rejected(toks: dict[str, ActionTokenizer], ids: object, reason: str) -> None:
    with pytest.raises(TokenError) as err:
        toks["openvla"].bins_from_ids(ids)
    assert err.value.reason == reason


def test_custom_id_map_palm_e_style() -> None:
    rng = np.random.default_rng(7)
    table = [int(i) for i in rng.permutation(np.arange(1000, 5000))[:256]]  # "least-used" ids
    tok = ActionTokenizer.from_profile("rt2", token_form="ids", token_ids=table)
    bins = np.array([0, 0, 17, 255, 128, 1, 99, 200])
    ids = tok.ids_from_bins(bins)
    assert ids.tolist() == [table[b] for b in bins]
    assert tok.bins_from_ids(ids).tolist() == bins.tolist()
    assert sorted(tok.valid_token_ids().tolist()) == sorted(table)
    with pytest.raises(TokenError) as err:
        tok.bins_from_ids([table[0]] * 7 + [999])
    assert err.value.reason == "unknown_id"


@pytest.mark.parametrize(("bins", "reason"), [
    ([], "empty"),
    ([0] * 7, "wrong_count"),
    (np.zeros((2, 8), dtype=int), "wrong_count"),
    ([0, 1, 2, 3, 4, 5, 6, 2.5], "non_integer"),
    ([0, 1, 2, 3, 4, 5, 6, math.inf], "non_finite"),
    ([0, 1, 2, 3, 4, 5, 6, 256], "out_of_range"),
    ([0, 1, 2, 3, 4, 5, 6, -3], "out_of_range"),
    ([3, 1, 2, 3, 4, 5, 6, 7], "out_of_range"),
    ("0 1 2 3 4 5 6 7", "non_integer"),
])
def test_decode_rejects_bad_bins(bins: object, reason: str) -> None:
    with pytest.raises(TokenError) as err:
        rt2().decode(bins)
    assert err.value.reason == reason


@pytest.mark.parametrize(("values", "reason"), [
    ([], "empty"),
    ([0.0] * 6, "wrong_count"),
    ([0.0] * 8, "wrong_count"),
    ([[0.0] * 7], "wrong_count"),
    ([0.0] * 6 + [math.nan], "non_finite"),
    ([math.inf] + [0.0] * 6, "non_finite"),
    (["a"] * 7, "non_numeric"),
    ("0 0 0 0 0 0 0", "non_numeric"),
])
@pytest.mark.parametrize("case", CASES)
def test_decode_continuous_rejects(toks: dict[str, ActionTokenizer], case: str, values: object, reason: str) -> None:
    with pytest.raises(TokenError) as err:
        toks[case].decode_continuous(values)
    assert err.value.reason == reason


def test_decode_continuous_in_dataset_units(toks: dict[str, ActionTokenizer]) -> None:
    # openpi / OpenVLA servers return un-normalised actions: metres and radians, gripper 1 = open
    action = toks["openvla_stats"].decode_continuous([0.01, -0.02, 0.0, 0.0, 0.0, 0.05, 1.0], observation_seq=9)
    assert action.translation == pytest.approx([0.01, -0.02, 0.0])
    assert action.rotation == pytest.approx([0, 0, 0.05])
    assert (action.gripper, action.observation_seq) == (0.0, 9)


def test_decode_reply_forms(toks: dict[str, ActionTokenizer]) -> None:
    tok = rt2()
    [a] = tok.decode_reply(BackendReply(seq=3, backend="t", text="0 128 91 241 5 101 127 217"))
    assert a.observation_seq == 3 and not a.terminate
    [b] = tok.decode_reply(BackendReply(seq=4, backend="t", token_ids=tuple(tok.ids_from_bins(
        [0, 128, 91, 241, 5, 101, 127, 217]).tolist())))
    assert b.translation == pytest.approx(a.translation)
    chunk = tok.decode_reply(BackendReply(seq=5, backend="t", actions=np.zeros((3, 7))))
    assert len(chunk) == 3 and all(c.observation_seq == 5 for c in chunk)
    for reply, reason in [
        (BackendReply(seq=1, backend="t"), "empty"),
        (BackendReply(seq=1, backend="t", text="0 1 2 3 4 5 6 7", token_ids=(1,)), "mixed_forms"),
        (BackendReply(seq=1, backend="t", actions=np.zeros((0, 7))), "empty"),
        (BackendReply(seq=1, backend="t", actions=np.zeros((2, 2, 7))), "wrong_count"),
        (BackendReply(seq=1, backend="t", actions=np.full((2, 7), np.nan)), "non_finite"),
    ]:
        with pytest.raises(TokenError) as err:
            tok.decode_reply(reply)
        assert err.value.reason == reason


# --- fuzzing: nothing invalid becomes an action -----------------------------------------------

_TOKEN = st.one_of(
    st.integers(-3, 260).map(str),
    st.sampled_from(["nan", "inf", "-inf", "12.5", "abc", "8.", "", "+5", "1e3", "\u0663", "00", "007", "</s>"]),
    st.text(max_size=4),
)
# near-valid answers: mostly legal numbers, so valid inputs are exercised as often as invalid ones
_NEAR_VALID = st.lists(st.sampled_from(["0", "1", "2", "127", "255", "256", "-1", "07", "nan"]), min_size=6,
                       max_size=9).map(" ".join)
_ANSWERS = st.one_of(st.lists(_TOKEN, max_size=11).map(" ".join), st.text(max_size=40), _NEAR_VALID)
_MARKERS = re.compile(r"(?i)\b(plan|action)\s*:")


def _oracle_bins(text: str, tok: ActionTokenizer) -> list[int] | None:
    """An independent statement of validity for a plain number answer."""
    parts = text.split()
    if len(parts) != tok.n_dims or not all(re.fullmatch(r"-?[0-9]+", p, re.ASCII) for p in parts):
        return None
    values = [int(p) for p in parts]
    if tok.has_terminate and values[0] not in (tok.terminate_bin, tok.continue_bin):
        return None
    if not all(0 <= v < tok.n_bins for v in values):
        return None
    return values


@pytest.mark.parametrize("case", CASES)
@given(text=_ANSWERS)
@PROPERTY
def test_random_text_never_yields_an_invalid_action(toks: dict[str, ActionTokenizer], case: str, text: str) -> None:
    tok = toks[case]
    assume(not _MARKERS.search(text))
    expected = _oracle_bins(text, tok)
    try:
        parsed = tok.parse_text(text)
    except TokenError as err:
        assert expected is None, f"valid answer rejected: {err}"
        assert err.reason in TOKEN_ERROR_REASONS
        return
    assert expected is not None and parsed.bins.tolist() == expected
    assert tok.decode(parsed.bins).is_finite()
    # the canonical form matches the constrained-decoding regex
    assert re.fullmatch(tok.text_regex(), tok.format_text(parsed.bins))


@pytest.mark.parametrize("case", CASES)
@given(text=_ANSWERS)
@PROPERTY
def test_text_regex_only_matches_parsable_answers(toks: dict[str, ActionTokenizer], case: str, text: str) -> None:
    tok = toks[case]
    if re.fullmatch(tok.text_regex(), text):
        assert tok.format_text(tok.parse_text(text).bins) == text


@given(plan=st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=60),
       bins=st.lists(st.integers(0, 255), min_size=7, max_size=7), terminate=st.booleans())
@PROPERTY
def test_chain_of_thought_keeps_plan(plan: str, bins: list[int], terminate: bool) -> None:
    tok = rt2()
    assume(plan.strip() and not _MARKERS.search(plan))
    numbers = [int(terminate), *bins]
    text = f"Plan: {plan} Action: {tok.format_text(numbers)}"
    parsed = tok.parse_text(text)
    assert parsed.plan == plan.strip() and parsed.bins.tolist() == numbers
    if "\n" not in plan and plan.strip() == plan:
        assert re.fullmatch(tok.text_regex(with_plan=True), text)


@given(ids=st.lists(st.one_of(st.integers(31700, 32050), st.floats(), st.booleans(), st.text(max_size=3)),
                    max_size=9))
@PROPERTY
def test_random_ids_never_yield_an_invalid_action(toks: dict[str, ActionTokenizer], ids: list[object]) -> None:
    tok = toks["openvla"]
    def ok(i: object) -> bool:  # ints, or floats holding an integer (numpy backends), never bools
        is_number = type(i) is int or (type(i) is float and math.isfinite(i) and i.is_integer())
        return is_number and 31744 <= i <= 31999

    valid = len(ids) == 7 and all(ok(i) for i in ids)
    try:
        bins = tok.bins_from_ids(ids)
    except TokenError:
        assert not valid
        return
    assert valid and tok.ids_from_bins(bins).tolist() == ids


@pytest.mark.parametrize("n_bins", [2, 10, 11, 100, 256, 1000, 4097])
def test_text_regex_matches_exactly_the_bin_range(n_bins: int) -> None:
    tok = ActionTokenizer.from_profile("openvla", n_bins=n_bins)
    one = re.compile(tok.text_regex().split(" ")[0])
    accepted = [v for v in range(n_bins + 50) if one.fullmatch(str(v))]
    assert accepted == list(range(n_bins))
    assert not one.fullmatch("01") and not one.fullmatch("-1")


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "key"), [
    ({"profle": "rt2"}, "tokenizer.profle"),
    ({"profile": "rt3"}, "tokenizer.profile"),
    ({"low": [0.0] * 3}, "tokenizer.low"),
    ({"low": [0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]}, "tokenizer.low/high"),
    ({"low": [0, 1, -1, -1, -1, -1, -1, -1]}, "tokenizer.low"),  # integers for a double array, as rclpy refuses
    ({"token_ids": list(range(10))}, "tokenizer.token_ids"),
    ({"token_ids": [5] * 256}, "tokenizer.token_ids"),
    ({"token_ids": list(range(40000, 40256))}, "tokenizer.token_ids"),
    ({"dataset_statistics": "/x.json"}, "tokenizer.dataset_statistics"),
    ({"prompt_template": "no placeholder"}, "tokenizer.prompt_template"),
    ({"terminate_bin": 0}, "tokenizer.terminate_bin/continue_bin"),
    ({"translation_scale_m": -0.1}, "tokenizer.translation_scale_m"),
    ({"gripper_convention": "sideways"}, "tokenizer.gripper_convention"),
])
def test_config_errors_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        ActionTokenizer.from_profile(**{"profile": "rt2", **overrides})
    assert key in str(err.value)


def test_statistics_file_errors(tmp_path: Path) -> None:
    two = tmp_path / "two.json"
    two.write_text(json.dumps({k: {"action": {"q01": Q01, "q99": Q99}} for k in ("a", "b")}))
    with pytest.raises(ConfigError, match=r"tokenizer\.unnorm_key.*\['a', 'b'\]"):
        ActionTokenizer.from_profile("openvla", dataset_statistics=str(two))
    assert ActionTokenizer.from_profile("openvla", dataset_statistics=str(two), unnorm_key="b").statistics.key == "b"
    with pytest.raises(ConfigError, match=r"tokenizer\.unnorm_key"):
        ActionTokenizer.from_profile("openvla", dataset_statistics=str(two), unnorm_key="c")
    with pytest.raises(ConfigError, match="does not exist"):
        ActionTokenizer.from_profile("openvla", dataset_statistics=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": {"action": {"q01": [0.0] * 6, "q99": Q99}}}))
    with pytest.raises(ConfigError, match="q01"):
        ActionTokenizer.from_profile("openvla", dataset_statistics=str(bad))
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        ActionTokenizer.from_profile("openvla", dataset_statistics=str(bad))


def test_from_config_ignores_other_sections() -> None:
    tok = ActionTokenizer.from_config({"tokenizer.profile": "rt1", "backend.type": "embedded"})
    assert (tok.profile, tok.n_dims, tok.has_terminate) == ("rt1", 8, True)
    assert tok.dim_names[0] == "terminate"


def test_params_are_documented() -> None:
    for spec in TOKENIZER_PARAMS:
        assert spec.name.startswith("tokenizer.") and len(spec.description) > 20
        if spec.type in ("int", "double"):
            assert spec.low is not None and spec.high is not None, spec.name
        spec.validate(spec.default)
    assert set(GRIPPER_CONVENTIONS) <= set(next(s for s in TOKENIZER_PARAMS
                                                 if s.name == "tokenizer.gripper_convention").choices)
    doc = (REPO / "docs" / "tokens.md").read_text()
    assert markdown_table(TOKENIZER_PARAMS) in doc, "regenerate the table in docs/tokens.md"
    for name in PROFILES:
        assert f"`{name}`" in doc


@pytest.mark.parametrize(("profile", "expected"), [
    ("rt2", "Q: what action should the robot take to pick up the Apple? A:"),
    ("openvla", "In: What action should the robot take to pick up the apple?\nOut:"),
])
def test_prompt(profile: str, expected: str) -> None:
    assert ActionTokenizer.from_profile(profile).prompt("  pick up\nthe Apple ") == expected
    with pytest.raises(TokenError):
        ActionTokenizer.from_profile(profile).prompt(" ")
    custom = ActionTokenizer.from_profile(profile, prompt_template="Task: {instruction}. Next action?")
    assert custom.prompt("Stack {cubes}") == "Task: Stack {cubes}. Next action?"


# --- CLI ---------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rt2_ros.tokens_cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_cli_decode_subprocess() -> None:
    out = _cli("decode", "--profile", "rt2", "Plan: pick the apple. Action: 1 128 91 241 5 101 127 217")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    expected = rt2().decode([1, 128, 91, 241, 5, 101, 127, 217])
    assert result["bins"] == [1, 128, 91, 241, 5, 101, 127, 217] and result["plan"] == "pick the apple."
    assert result["translation_m"] == pytest.approx(expected.translation.tolist(), abs=1e-8)
    assert result["rotation_rpy_rad"] == pytest.approx(rotvec_to_rpy(expected.rotation).tolist(), abs=1e-8)
    assert result["terminate"] is True and result["gripper"] == pytest.approx(217 / 255)


def test_cli_encode_subprocess() -> None:
    out = _cli("encode", "--profile", "rt2", "--translation", "0.01", "0", "0", "--rotation", "0", "0", "0",
               "--gripper", "1", "--terminate", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # 0.01 m / 0.02 m per unit = 0.5 -> int(0.75*255) = 191; rotation 0 -> int(127.5) = 127; closed -> 255
    assert result["tokens"] == "1 191 127 127 127 127 127 255"
    assert result["token_ids"] == [32000 - 1 - b for b in result["bins"]]


@pytest.mark.parametrize(("args", "reason"), [
    (("decode", "--profile", "rt2", "1 128 91 241 5 101 127 256"), "out_of_range"),
    (("decode", "--profile", "openvla", "--ids", "1", "2", "3", "4", "5", "6", "7"), "unknown_id"),
])
def test_cli_bad_input_exits_2(args: tuple[str, ...], reason: str) -> None:
    out = _cli(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and reason in out.stderr


def test_cli_reads_ros_params_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "params.yaml"
    cfg.write_text("rt2_policy:\n  ros__parameters:\n    backend:\n      type: embedded\n"
                   "    tokenizer:\n      profile: rt1\n      translation_scale_m: 0.05\n"
                   "rt2_safety:\n  ros__parameters:\n    safety.max_step_translation_m: 0.01\n")
    cfg_values = load_tokenizer_config(str(cfg))  # as the node runs with them: unset keys at their defaults
    assert cfg_values["tokenizer.profile"] == "rt1" and cfg_values["tokenizer.translation_scale_m"] == 0.05
    assert cfg_values["tokenizer.n_bins"] == 256
    assert main(["decode", "--config", str(cfg), "0 255 127 127 127 127 127 0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile"] == "rt1" and result["terminate"] is True  # rt1: class 0 = terminate
    assert result["translation_m"][0] == pytest.approx(0.05)
    # --profile overrides the file
    assert main(["decode", "--config", str(cfg), "--profile", "rt2", "0 255 127 127 127 127 127 0"]) == 0
    assert json.loads(capsys.readouterr().out)["terminate"] is False


@pytest.mark.parametrize("content", [
    # The file is checked as rt2-bringup --check checks it: node names, types, unknown keys, every node.
    "policy_node:\n  ros__parameters:\n    tokenizer: {profile: rt1}\n",  # not an rt2_ros node name
    "rt2_policy:\n  ros__parameters:\n    tokenizer: {profile: rt1}\nrt2_safety:\n  ros__parameters:\n"
    "    tokenizer: {profile: rt2}\n",  # rt2_safety has no tokenizer
    "rt2_safety:\n  ros__parameters:\n    safety: {watchdog_timeout_s: 1.0}\n",  # no rt2_policy section
    "rt2_policy:\n  ros__parameters:\n    tokenizer: {translation_scale_m: 1}\n",  # an integer for a double
    "rt2_policy:\n  ros__parameters:\n    tokenizer: {profile: rt1}\nrt2_safety:\n  ros__parameters:\n"
    "    safety: {watchdog_timeout_s: 2}\n",  # another node's error: the nodes would not start
    "- not a mapping\n",
    "key: [unclosed\n",
    "tokenizer:\n  profile: rt9\n",
])
def test_cli_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    cfg = tmp_path / "params.yaml"
    cfg.write_text(content)
    assert main(["decode", "--config", str(cfg), "1 1 1 1 1 1 1 1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rt2-tokens: error:") and err.count("\n") == 1


@pytest.mark.parametrize(("args", "clipped"), [
    (("--translation", "5", "0", "0", "--gripper", "1"), "dx 250 not in [-1, 1]"),  # 0.02 m per unit
    (("--translation", "0", "0", "0", "--gripper", "2"), "gripper 3 not in [-1, 1]"),  # closedness 2
    (("--translation", "0", "0", "0", "--rpy", "0", "0", "0.5", "--gripper", "0"), "dyaw 5 not in"),
])
def test_cli_encode_refuses_what_the_tokens_cannot_express(capsys: pytest.CaptureFixture[str], args, clipped) -> None:
    # 5 m, a closedness of 2 or 0.5 rad of yaw used to encode silently to the same tokens as the range edge.
    assert main(["encode", "--profile", "rt2", *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("rt2-tokens: error: out_of_range:") and clipped in out.err
    assert "--clip" in out.err
    # --clip encodes the nearest bins, says which values it clipped, and exits 0.
    assert main(["encode", "--profile", "rt2", "--clip", *args]) == 0
    out = capsys.readouterr()
    assert f"rt2-tokens: clipped {clipped}" in out.err
    edge = main(["encode", "--profile", "rt2", "--translation", "0.02", "0", "0", "--gripper", "1"])
    assert edge == 0  # exactly at the range edge is expressible, not clipped
    assert "clipped" not in capsys.readouterr().err


def test_cli_encode_plain_and_rpy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encode", "--profile", "openvla", "--translation", "0", "0", "0", "--rpy", "0", "0", "0",
                 "--gripper", "0"]) == 0
    # openvla without statistics: 0 -> bin 127; gripper open (closedness 0) = 1.0 -> bin 255
    assert capsys.readouterr().out.strip() == "127 127 127 127 127 127 255"
    assert main(["encode", "--profile", "openvla", "--translation", "0", "0", "0", "--gripper", "0",
                 "--terminate"]) == 2


# -- issue 11: outside numbers are range-checked, token parsing fails only with TokenError ----------

def test_continuous_row_outside_the_profile_range_is_rejected_not_clipped():
    tok = ActionTokenizer.from_profile("openvla", translation_scale_m=0.05, rotation_scale_rad=0.5,
                                       rotation_convention="axis_angle", gripper_convention="minus1_open")
    ok = tok.decode_continuous([0.5, 0, 0, 0, 0, 0, -1.0])
    assert ok.translation[0] == pytest.approx(0.025)
    with pytest.raises(TokenError) as err:
        tok.decode_continuous([1e6, 0, 0, 0, 0, 0, 0])
    assert err.value.reason == "out_of_range" and "dx" in str(err.value)
    with pytest.raises(TokenError):
        tok.decode_continuous([0, 0, 0, 0, 0, 0, 5.0])  # a gripper value of 5 is not "closed"


def test_continuous_range_is_configurable_and_checked():
    tok = ActionTokenizer.from_profile("openvla", continuous_low=[-0.1] * 7, continuous_high=[0.1] * 7)
    with pytest.raises(TokenError):
        tok.decode_continuous([0.5, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ConfigError, match=r"tokenizer\.continuous_low"):
        ActionTokenizer.from_profile("openvla", continuous_low=[0.0] * 3)
    with pytest.raises(ConfigError, match="needs low < high"):
        ActionTokenizer.from_profile("openvla", continuous_low=[0.1] * 7, continuous_high=[0.1] * 7)


def test_absurd_tokenizer_ranges_are_refused_at_start():
    with pytest.raises(ConfigError, match=r"tokenizer\.low/high"):
        ActionTokenizer.from_profile("rt2", low=[0.0, -1e308] + [-1.0] * 6,
                                     high=[1.0, 1e308] + [1.0] * 6)


@pytest.mark.parametrize("digits", [10, 5000])
def test_a_huge_number_token_is_a_token_error(digits):
    tok = ActionTokenizer.from_profile("rt2")
    with pytest.raises(TokenError) as err:
        tok.parse_text("0 " + "9" * digits + " 128 128 128 128 128 0")
    assert err.value.reason == "out_of_range"
