"""LTX2TwoStageHQPipeline: ltx-pipelines' ti2vid_two_stages_hq (TI2VidTwoStagesHQPipeline) with our DiT.

The two-stage flow with the res_2s sampler (two DiT evaluations per step, ltx-pipelines'
res2s_audio_video_denoising_loop) in both stages, sigmas shifted for the stage-1 token count, the
distilled LoRA at 0.25 in stage 1 and 0.5 in stage 2, and LTX_2_3_HQ_PARAMS' guidance (15 steps,
no STG, rescale 0.45 / audio 1.0). sglang's name for its HQ pipeline.
"""

from __future__ import annotations

import torch

from ltx2_tp.pipelines import keyframe_stride, stages
from ltx2_tp.pipelines.base import Run, pixel_shape
from ltx2_tp.pipelines.guidance import default_params, guided_denoise_fn
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

# ltx-pipelines' hq_2_stage_arg_parser defaults
DISTILLED_LORA_STRENGTH_STAGE_1, DISTILLED_LORA_STRENGTH_STAGE_2 = 0.25, 0.5


class LTX2TwoStageHQPipeline(LTX2TwoStagePipeline):
    name = "LTX2TwoStageHQPipeline"
    supports_step_cache = False  # res_2s: two DiT evaluations per step

    def __init__(self, components, params=None, distilled_lora_strength_stage_1: float = DISTILLED_LORA_STRENGTH_STAGE_1,
                 distilled_lora_strength_stage_2: float = DISTILLED_LORA_STRENGTH_STAGE_2):
        super().__init__(components, params)
        self.strengths = (distilled_lora_strength_stage_1, distilled_lora_strength_stage_2)

    @classmethod
    def default_params(cls, cfg, checkpoint_path=None, tiny=False):
        from ltx_pipelines.utils.constants import LTX_2_3_HQ_PARAMS

        return default_params(cfg, checkpoint_path, tiny, base=LTX_2_3_HQ_PARAMS)  # its entry point's, for every model

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        from ltx_core.components.schedulers import LTX2Scheduler
        from ltx_core.types import VideoLatentShape

        c, req, t = self.c, run.req, run.timer
        video_guidance, audio_guidance = self.guidance(req)
        half = pixel_shape(req, 2)
        tokens = torch.empty(VideoLatentShape.from_pixel_shape(half).to_torch_shape(), device="meta")  # only its shape
        sigmas = LTX2Scheduler().execute(latent=tokens, steps=req.num_inference_steps)
        sigmas = sigmas.to(dtype=torch.float32, device=c.device)
        with t("latent_preparation"):
            s = stages.prepare_latents(c, half, run.generator, self.image_conditionings(req, half.height, half.width))
        with t("stage1_denoise"), stages.stage2_weights(c, self.strengths[0]):
            loop = keyframe_stride.strided(stages.denoise_res2s, req.keyframe_stride, run.approximations)
            s = loop(c, s, sigmas, guided_denoise_fn(c, run.pos, run.neg, video_guidance, audio_guidance), "stage1",
                     run.progress)
            video_latent, audio_latent = stages.unpatchify(s)
        return self.refine(run, video_latent, audio_latent, stages.stage2_weights(c, self.strengths[1]),
                           loop=stages.denoise_res2s)
