"""Action tokens <-> canonical ArmAction: parse, validate, detokenize, tokenize.

Why this module exists: a VLA answers with 7-8 integers (as number text such as
``"1 128 91 241 5 101 127 217"``, as chain-of-thought ``"Plan: ... Action: 1 128 ..."``, or as
vocabulary ids), and every model family packs them differently. This is the one place that
turns any of those into an :class:`~rt2_ros.actions.ArmAction` in canonical units (metres,
rotation vector in radians, gripper closedness 0..1), and it does so *strictly*: a wrong count,
a fraction, a NaN, an out-of-range bin, trailing text or an unknown id raises :class:`TokenError`
with a ``reason`` the policy node counts, so nothing malformed ever reaches the arm.

Everything that differs between models is configuration (``tokenizer.*`` ParamSpecs below):
profile (rt2 | rt1 | openvla, see :mod:`rt2_ros.token_profiles`), per-dimension ranges, scale
from model units to m / rad, rotation as roll-pitch-yaw or axis-angle, gripper sign and
absolute / relative gripper, dataset statistics for OpenVLA, vocabulary id map, prompt.

Rejected: lenient parsing that "repairs" answers (clipping 256 to 255, dropping junk, reading
"12.5" as 12) - a model that emits junk must hold the arm, not move it somewhere nearby; and
regex-only validation - the regex from :meth:`ActionTokenizer.text_regex` is offered to
constrained decoders, but parsing classifies each failure so operators see *why*.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transforms3d.euler import euler2quat, quat2euler

from rt2_ros.actions import ArmAction, BackendReply
from rt2_ros.params import ConfigError, ParamSpec, resolve
from rt2_ros.token_profiles import (
    GRIPPER_CONVENTIONS,
    MOTION_DIMS,
    NORMALISED_ROTATION_SCALE_RAD,
    NORMALISED_TRANSLATION_SCALE_M,
    PROFILES,
    DatasetStatistics,
    Profile,
    decode_bins,
    encode_bins,
)

#: every reason a TokenError can carry (the policy node counts rejections per reason)
TOKEN_ERROR_REASONS: tuple[str, ...] = (
    "empty", "wrong_count", "non_integer", "out_of_range", "non_finite", "trailing_junk", "mixed_forms",
    "unknown_id",
    # additions to the common contract:
    "non_numeric",  # a continuous action row holds something that is not a number
    "gripper_mode",  # encode(): action.gripper_relative does not match tokenizer.gripper_mode
)


class TokenError(ValueError):
    """A model answer (or an action to encode) is malformed.

    ``reason`` is one of :data:`TOKEN_ERROR_REASONS`; ``str(err)`` is a one-line message
    ``"<reason>: <what was wrong>"``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ParsedAnswer:
    """A validated number-text answer."""

    bins: np.ndarray  # (n_dims,) int64, each a legal bin of its dimension
    plan: str  # chain-of-thought plan text ("" when the answer had none)
    text: str  # the raw answer as received


_PROFILE_NAMES = tuple(PROFILES)

