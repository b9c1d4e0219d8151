"""Everything a pipeline runs: our DiT plus ltx-core's VAE, upsampler, audio decoder and vocoder.

Built from official checkpoint files (checkpoints.py) or at a tiny size with random weights (tiny.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.models.ltx2.lora import LoraWeights
from ltx2_tp.models.ltx2.model import LTX2Model


@dataclass
class LTX2Components:
    transformer: LTX2Model
    video_encoder: nn.Module
    video_decoder: nn.Module
    upsampler: nn.Module
    audio_decoder: nn.Module
    vocoder: nn.Module
    text_encoder: nn.Module
    video_latent_channels: int
    audio_latent_channels: int
    audio_mel_bins: int  # latent frequency bins of the audio VAE
    device: torch.device
    dtype: torch.dtype
    name: str = "tiny"
    stage2_lora: "LoraWeights | None" = None  # the distilled LoRA, fused in place for stage 2 only
    checkpoint_path: str | None = None  # the official file the parts came from (defaults, audio encoder)
    # --max-gpu-memory's cap in bytes (planning.apply_plan records it); None: what the device lets
    # this process use (planning.device_bytes). LTX2LongVideo's auto mode plans one piece under it.
    max_gpu_memory: int | None = None

    @property
    def ctx(self) -> ParallelContext:
        return self.transformer.ctx
