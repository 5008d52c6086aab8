"""Episodes of RT-2 action tokens in the LeRobot dataset format (on-disk layout v3.0), and back.

What users fine-tune on today is a LeRobot dataset: ``meta/info.json`` (features, fps, path
patterns), ``meta/tasks.parquet`` (instruction -> task_index), ``meta/episodes/chunk-XXX/file-YYY.parquet``
(one row per episode: length, task, where its frames are), ``meta/stats.json`` (normalisation
statistics) and ``data/chunk-XXX/file-YYY.parquet`` (one row per frame). This module writes that
layout with pyarrow and reads it back; ``lerobot``'s own ``LeRobotDataset`` loads what it writes
(checked with lerobot 0.6.1; docs/learn.md). Rejected: ``lerobot`` itself as the writer — it pins
torch < 2.12 (the project's ``local`` backend pins torch 2.13) and pulls in ~3 GB of CUDA wheels,
for what is a documented file layout.

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


__all__ = ["CAMERA_NAMES", "DatasetError", "Episode", "Frame", "read_info", "read_lerobot", "write_lerobot"]
