"""How each network backend maps an Observation (named cameras + proprioception) to its wire format.

Direct calls, no server: the openpi request is built and unpacked exactly as the server would
unpack it (``openpi_client.msgpack_numpy``), the OpenAI user message is built part by part and its
data-URL images decoded. Keys, shapes, dtypes, exact state values, camera order, and every error
naming the missing camera or state piece and its key. test/test_compat_backends.py sends the same
mappings over the wire to the test servers.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openpi_client import image_tools, msgpack_numpy
from transforms3d import euler, quaternions

from rt2_ros import imaging
from rt2_ros.actions import Observation
from rt2_ros.backends import BackendConfigError, BackendError
from rt2_ros.backends.base import camera_frames, check_camera_names
from rt2_ros.backends.openai_compat import OpenAICompatBackend
from rt2_ros.backends.openpi import STATE_FIELDS, OpenPIBackend, axis_angle, state_vector
from rt2_ros.tokens import ActionTokenizer

POS = np.array([0.4, -0.1, 0.3])
QUAT = quaternions.axangle2quat([0.0, 0.0, 1.0], 0.5)  # 0.5 rad about z, wxyz
FINGERS = np.array([0.03, 0.03])  # a ROS Panda: both finger joints positive [m]
JOINTS = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
RNG = np.random.default_rng(7)
SCENE = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
WRIST = RNG.integers(0, 256, (240, 320, 3), dtype=np.uint8)


def obs(cameras: tuple[str, ...] = ("camera", "wrist"), *, state: bool = True, **override: object) -> Observation:
    """Random frames (scene 480x640, wrist 240x320, a third "side" 100x100) and every state piece."""
    frames = {"camera": SCENE, "wrist": WRIST, "side": np.full((100, 100, 3), 9, np.uint8)}
    images = {c: frames[c] for c in cameras}
    pieces: dict = {"ee_position": POS, "ee_orientation": QUAT, "gripper": 0.25, "gripper_positions": FINGERS,
                    "joint_positions": JOINTS} if state else {}
    pieces.update(override)
    return Observation(images[cameras[0]], "put the cube in the tray", 3, 1.5, images=images, **pieces)


@pytest.fixture(scope="module")
def tokenizer() -> ActionTokenizer:
    return ActionTokenizer.from_profile("rt2")


def openpi_request(observation: Observation, **options: object) -> dict:
    backend = OpenPIBackend({"url": "ws://127.0.0.1:1", **options}, None)  # never connects
    try:
        return msgpack_numpy.unpackb(backend._build_request(observation))
    finally:
        backend.close()


LIBERO = {"image_keys": ["observation/image", "observation/wrist_image"], "image_cameras": ["camera", "wrist"],
          "state_format": "libero", "gripper_positions_scale": [1.0, -1.0]}


# -- openpi: images ---------------------------------------------------------------------------------

def test_openpi_default_sends_the_primary_padded_like_openpi() -> None:
    request = openpi_request(obs(("camera",)))
    assert sorted(request) == ["observation/image", "observation/state", "prompt"]
    image = request["observation/image"]
    assert image.dtype == np.uint8 and image.shape == (224, 224, 3)
    np.testing.assert_array_equal(image, image_tools.resize_with_pad(SCENE, 224, 224))  # openpi's own pixels
    assert request["prompt"] == "put the cube in the tray"


def test_openpi_libero_two_cameras() -> None:
    request = openpi_request(obs(), **LIBERO)
    assert sorted(request) == ["observation/image", "observation/state", "observation/wrist_image", "prompt"]
    np.testing.assert_array_equal(request["observation/image"], image_tools.resize_with_pad(SCENE, 224, 224))
    np.testing.assert_array_equal(request["observation/wrist_image"], image_tools.resize_with_pad(WRIST, 224, 224))
    state = request["observation/state"]
    assert state.dtype == np.float32 and state.shape == (8,)
    np.testing.assert_array_equal(state, np.float32([0.4, -0.1, 0.3, 0.0, 0.0, 0.5, 0.03, -0.03]))


@pytest.mark.parametrize(("image_cameras", "expected"), [
    ([], {"k0": SCENE, "k1": WRIST}),  # the observation's cameras in order
    (["wrist", "camera"], {"k0": WRIST, "k1": SCENE}),
])
def test_openpi_image_cameras_choose_the_camera_of_each_key(image_cameras: list[str], expected: dict) -> None:
    request = openpi_request(obs(), image_keys=["k0", "k1"], image_cameras=image_cameras, image_size=0, state_key="")
    assert sorted(request) == ["k0", "k1", "prompt"]
    for key, frame in expected.items():
        np.testing.assert_array_equal(request[key], frame)  # image_size 0: the full frame, untouched


def test_openpi_image_cameras_pick_a_subset() -> None:
    request = openpi_request(obs(("camera", "side", "wrist")), image_keys=["a", "b"], image_cameras=["camera", "wrist"],
                             image_resize="squash", state_key="")
    np.testing.assert_array_equal(request["a"], imaging.resize(SCENE, 224, 224))
    np.testing.assert_array_equal(request["b"], imaging.resize(WRIST, 224, 224))


@pytest.mark.parametrize(("cameras", "options", "match"), [
    (("camera",), LIBERO, r"camera 'wrist' for 'observation/wrist_image' \(backend\.openpi\.image_cameras\) is not "
                          r"in this observation \(it has: camera\)"),
    (("camera",), {"image_keys": ["a", "b"]}, r"no camera for 'b': backend\.openpi\.image_keys has 2 keys but the "
                                              r"observation has 1 camera\(s\) \(camera\)"),
    (("camera", "wrist"), {}, r"the observation has 2 cameras \(camera, wrist\) but backend\.openpi\.image_keys has 1 "
                              r"key\(s\); set backend\.openpi\.image_cameras"),
    (("camera", "side"), {"image_keys": ["a", "b"], "image_cameras": ["camera", "wrist"]}, r"camera 'wrist' for 'b'"),
])
def test_openpi_missing_camera_names_camera_and_key(cameras: tuple[str, ...], options: dict, match: str) -> None:
    with pytest.raises(BackendError, match=match):
        openpi_request(obs(cameras), **options)


# -- openpi: state ----------------------------------------------------------------------------------

def test_openpi_droid_sends_joint_and_gripper_arrays() -> None:
    """openpi's DROID client: observation/joint_position (7,) and observation/gripper_position (1,)."""
    request = openpi_request(obs(), state_format="droid", image_keys=["observation/exterior_image_1_left",
                                                                      "observation/wrist_image_left"])
    assert sorted(request) == ["observation/exterior_image_1_left", "observation/gripper_position",
                               "observation/joint_position", "observation/wrist_image_left", "prompt"]
    joints, gripper = request["observation/joint_position"], request["observation/gripper_position"]
    assert joints.dtype == gripper.dtype == np.float32 and joints.shape == (7,) and gripper.shape == (1,)
    np.testing.assert_array_equal(joints, JOINTS.astype(np.float32))
    np.testing.assert_array_equal(gripper, np.float32([0.25]))


