"""Published action-token conventions (RT-2, RT-1, OpenVLA) as data, plus their bin arithmetic.

Why a separate module: :mod:`rt2_ros.tokens` parses and validates model answers and converts
between model units and the canonical :class:`~rt2_ros.actions.ArmAction`; what differs between
models (dimension order, ranges, binning rule, terminate coding, gripper sign, prompt) lives
here as frozen data, so adding a model is a new :class:`Profile`, never a code edit elsewhere.

Two binning rules exist in the literature and both are reproduced exactly:

* ``edges`` (RT-1, reused by RT-2): ``bin = int((clip(a) - low) / (high - low) * (n_bins - 1))``;
  decoded to the lower bin edge ``bin / (n_bins - 1) * (high - low) + low``. Because it truncates,
  ``decode(encode(a))`` is up to one bin step below ``a`` (never above).
* ``centres`` (OpenVLA): ``digitize(clip(a), linspace(low, high, n_bins))`` gives 1..n_bins; we store
  ``bin = digitize - 1`` (0..n_bins-1) and decode to the centre of the bin, with the last bin
  (reached only at exactly ``high``) sharing the centre of the one below, as OpenVLA does. The
  round-trip error is at most half a bin.

Rejected: re-deriving these from model configs at run time (needs the model's code), and a
single "improved" rule (silently wrong for every checkpoint trained with the published one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rt2_ros.params import ConfigError

#: the 7 motion dimensions, in model order, shared by every profile
MOTION_DIMS: tuple[str, ...] = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

# A value this close (in bins) below a bin edge counts as on the edge: decoded bin edges then
# re-encode to themselves despite floating-point round-off (RT-1's int() would otherwise drop
# e.g. 191/255*2-1 to bin 190). 1e-6 of a bin is far below any physical resolution.
_EDGE_TOLERANCE_BINS = 1e-6


@dataclass(frozen=True)
class Profile:
    """One model family's action-token convention (ranges in model units)."""

    name: str
    dim_names: tuple[str, ...]
    low: tuple[float, ...]  # per dimension, model units (terminate entry unused)
    high: tuple[float, ...]
    binning: str  # "edges" (RT-1/RT-2) or "centres" (OpenVLA)
    terminate_bin: int | None  # bin value meaning "terminate the episode"; None = no terminate dim
    continue_bin: int | None  # bin value meaning "keep going"
    gripper_convention: str  # key of GRIPPER_CONVENTIONS
    translation_scale_m: float  # default metres per model unit
    rotation_scale_rad: float  # default radians per model unit
    prompt_template: str  # "{instruction}" is replaced by the task
    lowercase_instruction: bool
    summary: str  # one line for docs and --help

    @property
    def has_terminate(self) -> bool:
        return self.terminate_bin is not None


_HALF_PI = math.pi / 2
_RT_LOW = (0.0, -1.0, -1.0, -1.0, -_HALF_PI, -_HALF_PI, -_HALF_PI, -1.0)
_RT_HIGH = (1.0, 1.0, 1.0, 1.0, _HALF_PI, _HALF_PI, _HALF_PI, 1.0)
_RT_DIMS = ("terminate", *MOTION_DIMS)
_RT2_PROMPT = "Q: what action should the robot take to {instruction}? A:"

PROFILES: dict[str, Profile] = {
    "rt2": Profile(
        name="rt2", dim_names=_RT_DIMS, low=_RT_LOW, high=_RT_HIGH, binning="edges",
        terminate_bin=1, continue_bin=0, gripper_convention="minus1_open",
        translation_scale_m=0.02, rotation_scale_rad=0.1,
        prompt_template=_RT2_PROMPT, lowercase_instruction=False,
        summary="RT-2 (PaLI-X / PaLM-E): 8 tokens, first = terminate (1) / continue (0); RT-1 binning",
    ),
    "rt1": Profile(
        name="rt1", dim_names=_RT_DIMS, low=_RT_LOW, high=_RT_HIGH, binning="edges",
        # terminate_episode is a 3-class one-hot tokenized by argmax; class 0 = terminate
        # (consumers test terminate_episode[0]), class 1 = continue (arm mode); class 2
        # (mobile-base mode) is not an arm action and is rejected as out of range.
        terminate_bin=0, continue_bin=1, gripper_convention="minus1_open",
        translation_scale_m=0.02, rotation_scale_rad=0.1,
        prompt_template=_RT2_PROMPT, lowercase_instruction=False,
        summary="RT-1 tokenizer: 8 tokens, terminate class 0 = terminate / 1 = continue; edge binning",
    ),
    "openvla": Profile(
        name="openvla", dim_names=MOTION_DIMS, low=(-1.0,) * 7, high=(1.0,) * 7, binning="centres",
        terminate_bin=None, continue_bin=None, gripper_convention="one_open_zero_closed",
        # 1.0 when dataset statistics un-normalise into dataset units (m, rad); see
        # ActionTokenizer for the no-statistics fallback.
        translation_scale_m=1.0, rotation_scale_rad=1.0,
        prompt_template="In: What action should the robot take to {instruction}?\nOut:", lowercase_instruction=True,
        summary="OpenVLA: 7 tokens (last 256 vocabulary ids), bin centres, q01/q99 un-normalisation",
    ),
}

#: scales used when a profile's values stay normalised (no dataset statistics)
NORMALISED_TRANSLATION_SCALE_M = 0.02
NORMALISED_ROTATION_SCALE_RAD = 0.1


