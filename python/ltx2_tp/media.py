"""Writing the result: MP4 (H.264 + AAC) through ltx-pipelines' encoder, WebM (VP9 + Opus) and GIF
through PyAV. Files are written to a temporary name and renamed, so nothing half-written is left."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ltx2_tp.compat import ensure_ltx_imports


def write_media(frames: Iterator[torch.Tensor], chunks: int, fps: float, audio, path: str | Path, fmt: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if fmt == "mp4":
            ensure_ltx_imports()
            from ltx_pipelines.utils.media_io import encode_video

            # ltx-pipelines picks the container from the file name
            tmp_mp4 = tmp.with_suffix(".mp4")
            encode_video(frames, int(round(fps)), audio, str(tmp_mp4), chunks)
            os.replace(tmp_mp4, path)
        else:
            _write_av(frames, fps, audio if fmt == "webm" else None, tmp, fmt)
            os.replace(tmp, path)
    except BaseException:
        for p in (tmp, tmp.with_suffix(".mp4")):
            p.unlink(missing_ok=True)
        raise
    return path


def _write_av(frames, fps: float, audio, path: Path, fmt: str) -> None:
    """WebM (VP9 + Opus) or GIF. All streams are created before the first packet is muxed."""
    import av

    frames = iter(frames)
    first = next(frames).to("cpu").numpy().astype(np.uint8)
    rate = int(round(fps))
    container = av.open(str(path), mode="w", format="webm" if fmt == "webm" else "gif")
    try:
        vs = container.add_stream("libvpx-vp9" if fmt == "webm" else "gif", rate=rate)
        vs.width, vs.height = first.shape[2], first.shape[1]
        vs.pix_fmt = "yuv420p" if fmt == "webm" else "rgb8"
        astream = container.add_stream("libopus", rate=48000) if audio is not None else None
        n = 0
        for arr in itertools.chain([first], (c.to("cpu").numpy().astype(np.uint8) for c in frames)):
            for f in arr:
                frame = av.VideoFrame.from_ndarray(f, format="rgb24")
                frame.pts, frame.time_base, n = n, Fraction(1, rate), n + 1
                for pkt in vs.encode(frame):
                    container.mux(pkt)
        for pkt in vs.encode():
            container.mux(pkt)
        if astream is not None:
            wav = audio.waveform.float().cpu()
            wav = wav if wav.ndim == 2 else wav[None]
            layout = "stereo" if wav.shape[0] == 2 else "mono"
            frame = av.AudioFrame.from_ndarray(wav.clamp(-1, 1).numpy().astype(np.float32), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = audio.sampling_rate, 0
            resampler = av.AudioResampler(format="s16", layout=layout, rate=48000, frame_size=960)
            for rf in resampler.resample(frame) + resampler.resample(None):
                for pkt in astream.encode(rf):
                    container.mux(pkt)
            for pkt in astream.encode():
                container.mux(pkt)
    finally:
        container.close()