TOKENIZER_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("tokenizer.profile", "string", "rt2",
              "Action-token convention: rt2 (8 tokens, terminate first), rt1 (RT-1 tokenizer), "
              "openvla (7 tokens, last 256 vocabulary ids, dataset un-normalisation)", choices=_PROFILE_NAMES),
    ParamSpec("tokenizer.token_form", "string", "text",
              "What the model emits: text = numbers as text (PaLI-X style, optional 'Plan: ... Action: ...'); "
              "ids = vocabulary token ids mapped to bins (PaLM-E / OpenVLA style)", choices=("text", "ids")),
    ParamSpec("tokenizer.n_bins", "int", 256, "Bins per dimension (all published profiles use 256)",
              "bins", low=2, high=65536),
    ParamSpec("tokenizer.vocab_size", "int", 32000,
              "Model vocabulary size; the default id map uses its last n_bins ids, bin b <-> id vocab_size-1-b "
              "(OpenVLA on Llama-2: 32000)", "ids", low=2, high=10_000_000),
    ParamSpec("tokenizer.token_ids", "int_array", [],
              "Explicit id map, entry b = vocabulary id of bin b (n_bins entries, e.g. PaLM-E's least-used "
              "tokens); empty = last n_bins ids of the vocabulary", "ids", low=0),
    ParamSpec("tokenizer.low", "double_array", [],
              "Lower bound of each dimension in model units, n_dims entries in profile order (terminate entry "
              "ignored); empty = profile default", "model units"),
    ParamSpec("tokenizer.high", "double_array", [],
              "Upper bound of each dimension in model units (see tokenizer.low); empty = profile default",
              "model units"),
    ParamSpec("tokenizer.continuous_low", "double_array", [],
              "Lowest accepted value of each of the 7 motion values of a continuous action row (OpenVLA / openpi "
              "servers), in the units the server returns; a row outside is rejected (out_of_range), never clipped "
              "into a full step; empty = the profile's range (tokenizer.low, un-normalised with dataset "
              "statistics)", "model units"),
    ParamSpec("tokenizer.continuous_high", "double_array", [],
              "Highest accepted value of each continuous motion value (see tokenizer.continuous_low)",
              "model units"),
    ParamSpec("tokenizer.translation_scale_m", "double", 0.0,
              "Metres per model unit of dx, dy, dz; 0 = profile default (rt2/rt1: 0.02; openvla: 1.0 with "
              "dataset statistics, 0.02 without)", "m/unit", low=0.0, high=1.0),
    ParamSpec("tokenizer.rotation_scale_rad", "double", 0.0,
              "Radians per model unit of droll, dpitch, dyaw; 0 = profile default (rt2/rt1: 0.1; openvla: 1.0 "
              "with dataset statistics, 0.1 without)", "rad/unit", low=0.0, high=10.0),
    ParamSpec("tokenizer.rotation_convention", "string", "rpy",
              "How the model's 3 rotation values are meant: rpy = roll, pitch, yaw about static x, y, z "
              "(sxyz); axis_angle = rotation vector (axis * angle)", choices=("rpy", "axis_angle")),
    ParamSpec("tokenizer.gripper_convention", "string", "auto",
              "Model gripper value g -> closedness: minus1_open (-1 open, +1 closed; RT-1), plus1_open, "
              "one_open_zero_closed (OpenVLA), zero_open_one_closed; auto = profile default",
              choices=("auto", *GRIPPER_CONVENTIONS)),
    ParamSpec("tokenizer.gripper_mode", "string", "absolute",
              "absolute = gripper value is a target closedness; relative = a change of closedness "
              "(ArmAction.gripper_relative, delta in [-1, 1])", choices=("absolute", "relative")),
    ParamSpec("tokenizer.terminate_bin", "int", -1,
              "Bin of the terminate dimension that means 'terminate'; -1 = profile default (rt2: 1, rt1: 0)",
              "bin", low=-1, high=65535),
    ParamSpec("tokenizer.continue_bin", "int", -1,
              "Bin of the terminate dimension that means 'continue'; -1 = profile default (rt2: 0, rt1: 1); "
              "any other value is rejected as out_of_range", "bin", low=-1, high=65535),
    ParamSpec("tokenizer.dataset_statistics", "string", "",
              "openvla only: path of an OpenVLA dataset_statistics.json ({key: {action: {q01, q99, mask}}}); "
              "empty = no un-normalisation (values stay in [-1, 1])", "path"),
    ParamSpec("tokenizer.unnorm_key", "string", "",
              "openvla only: dataset key in tokenizer.dataset_statistics (e.g. bridge_orig); empty = the "
              "file's only key"),
    ParamSpec("tokenizer.prompt_template", "string", "",
              "Prompt with {instruction} where the task goes; empty = profile default (rt2/rt1: 'Q: what "
              "action should the robot take to {instruction}? A:')"),
)

_PREFIX = "tokenizer."
# A number token: optional minus, ASCII digits only (int() alone would accept '٣', '1_0', ' 5').
_INT_TOKEN = re.compile(r"-?[0-9]+")
_NON_FINITE_TOKENS = frozenset({"nan", "inf", "infinity"})
# The last number with junk glued on ("8</s>", "8."), but not a number continued ("8.5", "8e2").
_GLUED_JUNK = re.compile(r"-?[0-9]+(?![0-9]|\.[0-9]|[eE][-+]?[0-9]).+", re.DOTALL)
_MARKER = re.compile(r"\b(plan|action)\s*:", re.IGNORECASE)
_MAX_TOKEN_DIGITS = 9  # the largest n_bins is 65536: a longer number can only be out of range
_MAX_RANGE = 1e6  # model units; wider tokenizer ranges are configuration mistakes


# --- rotations ---------------------------------------------------------------------------------

