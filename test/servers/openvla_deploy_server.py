"""Test stand-in for OpenVLA's ``vla-scripts/deploy.py`` (same wire format, no model).

FastAPI + uvicorn, ``json_numpy.patch()`` so request bodies decode numpy arrays and
``JSONResponse`` encodes them, ``POST /act`` taking ``{"image", "instruction", "unnorm_key"}``
and answering a bare 7-float array, or the JSON string "error" with HTTP 200 on any exception
(e.g. an unknown ``unnorm_key``), exactly like the real server.

The action is a deterministic function of the request so tests can check it: [image mean / 255,
height / 1000, width / 1000, len(instruction) / 100, index of unnorm_key, 0, 1]. An instruction
"sleep:<seconds>" delays the answer (slow-server tests). Each request is summarised as one JSON
line in ``--log`` (written before the reply): keys, image shape, dtype and centre pixel,
instruction, unnorm_key. Prints "READY <port>" once listening.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from typing import Any

import json_numpy
import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

json_numpy.patch()


def centre_pixel(image: Any) -> list | None:
    """The centre pixel of an HxWx3 array (survives resizing of a uniform test frame), else None."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.size:
        return image[image.shape[0] // 2, image.shape[1] // 2].tolist()
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--unnorm-keys", default="bridge_orig,fractal20220817_data")
    args = parser.parse_args()
    unnorm_keys = args.unnorm_keys.split(",")

    def predict_action(payload: dict[str, Any]):  # no return annotation: FastAPI would take it as a response model
        try:
            image, instruction = payload["image"], payload["instruction"]
            unnorm_key = payload.get("unnorm_key")
            with open(args.log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"keys": sorted(payload), "shape": list(np.shape(image)),
                                    "dtype": str(getattr(image, "dtype", type(image).__name__)),
                                    "centre": centre_pixel(image),
                                    "instruction": instruction, "unnorm_key": unnorm_key}) + "\n")
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
                raise TypeError("image must be a uint8 HxWx3 array")
            if unnorm_key is None:  # like a multi-dataset OpenVLA model: the key is mandatory
                raise AssertionError("unnorm_key is required for this model")
            key_index = unnorm_keys.index(unnorm_key)  # ValueError for an unknown key, like norm_stats[...]
            if instruction.startswith("sleep:"):
                time.sleep(float(instruction.split(":", 1)[1]))
            h, w = image.shape[:2]
            action = np.array([image.mean() / 255.0, h / 1000.0, w / 1000.0, len(instruction) / 100.0,
                               float(key_index), 0.0, 1.0])
            return JSONResponse(action)
        except Exception:  # the real server catches everything and answers "error"
            logging.exception("request failed")
            return "error"

    app = FastAPI()
    app.post("/act")(predict_action)
    sock = socket.create_server(("127.0.0.1", args.port))
    print(f"READY {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
