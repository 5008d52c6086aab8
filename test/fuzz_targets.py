"""Coverage-guided fuzz targets for every parser of outside bytes (issue 12, part 5), run by atheris.

Each target feeds the bytes libFuzzer makes to the real function that parses them in rt2_ros, and
checks three invariants:

* only the parser's documented, typed errors escape (anything else is a crash: libFuzzer stops and
  writes the input);
* no hang (libFuzzer ``-timeout``) and bounded memory (``-rss_limit_mb``);
* no action from invalid input: whatever comes out as actions went through the tokenizer's
  validation, is finite, and lies within what the tokens can express (``out_of_range`` is empty);
  a reply that is not valid produces no action at all.

Run one target: ``python -m test.fuzz_targets <target> [libFuzzer flags] [corpus dir]``.
:func:`run` does that in a subprocess and parses libFuzzer's statistics; ``tools/fuzz.py`` (long
run, Markdown table) and ``test/test_fuzz.py`` (short run in ``make test``) use it. rt2_ros is
imported under ``atheris.instrument_imports`` so that coverage of our own code guides the search.
Nothing here imports rt2_ros at module level: instrumentation must come first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Target:
    parses: str  # the function under test, as a reader finds it in the code
    setup: Callable[[], Callable[[bytes], None]]  # -> the per-input function (after instrumentation)
    seeds: Callable[[], list[bytes]]  # valid (and some invalid) inputs to start from


# -- shared invariants -----------------------------------------------------------------------------------------
def _tokenizers():
    from rt2_ros.tokens import ActionTokenizer

    return [ActionTokenizer.from_profile(p) for p in ("rt2", "rt1", "openvla")]


def _check_actions(tokenizer, actions) -> None:
    """Every action that came out is finite and within what the tokens can express."""
    for a in actions:
        values = [*a.translation, *a.rotation, a.gripper]
        assert all(math.isfinite(float(v)) for v in values), f"non-finite action from fuzzed input: {a}"
        assert not tokenizer.out_of_range(a), f"action beyond the token ranges: {tokenizer.out_of_range(a)}"


def _decode_reply(tokenizer, reply) -> None:
    """The policy node's decoding of a reply: TokenError (a ValueError) or valid actions."""
    try:
        actions = tokenizer.decode_reply(reply)
    except ValueError:
        return
    _check_actions(tokenizer, actions)


# -- token text and ids -------------------------------------------------------------------------------------
def _token_text():
    import atheris

    from rt2_ros.tokens import TokenError

    toks = _tokenizers()

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        tok = toks[fdp.ConsumeIntInRange(0, len(toks) - 1)]
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
        try:
            parsed = tok.parse_text(text)
        except TokenError:
            return
        # a parsed answer is exactly n_dims valid bins, and formats back to text that parses the same
        assert len(parsed.bins) == tok.n_dims and all(0 <= int(b) < tok.n_bins for b in parsed.bins), parsed
        assert list(tok.parse_text(tok.format_text(parsed.bins)).bins) == list(parsed.bins)
        _check_actions(tok, [tok.decode(parsed.bins)])

    return one


def _token_text_seeds() -> list[bytes]:
    return [bytes([0]) + b"1 128 91 241 5 101 127 217", bytes([0]) + b"Plan: pick. Action: 0 128 128 128 128 128 128 0",
            bytes([1]) + b"128 128 128 128 128 128 128", bytes([2]) + b"0 1 2 3 4 5 6", b"", bytes([0]) + b"1 2 3"]


def _token_ids():
    import atheris

    from rt2_ros.tokens import ActionTokenizer, TokenError

    tok = ActionTokenizer.from_profile("openvla")

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        ids = fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 12), -(2**40), 2**40)
        try:
            bins = tok.bins_from_ids(ids)
        except TokenError:
            return
        assert set(int(i) for i in ids) <= set(int(i) for i in tok.valid_token_ids()), ids
        _check_actions(tok, [tok.decode(bins)])

    return one


def _token_ids_seeds() -> list[bytes]:
    from rt2_ros.tokens import ActionTokenizer

    tok = ActionTokenizer.from_profile("openvla")
    ids = tok.ids_from_bins([128] * tok.n_dims)
    return [bytes([7]) + b"".join(int(i).to_bytes(8, "little", signed=True) for i in ids), b"\x03abc"]


# -- continuous chunks --------------------------------------------------------------------------------------
def _continuous():
    import atheris
    import numpy as np

    from rt2_ros.actions import BackendReply

    tok = _tokenizers()[0]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        rows = fdp.ConsumeIntInRange(0, 4)
        cols = fdp.ConsumeIntInRange(0, 9)
        values = [fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat() for _ in range(rows * cols)]
        chunk = np.asarray(values, dtype=np.float64).reshape(rows, cols) if rows * cols else np.zeros((rows, cols))
        _decode_reply(tok, BackendReply(seq=1, backend="fuzz", actions=chunk))

    return one


def _continuous_seeds() -> list[bytes]:
    return [b"\x01\x07" + b"\x01" * 80, b"\x02\x07" + bytes(range(200)), b""]


