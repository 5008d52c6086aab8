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
maps HTTP statuses to typed errors). Retries default to 0: in a control loop a late answer is
worse than none, the next observation is the retry. The API key comes from an environment
variable or a file, never from the YAML, and is never logged.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import ssl
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import openai

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends.base import (
    Backend,
    BackendConfigError,
    BackendError,
    BackendTimeout,
    credential_specs,
    describe_exception,
    load_secret,
    resolve_options,
)
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
                  "TCP/TLS connect timeout (the whole request is bounded by the policy node's budget).",
                  "s", low=0.01, high=60.0),
        ParamSpec(_P + "max_retries", "int", 0,
                  "Client-side retries on connection errors/5xx/429; each retry gets a full budget, so keep 0 in "
                  "a control loop (the next observation is the retry).", low=0, high=3),
        ParamSpec(_P + "guided_decoding_field", "string", "structured_outputs",
                  "How to ask the server to constrain output to the action grammar: structured_outputs "
                  "(current vLLM: extra_body structured_outputs.regex), guided_regex (vLLM before 0.12, which "
                  "removed it), none (unconstrained; the tokenizer still rejects malformed answers).",
                  choices=GUIDED_DECODING_FIELDS),
        ParamSpec(_P + "max_tokens", "int", 48,
                  "Output token cap; 8 numbers need about 16-24 tokens.", "tokens", low=1, high=4096),
        ParamSpec(_P + "image_format", "string", "jpeg", "Encoding of the image data URL.", choices=("jpeg", "png")),
        ParamSpec(_P + "jpeg_quality", "int", 90, "JPEG quality of the data URL image.", low=1, high=100),
        ParamSpec(_P + "image_size", "int", 0,
                  "Resize the image to image_size x image_size before encoding; 0 = send the full frame (the "
                  "server's processor resizes anyway).", "px", low=0, high=4096),
    )

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        opts = resolve_options(self.OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        parts = urlsplit(opts["base_url"])
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BackendConfigError(f"{_P}base_url: expected http(s)://host:port/v1, got {opts['base_url']!r}")
        if not opts["model"]:
            raise BackendConfigError(f"{_P}model: set the served model name (vLLM --served-model-name)")
        if tokenizer is None:
            raise BackendConfigError(f"{_P[:-1]}: needs the action tokenizer for the prompt and the output grammar")
        self._base_url: str = opts["base_url"].rstrip("/")
        self._extra_body = _guided_body(opts["guided_decoding_field"], tokenizer.text_regex())
        key = load_secret(opts["api_key_env"], opts["api_key_file"], _P)
        if key and parts.scheme != "https" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            _log.warning("%sapi key is sent unencrypted to %s; use https", _P, parts.netloc)
        http_client = None
        if opts["ca_cert_file"]:
            if not os.path.isfile(opts["ca_cert_file"]):
                raise BackendConfigError(f"{_P}ca_cert_file: no such file {opts['ca_cert_file']!r}")
            try:
                verify = ssl.create_default_context(cafile=opts["ca_cert_file"])
            except (OSError, ssl.SSLError) as exc:
                raise BackendConfigError(f"{_P}ca_cert_file: cannot load {opts['ca_cert_file']!r}: {exc}") from None
            http_client = openai.DefaultHttpxClient(verify=verify)
        # An explicit key (or the "EMPTY" placeholder vLLM ignores) so the client never falls back to
        # OPENAI_API_KEY / OPENAI_BASE_URL from the environment behind the operator's back.
        self._client = openai.OpenAI(
            base_url=self._base_url, api_key=key or "EMPTY", max_retries=opts["max_retries"],
            timeout=openai.Timeout(30.0, connect=opts["connect_timeout_s"]), http_client=http_client)

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        if timeout_s <= 0:
            raise BackendTimeout(f"openai: no time left for {self._base_url} (timeout {timeout_s:.3f} s)")
        o = self.options
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": self._data_url(observation)}},
            {"type": "text", "text": self.tokenizer.prompt(observation.instruction)},
        ]}]
        start = time.monotonic()
        try:
            completion = self._client.chat.completions.create(
                model=o["model"], messages=messages, temperature=0.0, max_tokens=o["max_tokens"], n=1,
                extra_body=self._extra_body,
                timeout=openai.Timeout(timeout_s, connect=min(o["connect_timeout_s"], timeout_s)))
        except openai.APITimeoutError:
            raise BackendTimeout(f"openai: {self._base_url} did not answer within {timeout_s:.2f} s") from None
        except openai.APIConnectionError as exc:
            raise BackendError(f"openai: cannot reach {self._base_url} ({describe_exception(exc.__cause__ or exc)})"
                               f" — is the server running?") from None
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
            raise BackendError(
                f"openai: HTTP {exc.status_code} from {self._base_url}: {_server_message(exc)}") from None
        except openai.OpenAIError as exc:
            raise BackendError(f"openai: request to {self._base_url} failed: {describe_exception(exc)}") from None
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:
            raise BackendTimeout(f"openai: reply took {elapsed:.2f} s > {timeout_s:.2f} s; dropped")
        choices = getattr(completion, "choices", None)
        if not choices:
            raise BackendError(f"openai: {self._base_url} returned no choices")
        message = choices[0].message
        content = getattr(message, "content", None) if message is not None else None
        if content is None:
            raise BackendError(f"openai: {self._base_url} returned no message content "
                               f"(finish_reason={choices[0].finish_reason!r})")
        return BackendReply(seq=observation.seq, backend=self.name, text=content.strip())

    def close(self) -> None:
        self._client.close()

    def _data_url(self, observation: Observation) -> str:
        o = self.options
        image = observation.image
        try:
            if o["image_size"]:
                image = imaging.resize(image, o["image_size"], o["image_size"])
            if o["image_format"] == "png":
                data, mime = imaging.encode_png(image), "image/png"
            else:
                data, mime = imaging.encode_jpeg(image, o["jpeg_quality"]), "image/jpeg"
        except imaging.ImageEncodeError as exc:
            raise BackendError(f"openai: cannot encode the camera image: {exc}") from None
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
    """The server's error text in one short line (vLLM: {"error": {"message": ...}} or {"error": "..."})."""
    body = exc.body
    text = None
    if isinstance(body, dict):
        err = body.get("error", body.get("message", body.get("detail")))
        text = err.get("message") if isinstance(err, dict) else err
    text = str(text if text is not None else exc.message)
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= 200 else one_line[:200] + "…"
