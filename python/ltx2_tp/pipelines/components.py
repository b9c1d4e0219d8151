"""Everything a pipeline runs: our DiT plus ltx-core's VAE, upsampler, audio decoder and vocoder.

`build_tiny_components(seed)` builds every component at a tiny size with seeded random weights, so
the whole pipeline runs on a CPU in seconds. It makes noise, not pictures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.models.ltx2.config import get_config
from ltx2_tp.models.ltx2.lora import LoraWeights
from ltx2_tp.models.ltx2.model import LTX2Model
from ltx2_tp.models.ltx2.weights import build_model

ensure_ltx_imports()


class TinyTextEncoder(nn.Module):
    """Stand-in for Gemma 3 in the tiny model: UTF-8 bytes -> seeded embeddings (caption features).

    Deterministic, so one prompt always gives one context. Real checkpoints use ltx-core's Gemma
    encoder, whose output (caption channels) has the same role. Like it, every prompt gives the
    same number of tokens (padded with the end id), so CFG's two prompts batch together.
    """

    def __init__(self, channels: int, max_tokens: int = 32):
        super().__init__()
        self.max_tokens = max_tokens
        self.table = nn.Embedding(257, channels)

    @torch.no_grad()
    def forward(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = list(prompt.encode("utf-8")[: self.max_tokens - 1])
        ids += [256] * (self.max_tokens - len(ids))
        x = self.table(torch.tensor([ids], device=self.table.weight.device))
        return x, x  # (video context, audio context)


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

    @property
    def ctx(self) -> ParallelContext:
        return self.transformer.ctx


TINY_VAE = {"vae": {
    "latent_channels": 16, "patch_size": 4, "decoder_base_channels": 8, "timestep_conditioning": False,
    "causal_decoder": False,
    # 3 x (2,2,2) upsampling after a 4x patch: 8x in time, 32x in space, as the real VAE
    "decoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
                       ["compress_all", {"multiplier": 2}], ["res_x", {"num_layers": 1}],
                       ["compress_all", {"multiplier": 1}], ["res_x", {"num_layers": 1}]],
    "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}], ["res_x_y", {"multiplier": 2}],
                       ["compress_all", {}], ["res_x_y", {"multiplier": 2}], ["compress_all", {}],
                       ["res_x", {"num_layers": 1}]],
}}
# 64 mel bins (the vocoder's input is 2 x 64), latent frequency 16, 1 latent channel -> 16 per token
TINY_AUDIO_VAE = {"audio_vae": {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "ch": 16, "out_ch": 2, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 64,
        "z_channels": 1, "mel_bins": 64, "mid_block_add_attention": False}}},
    "preprocessing": {"stft": {"hop_length": 160, "causal": True}, "mel": {"n_mel_channels": 64}},
}}
TINY_VOCODER = {"vocoder": {"resblock": "1", "stereo": True, "upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                            "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [6, 5, 2, 2, 2],
                            "upsample_kernel_sizes": [12, 10, 4, 4, 4]}}
TINY_UPSAMPLER = {"in_channels": 16, "mid_channels": 32, "num_blocks_per_stage": 1}


def neutral_latent_statistics(modules) -> None:
    """Mean 0, std 1 for the VAEs' per-channel latent statistics, which ltx-core leaves
    uninitialised (checkpoints fill them): for randomly initialised components."""
    for m in modules:
        for name, buf in m.named_buffers():
            if name.endswith("std-of-means"):
                buf.fill_(1.0)
            elif name.endswith("mean-of-means"):
                buf.zero_()


def build_tiny_components(seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          ctx: ParallelContext = SINGLE) -> LTX2Components:
    from ltx_core.model.audio_vae import AudioDecoderConfigurator, VocoderConfigurator
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator
    from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

    device = torch.device(device)
    cfg = get_config("tiny")
    torch.manual_seed(seed)
    parts = dict(
        video_encoder=VideoEncoderConfigurator.from_config(TINY_VAE),
        video_decoder=VideoDecoderConfigurator.from_config(TINY_VAE),
        upsampler=LatentUpsamplerConfigurator.from_config(TINY_UPSAMPLER),
        audio_decoder=AudioDecoderConfigurator.from_config(TINY_AUDIO_VAE),
        vocoder=VocoderConfigurator.from_config(TINY_VOCODER),
        text_encoder=TinyTextEncoder(cfg.caption_channels),
    )
    parts = {k: m.to(device=device, dtype=torch.float32).eval() for k, m in parts.items()}
    neutral_latent_statistics(parts.values())
    transformer = build_model(cfg, ctx, device=device, dtype=dtype, seed=seed)
    return LTX2Components(transformer=transformer, video_latent_channels=16, audio_latent_channels=1,
                          audio_mel_bins=16, device=device, dtype=dtype, name="tiny", **parts)


def build_components(model: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     ctx: ParallelContext = SINGLE, seed: int = 0, spatial_upsampler_path: str | None = None,
                     text_encoder_path: str | None = None, distilled_lora_path: str | None = None,
                     distilled_lora_strength: float = 1.0) -> LTX2Components:
    """`tiny` (embedded) or a path to the official checkpoint files (pipelines/checkpoints.py)."""
    if model == "tiny":
        return build_tiny_components(seed, device=device, dtype=dtype, ctx=ctx)
    from ltx2_tp.pipelines.checkpoints import CheckpointFiles, build_checkpoint_components

    files = CheckpointFiles.discover(model, spatial_upsampler_path, text_encoder_path, distilled_lora_path,
                                     distilled_lora_strength)
    return build_checkpoint_components(files, device=device, dtype=dtype, ctx=ctx)