# -- gRPC (robot side: replies; server side: observations) ------------------------------------------------------
def _grpc_reply():
    from rt2_ros.backends.base import BackendError
    from rt2_ros.backends.grpc_client import reply_from_proto
    from rt2_ros.backends.proto import load

    pb, _ = load()
    from google.protobuf.message import DecodeError

    tok = _tokenizers()[0]

    def one(data: bytes) -> None:
        try:
            msg = pb.InferReply.FromString(data)
        except DecodeError:
            return
        try:
            reply = reply_from_proto(msg, 1, target="fuzz:1", timeout_s=1.0, has_token=False, tls=False)
        except BackendError:
            return
        _decode_reply(tok, reply)

    return one


def _grpc_reply_seeds() -> list[bytes]:
    from rt2_ros.backends.proto import load

    pb, _ = load()
    a = pb.InferReply(seq=1, text="1 128 91 241 5 101 127 217")
    b = pb.InferReply(seq=1)
    b.token_ids.ids.extend([128] * 8)
    c = pb.InferReply(seq=1, error=pb.ReplyError(code=13, message="boom"))
    return [m.SerializeToString() for m in (a, b, c)]


def _grpc_observation():
    import numpy as np

    from rt2_ros.backends.proto import load
    from rt2_ros.serve import observation_from_proto

    pb, _ = load()
    from google.protobuf.message import DecodeError

    max_pixels = 64 * 64

    def one(data: bytes) -> None:
        try:
            msg = pb.Observation.FromString(data)
        except DecodeError:
            return
        try:
            obs = observation_from_proto(msg, max_pixels)
        except ValueError:
            return
        for img in obs.images.values():
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, img.shape
            assert img.shape[0] * img.shape[1] <= max_pixels, img.shape

    return one


def _grpc_observation_seeds() -> list[bytes]:
    import numpy as np

    from rt2_ros.actions import Observation
    from rt2_ros.backends.grpc_client import observation_to_proto

    img = np.full((8, 8, 3), 100, np.uint8)
    return [observation_to_proto(Observation(image=img, instruction="pick", seq=1, stamp=1.0), enc).SerializeToString()
            for enc in ("raw", "png", "jpeg")]


# -- openpi frames (msgpack-numpy) -------------------------------------------------------------------------------
def _openpi_reply():
    from rt2_ros.backends import create_backend
    from rt2_ros.backends.base import BackendError

    tok = _tokenizers()[0]
    backend = create_backend("openpi", {"url": "ws://127.0.0.1:9"}, tok)  # connects lazily: never here

    def one(data: bytes) -> None:
        try:
            reply = backend._parse_reply(data, 1)
        except BackendError:
            return
        _decode_reply(tok, reply)

    return one


def _openpi_reply_seeds() -> list[bytes]:
    import numpy as np
    from openpi_client import msgpack_numpy

    return [msgpack_numpy.packb({"actions": np.zeros((3, 7)), "server_timing": {"infer_ms": 5.0}}),
            msgpack_numpy.packb({"actions": [0.01] * 7}), msgpack_numpy.packb("error")]


# -- OpenVLA JSON (json-numpy) -----------------------------------------------------------------------------------
def _openvla_reply():
    import httpx2

    from rt2_ros.actions import BackendReply
    from rt2_ros.backends import create_backend
    from rt2_ros.backends.base import BackendError

    tok = _tokenizers()[0]
    backend = create_backend("openvla_http", {"url": "http://127.0.0.1:9"}, tok)

    def one(data: bytes) -> None:
        try:
            actions = backend._parse(httpx2.Response(200, content=data))
        except BackendError:
            return
        _decode_reply(tok, BackendReply(seq=1, backend="fuzz", actions=actions))

    return one


def _openvla_reply_seeds() -> list[bytes]:
    import json_numpy
    import numpy as np

    return [json_numpy.dumps(np.zeros(7)).encode(), json_numpy.dumps({"action": np.ones((2, 7)) * 0.01}).encode(),
            b'"error"', b"[0.1, 0.2, 0.3, 0, 0, 0, 1]"]


# -- OpenAI-compatible chat completions -------------------------------------------------------------------------
def _openai_reply():
    import pydantic
    from openai.types.chat import ChatCompletion

    from rt2_ros.backends import create_backend
    from rt2_ros.backends.base import BackendError
    from rt2_ros.tokens import TokenError

    tok = _tokenizers()[0]
    backend = create_backend("openai", {"base_url": "http://127.0.0.1:9/v1", "model": "m"}, tok)

    def one(data: bytes) -> None:
        try:
            completion = ChatCompletion.model_validate_json(data)
        except pydantic.ValidationError:
            return
        try:
            text = backend._answer(completion)
            parsed = tok.parse_text(text)
        except (BackendError, TokenError):
            return
        _check_actions(tok, [tok.decode(parsed.bins)])

    return one


def _openai_reply_seeds() -> list[bytes]:
    message = {"role": "assistant", "content": "1 128 91 241 5 101 127 217"}
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
    empty = {**body, "choices": []}
    return [json.dumps(body).encode(), json.dumps(empty).encode()]