def test_openpi_droid_custom_keys_and_no_state() -> None:
    request = openpi_request(obs(("camera",)), state_format="droid", joint_position_key="q", gripper_position_key="g")
    assert sorted(request) == ["g", "observation/image", "prompt", "q"]
    request = openpi_request(obs(("camera",), state=False), state_format="droid", state_key="")
    assert sorted(request) == ["observation/image", "prompt"]


def test_openpi_custom_state_fields_in_order() -> None:
    fields = ["joint_positions", "gripper", "ee_quat_wxyz", "ee_position", "gripper_positions", "ee_euler",
              "ee_axis_angle"]
    request = openpi_request(obs(("camera",)), state_format="custom", state_fields=fields, state_key="s",
                             gripper_positions_scale=[2.0, 0.5])
    state = request["s"]
    expected = np.concatenate([JOINTS, [0.25], QUAT, POS, [0.06, 0.015], [0.0, 0.0, 0.5], [0.0, 0.0, 0.5]])
    assert state.dtype == np.float32 and state.shape == (7 + 1 + 4 + 3 + 2 + 3 + 3,)
    np.testing.assert_allclose(state, expected.astype(np.float32), atol=1e-7)
    assert set(fields) == set(STATE_FIELDS)


@pytest.mark.parametrize(("options", "missing", "match"), [
    ({"state_format": "libero"}, {"gripper_positions": None},
     r"lacks gripper_positions for 'observation/state' \(state_format libero\).*joint_states of joints\.gripper_names"),
    ({}, {"ee_position": None, "ee_orientation": None},
     r"lacks ee_position, ee_orientation for 'observation/state' \(state_format pos_axisangle_gripper\).*ee_pose"),
    ({"state_format": "droid"}, {"joint_positions": None},
     r"lacks joint_positions for 'observation/joint_position' \(state_format droid\).*joints\.arm_names"),
    ({"state_format": "droid", "gripper_position_key": "g"}, {"joint_positions": None, "gripper": None},
     r"lacks joint_positions for 'observation/joint_position'; gripper for 'g' \(state_format droid\)"),
    ({"state_format": "custom", "state_fields": ["gripper", "joint_positions"], "state_key": "s"},
     {"joint_positions": None}, r"lacks joint_positions for 's' \(state_format custom\)"),
    ({"state_format": "libero"}, {"gripper_positions": np.array([0.01, 0.01, 0.01])},
     r"libero needs the 2 finger positions for 'observation/state', got 3"),
    ({"state_format": "libero", "gripper_positions_scale": [1.0]}, {},
     r"backend\.openpi\.gripper_positions_scale has 1 factors for 2 gripper_positions"),
    ({"state_format": "droid"}, {"joint_positions": np.array([0.0, np.nan])},
     r"invalid joint_positions for 'observation/joint_position'"),
    ({"state_format": "pos_euler_gripper"}, {"ee_orientation": np.array([0.0, 0.0, 0.0, 0.0])},
     r"invalid arm state for 'observation/state': ee_orientation"),
])
def test_openpi_missing_or_bad_state_names_the_piece_and_key(options: dict, missing: dict, match: str) -> None:
    with pytest.raises(BackendError, match=match):
        openpi_request(obs(("camera",), **missing), **options)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1))