def encode_bins(values: np.ndarray, low: np.ndarray, high: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """Model-unit ``values`` -> int64 bins in [0, n_bins) (values are clipped to [low, high] first)."""
    clipped = np.clip(values, low, high)
    if binning == "edges":
        scaled = (clipped - low) / (high - low) * (n_bins - 1)
        return np.clip(np.floor(scaled + _EDGE_TOLERANCE_BINS), 0, n_bins - 1).astype(np.int64)
    # centres: np.digitize against linspace(low, high, n_bins), per dimension, minus one
    out = np.empty(clipped.shape, dtype=np.int64)
    for i, v in enumerate(clipped):
        edges = np.linspace(low[i], high[i], n_bins)
        out[i] = np.digitize(v, edges) - 1
    return np.clip(out, 0, n_bins - 1)


def decode_bins(bins: np.ndarray, low: np.ndarray, high: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    """int bins -> model-unit values (lower edges for ``edges``, centres for ``centres``)."""
    b = bins.astype(np.float64)
    if binning == "edges":
        return b / (n_bins - 1) * (high - low) + low
    # centre of bin k (between edges k and k+1); bin n_bins-1 shares the last centre
    step = (high - low) / (n_bins - 1)
    return low + (np.minimum(b, n_bins - 2) + 0.5) * step


def bin_step(low: np.ndarray, high: np.ndarray, n_bins: int) -> np.ndarray:
    """Width of one bin per dimension, model units."""
    return (np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)) / (n_bins - 1)


# --- gripper conventions: model value g <-> closedness c in [0, 1] (0 open, 1 closed) ----------
GRIPPER_CONVENTIONS: dict[str, tuple[Callable[[float], float], Callable[[float], float], str]] = {
    "minus1_open": (lambda g: (g + 1.0) / 2.0, lambda c: 2.0 * c - 1.0, "g in [-1, 1]: -1 open, +1 closed (RT-1)"),
    "plus1_open": (lambda g: (1.0 - g) / 2.0, lambda c: 1.0 - 2.0 * c, "g in [-1, 1]: +1 open, -1 closed"),
    "one_open_zero_closed": (lambda g: 1.0 - g, lambda c: 1.0 - c, "g in [0, 1]: 1 open, 0 closed (OpenVLA)"),
    "zero_open_one_closed": (lambda g: g, lambda c: c, "g in [0, 1]: 0 open, 1 closed"),
}


@dataclass(frozen=True)
class DatasetStatistics:
    """OpenVLA-style per-dimension action statistics used to un-normalise [-1, 1] outputs."""

    key: str
    q01: np.ndarray  # (7,)
    q99: np.ndarray
    mask: np.ndarray  # bool (7,): True = dimension was normalised in training

    def unnormalise(self, n: np.ndarray) -> np.ndarray:
        """OpenVLA: ``a = 0.5 * (n + 1) * (q99 - q01) + q01`` where mask, else ``n``."""
        return np.where(self.mask, 0.5 * (n + 1.0) * (self.q99 - self.q01) + self.q01, n)

    def normalise(self, a: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`unnormalise` (a degenerate q01 == q99 dimension maps to 0)."""
        span = self.q99 - self.q01
        safe = np.where(span > 0, span, 1.0)
        n = np.where(span > 0, 2.0 * (a - self.q01) / safe - 1.0, 0.0)
        return np.where(self.mask, n, a)

    @classmethod
    def load(cls, path: str, key: str, n_dims: int) -> DatasetStatistics:
        """Read ``{key: {"action": {"q01": [...], "q99": [...], "mask": [...]}}}`` from ``path``.

        ``key`` may be empty when the file holds exactly one dataset. Errors name the parameter.
        """
        where = "tokenizer.dataset_statistics"
        try:
            tree = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: file {path!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read {path!r} as JSON: {exc}") from None
        if not isinstance(tree, dict) or not tree:
            raise ConfigError(f"{where}: {path!r} must be a JSON object of dataset keys")
        if not key:
            if len(tree) != 1:
                raise ConfigError(f"tokenizer.unnorm_key: {path!r} holds {len(tree)} datasets; "
                                  f"set one of {sorted(tree)}")
            key = next(iter(tree))
        if key not in tree:
            raise ConfigError(f"tokenizer.unnorm_key: {key!r} is not in {path!r}; choose one of {sorted(tree)}")
        action = tree[key].get("action") if isinstance(tree[key], dict) else None
        if not isinstance(action, dict):
            raise ConfigError(f"{where}: {path!r}[{key!r}] has no \"action\" statistics")
        q01 = _stat_array(action, "q01", n_dims, path, key)
        q99 = _stat_array(action, "q99", n_dims, path, key)
        mask = np.asarray(action.get("mask", [True] * n_dims))
        if mask.shape != (n_dims,) or mask.dtype != np.bool_:
            raise ConfigError(f"{where}: {path!r}[{key!r}].action.mask must be {n_dims} booleans")
        if np.any(q99 < q01):
            raise ConfigError(f"{where}: {path!r}[{key!r}].action has q99 < q01")
        return cls(key=key, q01=q01, q99=q99, mask=mask)


def _stat_array(action: dict, name: str, n_dims: int, path: str, key: str) -> np.ndarray:
    try:
        arr = np.asarray(action[name], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"tokenizer.dataset_statistics: {path!r}[{key!r}].action.{name} missing or "
                          "not numeric") from None
    if arr.shape != (n_dims,) or not np.all(np.isfinite(arr)):
        raise ConfigError(f"tokenizer.dataset_statistics: {path!r}[{key!r}].action.{name} must be "
                          f"{n_dims} finite numbers, got shape {arr.shape}")
    return arr
