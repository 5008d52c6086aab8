"""Image helpers shared by the backend clients: resize and encode an RGB frame for the wire.

Pure functions on ``uint8`` HxWx3 RGB numpy arrays, built on ``opencv-python-headless``
(already a dependency for JPEG/PNG and fast resizing). OpenCV works in BGR, so the channel
swap lives here once instead of in every backend. One exception: the aspect-keeping resize
with black bars (``pad=True``, what openpi policies get) is ``openpi_client.image_tools.
resize_with_pad`` itself (PIL bilinear, ``tf.image.resize_with_pad`` geometry), because an
openpi checkpoint was trained and evaluated on exactly those pixels (its LIBERO and DROID
clients call it) and an OpenCV look-alike differs in interpolation and rounding. Rejected:
PIL for everything (two image libraries where one does); hand-written encoders.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import PIL.Image
from openpi_client import image_tools


class ImageEncodeError(ValueError):
    """The image could not be resized or encoded (wrong shape/dtype, codec failure)."""


def _check_rgb(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        got = f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}"
        raise ImageEncodeError(f"expected a uint8 HxWx3 RGB image, got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageEncodeError(f"image has an empty side: {image.shape}")


def resize(image: np.ndarray, height: int, width: int, *, pad: bool = False) -> np.ndarray:
    """``image`` resized to ``height`` x ``width`` (uint8 RGB).

    ``pad=False`` squashes to the target size (what OpenVLA's processor does; OpenCV, area
    interpolation when shrinking, linear when enlarging). ``pad=True`` keeps the aspect ratio and
    pads with black, pixel for pixel as openpi's ``image_tools.resize_with_pad`` (see the module
    docstring); an image so elongated that a side would shrink to 0 px is refused.
    """
    _check_rgb(image)
    if height <= 0 or width <= 0:
        raise ImageEncodeError(f"target size must be positive, got {height}x{width}")
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if not pad:
        interp = cv2.INTER_AREA if height * width < h * w else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=interp)
    ratio = max(w / width, h / height)  # resize_with_pad's own geometry, checked before PIL fails on it
    if int(h / ratio) < 1 or int(w / ratio) < 1:
        raise ImageEncodeError(f"a {h}x{w} image is too elongated to pad into {height}x{width}")
    return np.ascontiguousarray(image_tools.resize_with_pad(image, height, width), dtype=np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image (``quality`` 1..100)."""
    _check_rgb(image)
    if not 1 <= quality <= 100:
        raise ImageEncodeError(f"JPEG quality must be in 1..100, got {quality}")
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageEncodeError("OpenCV failed to encode the image as JPEG")
    return buf.tobytes()


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB image."""
    _check_rgb(image)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageEncodeError("OpenCV failed to encode the image as PNG")
    return buf.tobytes()


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) a JPEG/PNG header declares, read without decoding the pixels, so a server can refuse
    a small file that would decompress to gigabytes before it allocates them (Pillow reads headers lazily)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise ImageEncodeError(f"bytes are a {img.format} image, not JPEG/PNG")
            return img.size
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exc:
        if isinstance(exc, ImageEncodeError):
            raise
        raise ImageEncodeError(f"bytes are not a decodable JPEG/PNG image ({exc})") from None


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 HxWx3 array from JPEG/PNG bytes (the inverse of the encoders; used by servers and tests)."""
    try:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as exc:  # e.g. more pixels than OPENCV_IO_MAX_IMAGE_PIXELS
        raise ImageEncodeError(f"bytes are not a decodable JPEG/PNG image ({exc.err or exc})") from None
    if arr is None:
        raise ImageEncodeError("bytes are not a decodable JPEG/PNG image")
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


__all__ = ["ImageEncodeError", "declared_size", "decode_image", "encode_jpeg", "encode_png", "resize"]
