"""Tests for the pybullet tabletop core (rt2_ros.sim.tabletop) and the shared camera model, and the
simulator node's camera topics over DDS (``rt2_sim`` in its own process)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt2_ros.params import ConfigError
from rt2_ros.sim.camera import DEFAULT_CAMERA, CameraError, PinholeCamera, camera_param_specs, look_at
from rt2_ros.sim.tabletop import CUBE_COLORS, SIM_PARAMS, SimCommandError, TabletopSim

SERVO_DT = 1.0 / 30.0


@pytest.fixture(scope="module")
def sim():
    s = TabletopSim({"sim.collision_visuals": True}, seed=0)
    yield s
    s.close()


@pytest.fixture()
def fresh(sim):
    sim.reset(seed=1)
    return sim


def _servo(sim: TabletopSim, linear, seconds: float, stamp_age_s: float = 0.0) -> list[bool]:
    applied = []
    for _ in range(round(seconds / SERVO_DT)):
        applied.append(sim.apply_twist(linear, (0.0, 0.0, 0.0), stamp_age_s, SERVO_DT))
        sim.step(SERVO_DT)
    return applied


# ---------------------------------------------------------------------------------------- camera
def _camera_strategy():
    coord = st.floats(-1.0, 1.0, allow_nan=False)
    return st.builds(
        lambda w, h, fov, ex, ey, tx, ty: PinholeCamera.from_look_at(w, h, fov, (1.0 + ex, ey, 0.8),
                                                                     (0.5 + tx, ty, 0.0)),
        st.integers(32, 640), st.integers(32, 480), st.floats(20.0, 90.0), coord, coord, coord, coord)


@settings(max_examples=60, deadline=None)
@given(cam=_camera_strategy(), u=st.floats(0.0, 1.0), v=st.floats(0.0, 1.0), z=st.floats(-0.1, 0.3))
def test_pixel_to_plane_round_trips_through_project(cam, u, v, z):
    pu, pv = u * (cam.width - 1), v * (cam.height - 1)
    try:
        point = cam.pixel_to_table_plane(pu, pv, z)
    except CameraError:
        return  # ray above the horizon: nothing to round-trip
    assert point[2] == pytest.approx(z, abs=1e-9)
    np.testing.assert_allclose(cam.project(point), [pu, pv], atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(cam=_camera_strategy(), scale=st.sampled_from([0.5, 2.0, 0.25]))
def test_scaled_camera_projects_to_scaled_pixels(cam, scale):
    w, h = max(1, round(cam.width * scale)), max(1, round(cam.height * scale))
    small = cam.scaled(w, h)
    point = cam.pixel_to_table_plane(cam.cx, cam.cy, 0.0)
    uv, uv_small = cam.project(point), small.project(point)
    # pixel edges scale: (u + 0.5) * s - 0.5
    np.testing.assert_allclose(uv_small, [(uv[0] + 0.5) * w / cam.width - 0.5, (uv[1] + 0.5) * h / cam.height - 0.5],
                               atol=1e-6)


def test_look_at_target_projects_to_principal_point():
    cam = PinholeCamera.from_look_at(320, 240, 60.0, (1.0, -0.3, 0.9), (0.4, 0.1, 0.0))
    np.testing.assert_allclose(cam.project(np.array([0.4, 0.1, 0.0])), [cam.cx, cam.cy], atol=1e-9)
    # base "up" appears upwards in the image (smaller v)
    above = cam.project(np.array([0.4, 0.1, 0.2]))
    assert above[1] < cam.cy


def test_points_behind_camera_project_to_nan():
    uv = DEFAULT_CAMERA.project(np.array([[5.0, 0.0, 0.0], [0.5, 0.0, 0.0]]))
    assert np.all(np.isnan(uv[0])) and np.all(np.isfinite(uv[1]))


@pytest.mark.parametrize("bad", [
    {"fx": -1.0}, {"fy": 0.0}, {"width": 0}, {"orientation": np.zeros(4)}, {"position": np.array([0, np.nan, 0])},
])
def test_invalid_camera_parameters_raise(bad):
    kwargs = dict(width=64, height=48, fx=50.0, fy=50.0, cx=31.5, cy=23.5, position=np.zeros(3),
                  orientation=np.array([1.0, 0, 0, 0]))
    kwargs.update(bad)
    with pytest.raises(CameraError):
        PinholeCamera(**kwargs)


def test_look_at_rejects_degenerate_views():
    with pytest.raises(CameraError):
        look_at((0, 0, 1), (0, 0, 1))
    with pytest.raises(CameraError):
        look_at((0, 0, 1), (0, 0, 0), up=(0, 0, 1))


def test_camera_params_build_the_default_camera():
    specs = camera_param_specs("x.camera_", "test")
    cam = PinholeCamera.from_params({s.name: s.default for s in specs}, "x.camera_")
    point = np.array([0.5, 0.1, 0.0])
    np.testing.assert_allclose(cam.project(point), DEFAULT_CAMERA.project(point), atol=1e-3)


# ---------------------------------------------------------------------------------------- sim
@pytest.mark.parametrize(("width", "height"), [(224, 224), (160, 120), (96, 128)])
def test_render_has_requested_size(sim, width, height):
    img = sim.render(width, height)
    assert img.shape == (height, width, 3) and img.dtype == np.uint8
    assert img.std() > 10.0  # a real scene, not a blank frame


def test_default_render_size_follows_camera_params():
    with TabletopSim({"sim.collision_visuals": True, "sim.camera_width": 96, "sim.camera_height": 64,
                      "sim.objects": ["red_cube"]}) as small:
        assert small.render().shape == (64, 96, 3)
        assert set(small.object_positions()) == {"red_cube", "tray"}


def test_visual_and_collision_meshes_render_the_same_scene(sim):
    """Collision meshes as visuals (the faster default) change only the arm's look, not the scene:
    the objects the policy looks for get exactly the same pixels, and the arm the same place."""
    sim.reset(seed=2)
    with TabletopSim({"sim.collision_visuals": False}, seed=2) as detailed:
        assert np.array_equal(sim.render(), sim.render())  # deterministic, so equality below is meaningful
        fast, slow = sim.render(), detailed.render()
        for name, mask in sim.segmentation().items():
            assert np.array_equal(mask, detailed.segmentation()[name]), name
            assert np.array_equal(fast[mask], slow[mask]), name
        changed = np.any(fast != slow, axis=2)
        assert 0 < changed.mean() < 0.04  # the arm differs in detail (~2% of the pixels), nothing else


@pytest.mark.parametrize("name", sorted(CUBE_COLORS))
def test_camera_model_matches_renderer(fresh, name):
    """Ground-truth centre projected with the camera model lands on the object's rendered pixels."""
    mask = fresh.segmentation()[name]
    assert mask.sum() > 10, f"{name} not visible from the default camera"
    vs, us = np.nonzero(mask)
    uv = fresh.camera.project(fresh.object_positions()[name])
    assert np.hypot(uv[0] - us.mean(), uv[1] - vs.mean()) < 2.0


