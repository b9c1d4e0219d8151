"""LTX2RetakePipeline: ltx-pipelines' retake (RetakePipeline) with our DiT.

Regenerates the time region [start_time, end_time) of a video (video and audio) and keeps the rest:
the source's latents (video VAE encoder; audio VAE encoder) are the initial state, and ltx-pipelines'
TemporalRegionMask sets the denoise mask to 1 inside the region and 0 outside. One guided stage at
the source's size, frames and fps (multiples of 32, 8k+1 frames), LTX2Scheduler sigmas.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ltx2_tp.compat import has_torchaudio
from ltx2_tp.latent_grid import SPATIAL_SCALE
from ltx2_tp.pipelines import stages
from ltx2_tp.pipelines.base import LTX2PipelineBase, Run, pixel_shape
from ltx2_tp.pipelines.guidance import guided_denoise_fn
from ltx2_tp.pipelines.request import GenerationRequest, RequestError


class LTX2RetakePipeline(LTX2PipelineBase):
    name = "LTX2RetakePipeline"
    spatial_multiple = SPATIAL_SCALE  # one stage at full size: the DiT's 32
    inputs = ("video_path",)

    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        """The output is the source's size, frames and fps: they replace the request's."""
        from ltx_pipelines.utils.media_io import get_videostream_metadata

        if not req.video_path or not Path(req.video_path).is_file():
            raise RequestError("video_path", f"the retake pipeline needs a source video; no such file: {req.video_path}")
        if req.start_time is None or req.end_time is None:
            raise RequestError("start_time", "the retake pipeline needs start_time and end_time (seconds)")
        fps, frames, width, height = get_videostream_metadata(req.video_path)
        if (frames - 1) % 8 or width % 32 or height % 32:
            raise RequestError("video_path", f"the source video must have 8k+1 frames and sides that are multiples of "
                               f"32, got {frames} frames of {width}x{height}")
        req.fps, req.num_frames, req.width, req.height = fps, frames, width, height
        super().check_request(req, num_layers)
        if _has_audio(req.video_path) and not has_torchaudio():
            raise RequestError("video_path", f"the source's audio track needs torchaudio to encode (ltx-core's audio "
                               f"encoder), which is not installed for this torch {torch.__version__}")

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        from ltx_pipelines.retake import TemporalRegionMask, _encode_audio_for_retake, _encode_video_for_retake
        from ltx_pipelines.utils.media_io import decode_audio_from_file

        c, req, t = self.c, run.req, run.timer
        video_guidance, audio_guidance = self.guidance(req)
        shape = pixel_shape(req)
        region = [TemporalRegionMask(start_time=req.start_time, end_time=req.end_time, fps=req.fps)]
        with t("source_encoding"), torch.no_grad():
            enc = c.video_encoder
            video = _encode_video_for_retake(enc, req.video_path, shape, next(enc.parameters()).dtype, c.device)
            audio, audio_region = None, []
            source_audio = decode_audio_from_file(req.video_path, c.device)
            if source_audio is not None:  # else the audio is generated whole, as in ltx-pipelines
                audio_encoder = stages.load_audio_encoder(c)
                audio = _encode_audio_for_retake(audio_encoder, source_audio.waveform.squeeze(0),
                                                 source_audio.sampling_rate, shape, next(audio_encoder.parameters()).dtype)
                audio, audio_region = audio.to(c.dtype), region
        with t("latent_preparation"):
            s = stages.prepare_latents(c, shape, run.generator, region, initial_video=video.to(c.dtype),
                                       initial_audio=audio, audio_conditionings=audio_region)
        with t("stage1_denoise"):
            s = stages.denoise(c, s, stages.stage1_sigmas(req.num_inference_steps, c.device),
                               guided_denoise_fn(c, run.pos, run.neg, video_guidance, audio_guidance), "stage1",
                               run.progress)
            return stages.unpatchify(s)


def _has_audio(path: str) -> bool:
    import av

    with av.open(path) as f:
        return bool(f.streams.audio)
