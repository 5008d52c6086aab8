"""Episodes of RT-2 action tokens in the LeRobot dataset format (on-disk layout v3.0), and back.

What users fine-tune on today is a LeRobot dataset: ``meta/info.json`` (features, fps, path
patterns), ``meta/tasks.parquet`` (instruction -> task_index), ``meta/episodes/chunk-XXX/file-YYY.parquet``
(one row per episode: length, task, where its frames are), ``meta/stats.json`` (normalisation
statistics) and ``data/chunk-XXX/file-YYY.parquet`` (one row per frame). This module writes that
layout with pyarrow and reads it back; ``lerobot``'s own ``LeRobotDataset`` loads what it writes
with the same pixels, states, tokens and tasks (checked with lerobot 0.6.1 in a separate Python 3.12
venv on a 40-episode collection: 4416 frames). Rejected: ``lerobot`` itself as the writer — 0.6.1
needs Python >= 3.12 and torch < 2.12 (the project runs 3.11 and pins torch 2.13 for the ``local``
backend) and pulls in ~3 GB of CUDA wheels, for what is a documented file layout.

Per frame (LeRobot feature names):

* ``observation.images.<camera>``: PNG-encoded RGB frames (LeRobot's ``image`` dtype: the Hugging
  Face ``Image`` struct of bytes and path), one feature per camera (``camera``, ``wrist_camera``);
  PNG rather than MP4 video: lossless (the tokens were chosen on exactly these pixels) and no video
  codec needed to read it;
* ``observation.state``: float32 [8], end-effector position (m, base frame), orientation
  quaternion (w, x, y, z), measured gripper closedness 0..1;
* ``action.tokens``: int64 [8], the RT-2 bins (terminate, dx, dy, dz, droll, dpitch, dyaw,
  gripper) exactly as the nodes would execute them; ``action``: float32 [8], the same bins as the
  tokenizer decodes them (terminate 0/1, then the 7 motion values in the profile's model units), for
  users who train on continuous actions;
* the standard ``timestamp``, ``frame_index``, ``episode_index``, ``index``, ``task_index``.

Per episode (``meta/episodes``): besides LeRobot's columns, ``success`` and ``seed``.
``meta/rt2_ros.json`` names the token profile the bins belong to.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory (LeRobot's default)
DATA_FILE_SIZE_MB = 100  # a data file is closed after about this many MB (LeRobot's default)
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
TASKS_PATH = "meta/tasks.parquet"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
RT2_META_PATH = "meta/rt2_ros.json"
IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
TOKENS_KEY = "action.tokens"
ACTION_KEY = "action"
STATE_NAMES = ("x", "y", "z", "qw", "qx", "qy", "qz", "gripper")
ACTION_NAMES = ("terminate", "dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
CAMERA_NAMES = ("camera", "wrist_camera")


class DatasetError(ValueError):
    """A dataset (or the input to one) is missing, malformed or inconsistent; the message names the file."""


@dataclass(frozen=True)
class Frame:
    """One policy step: what the policy saw and the tokens it answered."""

    images: dict[str, np.ndarray]  # camera name -> uint8 HxWx3 RGB
    state: np.ndarray  # float32 [8]: ee xyz (m, base frame), quaternion wxyz, gripper closedness 0..1
    action_tokens: np.ndarray  # int64 [8]: RT-2 bins terminate, dx, dy, dz, droll, dpitch, dyaw, gripper
    timestamp: float  # s since the episode's start


@dataclass(frozen=True)
class Episode:
    """One demonstration (or recorded robot episode)."""

    instruction: str
    success: bool
    seed: int  # the scene seed (-1: not from the simulator)
    frames: list[Frame]
    # Which perturbation was applied during collection ("" none; rt2_ros.learn.collect.PERTURBATIONS).
    perturbation: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # free-form notes (not stored)


# ---------------------------------------------------------------------------------------------- writing
def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - the project's requirements install it
        raise DatasetError(f"the LeRobot dataset format needs pyarrow ({exc}); pip install 'pyarrow<26'") from None
    return pa, pq


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 HxWx3
        raise DatasetError("PNG encoding failed")
    return buf.tobytes()


def _unpng(data: bytes, where: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DatasetError(f"{where}: not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class _Stats:
    """Running min/max/mean/std/count of one feature (LeRobot's stats.json entries)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.sq: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        """``values``: (N, ...) samples along axis 0 (images: (N, 3) per-pixel channel values in 0..1)."""
        v = values.astype(np.float64)
        s, q, lo, hi = v.sum(0), (v * v).sum(0), v.min(0), v.max(0)
        if self.sum is None:
            self.sum, self.sq, self.min, self.max = s, q, lo, hi
        else:
            self.sum, self.sq = self.sum + s, self.sq + q
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
        self.n += len(v)

    def as_json(self, image: bool, count: int) -> dict[str, list]:
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean * mean, 0.0))
        shape = (-1, 1, 1) if image else (-1,)  # LeRobot keeps image stats as (C, 1, 1)
        out = {k: np.asarray(v).reshape(shape).tolist() for k, v in
               (("min", self.min), ("max", self.max), ("mean", mean), ("std", std))}
        out["count"] = [count]
        return out


