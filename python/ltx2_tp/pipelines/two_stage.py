"""LTX2TwoStagePipeline: the official two-stage flow (ltx-pipelines ti2vid_two_stages) with our DiT.

stage 1 at half resolution with CFG guidance -> x2 latent upsampler -> stage 2 refine with the
distilled sigmas -> video VAE decode + audio VAE decode + vocoder -> MP4 / WebM / GIF.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ltx2_tp.media import write_media
from ltx2_tp.pipelines import stages
from ltx2_tp.pipelines.components import LTX2Components
from ltx2_tp.pipelines.registry import register_pipeline
from ltx2_tp.pipelines.request import GenerationRequest, RequestError


@dataclass
class GenerationResult:
    path: Path
    frames: int
    width: int
    height: int
    fps: float
    audio_samples: int
    stage_times: dict[str, float]


@register_pipeline
class LTX2TwoStagePipeline:
    name = "LTX2TwoStagePipeline"

    def __init__(self, components: LTX2Components):
        self.c = components

    # where the long-video pipeline changes layout and decoding
    def prepare(self, req: GenerationRequest) -> None:
        pass

    def temporal_tile_frames(self, req: GenerationRequest) -> int | None:
        return None

    def _conditionings(self, req: GenerationRequest, height: int, width: int):
        if not req.image_path:
            return []
        from ltx_pipelines.utils.args import ImageConditioningInput
        from ltx_pipelines.utils.helpers import combined_image_conditionings

        if not Path(req.image_path).is_file():
            raise RequestError("image_path", f"no such file: {req.image_path}")
        enc = self.c.video_encoder
        with torch.no_grad():
            conds = combined_image_conditionings([ImageConditioningInput(req.image_path, 0, 1.0)], height, width, enc,
                                                 next(enc.parameters()).dtype, self.c.device)
        for cond in conds:  # latents enter the DiT in its dtype
            if hasattr(cond, "latent"):
                cond.latent = cond.latent.to(self.c.dtype)
        return conds

    def __call__(self, req: GenerationRequest, output_path: str | Path, progress: stages.Progress | None = None,
                 timer: stages.StageTimer | None = None) -> GenerationResult:
        from ltx_core.types import VideoPixelShape

        req.validate()
        c, timer = self.c, timer or stages.StageTimer(sync=self.c.device.type == "cuda")
        self.prepare(req)
        gen = torch.Generator(device=c.device).manual_seed(int(req.seed))
        with timer("text_encoding"):
            pos, neg = stages.encode_text(c, req.prompt, req.negative_prompt)
        half = VideoPixelShape(batch=1, frames=req.num_frames, width=req.width // 2, height=req.height // 2, fps=req.fps)
        with timer("latent_preparation"):
            s = stages.prepare_latents(c, half, gen, self._conditionings(req, half.height, half.width))
        with timer("stage1_denoise"):
            s = stages.denoise(c, s, stages.stage1_sigmas(req.num_inference_steps, c.device),
                               stages.stage1_denoise_fn(c, pos, neg, req.guidance_scale), "stage1", progress)
            video_latent, audio_latent = stages.unpatchify(s)
        with timer("upsample"):
            up = stages.upsample(c, video_latent)
        full = VideoPixelShape(batch=1, frames=req.num_frames, width=req.width, height=req.height, fps=req.fps)
        sig2 = stages.stage2_sigmas(c.device)
        with timer("stage2_refine"):
            s = stages.prepare_latents(c, full, gen, self._conditionings(req, full.height, full.width),
                                       noise_scale=float(sig2[0]), initial_video=up, initial_audio=audio_latent)
            with stages.stage2_weights(c):
                s = stages.denoise(c, s, sig2, stages.stage2_denoise_fn(c, pos), "stage2", progress)
            video_latent, audio_latent = stages.unpatchify(s)
        with timer("decode_and_write"):
            frames, chunks = stages.decode_video(c, video_latent, self.temporal_tile_frames(req), gen)
            audio = stages.decode_audio(c, audio_latent)
            path = write_media(frames, chunks, req.fps, audio, output_path, req.output_format)
        if progress:
            progress("done", 1, 1)
        return GenerationResult(path=path, frames=req.num_frames, width=req.width, height=req.height, fps=req.fps,
                                audio_samples=int(audio.waveform.shape[-1]), stage_times=dict(timer.times))
