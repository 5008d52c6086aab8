"""Tests for the pybullet tabletop core (rt2_ros.sim.tabletop) and the shared camera model."""

from __future__ import annotations

import math

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
