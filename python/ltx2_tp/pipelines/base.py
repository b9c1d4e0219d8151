"""What every pipeline does around its denoising: check the request, encode the prompts, decode,
write the file, report. A pipeline is a class with a `name` (the registry's and sglang's) and a
`latents(run)` method composing the stages (stages.py) into its flow; `__call__` does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltx2_tp.media_stream import FAST_OPTIONS
from ltx2_tp.pipelines import approximations, stages
from ltx2_tp.pipelines.components import LTX2Components
from ltx2_tp.pipelines.decode import STREAM, decode_and_write
from ltx2_tp.pipelines.guidance import check_stg_blocks, default_params, request_guidance
from ltx2_tp.pipelines.request import MAX_FRAMES, TWO_STAGE_SPATIAL_MULTIPLE, GenerationRequest, RequestError


@dataclass
class GenerationResult:
    path: Path
    frames: int
    width: int
    height: int
    fps: float
    audio_samples: int
    stage_times: dict[str, float]
    approximations: dict = field(default_factory=dict)  # what the request's opt-in approximations did
    tile_seconds: list[float] = field(default_factory=list)  # a tiled long video: wall time per tile


@dataclass
class Run:
    """One request inside a pipeline: what its stages share."""

    req: GenerationRequest
    generator: torch.Generator
    pos: tuple  # (video context, audio context) of the prompt
    neg: tuple | None  # of the negative prompt (guided pipelines only)
    timer: stages.StageTimer
    progress: stages.Progress | None
    source_audio: object = None  # A2Vid: the input audio, written as it is
    approximations: dict = field(default_factory=dict)  # their report (pipelines/approximations.py)
    tile: object = None  # a tiled long video's tile (long_video.TileRun); None: the whole request


class LTX2PipelineBase:
    name = ""
    spatial_multiple = TWO_STAGE_SPATIAL_MULTIPLE  # two-stage: stage 1 runs at half size, itself a multiple of 32
    # the decode stage (CLI --decode-mode): fast = the VAE streamed (vae_stream.py) + x264 ultrafast,
    # frame threads, I420 on the GPU; exact (stream_decode False, media_stream.EXACT_OPTIONS) =
    # ltx-pipelines' decode and encoder settings, bit for bit
    stream_decode = True
    encoder_options = FAST_OPTIONS  # MP4 encoder settings (media_stream.EncoderOptions; CLI --video-encoder-*)
    guided = True  # encodes the negative prompt and reads the guidance fields
    supports_keyframe_stride = False  # stage 1 over keyframes only (pipelines/keyframe_stride.py)
    supports_step_cache = True  # its loops are Euler loops (pipelines/step_cache.py)
    upsamples = False  # stage 2 starts with the x2 latent upsampler (its smallest input: stages.py)
    fixed_steps: int | None = None  # a pipeline whose sigmas are fixed (distilled: 8) ignores num_inference_steps
    # request fields the pipeline needs beyond the prompt (the server refuses those it cannot fill)
    inputs: tuple[str, ...] = ()
    tiles = False  # makes temporal tiles (long_video_mode, per-tile prompts): LTX2LongVideo

    def __init__(self, components: LTX2Components, params=None):
        self.c = components
        c = components
        self.params = params or self.default_params(c.transformer.cfg, c.checkpoint_path, c.name == "tiny")

    @classmethod
    def default_params(cls, cfg, checkpoint_path: str | None = None, tiny: bool = False):
        """ltx-pipelines' PipelineParams for this pipeline and model (guidance.py)."""
        return default_params(cfg, checkpoint_path, tiny)

    # hooks ---------------------------------------------------------------------------------
    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        """Everything about the request this pipeline needs that the model does not decide (the CLI
        calls it before anything is built; `num_layers`: the DiT's blocks, for the STG blocks)."""
        req.validate(max_frames=cls.max_frames(req), spatial_multiple=cls.spatial_multiple)
        if not cls.tiles:
            for name, given in (("long_video_mode", req.long_video_mode == "tiled"), ("prompts", req.prompts),
                                ("prompt_schedule", req.prompt_schedule)):
                if given:
                    raise RequestError(name, f"only LTX2LongVideo makes tiled long videos, not {cls.name}")
        if req.image_path and not Path(req.image_path).is_file():
            raise RequestError("image_path", f"no such file: {req.image_path}")
        for img in req.images:
            if not Path(img[0]).is_file():
                raise RequestError("images", f"no such file: {img[0]}")
        if cls.guided:
            check_stg_blocks(req, num_layers)
        approximations.check(cls, req)

    @classmethod
    def check_with(cls, req: GenerationRequest, c: LTX2Components) -> None:
        """The request against this pipeline and the built components (the server calls it before a
        job is queued): check_request, then what the weights decide (the upsampler's smallest input)."""
        cls.check_request(req, c.transformer.cfg.num_layers)
        if cls.upsamples:
            stages.check_upsampler_input(c, req.num_frames, req.height, req.width)

    @classmethod
    def max_frames(cls, req: GenerationRequest) -> int:
        """The most frames this pipeline takes for `req`."""
        return MAX_FRAMES

    def check(self, req: GenerationRequest) -> None:
        """Before anything runs: the request, then what this pipeline instance adds."""
        self.check_with(req, self.c)
        approximations.check_layout(req, self.c.ctx.ring_size)

    def temporal_tile_frames(self, req: GenerationRequest) -> int | str | None:
        """ltx-core's tiling when the decode is not streamed: None (whole video), N or decode.AUTO."""
        return None

    def latents(self, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """The final (unpatchified) video and audio latents."""
        raise NotImplementedError

    def source_audio(self, run: Run):
        """The audio to write instead of decoding the audio latent (A2Vid: its input); None: decode."""
        return None

    def output_shape(self, req: GenerationRequest) -> tuple[int, int, int, float]:
        return req.num_frames, req.width, req.height, req.fps

    # shared pieces -------------------------------------------------------------------------
    def guidance(self, req: GenerationRequest):
        """(video, audio) MultiModalGuiderParams: the request's fields over this pipeline's defaults."""
        return request_guidance(req, self.params, self.c.transformer.cfg.num_layers)

    def image_inputs(self, req: GenerationRequest):
        """ltx-pipelines' ImageConditioningInput list: --image entries, and sglang's image_path as frame 0."""
        from ltx_pipelines.utils.args import ImageConditioningInput

        images = [ImageConditioningInput(req.image_path, 0, 1.0)] if req.image_path else []
        return images + [ImageConditioningInput(str(i[0]), int(i[1]), float(i[2]), *[int(x) for x in i[3:]])
                         for i in req.images]

    def image_conditionings(self, req: GenerationRequest, height: int, width: int, keyframes: bool = False):
        """Encoded images at (height, width): frame 0 replaces latents, others append keyframe tokens
        (ltx-pipelines' combined_image_conditionings); `keyframes`: all appended (keyframe pipeline)."""
        images = self.image_inputs(req)
        if not images:
            return []
        from ltx_pipelines.utils.helpers import combined_image_conditionings, image_conditionings_by_adding_guiding_latent

        how = image_conditionings_by_adding_guiding_latent if keyframes else combined_image_conditionings
        enc = self.c.video_encoder
        with torch.no_grad():
            conds = how(images, height, width, enc, next(enc.parameters()).dtype, self.c.device)
        return [_in_dit_dtype(cond, self.c.dtype) for cond in conds]

    # the request ---------------------------------------------------------------------------
    def run_latents(self, req: GenerationRequest, progress: stages.Progress | None = None,
                    timer: stages.StageTimer | None = None) -> tuple[Run, torch.Tensor, torch.Tensor]:
        """Check, encode the prompts and denoise: the run and its final latents (no decoding)."""
        self.check(req)
        c, timer = self.c, timer or stages.StageTimer(sync=self.c.device.type == "cuda")
        gen = torch.Generator(device=c.device).manual_seed(int(req.seed))
        with timer("text_encoding"):
            if self.guided:
                pos, neg = stages.encode_text(c, req.prompt, req.negative_prompt)
            else:  # ltx-pipelines encodes the prompt alone here
                pos, neg = stages.encode_prompt(c, req.prompt), None
        run = Run(req, gen, pos, neg, timer, progress)
        with approximations.applied(c, req, run.approximations):
            video_latent, audio_latent = self.latents(run)
        return run, video_latent, audio_latent

    def __call__(self, req: GenerationRequest, output_path: str | Path, progress: stages.Progress | None = None,
                 timer: stages.StageTimer | None = None) -> GenerationResult:
        run, video_latent, audio_latent = self.run_latents(req, progress, timer)
        c, timer, gen = self.c, run.timer, run.generator
        frames_n, width, height, fps = self.output_shape(req)
        with timer("decode_and_write"):
            path, audio_samples = decode_and_write(c, video_latent, audio_latent, fps, output_path, req.output_format,
                                                   gen, STREAM if self.stream_decode else self.temporal_tile_frames(req),
                                                   self.encoder_options, timer,
                                                   audio=self.source_audio(run))
        if progress:
            progress("done", 1, 1)
        return GenerationResult(path=path, frames=frames_n, width=width, height=height, fps=fps,
                                audio_samples=audio_samples, stage_times=dict(timer.times),
                                approximations=run.approximations)


def pixel_shape(req: GenerationRequest, divide: int = 1):
    """The request's video at 1 / `divide` of its size (stage 1 of two: 2)."""
    from ltx_core.types import VideoPixelShape

    return VideoPixelShape(batch=1, frames=req.num_frames, width=req.width // divide, height=req.height // divide,
                           fps=req.fps)


def _in_dit_dtype(cond, dtype):
    """Conditioning latents enter the DiT in its dtype (the encoder may run in another)."""
    for name in ("latent", "keyframes"):
        if isinstance(getattr(cond, name, None), torch.Tensor):
            setattr(cond, name, getattr(cond, name).to(dtype))
    return cond
