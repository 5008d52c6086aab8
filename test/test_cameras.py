"""rt2_ros.cameras: camera parameters, the alignment rule, and several cameras through PolicyCore (no ROS)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.actions import DEFAULT_CAMERA
from rt2_ros.backends import BackendTimeout
from rt2_ros.cameras import CAMERA_NAMES, CameraConfig, FrameInfo, align, camera_specs, cameras_from_params, check_names
from rt2_ros.params import ConfigError, resolve
from rt2_ros.policy import PolicyConfig, PolicyCore
from rt2_ros.tokens import ActionTokenizer

BASE = np.zeros((8, 8, 3), dtype=np.uint8)
WRIST = np.full((4, 4, 3), 7, dtype=np.uint8)


def camera_params(names: list[str], **options) -> dict:
    """Validated ``cameras.*`` values as the node has them: ``options`` keyed ``<camera>__<option>``."""
    values = {f"cameras.{k.replace('__', '.')}": v for k, v in options.items()}
    specs = [CAMERA_NAMES, *(s for n in dict.fromkeys(names) for s in camera_specs(n))]
    return resolve(specs, {"cameras.names": names, **values})


# -- parameters -------------------------------------------------------------------------------------
def test_the_default_is_one_camera_on_camera_image():
    cams = cameras_from_params(camera_params(CAMERA_NAMES.default))
    assert cams == (CameraConfig(DEFAULT_CAMERA),)  # the dataclass defaults and the param defaults agree
    assert cams[0].subscribed_topic == "camera/image"


def test_cameras_come_primary_first_with_their_options():
    cams = cameras_from_params(camera_params(
        ["base", "wrist"], wrist__topic="arm/wrist/image", wrist__required=False, wrist__max_age_s=0.2,
        wrist__max_skew_s=0.05, wrist__transport="compressed", wrist__qos="reliable"))
    assert [c.name for c in cams] == ["base", "wrist"]
    assert cams[0].topic == "base/image" and cams[0].required
    assert cams[1] == CameraConfig("wrist", "arm/wrist/image", "compressed", "reliable", False, 0.2, 0.05)


@pytest.mark.parametrize(("topic", "subscribed"), [
    ("wrist/image", "wrist/image/compressed"),
    ("wrist/image/", "wrist/image/compressed"),  # a trailing slash is not doubled
    ("/abs/image", "/abs/image/compressed"),
])
def test_a_compressed_camera_subscribes_topic_slash_compressed(topic, subscribed):
    cam = cameras_from_params(camera_params(["camera", "wrist"], wrist__topic=topic, wrist__transport="compressed"))[1]
    assert cam.subscribed_topic == subscribed
    assert CameraConfig("wrist", topic).subscribed_topic == topic  # raw: the topic itself


@pytest.mark.parametrize("names", [
    ["Wrist"], ["1cam"], ["wr-ist"], [""], ["wrist cam"], ["_wrist"], ["camera", "wrist.left"]])
def test_bad_camera_names_are_refused(names):
    with pytest.raises(ConfigError, match=r"cameras\.names: .* not valid camera names"):
        check_names(names)


def test_duplicate_and_empty_camera_lists_are_refused():
    with pytest.raises(ConfigError, match=r"cameras\.names: duplicate"):
        check_names(["camera", "wrist", "camera"])
    with pytest.raises(ConfigError, match=r"cameras\.names: at least one"):
        check_names([])
    with pytest.raises(ConfigError, match=r"cameras\.names"):
        cameras_from_params({"cameras.names": []})
    assert check_names(["base", "wrist_2"]) == ("base", "wrist_2")


def test_the_primary_camera_cannot_be_optional():
    with pytest.raises(ConfigError, match=r"cameras\.base\.required: base is the primary camera"):
        cameras_from_params(camera_params(["base", "wrist"], base__required=False))
    # an optional camera that is not primary is fine
    assert not cameras_from_params(camera_params(["base", "wrist"], wrist__required=False))[1].required


@pytest.mark.parametrize("options", [
    {"wrist__topic": "camera/image"},  # the same raw topic
    {"camera__transport": "compressed", "wrist__topic": "camera/image/compressed"},  # raw wrist on camera's
    {"camera__transport": "compressed", "wrist__transport": "compressed", "wrist__topic": "camera/image/"},
])
def test_two_cameras_on_one_topic_are_refused(options):
    with pytest.raises(ConfigError, match=r"cameras\.wrist\.topic: cameras camera and wrist both subscribe"):
        cameras_from_params(camera_params(["camera", "wrist"], **options))


def test_raw_and_compressed_of_one_topic_are_two_subscriptions():
    cams = cameras_from_params(camera_params(["camera", "wrist"], wrist__topic="camera/image",
                                             wrist__transport="compressed"))
    assert [c.subscribed_topic for c in cams] == ["camera/image", "camera/image/compressed"]


@pytest.mark.parametrize("topic", ["", "   "])
def test_an_empty_topic_is_refused(topic):
    with pytest.raises(ConfigError, match=r"cameras\.wrist\.topic: must not be empty"):
        cameras_from_params(camera_params(["camera", "wrist"], wrist__topic=topic))


def test_camera_options_are_range_checked_by_their_specs():
    with pytest.raises(ConfigError, match=r"cameras\.wrist\.max_skew_s"):
        camera_params(["camera", "wrist"], wrist__max_skew_s=0.0)
    with pytest.raises(ConfigError, match=r"cameras\.wrist\.transport"):
        camera_params(["camera", "wrist"], wrist__transport="theora")


# -- the alignment rule -----------------------------------------------------------------------------
PRIMARY = CameraConfig("base", "base/image")
WRIST_CAM = CameraConfig("wrist", "wrist/image", max_skew_s=0.1)
SIDE_CAM = CameraConfig("side", "side/image", required=False, max_skew_s=0.1)


@pytest.mark.parametrize(("wrist_frame", "cause"), [
    (None, "missing_wrist"),
    (FrameInfo(10.0, 0.6), "stale_wrist"),  # older than the default bound 0.5
    (FrameInfo(10.2, 0.0), "skewed_wrist"),  # 0.2 s after the primary frame (max skew 0.1)
    (FrameInfo(9.85, 0.1), "skewed_wrist"),  # and before it
    (FrameInfo(10.05, 0.05), ""),
])
def test_a_required_camera_that_fails_blocks_with_its_cause(wrist_frame, cause):
    frames = {"base": FrameInfo(10.0, 0.0)}
    if wrist_frame is not None:
        frames["wrist"] = wrist_frame
    chosen, blocked = align((PRIMARY, WRIST_CAM), frames, 0.5)
    assert blocked == cause
    assert chosen == ([] if cause else ["base", "wrist"])


@pytest.mark.parametrize("side_frame", [None, FrameInfo(10.0, 0.9), FrameInfo(11.0, 0.0)])
def test_an_optional_camera_that_fails_is_left_out(side_frame):
    frames = {"base": FrameInfo(10.0, 0.0), "wrist": FrameInfo(10.0, 0.0)}
    if side_frame is not None:
        frames["side"] = side_frame
    assert align((PRIMARY, SIDE_CAM, WRIST_CAM), frames, 0.5) == (["base", "wrist"], "")


def test_the_primary_comes_first_and_then_the_configured_order_whatever_the_frame_order():
    frames = {"wrist": FrameInfo(10.0, 0.0), "side": FrameInfo(10.0, 0.0), "base": FrameInfo(10.0, 0.0)}
    assert align((PRIMARY, WRIST_CAM, SIDE_CAM), frames, 0.5) == (["base", "wrist", "side"], "")
    assert align((PRIMARY, SIDE_CAM, WRIST_CAM), frames, 0.5) == (["base", "side", "wrist"], "")


@pytest.mark.parametrize(("max_age_s", "age", "ok"), [
    (0.0, 0.5, True), (0.0, 0.51, False),  # 0 = the default bound (0.5)
    (0.2, 0.21, False), (0.2, 0.2, True),  # a tighter own bound
    (2.0, 1.5, True),  # a looser own bound
])
def test_a_camera_max_age_of_zero_means_the_default(max_age_s, age, ok):
    wrist = CameraConfig("wrist", max_age_s=max_age_s, max_skew_s=5.0)
    assert wrist.age_bound(0.5) == (max_age_s or 0.5)
    _, blocked = align((PRIMARY, wrist), {"base": FrameInfo(10.0, 0.0), "wrist": FrameInfo(10.0, age)}, 0.5)
    assert (blocked == "") == ok and (blocked == "" or blocked == "stale_wrist")


def _violates(cam: CameraConfig, frame: FrameInfo | None, primary: FrameInfo, default: float) -> str:
    if frame is None:
        return "missing"
    if frame.age_s > cam.age_bound(default):
        return "stale"
    if abs(frame.stamp - primary.stamp) > cam.max_skew_s:
        return "skewed"
    return ""


camera_strategy = st.builds(
    lambda name, req, age, skew: CameraConfig(name, f"{name}/image", required=req, max_age_s=age, max_skew_s=skew),
    st.just(""), st.booleans(), st.sampled_from([0.0, 0.1, 0.3, 1.0]), st.sampled_from([0.01, 0.1, 0.5]))
frame_strategy = st.none() | st.builds(FrameInfo, st.floats(9.0, 11.0), st.floats(0.0, 1.5))


@settings(max_examples=500, deadline=None)
@given(others=st.lists(st.tuples(camera_strategy, frame_strategy), max_size=4),
       primary_stamp=st.floats(9.5, 10.5), default=st.floats(0.05, 1.0))
def test_align_never_returns_a_camera_whose_frame_violates_its_bounds(others, primary_stamp, default):
    cams = [PRIMARY] + [dataclasses.replace(c, name=f"cam{i}", topic=f"cam{i}/image")
                        for i, (c, _) in enumerate(others)]
    primary = FrameInfo(primary_stamp, 0.0)
    frames = {"base": primary}
    for cam, (_, frame) in zip(cams[1:], others, strict=True):
        if frame is not None:
            frames[cam.name] = frame
    chosen, blocked = align(tuple(cams), frames, default)
    causes = {c.name: _violates(c, frames.get(c.name), primary, default) for c in cams[1:]}
    failing_required = [c.name for c in cams[1:] if c.required and causes[c.name]]
    if failing_required:
        # the first failing required camera (in configured order) names the cause; nothing is sent
        assert chosen == [] and blocked == f"{causes[failing_required[0]]}_{failing_required[0]}"
    else:
        assert blocked == ""
        # exactly the cameras whose frame is within bounds, primary first, in configured order
        assert chosen == ["base"] + [c.name for c in cams[1:] if not causes[c.name]]


# -- several cameras through PolicyCore -------------------------------------------------------------
def make_core(*cameras: CameraConfig, **overrides) -> PolicyCore:
    values = {"backend.type": "scripted", "backend.timeout_s": 0.5, "policy.max_reply_age_s": 0.5,
              "policy.max_frame_age_s": 0.3, **overrides}
    core = PolicyCore(PolicyConfig.from_params(values), ActionTokenizer.from_profile("rt2"), backend_name="test",
                      cameras=cameras)
    core.set_instruction("pick")
    return core


BASE_CAM = CameraConfig("base", "base/image")
WRIST_REQUIRED = CameraConfig("wrist", "wrist/image", max_skew_s=0.1)
WRIST_OPTIONAL = CameraConfig("wrist", "wrist/image", required=False, max_skew_s=0.1)


def test_two_cameras_go_into_one_observation_primary_first_with_their_stamps():
    core = make_core(BASE_CAM, WRIST_REQUIRED)
    core.on_frame(WRIST, 100.02, 0.0, camera="wrist")  # the wrist frame arrives first
    core.on_frame(BASE, 100.0, 0.01, age_s=0.01)  # "" / no camera = the primary
    obs = core.next_request(0.02).observation
    assert list(obs.images) == ["base", "wrist"] and obs.primary_camera == "base"
    assert obs.image is BASE and obs.images["base"] is BASE and obs.images["wrist"] is WRIST
    assert obs.image_stamps == {"base": 100.0, "wrist": 100.02} and obs.stamp == 100.0


def test_a_missing_required_camera_blocks_the_request_and_is_counted_once_per_primary_frame():
    core = make_core(BASE_CAM, WRIST_REQUIRED)
    core.on_frame(BASE, 100.0, 0.0)
    for t in (0.0, 0.01, 0.02, 0.05):  # the node polls several times per frame
        assert core.next_request(t) is None
    assert core.counters["frames_missing_wrist"] == 1 and core.counters["requests_sent"] == 0
    core.on_frame(BASE, 100.1, 0.1)
    assert core.next_request(0.1) is None and core.next_request(0.12) is None
    assert core.counters["frames_missing_wrist"] == 2
    core.on_frame(WRIST, 100.12, 0.13, camera="wrist")  # the wrist camera starts: the same primary frame goes
    req = core.next_request(0.13)
    assert req is not None and req.observation.stamp == 100.1
    assert core.counters["frames_missing_wrist"] == 2


@pytest.mark.parametrize(("wrist_stamp", "wrist_age", "counter"), [
    (100.0, 0.4, "frames_stale_wrist"),  # older than policy.max_frame_age_s (0.3)
    (99.8, 0.0, "frames_skewed_wrist"),  # 0.2 s before the primary frame (max skew 0.1)
])
def test_a_stale_or_skewed_required_camera_blocks_the_request(wrist_stamp, wrist_age, counter):
    core = make_core(BASE_CAM, WRIST_REQUIRED)
    core.on_frame(WRIST, wrist_stamp, 0.0, age_s=wrist_age, camera="wrist")
    core.on_frame(BASE, 100.0, 0.0)
    assert core.next_request(0.0) is None and core.next_request(0.01) is None
    assert core.counters[counter] == 1


def test_an_optional_camera_that_is_missing_is_left_out_of_the_observation():
    core = make_core(BASE_CAM, WRIST_OPTIONAL)
    core.on_frame(BASE, 100.0, 0.0)
    obs = core.next_request(0.0).observation
    assert list(obs.images) == ["base"] and obs.image_stamps == {"base": 100.0}
    assert not any(k.startswith("frames_") for k in core.counters)
    core.on_reply(obs.seq, None, BackendTimeout("x"), 0.0)
    core.on_frame(WRIST, 100.1, 0.1, camera="wrist")  # once it runs, it is sent
    core.on_frame(BASE, 100.1, 0.1)
    assert list(core.next_request(0.1).observation.images) == ["base", "wrist"]


def test_a_frame_of_an_unconfigured_camera_is_an_error():
    core = make_core(BASE_CAM, WRIST_OPTIONAL)
    with pytest.raises(ValueError, match="unknown camera 'side'"):
        core.on_frame(BASE, 1.0, 0.0, camera="side")


def test_only_new_primary_frames_drive_requests():
    core = make_core(BASE_CAM, WRIST_REQUIRED)
    core.on_frame(WRIST, 100.0, 0.0, camera="wrist")
    core.on_frame(BASE, 100.0, 0.0)
    req = core.next_request(0.0)
    core.on_reply(req.observation.seq, None, BackendTimeout("x"), 0.0)
    core.on_frame(WRIST, 100.1, 0.2, camera="wrist")  # a new wrist frame alone is no new observation
    assert core.next_request(0.2) is None and core.counters["requests_sent"] == 1


def test_the_primary_cameras_own_max_age_bounds_requests_and_releases():
    core = make_core(CameraConfig("base", "base/image", max_age_s=1.0))  # looser than max_frame_age_s 0.3
    core.on_frame(BASE, 100.0, 0.0, age_s=0.8)
    req = core.next_request(0.0)
    assert req is not None and not core.camera_stale(0.2) and core.camera_stale(0.21)
