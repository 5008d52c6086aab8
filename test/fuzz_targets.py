"""Coverage-guided fuzz targets for every parser of outside bytes (issue 12, part 5), run by atheris.

Each target feeds the bytes libFuzzer makes to the real function that parses them in rt2_ros, and
checks three invariants:

* only the parser's documented, typed errors escape (anything else is a crash: libFuzzer stops and
  writes the input);
* no hang (libFuzzer ``-timeout``) and bounded memory (``-rss_limit_mb``);
* no action from invalid input: whatever comes out as actions went through the tokenizer's
  validation, is finite, and lies within what the tokens can express (``out_of_range`` is empty);
  a reply that is not valid produces no action at all; a constrained-decoding grammar accepts only
  answers the tokenizer accepts; a decoded camera frame is uint8 HxWx3 of the declared size.

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
    """One tokenizer per shipped profile (rt2, rt1, openvla, and any added later)."""
    from rt2_ros.token_profiles import PROFILES
    from rt2_ros.tokens import ActionTokenizer

    return [ActionTokenizer.from_profile(p) for p in PROFILES]


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
    from openai._models import construct_type  # what the SDK does with a reply body (not strict: no validation)
    from openai.types.chat import ChatCompletion

    from rt2_ros.backends import create_backend
    from rt2_ros.backends.base import BackendError
    from rt2_ros.tokens import TokenError

    tok = _tokenizers()[0]
    backend = create_backend("openai", {"base_url": "http://127.0.0.1:9/v1", "model": "m"}, tok)

    def one(data: bytes) -> None:
        try:  # OpenAICompatBackend._create turns a ValueError (body not JSON) into a BackendError
            completion = construct_type(type_=ChatCompletion, value=json.loads(data))
        except ValueError:
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
    from rt2_ros.recording import (
        RecordingReadError,
        ReplayConfigError,
        iter_messages,
        read_metadata,
        read_topics,
        recorded_params,
        replay,
    )

    path = Path(tempfile.mkdtemp(prefix="rt2-fuzz-")) / "run.mcap"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        for read in (read_metadata, recorded_params, read_topics, lambda p: list(iter_messages(p))):
            with contextlib.suppress(RecordingReadError):
                read(path)
        # rt2-replay itself: re-decodes the recorded tokens and re-runs the safety filter over the file
        # AttributeError: a file whose schema lacks a field of the recorded type (e.g. /ee_pose without
        # pose.orientation) escapes replay; strict xfail in test_fuzz.py until recording.py refuses it
        with contextlib.suppress(RecordingReadError, ReplayConfigError, AttributeError):
            replay(path)

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
    # a real recording as the nodes write it (EpisodeRecorder, zstd chunks): episode, poses, tokens, arm actions,
    # statuses; and the same uncompressed with fewer poses, so that mutations reach the messages and stay fast
    from test.test_recording import make_episode

    real = Path(tempfile.mkdtemp(prefix="rt2-fuzz-")) / "episode.mcap"
    make_episode(real, ["0 128 128 128 128 128 128 255", "1 2 3", "1 128 91 241 5 101 127 217"])
    return [out.getvalue(), out.getvalue()[:60], real.read_bytes(), _uncompressed(real, keep_every_pose=10)]


def _uncompressed(path: Path, keep_every_pose: int, last_jump_ns: int = 0) -> bytes:
    """The recording at ``path`` rewritten without compression or chunks, keeping every n-th /ee_pose (and
    its last message logged ``last_jump_ns`` later)."""
    import io

    from mcap.reader import make_reader
    from mcap.writer import CompressionType, Writer

    out = io.BytesIO()
    with path.open("rb") as f:
        reader = make_reader(f)
        header, summary = reader.get_header(), reader.get_summary()
        messages = [(c, m) for k, (_, c, m) in enumerate(reader.iter_messages())
                    if c.topic != "/ee_pose" or k % keep_every_pose == 0]
        w = Writer(out, compression=CompressionType.NONE, use_chunking=False)
        w.start(profile=header.profile, library=header.library)
        schemas: dict[int, int] = {}
        channels: dict[int, int] = {}
        for c, _ in messages:
            if c.id not in channels:
                s = summary.schemas[c.schema_id]
                if s.id not in schemas:
                    schemas[s.id] = w.register_schema(s.name, s.encoding, s.data)
                channels[c.id] = w.register_channel(c.topic, c.message_encoding, schemas[s.id], c.metadata)
        for k, (c, m) in enumerate(messages):
            jump = last_jump_ns if k == len(messages) - 1 else 0
            w.add_message(channels[c.id], m.log_time + jump, m.data, m.publish_time + jump, m.sequence)
        for record in reader.iter_metadata():
            w.add_metadata(record.name, record.metadata)
        w.finish()
    return out.getvalue()


# -- constrained decoding (local backend): the grammars walk arbitrary token sequences ------------------------
# A toy vocabulary with the shapes real tokenizers have: single digits, multi-digit numbers (also beyond 255),
# space-prefixed numbers (SentencePiece "▁12"), tokens spanning a separator, double spaces and junk.
_GRAMMAR_SURFACES: dict[int, str] = {
    **{d: str(d) for d in range(10)}, 10: " ", 11: "  ", 12: "5 1", 13: "12 ", 14: "a", 15: "", 16: "-1", 17: "0 ",
    **{100 + n: str(n) for n in range(300)}, **{500 + n: f" {n}" for n in range(256)}, 800: "007", 801: " 1 2",
}


def _grammar_text():
    import atheris

    from rt2_ros.constrained import text_grammar
    from rt2_ros.tokens import TokenError

    toks = _tokenizers()
    grammars = [text_grammar(t, _GRAMMAR_SURFACES) for t in toks]
    vocab = sorted(_GRAMMAR_SURFACES)

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        k = fdp.ConsumeIntInRange(0, len(toks) - 1)
        tok, grammar = toks[k], grammars[k]
        ids = [vocab[fdp.ConsumeIntInRange(0, len(vocab) - 1)] for _ in range(fdp.ConsumeIntInRange(0, 40))]
        state = grammar.start()
        for n, t in enumerate(ids):
            allowed = grammar.allowed(state)
            nxt = grammar.advance(state, t)
            assert (nxt is not None) == (t in set(allowed.tolist())), (ids[:n + 1], "advance disagrees with allowed")
            if nxt is None:
                return
            state = nxt
        assert len(ids) <= grammar.max_tokens, (ids, grammar.max_tokens)
        if not grammar.accepts(state):
            return
        text = "".join(_GRAMMAR_SURFACES[t] for t in ids)
        try:  # an accepted answer must be one the policy node accepts: never an invalid action
            parsed = tok.parse_text(text)
        except TokenError as exc:
            raise AssertionError(f"{tok.profile}: grammar accepted {text!r}, the tokenizer refuses it: {exc}") from None
        _check_actions(tok, [tok.decode(parsed.bins)])

    return one


def _grammar_text_seeds() -> list[bytes]:
    # profile 0 (rt2), 8 tokens: "1" " 128" " 91" ...; libFuzzer consumes the integers from the end of the data
    return [b"\x00" * 64, bytes(range(64)), b"\x01" * 40 + b"\x02"]


def _grammar_ids():
    import atheris

    from rt2_ros.constrained import id_grammar
    from rt2_ros.tokens import ActionTokenizer, TokenError

    toks = [ActionTokenizer.from_profile("openvla"),
            ActionTokenizer.from_profile("rt2", **{"tokenizer.token_ids": list(range(1000, 1256)),
                                                   "tokenizer.vocab_size": 2000})]
    grammars = [id_grammar(t, 32000 if t.profile == "openvla" else 2000) for t in toks]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        k = fdp.ConsumeIntInRange(0, len(toks) - 1)
        tok, grammar = toks[k], grammars[k]
        lo = int(tok.valid_token_ids().min())
        ids = [lo + fdp.ConsumeIntInRange(-3, 258) for _ in range(fdp.ConsumeIntInRange(0, 10))]
        state = grammar.walk(ids)
        if state is None or not grammar.accepts(state):
            return
        try:
            bins = tok.bins_from_ids(ids)
        except TokenError as exc:
            raise AssertionError(f"{tok.profile}: grammar accepted ids {ids}, the tokenizer refuses: {exc}") from None
        _check_actions(tok, [tok.decode(bins)])

    return one


def _grammar_ids_seeds() -> list[bytes]:
    return [b"\x00" * 32, b"\x80" * 32, bytes(range(32))]


# -- camera frames: sensor_msgs/Image and CompressedImage from the camera driver, JPEG/PNG on the wire --------
def _ros_image():
    import atheris
    import numpy as np
    from sensor_msgs.msg import Image

    from rt2_ros.nodes.common import ImageConversionError, image_msg_to_rgb

    encodings = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC3", "8UC1", "mono16", "yuv422", ""]

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        msg = Image()
        msg.encoding = encodings[fdp.ConsumeIntInRange(0, len(encodings) - 1)]
        msg.height, msg.width = fdp.ConsumeIntInRange(0, 2**32 - 1), fdp.ConsumeIntInRange(0, 2**32 - 1)
        if fdp.ConsumeBool():  # mostly small sizes, so that whole images get through
            msg.height, msg.width = msg.height % 9, msg.width % 9
        msg.step = fdp.ConsumeIntInRange(0, 2**32 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 40)
        msg.data = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            img = image_msg_to_rgb(msg)
        except ImageConversionError:
            return
        assert img.dtype == np.uint8 and img.shape == (msg.height, msg.width, 3), (img.dtype, img.shape)

    return one


def _ros_image_seeds() -> list[bytes]:
    return [b"\x00" + b"\x00" * 20 + bytes(range(256)), b"\x04" + b"\x01" * 20 + bytes(200)]


def _compressed_image():
    import numpy as np
    from sensor_msgs.msg import CompressedImage

    from rt2_ros.imaging import ImageEncodeError, decode_image
    from rt2_ros.nodes.common import ImageConversionError, compressed_msg_to_rgb

    def one(data: bytes) -> None:
        msg = CompressedImage()
        msg.format = "jpeg"
        msg.data = data
        images = []
        with contextlib.suppress(ImageConversionError):
            images.append(compressed_msg_to_rgb(msg))
        if data:  # b"" raises cv2.error, not ImageEncodeError: strict xfail in test_fuzz.py, for the lead to fix
            with contextlib.suppress(ImageEncodeError):
                images.append(decode_image(data))
        for img in images:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size, (img.dtype, img.shape)

    return one


def _compressed_image_seeds() -> list[bytes]:
    import numpy as np

    from rt2_ros.imaging import encode_jpeg, encode_png

    img = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    return [encode_jpeg(img), encode_png(img), encode_jpeg(img)[:100]]


# -- text from outside made safe for messages and logs -----------------------------------------------------------
def _clean_text():
    import atheris

    from rt2_ros.text import clean_text

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        limit = fdp.ConsumeIntInRange(1, 200)
        text = fdp.ConsumeUnicode(fdp.remaining_bytes())  # surrogates included: they come from JSON escapes
        out = clean_text(text, limit)
        out.encode("utf-8")  # valid UTF-8 (raises on a lone surrogate)
        assert len(out) <= limit, (len(out), limit)
        assert not any((ord(c) < 32 and c not in "\t\n") or 0x7F <= ord(c) <= 0x9F for c in out), repr(out)
        assert clean_text(out, limit) == out or len(out) == limit, "cleaning is not stable"

    return one


def _clean_text_seeds() -> list[bytes]:
    return [b"\x50https://user:secret@host/x?token=abc&x=1 Bearer abcdefghijkl\x1b[31m", b"\x05" + "é\u2028".encode()]


TARGETS: dict[str, Target] = {
    "token_text": Target("ActionTokenizer.parse_text (every shipped profile)", _token_text, _token_text_seeds),
    "token_ids": Target("ActionTokenizer.bins_from_ids (openvla ids)", _token_ids, _token_ids_seeds),
    "continuous_chunk": Target("ActionTokenizer.decode_reply (actions chunk)", _continuous, _continuous_seeds),
    "grpc_reply": Target("InferReply.FromString + grpc_client.reply_from_proto", _grpc_reply, _grpc_reply_seeds),
    "grpc_observation": Target("Observation.FromString + serve.observation_from_proto (images decoded)",
                               _grpc_observation, _grpc_observation_seeds),
    "openpi_reply": Target("OpenPIBackend._parse_reply (msgpack-numpy frame)", _openpi_reply, _openpi_reply_seeds),
    "openvla_reply": Target("OpenVLAHttpBackend._parse (json-numpy body)", _openvla_reply, _openvla_reply_seeds),
    "openai_reply": Target("JSON body as the openai SDK builds it + OpenAICompatBackend._answer + parse_text",
                           _openai_reply, _openai_reply_seeds),
    "params_yaml": Target("bringup.check_params (incl. cameras.*) + serve.load_params (params YAML)", _params_yaml,
                          _params_yaml_seeds),
    "mcap_replay": Target("recording.read_metadata / recorded_params / read_topics / iter_messages / replay (MCAP)",
                          _mcap, _mcap_seeds),
    "grammar_text": Target("constrained.TextGrammar advance/allowed/accepts (rt2, rt1, openvla; toy vocabulary)",
                           _grammar_text, _grammar_text_seeds),
    "grammar_ids": Target("constrained.IdGrammar walk/accepts (openvla ids, rt2 with tokenizer.token_ids)",
                          _grammar_ids, _grammar_ids_seeds),
    "ros_image": Target("nodes.common.image_msg_to_rgb (sensor_msgs/Image)", _ros_image, _ros_image_seeds),
    "compressed_image": Target("nodes.common.compressed_msg_to_rgb + imaging.decode_image (JPEG/PNG bytes)",
                               _compressed_image, _compressed_image_seeds),
    "clean_text": Target("text.clean_text (answers, error details, URLs to messages and logs)", _clean_text,
                         _clean_text_seeds),
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
