"""LTX2A2VidPipeline: ltx-pipelines' a2vid_two_stage (A2VidPipelineTwoStage) with our DiT.

Video to a given audio: the audio file (`audio_path`, from `audio_start_time`, at most
`audio_max_duration` s; default the video's length) is encoded by ltx-core's audio VAE encoder and
held fixed (denoise mask 0, no noise) while the video is generated: stage 1 guided on the video
only (the audio guider does nothing), x2 upsampler, stage 2 with the distilled LoRA. The output
carries the input audio itself, not a decoded copy.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ltx2_tp.compat import has_torchaudio
from ltx2_tp.pipelines import keyframe_stride, stages
from ltx2_tp.pipelines.base import Run, pixel_shape
from ltx2_tp.pipelines.guidance import default_params, guided_denoise_fn
from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2A2VidPipeline(LTX2TwoStagePipeline):
    name = "LTX2A2VidPipeline"
    inputs = ("audio_path",)

    @classmethod
    def default_params(cls, cfg, checkpoint_path=None, tiny=False):
        from ltx_pipelines.utils.constants import LTX_2_3_PARAMS

        return default_params(cfg, checkpoint_path, tiny, base=LTX_2_3_PARAMS)  # its entry point's, for every model

    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        super().check_request(req, num_layers)
        if not req.audio_path or not Path(req.audio_path).is_file():
            raise RequestError("audio_path", f"the A2Vid pipeline needs an audio file; no such file: {req.audio_path}")
        if not has_torchaudio():
            raise RequestError("audio_path", f"encoding audio needs torchaudio (ltx-core's audio encoder), which is not "
                               f"installed for this torch {torch.__version__}")

    def encoded_audio(self, run: Run):
        from ltx_core.model.audio_vae import encode_audio
        from ltx_core.types import AudioLatentShape
        from ltx_pipelines.utils.media_io import decode_audio_from_file

        c, req = self.c, run.req
        duration = req.audio_max_duration if req.audio_max_duration is not None else req.num_frames / req.fps
        waveform = decode_audio_from_file(req.audio_path, c.device, req.audio_start_time, duration)
        if waveform is None:
            raise RequestError("audio_path", f"{req.audio_path} has no audio stream")
        with torch.no_grad():
            latent = encode_audio(waveform, stages.load_audio_encoder(c))
        frames = AudioLatentShape.from_duration(batch=1, duration=req.num_frames / req.fps).frames
        run.source_audio = waveform
        return latent[:, :, :frames].to(c.dtype)

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        c, req, t = self.c, run.req, run.timer
        video_guidance, _ = self.guidance(req)
        half = pixel_shape(req, 2)
        with t("audio_encoding"):
            audio = self.encoded_audio(run)
        with t("latent_preparation"):
            s = self.video_only(stages.prepare_latents(c, half, run.generator, self.image_conditionings(
                req, half.height, half.width), initial_audio=audio, audio_noise_scale=0.0))
        with t("stage1_denoise"):
            no_audio_guidance = type(video_guidance)()
            loop = keyframe_stride.strided(stages.denoise, req.keyframe_stride, run.approximations)
            s = loop(c, s, stages.stage1_sigmas(req.num_inference_steps, c.device),
                     guided_denoise_fn(c, run.pos, run.neg, video_guidance, no_audio_guidance, audio_negative=False),
                     "stage1", run.progress)
            video_latent, _ = stages.unpatchify(s)
        with t("upsample"):
            up = stages.upsample(c, video_latent)
        full = pixel_shape(req)
        sig2 = stages.stage2_sigmas(c.device)
        with t("stage2_refine"):
            s = self.video_only(stages.prepare_latents(c, full, run.generator, self.image_conditionings(
                req, full.height, full.width), noise_scale=float(sig2[0]), initial_video=up, initial_audio=audio,
                audio_noise_scale=0.0))
            with stages.stage2_weights(c):
                s = stages.denoise(c, s, sig2, stages.stage2_denoise_fn(c, run.pos), "stage2", run.progress)
            video_latent, _ = stages.unpatchify(s)
        return video_latent, audio

    @staticmethod
    def video_only(s: stages.Streams) -> stages.Streams:
        """The audio is input, not output: denoise mask 0 (ltx-pipelines' denoise_video_only)."""
        s.audio = replace(s.audio, denoise_mask=torch.zeros_like(s.audio.denoise_mask))
        return s

    def source_audio(self, run: Run):
        from ltx_core.types import Audio

        a = run.source_audio  # the input audio itself, as ltx-pipelines returns it
        return Audio(waveform=a.waveform.squeeze(0), sampling_rate=a.sampling_rate)
