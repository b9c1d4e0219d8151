"""LTX2ICLoraPipeline: ltx-pipelines' ic_lora (ICLoraPipeline) with our DiT.

In-context LoRA on a distilled checkpoint: the reference videos (`--video-conditioning PATH
STRENGTH`: depth, pose, edges ...) are encoded and appended as tokens (ltx-core's
VideoConditionByReferenceLatent, positions scaled by the LoRA's `reference_downscale_factor`
metadata), and stage 1 runs the 8 distilled sigmas with the IC-LoRA fused; stage 2 (x2 upsampler,
3 distilled sigmas) runs on the distilled weights alone, conditioned on the images only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ltx2_tp.models.ltx2.lora import LoraWeights, lora_applied
from ltx2_tp.pipelines import keyframe_stride, stages
from ltx2_tp.pipelines.base import Run, pixel_shape
from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2ICLoraPipeline(LTX2TwoStagePipeline):
    name = "LTX2ICLoraPipeline"
    guided = False
    fixed_steps = stages.DISTILLED_STEPS
    inputs = ("video_conditioning",)

    def __init__(self, components, params=None, lora_path: str | None = None, lora_strength: float = 1.0):
        super().__init__(components, params)
        self.lora, self.reference_downscale_factor = None, 1
        if lora_path:
            from ltx_pipelines.ic_lora import _read_lora_reference_downscale_factor

            self.lora = LoraWeights.from_file(lora_path, lora_strength)
            self.reference_downscale_factor = _read_lora_reference_downscale_factor(lora_path)

    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        super().check_request(req, num_layers)
        for path, _ in req.video_conditioning:
            if not Path(path).is_file():
                raise RequestError("video_conditioning", f"no such file: {path}")

    def check(self, req: GenerationRequest) -> None:
        super().check(req)
        f = self.reference_downscale_factor
        if (req.height // 2) % f or (req.width // 2) % f:
            raise RequestError("width", f"stage 1's size ({req.width // 2}x{req.height // 2}) must be divisible by the "
                               f"IC-LoRA's reference_downscale_factor ({f})")

    def reference_conditionings(self, req: GenerationRequest, height: int, width: int):
        """The reference videos as appended tokens (ltx-pipelines' ICLoraPipeline._create_conditionings,
        without its optional pixel attention mask)."""
        from ltx_core.conditioning import ConditioningItemAttentionStrengthWrapper, VideoConditionByReferenceLatent
        from ltx_pipelines.utils.media_io import load_video_conditioning

        enc, f = self.c.video_encoder, self.reference_downscale_factor
        dtype = next(enc.parameters()).dtype
        out = []
        for path, strength in req.video_conditioning:
            with torch.no_grad():
                video = load_video_conditioning(path, height // f, width // f, req.num_frames, dtype, self.c.device)
                latent = enc(video).to(self.c.dtype)
            cond = VideoConditionByReferenceLatent(latent=latent, downscale_factor=f, strength=float(strength))
            if req.conditioning_attention_strength < 1.0:
                cond = ConditioningItemAttentionStrengthWrapper(cond, attention_mask=req.conditioning_attention_strength)
            out.append(cond)
        return out

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        c, req, t = self.c, run.req, run.timer
        half = pixel_shape(req, 2)
        with t("latent_preparation"):
            conds = self.image_conditionings(req, half.height, half.width)
            conds += self.reference_conditionings(req, half.height, half.width)
            s = stages.prepare_latents(c, half, run.generator, conds)
        with t("stage1_denoise"), lora_applied(c.transformer, self.lora):
            loop = keyframe_stride.strided(stages.denoise, req.keyframe_stride, run.approximations)
            s = loop(c, s, stages.distilled_sigmas(c.device), stages.stage2_denoise_fn(c, run.pos), "stage1", run.progress)
            video_latent, audio_latent = stages.unpatchify(s)
        return self.refine(run, video_latent, audio_latent)
