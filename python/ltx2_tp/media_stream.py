"""MP4 (H.264 + AAC) written while the video is still being decoded: frames go through a bounded
queue to an encoder thread, which encodes and muxes them with the audio interleaved.

With the default `EncoderOptions` the streams are the ones ltx-pipelines' `encode_video` writes
(libx264 at PyAV's defaults: preset medium, CRF 23, yuv420p; AAC from the same int16 samples), so
the decoded frames and audio are bit-identical to media.write_media's (test/test_decode.py); what
changes is where the work runs. ltx-pipelines' writer cannot be fed incrementally (audio goes in
one frame after all video), so its conversion steps are repeated here, chunk by chunk.

Like media.py, the file is written to a temporary name and renamed when complete; an exception on
either side (the producer or the encoder thread) removes it and joins the thread.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class EncoderOptions:
    """libx264 settings; None keeps PyAV's / x264's default (what ltx-pipelines writes today).

    preset: x264 speed preset (default medium). crf: constant rate factor (default 23; lower is
    better). frame_threads: x264 frame-parallel threads instead of PyAV's default slice threads
    (more throughput on many cores; a different bitstream). convert: "cpu" = swscale RGB -> YUV
    4:2:0 (today's arithmetic), "gpu" = on the decoding device (yuv.py; not bit-identical to
    swscale, deviation measured there). convert_threads: threads running swscale beside the
    encoder thread (None: a quarter of the cores, at most 4; 0: in the encoder thread); the
    output does not depend on it.
    """

    preset: str | None = None
    crf: float | None = None
    frame_threads: bool = False
    convert: str = "cpu"
    convert_threads: int | None = None

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"video encoder preset must be one of {PRESETS}, got {self.preset!r}")
        if self.crf is not None and not (0 <= float(self.crf) <= 51):
            raise ValueError(f"video encoder crf must be between 0 and 51, got {self.crf}")
        if self.convert not in ("cpu", "gpu"):
            raise ValueError(f"video conversion must be 'cpu' or 'gpu', got {self.convert!r}")

    def swscale_threads(self) -> int:
        if self.convert != "cpu":
            return 0
        if self.convert_threads is not None:
            return self.convert_threads
        return min(4, (os.cpu_count() or 1) // 4)

    def codec_options(self) -> dict[str, str]:
        opts = {}
        if self.preset is not None:
            opts["preset"] = self.preset
        if self.crf is not None:
            opts["crf"] = f"{float(self.crf):g}"
        return opts


EXACT_OPTIONS = EncoderOptions()  # ltx-pipelines' encode_video: x264 medium, CRF 23, swscale
# The default: x264's fastest preset at the same CRF, frame threads, RGB -> I420 on the GPU. On
# testsrc2 / mandelbrot at 768x512x121 its PSNR against the source's 4:2:0 is 45.3 / 37.9 dB, medium's
# 40.2 / 34.7 (no quality lost: CRF at ultrafast spends more bits), for 2.2 / 2.5x the bytes and
# 1/6 / 1/20 of medium's encode time (README "Decode and write").
FAST_OPTIONS = EncoderOptions(preset="ultrafast", frame_threads=True, convert="gpu")
DEFAULT_OPTIONS = EXACT_OPTIONS  # EncoderOptions() itself: what ltx-pipelines writes
_STOP = object()


class StreamingMP4Writer:
    """put() host uint8 frames (f, h, w, 3) RGB, or (f, h*3/2, w) I420 with convert="gpu"; finish()
    returns the path. `audio` is an ltx-core Audio, a Future of one (decoded meanwhile), or None;
    with a Future, `audio_rate` (the vocoder's output rate) lets the thread create the AAC stream
    and start encoding video before the audio is there (encoded video waits for it before muxing);
    or an AudioFeed, whose pieces are muxed as the video reaches them (close it before finish()).

    The queue holds at most `max_queue` put() calls; put() blocks while it is full and raises the
    encoder thread's exception as soon as there is one.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float, audio=None,
                 audio_rate: int | None = None, options: EncoderOptions = DEFAULT_OPTIONS, max_queue: int = 8):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.width, self.height, self.rate = width, height, int(round(fps))
        self.options = options
        self._audio, self._audio_rate = audio, audio_rate
        self._q: queue.Queue = queue.Queue(max_queue)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._done = False
        self.frames = 0
        self.audio_samples = 0
        self.encode_s = 0.0  # time the thread spent converting + encoding + muxing
        self.wait_s = 0.0  # time the thread waited for frames
        # perf_counter when the thread had encoded every frame handed over (after finish()'s stop),
        # and when the file was closed: finish() = backlog (frames still queued) + x264's flush,
        # the audio left and the close
        self.t_drained = self.t_closed = 0.0
        self.t_first = 0.0  # perf_counter when the first frames were there to encode (copied to the host)
        self._thread = threading.Thread(target=self._run, name="ltx2_tp-mp4-encoder", daemon=True)
        self._thread.start()

    # ---- producer side -------------------------------------------------------------------
    def put(self, frames, ready: Callable[[], None] | None = None) -> None:
        """Hand over a chunk of frames. `ready` (e.g. a CUDA event's synchronize) is called by the
        encoder thread before it reads them: the device -> host copy may still be in flight."""
        if self._done:
            raise RuntimeError("writer already finished")
        while True:
            self._raise_if_failed()
            try:
                self._q.put((frames, ready), timeout=0.05)
                return
            except queue.Full:
                continue

    def finish(self) -> Path:
        """Flush, close, rename; re-raises the encoder thread's exception (and removes the file)."""
        self._raise_if_failed()
        self._done = True
        while self._thread.is_alive():
            try:
                self._q.put(_STOP, timeout=0.05)
                break
            except queue.Full:
                self._raise_if_failed()
        self._thread.join()
        self._raise_if_failed()
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        """Stop the thread, drop what is queued and remove the temporary file."""
        self._done = True
        self._cancel.set()
        if isinstance(self._audio, AudioFeed):
            self._audio.close()  # the thread may be waiting for the last piece
        self._drain()  # the thread sees the cancel at its next frame
        try:
            self._q.put_nowait(_STOP)  # wakes a thread waiting for frames
        except queue.Full:
            pass
        self._thread.join()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._done:
            self.abort()
        return False

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self._done = True
            self._thread.join()
            self._drain()  # frees the pinned buffers still queued
            self.tmp.unlink(missing_ok=True)
            raise self._error

    def _drain(self) -> None:
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return

    # ---- encoder thread ------------------------------------------------------------------
    def _run(self) -> None:
        container = None
        try:
            import av

            container = av.open(str(self.tmp), mode="w", format="mp4")
            vs = container.add_stream("libx264", rate=self.rate, options=self.options.codec_options())
            vs.width, vs.height, vs.pix_fmt = self.width, self.height, "yuv420p"
            if self.options.frame_threads:
                vs.codec_context.thread_type = "FRAME"
            audio = _AudioTrack(container, self._audio, self._audio_rate) if self._audio is not None else None
            rgb = self.options.convert == "cpu"
            workers = self.options.swscale_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="ltx2_tp-swscale") if workers else None
            pending: deque = deque()  # frames (or futures of frames) in order, converted ahead of x264

            want = (self.height, self.width, 3) if rgb else (self.height * 3 // 2, self.width)

            def to_frame(f):
                if f.shape != want:  # swscale would silently rescale it
                    raise ValueError(f"frame of shape {f.shape}, expected {want}")
                f = np.ascontiguousarray(f)  # a no-op for what decode.py hands over
                if not rgb:
                    return av.VideoFrame.from_numpy_buffer(f, format="yuv420p")
                # the reformat libx264's context would do, done here (no copy of the RGB array)
                return av.VideoFrame.from_numpy_buffer(f, format="rgb24").reformat(format="yuv420p")

            held: list = []  # (frames encoded, their packets) waiting for the audio to be decoded

            def mux(n, packets):
                """Audio up to frame n's time, then frame n's packets: the muxer interleaves by dts.
                While the audio is still being decoded the packets wait here (compressed, small)
                and x264 goes on, so the encoder does not idle behind the vocoder; the file's
                bytes are the same as if it had waited."""
                if audio is None:
                    for pkt in packets:
                        container.mux(pkt)
                    return
                held.append((n, packets))
                if audio.ready():
                    for upto, pkts in held:
                        audio.write_until(upto / self.rate)
                        for pkt in pkts:
                            container.mux(pkt)
                    held.clear()

            def encode_next():
                x = pending.popleft()
                packets = vs.encode(x.result() if isinstance(x, Future) else x)
                self.frames += 1
                mux(self.frames, packets)

            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = self._q.get_nowait() if pending else self._q.get()
                    except queue.Empty:  # nothing new: encode what is converted
                        self.wait_s += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        encode_next()
                        self.encode_s += time.perf_counter() - t0
                        continue
                    self.wait_s += time.perf_counter() - t0
                    if self._cancel.is_set():
                        return
                    if item is _STOP:
                        break
                    t0 = time.perf_counter()
                    frames, ready = item
                    if ready is not None:
                        ready()
                    self.t_first = self.t_first or time.perf_counter()
                    for f in frames.numpy() if isinstance(frames, torch.Tensor) else frames:
                        pending.append(pool.submit(to_frame, f) if pool else to_frame(f))
                    while len(pending) > 2 * workers:
                        encode_next()
                        if self._cancel.is_set():
                            return
                    self.encode_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                while pending:
                    encode_next()
                self.t_drained = time.perf_counter()
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            if audio is not None:
                audio.wait()
            mux(self.frames, vs.encode())
            if audio is not None:
                audio.write_until(None)  # the rest, and flush
                self.audio_samples = audio.samples
            container.close()
            container = None
            self.t_closed = time.perf_counter()
            self.encode_s += self.t_closed - t0
        except BaseException as e:  # noqa: BLE001 - handed to the producer, which re-raises it
            self._error = e
        finally:
            if container is not None:
                try:
                    container.close()
                except Exception:  # noqa: BLE001 - the first error is the one reported
                    pass
            if self._error is not None or self._cancel.is_set():
                self.tmp.unlink(missing_ok=True)


class AudioFeed:
    """Audio given to a StreamingMP4Writer in pieces while it writes (a tiled long video hands over
    each tile's audio as it is decoded): append() waveforms at `rate`, close() after the last one.
    The writer muxes each piece once the video reaches its time and drops it, so only what is not
    written yet is held."""

    def __init__(self, rate: int):
        self.rate = int(rate)
        self.appended = 0  # samples appended so far
        self.closed = False
        self._pieces: deque = deque()  # (samples, 2) int16 arrays not yet taken
        self._cond = threading.Condition()

    def append(self, waveform: torch.Tensor) -> None:
        pcm = _pcm16(waveform)
        with self._cond:
            if self.closed:
                raise RuntimeError("audio feed already closed")
            self._pieces.append(pcm)
            self.appended += pcm.shape[0]
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_closed(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.closed)

    def take(self, n: int) -> np.ndarray:
        """The next `n` samples (at most what was appended)."""
        out, need = [], n
        with self._cond:
            while need > 0 and self._pieces:
                head = self._pieces[0]
                if head.shape[0] <= need:
                    out.append(self._pieces.popleft())
                    need -= head.shape[0]
                else:
                    out.append(head[:need])
                    self._pieces[0] = head[need:]
                    need = 0
        return np.concatenate(out) if len(out) > 1 else out[0] if out else np.zeros((0, 2), np.int16)


def _pcm16(waveform: torch.Tensor) -> np.ndarray:
    """(channels, samples) or (samples, channels) float in [-1, 1] -> (samples, 2) int16, as
    ltx-pipelines' `_write_audio` converts."""
    w = waveform.detach().to("cpu")
    if w.ndim == 1:
        w = w[:, None]
    if w.shape[1] != 2 and w.shape[0] == 2:
        w = w.T
    if w.shape[1] != 2:
        raise ValueError(f"Expected samples with 2 channels; got shape {tuple(w.shape)}.")
    if w.dtype != torch.int16:
        w = (torch.clip(w, -1.0, 1.0) * 32767.0).to(torch.int16)
    return w.contiguous().numpy()


class _AudioTrack:
    """AAC written in pieces as the video advances. The samples are those of ltx-pipelines'
    `_write_audio` (clip to [-1, 1], x32767, to int16, interleaved stereo, then resampled to the
    encoder's format at the same rate), so the encoded audio is the same. `audio`: an ltx-core
    Audio, a Future of one, or an AudioFeed (pieces as they come)."""

    def __init__(self, container, audio, rate: int | None = None):
        self.container = container
        self._source = audio
        self._feed = audio if isinstance(audio, AudioFeed) else None
        self._pcm: np.ndarray | None = None  # (samples, 2) int16, once the audio is there
        self.fed = self.written = 0  # samples given to the resampler / to the encoder
        self.samples = 0
        if self._feed is not None:
            rate = self._feed.rate
        elif rate is None:
            self._load()
        # streams must exist before the first packet is muxed
        self.rate = int(rate or self._rate)
        self.stream = container.add_stream("aac", rate=self.rate)
        cc = self.stream.codec_context
        cc.sample_rate, cc.layout, cc.time_base = self.rate, "stereo", Fraction(1, self.rate)
        self._resampler = None

    def _load(self) -> None:
        audio = self._source.result() if isinstance(self._source, Future) else self._source
        self._rate = int(audio.sampling_rate)
        self._pcm = _pcm16(audio.waveform)
        self.samples = self._pcm.shape[0]

    def ready(self) -> bool:
        """Whether write_until will not block: the waveform is there (a Future that is done), or
        the audio comes as an AudioFeed (write_until takes what was appended so far)."""
        return (self._feed is not None or self._pcm is not None or not isinstance(self._source, Future)
                or self._source.done())

    def wait(self) -> None:
        """Blocks until the waveform is there (raises the decoder's exception); an AudioFeed is
        waited for (closed) by write_until(None)."""
        if self._feed is None and self._pcm is None:
            self._load()
            if self._rate != self.rate:
                raise ValueError(f"audio at {self._rate} Hz, but the AAC stream was opened at {self.rate} Hz")

    def _next(self, seconds: float | None) -> np.ndarray:
        """The samples to encode now: up to the video's time (`seconds`), or all that is left (None)."""
        if self._feed is not None:
            if seconds is None:
                self._feed.wait_closed()
            avail = self._feed.appended
            end = avail if seconds is None else min(avail, int(seconds * self.rate))
            self.samples = avail
            return self._feed.take(end - self.fed) if end > self.fed else self._pcm16_empty
        self.wait()
        end = self.samples if seconds is None else min(self.samples, int(seconds * self.rate))
        return self._pcm[self.fed:end] if end > self.fed else self._pcm16_empty

    _pcm16_empty = np.zeros((0, 2), np.int16)

    def write_until(self, seconds: float | None) -> None:
        import av

        pcm = self._next(seconds)
        if self._resampler is None:
            cc = self.stream.codec_context
            self._resampler = av.AudioResampler(format=cc.format or "fltp", layout=cc.layout or "stereo",
                                                rate=self.rate)
        if pcm.shape[0]:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout="stereo")
            frame.sample_rate = self.rate
            self.fed += pcm.shape[0]
            for rf in self._resampler.resample(frame):
                rf.pts, rf.sample_rate = self.written, self.rate
                self.written += rf.samples
                self.container.mux(self.stream.encode(rf))
        if seconds is None:
            for pkt in self.stream.encode():
                self.container.mux(pkt)
