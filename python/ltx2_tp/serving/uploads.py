"""The files a request uploads (multipart), each checked before anything is decoded, decoded off
the event loop, and written atomically into the job's directory (a `.partial` file renamed into
place: a refused or interrupted upload leaves nothing; the caller removes the directory when a
later check refuses the request).

    input_reference      an image: frame 0 (every pipeline; the keyframe pipeline's keyframe)
    video_reference      a video: the retake pipeline's source (sglang's multipart field)
    audio_path           an audio file (or a video with sound): A2Vid's soundtrack
    video_conditioning   up to MAX_REFERENCE_VIDEOS videos: IC-LoRA's references (repeat the part)

The image: its size from the header (a pixel limit), then decoded and written as PNG. Videos and
audio: kept as uploaded, after PyAV has read the container header (serving/media_probe.py: the
stream the field needs, frames, sides, length) and decoded one frame.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from ltx2_tp.pipelines.request import MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES, MAX_SIDE
from ltx2_tp.serving.errors import ApiError
from ltx2_tp.serving.media_probe import MediaInfo, probe

MAX_REFERENCE_VIDEOS = 4  # IC-LoRA references per request (ltx-pipelines' examples use one or two)
PARAM = "input_reference"
# suffixes kept from the client's file name (the pipelines open the stored file by its name too)
SAFE_SUFFIXES = {".mp4", ".mov", ".m4v", ".m4a", ".mkv", ".webm", ".avi", ".wav", ".mp3", ".flac", ".ogg", ".aac"}
_CHUNK = 2**20


@dataclass(frozen=True)
class UploadField:
    name: str  # the multipart field
    target: str  # the GenerationRequest field it fills (and the CLI flag's name)
    kind: str  # image | video | audio
    many: int  # how many files the field takes
    what: str  # for messages

    def file_name(self, index: int, client_name: str | None) -> str:
        """Its name in the job's directory: the field (and index), the client's suffix if it is a plain one."""
        if self.kind == "image":
            return f"{self.name}.png"  # decoded and written as PNG
        suffix = Path(client_name or "").suffix
        suffix = suffix.lower() if suffix.lower() in SAFE_SUFFIXES else ""
        return f"{self.name}{f'_{index}' if self.many > 1 else ''}{suffix}"


UPLOADS = {f.name: f for f in (
    UploadField("input_reference", "image_path", "image", 1, "an image at frame 0"),
    UploadField("video_reference", "video_path", "video", 1, "the retake pipeline's source video"),
    UploadField("audio_path", "audio_path", "audio", 1, "A2Vid's audio"),
    UploadField("video_conditioning", "video_conditioning", "video", MAX_REFERENCE_VIDEOS, "IC-LoRA's reference videos"),
)}
BY_TARGET = {f.target: f for f in UPLOADS.values()}


@dataclass(frozen=True)
class UploadLimits:
    max_image_bytes: int = 10 * 2**20  # serve --max-upload-bytes
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_media_bytes: int = MAX_MEDIA_BYTES  # serve --max-media-upload-bytes (every video and audio file together)
    max_frames: int = 2001  # serve --max-frames: a video upload's frames
    max_side: int = MAX_SIDE


@dataclass(frozen=True)
class Saved:
    path: Path
    info: MediaInfo | None = None  # None: the image


def check_names(files: dict[str, list]) -> None:
    """Only the known upload fields, each with at most its number of files: else a 400 naming it."""
    for name, parts in files.items():
        field = UPLOADS.get(name)
        if field is None:
            raise ApiError(400, f"unexpected file field {name!r}; files go in {', '.join(UPLOADS)}", name)
        if len(parts) > field.many:
            raise ApiError(400, f"{name} takes at most {field.many} file(s), got {len(parts)}", name)


async def save_uploads(files: dict[str, list], job_dir: Path, limits: UploadLimits) -> dict[str, list[Saved]]:
    """Every uploaded file, checked and written into `job_dir` (created): field -> what was saved."""
    check_names(files)
    saved: dict[str, list[Saved]] = {}
    media_budget = limits.max_media_bytes
    for name, parts in files.items():
        field = UPLOADS[name]
        for i, upload in enumerate(parts):
            dest = job_dir / field.file_name(i, getattr(upload, "filename", None))
            if field.kind == "image":
                await save_image(upload, dest, limits.max_image_bytes, limits.max_image_pixels)
                saved.setdefault(name, []).append(Saved(dest))
                continue
            info, size = await run_in_threadpool(_save_media, upload.file, dest, field, media_budget, limits)
            media_budget -= size
            saved.setdefault(name, []).append(Saved(dest, info))
    return saved


def _save_media(src, dest: Path, field: UploadField, budget: int, limits: UploadLimits) -> tuple[MediaInfo, int]:
    """Copy (at most `budget` bytes), probe the copy, rename it into place: (its info, its size)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        src.seek(0)
        size = 0
        with open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > budget:
                    raise ApiError(413, f"{field.name}: the request's video and audio files together are larger than "
                                        f"{limits.max_media_bytes} bytes (--max-media-upload-bytes)", field.name,
                                   "file_too_large")
                out.write(chunk)
        if size == 0:
            raise ApiError(400, f"{field.name} is empty", field.name, "invalid_media")
        info = probe(tmp, field.name, field.kind, limits.max_frames, limits.max_side)
        os.replace(tmp, dest)
        return info, size
    finally:
        tmp.unlink(missing_ok=True)


# ---- the image ------------------------------------------------------------------------------
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
