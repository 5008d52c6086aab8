"""Client for an OpenAI-compatible chat-completions server (vLLM for fleets).

A fleet talks to a served model; the serving side is an existing engine, not ours. vLLM's
OpenAI-compatible server is the common one, so this backend speaks plain chat completions:
one user message with the camera image as a base64 data URL plus the RT-2 prompt
(``tokenizer.prompt(instruction)``), greedy decoding, a few output tokens, and a structured-
output constraint so the engine can only emit a valid action answer (the tokenizer's
``text_regex()``). vLLM spells that constraint ``{"structured_outputs": {"regex": ...}}`` in
recent releases and ``{"guided_regex": ...}`` in older ones, so the field is an option. The
reply text is parsed by the tokenizer downstream, which still validates it (a server that
ignores the constraint cannot make the arm move on junk).

Uses the official ``openai`` client (rejected: hand-rolled httpx calls — the client already
maps HTTP statuses to typed errors) on rt2_ros's HTTP stack (rt2_ros.backends.http_budget): the
client's timeouts are per socket read, so a server dripping its reply would hold a call for
seconds; here the whole call — connect, send, receive, parse — ends within the budget the policy
node gives, and the reply is capped (``max_reply_bytes``; an answer is ~1 kB) and parsed on the
caller's worker thread. Retries default to 0: in a control loop a late answer is worse than none,
the next observation is the retry; when set, they are made here, at once and within the same
budget (the client's own retries sleep, honouring a server's Retry-After, outside any budget).
The API key comes from an environment variable or a file, never from the YAML, and is never
logged.

Cameras: by default only the primary camera's frame is sent (``cameras: []``). RT-2-style models
were trained on one image, and vLLM serves many models with a limit of one image per prompt
(``--limit-mm-per-prompt``), so a second image would turn every request into an HTTP 400. Listing
cameras sends one ``image_url`` part per camera in that order, each after a short text part naming
it (``image_label``), then the prompt: a multi-image model can tell the wrist view from the scene.
"""

from __future__ import annotations

import base64
import logging
import re
import ssl
import time
from typing import TYPE_CHECKING

import httpx2
import numpy as np
import openai

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import http_budget
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    camera_frames,
    check_camera_names,
    credential_specs,
    describe_exception,
    load_secret,
    max_reply_bytes_spec,
    resolve_options,
    snippet,
    time_left,
)
from rt2_ros.backends.transport_security import check_server_url, server_ssl_context
from rt2_ros.params import ParamSpec

if TYPE_CHECKING:
    from rt2_ros.tokens import ActionTokenizer

_log = logging.getLogger(__name__)

_P = "backend.openai."

GUIDED_DECODING_FIELDS = ("structured_outputs", "guided_regex", "none")


