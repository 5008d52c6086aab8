"""Test stand-in for vLLM's OpenAI-compatible server: ``POST /v1/chat/completions`` only, no model.

Checks what a real vLLM deployment would: the bearer key (env ``OPENAI_TEST_API_KEY``; 401 with
vLLM's ``{"error": "Unauthorized"}`` body when wrong), the model name (404 otherwise), that the
user message carries one or more (``--max-images``, vLLM's ``--limit-mm-per-prompt``) decodable
base64 data-URL images and a text part, and — with ``--guided-field`` — that the
request carries the structured-output regex in that field (400 otherwise). Its answer is number
text derived from the image ("0 <mean> 128 128 128 128 128 255"), and it refuses (400) to send an
answer its own guided regex does not fully match (``re.fullmatch``), as constrained decoding would
never emit one.

Prompts containing "sleep:<seconds>", "no-choices" or "null-content" select failure modes. Each
request is summarised as one JSON line in ``--log``: the prompt (the last text part), every text
part, and per image its label (the text part just before it, if any), MIME type, decoded shape,
dtype and centre pixel; ``mime``/``shape`` repeat the first image's. Prints "READY <port>" once
listening.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from rt2_ros.imaging import decode_image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--model", default="rt2-test")
    parser.add_argument("--max-images", type=int, default=8, help="images per request (vLLM --limit-mm-per-prompt)")
    parser.add_argument("--guided-field", choices=("structured_outputs", "guided_regex", "none"),
                        default="structured_outputs")
    args = parser.parse_args()
    api_key = os.environ.get("OPENAI_TEST_API_KEY", "")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn

        def log_message(self, format: str, *log_args: Any) -> None:  # quiet test output
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route {self.path}")
                return
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._send(401, {"error": "Unauthorized"})
                return
            request = json.loads(body)
            if request.get("model") != args.model:
                self._error(404, f"The model `{request.get('model')}` does not exist.")
                return
            try:
                content = request["messages"][0]["content"]
                images, texts, label = [], [], None
                for part in content:
                    if part["type"] == "text":
                        texts.append(part["text"])
                        label = part["text"]
                    elif part["type"] == "image_url":
                        header, b64 = part["image_url"]["url"].split(",", 1)
                        mime = header.removeprefix("data:").removesuffix(";base64")
                        images.append((mime, decode_image(base64.b64decode(b64, validate=True)), label))
                        label = None
                    else:
                        raise ValueError(f"unknown content part type {part['type']!r}")
                if not images or not texts:
                    raise ValueError(f"{len(images)} images and {len(texts)} text parts")
                if len(images) > args.max_images:
                    raise ValueError(f"{len(images)} images, this server takes at most {args.max_images} "
                                     f"(vLLM --limit-mm-per-prompt)")
                prompt = texts[-1]  # the instruction prompt comes last, after the images and their labels
                mime, image = images[0][0], images[0][1]
            except Exception as exc:
                self._error(400, f"bad message content: {exc!r}")
                return
            regex = None
            if args.guided_field == "structured_outputs":
                regex = (request.get("structured_outputs") or {}).get("regex")
            elif args.guided_field == "guided_regex":
                regex = request.get("guided_regex")
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({
                    "prompt": prompt, "mime": mime, "shape": list(image.shape), "regex": regex,
                    "n_images": len(images), "texts": texts,
                    "images": [{"label": lab, "mime": m, "shape": list(img.shape), "dtype": str(img.dtype),
                                "centre": img[img.shape[0] // 2, img.shape[1] // 2].tolist()}
                               for m, img, lab in images],
                    "temperature": request.get("temperature"), "max_tokens": request.get("max_tokens"),
                    "extra_keys": sorted(k for k in request if k not in ("model", "messages"))}) + "\n")
            if args.guided_field != "none" and not regex:
                self._error(400, f"this server requires a regex in {args.guided_field}")
                return
            if m := re.search(r"sleep:([0-9.]+)", prompt):
                time.sleep(float(m.group(1)))
            mean = int(np.clip(round(float(image.mean())), 0, 255))
            answer = f"0 {mean} 128 128 128 128 128 255"
            if regex is not None and re.fullmatch(regex, answer) is None:
                self._error(400, f"answer {answer!r} does not match the guided regex")
                return
            choices: list = [{"index": 0, "message": {"role": "assistant", "content": answer},
                              "finish_reason": "stop", "logprobs": None}]
            if "no-choices" in prompt:
                choices = []
            elif "null-content" in prompt:
                choices[0]["message"]["content"] = None
            self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                             "model": args.model, "choices": choices,
                             "usage": {"prompt_tokens": 10, "completion_tokens": 16, "total_tokens": 26}})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
