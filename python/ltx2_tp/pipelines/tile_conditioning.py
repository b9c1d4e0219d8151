"""What carries one tile of a tiled long video into the next (pipelines/long_video.py).

- The previous tile's last latent frames become the first ones of the next tile at a strength, by
  ltx-core's conditioning machinery: video by its `VideoConditionByLatentIndex` (what image
  conditioning uses for frame 0), audio by `AudioConditionByLatentIndex` below, its counterpart for
  audio tokens. Tokens are replaced (latent and clean latent) and get denoise mask 1 - strength, so
  strength 1 keeps them exactly and 0.5 (ComfyUI's default) lets the model move them half way;
  replacing adds no tokens, so a tile costs what a one-piece video of its length costs.
- AdaIN: each tile's latents get the first tile's per-channel mean and standard deviation, blended
  in by a factor (ComfyUI's LTXVAdainLatent: statistics per channel over frames, height and width;
  `torch.lerp(latent, normalized, factor)`), against colour drift over many tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.compat import ensure_ltx_imports

ensure_ltx_imports()

from ltx_core.conditioning.item import ConditioningItem  # noqa: E402
from ltx_core.conditioning.types import VideoConditionByLatentIndex  # noqa: E402


class AudioConditionByLatentIndex(ConditioningItem):
    """Audio latent frames [latent_idx, latent_idx + n) replaced by `latent` (B, C, n, mel_bins) and held
    at `strength` (denoise mask 1 - strength), as VideoConditionByLatentIndex does for video."""

    def __init__(self, latent: torch.Tensor, strength: float, latent_idx: int = 0):
        self.latent, self.strength, self.latent_idx = latent, strength, latent_idx

    def apply_to(self, latent_state, latent_tools):
        tokens = latent_tools.patchifier.patchify(self.latent)  # (B, n, C * mel_bins): one token per latent frame
        start, stop = self.latent_idx, self.latent_idx + tokens.shape[1]
        if stop > latent_state.latent.shape[1]:
            raise ValueError(f"audio conditioning of {tokens.shape[1]} frames at {start} exceeds the "
                             f"{latent_state.latent.shape[1]} audio latent frames")
        state = latent_state.clone()
        state.latent[:, start:stop] = tokens
        state.clean_latent[:, start:stop] = tokens
        state.denoise_mask[:, start:stop] = 1.0 - self.strength
        return state


def overlap_conditionings(video: torch.Tensor, audio: torch.Tensor, strength: float):
    """(video items, audio items): the previous tile's overlap latents as the first frames of this one."""
    return [VideoConditionByLatentIndex(latent=video, strength=strength, latent_idx=0)], \
        [AudioConditionByLatentIndex(audio, strength, 0)]


@dataclass(frozen=True)
class ChannelStats:
    std: torch.Tensor  # (B, C, 1, 1, 1), float32
    mean: torch.Tensor


def channel_stats(latent: torch.Tensor) -> ChannelStats:
    """Per-channel statistics over frames, height and width (unbiased std, as torch.std_mean)."""
    std, mean = torch.std_mean(latent.float(), dim=(2, 3, 4), keepdim=True)
    return ChannelStats(std, mean)


def adain(latent: torch.Tensor, reference: ChannelStats, factor: float) -> torch.Tensor:
    """`latent` with `reference`'s per-channel statistics, blended in by `factor` (0: unchanged)."""
    if factor == 0:
        return latent
    own = channel_stats(latent)
    x = latent.float()
    # a constant channel (std 0) is only shifted: dividing by 0 would make it inf / nan
    normalized = (x - own.mean) / own.std.clamp_min(1e-12) * reference.std + reference.mean
    return torch.lerp(x, normalized, float(factor)).to(latent.dtype)