class OpenAICompatBackend(Backend):
    """``backend.type: openai`` — one chat completion per observation; replies with the answer text."""

    name = "openai"

    OPTIONS: tuple[ParamSpec, ...] = (
        ParamSpec(_P + "base_url", "string", "http://127.0.0.1:8000/v1",
                  "Base URL of the OpenAI-compatible API, including /v1 (e.g. vLLM: http://host:8000/v1)."),
        ParamSpec(_P + "model", "string", "",
                  "Served model name, as listed by GET {base_url}/models (vLLM --served-model-name). Required."),
        *credential_specs(_P, key_use="the API key sent as 'Authorization: Bearer KEY' (e.g. VLLM_API_KEY, "
                          "vLLM --api-key)", scheme="https"),
        ParamSpec(_P + "connect_timeout_s", "double", 2.0,
                  "TCP connect timeout (capped by the request budget, backend.timeout_s, which bounds the whole "
                  "request: connect, send, receive, parse).", "s", low=0.01, high=60.0),
        ParamSpec(_P + "max_retries", "int", 0,
                  "Retries on connection errors/5xx/429, made at once and only while the request budget lasts; "
                  "keep 0 in a control loop (the next observation is the retry).", low=0, high=3),
        max_reply_bytes_spec(_P, "status line, headers and body as received"),
        ParamSpec(_P + "guided_decoding_field", "string", "structured_outputs",
                  "How to ask the server to constrain output to the action grammar: structured_outputs "
                  "(current vLLM: extra_body structured_outputs.regex), guided_regex (vLLM before 0.12, which "
                  "removed it), none (unconstrained; the tokenizer still rejects malformed answers).",
                  choices=GUIDED_DECODING_FIELDS),
        ParamSpec(_P + "max_tokens", "int", 48,
                  "Output token cap; 8 numbers need about 16-24 tokens.", "tokens", low=1, high=4096),
        ParamSpec(_P + "cameras", "string_array", [],
                  "Cameras (names of the policy node's cameras.names) sent as images, in this order, in the one user "
                  "message; [] = the primary camera only (safe for models and servers that take one image). A "
                  "listed camera missing from an observation fails the request."),
        ParamSpec(_P + "image_label", "string", "{camera}:",
                  "With several cameras: a text part before each image naming it ({camera} = its name, {index} = "
                  "1, 2, ...); empty = no labels. Never sent with a single image."),
        ParamSpec(_P + "image_format", "string", "jpeg", "Encoding of the image data URL.", choices=("jpeg", "png")),
        ParamSpec(_P + "jpeg_quality", "int", 90, "JPEG quality of the data URL image.", low=1, high=100),
        ParamSpec(_P + "image_size", "int", 0,
                  "Resize every image to image_size x image_size before encoding; 0 = send the full frames (the "
                  "server's processor resizes anyway).", "px", low=0, high=4096),
    )

    @classmethod
    def check_options(cls, options: dict) -> None:
        check_server_url(_P, "base_url", options, "http", "https", "/v1")

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        opts = resolve_options(self.OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        self.check_options(opts)
        if not opts["model"]:
            raise BackendConfigError(f"{_P}model: set the served model name (vLLM --served-model-name)")
        if tokenizer is None:
            raise BackendConfigError(f"{_P[:-1]}: needs the action tokenizer for the prompt and the output grammar")
        self._base_url: str = opts["base_url"].rstrip("/")
        self._cameras = check_camera_names(opts["cameras"], f"{_P}cameras")
        try:
            opts["image_label"].format(camera="camera", index=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise BackendConfigError(f"{_P}image_label: only {{camera}} and {{index}} may be used, got "
                                     f"{opts['image_label']!r} ({exc!r})") from None
        self._extra_body = _guided_body(opts["guided_decoding_field"], tokenizer.text_regex())
        key = load_secret(opts["api_key_env"], opts["api_key_file"], _P)
        verify: ssl.SSLContext | bool = server_ssl_context(_P, "base_url", opts, "https") or True
        # An explicit key (or the "EMPTY" placeholder vLLM ignores) so the client never falls back to
        # OPENAI_API_KEY / OPENAI_BASE_URL from the environment behind the operator's back.
        self._client = openai.OpenAI(
            base_url=self._base_url, api_key=key or "EMPTY", max_retries=0,
            timeout=openai.Timeout(30.0, connect=opts["connect_timeout_s"]),
            http_client=openai.DefaultHttpxClient(**http_budget.client_options(verify)))

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        start = time.monotonic()
        deadline = start + timeout_s  # the budget covers encoding and parsing too
        if timeout_s <= 0:
            raise BackendTimeout(f"openai: no time left for {self._base_url} (timeout {timeout_s:.3f} s)")
        messages = [{"role": "user", "content": self.content(observation)}]
        for attempt in range(self.options["max_retries"] + 1):
            try:
                completion = self._create(messages, deadline, timeout_s)
                break
            except _Retryable as exc:
                if attempt == self.options["max_retries"] or time_left(deadline) <= 0:
                    raise exc.error from None
        text = self._answer(completion)
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:  # a reply later than the budget is dropped, never executed late
            raise BackendTimeout(f"openai: reply took {elapsed:.2f} s > {timeout_s:.2f} s; dropped")
        return BackendReply(seq=observation.seq, backend=self.name, text=text)

    def _create(self, messages: list[dict], deadline: float, timeout_s: float) -> object:
        """One chat completion within the budget ending at ``deadline``; _Retryable wraps the
        BackendError of a failure worth retrying (connection error, 5xx, 429)."""
        o = self.options
        left = time_left(deadline)
        if left <= 0:
            raise BackendTimeout(f"openai: the budget of {timeout_s:.2f} s was spent before the request was sent")
        try:
            with http_budget.call_budget(deadline, o["max_reply_bytes"], f"{_P}max_reply_bytes"):
                return self._client.chat.completions.create(
                    model=o["model"], messages=messages, temperature=0.0, max_tokens=o["max_tokens"], n=1,
                    extra_body=self._extra_body, timeout=http_budget.timeout(left, o["connect_timeout_s"]))
        except openai.APITimeoutError:
            raise BackendTimeout(f"openai: {self._base_url} did not answer within {timeout_s:.2f} s; connection "
                                 f"closed") from None
        except http_budget.ReplyRejected as exc:
            raise BackendError(f"openai: {self._base_url}: {exc}") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, httpx2.ConnectError):
                raise _Retryable(BackendError(f"openai: cannot reach {self._base_url} ({describe_exception(cause)})"
                                              f" — is the server running?")) from None
            raise _Retryable(BackendError(f"openai: connection to {self._base_url} failed "
                                          f"({describe_exception(cause)})")) from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise BackendError(f"openai: {self._base_url} rejected the API key (HTTP {exc.status_code}); check "
                               f"{_P}api_key_env / {_P}api_key_file") from None
        except openai.NotFoundError as exc:
            raise BackendError(f"openai: HTTP 404 from {self._base_url}: {_server_message(exc)} — check {_P}model "
                               f"and {_P}base_url (ends in /v1)") from None
        except openai.BadRequestError as exc:
            raise BackendError(f"openai: HTTP 400 from {self._base_url}: {_server_message(exc)} — if the server "
                               f"rejects the output constraint, try {_P}guided_decoding_field") from None
        except openai.APIStatusError as exc:
            error = BackendError(f"openai: HTTP {exc.status_code} from {self._base_url}: {_server_message(exc)}")
            if exc.status_code == 429 or exc.status_code >= 500:
                raise _Retryable(error) from None
            raise error from None
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: a JSON body that does not parse
            raise BackendError(f"openai: request to {self._base_url} failed: {describe_exception(exc)}") from None

    def _answer(self, completion: object) -> str:
        """The answer text of a completion (outside data: any shape may come back)."""
        try:
            choice = completion.choices[0]  # type: ignore[attr-defined]
            content = choice.message.content if choice.message is not None else None
            finish_reason = getattr(choice, "finish_reason", None)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise BackendError(f"openai: {self._base_url} returned no choices") from None
        if not isinstance(content, str):
            raise BackendError(f"openai: {self._base_url} returned no message content "
                               f"(finish_reason={snippet(repr(finish_reason), 40)})")
        return content.strip()

    def close(self) -> None:
        self._client.close()

    def content(self, observation: Observation) -> list[dict]:
        """The parts of the user message: the configured cameras' images (each after its label when
        there are several), then the prompt."""
        frames = camera_frames(observation, self._cameras, f"{_P}cameras", self.name)
        label = self.options["image_label"] if len(frames) > 1 else ""
        parts: list[dict] = []
        for index, (camera, image) in enumerate(frames, start=1):
            if label:
                parts.append({"type": "text", "text": label.format(camera=camera, index=index)})
            parts.append({"type": "image_url", "image_url": {"url": self._data_url(camera, image)}})
        parts.append({"type": "text", "text": self.tokenizer.prompt(observation.instruction)})
        return parts

    def _data_url(self, camera: str, image: np.ndarray) -> str:
        o = self.options
        try:
            if o["image_size"]:
                image = imaging.resize(image, o["image_size"], o["image_size"])
            if o["image_format"] == "png":
                data, mime = imaging.encode_png(image), "image/png"
            else:
                data, mime = imaging.encode_jpeg(image, o["jpeg_quality"]), "image/jpeg"
        except imaging.ImageEncodeError as exc:
            raise BackendError(f"openai: cannot encode the camera image {camera!r}: {exc}") from None
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _guided_body(field: str, regex: str) -> dict | None:
    """The vLLM ``extra_body`` that constrains decoding to ``regex`` (None for ``none``)."""
    if field == "none":
        return None
    pattern = unanchored(regex)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise BackendConfigError(f"{_P}guided_decoding_field: the tokenizer's text_regex() is invalid: {exc}") from None
    if field == "guided_regex":
        return {"guided_regex": pattern}
    return {"structured_outputs": {"regex": pattern}}


def unanchored(regex: str) -> str:
    """``regex`` without a leading ``^`` / trailing ``$``: guided decoding always matches the whole
    output, and some grammar engines reject anchors."""
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$") and not regex.endswith("\\$"):
        regex = regex[:-1]
    return regex


def _server_message(exc: openai.APIStatusError) -> str:
    """The server's error text in one short clean line (vLLM: {"error": {"message": ...}} or {"error": "..."})."""
    body = exc.body
    text = None
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail")))
        text = err.get("message") if isinstance(err, dict) else err
    return snippet(text if text is not None else exc.message)


class _Retryable(Exception):
    """A failure that a retry may cure; carries the BackendError to raise when none is left."""

    def __init__(self, error: BackendError) -> None:
        super().__init__(str(error))
        self.error = error
