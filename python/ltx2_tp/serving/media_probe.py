"""What an uploaded video or audio file holds, read with PyAV from its container header before any
frame is decoded; then one frame is decoded to prove the stream decodes. Every refusal is a 400
naming the form field and the allowed range. Runs in a worker thread (serving/uploads.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ltx2_tp.pipelines.request import FPS_RANGE, MAX_SIDE
from ltx2_tp.serving.errors import ApiError

# A2Vid reads a window of the audio (audio_start_time, the video's length): an hour bounds a typo
# or a hostile header without refusing any real soundtrack; the byte limit is the real bound.
MAX_AUDIO_SECONDS = 3600.0
# Demuxers an upload may be opened with, and local files only: a playlist (HLS, concat, ...) would
# make FFmpeg read other files on the server or fetch URLs (found in review: an .m3u8 upload naming
# another job's video.mp4 was decoded and accepted). FFmpeg matches these against each demuxer's
# name list ("mov" covers mp4 / m4a / 3gp).
SAFE_FORMATS = "mov,matroska,webm,avi,wav,mp3,flac,ogg,aac"
OPEN_OPTIONS = {"format_whitelist": SAFE_FORMATS, "protocol_whitelist": "file"}
WHAT = {"video": "a video file (MP4, WebM, MOV, MKV)", "audio": "an audio file (WAV, MP3, FLAC, AAC, or a video "
        "with sound)"}


@dataclass(frozen=True)
class MediaInfo:
    format: str  # FFmpeg's demuxer name
    frames: int = 0  # video frames (0: no video stream)
    fps: float = 0.0
    width: int = 0
    height: int = 0
    audio_seconds: float | None = None  # None: no audio stream

    @property
    def seconds(self) -> float:
        """The video's length as the pipelines count it (retake's TemporalRegionMask: frames / fps)."""
        return self.frames / self.fps if self.fps else 0.0


def probe(path: Path, param: str, kind: str, max_frames: int, max_side: int = MAX_SIDE) -> MediaInfo:
    """`kind` "video": a video stream of at most `max_frames` frames and `max_side` pixels a side;
    "audio": an audio stream of at most MAX_AUDIO_SECONDS."""
    import av

    try:
        container = av.open(str(path), metadata_errors="ignore", options=OPEN_OPTIONS)
    except (av.FFmpegError, OSError, ValueError):
        raise ApiError(400, f"{param} must be {WHAT[kind]}; FFmpeg cannot read it", param, "invalid_media") from None
    with container:
        fmt = container.format.name
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        info = MediaInfo(fmt, audio_seconds=_seconds(container, audio) if audio is not None else None)
        decoded = False
        if kind == "video":
            if video is None:
                raise ApiError(400, f"{param} has no video stream (it must be {WHAT['video']})", param, "no_video_stream")
            info, decoded = _video(container, video, info, param, max_frames, max_side)
        elif audio is None:
            raise ApiError(400, f"{param} has no audio stream (it must be {WHAT['audio']})", param, "no_audio_stream")
        elif info.audio_seconds is not None and info.audio_seconds > MAX_AUDIO_SECONDS:
            raise ApiError(400, f"{param} is {info.audio_seconds:.1f} s long; at most {MAX_AUDIO_SECONDS:g} s", param,
                           "media_too_long")
        if not decoded:
            _decode_one(container, video if kind == "video" else audio, param)
    return info


def _video(container, stream, info: MediaInfo, param: str, max_frames: int, max_side: int) -> tuple[MediaInfo, bool]:
    """(the video's info, whether every frame was decoded already: counted where the header has no count)."""
    w, h = stream.codec_context.width, stream.codec_context.height
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if not (1 <= w <= max_side and 1 <= h <= max_side):
        raise ApiError(400, f"{param} is {w}x{h}; each side must be between 1 and {max_side}", param, "video_too_large")
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ApiError(400, f"{param} runs at {fps:g} fps; between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}", param)
    frames, counted = stream.frames or 0, False
    if not frames:  # the container does not say (WebM, MKV): bounded by its duration, then counted
        seconds = _seconds(container, stream)  # as ltx-pipelines' get_videostream_metadata counts them
        if seconds is not None and seconds * fps > max_frames + 1:
            raise _too_many(param, f"about {round(seconds * fps)}", max_frames)
        frames, counted = _count_frames(container, stream, param, max_frames), True
    if frames > max_frames:
        raise _too_many(param, str(frames), max_frames)
    return MediaInfo(info.format, frames, fps, w, h, info.audio_seconds), counted


def _too_many(param: str, frames: str, max_frames: int) -> ApiError:
    return ApiError(400, f"{param} has {frames} frames; at most {max_frames} (this server's --max-frames)", param,
                    "media_too_long")


def _seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _count_frames(container, stream, param: str, max_frames: int) -> int:
    import av

    n = 0
    try:
        for _ in container.decode(stream):
            n += 1
            if n > max_frames:
                raise _too_many(param, f"more than {max_frames}", max_frames)
    except av.FFmpegError:
        raise ApiError(400, f"{param}: its video stream could not be decoded", param, "invalid_media") from None
    if not n:
        raise ApiError(400, f"{param}: its video stream has no frame", param, "invalid_media")
    return n


def _decode_one(container, stream, param: str) -> None:
    import av

    try:
        for _ in container.decode(stream):
            return
    except av.FFmpegError:
        pass
    raise ApiError(400, f"{param}: its {stream.type} stream could not be decoded", param, "invalid_media")
