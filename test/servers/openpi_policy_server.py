"""Test stand-in for an openpi policy server (``serve_policy.py``), same wire format, no model.

websockets asyncio server, msgpack via ``openpi_client.msgpack_numpy``: sends the metadata dict
first, then answers each observation dict with ``{"actions": (horizon, dim) float32,
"server_timing": {"infer_ms": ...}}``; on an exception sends the traceback as a text frame and
closes with 1011, like the real server. When the environment variable ``OPENPI_TEST_API_KEY`` is
set, the handshake must carry ``Authorization: Api-Key <key>`` (else HTTP 401).

Deterministic reply: row i of ``actions`` is ``i + image mean / 255`` in every column. Prompts
"raise" (server exception), "sleep:<seconds>" (slow answer) and "garbage" (a non-msgpack binary
frame) select failure modes. Metadata carries a per-process ``boot_id`` so tests can tell a
restarted server from the old one. Each observation is summarised as one JSON line in
``--log``. Prints "READY <port>" once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import os
import time
import traceback
import uuid

import numpy as np
import websockets
import websockets.asyncio.server as ws_server
from openpi_client import msgpack_numpy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--dim", type=int, default=7)
    args = parser.parse_args()
    api_key = os.environ.get("OPENPI_TEST_API_KEY", "")
    metadata = {"boot_id": uuid.uuid4().hex, "action_horizon": args.horizon, "action_dim": args.dim}

    def check_key(connection: ws_server.ServerConnection, request: ws_server.Request) -> ws_server.Response | None:
        if api_key and request.headers.get("Authorization") != f"Api-Key {api_key}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "invalid api key\n")
        return None

    async def handler(websocket: ws_server.ServerConnection) -> None:
        packer = msgpack_numpy.Packer()
        await websocket.send(packer.pack(metadata))
        while True:
            try:
                obs = msgpack_numpy.unpackb(await websocket.recv())
                start = time.monotonic()
                image = obs.get("observation/image")
                state = obs.get("observation/state")
                prompt = obs.get("prompt", "")
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({
                        "keys": sorted(obs), "prompt": prompt,
                        "shape": list(np.shape(image)), "dtype": str(getattr(image, "dtype", "")),
                        "state": None if state is None else np.asarray(state).tolist(),
                        "state_dtype": None if state is None else str(np.asarray(state).dtype)}) + "\n")
                if prompt == "raise":
                    raise ValueError("policy exploded on purpose")
                if prompt.startswith("sleep:"):
                    await asyncio.sleep(float(prompt.split(":", 1)[1]))
                if prompt == "garbage":
                    await websocket.send(b"\xc1\xc1\xc1")
                    continue
                value = float(np.asarray(image).mean()) / 255.0
                actions = (np.arange(args.horizon, dtype=np.float32)[:, None]
                           + np.full((args.horizon, args.dim), value, dtype=np.float32))
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