def test_objects_start_on_the_table_inside_the_workspace(fresh):
    lo, hi = np.array([0.25, -0.35]), np.array([0.75, 0.35])
    half = 0.5 * fresh.config["sim.cube_size"]
    for name, pos in fresh.object_positions().items():
        assert np.all(pos[:2] > lo) and np.all(pos[:2] < hi), name
        if name != "tray":
            assert pos[2] == pytest.approx(half, abs=0.003)
            assert not fresh.is_in_tray(name)


def test_seeded_reset_is_reproducible(sim):
    sim.reset(seed=7)
    a = sim.object_positions()
    sim.reset(seed=8)
    b = sim.object_positions()
    sim.reset(seed=7)
    c = sim.object_positions()
    for name in a:
        np.testing.assert_allclose(a[name], c[name], atol=1e-9)
    assert any(np.linalg.norm(a[n] - b[n]) > 1e-3 for n in a)


@pytest.mark.parametrize("direction", [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)])
def test_twist_moves_end_effector_in_commanded_direction(fresh, direction):
    d = np.asarray(direction, dtype=np.float64)
    start = fresh.ee_pose()[0]
    assert all(_servo(fresh, 0.1 * d, 0.5))
    fresh.step(0.2)  # let the arm settle on the last target
    moved = fresh.ee_pose()[0] - start
    assert moved @ d == pytest.approx(0.05, abs=0.006)
    assert np.linalg.norm(moved - (moved @ d) * d) < 0.004


