"""rt2-train / rt2-eval (rt2_ros.learn.train, rt2_ros.learn.evaluate): a tiny training run on a handful of
frames gives a checkpoint the ``local`` backend loads as it is and that answers valid RT-2 tokens under
constrained decoding; training is byte-reproducible for a seed; what the backend feeds the model at run
time is exactly what training fed it; the shipped checkpoint loads and answers; bad input gets a clear
error. Everything here takes seconds (no real training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from rt2_ros.actions import Observation
from rt2_ros.learn import evaluate, train
from rt2_ros.learn.dataset import Episode, Frame
from rt2_ros.tokens import ActionTokenizer

TINY = train.ModelSpec(image_size=32, patch_size=16, vision_hidden=16, vision_layers=1, vision_heads=2,
                       text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64)
INSTRUCTIONS = ("pick up the red cube and put it in the tray", "pick up the blue cube")
CAMERAS = ("camera", "wrist_camera")


def _episodes(n: int = 3, frames: int = 6, size: int = 48) -> list[Episode]:
    """Random frames at another size than the model's (exercises the resize) with valid RT-2 bins."""
    rng = np.random.default_rng(7)
    out = []
    for e in range(n):
        fr = []
        for k in range(frames):
            bins = rng.integers(0, 256, 8)
            bins[0] = int(k == frames - 1)
            fr.append(Frame(images={c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in CAMERAS},
                            state=np.zeros(8, np.float32), action_tokens=bins.astype(np.int64), timestamp=0.1 * k))
        out.append(Episode(instruction=INSTRUCTIONS[e % 2], success=True, seed=e, frames=fr))
    return out


def _train(out: Path, **opts) -> train.TrainResult:
    o = dataclasses.replace(train.TrainOptions(epochs=2, batch_size=4, warmup_steps=2, val_fraction=0.34), **opts)
    return train.train(_episodes(), out, TINY, o, log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learn") / "ckpt"
    result = _train(out)
    assert result.steps == 6 and result.train_frames == 12 and result.val_frames == 6
    return out


def _observation(size: int = 40, seed: int = 0, instruction: str = INSTRUCTIONS[0]) -> Observation:
    rng = np.random.default_rng(seed)
    main, wrist = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))
    return Observation(main, instruction, 1, 0.0, images={"camera": main, "wrist_camera": wrist})


def test_tiny_training_run_gives_a_checkpoint_the_local_backend_serves(tiny_checkpoint):
    report = evaluate.json.loads((tiny_checkpoint / train.REPORT_FILE).read_text())
    assert report["held_out"]["frames"] == 6 and 0.0 <= report["held_out"]["token_accuracy"] <= 1.0
    assert np.isfinite(report["final_loss"]) and report["checkpoint_bytes"] > 0
    backend = evaluate.learned_backend(tiny_checkpoint)
    try:
        assert backend.model_kind == "image_text_to_text" and backend.grammar is not None
        tokenizer = ActionTokenizer.from_profile("rt2")
        for seed in range(3):
            reply = backend.infer(_observation(seed=seed), timeout_s=10.0)
            bins = tokenizer.parse_text(reply.text).bins  # raises on anything but 8 valid bins
            assert len(bins) == 8
    finally:
        backend.close()


