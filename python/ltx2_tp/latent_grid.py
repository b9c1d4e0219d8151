"""Pixels -> the DiT's latent grid: the one place the VAE's scale factors and the token counts live.

The video VAE compresses 8x in time (so frames = 8k + 1) and 32x in space, and the DiT's patch is
1, so F frames at H x W pixels are ((F - 1) / 8 + 1) x (H / 32) x (W / 32) video tokens; audio has
25 latent tokens per second. Under sequence parallelism the video tokens split over the SP ranks
(distributed/collectives.py's `part_sizes`); the largest part is what a rank must plan for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltx2_tp.distributed.collectives import part_sizes

TEMPORAL_SCALE = 8  # frames per latent frame (after the first)
SPATIAL_SCALE = 32  # pixels per latent cell, each way: the multiple a DiT's height and width need
AUDIO_TOKENS_PER_SECOND = 25


def latent_frames(frames: int) -> int:
    """Latent frames of `frames` video frames (8k+1 -> k+1)."""
    return (frames - 1) // TEMPORAL_SCALE + 1


def audio_latent_frames(frames: int, fps: float) -> int:
    """Audio latent frames in `frames` video frames at `fps` (ltx-core's AudioLatentShape.from_duration
    rounding); also the audio latent at which video frame `frames` starts."""
    return round(frames / float(fps) * AUDIO_TOKENS_PER_SECOND)


@dataclass(frozen=True)
class LatentGrid:
    frames: int
    height: int
    width: int

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.frames)

    @property
    def latent_height(self) -> int:
        return self.height // SPATIAL_SCALE

    @property
    def latent_width(self) -> int:
        return self.width // SPATIAL_SCALE

    @property
    def video_tokens(self) -> int:
        return self.latent_frames * self.latent_height * self.latent_width

    def audio_tokens(self, fps: float) -> int:
        return max(1, audio_latent_frames(self.frames, fps))


def tokens_per_rank(tokens: int, sp_size: int) -> int:
    """The most tokens any of `sp_size` SP ranks holds."""
    return max(part_sizes(tokens, sp_size))
