"""Null OpenAI-compatible chat server for bench/transport.py: uvicorn + FastAPI like vLLM's, no model.

test/servers/openai_chat_server.py is a checking fixture on http.server, which writes the headers and
the body of a reply in two sends without TCP_NODELAY: Nagle's algorithm plus the client's delayed ACK
then add ~40 ms to every call, a cost of that fixture that vLLM (uvicorn, TCP_NODELAY) does not have.
This one answers ``POST /v1/chat/completions`` on the same stack as vLLM: it decodes every data-URL
image (as vLLM's processor must) and answers fixed RT-2 number text. Prints "READY <port>".

    .venv/bin/python bench/null_servers.py openai --port 0
"""

from __future__ import annotations

import argparse
import base64
import socket
import sys
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rt2_ros.imaging import decode_image

ANSWER = "0 128 128 128 128 128 128 0"


def openai_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        for part in body["messages"][0]["content"]:
            if part["type"] == "image_url":
                decode_image(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
        return JSONResponse({"id": "chatcmpl-null", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", ""),
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                                          "finish_reason": "stop", "logprobs": None}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 16, "total_tokens": 26}})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["openai"])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    sock = socket.create_server(("127.0.0.1", args.port))
    print(f"READY {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(openai_app(), log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
