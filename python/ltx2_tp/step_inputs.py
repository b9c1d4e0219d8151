"""DiT inputs for one step at a real resolution: latent grid positions as ltx-core builds them.

Video positions are [start, end) per latent token in pixel-ish units: time in seconds
(8 frames per latent frame, over fps), height and width in pixels (32 per latent cell).
Audio has 25 tokens per second (latent_grid.py). Used by the CLI's `dit` command and the benchmarks.
"""

from __future__ import annotations

import torch

from ltx2_tp.latent_grid import AUDIO_TOKENS_PER_SECOND, SPATIAL_SCALE, TEMPORAL_SCALE, LatentGrid
from ltx2_tp.models.ltx2.config import LTX2Config
from ltx2_tp.models.ltx2.inputs import Modality


def video_positions(frames: int, height: int, width: int, fps: float, batch: int = 1) -> torch.Tensor:
    g = LatentGrid(frames, height, width)
    f, y, x = torch.meshgrid(torch.arange(g.latent_frames), torch.arange(g.latent_height),
                             torch.arange(g.latent_width), indexing="ij")
    t, s = float(TEMPORAL_SCALE), float(SPATIAL_SCALE)
    start = torch.stack([f.flatten() * t / fps, y.flatten() * s, x.flatten() * s])
    end = start + torch.tensor([t / fps, s, s])[:, None]
    return torch.stack([start, end], dim=-1)[None].expand(batch, -1, -1, -1).contiguous()


def audio_positions(tokens: int, batch: int = 1) -> torch.Tensor:
    s = torch.arange(tokens, dtype=torch.float32) / AUDIO_TOKENS_PER_SECOND
    return torch.stack([s, s + 1 / AUDIO_TOKENS_PER_SECOND], dim=-1)[None, None].expand(batch, 1, -1, -1).contiguous()


def synthetic_step_inputs(cfg: LTX2Config, frames: int, height: int, width: int, fps: float, device, dtype,
                          seed: int = 0, text_tokens: int = 256, sigma: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    video = audio = None
    s = torch.full((1,), sigma)
    if cfg.has_video:
        pos = video_positions(frames, height, width, fps)
        t = pos.shape[2]
        ctx_dim = cfg.caption_channels if cfg.caption_projection else cfg.inner_dim
        video = Modality(latent=torch.randn(1, t, cfg.in_channels, generator=g).to(device, dtype), sigma=s.to(device),
                         timesteps=s[:, None].to(device), positions=pos.to(device),
                         context=torch.randn(1, text_tokens, ctx_dim, generator=g).to(device, dtype))
    if cfg.has_audio:
        n = LatentGrid(frames, height, width).audio_tokens(fps)
        ctx_dim = cfg.caption_channels if cfg.caption_projection else cfg.audio_inner_dim
        audio = Modality(latent=torch.randn(1, n, cfg.audio_in_channels, generator=g).to(device, dtype),
                         sigma=s.to(device), timesteps=s[:, None].to(device), positions=audio_positions(n).to(device),
                         context=torch.randn(1, text_tokens, ctx_dim, generator=g).to(device, dtype))
    return video, audio