def test_backend_feeds_the_model_what_training_fed_it(tiny_checkpoint):
    """Same token ids (prompt with expanded image tokens) and same pixel values at run time as in training."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    obs = _observation(size=TINY.image_size)
    frame = Frame(images={"camera": obs.images["camera"], "wrist_camera": obs.images["wrist_camera"]},
                  state=np.zeros(8, np.float32), action_tokens=np.array([0, 1, 2, 3, 4, 5, 6, 7]), timestamp=0.0)
    data = train.encode_episodes([Episode(obs.instruction, True, 0, [frame])], processor, TINY, CAMERAS)
    batch = train.Batcher(data, processor, processor.tokenizer, augment=False)(np.array([0]))
    backend = evaluate.learned_backend(tiny_checkpoint)
    try:
        inputs = backend._model_inputs([backend._prompt_and_images(obs)])
    finally:
        backend.close()
    n = len(data.prompts[0])
    assert inputs["input_ids"][0].tolist() == batch["input_ids"][0, :n].tolist()
    assert torch.allclose(inputs["pixel_values"], batch["pixel_values"], atol=1e-5)
    answer = processor.tokenizer.decode(batch["input_ids"][0, n:n + 8].tolist())
    assert answer == "0 1 2 3 4 5 6 7"


def _state_backend(checkpoint: Path):
    from rt2_ros.backends import create_backend

    return create_backend("local", {"model_path": str(checkpoint), "device": "cpu", "cameras": list(CAMERAS),
                                    "prompt_template": train.STATE_PROMPT_TEMPLATE},
                          ActionTokenizer.from_profile("rt2"))


def test_with_the_hand_state_the_backend_feeds_the_model_what_training_fed_it(tiny_checkpoint):
    """rt2-train --state: the prompt's 4 state numbers at run time (from the observation's ee_pose and
    gripper) are the ids training put in (from the dataset frame's observation.state)."""
    from transformers import AutoProcessor

    from rt2_ros.backends.local_hf import state_text

    processor = AutoProcessor.from_pretrained(str(tiny_checkpoint), local_files_only=True)
    base = _observation(size=TINY.image_size)
    position, quat, grip = np.array([0.41, -0.12, 0.2]), np.array([0.0, 1.0, 0.0, 0.0]), 0.7
    obs = dataclasses.replace(base, ee_position=position, ee_orientation=quat, gripper=grip)
    frames = [Frame(images=dict(obs.images), state=np.array([*position, *quat, grip], np.float32),
                    action_tokens=np.array([0, 1, 2, 3, 4, 5, 6, 7]), timestamp=0.0),
              Frame(images=dict(obs.images), state=np.array([0.7, 0.3, 0.5, *quat, 0.0], np.float32),
                    action_tokens=np.array([0, 1, 2, 3, 4, 5, 6, 7]), timestamp=0.1)]
    data = train.encode_episodes([Episode(obs.instruction, True, 0, frames)], processor, TINY, CAMERAS, state=True)
    assert len(data.prompts) == 2 and data.prompts[0] != data.prompts[1]
    batch = train.Batcher(data, processor, processor.tokenizer, augment=False)(np.array([0]))
    backend = _state_backend(tiny_checkpoint)
    try:
        text, images = backend._prompt_and_images(obs)
        inputs = backend._model_inputs([(text, images)])
    finally:
        backend.close()
    expected = state_text(np.float32(position), np.float32(grip))  # the dataset stores float32
    assert expected == "82 84 87 178" and f"{expected} Q: " in text, text
    assert inputs["input_ids"][0].tolist() == batch["input_ids"][0, :len(data.prompts[0])].tolist()


def test_state_text_bins_the_position_over_the_box_and_clamps():
    from rt2_ros.backends.local_hf import STATE_MAX_M, STATE_MIN_M, state_text

    assert state_text(STATE_MIN_M, 0.0) == "0 0 0 0" and state_text(STATE_MAX_M, 1.0) == "255 255 255 255"
    assert state_text((0.0, 9.0, 0.3), 2.0) == "0 255 135 255"


def test_with_state_in_the_template_a_request_without_hand_state_fails_clearly(tiny_checkpoint):
    from rt2_ros.backends.base import BackendError

    backend = _state_backend(tiny_checkpoint)
    try:
        with pytest.raises(BackendError, match=r"no fresh ee_pose and gripper \(is the arm driver"):
            backend.infer(_observation(), timeout_s=10.0)
        obs = dataclasses.replace(_observation(), ee_position=np.array([0.5, 0.0, 0.3]))
        with pytest.raises(BackendError, match="no fresh gripper"):
            backend.infer(obs, timeout_s=10.0)
    finally:
        backend.close()


def test_training_is_byte_reproducible_for_a_seed(tmp_path, tiny_checkpoint):
    _train(tmp_path / "again")
    assert train.weights_digest(tmp_path / "again") == train.weights_digest(tiny_checkpoint)
    _train(tmp_path / "other", seed=1)
    assert train.weights_digest(tmp_path / "other") != train.weights_digest(tiny_checkpoint)


def test_soft_targets_put_the_motion_mass_on_neighbouring_bins():
    import torch

    number_ids = torch.arange(10, 266)
    answers = torch.tensor([[1, 127, 0, 255, 127, 127, 127, 255]])
    t = train.soft_targets(answers, number_ids, eos_id=2, vocab=300, sigma=1.0)
    assert torch.allclose(t.sum(-1), torch.ones(1, 9))
    assert t[0, 0, number_ids[1]] == 1.0 and t[0, 7, number_ids[255]] == 1.0 and t[0, 8, 2] == 1.0
    dx = t[0, 1, number_ids]
    assert int(dx.argmax()) == 127 and dx[126] == dx[128] and 0.1 < float(dx[126]) < float(dx[127])


def test_wilson_interval_known_values():
    lo, hi = evaluate.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert evaluate.wilson_interval(0, 10)[0] == 0.0 and evaluate.wilson_interval(0, 10)[1] == pytest.approx(
        0.2775, abs=1e-4)
    assert evaluate.wilson_interval(0, 0) == (0.0, 1.0)


def test_markdown_table_per_instruction_and_overall():
    o = evaluate.Outcome
    table = evaluate.markdown_table({
        "learned": [o(1, "a", True, 10, 1.0), o(2, "b", False, 10, 1.0)],
        "reference": [o(1, "a", True, 10, 1.0), o(2, "b", True, 10, 1.0)],
    })
    lines = table.splitlines()
    assert lines[0] == "| instruction | learned | reference |"
    assert lines[2].startswith("| a | 1/1 = 100 % [") and "| b | 0/1 = 0 % [0, 79] | 1/1 = 100 % [21, 100] |" in table
    assert lines[-1].startswith("| **all** | **1/2 = 50 % [")


def test_empty_or_missing_dataset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(train.TrainError, match="no episodes"):
        train.train([], tmp_path / "x", TINY)
    assert train.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no dataset at" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert evaluate.main(["--model", str(tmp_path / "none"), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "Traceback" not in err


def test_bad_model_options_are_clear_errors(tmp_path):
    with pytest.raises(train.TrainError, match="multiple of --patch-size"):
        train.train(_episodes(1), tmp_path / "x", dataclasses.replace(TINY, image_size=40))
    with pytest.raises(train.TrainError, match="no 'depth'"):
        _train(tmp_path / "y", cameras=("camera", "depth"))


def test_fast_evaluation_of_a_checkpoint_returns_a_well_formed_report(tiny_checkpoint, tmp_path):
    backend = evaluate.learned_backend(tiny_checkpoint)
    gifs = []
    try:
        outcomes = evaluate.run_fast(backend, [evaluate.FIRST_EVAL_SEED], TINY.image_size, max_steps=8,
                                     keep=lambda o, ep: (evaluate.write_episode_gif(tmp_path / "a.gif", ep, "x"),
                                                         gifs.append(o)))
    finally:
        backend.close()
    (o,) = outcomes
    assert o.seed == evaluate.FIRST_EVAL_SEED and o.instruction and 1 <= o.steps <= 8 and isinstance(o.success, bool)
    assert gifs == outcomes and (tmp_path / "a.gif").stat().st_size > 0
    table = evaluate.markdown_table({"learned, fast": outcomes})
    assert table.splitlines()[2].startswith(f"| {o.instruction} | {int(o.success)}/1 = ")


def test_demo_scene_seed_params_are_what_the_nodes_accept(tmp_path):
    """rt2-demo --policy learned --scene-seed S: the scene file layered over rt2.yaml and learned.yaml passes
    the nodes' own parameter checks, and the simulator gets the scene's seed and randomisation."""
    import argparse

    from rt2_ros.demo import _scene_params
    from rt2_ros.learn.collect import make_scene
    from rt2_ros.nodes.bringup import check_params, default_params_file

    seed = evaluate.FIRST_EVAL_SEED + 3
    args = argparse.Namespace(scene_seed=seed, seed=None, instruction=None, policy="learned", backend="")
    path = _scene_params(args, tmp_path)
    scene = make_scene(seed)
    assert args.seed == seed and args.instruction == scene.instruction
    nodes = check_params([default_params_file().parent / "rt2.yaml", evaluate.learned_params_file(), path],
                         nodes=("rt2_policy", "rt2_safety", "rt2_sim")).nodes
    sim = nodes["rt2_sim"]
    assert sim["sim_node.seed"] == seed and sim["sim.placement"] == "workspace"
    assert sim["sim.objects"] == scene.sim_config["sim.objects"]
    # the simulator renders what the shipped checkpoint was trained on
    assert sim["sim.camera_width"] == evaluate.checkpoint_image_size(evaluate.shipped_model_dir())
    assert nodes["rt2_policy"]["backend.type"] == "local"
    # ... and learned.yaml's prompt is the one it was trained with (the hand state or not)
    assert nodes["rt2_policy"]["backend.local.prompt_template"] == \
        evaluate.checkpoint_prompt_template(evaluate.shipped_model_dir())


def test_a_checkpoint_trained_with_the_hand_state_is_served_with_it(tmp_path):
    """rt2-train --state: the report names the state template; rt2-eval's backend and rt2-demo --policy
    learned take it from the checkpoint, and the backend answers an observation with ee_pose and gripper."""
    import argparse

    from rt2_ros.demo import _learned_policy

    result = _train(tmp_path / "state", state=True)
    assert evaluate.checkpoint_prompt_template(result.out) == train.STATE_PROMPT_TEMPLATE
    _, overrides = _learned_policy(argparse.Namespace(backend="", model=str(result.out)), [])
    assert overrides[-2:] == ["-p", 'backend.local.prompt_template:="{image}{state} {prompt}"']
    backend = evaluate.learned_backend(result.out)
    try:
        obs = dataclasses.replace(_observation(), ee_position=np.array([0.5, 0.0, 0.3]), gripper=0.0)
        assert len(ActionTokenizer.from_profile("rt2").parse_text(backend.infer(obs, 10.0).text).bins) == 8
    finally:
        backend.close()


def test_shipped_checkpoint_loads_and_answers_a_rendered_scene():
    from rt2_ros.learn.collect import make_scene

    model = evaluate.shipped_model_dir()
    assert (model / "config.json").is_file(), f"the shipped checkpoint is missing: {model} (make train-learned)"
    report = evaluate.json.loads((model / train.REPORT_FILE).read_text())
    assert report["checkpoint_bytes"] < 5_000_000 and report["held_out"]["frames"] > 0
    size = report["spec"]["image_size"]
    with make_scene(evaluate.FIRST_EVAL_SEED).build_sim() as sim:
        main, wrist = sim.render(size, size), sim.render(size, size, camera="wrist")
    obs = Observation(main, make_scene(evaluate.FIRST_EVAL_SEED).instruction, 0, 0.0,
                      images={"camera": main, "wrist_camera": wrist})
    backend = evaluate.learned_backend(model)
    try:
        reply = backend.infer(obs, timeout_s=10.0)
    finally:
        backend.close()
    bins = ActionTokenizer.from_profile("rt2").parse_text(reply.text).bins
    assert len(bins) == 8


@pytest.mark.parametrize(("argv", "message"), [
    (["--policy", "learned", "--model", "/nonexistent/rt2"], "no checkpoint at"),
    (["--model", "/nonexistent/rt2"], "--model: only with --policy learned"),
    (["--seed", "3", "--scene-seed", "5"], "give one"),
])
def test_demo_refuses_bad_learned_options_before_starting_nodes(tmp_path, capsys, argv, message):
    from rt2_ros.demo import main as demo_main

    assert demo_main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
