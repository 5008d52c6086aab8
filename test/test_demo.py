"""``rt2-demo`` end to end: a closed-loop pick-and-place over real ROS 2, judged by simulator ground truth.

Runs ``python -m rt2_ros.demo`` as a user would (policy, safety and simulator node processes and
the demo's monitor, over DDS) on a private ROS domain, then checks the exit code, the episode
folder and ``summary.json``, whose verdict comes from the simulator's ``/rt2_sim/objects``
markers (the cube inside the tray walls, below the rim), not from anything the policy says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from rt2_ros.demo import BAND_HEIGHT_PX, PANEL_GAP_PX

pytest.importorskip("rclpy")
pytest.importorskip("pybullet")

REPO = Path(__file__).resolve().parents[1]
DEMO_DOMAIN = 87  # rt2-demo's default: a demo someone runs by hand may be using it


def _private_domain() -> int:
    # Offset from test.ros_helpers.isolate_ros_domain (1 + pid % 100), so probe nodes that another
    # test module of this pytest run left on that domain can never feed this episode.
    pinned = os.environ.get("RT2_TEST_ROS_DOMAIN", "")
    domain = (int(pinned) + 1) % 100 if pinned else 1 + (os.getpid() + 50) % 100
    return domain + 1 if domain == DEMO_DOMAIN else domain


@pytest.mark.timeout(150)
def test_demo_puts_the_red_cube_in_the_tray(tmp_path):
    cmd = [sys.executable, "-m", "rt2_ros.demo", "--out", str(tmp_path), "--ros-domain", str(_private_domain()),
           "--seed", "3", "--timeout", "60"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=140)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(run_dir.glob("*.log")))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"
    assert "SUCCESS" in proc.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["success"] is True and summary["end"] == "terminated"
    assert summary["verdict"] == "red_cube is in the tray"  # simulator ground truth
    assert summary["backend"] == "embedded" and summary["seed"] == 3
    # The episode ran as one ExecuteInstruction goal with a UUID; the safety node's last status
    # for it says TERMINATED, and it dropped no action (none of another episode, none after terminate).
    assert re.fullmatch(r"[0-9a-f]{8}", summary["episode_id"]), summary["episode_id"]
    assert f"episode {summary['episode_id']} terminated" in proc.stdout
    safety = summary["safety"]
    assert safety["final_state"] == "TERMINATED"
    assert safety["actions_rejected"] == 0 and safety["estops"] == 0 and safety["faults"] == 0
    assert safety["dropped"] == {}
    # Every reply became one executed step; the loop kept (close to) its 10 Hz execute rate
    # (a loaded CI machine may skip a step or two).
    assert summary["steps"] >= 40 and summary["replies"] >= summary["steps"]
    assert summary["control_rate_hz"] >= 8.0, summary

    # The recording says what produced it: both nodes' parameters, stored before the goal was sent
    # (the demo waits for rt2-record's "stored the parameters" line), and the replay reproduces the run.
    from rt2_ros.recording import META_RUN, format_report, read_metadata, recorded_param_nodes, replay

    recording = run_dir / "episode.mcap"
    assert recorded_param_nodes(recording) == ("rt2_policy", "rt2_safety")
    assert json.loads(read_metadata(recording)[META_RUN]["params_missing"]) == []
    text = (run_dir / "record.log").read_text()
    assert "rt2-record: stored the parameters of rt2_policy, rt2_safety" in text, text
    report = replay(recording)
    assert report.ok, format_report(report, only_changes=True)
    assert "run parameters: rt2_policy (tokenizer.*) and rt2_safety (safety.*) as recorded" \
        in format_report(report)
    for name in ("camera.gif", "frame.png", "path.png", "policy.log", "safety.log", "sim.log"):
        assert (run_dir / name).stat().st_size > 0, name
    gif = Image.open(run_dir / "camera.gif")
    assert gif.n_frames >= 10
    # The camera image (224 px, 2x) on the left, the wrist camera (128 px, 2x) with the status under it
    assert (gif.width, gif.height) == (448 + PANEL_GAP_PX + 256, 448)
    assert (run_dir / "camera.gif").stat().st_size < 2_000_000

    # The recording holds both cameras (rt2-record's default topics; the demo keeps 2 frames/s of each).
    from rt2_ros.recording import iter_messages

    frames: dict[str, list] = {"/camera/image": [], "/wrist_camera/image": []}
    for m in iter_messages(recording, topics=frames):
        frames[m.topic].append(m.message)
    assert len(frames["/camera/image"]) >= 5 and len(frames["/wrist_camera/image"]) >= 5, \
        {t: len(v) for t, v in frames.items()}
    (cam, wrist) = frames["/camera/image"][-1], frames["/wrist_camera/image"][-1]
    assert (cam.width, cam.height, cam.header.frame_id) == (224, 224, "camera_optical_frame")
    assert (wrist.width, wrist.height, wrist.encoding, wrist.header.frame_id) == (
        128, 128, "rgb8", "wrist_camera_optical_frame")
    assert wrist.header.stamp.sec > 0


def test_annotated_frame_without_a_wrist_camera_keeps_the_status_band():
    # sim_node.wrist_camera false: the camera image over the status band, as before the wrist camera.
    import numpy as np

    from rt2_ros.demo import _annotate

    status = {"t": "1.0 s", "step": "10", "phase": "reach " * 40, "latency": "1 ms", "safety": "RUNNING"}
    camera = np.zeros((224, 224, 3), np.uint8)
    assert _annotate(camera, status).shape == (448 + BAND_HEIGHT_PX, 448, 3)
    both = _annotate(camera, status, np.zeros((128, 128, 3), np.uint8))
    assert both.shape == (448, 448 + PANEL_GAP_PX + 256, 3)
    assert (both[300:, 460:] < 128).any()  # the status text under the wrist image
    big = _annotate(camera, status, np.zeros((480, 640, 3), np.uint8))  # a large wrist image is scaled down
    assert big.shape == (448, 448 + PANEL_GAP_PX + 256, 3) and (big[300:, 460:] < 128).any()


def test_summary_reports_the_seed_the_simulator_runs_with():
    # Without --seed the simulator takes sim_node.seed of the params file (0 in config/rt2.yaml):
    # summary.json used to say "seed": null then.
    from rt2_ros.demo import _node_params, _parse_args

    args = _parse_args(["--params", str(REPO / "config" / "rt2.yaml")])
    assert args.seed is None
    nodes = _node_params(args, [REPO / "config" / "rt2.yaml"])
    assert args.seed == 0 and nodes["rt2_sim"]["sim_node.seed"] == 0
    args = _parse_args(["--seed", "7"])
    _node_params(args, [REPO / "config" / "rt2.yaml"])
    assert args.seed == 7


def test_path_plot_names_objects_without_overlapping_labels():
    # Cubes in the tray and next to it lie within a centimetre, at one height in the side view: their
    # names went into text labels that overlapped. They are in a legend below both views now.
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from rt2_ros.demo import EpisodeLog, ObjectState, _path_figure

    objects = {"red_cube": ObjectState((0.585, 0.200, 0.027), True), "tray": ObjectState((0.58, 0.20, 0.0), False),
               "yellow_cube": ObjectState((0.61, -0.03, 0.02), False),
               "green_cube": ObjectState((0.615, -0.215, 0.02), False),
               "blue_cube": ObjectState((0.45, 0.02, 0.02), False)}
    log = EpisodeLog(t0=0.0, targets=[(1.0, (0.4, 0.0, 0.3)), (2.0, (0.58, 0.2, 0.1))],
                     executed=[(1.0, (0.4, 0.0, 0.3)), (2.0, (0.58, 0.2, 0.1))])
    fig = _path_figure(log, objects, ([0.25, -0.35, 0.02], [0.75, 0.35, 0.55]))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert not [c for ax in fig.axes for c in ax.get_children() if isinstance(c, Annotation)]
        (legend,) = fig.legends
        names = {t.get_text() for t in legend.get_texts()}
        assert {"red cube", "tray", "yellow cube", "green cube", "blue cube"} <= names
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:  # the legend sits below both views, over neither
            assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
        texts = [t.get_window_extent(renderer) for t in legend.get_texts()]
        assert not any(a.overlaps(b) for i, a in enumerate(texts) for b in texts[i + 1:])
    finally:
        plt.close(fig)
