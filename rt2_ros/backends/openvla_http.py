"""Client for an unmodified OpenVLA ``vla-scripts/deploy.py`` server (``POST /act``).

Wire format (fixed by the peer, not by us): the request body is JSON whose numpy arrays are
encoded by ``json-numpy`` (``{"__numpy__": base64, "dtype": ..., "shape": ...}``):
``{"image": uint8 HxWx3 RGB, "instruction": str, "unnorm_key": str}`` — one camera image, the
primary one unless ``camera`` names another (OpenVLA was trained on a single third-person view).
The server builds the
OpenVLA prompt itself from the instruction, runs ``predict_action`` and answers the bare
continuous action (a 7-vector, already un-normalised with the dataset's q01/q99 statistics),
json-numpy encoded. On any exception it answers the JSON string ``"error"`` with HTTP 200.

Why this shape: deploy.py has no auth, no health check and no timeouts, so the client brings
them: a keep-alive HTTP connection whose every call is bounded in total — connect, send, the
status line, headers and body, decode — by the budget the policy node gives (a server dripping
one byte at a time is cut off at the deadline, not per read: see rt2_ros.backends.http_budget),
a reply size cap (``max_reply_bytes``: deploy.py's answer is ~200 bytes), optional bearer token
for a reverse proxy in front of the server, and one-line errors. The JSON is decoded here, on the
caller's worker thread, bounded by the cap.
Rejected: ``requests`` (per-read timeouts only; see http_budget); ``json_numpy.patch()``
(monkey-patches the global ``json`` module for the whole process); deploy.py's ``{"encoded": ...}``
double-encoding path (broken upstream: its ``len(payload.keys() == 1)`` check always raises, so the
server answers "error").
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import TYPE_CHECKING

import httpx2
import json_numpy
import numpy as np

from rt2_ros import imaging
from rt2_ros.actions import BackendReply, Observation
from rt2_ros.backends import http_budget
from rt2_ros.backends.base import (
    Backend,
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

_P = "backend.openvla_http."

_ERROR_HINT = ("OpenVLA server returned 'error' — see its log; common cause: unnorm_key not in the model's "
               "dataset statistics")


class OpenVLAHttpBackend(Backend):
    """``backend.type: openvla_http`` — one ``POST {url}/act`` per observation, one action per reply."""

    name = "openvla_http"

    OPTIONS: tuple[ParamSpec, ...] = (
        ParamSpec(_P + "url", "string", "http://127.0.0.1:8000",
                  "Base URL of the OpenVLA deploy.py server (http:// or https://); the client posts to {url}/act."),
        ParamSpec(_P + "unnorm_key", "string", "bridge_orig",
                  "Dataset statistics key the server un-normalises with (e.g. bridge_orig, fractal20220817_data); "
                  "empty = omit it (only valid for a model trained on a single dataset)."),
        ParamSpec(_P + "camera", "string", "",
                  "The camera (a name of the policy node's cameras.names) whose frame is sent as image; empty = the "
                  "primary (first) camera. A named camera missing from an observation fails the request."),
        ParamSpec(_P + "image_size", "int", 224,
                  "Resize the camera image to image_size x image_size before sending (OpenVLA's processor squashes "
                  "to 224 anyway, so this only saves bandwidth); 0 = send the full frame.", "px", low=0, high=4096),
        ParamSpec(_P + "connect_timeout_s", "double", 2.0,
                  "TCP connect timeout (capped by the request budget, backend.timeout_s, which bounds the whole "
                  "request: connect, send, receive, decode).", "s", low=0.01, high=60.0),
        max_reply_bytes_spec(_P, "status line, headers and body as received"),
        *credential_specs(_P, key_use="a bearer token for a reverse proxy in front of deploy.py (sent as "
                          "'Authorization: Bearer TOKEN')", scheme="https", secret="bearer token"),
    )

    @classmethod
    def check_options(cls, options: dict) -> None:
        check_server_url(_P, "url", options, "http", "https")

    def __init__(self, options: dict, tokenizer: ActionTokenizer) -> None:
        opts = resolve_options(self.OPTIONS, _P, options)
        super().__init__(opts, tokenizer)
        self.check_options(opts)
        url = opts["url"].rstrip("/")
        self._act_url = f"{url}/act"
        self._cameras = check_camera_names([opts["camera"]], f"{_P}camera") if opts["camera"] else []
        self._image_size: int = opts["image_size"]
        self._unnorm_key: str = opts["unnorm_key"]
        self._connect_timeout_s: float = opts["connect_timeout_s"]
        self._max_reply_bytes: int = opts["max_reply_bytes"]
        token = load_secret(opts["api_key_env"], opts["api_key_file"], _P)
        headers = {"Content-Type": "application/json"}
        # deploy.py has no auth; a proxy in front of it may. Never log the token itself.
        if token:
            headers["Authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = server_ssl_context(_P, "url", opts, "https") or True
        options = http_budget.client_options(verify)
        options["headers"].update(headers)
        self._client = httpx2.Client(**options)

    def infer(self, observation: Observation, timeout_s: float) -> BackendReply:
        start = time.monotonic()
        deadline = start + timeout_s  # the budget covers encoding and decoding too
        if timeout_s <= 0:
            raise BackendTimeout(f"openvla_http: no time left for {self._act_url} (timeout {timeout_s:.3f} s)")
        [(camera, image)] = camera_frames(observation, self._cameras, f"{_P}camera", self.name)
        if self._image_size:
            try:
                image = imaging.resize(image, self._image_size, self._image_size)
            except imaging.ImageEncodeError as exc:
                raise BackendError(f"openvla_http: cannot resize the camera image {camera!r}: {exc}") from None
        payload: dict = {"image": np.ascontiguousarray(image), "instruction": observation.instruction}
        if self._unnorm_key:
            payload["unnorm_key"] = self._unnorm_key
        body = json_numpy.dumps(payload).encode()

        left = time_left(deadline)
        if left <= 0:
            raise BackendTimeout(f"openvla_http: the budget of {timeout_s:.2f} s was spent encoding the image")
        try:
            with http_budget.call_budget(deadline, self._max_reply_bytes, f"{_P}max_reply_bytes"):
                response = self._client.post(self._act_url, content=body,
                                             timeout=http_budget.timeout(left, self._connect_timeout_s))
        except httpx2.ConnectTimeout:
            raise BackendTimeout(
                f"openvla_http: connect to {self._act_url} timed out after "
                f"{min(self._connect_timeout_s, timeout_s):.2f} s — is the host reachable?") from None
        except httpx2.TimeoutException:
            raise BackendTimeout(
                f"openvla_http: {self._act_url} did not answer within {timeout_s:.2f} s; connection closed") from None
        except http_budget.ReplyRejected as exc:
            raise BackendError(f"openvla_http: {self._act_url}: {exc}") from None
        except httpx2.ConnectError as exc:
            raise BackendError(
                f"openvla_http: cannot reach {self._act_url} ({describe_exception(exc)}) — is deploy.py running?"
            ) from None
        except httpx2.HTTPError as exc:
            raise BackendError(f"openvla_http: request to {self._act_url} failed: {describe_exception(exc)}") from None
        actions = self._parse(response)
        elapsed = time.monotonic() - start
        if elapsed > timeout_s:  # a reply later than the budget is dropped, never executed late
            raise BackendTimeout(
                f"openvla_http: reply from {self._act_url} took {elapsed:.2f} s > {timeout_s:.2f} s; dropped")
        return BackendReply(seq=observation.seq, backend=self.name, actions=actions)

    def _parse(self, response: httpx2.Response) -> np.ndarray:
        """The action array in ``response`` (already read, at most max_reply_bytes)."""
        content = response.content
        if response.status_code in (401, 403):
            raise BackendError(
                f"openvla_http: {self._act_url} rejected the request (HTTP {response.status_code}) — "
                f"check {_P}api_key_env / {_P}api_key_file")
        if response.status_code != 200:
            raise BackendError(
                f"openvla_http: {self._act_url} answered HTTP {response.status_code}: {_text(content)}")
        try:
            value = json_numpy.loads(content)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, SyntaxError) as exc:
            # binascii.Error (bad base64) and json.JSONDecodeError are ValueErrors; SyntaxError: numpy parses
            # a dtype string such as ",1,0,0<f8" with ast (found by fuzzing, test_fuzz.py)
            raise BackendError(f"openvla_http: reply is not json-numpy ({snippet(exc, 80)}): {_text(content)}"
                               ) from None
        if isinstance(value, str):
            if value == "error":
                raise BackendError(_ERROR_HINT)
            raise BackendError(f"openvla_http: server answered a string instead of an action: {snippet(value)}")
        # deploy.py's docstring promises {"action": ...} although it returns the bare array; accept both.
        if isinstance(value, dict) and "action" in value:
            value = value["action"]
        try:
            actions = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise BackendError(f"openvla_http: reply is not a numeric action array: {_text(content)}") from None
        if actions.ndim == 1:
            actions = actions.reshape(1, -1)  # one step, no chunking
        if actions.ndim != 2 or actions.size == 0:
            raise BackendError(f"openvla_http: expected an action vector or (horizon, dim) chunk, got shape "
                               f"{actions.shape}")
        return actions

    def close(self) -> None:
        self._client.close()


def _text(content: bytes) -> str:
    """A reply body (outside bytes) as a short clean line for an error message."""
    return snippet(content[:1000].decode("utf-8", errors="replace"))
