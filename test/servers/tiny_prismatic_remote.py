"""Remote code of the tiny OpenVLA-style checkpoint the matrix test builds for ``backend.type: local``.

OpenVLA ships its modelling code inside the checkpoint (``modeling_prismatic.py``, loaded with
``trust_remote_code``) and its processor has no image placeholder: the image patches go in front
of the prompt. ``config/backends/local.yaml`` is written for exactly that, so the matrix test
copies this file into a tiny random-weight LLaVA checkpoint (test/tiny_models.py) as
``modeling_tiny_prismatic.py``: :class:`TinyPrismaticProcessor` puts the image token in front when
the prompt has none, and both classes append what they received to the JSON-lines file named by
the environment variable ``RT2_TEST_LOCAL_LOG`` — the local backend's "server log".

Not a model of anything: the weights are random; the backend's constrained decoding makes every
answer a valid action. This file runs in the policy node's process (imported by transformers from
the checkpoint directory), so it imports only what a checkpoint's code may import.
"""

from __future__ import annotations

import json
import os

import numpy as np
from transformers import LlavaForConditionalGeneration, LlavaProcessor

LOG_ENV = "RT2_TEST_LOCAL_LOG"


def _log(entry: dict) -> None:
    path = os.environ.get(LOG_ENV, "")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _describe(image) -> dict:
    """Shape, dtype and centre pixel of a PIL image or an array (HxWxC)."""
    arr = np.asarray(image)
    centre = arr[arr.shape[0] // 2, arr.shape[1] // 2].tolist() if arr.ndim == 3 else None
    return {"type": type(image).__name__, "mode": getattr(image, "mode", None), "shape": list(arr.shape),
            "dtype": str(arr.dtype), "centre": centre}


class TinyPrismaticProcessor(LlavaProcessor):
    """LlavaProcessor that, like OpenVLA's PrismaticProcessor, needs no image placeholder in the prompt."""

    def __call__(self, images=None, text=None, **kwargs):
        image_list = images if isinstance(images, (list, tuple)) else ([] if images is None else [images])
        texts = text if isinstance(text, (list, tuple)) else [text]
        _log({"where": "processor", "n_images": len(image_list), "images": [_describe(i) for i in image_list],
              "text": texts[0] if len(texts) == 1 else texts})
        if image_list and texts and texts[0] is not None and self.image_token not in texts[0]:
            texts = [self.image_token * len(image_list) + t for t in texts]
        return super().__call__(images=images, text=texts if isinstance(text, (list, tuple)) else texts[0], **kwargs)


class TinyPrismaticForActionPrediction(LlavaForConditionalGeneration):
    """A LLaVA that logs the pixel values and prompt length of each generate call."""

    def generate(self, *args, **kwargs):
        pixels, ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
        _log({"where": "model", "pixel_values": None if pixels is None else list(pixels.shape),
              "pixel_dtype": None if pixels is None else str(pixels.dtype).removeprefix("torch."),
              "input_ids": None if ids is None else list(ids.shape),
              "last_ids": None if ids is None else ids[0, -2:].tolist()})
        return super().generate(*args, **kwargs)
