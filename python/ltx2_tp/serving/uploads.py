"""The input_reference image: size checked from its header before anything is decoded, decoded off
the event loop (a large image takes seconds), written atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from ltx2_tp.serving.errors import ApiError

MAX_IMAGE_PIXELS = 4096 * 4096  # the largest video side the request allows, squared
PARAM = "input_reference"


async def save_image(upload, dest: Path, max_bytes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, f"input_reference is larger than {max_bytes} bytes", PARAM, "file_too_large")
    await run_in_threadpool(_decode_and_save, data, dest, max_pixels)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone (PIL's open reads no pixel data)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:  # PIL's own ceiling (~179 Mpixel), checked in open
        return (2**31, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(400, "input_reference must be an image (PNG, JPEG, WebP)", PARAM) from None


def _decode_and_save(data: bytes, dest: Path, max_pixels: int) -> None:
    from PIL import Image

    w, h = image_size(data)
    if w * h > max_pixels:
        shown = f"{w}x{h}" if w < 2**31 else "over 179 million pixels"
        raise ApiError(400, f"input_reference is {shown}; at most {max_pixels} pixels "
                            f"(e.g. {int(max_pixels ** 0.5)}x{int(max_pixels ** 0.5)})", PARAM, "image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(400, "input_reference must be an image (PNG, JPEG, WebP)", PARAM) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
