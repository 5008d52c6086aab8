"""Test stand-in for an openpi policy server (``serve_policy.py``), same wire format, no model.

websockets asyncio server, msgpack via ``openpi_client.msgpack_numpy``: sends the metadata dict
first, then answers each observation dict with ``{"actions": (horizon, dim) float32,
"server_timing": {"infer_ms": ...}}``; on an exception sends the traceback as a text frame and
closes with 1011, like the real server. When the environment variable ``OPENPI_TEST_API_KEY`` is
set, the handshake must carry ``Authorization: Api-Key <key>`` (else HTTP 401).

Checks, as a real policy's input transform would fail on them (an exception: traceback frame and
close 1011): with ``--require-keys a,b`` every listed key must be present; with ``--state-dim N``
the ``--state-key`` array must hold N float32 values; with ``--image-size S`` every 3-D array (an
image) must be uint8 SxSx3. Without these flags nothing is checked.

Deterministic reply: row i of ``actions`` is ``(i + image mean / 255) * --action-scale`` in every
column (the image under ``observation/image``, else the first image; scale 1 by default, 1/horizon
keeps every row inside a [-1, 1] action range). Prompts "raise" (server exception),
"sleep:<seconds>[~<jitter>]" (slow answer: uniform in seconds +- jitter, seeded) and "garbage" (a
non-msgpack binary frame) select failure modes.
Metadata carries a per-process ``boot_id`` so tests can tell a restarted server from the old one.
Each observation is summarised as one JSON line in ``--log`` (before the checks): its keys, every
image's shape, dtype and centre pixel, the state, the prompt, and what failed a check.
Prints "READY <port>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import os
import random
import time
import traceback
import uuid

import numpy as np
import websockets
import websockets.asyncio.server as ws_server
from openpi_client import msgpack_numpy

_JITTER = random.Random(0)  # per-call latency jitter of sleep:<s>~<j> prompts, reproducible per run


def describe(image: np.ndarray) -> dict:
    """Shape, dtype and centre pixel of an image (the centre survives padding and resizing)."""
    centre = image[image.shape[0] // 2, image.shape[1] // 2].tolist() if image.size else None
    return {"shape": list(image.shape), "dtype": str(image.dtype), "centre": centre}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--dim", type=int, default=7)
    parser.add_argument("--action-scale", type=float, default=1.0, help="factor of every action value")
    parser.add_argument("--require-keys", default="", help="comma-separated keys every observation must carry")
    parser.add_argument("--state-key", default="observation/state")
    parser.add_argument("--state-dim", type=int, default=0, help="required length of the state vector; 0 = any")
    parser.add_argument("--image-size", type=int, default=0, help="required side of every image; 0 = any")
    args = parser.parse_args()
    required = [k for k in args.require_keys.split(",") if k]
    api_key = os.environ.get("OPENPI_TEST_API_KEY", "")
    metadata = {"boot_id": uuid.uuid4().hex, "action_horizon": args.horizon, "action_dim": args.dim}

    def check_key(connection: ws_server.ServerConnection, request: ws_server.Request) -> ws_server.Response | None:
        if api_key and request.headers.get("Authorization") != f"Api-Key {api_key}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "invalid api key\n")
        return None

    def check(obs: dict, images: dict, state: object) -> list[str]:
        problems = [f"missing key {k!r}" for k in required if k not in obs]
        for key, img in images.items() if args.image_size else ():
            if img.dtype != np.uint8 or img.shape != (args.image_size, args.image_size, 3):
                problems.append(f"{key}: expected uint8 {args.image_size}x{args.image_size}x3, got {img.dtype} "
                                f"{img.shape}")
        if args.state_dim:
            arr = np.asarray(state) if state is not None else None
            if arr is None or arr.dtype != np.float32 or arr.shape != (args.state_dim,):
                problems.append(f"{args.state_key}: expected {args.state_dim} float32 values, got "
                                f"{None if arr is None else (str(arr.dtype), arr.shape)}")
        return problems

    async def handler(websocket: ws_server.ServerConnection) -> None:
        packer = msgpack_numpy.Packer()
        await websocket.send(packer.pack(metadata))
        while True:
            try:
                obs = msgpack_numpy.unpackb(await websocket.recv())
                start = time.monotonic()
                images = {k: v for k, v in obs.items() if isinstance(v, np.ndarray) and v.ndim == 3}
                image = obs.get("observation/image", next(iter(images.values()), None))
                state = obs.get(args.state_key)
                prompt = obs.get("prompt", "")
                problems = check(obs, images, state)
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({
                        "keys": sorted(obs), "prompt": prompt,
                        "shape": list(np.shape(image)), "dtype": str(getattr(image, "dtype", "")),
                        "images": {k: describe(v) for k, v in images.items()},
                        "state": None if state is None else np.asarray(state).tolist(),
                        "state_dtype": None if state is None else str(np.asarray(state).dtype),
                        "arrays": {k: [list(np.shape(v)), str(v.dtype)] for k, v in obs.items()
                                   if isinstance(v, np.ndarray) and v.ndim < 3},
                        "problems": problems}) + "\n")
                if problems:
                    raise ValueError("observation rejected: " + "; ".join(problems))
                if prompt == "raise":
                    raise ValueError("policy exploded on purpose")
                if prompt.startswith("sleep:"):
                    delay, _, jitter = prompt.split(":", 1)[1].partition("~")
                    spread = float(jitter) if jitter else 0.0
                    await asyncio.sleep(max(0.0, float(delay) + _JITTER.uniform(-spread, spread)))
                if prompt == "garbage":
                    await websocket.send(b"\xc1\xc1\xc1")
                    continue
                value = float(np.asarray(image).mean()) / 255.0
                actions = (np.arange(args.horizon, dtype=np.float32)[:, None]
                           + np.full((args.horizon, args.dim), value, dtype=np.float32))
                if args.action_scale != 1.0:
                    actions *= np.float32(args.action_scale)
                reply = {"actions": actions, "server_timing": {"infer_ms": (time.monotonic() - start) * 1000}}
                await websocket.send(packer.pack(reply))
            except websockets.ConnectionClosed:
                break
            except Exception:
                await websocket.send(traceback.format_exc())
                await websocket.close(code=1011, reason="Internal server error. Traceback included in previous frame.")
                break

    async def serve() -> None:
        async with ws_server.serve(handler, "127.0.0.1", args.port, compression=None, max_size=None,
                                   process_request=check_key) as server:
            port = server.sockets[0].getsockname()[1]
            print(f"READY {port}", flush=True)
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