def test_angular_twist_rotates_about_base_z(fresh):
    _, q0 = fresh.commanded_pose()
    assert all(fresh.apply_twist((0, 0, 0), (0, 0, 0.5), 0.0, SERVO_DT) for _ in range(15))
    fresh.step(0.5)
    _, q1 = fresh.ee_pose()
    # angle between orientations ~ 0.5 rad/s * 0.5 s
    angle = 2 * math.acos(min(1.0, abs(float(np.dot(q0, q1)))))
    assert angle == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("axis", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_endless_rotation_halts_at_the_joint_limits_and_the_hand_keeps_its_place(fresh, axis):
    # A policy may ask for any rotation; the arm turns as far as its joints go and then halts like
    # MoveIt Servo. Before the reachability check the IK traded position for the orientation and a
    # 1 rad/s twist swung the hand 0.19-0.60 m across (and out of) the workspace within 8 s.
    start, _ = fresh.ee_pose()
    worst = 0.0
    for _ in range(round(8.0 / SERVO_DT)):
        fresh.apply_twist((0, 0, 0), axis, 0.0, SERVO_DT)
        fresh.step(SERVO_DT)
        worst = max(worst, float(np.linalg.norm(fresh.ee_pose()[0] - start)))
    assert worst < 0.03, f"the hand moved {worst:.3f} m while only a rotation was commanded"
    _, halted = fresh.ee_pose()
    assert 2 * math.acos(min(1.0, abs(float(np.dot(halted, (0, 1, 0, 0)))))) > 0.5  # it did turn first
    for _ in range(round(1.0 / SERVO_DT)):  # and the other way it moves again
        fresh.apply_twist((0, 0, 0), tuple(-a for a in axis), 0.0, SERVO_DT)
        fresh.step(SERVO_DT)
    _, back = fresh.ee_pose()
    assert 2 * math.acos(min(1.0, abs(float(np.dot(halted, back))))) > 0.5


def test_commanded_pose_never_leads_the_measured_one_beyond_its_bound(fresh):
    # The arm cannot follow (physics not stepped: as if blocked): the command must not wind up.
    p0, q0 = fresh.ee_pose()
    for _ in range(60):  # 2 s of the fastest twist the sim takes, no physics step in between
        assert fresh.apply_twist((0.5, 0.5, 0.5), (0, 0, 1.5), 0.0, SERVO_DT)
    target_p, target_q = fresh.commanded_pose()
    assert np.linalg.norm(target_p - p0) <= fresh.config["sim.max_command_lead_m"] + 1e-9
    angle = 2 * math.acos(min(1.0, abs(float(np.dot(target_q, q0)))))
    assert angle <= fresh.config["sim.max_command_lead_rad"] + 1e-6


@pytest.mark.parametrize("age", [0.1001, 0.15, 1.0, -0.5])
def test_stale_twist_is_dropped_and_arm_holds(fresh, age):
    start, _ = fresh.ee_pose()
    target_before, _ = fresh.commanded_pose()
    applied = _servo(fresh, (0.1, 0.0, 0.0), 0.5, stamp_age_s=age)
    assert not any(applied) and not fresh.last_command_applied()
    np.testing.assert_allclose(fresh.commanded_pose()[0], target_before)
    assert np.linalg.norm(fresh.ee_pose()[0] - start) < 0.001


def test_fresh_twist_just_inside_timeout_is_applied(fresh):
    assert fresh.apply_twist((0.1, 0, 0), (0, 0, 0), 0.099, SERVO_DT)


@pytest.mark.parametrize(("linear", "angular"), [
    ((np.nan, 0, 0), (0, 0, 0)), ((0, 0, 0), (0, np.inf, 0)), ((1.0, 2.0), (0, 0, 0)),
])
def test_malformed_twist_raises_and_changes_nothing(fresh, linear, angular):
    before, _ = fresh.commanded_pose()
    with pytest.raises(SimCommandError):
        fresh.apply_twist(linear, angular, 0.0, SERVO_DT)
    np.testing.assert_allclose(fresh.commanded_pose()[0], before)


def test_commanded_pose_is_clamped_to_workspace(fresh):
    _servo(fresh, (0.5, 0.0, -0.5), 1.5)
    target, _ = fresh.commanded_pose()
    np.testing.assert_allclose(target[[0, 2]], [0.75, 0.02], atol=1e-9)
    clamped = fresh.set_ee_target((5.0, -5.0, 5.0))
    np.testing.assert_allclose(clamped, [0.75, -0.35, 0.55])


def test_gripper_closes_and_opens(fresh):
    assert fresh.gripper_closedness() < 0.05
    fresh.set_gripper(1.0)
    fresh.step(0.5)
    assert fresh.gripper_closedness() > 0.95
    fresh.set_gripper(0.0)
    fresh.step(0.5)
    assert fresh.gripper_closedness() < 0.05
    with pytest.raises(SimCommandError):
        fresh.set_gripper(float("nan"))


@pytest.mark.parametrize("rate_hz", [7, 30, 50, 1000])
def test_step_keeps_simulated_time_exact(fresh, rate_hz):
    t0 = fresh.time_s
    steps = [fresh.step(1.0 / rate_hz) for _ in range(rate_hz)]
    assert abs(sum(steps) - fresh.config["sim.physics_hz"]) <= 1
    assert fresh.time_s - t0 == pytest.approx(1.0, abs=1.0 / fresh.config["sim.physics_hz"])
    with pytest.raises(SimCommandError):
        fresh.step(-0.1)


def test_joint_state_shape_and_names(fresh):
    names, q, dq = fresh.joint_state()
    assert len(names) == q.shape[0] == dq.shape[0] == 9
    assert names[0] == "panda_joint1" and names[-1] == "panda_finger_joint2"
    assert np.all(np.isfinite(q))


@pytest.mark.parametrize("assist", [False, True])
def test_scripted_pick_and_place_lands_cube_in_tray(assist):
    """Physical grasp (and the optional grasp assist) carries a cube into the tray; is_in_tray sees it."""
    with TabletopSim({"sim.collision_visuals": True, "sim.grasp_assist": assist,
                      "sim.objects": ["red_cube", "blue_cube"]}, seed=3) as s:
        cube = s.object_positions()["red_cube"]
        tray = s.object_positions()["tray"]

        def go(target, seconds=1.0):
            for _ in range(round(seconds / SERVO_DT)):
                error = np.asarray(target) - s.commanded_pose()[0]
                s.apply_twist(np.clip(error / SERVO_DT, -0.3, 0.3), (0, 0, 0), 0.0, SERVO_DT)
                s.step(SERVO_DT)

        go(cube + np.array([0, 0, 0.12]))
        go(cube)
        s.set_gripper(1.0)
        s.step(0.4)
        assert s.held_object() == ("red_cube" if assist else None)
        go(cube + np.array([0, 0, 0.2]))
        assert s.object_positions()["red_cube"][2] > 0.15, "cube was not lifted"
        assert not s.is_in_tray("red_cube")
        go(tray + np.array([0, 0, 0.15]))
        go(tray + np.array([0, 0, 0.06]), 0.5)
        s.set_gripper(0.0)
        s.step(0.4)
        assert s.held_object() is None
        go(tray + np.array([0, 0, 0.25]), 0.5)
        assert s.is_in_tray("red_cube")
        assert not s.is_in_tray("blue_cube")
        with pytest.raises(KeyError):
            s.is_in_tray("green_cube")


def test_invalid_config_names_the_key():
    with pytest.raises(ConfigError, match=r"sim\.cube_siz"):
        TabletopSim({"sim.cube_siz": 0.04})
    with pytest.raises(ConfigError, match=r"sim\.objects"):
        TabletopSim({"sim.objects": ["purple_dog"]})
    with pytest.raises(ValueError, match=r"sim\.workspace_min"):
        TabletopSim({"sim.workspace_min": [0.8, -0.35, 0.02]})


def test_sim_params_are_all_namespaced():
    assert all(p.name.startswith("sim.") for p in SIM_PARAMS)
    assert len({p.name for p in SIM_PARAMS}) == len(SIM_PARAMS)


# ---------------------------------------------------------------------------------------- wrist camera
def _go(sim: TabletopSim, target, seconds: float = 1.0) -> None:
    """Servo the commanded grasp point to ``target`` (base frame) and let the arm follow."""
    for _ in range(round(seconds / SERVO_DT)):
        error = np.asarray(target) - sim.commanded_pose()[0]
        sim.apply_twist(np.clip(error / SERVO_DT, -0.3, 0.3), (0, 0, 0), 0.0, SERVO_DT)
        sim.step(SERVO_DT)


def test_wrist_camera_has_its_own_size(fresh):
    img = fresh.render(camera="wrist")
    cfg = fresh.config
    assert img.shape == (cfg["sim.wrist_camera_height"], cfg["sim.wrist_camera_width"], 3) and img.dtype == np.uint8
    assert img.std() > 10.0
    assert fresh.render(96, 64, camera="wrist").shape == (64, 96, 3)
    with pytest.raises(ValueError, match="unknown camera"):
        fresh.render(camera="elbow")


def test_wrist_camera_rides_on_the_hand_with_the_fingers_at_the_bottom(fresh):
    """The camera follows the measured hand; the grasp point (between the finger pads) projects into
    the lower half of the image, on its vertical centre line (fingers open left and right)."""
    for _ in range(2):
        cam = fresh.wrist_camera()
        grasp, _ = fresh.ee_pose()
        u, v = cam.project(grasp)
        assert abs(u - cam.cx) < 1.0 and cam.height * 0.5 < v < cam.height
        assert 0.05 < np.linalg.norm(cam.position - grasp) < 0.15  # a hand-mounted camera, not the fixed one
        before = cam.position
        _servo(fresh, (0.1, 0.05, 0.0), 0.5)
        fresh.step(0.3)
        moved = fresh.wrist_camera().position - before
        np.testing.assert_allclose(moved, [0.05, 0.025, 0.0], atol=0.006)


def test_wrist_camera_sees_the_fingers_move(fresh):
    """Closing the gripper changes the lower part of the wrist image (the fingers are in view) and
    leaves the top (the table beyond the fingertips) alone."""
    opened = fresh.render(camera="wrist").astype(int)
    fresh.set_gripper(1.0)
    fresh.step(0.5)
    closed = fresh.render(camera="wrist").astype(int)
    changed = np.any(np.abs(opened - closed) > 30, axis=2)
    h = changed.shape[0]
    assert changed[h // 2:].mean() > 0.05, "the fingers are not in the wrist camera's view"
    assert changed[: h // 4].mean() < 0.01


def test_wrist_camera_sees_the_cube_under_the_gripper(fresh):
    """Above the red cube, the cube fills the image centre (not the empty table); at grasp height,
    between the open fingers, it fills the lower half."""
    cube = fresh.object_positions()["red_cube"]
    table = fresh.render(camera="wrist")[:16].reshape(-1, 3).mean(axis=0)  # home: table above the fingertips
    _go(fresh, cube + np.array([0.0, 0.0, 0.12]))
    img = fresh.render(camera="wrist").astype(int)
    mask = fresh.segmentation(camera="wrist")["red_cube"]
    h, w = mask.shape
    # The cube is 12 cm beyond the grasp point: on the image's centre line, above its middle.
    centre = (slice(h // 4, h // 2), slice(2 * w // 5, 3 * w // 5))
    assert mask[centre].mean() > 0.4, "the red cube is not in the middle of the wrist view"
    u, v = fresh.wrist_camera().project(cube)
    assert mask[round(v), round(u)]  # the camera model agrees with the renderer
    red = img[centre][mask[centre]]
    assert red[:, 0].mean() > 150 and red[:, 1].mean() < 60  # rendered red, not table
    assert np.abs(img[centre].mean(axis=(0, 1)) - table).max() > 40  # the centre is not the empty table

    _go(fresh, cube)
    mask = fresh.segmentation(camera="wrist")["red_cube"]
    assert mask[h // 2:].mean() > 0.25, "the cube is not between the fingers at grasp height"
    assert mask.sum() > 4 * (fresh.segmentation(camera="main")["red_cube"].sum())  # close up: larger than from afar


def test_finger_joints_are_in_metres(fresh):
    """joint_states carry each finger's travel in m: 0.04 open, 0 closed on nothing."""
    names, q, _ = fresh.joint_state()
    fingers = [q[names.index(n)] for n in ("panda_finger_joint1", "panda_finger_joint2")]
    np.testing.assert_allclose(fingers, [0.04, 0.04], atol=0.001)
    fresh.set_gripper(1.0)
    fresh.step(0.5)
    names, q, _ = fresh.joint_state()
    fingers = [q[names.index(n)] for n in ("panda_finger_joint1", "panda_finger_joint2")]
    np.testing.assert_allclose(fingers, [0.0, 0.0], atol=0.002)


@pytest.mark.parametrize(("position", "target"), [([0.0, 0.0, 0.1], [0.0, 0.0, 0.1]),
                                                  ([0.07, 0.0, 0.04], [0.5, 0.0, 0.04])])
def test_degenerate_wrist_mount_names_the_keys(position, target):
    with pytest.raises(ValueError, match=r"sim\.wrist_camera_position"):
        TabletopSim({"sim.wrist_camera_position": position, "sim.wrist_camera_target": target})


# ---------------------------------------------------------------------------------------- rt2_sim over DDS
@pytest.mark.timeout(90)
@pytest.mark.parametrize("wrist_rate_hz", [0.0, 5.0])
def test_sim_node_publishes_both_cameras_over_dds(tmp_path, wrist_rate_hz):
    """``rt2_sim`` in its own process: wrist_camera/image (and /compressed) arrive over DDS, stamped with
    the node clock; with the default rate 0 each wrist frame has the stamp of a camera/image frame (one
    render tick: a synchronised pair), with a rate of its own it has its own timer; joint_states carry
    the open fingers in metres."""
    pytest.importorskip("rclpy")
    import cv2
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image, JointState

    from rt2_ros.nodes.common import image_msg_to_rgb
    from test.ros_helpers import REPO, Probe, isolate_ros_domain, stop

    isolate_ros_domain()
    ns = f"/rt2_wrist_test_{os.getpid()}"  # a namespace of its own: no other test's node hears this simulator
    probe = Probe("rt2_wrist_camera_probe")
    log = tmp_path / "sim.log"
    try:
        for key, msg_type, topic in (("camera", Image, "camera/image"), ("wrist", Image, "wrist_camera/image"),
                                     ("wrist_jpeg", CompressedImage, "wrist_camera/image/compressed"),
                                     ("joints", JointState, "joint_states")):
            probe.record(msg_type, f"{ns}/{topic}", qos_profile_sensor_data, key)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "rt2_ros.nodes.sim_node", "--ros-args", "-r", f"__ns:={ns}",
                                     "-p", "sim_node.publish_compressed:=true",
                                     "-p", f"sim_node.wrist_camera_rate_hz:={wrist_rate_hz}"],
                                    cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            probe.wait_for(lambda: proc.poll() is not None or (
                len(probe.messages["wrist"]) >= 5 and len(probe.messages["camera"]) >= 5
                and bool(probe.messages["wrist_jpeg"]) and bool(probe.messages["joints"])), 60.0,
                "camera, wrist camera and joint_states from rt2_sim")
            received_ns = probe.node.get_clock().now().nanoseconds
        finally:
            code = stop(proc)
        assert code == 0, log.read_text()
        wrist = [m for _, m in probe.messages["wrist"]]
        camera_stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in probe.messages["camera"]}
        n_camera = len(probe.messages["camera"])
        joints = probe.messages["joints"][-1][1]
        jpeg = probe.messages["wrist_jpeg"][-1][1]
    finally:
        probe.close()

    last = wrist[-1]
    assert (last.encoding, last.width, last.height, last.header.frame_id) == (
        "rgb8", 128, 128, "wrist_camera_optical_frame")
    assert image_msg_to_rgb(last).std() > 10.0  # a rendered scene, not a blank frame
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in wrist]
    assert np.all(np.diff(stamps) > 0), "wrist stamps must increase"
    assert 0 <= received_ns - stamps[-1] < 5 * 10**9  # the node clock (system time) when rendered
    paired = [m for m in wrist if (m.header.stamp.sec, m.header.stamp.nanosec) in camera_stamps]
    if wrist_rate_hz == 0.0:
        assert len(paired) >= len(wrist) // 2, "wrist frames are not stamped like their camera/image frame"
    else:  # its own timer: 5 Hz next to the camera's 15 Hz, stamps of its own
        assert n_camera >= 2 * len(wrist) and len(paired) <= 1, (n_camera, len(wrist), len(paired))
    assert jpeg.format == "jpeg" and jpeg.header.frame_id == "wrist_camera_optical_frame"
    decoded = cv2.imdecode(np.frombuffer(bytes(jpeg.data), dtype=np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (128, 128, 3)
    position = dict(zip(joints.name, joints.position, strict=True))
    assert position["panda_finger_joint1"] == pytest.approx(0.04, abs=0.002)
    assert position["panda_finger_joint2"] == pytest.approx(0.04, abs=0.002)
