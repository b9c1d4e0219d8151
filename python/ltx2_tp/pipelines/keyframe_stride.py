"""Keyframe-stride diffusion: an opt-in APPROXIMATION of stage 1 (request field `keyframe_stride`, S).

Stage 1 denoises only latent frames 0, S, 2S, ... and the last one (each latent frame is 8 video
frames), keeping their own positions, so the DiT sees a sparser video at the right times (RoPE,
and the a<->v cross-attention's temporal positions, stay true; the audio is denoised whole). The
frames in between are then filled by linear interpolation of the two neighbouring keyframes'
clean latents, before the x2 upsampler; stage 2 then runs on every frame as usual.

Why there: stage 1 carries most of a two-stage request's DiT work (LTX-2: 40 guided steps of up to
4 passes over 1/4 of the tokens, against stage 2's 3 single passes over all of them: ~40 N vs 3 N
token-passes, and ~10 N^2 vs 3 N^2 of attention), and stage 2 starts from the upsampled latent
re-noised to sigma 0.909 and attends over all frames, so it regenerates most of what the
interpolation blurred. Stride S cuts stage 1's tokens to about 1/S (its attention to about 1/S^2).
Stride 1 runs every frame through the same selection and is bit-identical to the exact flow.

Appended conditioning tokens (keyframe images, after the frame grid) go through stage 1 whole;
conditioned grid frames (an image at frame 0) keep their clean latent (frame 0 is always a keyframe).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ltx2_tp.pipelines.stages import Streams

MAX_STRIDE = 16  # 16 latent frames = 128 video frames (5.3 s at 24 fps) between keyframes


def keyframe_indices(frames: int, stride: int) -> list[int]:
    """Latent frames stage 1 denoises: every stride-th from 0, and the last."""
    idx = list(range(0, frames, stride))
    if idx[-1] != frames - 1:
        idx.append(frames - 1)
    return idx


def strided(loop, stride: int, report: dict | None = None):
    """`loop` (stages.denoise or denoise_res2s) over the keyframes of its streams only, the frames
    in between filled by interpolation afterwards; stride 1: `loop` itself. `report` (a run's
    approximations report) gets ["keyframe_stride"][stage] = {"frames": F, "denoised_frames": F'}."""
    if stride == 1:
        return loop

    def run(c, s: Streams, sigmas, denoise_fn, stage: str, progress=None) -> Streams:
        shape = s.video_tools.target_shape
        frames, hw = shape.frames, shape.height * shape.width
        keys = keyframe_indices(frames, stride)
        if report is not None:
            report.setdefault("keyframe_stride", {})[stage] = {"frames": frames, "denoised_frames": len(keys)}
        sub = _select(s.video, keys, hw, frames * hw)
        out = loop(c, Streams(sub, s.audio, s.video_tools, s.audio_tools), sigmas, denoise_fn, stage, progress)
        video = replace(s.video, latent=_fill(out.video.latent, keys, frames, hw, s.video))
        return Streams(video, out.audio, s.video_tools, s.audio_tools)

    return run


def _token_index(keys: list[int], hw: int, grid: int, total: int, device) -> torch.Tensor:
    """The keyframes' tokens (frame-major grid), then every token after the grid."""
    frames = torch.tensor(keys, device=device)
    grid_idx = (frames[:, None] * hw + torch.arange(hw, device=device)).flatten()
    return torch.cat([grid_idx, torch.arange(grid, total, device=device)])


def _select(state, keys: list[int], hw: int, grid: int):
    """The latent state of the keyframes' tokens (and the appended conditioning tokens)."""
    idx = _token_index(keys, hw, grid, state.latent.shape[1], state.latent.device)
    mask = state.attention_mask
    if mask is not None:
        mask = mask[:, idx][:, :, idx]
    return replace(state, latent=state.latent[:, idx], denoise_mask=state.denoise_mask[:, idx],
                   positions=state.positions[:, :, idx], clean_latent=state.clean_latent[:, idx], attention_mask=mask)


def _fill(sub_latent: torch.Tensor, keys: list[int], frames: int, hw: int, full) -> torch.Tensor:
    """All frames' latent: the keyframes as denoised; frame f between keyframes a < f < b is
    (1 - t) x_a + t x_b with t = (f - a) / (b - a), then held to its clean latent where its denoise
    mask is 0 (as the denoising loop holds conditioned tokens). Appended tokens as denoised."""
    n_keys = len(keys)
    key_lat = sub_latent[:, : n_keys * hw].unflatten(1, (n_keys, hw))  # (B, F', HW, C)
    grid = key_lat.new_empty(key_lat.shape[0], frames, hw, key_lat.shape[-1])
    grid[:, keys] = key_lat
    between = []
    for i, (a, b) in enumerate(zip(keys, keys[1:])):
        for f in range(a + 1, b):
            t = (f - a) / (b - a)
            grid[:, f] = (key_lat[:, i].float() * (1 - t) + key_lat[:, i + 1].float() * t).to(grid.dtype)
            between.append(f)
    if between:  # ltx-pipelines' post_process_latent on the interpolated frames only
        idx = _token_index(between, hw, frames * hw, frames * hw, grid.device)
        m, clean = full.denoise_mask[:, idx], full.clean_latent[:, idx]
        lat = grid.flatten(1, 2)
        lat[:, idx] = (lat[:, idx] * m + clean.float() * (1 - m)).to(lat.dtype)
        grid = lat.unflatten(1, (frames, hw))
    return torch.cat([grid.flatten(1, 2), sub_latent[:, n_keys * hw :]], dim=1)