# -- params YAML (rt2-bringup, the nodes, rt2-serve) -----------------------------------------------------------
def _params_yaml():
    from rt2_ros.nodes.bringup import ParamsFileError, check_params
    from rt2_ros.params import ConfigError
    from rt2_ros.serve import load_params

    path = Path(tempfile.mkdtemp(prefix="rt2-fuzz-")) / "params.yaml"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(ParamsFileError, ConfigError):
            check_params([path])
        with contextlib.suppress(ConfigError):
            load_params(path)

    return one


def _params_yaml_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((REPO / "config").rglob("*.yaml"))][:12]


# -- MCAP recordings given to rt2-replay --------------------------------------------------------------------------
def _mcap():
    from rt2_ros.recording import RecordingReadError, iter_messages, read_metadata, read_topics, recorded_params

    path = Path(tempfile.mkdtemp(prefix="rt2-fuzz-")) / "run.mcap"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        for read in (read_metadata, recorded_params, read_topics, lambda p: list(iter_messages(p))):
            with contextlib.suppress(RecordingReadError):
                read(path)

    return one


def _mcap_seeds() -> list[bytes]:
    import io

    from mcap.writer import Writer

    out = io.BytesIO()
    w = Writer(out)
    w.start(profile="ros2", library="rt2_ros fuzz seed")
    schema = w.register_schema(name="std_msgs/msg/Bool", encoding="ros2msg", data=b"bool data")
    channel = w.register_channel(topic="/estop", message_encoding="cdr", schema_id=schema)
    w.add_message(channel_id=channel, log_time=1, publish_time=1, data=b"\x00\x01\x00\x00\x01")
    w.add_metadata("rt2_ros.params", {"rt2_policy": json.dumps({"backend.type": "embedded"})})
    w.finish()
    return [out.getvalue(), out.getvalue()[:60]]


TARGETS: dict[str, Target] = {
    "token_text": Target("ActionTokenizer.parse_text (rt2, rt1, openvla profiles)", _token_text, _token_text_seeds),
    "token_ids": Target("ActionTokenizer.bins_from_ids (openvla ids)", _token_ids, _token_ids_seeds),
    "continuous_chunk": Target("ActionTokenizer.decode_reply (actions chunk)", _continuous, _continuous_seeds),
    "grpc_reply": Target("InferReply.FromString + grpc_client.reply_from_proto", _grpc_reply, _grpc_reply_seeds),
    "grpc_observation": Target("Observation.FromString + serve.observation_from_proto (images decoded)",
                               _grpc_observation, _grpc_observation_seeds),
    "openpi_reply": Target("OpenPIBackend._parse_reply (msgpack-numpy frame)", _openpi_reply, _openpi_reply_seeds),
    "openvla_reply": Target("OpenVLAHttpBackend._parse (json-numpy body)", _openvla_reply, _openvla_reply_seeds),
    "openai_reply": Target("ChatCompletion JSON + OpenAICompatBackend._answer + parse_text", _openai_reply,
                           _openai_reply_seeds),
    "params_yaml": Target("bringup.check_params + serve.load_params (params YAML)", _params_yaml, _params_yaml_seeds),
    "mcap_replay": Target("recording.read_metadata / recorded_params / read_topics / iter_messages (MCAP)", _mcap,
                          _mcap_seeds),
}


# -- running ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FuzzResult:
    target: str
    returncode: int
    inputs: int  # inputs executed (libFuzzer's number_of_executed_units)
    coverage: int  # libFuzzer "cov": code edges of the instrumented modules reached
    features: int  # libFuzzer "ft"
    seconds: float
    crash: str  # the reproducer file of a crash, timeout or OOM, "" if none
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.crash


def run(target: str, seconds: float, workdir: Path, timeout_per_input_s: int = 10, rss_limit_mb: int = 3072
        ) -> FuzzResult:
    """Fuzz ``target`` for ``seconds`` in a subprocess; crashes land in ``workdir``."""
    corpus = workdir / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "test.fuzz_targets", target, f"-max_total_time={max(1, round(seconds))}",
           f"-timeout={timeout_per_input_s}", f"-rss_limit_mb={rss_limit_mb}", "-print_final_stats=1",
           f"-artifact_prefix={workdir}/{target}-", str(corpus)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=seconds + 120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    out = proc.stdout + proc.stderr
    stat = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    crash = re.search(r"Test unit written to (\S+)", out)
    return FuzzResult(target, proc.returncode, int(stat.group(1)) if stat else 0,
                      int(cov[-1][0]) if cov else 0, int(cov[-1][1]) if cov else 0, time.monotonic() - t0,
                      crash.group(1) if crash else "", out)


def main(argv: list[str]) -> None:
    import atheris

    name, flags = argv[1], argv[2:]
    target = TARGETS[name]
    with atheris.instrument_imports(include=["rt2_ros"]):
        one = target.setup()
    corpus = next((a for a in reversed(flags) if not a.startswith("-")), None)
    if corpus is not None and Path(corpus).is_dir():  # a file: re-running one reproducer
        for i, seed in enumerate(target.seeds()):
            (Path(corpus) / f"seed-{i}").write_bytes(seed)
    atheris.Setup([argv[0], *flags], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
