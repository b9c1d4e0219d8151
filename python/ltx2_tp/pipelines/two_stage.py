"""LTX2TwoStagePipeline: the official two-stage flow (ltx-pipelines ti2vid_two_stages) with our DiT.

stage 1 at half resolution with the multimodal guidance (guidance.py) -> x2 latent upsampler ->
stage 2 refine with the distilled LoRA and sigmas -> video VAE decode + audio VAE decode + vocoder
-> MP4 / WebM / GIF.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from ltx2_tp.pipelines import keyframe_stride, stages
from ltx2_tp.pipelines.base import GenerationResult, LTX2PipelineBase, Run, pixel_shape
from ltx2_tp.pipelines.guidance import guided_denoise_fn
from ltx2_tp.pipelines.request import GenerationRequest


class LTX2TwoStagePipeline(LTX2PipelineBase):
    name = "LTX2TwoStagePipeline"
    keyframes = False  # the keyframe pipeline appends every image as keyframe tokens
    supports_keyframe_stride = True  # stage 2 refines every frame after the interpolation
    upsamples = True

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        c, req, t = self.c, run.req, run.timer
        video_guidance, audio_guidance = self.guidance(req)
        half = pixel_shape(req, 2)
        with t("latent_preparation"):
            conds, audio_conds, audio_frames = self.stage_inputs(run, half, "stage1")
            s = stages.prepare_latents(c, half, run.generator, conds, audio_conditionings=audio_conds,
                                       audio_frames=audio_frames)
        with t("stage1_denoise"):
            loop = keyframe_stride.strided(stages.denoise, req.keyframe_stride, run.approximations)
            s = loop(c, s, stages.stage1_sigmas(req.num_inference_steps, c.device),
                     guided_denoise_fn(c, run.pos, run.neg, video_guidance, audio_guidance), "stage1", run.progress)
            video_latent, audio_latent = self.stage_output(run, "stage1", *stages.unpatchify(s))
        return self.refine(run, video_latent, audio_latent, stages.stage2_weights(c))

    def stage_inputs(self, run: Run, shape, stage: str):
        """What `stage` ("stage1" at half size, "stage2" at full) conditions on: (video items, audio
        items, audio latent frames or None for the request's duration). Here the request's images;
        a tiled long video adds the previous tile's overlap."""
        return self.image_conditionings(run.req, shape.height, shape.width, self.keyframes), [], None

    def stage_output(self, run: Run, stage: str, video_latent, audio_latent):
        """A stage's (video, audio) latents as what follows takes them (a tiled long video: AdaIN,
        and the overlap kept for the next tile)."""
        return video_latent, audio_latent

    def refine(self, run: Run, video_latent, audio_latent, weights=None, loop=stages.denoise):
        """ltx-pipelines' stage 2: x2 latent upsampler, then the distilled sigmas at full size on
        `weights` (the distilled LoRA fused; none for a distilled checkpoint), with `loop` (Euler;
        the HQ pipeline's res_2s)."""
        c, req, t = self.c, run.req, run.timer
        with t("upsample"):
            up = stages.upsample(c, video_latent)
        full = pixel_shape(req)
        sig2 = stages.stage2_sigmas(c.device)
        with t("stage2_refine"):
            conds, audio_conds, audio_frames = self.stage_inputs(run, full, "stage2")
            s = stages.prepare_latents(c, full, run.generator, conds, noise_scale=float(sig2[0]),
                                       initial_video=up, initial_audio=audio_latent, audio_conditionings=audio_conds,
                                       audio_frames=audio_frames)
            with weights or nullcontext():
                s = loop(c, s, sig2, stages.stage2_denoise_fn(c, run.pos), "stage2", run.progress)
            return self.stage_output(run, "stage2", *stages.unpatchify(s))
