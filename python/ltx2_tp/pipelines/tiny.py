"""The tiny world: every component at a size a CPU runs in seconds, with seeded random weights.

`build_tiny_components(seed)` builds our DiT at the `tiny` preset beside ltx-core's VAE, upsampler,
audio decoder and vocoder at tiny configs, with `TinyTextEncoder` standing in for Gemma. It makes
noise, not pictures. `write_official_files` writes such components in the official checkpoint
layout, so tests load them back through the real checkpoint path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.distributed.context import SINGLE, ParallelContext
from ltx2_tp.models.ltx2.config import get_config
from ltx2_tp.models.ltx2.weights import COMFY_PREFIX, build_model, official_state_dict
from ltx2_tp.pipelines.components import LTX2Components

ensure_ltx_imports()

TINY_TEXT_ENCODER = "tiny"  # --text-encoder-path tiny: the embedded stand-in (tests, smoke runs)
TINY_TEXT_KEY = "ltx2_tp_tiny_text_encoder.table.weight"  # its table, when a test checkpoint carries one


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


def write_official_files(c: LTX2Components, folder: str | Path, lora_rank: int | None = None, seed: int = 0) -> Path:
    """Write `c` (single-rank components with ltx-core parts) as Lightricks lays LTX-2 out: the
    checkpoint (prefixed keys + `config` metadata), the upsampler file and, with `lora_rank`, a
    random distilled LoRA over every DiT linear weight. The tests load these back (with
    `--text-encoder-path tiny`). Returns the checkpoint's path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c.transformer.cfg).items()}
    cfg["frequencies_precision"] = "float64" if c.transformer.cfg.double_precision_rope else "float32"
    config = {"transformer": cfg, **TINY_VAE, **TINY_AUDIO_VAE, **TINY_VOCODER}
    sd = {COMFY_PREFIX + k: v for k, v in official_state_dict(c.transformer).items()}

    def add(module, prefix, stats_prefix=None):
        for k, v in module.state_dict().items():
            if stats_prefix and k.startswith("per_channel_statistics."):
                sd[stats_prefix + k[len("per_channel_statistics."):]] = v
            else:
                sd[prefix + k] = v

    add(c.video_encoder, "vae.encoder.", "vae.per_channel_statistics.")
    add(c.video_decoder, "vae.decoder.", "vae.per_channel_statistics.")
    add(c.audio_decoder, "audio_vae.decoder.", "audio_vae.per_channel_statistics.")
    add(c.vocoder, "vocoder.")
    if isinstance(c.text_encoder, TinyTextEncoder):  # not an official tensor; ltx-core's filters skip it
        sd[TINY_TEXT_KEY] = c.text_encoder.table.weight
    ckpt = folder / "ltx-2-tiny-dev.safetensors"
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(ckpt), metadata={"config": json.dumps(config)})
    up = folder / "ltx-2-spatial-upscaler-x2-tiny.safetensors"
    save_file({k: v.detach().contiguous() for k, v in c.upsampler.state_dict().items()}, str(up),
              metadata={"config": json.dumps(TINY_UPSAMPLER)})
    lora = None
    if lora_rank:
        g = torch.Generator().manual_seed(seed)
        pairs = {}
        for k, v in official_state_dict(c.transformer).items():
            if v.ndim == 2 and k.startswith("transformer_blocks.") and k.endswith(".weight"):  # the linears
                base = "diffusion_model." + k[: -len(".weight")]
                pairs[base + ".lora_A.weight"] = torch.randn(lora_rank, v.shape[1], generator=g).to(v.dtype) * 0.1
                pairs[base + ".lora_B.weight"] = torch.randn(v.shape[0], lora_rank, generator=g).to(v.dtype) * 0.1
        lora = folder / "ltx-2-tiny-distilled-lora-384.safetensors"
        save_file(pairs, str(lora))
    return ckpt
