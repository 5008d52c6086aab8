"""rt2-collect and the LeRobot dataset (rt2_ros.learn.collect, rt2_ros.learn.dataset): randomised scenes,
the ROS-free closed loop with perturbations the reference policy recovers from, parallel collection that
reads back identically, export of an rt2-record MCAP file, and clear errors for bad input. Seconds only:
short episodes at small image sizes."""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from rt2_ros.learn import collect
from rt2_ros.learn.collect import make_scene, run_episode
from rt2_ros.learn.dataset import DatasetError, Episode, Frame, export_mcap, read_lerobot, write_lerobot
from rt2_ros.sim.tabletop import DISTRACTOR_MAX_SATURATION, TRAY_HALF_INNER_M, TabletopSim


def _same_episode(a: Episode, b: Episode) -> None:
    assert (a.instruction, a.success, a.seed, a.perturbation) == (b.instruction, b.success, b.seed, b.perturbation)
    assert len(a.frames) == len(b.frames)
    for k, (fa, fb) in enumerate(zip(a.frames, b.frames, strict=True)):
        assert fa.images.keys() == fb.images.keys()
        for cam in fa.images:
            assert np.array_equal(fa.images[cam], fb.images[cam]), f"frame {k} camera {cam}"
        assert np.array_equal(fa.state, fb.state) and fb.state.dtype == np.float32, f"frame {k} state"
        assert np.array_equal(fa.action_tokens, fb.action_tokens), f"frame {k} tokens"
        assert np.float32(fa.timestamp) == np.float32(fb.timestamp)


# ---------------------------------------------------------------------------------------------- scenes
def test_scenes_are_deterministic_random_and_the_demo_scene_is_unchanged():
    assert make_scene(3) == make_scene(3)
    scenes = [make_scene(s) for s in range(30)]
    assert len({s.instruction for s in scenes}) > 5 and len({s.target for s in scenes}) == 4
    assert {len(s.sim_config["sim.objects"]) for s in scenes} == {2, 3, 4}
    assert {s.sim_config["sim.distractors"] for s in scenes} == {0, 1, 2, 3}
    for s in scenes:  # the reference policy is calibrated to the jittered camera, so it finds the cubes
        assert s.reference_options["camera_position"] == s.sim_config["sim.camera_position"]
        assert s.target in s.sim_config["sim.objects"] and s.perturbation is None
    assert sum(make_scene(s, perturbation_rate=0.5).perturbation is not None for s in range(40)) in range(10, 31)
    fixed = make_scene(3, randomize=False)
    assert set(fixed.sim_config) == {"sim.objects"} and fixed.reference_options == {}
    with pytest.raises(collect.CollectError, match="perturbation rate"):
        make_scene(0, perturbation_rate=1.5)


def test_workspace_placement_spreads_objects_apart_with_dull_distractors():
    config = {"sim.placement": "workspace", "sim.distractors": 3, "sim.color_jitter": 0.25,
              "sim.lighting_jitter": 1.0}
    with TabletopSim(config, seed=0) as sim:
        lo, hi = np.asarray(sim.config["sim.placement_min"]), np.asarray(sim.config["sim.placement_max"])
        spacing = sim.config["sim.min_object_spacing_m"]
        seen = []
        for seed in range(6):
            sim.reset(seed)
            pos = sim.object_positions()
            tray = pos.pop("tray")[:2]
            spots = [p[:2] for p in pos.values()] + [p[:2] for p in sim.distractor_positions()]
            assert len(spots) == 7
            for i, xy in enumerate(spots):
                assert np.all(xy >= lo - 0.01) and np.all(xy <= hi + 0.01), xy
                assert np.any(np.abs(xy - tray) > TRAY_HALF_INNER_M + spacing - 0.01)
                assert all(np.linalg.norm(xy - o) > spacing - 0.01 for o in spots[i + 1:])
            seen.append(np.concatenate(spots))
            image = sim.render(64, 64).reshape(-1, 3) / 255.0
            assert image.std() > 0.05
        assert np.ptp(np.stack(seen), axis=0).min() > 0.05  # every object moves across seeds
        for body in sim._distractors:  # dull: no colour range of the reference policy matches
            import pybullet as pb

            rgba = pb.getVisualShapeData(body, physicsClientId=sim._cid)[0][7]
            assert colorsys.rgb_to_hsv(*rgba[:3])[1] <= DISTRACTOR_MAX_SATURATION + 1e-6


