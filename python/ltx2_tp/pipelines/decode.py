"""Decode and write, overlapped: the last stage of a request.

    audio VAE + vocoder ──(own thread, own CUDA stream)───────────────┐
    video VAE, in pieces of ~16 frames (STREAM) -> uint8 (-> I420)    │
      -> device->host copies into pinned memory, 8 frames at a time   v
      -> bounded queue -> encoder thread (x264 + AAC interleaved, media_stream.py) -> file

Two ways to run the video VAE (`tile_frames`):
- STREAM (the pipelines' default): models/vae_stream.py, the whole-video decode cut into pieces
  that carry the convolutions' state, so frames reach the encoder while the VAE works and memory
  stays at one piece's activations at any length (1920x1088: ~5 GiB); equal to ltx-core's
  whole-video decode up to float rounding (fp32 on CPU: < 3e-6 relative, test/test_vae_stream.py).
- None / N / AUTO: ltx-core's decode_video, whole or in its temporal tiles of N frames (AUTO: only
  where the whole video's activations do not fit); with EXACT_OPTIONS this is today's path, and
  the frames and audio equal stages.decode_video + decode_audio + media.write_media's, bit for bit
  (test/test_decode.py). Only the order of work and the threads differ.
WebM / GIF keep the old writer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from ltx2_tp.media import write_media
from ltx2_tp.memory.device import device_bytes, meminfo
from ltx2_tp.media_stream import DEFAULT_OPTIONS, EncoderOptions, StreamingMP4Writer
from ltx2_tp.models.vae_stream import CHUNK_FRAMES, Streamed, unsupported
from ltx2_tp.pipelines import stages

AUTO = "auto"  # temporal_tile_frames value: tile only when the whole video does not fit
STREAM = "stream"  # streamed decode (vae_stream.py), pieces sized by plan_stream_chunk
FRAMES_PER_COPY = 8  # device->host copy granularity: 8 x 6 MiB at 1080p, well above copy launch costs
# Peak activation memory of ltx-core's video decoder, in copies of its largest tensor (last
# up-block: conv_out.in_channels x F x H/patch x W/patch): 6.8 measured on CPU (live tensors of
# the released config, fp32, 9 x 128 x 128), + room for cuDNN workspaces. bench_decode.py prints
# the GPU's peak over this estimate.
DECODER_PEAK_COPIES = 8
MEMORY_SAFETY = 0.8  # of the free memory
STREAM_FRAME_COST = 1.6  # a streamed piece's frame / a whole decode's frame (plan_stream_chunk)
STREAM_FIXED_FRAMES = 7
TILE_OVERLAP = 8  # frames, as LTX2LongVideo always used


def decoder_bytes(decoder, frames: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of decoding `frames` frames of height x width at once."""
    p = getattr(decoder, "patch_size", 4)
    channels = decoder.conv_out.in_channels if hasattr(decoder, "conv_out") else 128
    item = torch.empty((), dtype=dtype).element_size()
    largest = channels * frames * (height // p) * (width // p) * item
    output = frames * height * width * 3 * (2 * item + 1)  # decoded frames, uint8 conversion
    return DECODER_PEAK_COPIES * largest + output


def free_bytes(device: torch.device) -> int:
    """What this process may still allocate: the device's free memory plus the allocator's cached
    blocks, within the per-process cap (--max-gpu-memory sets it; the device's free memory alone
    over-reports it: 54.8 GiB free on an H100 under a 24 GiB cap, and the decode ran out)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        return min(free + torch.cuda.memory_reserved(device) - allocated, device_bytes(device) - allocated)
    return meminfo("MemAvailable")


def plan_temporal_tile(decoder, latent_shape, dtype: torch.dtype, free: int) -> int | None:
    """None when the whole video decodes within MEMORY_SAFETY x `free` bytes, else the longest tile
    (frames, a multiple of 8, >= 16, as ltx-core's TemporalTilingConfig needs) that does."""
    lf, lh, lw = latent_shape[2], latent_shape[3], latent_shape[4]
    frames, h, w = (lf - 1) * 8 + 1, lh * 32, lw * 32
    budget = MEMORY_SAFETY * free
    if decoder_bytes(decoder, frames, h, w, dtype) <= budget:
        return None
    per_frame = decoder_bytes(decoder, 1, h, w, dtype)
    tile = int(budget // per_frame) // 8 * 8
    return max(16, min(tile, (frames - 1) // 8 * 8))


def plan_stream_chunk(decoder, latent_shape, dtype: torch.dtype, free: int) -> int:
    """Output frames per streamed piece: CHUNK_FRAMES, fewer where that does not fit in
    MEMORY_SAFETY x `free` bytes, at least 1. Cost, in units of a whole decode's frame
    (decoder_bytes of 1 frame: 0.30 GiB at 1920x1088), from bench_decode on an H100 (2026-11-23,
    streamed pieces of 8 / 16 / 32 at 768x512: 1.2 / 1.8 / 3.2 GiB; 16 at 1920x1088: 9.1 GiB):
    STREAM_FRAME_COST per piece frame (0.46 GiB at 1080p) and STREAM_FIXED_FRAMES for the frames
    each convolution carries and the latent-level stages (2.1 GiB). Sizing a piece as a whole
    decode's frames ran out of memory under a 24 GiB cap (1920x1088 tiles, 2026-11-24)."""
    h, w = latent_shape[3] * 32, latent_shape[4] * 32
    unit = decoder_bytes(decoder, 1, h, w, dtype)
    room = MEMORY_SAFETY * free - STREAM_FIXED_FRAMES * unit
    return max(1, min(CHUNK_FRAMES, int(room // (STREAM_FRAME_COST * unit))))


def resolve_tile(c, video_latent: torch.Tensor, tile_frames):
    """None, N, AUTO or STREAM -> what stages.decode_video takes (None, N or a Streamed). STREAM
    with a decoder vae_stream cannot run exactly (GroupNorm, attention, noise injection) is AUTO."""
    dec = c.video_decoder
    dtype = next(dec.parameters()).dtype
    if tile_frames == STREAM:
        if unsupported(dec) is None:
            return Streamed(plan_stream_chunk(dec, video_latent.shape, dtype, free_bytes(video_latent.device)))
        tile_frames = AUTO
    if tile_frames != AUTO:
        return tile_frames
    return plan_temporal_tile(dec, video_latent.shape, dtype, free_bytes(video_latent.device))


def decode_audio_async(c, audio_latent: torch.Tensor, concurrent: bool) -> Future:
    """ltx-core's audio VAE + vocoder, on a thread with its own CUDA stream (they run beside the
    video VAE's kernels); on the CPU, or when not `concurrent`, right here. The waveform comes
    back on the host."""
    fut: Future = Future()
    fut.started = time.perf_counter()

    def work(stream):
        try:
            if stream is not None:
                with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                    audio = stages.decode_audio(c, audio_latent)
                    wav = audio.waveform.cpu()  # synchronizes this stream only
            else:
                audio = stages.decode_audio(c, audio_latent)
                wav = audio.waveform.cpu()
            fut.seconds = time.perf_counter() - fut.started
            fut.set_result(type(audio)(waveform=wav, sampling_rate=audio.sampling_rate))
        except BaseException as e:  # noqa: BLE001 - re-raised by whoever asks for the audio
            fut.seconds = time.perf_counter() - fut.started
            fut.set_exception(e)

    if not concurrent:
        work(None)
        fut.result()  # raises here if it failed
        return fut
    stream = None
    if audio_latent.device.type == "cuda":
        stream = torch.cuda.Stream(audio_latent.device)
        stream.wait_stream(torch.cuda.current_stream(audio_latent.device))  # the latent is ready
        audio_latent.record_stream(stream)
    t = threading.Thread(target=work, args=(stream,), name="ltx2_tp-audio-decode", daemon=True)
    fut.thread = t
    t.start()
    return fut


def _ready(audio) -> Future:
    """A waveform that needs no decoding, as decode_audio_async's future (on the host)."""
    fut: Future = Future()
    fut.started, fut.seconds = time.perf_counter(), 0.0
    fut.set_result(type(audio)(waveform=audio.waveform.cpu(), sampling_rate=audio.sampling_rate))
    return fut


def host_chunks(chunk: torch.Tensor, convert: str, frames_per_copy: int = FRAMES_PER_COPY):
    """(f, h, w, 3) uint8 frames on the device -> (host tensor, ready) pieces of `frames_per_copy`
    frames: RGB, or I420 made on the device (convert="gpu"). On CUDA each piece is copied into
    pinned memory on a side stream; `ready` waits for that copy (the encoder thread calls it)."""
    from ltx2_tp.yuv import rgb_to_i420

    cuda = chunk.device.type == "cuda"
    if cuda:
        copy = torch.cuda.Stream(chunk.device)
        copy.wait_stream(torch.cuda.current_stream(chunk.device))
    for i in range(0, chunk.shape[0], frames_per_copy):
        part = chunk[i:i + frames_per_copy]
        part = rgb_to_i420(part) if convert == "gpu" else part.contiguous()
        if not cuda:
            yield part.cpu(), None
            continue
        copy.wait_stream(torch.cuda.current_stream(chunk.device))
        host = torch.empty(part.shape, dtype=torch.uint8, pin_memory=True)
        with torch.cuda.stream(copy):
            host.copy_(part, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy)
        part.record_stream(copy)
        yield host, done.synchronize


def decode_and_write(c, video_latent: torch.Tensor, audio_latent: torch.Tensor, fps: float, path: str | Path,
                     fmt: str = "mp4", generator: torch.Generator | None = None, tile_frames=None,
                     options: EncoderOptions = DEFAULT_OPTIONS, timer: stages.StageTimer | None = None,
                     concurrent_audio: bool | None = None, max_queue: int | None = None,
                     stage: str = "decode_and_write", audio=None) -> tuple[Path, int]:
    """Decode both latents and write `path`; returns (path, audio samples). `tile_frames`: STREAM
    (vae_stream), None (whole video at once), a tile length, or AUTO (plan_temporal_tile). Sub-times go to `timer`
    as parts of `stage` (they overlap one another: the table does not add them to the total).
    `audio`: an ltx-core Audio to write instead of decoding `audio_latent` (A2Vid writes its input)."""
    tile = resolve_tile(c, video_latent, tile_frames)
    if fmt != "mp4":
        frames, chunks = stages.decode_video(c, video_latent, tile, generator)
        audio = audio if audio is not None else stages.decode_audio(c, audio_latent)
        return write_media(frames, chunks, fps, audio, path, fmt), int(audio.waveform.shape[-1])

    cuda = video_latent.device.type == "cuda"
    if audio is not None:  # written at its own rate (A2Vid's input: 44.1 / 48 kHz files, not the vocoder's)
        rate = int(audio.sampling_rate)
        audio = _ready(audio)
    else:
        rate = getattr(c.vocoder, "output_sampling_rate", None)
        audio = decode_audio_async(c, audio_latent, cuda if concurrent_audio is None else concurrent_audio)
    height, width = video_latent.shape[3] * 32, video_latent.shape[4] * 32
    if max_queue is None:  # room for a whole tile: the next tile decodes while the encoder works on this one
        frames = tile.chunk_frames if isinstance(tile, Streamed) else (tile or 0)
        max_queue = max(8, -(-frames // FRAMES_PER_COPY) + 1)
    writer = StreamingMP4Writer(path, width, height, fps, audio, audio_rate=rate, options=options, max_queue=max_queue)
    marks = []  # CUDA events around each decoded chunk: the VAE's own time, without waiting on syncs
    t_start = time.perf_counter()
    try:
        with writer:
            frames, _ = stages.decode_video(c, video_latent, tile, generator)
            t_video = 0.0
            while True:
                t0 = time.perf_counter()
                if cuda:
                    marks.append(torch.cuda.Event(enable_timing=True))
                    marks[-1].record()
                chunk = next(frames, None)
                if cuda:
                    marks.append(torch.cuda.Event(enable_timing=True))
                    marks[-1].record()
                t_video += time.perf_counter() - t0
                if chunk is None:
                    break
                for host, ready in host_chunks(chunk, options.convert):
                    writer.put(host, ready)
                del chunk
            t_handed = time.perf_counter()
            out = writer.finish()
            t_done = time.perf_counter()
        wav = audio.result()
    finally:
        if getattr(audio, "thread", None) is not None:
            audio.thread.join()  # no thread outlives the call, also when the video side failed
    if timer is not None:
        prefix = f"{stage}."
        if cuda:
            torch.cuda.synchronize(video_latent.device)
            t_video = sum(a.elapsed_time(b) for a, b in zip(marks[0::2], marks[1::2])) / 1e3
        timer.part(prefix + "video_decode", t_video)
        timer.part(prefix + "audio_decode", audio.seconds)
        timer.part(prefix + "encode_thread_busy", writer.encode_s)
        timer.part(prefix + "first_frames_at_encoder", writer.t_first - t_start)  # when encoding could start
        timer.part(prefix + "write_after_decode", t_done - t_handed)
        timer.part(prefix + "tail_backlog_encode", max(0.0, writer.t_drained - t_handed))  # frames still queued
        timer.part(prefix + "tail_flush_audio_close", writer.t_closed - max(writer.t_drained, t_handed))
    return out, int(wav.waveform.shape[-1])