def test_axis_angle_is_liberos(q: list[float]) -> None:
    """LIBERO's conversion of a unit quaternion: xyz * 2 acos(w) / sqrt(1 - w^2), its sign kept."""
    w, x, y, z = quat = np.asarray(q) / np.linalg.norm(q)
    vec = axis_angle(quat)
    if 1.0 - w * w > 1e-12:
        np.testing.assert_allclose(vec, np.array([x, y, z]) * 2.0 * np.arccos(w) / np.sqrt(1.0 - w * w), atol=1e-6)
    angle = float(np.linalg.norm(vec))
    assert angle <= 2 * np.pi + 1e-9
    back = quaternions.axangle2quat(vec if angle > 1e-12 else [1, 0, 0], angle)
    assert min(np.abs(back - quat).max(), np.abs(back + quat).max()) < 1e-6


def test_axis_angle_of_a_gripper_pointing_down_stays_put() -> None:
    """About pi around x, w changing sign (as matrix-derived quaternions do, x > 0): no flip to -pi."""
    for w in (0.02, 0.0, -0.02):
        quat = np.array([w, np.sqrt(1 - w * w), 0.0, 0.0])
        vec = axis_angle(quat)
        assert vec[0] == pytest.approx(2 * np.arccos(w)) and abs(vec[0] - np.pi) < 0.05


def test_state_vector_layouts() -> None:
    o = obs(("camera",))
    np.testing.assert_allclose(state_vector(o, "pos_euler_gripper"),
                               np.float32([*POS, *euler.quat2euler(QUAT, "sxyz"), 0.25]), atol=1e-7)
    np.testing.assert_allclose(state_vector(o, "pos_quat_gripper"), np.float32([*POS, *QUAT, 0.25]), atol=1e-7)
    np.testing.assert_allclose(state_vector(o, "libero"), np.float32([*POS, 0, 0, 0.5, *FINGERS]), atol=1e-7)


# -- openpi: configuration --------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "key"), [
    ({"image_keys": []}, "image_keys"),
    ({"image_keys": ["a", ""]}, "image_keys[1]"),
    ({"image_keys": ["a", "a"]}, "image_keys[1]"),
    ({"image_keys": ["a", "b"], "image_cameras": ["camera"]}, "image_cameras"),
    ({"image_keys": ["a", "b"], "image_cameras": ["camera", "camera"]}, "image_cameras"),
    ({"image_cameras": [""]}, "image_cameras"),
    ({"state_format": "custom"}, "state_fields"),
    ({"state_fields": ["gripper"]}, "state_fields"),
    ({"state_format": "custom", "state_fields": ["ee_rpy"]}, "state_fields"),
    ({"state_format": "libero", "state_key": "observation/image"}, "state_key"),
    ({"state_format": "droid", "joint_position_key": "x", "gripper_position_key": "x"}, "gripper_position_key"),
    ({"state_format": "droid", "joint_position_key": ""}, "joint_position_key"),
    ({"prompt_key": "observation/image"}, "prompt_key"),
    ({"gripper_positions_scale": [1, -1]}, "gripper_positions_scale"),
])
def test_openpi_bad_mapping_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(BackendConfigError, match=r"backend\.openpi\." + key.replace(".", r"\.").replace("[", r"\[")):
        OpenPIBackend({"url": "ws://127.0.0.1:1", **options}, None)


