"""LTX2LongVideo: the two-stage flow laid out for long videos, in one piece or in temporal tiles.

Its DiT chunks by a memory budget: the pipeline gives the transformer a `PlanRule` once, and each
forward (stage 1 at half size, stage 2 at full size) then chooses chunk sizes for the tokens this
rank holds (memory/plan.py). TP/SP come from the components' parallel context (torchrun / sglang).

`long_video_mode` (request field; CLI --long-video-mode):
- dense: the whole video in one two-stage generation. Its VAE decode is streamed like every
  pipeline's (pieces sized by free memory); with --decode-mode exact it uses ltx-core's temporal
  tiles when the whole video's activations would not fit in free memory (pipelines/decode.py's
  plan_temporal_tile).
- tiled: temporal tiles (ComfyUI-LTXVideo's LTXVLoopingSampler's scheme, with audio), tiling.py's
  layout. Each tile is a full two-stage generation (LTX2TwoStagePipeline's flow and guidance, and
  the request's opt-in approximations); tile k+1 starts from tile k's last overlap latents, video
  and audio, held at `tile_cond_strength`, at each stage's size (tile_conditioning.py); each
  tile's latents get AdaIN toward the first tile's statistics by `adain_factor`; each tile takes
  its prompt (tiling.tile_prompt); each tile is decoded (with the pipeline's decode settings) and
  written as it finishes, its overlap with the previous one cross-faded once (tile_writer.py).
  Memory is one tile's however long the video is.
- auto: dense while the video is within the model's trained length (TRAINED_SECONDS), no per-tile
  prompts are given and the memory planner says one piece fits (`decide`): the request planned as
  the components were built (layout, block storage, resident blocks, dtype and the PlanRule that
  picks the activation plans: planning.CapCheck.built) under the process's cap (--max-gpu-memory,
  else the device's memory x its per-process fraction); tiled otherwise. Static sizes only, so
  every rank chooses the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.memory.planner import PlanError, gib
from ltx2_tp.pipelines import approximations, stages
from ltx2_tp.pipelines.base import GenerationResult, Run
from ltx2_tp.pipelines.decode import AUTO, STREAM
from ltx2_tp.pipelines.planning import CapCheck
from ltx2_tp.pipelines.request import MAX_FRAMES, TILED_MAX_FRAMES, GenerationRequest, RequestError
from ltx2_tp.pipelines.tile_conditioning import ChannelStats, adain, channel_stats, overlap_conditionings
from ltx2_tp.pipelines.tile_writer import TileWriter
from ltx2_tp.pipelines.tiling import Tile, memory_frames, plan_tiles, tile_prompt
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

# LTX-2 is trained on clips of up to ~20 s and falls apart past ~25 s in one piece (Lightricks/LTX-2
# issue 48); its RoPE's temporal max_pos is 20 (seconds: positional_embedding_max_pos[0]).
TRAINED_SECONDS = 20.0


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # dense | tiled
    reason: str
    tiles: list[Tile] = field(default_factory=list)  # tiled: the layout

    def describe(self) -> str:
        if self.mode == "dense":
            return f"long-video mode dense ({self.reason})"
        t = self.tiles[0]
        return (f"long-video mode tiled ({self.reason}): {len(self.tiles)} tiles of {t.frames} frames, "
                f"{self.tiles[1].overlap_frames if len(self.tiles) > 1 else 0} cross-faded between tiles")


@dataclass
class TileRun:
    """One tile inside a tiled run, and what the tiles carry from one to the next."""

    tile: Tile
    carry: "TileCarry"


@dataclass
class TileCarry:
    strength: float
    adain_factor: float
    overlap: dict = field(default_factory=dict)  # stage -> (video, audio) latents the next tile starts from
    reference: dict = field(default_factory=dict)  # stage -> the first tile's ChannelStats


class LTX2LongVideo(LTX2TwoStagePipeline):
    name = "LTX2LongVideo"
    tiles = True

    def __init__(self, components, memory_budget_gib: float = 2.0):
        super().__init__(components)
        components.transformer.plan_rule = PlanRule(budget_bytes=memory_budget_gib * 2**30)

    # ---- the request -----------------------------------------------------------------------
    @classmethod
    def max_frames(cls, req: GenerationRequest) -> int:
        return MAX_FRAMES if req.long_video_mode == "dense" else TILED_MAX_FRAMES

    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        super().check_request(req, num_layers)
        if req.long_video_mode == "dense" and (req.prompts or req.prompt_schedule):
            field_ = "prompts" if req.prompts else "prompt_schedule"
            raise RequestError(field_, "per-tile prompts need long_video_mode tiled or auto")
        if req.long_video_mode == "tiled" or req.num_frames > MAX_FRAMES or req.prompts or req.prompt_schedule:
            check_tiled(req)  # surely tiled; auto's other reasons are checked when it chooses

    def choose_mode(self, req: GenerationRequest) -> ModeChoice:
        """dense or tiled for this request on these components (the same on every rank: `decide`)."""
        return self.decide(req, CapCheck.built(self.c, type(self)))

    @classmethod
    def decide(cls, req: GenerationRequest, check: CapCheck) -> ModeChoice:
        """dense or tiled; auto asks the planner whether one piece fits under `check` (its inputs
        and cap: static sizes only, so every rank decides the same)."""
        seconds = req.num_frames / float(req.fps)
        mode = req.long_video_mode
        if mode == "auto":
            if req.prompts or req.prompt_schedule:
                mode, reason = "tiled", "auto: per-tile prompts"
            elif req.num_frames > MAX_FRAMES:
                mode, reason = "tiled", f"auto: {req.num_frames} frames are more than one piece takes ({MAX_FRAMES})"
            elif req.output_format != "mp4":  # as before tiles existed: only MP4 is written tile by tile
                mode, reason = "dense", f"auto: {req.output_format} is written in one piece"
            elif req.num_frames > TRAINED_SECONDS * req.fps + 1:  # 481 frames = 20 s at 24 fps
                mode, reason = "tiled", f"auto: {seconds:.1f} s is beyond the model's trained {TRAINED_SECONDS:g} s"
            else:
                try:
                    plan = check.plan(req.width, req.height, memory_frames(req), req.fps, explain=False)
                    mode, reason = "dense", (f"auto: {seconds:.1f} s in one piece fits: predicted {gib(plan.peak)} "
                                             f"of {gib(check.cap)} (planner) -> dense")
                except PlanError as e:
                    mode, reason = "tiled", (f"auto: one piece needs {gib(e.plan.peak)} (planner), cap "
                                             f"{gib(check.cap)} -> tiled")
        else:
            reason = "as asked"
        if mode == "dense":
            return ModeChoice("dense", reason)
        check_tiled(req)
        return ModeChoice("tiled", reason, plan_tiles(req.num_frames, req.fps, req.tile_frames, req.tile_overlap_frames))

    def temporal_tile_frames(self, req: GenerationRequest) -> int | str | None:
        return AUTO

    def __call__(self, req: GenerationRequest, output_path, progress: stages.Progress | None = None,
                 timer: stages.StageTimer | None = None) -> GenerationResult:
        self.check(req)
        choice = self.choose_mode(req)
        if choice.mode == "dense":
            return super().__call__(req, output_path, progress, timer)
        return self.tiled(req, choice.tiles, output_path, progress, timer)

    # ---- tiled ------------------------------------------------------------------------------
    def tiled(self, req: GenerationRequest, tiles: list[Tile], output_path, progress=None, timer=None) -> GenerationResult:
        c = self.c
        timer = timer or stages.StageTimer(sync=c.device.type == "cuda")
        gen = torch.Generator(device=c.device).manual_seed(int(req.seed))  # one stream of noise through the tiles
        with timer("text_encoding"):
            neg = stages.encode_prompt(c, req.negative_prompt or "")
        carry = TileCarry(float(req.tile_cond_strength), float(req.adain_factor))
        writer = TileWriter(c, output_path, req.width, req.height, req.fps, self.encoder_options, gen, timer,
                            decode=STREAM if self.stream_decode else self.temporal_tile_frames(req))
        report: dict = {}  # the approximations' report over the tiles (stages named per tile)
        encoded: tuple[str, tuple] | None = None  # the last prompt and its contexts: one held at a time
        seconds = []
        try:
            for tile in tiles:
                t0 = time.perf_counter()
                prompt = tile_prompt(req, tile)
                if encoded is None or encoded[0] != prompt:
                    encoded = None  # the previous contexts go before the next are made
                    with timer("text_encoding"):
                        encoded = (prompt, stages.encode_prompt(c, prompt))
                first = tile.index == 0
                tile_req = replace(req, prompt=prompt, num_frames=tile.frames, prompts=[], prompt_schedule=[],
                                   image_path=req.image_path if first else None, images=req.images if first else [])
                run = Run(tile_req, gen, encoded[1], neg, timer, _tile_progress(progress, tile),
                          tile=TileRun(tile, carry))
                with approximations.applied(c, tile_req, run.approximations):
                    video_latent, audio_latent = self.latents(run)
                _merge_report(report, run.approximations, tile)
                label = f"{tile.label} decode"
                if progress:
                    progress(label, 0, 1)
                with timer("decode_and_write"):
                    writer.write(tile, video_latent, audio_latent)
                del video_latent, audio_latent
                if progress:
                    progress(label, 1, 1)
                seconds.append(time.perf_counter() - t0)
            with timer("decode_and_write"):
                path, samples = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if progress:
            progress("done", 1, 1)
        return GenerationResult(path=path, frames=req.num_frames, width=req.width, height=req.height, fps=req.fps,
                                audio_samples=samples, stage_times=dict(timer.times), approximations=report,
                                tile_seconds=seconds)

    def stage_inputs(self, run: Run, shape, stage: str):
        video, audio, frames = super().stage_inputs(run, shape, stage)
        if run.tile is None:
            return video, audio, frames
        tile, carry = run.tile.tile, run.tile.carry
        if tile.overlap:
            more_video, more_audio = overlap_conditionings(*carry.overlap[stage], carry.strength)
            video, audio = video + more_video, audio + more_audio
        return video, audio, tile.audio_frames

    def stage_output(self, run: Run, stage: str, video_latent, audio_latent):
        if run.tile is None:
            return video_latent, audio_latent
        tile, carry = run.tile.tile, run.tile.carry
        if tile.index == 0:
            carry.reference[stage] = channel_stats(video_latent) if carry.adain_factor else ChannelStats(None, None)
        else:
            video_latent = adain(video_latent, carry.reference[stage], carry.adain_factor)
        if tile.next_overlap:  # copies: the tile's own latents are freed once it is written
            carry.overlap[stage] = (video_latent[:, :, -tile.next_overlap:].clone(),
                                    audio_latent[:, :, -tile.next_audio_overlap:].clone())
        else:
            carry.overlap.pop(stage, None)
        return video_latent, audio_latent


def check_tiled(req: GenerationRequest) -> None:
    """What a tiled request needs besides its fields' ranges: images in the first tile, MP4 output."""
    first = plan_tiles(req.num_frames, req.fps, req.tile_frames, req.tile_overlap_frames)[0]
    late = [int(i[1]) for i in req.images if int(i[1]) >= first.frames]
    if late:
        raise RequestError("images", f"a tiled long video takes images in its first tile (frames 0 to "
                           f"{first.frames - 1}), got frame {late[0]}")
    if req.output_format != "mp4":
        raise RequestError("output_format", f"a tiled long video is written as mp4, got {req.output_format!r}")


def _merge_report(report: dict, tile_report: dict, tile: Tile) -> None:
    """One tile's approximations report into the run's: per-stage entries named "tile 3/10 stage1"."""
    for key, value in tile_report.items():
        if isinstance(value, dict):  # keyframe_stride / step_cache: stage -> counts
            report.setdefault(key, {}).update({f"{tile.label} {stage}": r for stage, r in value.items()})
        else:
            report[key] = value


def _tile_progress(progress, tile: Tile):
    """The pipeline's progress with the tile named: "tile 3/10 stage1"."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{tile.label} {stage}", done, total)