# ---------------------------------------------------------------------------------------------- closed loop
def test_reference_policy_recovers_from_a_nudged_cube():
    """Seed 0 with perturbations: the cube is pushed away during the descent, the grasp closes on nothing,
    the policy re-approaches and still puts the cube in the tray; the recorded labels are its answers."""
    scene = make_scene(0, perturbation_rate=1.0)
    assert scene.perturbation is not None and scene.perturbation.kind == "nudge"
    ep = run_episode(0, None, 64, scene=scene)
    assert ep.perturbation == "nudge" and ep.info["grasp_retries"] == 1
    assert ep.success and ep.info["terminated"], ep.info
    bins = np.stack([f.action_tokens for f in ep.frames])
    assert bins[-1, 0] == 1 and not bins[:-1, 0].any()  # terminate only at the end
    closes = np.flatnonzero(np.diff((bins[:, 7] > 128).astype(int)) == 1)
    assert len(closes) >= 2, "the gripper closes at least twice: the missed grasp and the real one"
    states = np.stack([f.state for f in ep.frames])
    assert states.shape == (len(ep.frames), 8) and np.all(np.diff([f.timestamp for f in ep.frames]) > 0.09)
    assert {f.images["camera"].shape for f in ep.frames} == {(64, 64, 3)}
    assert {f.images["wrist_camera"].shape for f in ep.frames} == {(64, 64, 3)}
    downscaled = run_episode(0, None, 64, scene=scene, render_size=128, max_steps=2)  # node-pipeline pixels
    assert downscaled.frames[0].images["camera"].shape == (64, 64, 3)
    assert not np.array_equal(downscaled.frames[0].images["camera"], ep.frames[0].images["camera"])


def test_collection_in_two_processes_reads_back_identically(tmp_path):
    out = tmp_path / "demos"
    summary = collect.CollectSummary()
    collect.collect(out, episodes=2, seed=5, processes=2, image_size=64, perturbation_rate=1.0, max_steps=30,
                    progress=False, summary=summary)
    assert summary.episodes == 2 and summary.frames == 60 and summary.bytes > 0
    back = list(read_lerobot(out))
    assert [e.seed for e in back] == [5, 6]
    for seed, got in zip((5, 6), back, strict=True):  # the same loop in this process gives the same data
        _same_episode(run_episode(seed, None, 64, perturbation_rate=1.0, max_steps=30), got)
    with pytest.raises(DatasetError, match="not empty"):
        write_lerobot(back, out, 10.0)


# ---------------------------------------------------------------------------------------------- dataset I/O
def _random_episodes(n: int = 2, frames: int = 4, size: int = 24) -> list[Episode]:
    rng = np.random.default_rng(1)
    out = []
    for e in range(n):
        fr = []
        for k in range(frames):
            bins = rng.integers(0, 256, 8)
            bins[0] = int(k == frames - 1)
            images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in ("camera", "wrist_camera")}
            fr.append(Frame(images, rng.normal(size=8).astype(np.float32), bins.astype(np.int64), 0.1 * k))
        out.append(Episode(f"put the red cube in the tray {e}", bool(e % 2), e, fr, perturbation="drop" * e))
    return out


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        list(read_lerobot(tmp_path / "missing"))
    root = write_lerobot(_random_episodes(), tmp_path / "ds", 10.0)
    data = root / "data" / "chunk-000" / "file-000.parquet"
    data.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=r"file-000\.parquet"):
        list(read_lerobot(root))
    (root / "meta" / "info.json").write_text("{")
    with pytest.raises(DatasetError, match=r"info\.json"):
        list(read_lerobot(root))
    bad = _random_episodes(1)
    bad[0].frames[1].action_tokens[0] = 7  # not a terminate bin
    with pytest.raises(DatasetError, match="episode 0 frame 1"):
        write_lerobot(bad, tmp_path / "bad", 10.0)
    mixed = _random_episodes(2)
    only_main = dataclasses.replace(mixed[1].frames[0], images={"camera": mixed[1].frames[0].images["camera"]})
    mixed[1] = dataclasses.replace(mixed[1], frames=[only_main])
    with pytest.raises(DatasetError, match="cameras"):
        write_lerobot(mixed, tmp_path / "mixed", 10.0)
    assert collect.main(["--out", str(tmp_path / "x"), "--episodes", "0"]) == 2
    assert collect.main(["--out", str(tmp_path / "x"), "--image-size", "32"]) == 2
    assert collect.main(["--out", str(tmp_path / "y"), "--from-mcap", str(tmp_path / "nope.mcap")]) == 2