def test_openpi_droid_ignores_state_key_collisions() -> None:
    """droid sends no state_key: its default may equal nothing else, and a clash with it is no error."""
    OpenPIBackend({"url": "ws://127.0.0.1:1", "state_format": "droid", "state_key": "prompt"}, None).close()


# -- openai -----------------------------------------------------------------------------------------

def openai_parts(tokenizer: ActionTokenizer, observation: Observation, **options: object) -> list:
    backend = OpenAICompatBackend({"model": "m", "image_format": "png", **options}, tokenizer)
    try:
        parts = backend.content(observation)
    finally:
        backend.close()
    out = []
    for part in parts:
        if part["type"] == "text":
            out.append(part["text"])
        else:
            header, b64 = part["image_url"]["url"].split(",", 1)
            assert header == "data:image/png;base64"
            out.append(imaging.decode_image(base64.b64decode(b64)))
    return out


def test_openai_default_is_one_image_then_the_prompt(tokenizer: ActionTokenizer) -> None:
    image, prompt = openai_parts(tokenizer, obs())
    np.testing.assert_array_equal(image, SCENE)  # the primary, PNG is lossless
    assert prompt == tokenizer.prompt("put the cube in the tray")


def test_openai_several_cameras_labelled_in_order(tokenizer: ActionTokenizer) -> None:
    parts = openai_parts(tokenizer, obs(("camera", "side", "wrist")), cameras=["wrist", "camera"], image_size=64)
    assert [p if isinstance(p, str) else p.shape for p in parts] == [
        "wrist:", (64, 64, 3), "camera:", (64, 64, 3), tokenizer.prompt("put the cube in the tray")]
    np.testing.assert_array_equal(parts[1], imaging.resize(WRIST, 64, 64))
    np.testing.assert_array_equal(parts[3], imaging.resize(SCENE, 64, 64))
    labels = openai_parts(tokenizer, obs(), cameras=["camera", "wrist"], image_label="Image {index} ({camera})")
    assert [p for p in labels if isinstance(p, str)][:2] == ["Image 1 (camera)", "Image 2 (wrist)"]
    bare = openai_parts(tokenizer, obs(), cameras=["camera", "wrist"], image_label="")
    assert [isinstance(p, str) for p in bare] == [False, False, True]


def test_openai_one_listed_camera_has_no_label(tokenizer: ActionTokenizer) -> None:
    image, _prompt = openai_parts(tokenizer, obs(), cameras=["wrist"])
    np.testing.assert_array_equal(image, WRIST)


def test_openai_missing_camera_names_it(tokenizer: ActionTokenizer) -> None:
    with pytest.raises(BackendError, match=r"openai: camera 'wrist' \(backend\.openai\.cameras\) is not in this "
                                           r"observation \(it has: camera\)"):
        openai_parts(tokenizer, obs(("camera",)), cameras=["camera", "wrist"])


# -- shared helpers ---------------------------------------------------------------------------------

def test_camera_frames_and_names() -> None:
    o = obs(("wrist", "camera"))  # the primary is whichever camera comes first
    assert [n for n, _ in camera_frames(o, [], "k", "b")] == ["wrist"]
    assert [n for n, _ in camera_frames(o, ["camera", "wrist"], "k", "b")] == ["camera", "wrist"]
    assert camera_frames(o, ["camera"], "k", "b")[0][1] is SCENE
    with pytest.raises(BackendError, match=r"b: camera 'side' \(k\) is not in this observation \(it has: wrist, "
                                           r"camera\)"):
        camera_frames(o, ["side"], "k", "b")
    assert check_camera_names(["a", "b"], "k") == ["a", "b"]
    with pytest.raises(BackendConfigError, match=r"k: camera 'a' is listed twice"):
        check_camera_names(["a", "b", "a"], "k")


def test_observation_built_from_one_image_has_the_default_camera() -> None:
    o = Observation(SCENE, "x", 0, 0.0)
    assert dict(o.images) == {"camera": SCENE} and o.primary_camera == "camera"
    assert [n for n, _ in camera_frames(o, ["camera"], "k", "b")] == ["camera"]
