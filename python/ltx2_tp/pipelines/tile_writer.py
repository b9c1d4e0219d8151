"""A tiled long video's last stage, once per tile: decode, cross-fade the overlap, write.

Each tile's latents are decoded as soon as the tile is generated (the video VAE as the pipeline's
--decode-mode says: streamed pieces, or ltx-core's temporal tiles where memory needs it; the audio
VAE + vocoder beside it on CUDA: pipelines/decode.py's pieces), the frames and samples it shares with the previous tile are cross-faded with that tile's kept tail
(crossfade.Seam), and the rest goes to ONE StreamingMP4Writer: frames through its queue, audio
through an AudioFeed. What the next tile shares is held back, so between tiles only one tail of
frames and samples is kept, and the file (renamed when complete) has exactly the video's frames
and the one-piece audio length (tiling.py says why the pieces line up).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ltx2_tp.latent_grid import AUDIO_TOKENS_PER_SECOND
from ltx2_tp.media_stream import DEFAULT_OPTIONS, AudioFeed, EncoderOptions, StreamingMP4Writer
from ltx2_tp.models.vae_stream import Streamed
from ltx2_tp.pipelines import stages
from ltx2_tp.pipelines.crossfade import Seam
from ltx2_tp.pipelines.decode import FRAMES_PER_COPY, STREAM, decode_audio_async, host_chunks, resolve_tile
from ltx2_tp.pipelines.tiling import Tile


class TileWriter:
    def __init__(self, c, path: str | Path, width: int, height: int, fps: float,
                 options: EncoderOptions = DEFAULT_OPTIONS, generator: torch.Generator | None = None,
                 timer: stages.StageTimer | None = None, stage: str = "decode_and_write", decode=STREAM):
        """`decode`: the video VAE per tile as decode_and_write's `tile_frames` (STREAM: vae_stream's
        pieces, the pipelines' --decode-mode fast; None / N / AUTO: ltx-core's decode, exact)."""
        self.c, self.path, self.size, self.fps = c, Path(path), (width, height), fps
        self.decode = decode
        self.options, self.generator, self.timer, self.stage = options, generator, timer, stage
        self.video, self.audio = Seam(axis=0), Seam(axis=-1)
        self.writer: StreamingMP4Writer | None = None
        self.feed: AudioFeed | None = None

    def _open(self, rate: int, vae_tile) -> None:
        self.feed = AudioFeed(rate)
        frames = vae_tile.chunk_frames if isinstance(vae_tile, Streamed) else (vae_tile or 0)
        queue = max(8, -(-frames // FRAMES_PER_COPY) + 1)  # a whole VAE piece queued, as decode_and_write
        self.writer = StreamingMP4Writer(self.path, *self.size, self.fps, self.feed, options=self.options, max_queue=queue)

    def write(self, tile: Tile, video_latent: torch.Tensor, audio_latent: torch.Tensor) -> None:
        c = self.c
        cuda = video_latent.device.type == "cuda"
        t0 = time.perf_counter()
        audio = decode_audio_async(c, audio_latent, concurrent=cuda)
        vae_tile = resolve_tile(c, video_latent, self.decode)
        if self.writer is None:
            rate = getattr(c.vocoder, "output_sampling_rate", None) or audio.result().sampling_rate
            self._open(int(rate), vae_tile)
        try:
            frames, _ = stages.decode_video(c, video_latent, vae_tile, self.generator)
            self.video.begin(tile.frame_start, tile.next_frame_start)
            for chunk in frames:
                for piece in self.video.push(chunk):
                    for host, ready in host_chunks(piece, self.options.convert):
                        self.writer.put(host, ready)
                del chunk
            self.video.end()
            t_video = time.perf_counter() - t0
            wav = audio.result().waveform
        finally:
            if getattr(audio, "thread", None) is not None:
                audio.thread.join()  # no thread outlives the tile, also when the video side failed
        per_latent = self.feed.rate / AUDIO_TOKENS_PER_SECOND  # output samples per audio latent frame
        if per_latent != int(per_latent):
            raise ValueError(f"audio at {self.feed.rate} Hz is not a whole number of samples per latent frame")
        per_latent = int(per_latent)
        nxt = tile.audio_start + tile.audio_frames - tile.next_audio_overlap
        self.audio.begin(per_latent * tile.audio_start, per_latent * nxt if tile.next_audio_overlap else None)
        for piece in self.audio.push(wav):
            self.feed.append(piece)
        self.audio.end()
        if self.timer is not None:
            self.timer.part(f"{self.stage}.video_decode", t_video)
            self.timer.part(f"{self.stage}.audio_decode", audio.seconds)

    def finish(self) -> tuple[Path, int]:
        """After the last tile: (path, audio samples written)."""
        self.feed.close()
        t0 = time.perf_counter()
        path = self.writer.finish()
        if self.timer is not None:
            self.timer.part(f"{self.stage}.write_after_decode", time.perf_counter() - t0)
            self.timer.part(f"{self.stage}.encode_thread_busy", self.writer.encode_s)
        return path, self.feed.appended

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
