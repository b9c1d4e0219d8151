"""LTX2Pipeline: ltx-pipelines' ti2vid_one_stage (TI2VidOneStagePipeline) with our DiT.

The full-size video in one guided denoising (the multimodal guidance of guidance.py, LTX2Scheduler
sigmas), then the VAE decoders. sglang's name for its one-stage LTX-2 pipeline.
"""

from __future__ import annotations

import torch

from ltx2_tp.latent_grid import SPATIAL_SCALE
from ltx2_tp.pipelines import stages
from ltx2_tp.pipelines.base import LTX2PipelineBase, Run, pixel_shape
from ltx2_tp.pipelines.guidance import guided_denoise_fn


class LTX2Pipeline(LTX2PipelineBase):
    name = "LTX2Pipeline"
    spatial_multiple = SPATIAL_SCALE  # one stage at full size: the DiT's 32

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        c, req, t = self.c, run.req, run.timer
        video_guidance, audio_guidance = self.guidance(req)
        shape = pixel_shape(req)
        with t("latent_preparation"):
            s = stages.prepare_latents(c, shape, run.generator, self.image_conditionings(req, shape.height, shape.width))
        with t("stage1_denoise"):
            s = stages.denoise(c, s, stages.stage1_sigmas(req.num_inference_steps, c.device),
                               guided_denoise_fn(c, run.pos, run.neg, video_guidance, audio_guidance), "stage1",
                               run.progress)
            return stages.unpatchify(s)