# ---------------------------------------------------------------------------------------------- MCAP export
def _record(path: Path, episode: Episode, *, topics: tuple[str, ...] | None = None, image_every: int = 1) -> None:
    """Write ``episode`` as the nodes would have recorded it with rt2-record (real ROS 2 messages):
    camera frames, ee_pose, the policy's replies and arm actions, the gripper command."""
    from builtin_interfaces.msg import Time
    from geometry_msgs.msg import PoseStamped
    from std_msgs.msg import Float64

    from rt2_ros.nodes.common import rgb_to_image_msg, uuid_msg
    from rt2_ros.recording import DEFAULT_TOPICS, EpisodeRecorder
    from rt2_ros.tokens import ActionTokenizer
    from rt2_ros_interfaces.msg import ActionTokens, ArmAction
    from rt2_ros_interfaces.msg import Episode as EpisodeMsg

    tok = ActionTokenizer.from_profile("rt2")
    episode_id = bytes(range(16))
    t0 = 1_700_000_000 * 10**9
    wanted = {k: v for k, v in DEFAULT_TOPICS.items() if topics is None or k in topics}
    with EpisodeRecorder(path, wanted, params={"output.gripper_closed_value": 2.0}) as rec:
        def write(topic, msg, t):
            if topic in wanted:
                rec.write(topic, msg, t)

        write("/episode", EpisodeMsg(episode_id=uuid_msg(episode_id), active=True, instruction=episode.instruction),
              t0)
        for seq, frame in enumerate(episode.frames):
            t = t0 + 10**7 + round(frame.timestamp * 1e9)
            sec, nanosec = divmod(t, 10**9)
            stamp = Time(sec=sec, nanosec=nanosec)
            pose = PoseStamped()
            pose.header.stamp = stamp
            p, q = pose.pose.position, pose.pose.orientation
            p.x, p.y, p.z, q.w, q.x, q.y, q.z = (float(v) for v in frame.state[:7])
            write("/ee_pose", pose, t - 10**6)
            write("/gripper_command", Float64(data=2.0 * float(frame.state[7])), t - 10**6)
            if seq % image_every == 0:
                for topic, cam in (("/camera/image", "camera"), ("/wrist_camera/image", "wrist_camera")):
                    write(topic, rgb_to_image_msg(frame.images[cam], stamp, cam), t)
            bins = [int(b) for b in frame.action_tokens]
            write("/rt2_policy/action_tokens", ActionTokens(observation_seq=seq, tokens=bins, profile="rt2"), t + 10**7)
            a = tok.decode(bins, observation_seq=seq)
            # the policy node carries the frame stamp as float seconds: the stamp comes back ~100 ns off
            observed = Time(sec=sec, nanosec=min(nanosec + 97, 10**9 - 1))
            msg = ArmAction(observation_seq=seq, episode_id=uuid_msg(episode_id), observation_stamp=observed,
                            gripper=float(a.gripper), terminate=a.terminate)
            write("/arm_action", msg, t + 2 * 10**7)


def test_export_of_a_recording_reads_back_and_bad_recordings_are_refused(tmp_path):
    pytest.importorskip("rclpy")
    ep = _random_episodes(1, frames=5)[0]
    ep = dataclasses.replace(ep, frames=[dataclasses.replace(f, state=np.concatenate([f.state[:7], [k / 4]])
                                                             .astype(np.float32)) for k, f in enumerate(ep.frames)])
    path = tmp_path / "run.mcap"
    _record(path, ep)
    notes: list[str] = []
    root = export_mcap(path, tmp_path / "exported", 10.0, success=True, notes=notes)
    (got,) = list(read_lerobot(root))
    _same_episode(dataclasses.replace(ep, success=True, seed=-1, perturbation=""), got)
    assert "1 episode(s), 5 frames" in notes[0]
    # rate-limited camera: only the steps whose frame was recorded are exported, and the note says so
    _record(tmp_path / "sparse.mcap", ep, image_every=2)
    notes.clear()
    (sparse,) = list(read_lerobot(export_mcap(tmp_path / "sparse.mcap", tmp_path / "sparse", notes=notes)))
    assert len(sparse.frames) == 3 and "2 policy steps left out" in notes[0]
    # no policy replies recorded: refused with the missing topics named
    _record(tmp_path / "camera_only.mcap", ep, topics=("/camera/image", "/ee_pose"))
    with pytest.raises(DatasetError, match="/rt2_policy/action_tokens"):
        export_mcap(tmp_path / "camera_only.mcap", tmp_path / "none")
    (tmp_path / "junk.mcap").write_bytes(b"not an mcap file")
    with pytest.raises(DatasetError, match="not an MCAP file"):
        export_mcap(tmp_path / "junk.mcap", tmp_path / "none2")
    assert collect.main(["--from-mcap", str(path), "--out", str(tmp_path / "cli"), "--resize", "16"]) == 0
    (small,) = list(read_lerobot(tmp_path / "cli"))
    assert small.frames[0].images["camera"].shape == (16, 16, 3) and small.instruction == ep.instruction
