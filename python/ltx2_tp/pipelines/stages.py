"""Pipeline stages, each a plain function over LTX2Components. ltx-core / ltx-pipelines supply the
latent tools, noiser, scheduler, Euler step, guiders, upsampler and decoders; our DiT runs.

Stages a reader can list: encode_text -> prepare_latents -> denoise (stage 1, guided) ->
upsample -> denoise (stage 2, distilled sigmas) -> decode_video / decode_audio -> write_media.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ltx2_tp.compat import ensure_ltx_imports
from ltx2_tp.latent_grid import SPATIAL_SCALE, TEMPORAL_SCALE, tokens_per_rank
from ltx2_tp.models.ltx2.lora import lora_applied
from ltx2_tp.models.vae_stream import Streamed, stream_decode
from ltx2_tp.pipelines import step_cache
from ltx2_tp.pipelines.components import LTX2Components
from ltx2_tp.pipelines.guidance import cfg_only, guided_denoise_fn
from ltx2_tp.pipelines.request import RequestError
from ltx2_tp.profiling import nvtx_range

ensure_ltx_imports()

from ltx_core.components.diffusion_steps import EulerDiffusionStep  # noqa: E402
from ltx_core.components.noisers import GaussianNoiser  # noqa: E402
from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier  # noqa: E402
from ltx_core.components.schedulers import LTX2Scheduler  # noqa: E402
from ltx_core.model.transformer.model import X0Model  # noqa: E402
from ltx_core.tools import AudioLatentTools, VideoLatentTools  # noqa: E402
from ltx_core.types import AudioLatentShape, LatentState, VideoLatentShape, VideoPixelShape  # noqa: E402
from ltx_pipelines.utils.constants import (DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES,  # noqa: E402
                                           VIDEO_SCALE_FACTORS)
from ltx_pipelines.utils.helpers import create_noised_state, post_process_latent, simple_denoising_func  # noqa: E402

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class StageTimer:
    """Wall time per stage, in order, for the table the CLI prints and the server reports; with
    `memory` (CUDA), this rank's allocated bytes when each stage starts (inputs prepared) and its
    peak inside the stage (the allocator's peak is reset at each stage: read `peak`, not
    torch.cuda.max_memory_allocated, for the whole request's)."""

    times: dict[str, float] = field(default_factory=dict)
    sync: bool = False
    # "stage.part" -> seconds inside a stage; parts may overlap, so they are shown, not summed
    parts: dict[str, float] = field(default_factory=dict)
    memory: bool = False
    mem: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (bytes at start, peak), max over entries

    def part(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + seconds

    @property
    def peak(self) -> int:
        return max((p for _, p in self.mem.values()), default=0)

    @contextmanager
    def __call__(self, name: str):
        track = self.memory and torch.cuda.is_available()
        if track:
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with nvtx_range(name):
            yield
            if self.sync and torch.cuda.is_available():
                torch.cuda.synchronize()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if track:
            was = self.mem.get(name, (0, 0))
            self.mem[name] = (max(was[0], start), max(was[1], torch.cuda.max_memory_allocated()))

    def table(self) -> str:
        total = sum(self.times.values()) or 1.0
        g = (lambda n: f"{n / 2**30:>9.2f}")
        mem = (lambda k: f" {g(self.mem[k][0])} {g(self.mem[k][1])}" if k in self.mem else "")
        rows = [f"{'stage':<22} {'seconds':>9} {'share':>7}" + (f" {'GiB start':>9} {'GiB peak':>9}" if self.mem else "")]
        for k, v in self.times.items():
            rows.append(f"{k:<22} {v:>9.3f} {v / total:>7.1%}{mem(k)}")
            rows += [f"  {p[len(k) + 1:]:<20} {s:>9.3f}" for p, s in self.parts.items() if p.startswith(k + ".")]
        rows.append(f"{'total':<22} {total:>9.3f}")
        return "\n".join(rows)


@dataclass
class Streams:
    video: LatentState
    audio: LatentState
    video_tools: VideoLatentTools
    audio_tools: AudioLatentTools


def encode_prompt(c: LTX2Components, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(video context, audio context) in the DiT's dtype."""
    with torch.no_grad():
        return tuple(t.to(device=c.device, dtype=c.dtype) for t in c.text_encoder(prompt))


def encode_text(c: LTX2Components, prompt: str, negative_prompt: str):
    return encode_prompt(c, prompt), encode_prompt(c, negative_prompt or "")


def prepare_latents(c: LTX2Components, shape: VideoPixelShape, generator: torch.Generator, conditionings=(),
                    noise_scale: float = 1.0, initial_video: torch.Tensor | None = None,
                    initial_audio: torch.Tensor | None = None, audio_conditionings=(),
                    audio_noise_scale: float | None = None, audio_frames: int | None = None) -> Streams:
    """Noised video and audio latent states (patchified), as ltx-pipelines' denoise_audio_video
    (`audio_noise_scale` 0: the audio is kept as given, as its denoise_video_only; noise is drawn
    for it all the same, as there). `audio_frames`: audio latent frames other than the video's
    duration gives (a tile of a long video: its share of the whole video's audio)."""
    noiser = GaussianNoiser(generator=generator)
    vshape = VideoLatentShape.from_pixel_shape(shape=shape, latent_channels=c.video_latent_channels,
                                               scale_factors=VIDEO_SCALE_FACTORS)
    vtools = VideoLatentTools(VideoLatentPatchifier(patch_size=1), vshape, shape.fps)
    ashape = AudioLatentShape.from_video_pixel_shape(shape, channels=c.audio_latent_channels, mel_bins=c.audio_mel_bins)
    if audio_frames is not None:
        ashape = ashape._replace(frames=audio_frames)
    atools = AudioLatentTools(AudioPatchifier(patch_size=1), ashape)
    common = dict(noiser=noiser, dtype=c.dtype, device=c.device)
    video = create_noised_state(tools=vtools, conditionings=list(conditionings), initial_latent=initial_video,
                                noise_scale=noise_scale, **common)
    audio = create_noised_state(tools=atools, conditionings=list(audio_conditionings), initial_latent=initial_audio,
                                noise_scale=noise_scale if audio_noise_scale is None else audio_noise_scale, **common)
    return Streams(video, audio, vtools, atools)


def denoise(c: LTX2Components, s: Streams, sigmas: torch.Tensor, denoise_fn, stage: str,
            progress: Progress | None = None) -> Streams:
    """Euler loop over `sigmas` (ltx-pipelines' euler_denoising_loop, with progress and NVTX per step).
    A request with `step_cache_threshold` > 0 reuses some steps' outputs (step_cache.py, opt-in)."""
    denoise_fn = step_cache.for_stage(c, denoise_fn, stage)
    stepper = EulerDiffusionStep()
    video, audio = s.video, s.audio
    total = len(sigmas) - 1
    # the Euler step reads sigma with .item(): from a host copy it does not wait for the GPU (same values)
    host_sigmas = sigmas.cpu()
    if progress:
        progress(stage, 0, total)  # the loop starts (benchmarks start their per-step clock here)
    for i in range(total):
        with nvtx_range(stage, "_step", i):
            dv, da = denoise_fn(video, audio, sigmas, i)
            dv = post_process_latent(dv, video.denoise_mask, video.clean_latent)
            da = post_process_latent(da, audio.denoise_mask, audio.clean_latent)
            video = replace(video, latent=stepper.step(video.latent, dv, host_sigmas, i))
            audio = replace(audio, latent=stepper.step(audio.latent, da, host_sigmas, i))
        if progress:
            progress(stage, i + 1, total)
    return Streams(video, audio, s.video_tools, s.audio_tools)


def denoise_res2s(c: LTX2Components, s: Streams, sigmas: torch.Tensor, denoise_fn, stage: str,
                  progress: Progress | None = None) -> Streams:
    """ltx-pipelines' res_2s loop (two DiT evaluations per step, SDE noise from its own seeds), the
    latents kept in the DiT's dtype between evaluations (ltx-pipelines: its pipeline dtype, bf16)."""
    from ltx_core.components.diffusion_steps import Res2sDiffusionStep
    from ltx_pipelines.utils.samplers import res2s_audio_video_denoising_loop

    total = 2 * (len(sigmas) - 1) + int(float(sigmas[-1]) == 0.0)  # DiT evaluations
    done = [0]

    def counted(*a, **k):
        with nvtx_range(stage, "_eval", done[0]):
            out = denoise_fn(*a, **k)
        done[0] += 1
        if progress:
            progress(stage, done[0], total)
        return out

    if progress:
        progress(stage, 0, total)
    video, audio = res2s_audio_video_denoising_loop(sigmas, s.video, s.audio, Res2sDiffusionStep(), counted,
                                                    model_dtype=c.dtype)
    return Streams(video, audio, s.video_tools, s.audio_tools)


def unpatchify(s: Streams) -> tuple[torch.Tensor, torch.Tensor]:
    v = s.video_tools.unpatchify(s.video_tools.clear_conditioning(s.video))
    a = s.audio_tools.unpatchify(s.audio_tools.clear_conditioning(s.audio))
    return v.latent, a.latent


def stage1_denoise_fn(c: LTX2Components, ctx_pos, ctx_neg, guidance_scale: float, batch: bool | None = None):
    """Plain CFG on both streams (ltx-core's CFGGuider arithmetic: cond + (scale - 1)(cond - uncond)),
    through the multimodal guidance's passes (guidance.py): one batched forward when they fit."""
    return guided_denoise_fn(c, ctx_pos, ctx_neg, cfg_only(guidance_scale), cfg_only(guidance_scale), batch)


def stage2_denoise_fn(c: LTX2Components, ctx_pos):
    """No guidance: one pass per step (stage 2, the distilled model). Call inside the weights the
    stage runs on (`stage2_weights(c)`: plus the distilled LoRA)."""
    return simple_denoising_func(ctx_pos[0], ctx_pos[1], X0Model(c.transformer))


def stage2_weights(c: LTX2Components, strength: float | None = None):
    """The DiT plus the distilled LoRA (at `strength`, default the file's flag) while inside."""
    lora = c.stage2_lora
    if lora is not None and strength is not None:
        lora = replace(lora, strength=strength)
    return lora_applied(c.transformer, lora)


def load_audio_encoder(c: LTX2Components):
    """ltx-core's audio VAE encoder (A2Vid, retake), built on first use: from the checkpoint, or the
    tiny one (seeded). It needs torchaudio (its mel spectrogram; compat.py says so if missing)."""
    from ltx_core.model.audio_vae import AudioEncoderConfigurator

    if c.checkpoint_path:
        from ltx_pipelines.utils.model_ledger import ModelLedger

        dtype = torch.float32 if c.device.type == "cpu" else c.dtype
        return ModelLedger(dtype=dtype, device=c.device, checkpoint_path=c.checkpoint_path).audio_encoder()
    from ltx2_tp.pipelines.tiny import TINY_AUDIO_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return AudioEncoderConfigurator.from_config(TINY_AUDIO_VAE).to(c.device).eval()


def stage1_sigmas(steps: int, device) -> torch.Tensor:
    return LTX2Scheduler().execute(steps=steps).to(dtype=torch.float32, device=device)


def stage2_sigmas(device) -> torch.Tensor:
    return torch.tensor(STAGE_2_DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)


DISTILLED_STEPS = len(DISTILLED_SIGMA_VALUES) - 1  # 8


def distilled_sigmas(device) -> torch.Tensor:
    """The distilled model's 8 steps (ltx-pipelines' DISTILLED_SIGMA_VALUES)."""
    return torch.tensor(DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)


def check_upsampler_input(c: LTX2Components, num_frames: int, height: int, width: int) -> None:
    """A request (full size; stage 1 runs at half) whose stage-1 latent is too small for the x2
    upsampler is a RequestError naming width, with the smallest width that works at this height and
    frame count. The upsampler's GroupNorms need more than one value per group (torch refuses one):
    the official upsampler (32 channels a group) takes any size; the tiny one (1 a group) needs 2
    latent cells, so 64x64 with 1 frame (1x1x1) fails."""
    per_group = min((m.num_channels // m.num_groups for m in c.upsampler.modules()
                     if isinstance(m, torch.nn.GroupNorm)), default=2)
    need = -(-2 // per_group)  # latent cells for 2 values a group
    cell = 2 * SPATIAL_SCALE  # a stage-1 latent cell in the request's pixels
    frames, rows, cols = (num_frames - 1) // TEMPORAL_SCALE + 1, height // cell, width // cell
    if frames * rows * cols >= need:
        return
    smallest_width = -(-need // (frames * rows)) * cell
    fewest_frames = TEMPORAL_SCALE * (-(-need // (rows * cols)) - 1) + 1
    raise RequestError("width", f"{width}x{height} with {num_frames} frames is below the smallest input of stage 2's "
                       f"x2 latent upsampler (its GroupNorm needs {need} latent cells at stage 1, this has "
                       f"{frames}x{rows}x{cols}); the smallest size at height {height} and {num_frames} frames is "
                       f"{smallest_width}x{height} (or num_frames >= {fewest_frames} at {width}x{height})")


@torch.no_grad()
def upsample(c: LTX2Components, video_latent: torch.Tensor) -> torch.Tensor:
    from ltx_core.model.upsampler import upsample_video

    enc, up = c.video_encoder, c.upsampler
    x = video_latent[:1].to(next(up.parameters()).dtype)
    return upsample_video(latent=x, video_encoder=enc, upsampler=up).to(c.dtype)


def decode_video(c: LTX2Components, video_latent: torch.Tensor, temporal_tile_frames,
                 generator: torch.Generator | None = None) -> tuple[Iterator[torch.Tensor], int]:
    """Frames as uint8 (f, h, w, 3) chunks. `temporal_tile_frames`: None (ltx-core's decode of the
    whole video), N (ltx-core's temporal tiles of N frames, overlapping by 8 and blended, so
    decoding never holds the whole video's activations), or vae_stream.Streamed (pieces of the
    whole-video decode, carrying the convolutions' state: exact, small, no recomputation)."""
    from ltx_core.model.video_vae import TemporalTilingConfig, TilingConfig, get_video_chunks_number
    from ltx_core.model.video_vae import decode_video as vae_decode

    frames = (video_latent.shape[2] - 1) * 8 + 1
    dec = c.video_decoder
    lat = video_latent.to(next(dec.parameters()).dtype)
    if isinstance(temporal_tile_frames, Streamed):
        chunk = temporal_tile_frames.chunk_frames

        def pieces():
            for x in stream_decode(dec, lat, chunk, generator):  # batched (B, C, F, H, W), as ltx-pipelines
                yield to_uint8(x)

        return pieces(), -(-frames // chunk)
    tiling = None
    if temporal_tile_frames:
        tiling = TilingConfig(temporal_config=TemporalTilingConfig(temporal_tile_frames, 8))

    def gen():
        with torch.no_grad():
            yield from vae_decode(lat, dec, tiling, generator)  # batched (B, C, F, H, W), as ltx-pipelines passes it

    return gen(), get_video_chunks_number(frames, tiling)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(1, 3, f, h, w) in [-1, 1] -> (f, h, w, 3) uint8: ltx-core decode_video's conversion."""
    frames = (((frames + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return frames[0].permute(1, 2, 3, 0)


@torch.no_grad()
def decode_audio(c: LTX2Components, audio_latent: torch.Tensor):
    from ltx_core.model.audio_vae import decode_audio as vae_decode_audio

    return vae_decode_audio(audio_latent.to(next(c.audio_decoder.parameters()).dtype), c.audio_decoder, c.vocoder)
