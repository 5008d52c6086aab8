"""``rt2-eval``: closed-loop success of a learned checkpoint on held-out seeds, next to the reference policy.

Two ways to run an episode, both on scenes from :func:`rt2_ros.learn.collect.make_scene` (seeded
object positions over the workspace, colours, distractors, lighting), with held-out seeds from
:data:`FIRST_EVAL_SEED` up, disjoint from the collection seeds (which start at 0):

* **fast** (no ROS): :func:`rt2_ros.learn.collect.run_episode`, the same closed loop the
  demonstrations were collected with, with the checkpoint served by
  :class:`~rt2_ros.backends.local_hf.LocalHFBackend` (constrained decoding) built from the same
  params file the policy node reads (``config/backends/learned.yaml``). The reference (embedded)
  policy runs on the same seeds.
* **nodes**: ``rt2-demo --policy learned`` per seed — the real policy, safety and simulator
  nodes over DDS, one process each — judged from the simulator's ground truth; the demo's
  summary.json is the record.

Success rates come with a 95 % Wilson score interval (sound for small n and for rates near 0 or
1, where the normal approximation is not). The report is a Markdown table, per instruction and
overall, printed and written to a file with the machine noted; a GIF of one success and one
failure of the learned policy (fast mode) is written next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: held-out evaluation seeds start here; collection seeds start at 0 (rt2-collect --seed)
FIRST_EVAL_SEED = 1_000_000
WILSON_Z = 1.959964  # two-sided 95 %


class EvalError(RuntimeError):
    """A user-facing problem (missing checkpoint, bad option)."""


@dataclass(frozen=True)
class Outcome:
    """One evaluated episode."""

    seed: int
    instruction: str
    success: bool
    steps: int
    seconds: float
    note: str = ""


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(0, 1)`` for n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in 0..{n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(outcomes: Sequence[Outcome]) -> str:
    n = len(outcomes)
    if n == 0:
        return "-"
    k = sum(o.success for o in outcomes)
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {100 * k / n:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown_table(columns: dict[str, Sequence[Outcome]]) -> str:
    """Success per instruction and overall, one column per policy/mode (k/n = % [95 % Wilson CI])."""
    instructions = sorted({o.instruction for outcomes in columns.values() for o in outcomes})
    head = "| instruction | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    rows = [head, rule]
    for instruction in instructions:
        cells = [_rate([o for o in outcomes if o.instruction == instruction]) for outcomes in columns.values()]
        rows.append(f"| {instruction} | " + " | ".join(cells) + " |")
    rows.append("| **all** | " + " | ".join(f"**{_rate(outcomes)}**" for outcomes in columns.values()) + " |")
    return "\n".join(rows)


def machine_note() -> str:
    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


# ---------------------------------------------------------------------------------------------------- backends
def learned_params_file() -> Path:
    """config/backends/learned.yaml of this install (share/rt2_ros) or of the source tree."""
    return _installed_or_source(Path("config") / "backends" / "learned.yaml")


def shipped_model_dir() -> Path:
    """models/rt2-tiny of this install (share/rt2_ros) or of the source tree."""
    return _installed_or_source(Path("models") / "rt2-tiny" / "config.json").parent


def _installed_or_source(relative: Path) -> Path:
    """The file ``relative`` under share/rt2_ros of this install if it is there, else under the source tree."""
    installed = Path(sys.prefix) / "share" / "rt2_ros" / relative
    return installed if installed.is_file() else Path(__file__).resolve().parents[2] / relative


def check_model_dir(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise EvalError(f"--model: no checkpoint at {path} (config.json missing); train one with rt2-train or use "
                        f"the shipped {shipped_model_dir()}")
    return path


def checkpoint_prompt_template(model: Path) -> str:
    """The backend.local.prompt_template the checkpoint was trained with (its train_report.json; a checkpoint
    without one gets the local backend's default)."""
    from rt2_ros.learn.train import PROMPT_TEMPLATE, REPORT_FILE

    report = Path(model) / REPORT_FILE
    if not report.is_file():
        return PROMPT_TEMPLATE
    try:
        return str(json.loads(report.read_text()).get("prompt_template", PROMPT_TEMPLATE))
    except (OSError, ValueError, AttributeError) as exc:
        raise EvalError(f"{report}: unreadable ({exc})") from None


def checkpoint_image_size(model: Path) -> int:
    """The square image size (px) the checkpoint's processor feeds the model: what its cameras must render."""
    config = Path(model) / "processor_config.json"
    try:
        crop = json.loads(config.read_text())["image_processor"]["crop_size"]
        return int(crop["height"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{config}: no image size in it ({exc})") from None


def learned_backend(model: Path, params_file: Path | None = None):
    """The checkpoint as the policy node would run it: LocalHFBackend with the options of the learned params
    file (cameras, constrained decoding) and its tokenizer profile; ``model`` overrides model_path, and its
    training report the prompt_template (as rt2-demo --policy learned does)."""
    from rt2_ros.backends import create_backend
    from rt2_ros.nodes.bringup import check_params

    params = check_params([learned_params_file() if params_file is None else params_file], backend="",
                          nodes=("rt2_policy",)).nodes["rt2_policy"]
    prefix = "backend.local."
    options = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    options["model_path"] = str(check_model_dir(model))
    options["prompt_template"] = checkpoint_prompt_template(model)  # as trained, e.g. with the hand state
    return create_backend("local", options, _action_tokenizer(params))


def _action_tokenizer(params: dict[str, Any]):
    from rt2_ros.tokens import ActionTokenizer

    profile = params.get("tokenizer.profile", "rt2")
    return ActionTokenizer.from_profile(profile)


# ---------------------------------------------------------------------------------------------------- runs
def run_fast(policy, seeds: Iterable[int], image_size: int, progress: Callable[[Outcome], None] | None = None,
             keep: Callable[[Outcome, Any], None] | None = None, max_steps: int = 0) -> list[Outcome]:
    """Episodes of ``policy`` (a Backend; None = the reference policy calibrated to each scene's camera, as
    rt2-collect runs it) in the ROS-free closed loop of rt2-collect, one per seed, without perturbations;
    ``max_steps`` 0 = rt2-collect's limit."""
    from rt2_ros.learn.collect import MAX_STEPS, run_episode

    outcomes = []
    for seed in seeds:
        t0 = time.monotonic()
        episode = run_episode(seed, policy, image_size, max_steps=max_steps or MAX_STEPS)
        o = Outcome(seed, episode.instruction, bool(episode.success), len(episode.frames), time.monotonic() - t0,
                    str(episode.info.get("verdict", "")))
        outcomes.append(o)
        if keep is not None:
            keep(o, episode)
        if progress is not None:
            progress(o)
    return outcomes


def run_nodes(model: Path, seeds: Iterable[int], out_dir: Path, timeout_s: float = 30.0, ros_domain: int = 88,
              progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Episodes through the nodes: ``rt2-demo --policy learned`` per seed (a child process each, so every
    episode starts from fresh nodes), judged by the demo from the simulator's ground truth."""
    from rt2_ros.learn.collect import make_scene

    outcomes = []
    for seed in seeds:
        instruction = make_scene(seed).instruction
        run_root = out_dir / f"seed{seed}"
        cmd = [sys.executable, "-m", "rt2_ros.demo", "--policy", "learned", "--model", str(model), "--scene-seed",
               str(seed), "--instruction", instruction, "--out", str(run_root), "--timeout", str(timeout_s),
               "--ros-domain", str(ros_domain), "--no-record"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 120.0, check=False)
        summaries = sorted(run_root.glob("*/summary.json"))
        if summaries:
            summary = json.loads(summaries[-1].read_text())
            o = Outcome(seed, instruction, bool(summary["success"]), int(summary["steps"]), time.monotonic() - t0,
                        summary.get("verdict", ""))
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            o = Outcome(seed, instruction, False, 0, time.monotonic() - t0, f"demo failed: {tail[0]}")
        outcomes.append(o)
        if progress is not None:
            progress(o)
    return outcomes


def write_episode_gif(path: Path, episode, label: str) -> None:
    """The episode's camera (and wrist camera) frames, as rt2-demo's camera.gif shows them."""
    from rt2_ros.demo import _annotate, _write_gif

    frames = []
    for k, frame in enumerate(episode.frames):
        names = list(frame.images)
        main = frame.images[names[0]]
        wrist = frame.images[names[1]] if len(names) > 1 else None
        status = {"t": f"{frame.timestamp:5.1f} s", "step": str(k), "phase": label, "latency": "-",
                  "safety": "-"}
        frames.append(_annotate(np.asarray(main), status, None if wrist is None else np.asarray(wrist)))
    if frames:  # every 2nd frame at 5 fps: real time (10 Hz policy), half the file
        _write_gif(path, frames[::2], fps=5.0)


# ---------------------------------------------------------------------------------------------------- CLI
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rt2-eval", description="Closed-loop success of a learned checkpoint on "
                                "held-out seeds (fast ROS-free mode and through the nodes), next to the reference "
                                "policy; writes a Markdown report and GIFs.")
    p.add_argument("--model", default="", help="checkpoint directory (default: the shipped models/rt2-tiny)")
    p.add_argument("--episodes", type=int, default=50, help="held-out seeds in fast mode (default 50)")
    p.add_argument("--nodes", type=int, default=0,
                   help="of those seeds, how many also run through the nodes (rt2-demo; default 0)")
    p.add_argument("--first-seed", type=int, default=FIRST_EVAL_SEED,
                   help=f"first held-out seed (default {FIRST_EVAL_SEED}; collection seeds start at 0)")
    p.add_argument("--image-size", type=int, default=0,
                   help="camera size in fast mode (px; default: the checkpoint's, as it was trained)")
    p.add_argument("--max-steps", type=int, default=0, help="step limit of a fast-mode episode (0 = rt2-collect's)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference policy")
    p.add_argument("--out", default="bench/results/learned_eval", help="folder for the report and GIFs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--node-timeout", type=float, default=30.0,
                   help="time limit of one episode through the nodes (default 30 s: rt2-collect's 300 steps at 10 Hz, "
                        "as in fast mode)")
    p.add_argument("--keep-node-runs", action="store_true",
                   help="keep rt2-demo's episode folders (GIFs, logs) of the node runs under --out/nodes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.episodes < 1 or args.nodes < 0:
            raise EvalError("--episodes must be >= 1 and --nodes >= 0")
        if args.first_seed < FIRST_EVAL_SEED:
            print(f"rt2-eval: warning: --first-seed {args.first_seed} is below {FIRST_EVAL_SEED}: these seeds may "
                  f"be collection seeds (not held out)", file=sys.stderr)
        model = check_model_dir(Path(args.model) if args.model else shipped_model_dir())
        args.image_size = args.image_size or checkpoint_image_size(model)
        return _evaluate(args, model)
    except EvalError as exc:
        print(f"rt2-eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rt2-eval: interrupted", file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace, model: Path) -> int:
    import torch

    from rt2_ros.backends import BackendConfigError

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.episodes))
    try:
        learned = learned_backend(model)
    except BackendConfigError as exc:
        raise EvalError(f"cannot load {model}: {exc}") from None
    gifs: dict[str, Path] = {}

    def keep(o: Outcome, episode) -> None:
        key = "success" if o.success else "failure"
        if key not in gifs:
            gifs[key] = out / f"learned_{key}_seed{o.seed}.gif"
            write_episode_gif(gifs[key], episode, f"learned, seed {o.seed}: {key}")

    def show(tag: str) -> Callable[[Outcome], None]:
        def cb(o: Outcome) -> None:
            print(f"rt2-eval: {tag} seed {o.seed} {'SUCCESS' if o.success else 'failure'} ({o.steps} steps, "
                  f"{o.seconds:.1f} s) {o.instruction!r} {o.note}", flush=True)
        return cb

    t0 = time.monotonic()
    columns: dict[str, list[Outcome]] = {}
    columns["learned, fast"] = run_fast(learned, seeds, args.image_size, show("learned fast"), keep,
                                        max_steps=args.max_steps)
    learned.close()
    fast_s = time.monotonic() - t0
    if not args.no_reference:  # rt2-collect's demonstrator: calibrated to each scene's camera
        columns["reference, fast"] = run_fast(None, seeds, args.image_size, show("reference fast"),
                                              max_steps=args.max_steps)
    if args.nodes:
        with tempfile.TemporaryDirectory(prefix="rt2_eval_nodes_") as tmp:
            node_dir = out / "nodes" if args.keep_node_runs else Path(tmp)
            columns["learned, through the nodes"] = run_nodes(model, seeds[:args.nodes], node_dir,
                                                              args.node_timeout, progress=show("learned nodes"))
    report = _report(args, model, columns, gifs, fast_s)
    (out / "report.md").write_text(report)
    print(report)
    print(f"rt2-eval: wrote {out / 'report.md'}" + "".join(f", {p}" for p in gifs.values()))
    return 0


def _report(args, model: Path, columns: dict[str, list[Outcome]], gifs: dict[str, Path], fast_s: float) -> str:
    train_report = model / "train_report.json"
    trained = json.loads(train_report.read_text()) if train_report.is_file() else {}
    lines = [
        "# rt2-eval: learned policy vs reference on held-out seeds", "",
        f"Checkpoint: `{model}`" + (f" ({trained.get('parameters', 0) / 1e6:.2f} M parameters, "
                                   f"{trained.get('train_seconds', 0) / 60:.1f} min of training, held-out token "
                                   f"accuracy {trained.get('held_out', {}).get('token_accuracy', float('nan')):.3f})"
                                   if trained else ""),
        f"Seeds {args.first_seed}..{args.first_seed + args.episodes - 1} (collection seeds start at 0); success = "
        "the named cube ends where the instruction says (simulator ground truth). Cells: successes/episodes = rate "
        "[95 % Wilson interval].",
        f"Machine: {machine_note()}; torch threads {args.threads}; learned fast mode took {fast_s / 60:.1f} min.", "",
        markdown_table(columns), "",
    ]
    if gifs:
        lines += ["GIFs (learned, fast mode): " + ", ".join(f"[{k}]({p.name})" for k, p in gifs.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