def _features(image_shapes: Mapping[str, tuple[int, int, int]]) -> dict[str, dict[str, Any]]:
    feats: dict[str, dict[str, Any]] = {}
    for cam, shape in image_shapes.items():
        feats[IMAGE_PREFIX + cam] = {"dtype": "image", "shape": list(shape), "names": ["height", "width", "channels"]}
    feats[STATE_KEY] = {"dtype": "float32", "shape": [len(STATE_NAMES)], "names": list(STATE_NAMES)}
    feats[ACTION_KEY] = {"dtype": "float32", "shape": [len(ACTION_NAMES)], "names": list(ACTION_NAMES)}
    feats[TOKENS_KEY] = {"dtype": "int64", "shape": [len(ACTION_NAMES)], "names": list(ACTION_NAMES)}
    for key in ("timestamp",):
        feats[key] = {"dtype": "float32", "shape": [1], "names": None}
    for key in ("frame_index", "episode_index", "index", "task_index"):
        feats[key] = {"dtype": "int64", "shape": [1], "names": None}
    return feats


def _hf_features(features: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Hugging Face ``datasets`` feature description of each column (parquet schema metadata), so
    ``datasets`` reads the image columns as images even without LeRobot's help."""
    out: dict[str, Any] = {}
    for key, f in features.items():
        if f["dtype"] == "image":
            out[key] = {"_type": "Image"}
        elif f["shape"] == [1]:
            out[key] = {"dtype": f["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": f["shape"][0],
                        "_type": "Sequence"}
    return out


def _schema(features: Mapping[str, Mapping[str, Any]]):
    pa, _ = _pa()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = []
    for key, f in features.items():
        if f["dtype"] == "image":
            cols.append((key, image))
        elif f["shape"] == [1]:
            cols.append((key, pa.float32() if f["dtype"] == "float32" else pa.int64()))
        else:
            inner = pa.float32() if f["dtype"] == "float32" else pa.int64()
            cols.append((key, pa.list_(inner, f["shape"][0])))
    meta = {"huggingface": json.dumps({"info": {"features": _hf_features(features)}})}
    return pa.schema(cols, metadata=meta)


def _check_frame(frame: Frame, where: str, image_shapes: Mapping[str, tuple[int, int, int]]) -> None:
    if set(frame.images) != set(image_shapes):
        raise DatasetError(f"{where}: cameras {sorted(frame.images)}, expected {sorted(image_shapes)} "
                           f"(every frame of a dataset has the same cameras)")
    for cam, img in frame.images.items():
        if not (isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == image_shapes[cam]):
            raise DatasetError(f"{where}: camera {cam!r} image is {getattr(img, 'dtype', type(img))} "
                               f"{getattr(img, 'shape', '')}, expected uint8 {image_shapes[cam]}")
    if np.asarray(frame.state).shape != (len(STATE_NAMES),):
        raise DatasetError(f"{where}: state has shape {np.asarray(frame.state).shape}, expected ({len(STATE_NAMES)},)")
    if np.asarray(frame.action_tokens).shape != (len(ACTION_NAMES),):
        raise DatasetError(f"{where}: action_tokens has shape {np.asarray(frame.action_tokens).shape}, "
                           f"expected ({len(ACTION_NAMES)},)")


def write_lerobot(episodes: Iterable[Episode], root: Path, fps: float, *, token_profile: str = "rt2",
                  robot_type: str = "franka_panda", overwrite: bool = False,
                  data_file_size_mb: float = DATA_FILE_SIZE_MB) -> Path:
    """Write ``episodes`` (streamed: one at a time in memory) as a LeRobot v3.0 dataset under ``root``.

    ``fps``: the policy rate the frames were taken at. ``token_profile``: the rt2_ros token profile
    the action bins belong to (``action`` holds its decoded values). Refuses a non-empty ``root``
    unless ``overwrite``. Returns ``root``.
    """
    pa, pq = _pa()
    from rt2_ros.tokens import ActionTokenizer, TokenError

    root = Path(root)
    if not (math.isfinite(fps) and fps > 0):
        raise DatasetError(f"fps must be a positive number, got {fps}")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DatasetError(f"{root}: exists and is not empty; choose a new directory (or overwrite)")
        import shutil

        shutil.rmtree(root)
    tokenizer = ActionTokenizer.from_profile(token_profile)
    tasks: dict[str, int] = {}
    episode_rows: list[dict[str, Any]] = []
    stats: dict[str, _Stats] = {}
    features: dict[str, dict[str, Any]] | None = None
    image_shapes: dict[str, tuple[int, int, int]] = {}
    writer = None
    chunk, file_idx, file_bytes = 0, 0, 0
    index = 0
    try:
        for ep_idx, episode in enumerate(episodes):
            if not episode.frames:
                raise DatasetError(f"episode {ep_idx} (seed {episode.seed}) has no frames")
            if features is None:
                image_shapes = {cam: tuple(img.shape) for cam, img in episode.frames[0].images.items()}
                features = _features(image_shapes)
                schema = _schema(features)
            task_index = tasks.setdefault(episode.instruction, len(tasks))
            columns: dict[str, list] = {key: [] for key in features}
            for k, frame in enumerate(episode.frames):
                _check_frame(frame, f"episode {ep_idx} frame {k}", image_shapes)
                for cam, img in frame.images.items():
                    columns[IMAGE_PREFIX + cam].append({"bytes": _png(img), "path": None})
                try:
                    bins = tokenizer.validate_bins(np.asarray(frame.action_tokens))
                except TokenError as exc:
                    raise DatasetError(f"episode {ep_idx} frame {k}: action_tokens are not {token_profile} "
                                       f"bins: {exc}") from None
                columns[STATE_KEY].append(np.asarray(frame.state, np.float32))
                columns[TOKENS_KEY].append(bins.astype(np.int64))
                terminate = float(tokenizer.decode(bins).terminate)
                columns[ACTION_KEY].append(np.concatenate([[terminate], tokenizer.values_from_bins(bins)])
                                           .astype(np.float32))
                columns["timestamp"].append(float(frame.timestamp))
                columns["frame_index"].append(k)
                columns["episode_index"].append(ep_idx)
                columns["index"].append(index + k)
                columns["task_index"].append(task_index)
            n = len(episode.frames)
            for key in (STATE_KEY, ACTION_KEY, TOKENS_KEY, "timestamp", "frame_index", "episode_index", "index",
                        "task_index"):
                stats.setdefault(key, _Stats()).add(np.asarray(columns[key], np.float64).reshape(n, -1))
            for cam in image_shapes:
                pixels = np.stack([f.images[cam] for f in episode.frames]).reshape(-1, 3) / 255.0
                stats.setdefault(IMAGE_PREFIX + cam, _Stats()).add(pixels)
            table = pa.table({key: pa.array([_arrow_value(v) for v in vals], type=schema.field(key).type)
                              for key, vals in columns.items()}, schema=schema)
            if writer is not None and file_bytes > data_file_size_mb * 1e6:
                writer.close()
                writer, file_bytes = None, 0
                file_idx += 1
                if file_idx >= CHUNKS_SIZE:
                    chunk, file_idx = chunk + 1, 0
            if writer is None:
                path = root / DATA_PATH.format(chunk_index=chunk, file_index=file_idx)
                path.parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(table)
            file_bytes += table.nbytes
            episode_rows.append({
                "episode_index": ep_idx, "tasks": [episode.instruction], "length": n,
                "data/chunk_index": chunk, "data/file_index": file_idx,
                "dataset_from_index": index, "dataset_to_index": index + n,
                "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                "success": bool(episode.success), "seed": int(episode.seed), "perturbation": episode.perturbation,
            })
            index += n
    finally:
        if writer is not None:
            writer.close()
    if features is None:
        raise DatasetError("no episodes to write")
    _write_meta(root, features, tasks, episode_rows, stats, index, fps, robot_type, token_profile)
    return root


def _arrow_value(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def _write_meta(root: Path, features: dict, tasks: dict[str, int], episode_rows: list[dict], stats: dict[str, _Stats],
                total_frames: int, fps: float, robot_type: str, token_profile: str) -> None:
    pa, pq = _pa()
    meta = root / "meta"
    (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    # tasks.parquet: pandas' layout of a frame indexed by the task text (what LeRobot reads back)
    task_names = sorted(tasks, key=tasks.get)
    pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.3"}
    task_table = pa.table({"task_index": pa.array([tasks[t] for t in task_names], pa.int64()),
                           "task": pa.array(task_names, pa.string())})
    task_table = task_table.replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    pq.write_table(task_table, root / TASKS_PATH)
    pq.write_table(pa.Table.from_pylist(episode_rows), root / EPISODES_PATH.format(chunk_index=0, file_index=0))
    n_files = len({(r["data/chunk_index"], r["data/file_index"]) for r in episode_rows})
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
        "total_episodes": len(episode_rows), "total_frames": total_frames, "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": DATA_FILE_SIZE_MB, "video_files_size_in_mb": 200,
        "fps": fps, "splits": {"train": f"0:{len(episode_rows)}"},
        "data_path": DATA_PATH, "video_path": None, "features": features,
    }
    (root / INFO_PATH).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    stats_json = {key: s.as_json(key.startswith(IMAGE_PREFIX), total_frames) for key, s in stats.items()}
    (root / STATS_PATH).write_text(json.dumps(stats_json, indent=2) + "\n", encoding="utf-8")
    rt2_meta = {"token_profile": token_profile, "cameras": [k[len(IMAGE_PREFIX):] for k in features
                                                            if k.startswith(IMAGE_PREFIX)],
                "state_names": list(STATE_NAMES), "action_names": list(ACTION_NAMES), "data_files": n_files}
    (root / RT2_META_PATH).write_text(json.dumps(rt2_meta, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing; is {path.parent.parent} a LeRobot dataset?") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable JSON ({exc})") from None


def _read_parquet(path: Path, columns: list[str] | None = None):
    _, pq = _pa()
    import pyarrow as pa

    if not path.is_file():
        raise DatasetError(f"{path}: missing")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable parquet file with the expected columns ({exc})") from None


def read_info(root: Path) -> dict:
    """``meta/info.json`` of the dataset at ``root``, checked for the layout this module reads."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    info = _read_json(root / INFO_PATH)
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        raise DatasetError(f"{root / INFO_PATH}: codebase_version {version!r}; this reader handles "
                           f"{CODEBASE_VERSION!r} (convert older datasets with lerobot's converter)")
    feats = info.get("features", {})
    missing = [k for k in (STATE_KEY, TOKENS_KEY) if k not in feats]
    if missing:
        raise DatasetError(f"{root / INFO_PATH}: features lack {missing} (an rt2_ros dataset has "
                           f"{STATE_KEY} and {TOKENS_KEY})")
    return info


def read_lerobot(root: Path) -> Iterator[Episode]:
    """The episodes of the LeRobot dataset at ``root`` (as written by :func:`write_lerobot`), in order."""
    root = Path(root)
    info = read_info(root)
    cameras = [k[len(IMAGE_PREFIX):] for k, f in info["features"].items()
               if k.startswith(IMAGE_PREFIX) and f.get("dtype") == "image"]
    ep_files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not ep_files:
        raise DatasetError(f"{root / 'meta' / 'episodes'}: no episode files")
    rows: list[dict] = []
    for path in ep_files:
        rows.extend(_read_parquet(path).to_pylist())
    rows.sort(key=lambda r: r["episode_index"])
    columns = [*(IMAGE_PREFIX + c for c in cameras), STATE_KEY, TOKENS_KEY, "timestamp", "episode_index",
               "frame_index"]
    current: tuple[Path, Any] | None = None
    for row in rows:
        try:
            path = root / info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                   file_index=row["data/file_index"])
            first, last = int(row["dataset_from_index"]), int(row["dataset_to_index"])
        except KeyError as exc:
            raise DatasetError(f"{ep_files[0]}: episode row lacks {exc}") from None
        if current is None or current[0] != path:
            table = _read_parquet(path, [*columns, "index"])
            current = (path, table)
        table = current[1]
        idx = table.column("index").to_numpy()
        start = int(np.searchsorted(idx, first))
        part = table.slice(start, last - first).to_pydict()
        if len(part["index"]) != last - first or (part["index"] and part["index"][0] != first):
            raise DatasetError(f"{path}: frames {first}..{last - 1} of episode {row['episode_index']} are missing")
        frames = []
        for k in range(last - first):
            where = f"{path} row {first + k}"
            images = {c: _unpng((part[IMAGE_PREFIX + c][k] or {}).get("bytes") or b"", f"{where} {c}")
                      for c in cameras}
            frames.append(Frame(images=images, state=np.asarray(part[STATE_KEY][k], np.float32),
                                action_tokens=np.asarray(part[TOKENS_KEY][k], np.int64),
                                timestamp=float(part["timestamp"][k])))
        tasks = row.get("tasks") or [""]
        yield Episode(instruction=tasks[0], success=bool(row.get("success", False)), seed=int(row.get("seed", -1)),
                      frames=frames, perturbation=str(row.get("perturbation") or ""))


# ---------------------------------------------------------------------------------------------- MCAP export
#: recording topic -> dataset camera name
MCAP_CAMERA_TOPICS = {"/camera/image": "camera", "/wrist_camera/image": "wrist_camera"}
# An action's observation_stamp went through a float (seconds) in the nodes: ~240 ns resolution at today's epoch
# times; camera frames are >= 33 ms apart, so 1 ms tells them apart safely.
STAMP_MATCH_NS = 1_000_000
MCAP_REQUIRED_TOPICS = ("/rt2_policy/action_tokens", "/arm_action", "/camera/image", "/ee_pose")


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def _nearest(times: np.ndarray, t: int, tolerance: int) -> int | None:
    """The entry of sorted ``times`` closest to ``t`` if within ``tolerance``, else None."""
    k = int(np.searchsorted(times, t))
    near = [int(times[i]) for i in (k - 1, k) if 0 <= i < len(times)]
    best = min(near, key=lambda v: abs(v - t), default=None)
    return best if best is not None and abs(best - t) <= tolerance else None


def _latest_at(times: np.ndarray, t: int) -> int | None:
    """Index of the last entry of sorted ``times`` at or before ``t`` (None if there is none)."""
    k = int(np.searchsorted(times, t, side="right")) - 1
    return k if k >= 0 else None


def _mcap_episodes(path: Path, instruction: str | None, success: bool, image_size: int | None
                   ) -> tuple[list[Episode], int]:
    """The episodes of one rt2-record file and the number of policy steps left out (no camera frame)."""
    from rt2_ros.recording import RecordingReadError, iter_messages, read_metadata, read_topics

    try:
        topics = read_topics(path)
    except RecordingReadError as exc:
        raise DatasetError(str(exc)) from None
    missing = [t for t in MCAP_REQUIRED_TOPICS if t not in topics]
    if missing:
        raise DatasetError(f"{path}: no {', '.join(missing)} recorded; export needs the policy's replies "
                           f"({MCAP_REQUIRED_TOPICS[0]}, {MCAP_REQUIRED_TOPICS[1]}), the camera and /ee_pose: "
                           f"record with rt2-record's default topics")
    cameras = {t: c for t, c in MCAP_CAMERA_TOPICS.items() if t in topics}
    tokens: dict[int, list[int]] = {}  # observation_seq -> bins
    actions: list[tuple[int, int, bytes]] = []  # (observation_seq, observation stamp ns, episode id) in order
    instructions: dict[bytes, str] = {}
    poses: list[tuple[int, list[float]]] = []  # (stamp ns, pose)
    grippers: list[tuple[int, float]] = []  # (log time ns, commanded closedness)
    topic_instruction = ""
    try:
        for m in iter_messages(path, [t for t in topics if t not in cameras]):
            msg = m.message
            if m.topic == "/rt2_policy/action_tokens" and len(msg.tokens):
                tokens[int(msg.observation_seq)] = [int(b) for b in msg.tokens]
            elif m.topic == "/arm_action":
                actions.append((int(msg.observation_seq), _stamp_ns(msg.observation_stamp), bytes(msg.episode_id.uuid)))
            elif m.topic == "/episode" and msg.active:
                instructions.setdefault(bytes(msg.episode_id.uuid), msg.instruction)
            elif m.topic == "/instruction":
                topic_instruction = msg.data
            elif m.topic == "/ee_pose":
                p, q = msg.pose.position, msg.pose.orientation
                poses.append((_stamp_ns(msg.header.stamp), [p.x, p.y, p.z, q.w, q.x, q.y, q.z]))
            elif m.topic == "/gripper_command":
                grippers.append((m.log_time_ns, float(msg.data)))
    except RecordingReadError as exc:
        raise DatasetError(str(exc)) from None
    steps = [(seq, stamp, ep) for seq, stamp, ep in actions if seq in tokens and stamp > 0]
    if not steps:
        raise DatasetError(f"{path}: no policy step with action tokens and a camera stamp (continuous-action "
                           f"backends record no tokens)")
    wanted = np.unique(np.array([stamp for _, stamp, _ in steps], np.int64))
    frames_by_camera: dict[str, dict[int, np.ndarray]] = {c: {} for c in cameras.values()}
    # the one sensor_msgs/Image decoder of the project (its module imports rclpy, as a recording's owner has it)
    from rt2_ros.nodes.common import ImageConversionError, image_msg_to_rgb

    try:
        for m in iter_messages(path, list(cameras)):
            stamp = _nearest(wanted, _stamp_ns(m.message.header.stamp), STAMP_MATCH_NS)
            if stamp is not None:
                img = image_msg_to_rgb(m.message)
                if image_size:
                    img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
                frames_by_camera[cameras[m.topic]][stamp] = img
    except (RecordingReadError, ImageConversionError) as exc:
        raise DatasetError(f"{path}: {exc}") from None
    params = _recorded_gripper_range(read_metadata(path))
    pose_t = np.array([t for t, _ in poses], np.int64)
    grip_t = np.array([t for t, _ in grippers], np.int64)
    episodes: list[Episode] = []
    skipped = 0
    for ep_id in dict.fromkeys(ep for _, _, ep in steps):
        frames: list[Frame] = []
        t0 = None
        for seq, stamp, ep in steps:
            if ep != ep_id:
                continue
            images = {c: f[stamp] for c, f in frames_by_camera.items() if stamp in f}
            k = _latest_at(pose_t, stamp) if len(pose_t) else None
            if len(images) != len(frames_by_camera) or k is None:
                skipped += 1  # the camera frame was not recorded (rate-limited) or no pose yet
                continue
            g = _latest_at(grip_t, stamp)  # log time: the clock the nodes stamp with if len(grip_t) else None
            closedness = 0.0 if g is None else _closedness(grippers[g][1], params)
            t0 = stamp if t0 is None else t0
            frames.append(Frame(images=images, state=np.asarray([*poses[k][1], closedness], np.float32),
                                action_tokens=np.asarray(tokens[seq], np.int64), timestamp=(stamp - t0) * 1e-9))
        if frames:
            text = instruction or instructions.get(ep_id) or topic_instruction
            if not text:
                raise DatasetError(f"{path}: no instruction recorded (/episode, /instruction); pass one")
            episodes.append(Episode(text, success, -1, frames, info={"source": str(path)}))
    if not episodes:
        raise DatasetError(f"{path}: none of the {len(steps)} policy steps has its camera frame recorded "
                           f"(was rt2-record rate-limiting /camera/image?)")
    return episodes, skipped


def _recorded_gripper_range(meta: Mapping[str, Mapping[str, str]]) -> tuple[float, float]:
    """(open, closed) values of /gripper_command from the recorded safety parameters (defaults 0, 1)."""
    from rt2_ros.recording import META_PARAMS

    params = meta.get(META_PARAMS, {})
    try:
        return (float(json.loads(params.get("output.gripper_open_value", "0.0"))),
                float(json.loads(params.get("output.gripper_closed_value", "1.0"))))
    except (TypeError, ValueError):
        return 0.0, 1.0


def _closedness(value: float, open_closed: tuple[float, float]) -> float:
    lo, hi = open_closed
    return float(np.clip((value - lo) / (hi - lo), 0.0, 1.0)) if hi != lo else 0.0


def export_mcap(mcap_paths: Path | Iterable[Path], root: Path, fps: float = 10.0, *, instruction: str | None = None,
                success: bool = False, image_size: int | None = None, token_profile: str = "rt2",
                overwrite: bool = False, notes: list[str] | None = None) -> Path:
    """Export ``rt2-record`` MCAP files (each may hold several episodes) to a LeRobot dataset at ``root``.

    One frame per executed policy step: the action tokens of the reply (``/rt2_policy/action_tokens``),
    the camera frames it answered (``/arm_action``'s observation stamp = the image stamps of
    ``/camera/image`` and, when recorded, ``/wrist_camera/image``), the latest ``/ee_pose`` at that stamp
    and the last ``/gripper_command`` as the gripper closedness (a real arm's measured gripper is not
    recorded). A step whose camera frame was not recorded is left out (rt2-record's image rate limit).
    ``instruction`` overrides the recorded one; ``success`` is every episode's flag (a recording does
    not know); ``image_size`` resizes the frames to a square size. ``notes`` (a list) receives one line
    per file: episodes, frames and steps left out.
    """
    paths = [Path(mcap_paths)] if isinstance(mcap_paths, (str, Path)) else [Path(p) for p in mcap_paths]
    if not paths:
        raise DatasetError("no MCAP files given")
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{p}: no such recording")
    episodes: list[Episode] = []
    for p in paths:
        found, skipped = _mcap_episodes(p, instruction, success, image_size)
        episodes.extend(found)
        if notes is not None:
            notes.append(f"{p}: {len(found)} episode(s), {sum(len(e.frames) for e in found)} frames"
                         + (f", {skipped} policy steps left out (camera frame not recorded)" if skipped else ""))
    return write_lerobot(episodes, root, fps, token_profile=token_profile, robot_type="rt2_ros recording",
                         overwrite=overwrite)


__all__ = ["CAMERA_NAMES", "DatasetError", "Episode", "Frame", "export_mcap", "read_info", "read_lerobot",
           "write_lerobot"]
