"""Shared helpers: ltx-core's LTXModel next to ours at the same weights, and the inputs of a step."""

from __future__ import annotations

import torch

from ltx2_tp.models.ltx2.config import LTX2Config, get_config
from ltx2_tp.models.ltx2.inputs import Modality

TOL = 1e-5  # relative max error (max |ours - ref| / max |ref|), fp32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def tiny_config(**kw) -> LTX2Config:
    return get_config("tiny", **kw)


def build_ltx_core(cfg: LTX2Config, seed: int = 0):
    """ltx-core 1.0.0's LTXModel at `cfg`, random weights (fp32)."""
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.rope import LTXRopeType
    from ltx_core.model.transformer.text_projection import PixArtAlphaTextProjection

    if cfg.has_video and cfg.has_audio:
        mt = LTXModelType.AudioVideo
    else:
        mt = LTXModelType.VideoOnly if cfg.has_video else LTXModelType.AudioOnly
    torch.manual_seed(seed)
    cp = PixArtAlphaTextProjection(cfg.caption_channels, cfg.inner_dim) if cfg.caption_projection and cfg.has_video else None
    acp = (PixArtAlphaTextProjection(cfg.caption_channels, cfg.audio_inner_dim)
           if cfg.caption_projection and cfg.has_audio else None)
    ref = LTXModel(
        model_type=mt,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.num_layers,
        cross_attention_dim=cfg.cross_attention_dim,
        norm_eps=cfg.norm_eps,
        positional_embedding_theta=cfg.positional_embedding_theta,
        positional_embedding_max_pos=list(cfg.positional_embedding_max_pos),
        timestep_scale_multiplier=cfg.timestep_scale_multiplier,
        use_middle_indices_grid=cfg.use_middle_indices_grid,
        audio_num_attention_heads=cfg.audio_num_attention_heads,
        audio_attention_head_dim=cfg.audio_attention_head_dim,
        audio_in_channels=cfg.audio_in_channels,
        audio_out_channels=cfg.audio_out_channels,
        audio_cross_attention_dim=cfg.audio_cross_attention_dim,
        audio_positional_embedding_max_pos=list(cfg.audio_positional_embedding_max_pos),
        av_ca_timestep_scale_multiplier=cfg.av_ca_timestep_scale_multiplier,
        rope_type=LTXRopeType(cfg.rope_type),
        double_precision_rope=cfg.double_precision_rope,
        apply_gated_attention=cfg.apply_gated_attention,
        caption_projection=cp,
        audio_caption_projection=acp,
        cross_attention_adaln=cfg.cross_attention_adaln,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "scale_shift_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ref.eval()


def make_inputs(cfg: LTX2Config, batch: int = 2, frames: int = 3, h: int = 2, w: int = 3, audio_tokens: int = 7,
                text: int = 5, per_token: bool = True, text_mask: bool = True, seed: int = 1, fps: float = 24.0,
                dtype=torch.float32):
    """Video + audio Modality for one step: I2V-style per-token timesteps (first frame at 0)."""
    g = torch.Generator().manual_seed(seed)
    t_video = frames * h * w
    sigma = torch.rand(batch, generator=g) * 0.8 + 0.1
    video = audio = None
    mask = None
    if text_mask:
        mask = torch.ones(batch, text, dtype=torch.int64)
        mask[0, text - 2 :] = 0
    if cfg.has_video:
        f, y, x = torch.meshgrid(torch.arange(frames), torch.arange(h), torch.arange(w), indexing="ij")
        start = torch.stack([f.flatten() * 8 / fps, y.flatten() * 32.0, x.flatten() * 32.0])  # (3, T)
        end = start + torch.tensor([8 / fps, 32.0, 32.0])[:, None]
        pos = torch.stack([start, end], dim=-1)[None].repeat(batch, 1, 1, 1)
        if per_token:
            ts = sigma[:, None].repeat(1, t_video)
            ts[:, : h * w] = 0.0
        else:
            ts = sigma[:, None]
        ctx_dim = cfg.caption_channels if cfg.caption_projection else cfg.inner_dim
        video = Modality(
            latent=torch.randn(batch, t_video, cfg.in_channels, generator=g).to(dtype),
            sigma=sigma, timesteps=ts, positions=pos.to(torch.float32),
            context=torch.randn(batch, text, ctx_dim, generator=g).to(dtype), context_mask=mask,
        )
    if cfg.has_audio and audio_tokens:
        s = torch.arange(audio_tokens) / 25.0
        apos = torch.stack([s, s + 1 / 25.0], dim=-1)[None, None].repeat(batch, 1, 1, 1)
        ctx_dim = cfg.caption_channels if cfg.caption_projection else cfg.audio_inner_dim
        audio = Modality(
            latent=torch.randn(batch, audio_tokens, cfg.audio_in_channels, generator=g).to(dtype),
            sigma=sigma, timesteps=sigma[:, None].repeat(1, audio_tokens) if per_token else sigma[:, None],
            positions=apos, context=torch.randn(batch, text, ctx_dim, generator=g).to(dtype), context_mask=mask,
        )
    return video, audio


def to_ltx_core(m: Modality | None):
    if m is None:
        return None
    from ltx_core.model.transformer.modality import Modality as LM

    return LM(latent=m.latent, sigma=m.sigma, timesteps=m.timesteps, positions=m.positions, context=m.context,
              enabled=m.enabled, context_mask=m.context_mask, attention_mask=m.attention_mask)


def run_ltx_core(ref, video, audio, perturbations=None):
    from ltx_core.guidance.perturbations import BatchedPerturbationConfig

    b = (video or audio).latent.shape[0]
    with torch.no_grad():
        return ref(to_ltx_core(video), to_ltx_core(audio), perturbations or BatchedPerturbationConfig.empty(b))
