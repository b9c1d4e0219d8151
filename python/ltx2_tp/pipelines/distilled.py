"""LTX2DistilledPipeline: ltx-pipelines' distilled (DistilledPipeline) with our DiT: the fast path.

A distilled checkpoint, no guidance (one DiT pass per step): stage 1 at half size over the 8
DISTILLED_SIGMA_VALUES -> x2 latent upsampler -> stage 2 over STAGE_2_DISTILLED_SIGMA_VALUES (3
steps) on the same weights (no LoRA) -> VAE decoders. 11 DiT passes per video.
"""

from __future__ import annotations

import torch

from ltx2_tp.pipelines import keyframe_stride, stages
from ltx2_tp.pipelines.base import Run, pixel_shape
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2DistilledPipeline(LTX2TwoStagePipeline):
    name = "LTX2DistilledPipeline"
    guided = False
    fixed_steps = stages.DISTILLED_STEPS

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        c, req, t = self.c, run.req, run.timer
        half = pixel_shape(req, 2)
        with t("latent_preparation"):
            s = stages.prepare_latents(c, half, run.generator, self.image_conditionings(req, half.height, half.width))
        with t("stage1_denoise"):
            loop = keyframe_stride.strided(stages.denoise, req.keyframe_stride, run.approximations)
            s = loop(c, s, stages.distilled_sigmas(c.device), stages.stage2_denoise_fn(c, run.pos), "stage1", run.progress)
            video_latent, audio_latent = stages.unpatchify(s)
        return self.refine(run, video_latent, audio_latent)  # the distilled weights as they are