def rpy_to_rotvec(rpy: np.ndarray) -> np.ndarray:
    """Roll, pitch, yaw (static x, y, z axes, rad) -> rotation vector (rad)."""
    w, x, y, z = euler2quat(float(rpy[0]), float(rpy[1]), float(rpy[2]), "sxyz")
    if w < 0:  # same rotation, angle in [0, pi]
        w, x, y, z = -w, -x, -y, -z
    v = np.array([x, y, z], dtype=np.float64)
    s = float(np.linalg.norm(v))
    if s == 0.0:
        return np.zeros(3)
    # atan2, not transforms3d's acos(w): keeps full relative precision for small angles
    return v / s * (2.0 * math.atan2(s, w))


def rotvec_to_rpy(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vector (rad) -> roll, pitch, yaw (static x, y, z axes, rad)."""
    r = np.asarray(rotvec, dtype=np.float64)
    angle = float(np.linalg.norm(r))
    if angle == 0.0:
        return np.zeros(3)
    quat = np.concatenate([[math.cos(angle / 2)], r / angle * math.sin(angle / 2)])
    return np.asarray(quat2euler(quat, "sxyz"), dtype=np.float64)


# --- regex helpers -----------------------------------------------------------------------------

def _uint_regex(max_value: int) -> str:
    """Regex for the integers 0..max_value written without leading zeros."""
    top = str(max_value)
    parts: list[str] = []
    for length in range(len(top), 0, -1):  # longest first
        if length < len(top):
            parts.append("[0-9]" if length == 1 else "[1-9]" + ("[0-9]" if length == 2 else f"[0-9]{{{length - 1}}}"))
            continue
        for i, digit in enumerate(top):  # numbers of the same length as top, <= top
            lo = 0 if (i > 0 or length == 1) else 1
            hi = int(digit) - (0 if i == length - 1 else 1)
            if hi < lo:
                continue
            rest = length - 1 - i
            cls = str(lo) if lo == hi else f"[{lo}-{hi}]"
            tail = "" if rest == 0 else ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}")
            parts.append(top[:i] + cls + tail)
    return "(?:" + "|".join(parts) + ")"


class ActionTokenizer:
    """Converts between model answers (bins, text, ids, continuous rows) and ArmAction.

    Build it with :meth:`from_config` (flat ``tokenizer.*`` dict, as in the params YAML) or
    :meth:`from_profile`. Instances are immutable after construction and thread-safe.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """``cfg``: flat ``tokenizer.*`` values; validated here, errors raise ConfigError naming the key."""
        c = resolve(TOKENIZER_PARAMS, {k: v for k, v in cfg.items() if k.startswith(_PREFIX)})
        self.config: dict[str, Any] = c
        spec: Profile = PROFILES[c["tokenizer.profile"]]
        self.profile: str = spec.name
        self.dim_names: tuple[str, ...] = spec.dim_names
        self.n_dims: int = len(spec.dim_names)
        self.n_bins: int = c["tokenizer.n_bins"]
        self.has_terminate: bool = spec.has_terminate
        self.token_form: str = c["tokenizer.token_form"]
        self.binning: str = spec.binning
        self.vocab_size: int = c["tokenizer.vocab_size"]

        self.low, self.high = self._ranges(spec, c)
        self.terminate_bin, self.continue_bin = self._terminate_bins(spec, c)
        self.statistics: DatasetStatistics | None = self._statistics(spec, c)
        physical = spec.name != "openvla" or self.statistics is not None
        self.translation_scale_m: float = c["tokenizer.translation_scale_m"] or (
            spec.translation_scale_m if physical else NORMALISED_TRANSLATION_SCALE_M)
        self.rotation_scale_rad: float = c["tokenizer.rotation_scale_rad"] or (
            spec.rotation_scale_rad if physical else NORMALISED_ROTATION_SCALE_RAD)
        self.rotation_convention: str = c["tokenizer.rotation_convention"]
        self.gripper_convention: str = (spec.gripper_convention if c["tokenizer.gripper_convention"] == "auto"
                                        else c["tokenizer.gripper_convention"])
        self.gripper_relative: bool = c["tokenizer.gripper_mode"] == "relative"
        self.prompt_template: str = c["tokenizer.prompt_template"] or spec.prompt_template
        if "{instruction}" not in self.prompt_template:
            raise ConfigError("tokenizer.prompt_template: must contain '{instruction}'")
        self._lowercase_instruction = spec.lowercase_instruction and not c["tokenizer.prompt_template"]
        self._bin_to_id, self._id_to_bin = self._id_map(c)
        self._motion = slice(1, None) if self.has_terminate else slice(None)
        self.continuous_low, self.continuous_high = self._continuous_ranges(c)

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ActionTokenizer:
        """From flat ``tokenizer.*`` keys (other keys are ignored); raises ConfigError."""
        return cls(cfg)

    @classmethod
    def from_profile(cls, profile: str = "rt2", **overrides: Any) -> ActionTokenizer:
        """Convenience: ``from_profile("openvla", vocab_size=32064)`` (keys with or without ``tokenizer.``)."""
        cfg = {"tokenizer.profile": profile}
        cfg.update({k if k.startswith(_PREFIX) else _PREFIX + k: v for k, v in overrides.items()})
        return cls(cfg)

    def _ranges(self, spec: Profile, c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        bounds = []
        for which, default in (("low", spec.low), ("high", spec.high)):
            given = c[f"tokenizer.{which}"]
            if given and len(given) != self.n_dims:
                raise ConfigError(f"tokenizer.{which}: expected {self.n_dims} values "
                                  f"({', '.join(self.dim_names)}), got {len(given)}")
            bounds.append(np.asarray(given or default, dtype=np.float64))
        low, high = bounds
        first = 1 if spec.has_terminate else 0
        for i in range(first, self.n_dims):
            if not low[i] < high[i]:
                raise ConfigError(f"tokenizer.low/high: {self.dim_names[i]} needs low < high, "
                                  f"got [{low[i]}, {high[i]}]")
            if max(abs(low[i]), abs(high[i])) > _MAX_RANGE:
                # beyond this, bin arithmetic overflows (high - low = inf) and every decode would fail
                raise ConfigError(f"tokenizer.low/high: {self.dim_names[i]} range [{low[i]:g}, {high[i]:g}] "
                                  f"exceeds +-{_MAX_RANGE:g} model units")
        return low, high

    def _continuous_ranges(self, c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        m = self._motion
        low, high = self.low[m].copy(), self.high[m].copy()
        if self.statistics is not None:
            low, high = self.statistics.unnormalise(low), self.statistics.unnormalise(high)
        for which, default in (("low", low), ("high", high)):
            given = c[f"tokenizer.continuous_{which}"]
            if given and len(given) != len(MOTION_DIMS):
                raise ConfigError(f"tokenizer.continuous_{which}: expected {len(MOTION_DIMS)} values "
                                  f"({', '.join(MOTION_DIMS)}), got {len(given)}")
            if given:
                default[:] = given
        for name, lo, hi in zip(MOTION_DIMS, low, high, strict=True):
            if not lo < hi:
                raise ConfigError(f"tokenizer.continuous_low/high: {name} needs low < high, got [{lo}, {hi}]")
        return np.minimum(low, high), np.maximum(low, high)

    def _terminate_bins(self, spec: Profile, c: dict[str, Any]) -> tuple[int | None, int | None]:
        if not spec.has_terminate:
            for key in ("tokenizer.terminate_bin", "tokenizer.continue_bin"):
                if c[key] != -1:
                    raise ConfigError(f"{key}: profile {spec.name} has no terminate dimension; leave it at -1")
            return None, None
        term = spec.terminate_bin if c["tokenizer.terminate_bin"] == -1 else c["tokenizer.terminate_bin"]
        cont = spec.continue_bin if c["tokenizer.continue_bin"] == -1 else c["tokenizer.continue_bin"]
        for key, value in (("tokenizer.terminate_bin", term), ("tokenizer.continue_bin", cont)):
            if value >= self.n_bins:
                raise ConfigError(f"{key}: {value} is not a bin (n_bins = {self.n_bins})")
        if term == cont:
            raise ConfigError(f"tokenizer.terminate_bin/continue_bin: both are {term}; they must differ")
        return term, cont

    def _statistics(self, spec: Profile, c: dict[str, Any]) -> DatasetStatistics | None:
        path, key = c["tokenizer.dataset_statistics"], c["tokenizer.unnorm_key"]
        if spec.name != "openvla":
            for name, value in (("tokenizer.dataset_statistics", path), ("tokenizer.unnorm_key", key)):
                if value:
                    raise ConfigError(f"{name}: only used by profile openvla (profile is {spec.name})")
            return None
        if not path:
            if key:
                raise ConfigError("tokenizer.unnorm_key: set tokenizer.dataset_statistics too")
            return None
        return DatasetStatistics.load(path, key, len(MOTION_DIMS))

    def _id_map(self, c: dict[str, Any]) -> tuple[np.ndarray, dict[int, int]]:
        ids = c["tokenizer.token_ids"]
        if ids:
            if len(ids) != self.n_bins:
                raise ConfigError(f"tokenizer.token_ids: expected {self.n_bins} ids (one per bin), got {len(ids)}")
            if len(set(ids)) != len(ids):
                raise ConfigError("tokenizer.token_ids: ids must be distinct")
            if max(ids) >= self.vocab_size:
                raise ConfigError(f"tokenizer.token_ids: id {max(ids)} >= tokenizer.vocab_size {self.vocab_size}; "
                                  "set tokenizer.vocab_size to the model's vocabulary size")
            table = np.asarray(ids, dtype=np.int64)
        else:
            if self.vocab_size < self.n_bins:
                raise ConfigError(f"tokenizer.vocab_size: {self.vocab_size} < n_bins {self.n_bins}")
            # OpenVLA: token id = vocab_size - digitize(a) = vocab_size - 1 - bin
            table = self.vocab_size - 1 - np.arange(self.n_bins, dtype=np.int64)
        table.setflags(write=False)
        return table, {int(t): b for b, t in enumerate(table)}

    # --- validation --------------------------------------------------------------------------

    def _check_bin_values(self, values: Sequence[int], what: str = "token") -> np.ndarray:
        """Range-check integer ``values`` (already the right count); return them as int64 bins."""
        for i, v in enumerate(values):
            name = self.dim_names[i]
            if self.has_terminate and i == 0:
                if v not in (self.terminate_bin, self.continue_bin):
                    raise TokenError("out_of_range", f"{what} {i + 1} ({name}) is {v}; must be {self.terminate_bin} "
                                                     f"(terminate) or {self.continue_bin} (continue)")
            elif not 0 <= v < self.n_bins:
                raise TokenError("out_of_range", f"{what} {i + 1} ({name}) is {v}; bins are 0..{self.n_bins - 1}")
        return np.asarray(values, dtype=np.int64)

    def _integers(self, seq: Any, what: str) -> list[int]:
        """A flat sequence of exactly n_dims integers (ints or integral floats) as Python ints."""
        if isinstance(seq, (str, bytes)):
            raise TokenError("non_integer", f"expected a sequence of {what}s, got text; use parse_text()")
        if isinstance(seq, np.ndarray):
            if seq.ndim != 1:
                if seq.size == 0:
                    raise TokenError("empty", f"no {what}s")
                raise TokenError("wrong_count", f"expected a flat sequence of {what}s, got shape {seq.shape}")
            items = seq.tolist()
        else:
            # element by element, not np.asarray: that would quietly turn [5, True] into [5, 1]
            try:
                items = list(seq)
            except TypeError:
                raise TokenError("non_integer", f"{what}s must be a sequence, got {type(seq).__name__}") from None
            if any(isinstance(v, (list, tuple, np.ndarray)) for v in items):
                raise TokenError("wrong_count", f"expected a flat sequence of {what}s, got a nested one")
        if not items:
            raise TokenError("empty", f"no {what}s")
        if len(items) != self.n_dims:
            raise TokenError("wrong_count", f"expected {self.n_dims} {what}s ({' '.join(self.dim_names)}), "
                                            f"got {len(items)}")
        out: list[int] = []
        for i, v in enumerate(items):
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TokenError("non_integer", f"{what} {i + 1} is {_clip(repr(v))}, not an integer")
            if isinstance(v, float):
                if not math.isfinite(v):
                    raise TokenError("non_finite", f"{what} {i + 1} is {v}")
                if not v.is_integer():
                    raise TokenError("non_integer", f"{what} {i + 1} is {v}, not an integer")
            out.append(int(v))
        return out

    def validate_bins(self, bins: Any) -> np.ndarray:
        """``bins`` as a checked int64 array of shape (n_dims,), or TokenError."""
        return self._check_bin_values(self._integers(bins, "bin"), "bin")

    # --- text form ---------------------------------------------------------------------------

    def parse_text(self, text: str) -> ParsedAnswer:
        """Parse ``"1 128 91 ..."`` or ``"Plan: <text> Action: 1 128 ..."``; raise TokenError if invalid."""
        if not isinstance(text, str):
            raise TokenError("non_integer", f"answer must be text, got {type(text).__name__}")
        plan, action_text = self._split_plan(text)
        tokens = action_text.split()
        if not tokens:
            raise TokenError("empty", "the answer has no action tokens")
        n_ints = next((i for i, t in enumerate(tokens) if not _INT_TOKEN.fullmatch(t)), len(tokens))
        if n_ints == len(tokens):
            if len(tokens) != self.n_dims:
                raise TokenError("wrong_count", f"expected {self.n_dims} tokens ({' '.join(self.dim_names)}), "
                                                f"got {len(tokens)}")
            long = next((i for i, t in enumerate(tokens) if len(t.lstrip("-")) > _MAX_TOKEN_DIGITS), None)
            if long is not None:  # int() of > 4300 digits raises ValueError; no bin has 10 digits anyway
                raise TokenError("out_of_range", f"token {long + 1} has {len(tokens[long].lstrip('-'))} digits; "
                                                 f"bins are 0..{self.n_bins - 1}")
            return ParsedAnswer(self._check_bin_values([int(t) for t in tokens]), plan, text)
        if n_ints >= self.n_dims:
            junk = " ".join(tokens[self.n_dims:])
            raise TokenError("trailing_junk", f"unexpected text after {self.n_dims} tokens: {_clip(junk)!r}")
        bad = tokens[n_ints]
        if bad.lower().lstrip("+-") in _NON_FINITE_TOKENS:
            raise TokenError("non_finite", f"token {n_ints + 1} is {bad!r}")
        if n_ints == self.n_dims - 1 and n_ints == len(tokens) - 1 and _GLUED_JUNK.fullmatch(bad):
            raise TokenError("trailing_junk", f"unexpected text after {self.n_dims} tokens: {_clip(bad)!r}")
        raise TokenError("non_integer", f"token {n_ints + 1} is {_clip(bad)!r}, not an integer")

    @staticmethod
    def _split_plan(text: str) -> tuple[str, str]:
        """(plan, action text); the plan is "" for a plain number answer."""
        markers = list(_MARKER.finditer(text))
        if not markers:
            return "", text
        plans = [m for m in markers if m.group(1).lower() == "plan"]
        actions = [m for m in markers if m.group(1).lower() == "action"]
        if len(plans) > 1 or len(actions) > 1:
            raise TokenError("mixed_forms", f"answer has {len(plans)} 'Plan:' and {len(actions)} 'Action:' markers; "
                                            "expected at most one of each")
        if not actions:
            if text[:plans[0].start()].strip():
                raise TokenError("mixed_forms", "text before 'Plan:'")
            raise TokenError("empty", "chain-of-thought answer has a plan but no 'Action:' part")
        action = actions[0]
        if plans:
            plan_m = plans[0]
            if plan_m.start() > action.start():
                raise TokenError("mixed_forms", "'Plan:' comes after 'Action:'")
            prefix, plan = text[:plan_m.start()], text[plan_m.end():action.start()].strip()
        else:
            prefix, plan = text[:action.start()], ""
        if prefix.strip():
            raise TokenError("mixed_forms", f"text before the chain of thought: {_clip(prefix.strip())!r}")
        return plan, text[action.end():]

    def format_text(self, bins: Any) -> str:
        """``"1 128 91 241 5 101 127 217"`` for valid ``bins``."""
        return " ".join(str(int(b)) for b in self.validate_bins(bins))

    def text_regex(self, with_plan: bool = False) -> str:
        """A regex (use with ``re.fullmatch``) matching exactly the canonical valid number answers.

        Every match parses; :meth:`format_text` output always matches. ``with_plan`` prefixes
        ``"Plan: <text without ':' or newline> Action: "`` for chain-of-thought models. Meant for
        constrained decoding (e.g. vLLM ``guided_regex``); :meth:`parse_text` is slightly more
        lenient (any whitespace, leading zeros).
        """
        parts = []
        for i in range(self.n_dims):
            if self.has_terminate and i == 0:
                parts.append("(?:" + "|".join(str(v) for v in sorted((self.terminate_bin, self.continue_bin))) + ")")
            else:
                parts.append(_uint_regex(self.n_bins - 1))
        body = " ".join(parts)
        return ("Plan: [^:\\n]+ Action: " + body) if with_plan else body

    # --- id form -----------------------------------------------------------------------------

    def bins_from_ids(self, ids: Any) -> np.ndarray:
        """Vocabulary ids (n_dims of them) -> bins, through the configured id map."""
        values = self._integers(ids, "token id")
        bins = []
        for i, token_id in enumerate(values):
            b = self._id_to_bin.get(token_id)
            if b is None:
                raise TokenError("unknown_id", f"token id {token_id} at position {i + 1} is not an action token "
                                               f"({self._id_range_text()})")
            bins.append(b)
        return self._check_bin_values(bins)

    def ids_from_bins(self, bins: Any) -> np.ndarray:
        """Bins -> vocabulary ids (int64)."""
        return self._bin_to_id[self.validate_bins(bins)]

    def valid_token_ids(self) -> np.ndarray:
        """All action-token vocabulary ids; entry b is the id of bin b (e.g. for logit masks)."""
        return self._bin_to_id.copy()

    def _id_range_text(self) -> str:
        lo, hi = int(self._bin_to_id.min()), int(self._bin_to_id.max())
        contiguous = hi - lo + 1 == self.n_bins
        return f"action ids are {lo}..{hi}" if contiguous else "see tokenizer.token_ids"

    # --- model units <-> ArmAction -----------------------------------------------------------

    def values_from_bins(self, bins: np.ndarray) -> np.ndarray:
        """Checked bins -> the 7 motion values in model units (un-normalised for openvla with statistics)."""
        m = self._motion
        values = decode_bins(np.asarray(bins)[m], self.low[m], self.high[m], self.n_bins, self.binning)
        return self.statistics.unnormalise(values) if self.statistics is not None else values

    def bins_from_values(self, values: np.ndarray) -> np.ndarray:
        """7 motion values in model units -> their bins (clipped to the ranges first, as RT-1 / OpenVLA do)."""
        v = np.asarray(values, dtype=np.float64)
        if self.statistics is not None:
            v = self.statistics.normalise(v)
        m = self._motion
        return encode_bins(v, self.low[m], self.high[m], self.n_bins, self.binning)

    def action_from_values(self, values: np.ndarray, terminate: bool = False, observation_seq: int = -1) -> ArmAction:
        """7 motion values in model units -> canonical ArmAction (scales, rotation and gripper conventions)."""
        v = np.asarray(values, dtype=np.float64)
        translation = v[0:3] * self.translation_scale_m
        rotation = v[3:6] * self.rotation_scale_rad
        if self.rotation_convention == "rpy":
            rotation = rpy_to_rotvec(rotation)
        closedness = GRIPPER_CONVENTIONS[self.gripper_convention][0](float(v[6]))
        if self.gripper_relative:  # the convention's value read as a change: +1 = close fully
            gripper = float(np.clip(2.0 * closedness - 1.0, -1.0, 1.0))
        else:
            gripper = float(np.clip(closedness, 0.0, 1.0))
        return ArmAction(translation, rotation, gripper, terminate=bool(terminate),
                         gripper_relative=self.gripper_relative, observation_seq=observation_seq)

    def values_from_action(self, action: ArmAction) -> np.ndarray:
        """Canonical ArmAction -> 7 motion values in model units (inverse of :meth:`action_from_values`)."""
        if not action.is_finite():
            raise TokenError("non_finite", "the action to encode contains NaN or inf")
        if action.gripper_relative != self.gripper_relative:
            have, want = ("relative", "absolute") if action.gripper_relative else ("absolute", "relative")
            raise TokenError("gripper_mode", f"action gripper is {have} but tokenizer.gripper_mode is {want}")
        rotation = action.rotation
        if self.rotation_convention == "rpy":
            rotation = rotvec_to_rpy(rotation)
        closedness = (action.gripper + 1.0) / 2.0 if self.gripper_relative else action.gripper
        gripper = GRIPPER_CONVENTIONS[self.gripper_convention][1](float(closedness))
        return np.concatenate([action.translation / self.translation_scale_m,
                               rotation / self.rotation_scale_rad, [gripper]])

    # --- the contract's main entry points ----------------------------------------------------

    def decode(self, bins: Any, observation_seq: int = -1) -> ArmAction:
        """Bins (n_dims integers) -> ArmAction; TokenError if any bin is invalid."""
        b = self.validate_bins(bins)
        terminate = self.has_terminate and int(b[0]) == self.terminate_bin
        return self.action_from_values(self.values_from_bins(b), terminate, observation_seq)

    def out_of_range(self, action: ArmAction) -> list[str]:
        """The motion dimensions of ``action`` beyond what the tokens can express (``encode`` clips them to
        the nearest bin), each as "name value not in [low, high]" in model units."""
        v = np.asarray(self.values_from_action(action), dtype=np.float64)
        if self.statistics is not None:
            v = self.statistics.normalise(v)
        m = self._motion
        out = []
        for name, x, lo, hi in zip(self.dim_names[m], v, self.low[m], self.high[m], strict=True):
            slack = 1e-9 * (hi - lo)  # float round-off of a value given exactly at a bound
            if not lo - slack <= x <= hi + slack:
                out.append(f"{name} {x:.6g} not in [{lo:g}, {hi:g}]")
        return out

    def encode(self, action: ArmAction) -> np.ndarray:
        """ArmAction -> bins (int64, (n_dims,)); motion beyond the ranges is clipped, as RT-1 does
        (:meth:`out_of_range` tells which dimensions that clips)."""
        motion = self.bins_from_values(self.values_from_action(action))
        if not self.has_terminate:
            if action.terminate:
                raise TokenError("out_of_range", f"profile {self.profile} has no terminate dimension")
            return motion
        flag = self.terminate_bin if action.terminate else self.continue_bin
        return np.concatenate([[flag], motion]).astype(np.int64)

    def decode_continuous(self, values: Any, observation_seq: int = -1, terminate: bool = False) -> ArmAction:
        """One row of a continuous action chunk, 7 values (dx dy dz droll dpitch dyaw gripper) in model
        units as OpenVLA / openpi servers return them (already un-normalised), -> ArmAction."""
        if isinstance(values, (str, bytes)):
            raise TokenError("non_numeric", "continuous action is text, expected 7 numbers")
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise TokenError("non_numeric", f"continuous action is not numeric: {_clip(repr(values))}") from None
        if arr.size == 0:
            raise TokenError("empty", "continuous action has no values")
        if arr.ndim != 1 or arr.size != len(MOTION_DIMS):
            raise TokenError("wrong_count", f"expected {len(MOTION_DIMS)} continuous values ({' '.join(MOTION_DIMS)}),"
                                            f" got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise TokenError("non_finite", f"continuous action contains NaN or inf: {_clip(str(arr.tolist()), 120)}")
        outside = [f"{name} {x:.6g} not in [{lo:.6g}, {hi:.6g}]" for name, x, lo, hi
                   in zip(MOTION_DIMS, arr, self.continuous_low, self.continuous_high, strict=True)
                   if not lo <= x <= hi]
        if outside:
            raise TokenError("out_of_range", "continuous action out of range (tokenizer.continuous_low/high): "
                                             + "; ".join(outside))
        return self.action_from_values(arr, terminate, observation_seq)

    def decode_reply(self, reply: BackendReply) -> list[ArmAction]:
        """The ArmAction(s) carried by ``reply`` (one for text / ids, one per row of an actions chunk)."""
        forms = [name for name in ("text", "token_ids", "actions") if getattr(reply, name) is not None]
        if not forms:
            raise TokenError("empty", f"reply {reply.seq} from {reply.backend} carries no answer")
        if len(forms) > 1:
            raise TokenError("mixed_forms", f"reply {reply.seq} carries {' and '.join(forms)}; expected exactly one")
        if reply.text is not None:
            return [self.decode(self.parse_text(reply.text).bins, reply.seq)]
        if reply.token_ids is not None:
            return [self.decode(self.bins_from_ids(reply.token_ids), reply.seq)]
        try:
            chunk = np.asarray(reply.actions, dtype=np.float64)
        except (TypeError, ValueError):
            raise TokenError("non_numeric", f"reply {reply.seq}: actions chunk is not numeric") from None
        if chunk.ndim == 1:  # a single step, as OpenVLA's /act returns
            chunk = chunk[None, :]
        if chunk.ndim != 2:
            raise TokenError("wrong_count", f"reply {reply.seq}: actions chunk must be (horizon, 7), got {chunk.shape}")
        if chunk.shape[0] == 0:
            raise TokenError("empty", f"reply {reply.seq}: actions chunk has no steps")
        return [self.decode_continuous(row, reply.seq) for row in chunk]

    def prompt(self, instruction: str) -> str:
        """The model prompt, e.g. ``"Q: what action should the robot take to pick the apple? A:"``."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise TokenError("empty", "the instruction is empty")
        task = " ".join(instruction.split())  # one line: newlines would break the prompt format
        if self._lowercase_instruction:  # OpenVLA lower-cases instructions at train and test time
            task = task.lower()
        return self.prompt_template.replace("{instruction}", task)

    def __repr__(self) -> str:
        return (f"ActionTokenizer(profile={self.profile!r}, n_dims={self.n_dims}, n_bins={self.n_bins}, "
                f"token_form={self.token_form!r}, rotation={self.rotation_convention!r}, "
                f"gripper={self.gripper_convention!r}/{'relative' if self.gripper_relative else 'absolute'})")


def _clip(text: str, limit: int = 40) -> str:
    """Keep error messages one short line even for a megabyte of model output."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
