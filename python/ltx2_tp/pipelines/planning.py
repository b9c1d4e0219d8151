"""A pipeline's request under a GPU memory cap: the one helper generate, serve, sglang and
LTX2LongVideo's `auto` mode call.

`plan_pipeline` maps a pipeline class to the planner's stages (two-stage classes: stage 1 at half
size, guided unless the class is not; stage 2 at full size) and plans the request
(memory/planner.py). `CapCheck` holds the planner's inputs that are fixed once the components are
built (`CapCheck.built` reads them off the components, under the process's cap: `process_cap`).
`request_plan` plans one request as its pipeline will run it (a tiling pipeline's `decide`: what
does not fit in one piece is tiled, and then one tile is what must fit), or refuses it as OverCap,
a RequestError naming the field the request used (`num_frames` or `seconds`; `tile_frames` for a
tile) and the largest value that fits at its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.latent_grid import TEMPORAL_SCALE
from ltx2_tp.memory.device import device_bytes
from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.memory.planner import COMPANION_BYTES, GEMMA3_12B_BYTES, Layout, PlanError, RequestPlan, plan_request
from ltx2_tp.pipelines.request import TILE_FRAMES_RANGE, RequestError


def text_encoder_bytes(model: str) -> int:
    """Device bytes of the text encoder the model's pipeline builds (the tiny one: negligible)."""
    return 0 if model == "tiny" else GEMMA3_12B_BYTES


def plan_pipeline(cfg, pipeline_cls, *, width: int, height: int, num_frames: int, fps: float, cap: int,
                  num_gpus: int = 1, layout: Layout | None = None, storage: str | None = None,
                  resident_blocks: int | None = None, model: str = "", dtype_bytes: int = 2,
                  explain: bool = True, plan_rule: PlanRule | None = None, text_encoder: bool = True,
                  encoder_on_gpu: int | None = None) -> RequestPlan:
    """The planner's plan of one request of `pipeline_cls`, or PlanError (explain=False: without
    searching for the smallest change that would fit; plan_rule: a built model's, plan_request's;
    text_encoder=False: no Gemma to place, e.g. the benchmarks' random context; encoder_on_gpu: the
    bytes of an encoder already built on the GPU, a fixed weight of every phase)."""
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

    place = text_encoder and encoder_on_gpu is None  # the planner puts the model's encoder on the GPU or host
    return plan_request(cfg, width=width, height=height, num_frames=num_frames, fps=fps, max_gpu_memory_bytes=cap,
                        two_stage=issubclass(pipeline_cls, LTX2TwoStagePipeline), guided=pipeline_cls.guided,
                        num_gpus=num_gpus, layout=layout, storage=storage or "bf16", resident_blocks=resident_blocks,
                        text_encoder_bytes=text_encoder_bytes(model) if place else 0,
                        companion_bytes=(0 if model == "tiny" else COMPANION_BYTES) + (encoder_on_gpu or 0),
                        pipeline=pipeline_cls.name, model=model, dtype_bytes=dtype_bytes, explain=explain,
                        plan_rule=plan_rule)


def process_cap(comps) -> int:
    """The cap this process runs the components under: --max-gpu-memory's (apply_plan records it on
    the components), else what the device lets it use (device_bytes)."""
    return comps.max_gpu_memory if comps.max_gpu_memory is not None else device_bytes(comps.device)


@dataclass
class CapCheck:
    """The planner's inputs fixed before any request: the model, pipeline, cap, layout, storage and
    resident blocks (a server's at start; `built`: the components' as they were built)."""

    cfg: object
    pipeline_cls: type
    cap: int
    layout: Layout
    storage: str | None
    resident_blocks: int
    model: str = ""
    dtype_bytes: int = 2
    plan_rule: PlanRule | None = None  # the built model's (its activation plans); None: the planner's choice
    # a built text encoder's bytes on the GPU (it stays for the whole request); None: not built yet,
    # the planner places the model's encoder (text_encoder_bytes) itself
    encoder_on_gpu: int | None = None

    @classmethod
    def built(cls, comps, pipeline_cls, cap: int | None = None) -> "CapCheck":
        """The components as built: this rank's layout (the transformer's ParallelContext), its
        blocks' storage (bf16 or the fp8 format), its resident blocks (all without block swap), the
        model dtype and PlanRule (its activation plans: the pipeline's chunk budget, or apply_plan's),
        under `cap`, else the process's cap (process_cap). Static sizes only: the same on every rank."""
        from ltx2_tp.memory.swap import resident_blocks
        from ltx2_tp.models.ltx2.quantization import storage

        model, ctx = comps.transformer, comps.ctx
        cap = process_cap(comps) if cap is None else cap
        encoder = getattr(comps.text_encoder, "parameters", None)
        on_gpu = sum(t.numel() * t.element_size() for t in (encoder() if encoder else [])
                     if t.device.type == "cuda")
        return cls(model.cfg, pipeline_cls, cap, Layout(ctx.tp_size, ctx.ulysses_size, ctx.ring_size),
                   storage(model), resident_blocks(model), comps.name, comps.dtype.itemsize, model.plan_rule, on_gpu)

    def plan(self, width: int, height: int, num_frames: int, fps: float, explain: bool = True) -> RequestPlan:
        return plan_pipeline(self.cfg, self.pipeline_cls, width=width, height=height, num_frames=num_frames, fps=fps,
                             cap=self.cap, layout=self.layout, storage=self.storage,
                             resident_blocks=self.resident_blocks, model=self.model, dtype_bytes=self.dtype_bytes,
                             explain=explain, plan_rule=self.plan_rule, encoder_on_gpu=self.encoder_on_gpu)


@dataclass(frozen=True)
class HeldRequest:
    """A request as it runs under a cap: the frames it holds at once (the whole video, or one tile
    when it is tiled: its first, no later tile is longer) and their plan."""

    plan: RequestPlan
    frames: int


class OverCap(RequestError):
    """A request over the cap: RequestError(field, message) as the server and sglang answer it, with
    the planner's refusal (`error`: the smallest change) and the frames planned (`frames`)."""

    def __init__(self, field: str, message: str, error: PlanError, frames: int):
        super().__init__(field, message)
        self.error, self.frames = error, frames


def request_plan(check: CapCheck, req, field: str = "num_frames") -> HeldRequest:
    """The plan of `req` as `check.pipeline_cls` will run it under `check` (generate, serve and
    sglang call this): a tiling pipeline's choice (`decide`: auto tiles what does not fit in one
    piece, under this same check) and, when it tiles, its first tile. A request that does not fit is
    OverCap naming `field` (the one the request gave its length in: num_frames or seconds; a tile's
    length: tile_frames) with the largest value that fits at its size. A tiled request's own errors
    (images past the first tile, a format other than mp4) are RequestErrors naming their field."""
    frames, tiled = req.num_frames, False
    if getattr(check.pipeline_cls, "tiles", False):
        choice = check.pipeline_cls.decide(req, check)
        if choice.mode == "tiled" and choice.tiles[0].frames != req.num_frames:
            frames, tiled = choice.tiles[0].frames, True
    try:
        return HeldRequest(check.plan(req.width, req.height, frames, req.fps), frames)
    except PlanError as e:
        if tiled:
            raise OverCap("tile_frames", _tile_refusal(req, frames, e.largest_frames), e, frames) from None
        raise OverCap(field, _refusal(req, frames, e.largest_frames, field), e, frames) from None


def _refusal(req, frames: int, largest: int | None, field: str) -> str:
    """The largest value of `field` that fits: frames (8k + 1), or whole seconds at the request's fps."""
    size = f"{req.width}x{req.height}"
    if largest is None or (field == "seconds" and largest == 1):
        return f"{size} does not fit this server's GPU memory cap at any length; use a smaller size"
    head = f"{frames} frames at {size} do not fit this server's GPU memory cap; the most that fits at this size: "
    if field == "seconds":
        return head + f"{(largest - 1) / req.fps:g} seconds ({largest} frames at {req.fps:g} fps)"
    return head + str(largest)


def _tile_refusal(req, frames: int, largest: int | None) -> str:
    """The largest tile_frames whose tile fits: a tile of tile_frames / 8 latent frames decodes to
    tile_frames - 7 frames (80 -> 73), so a tile of `largest` frames is tile_frames largest + 7."""
    head = (f"one tile ({frames} frames: tile_frames {req.tile_frames}) of the tiled video at {req.width}x{req.height} "
            "does not fit this server's GPU memory cap")
    best = None if largest is None else largest + TEMPORAL_SCALE - 1
    if best is None or best < TILE_FRAMES_RANGE[0]:
        return f"{head} at any tile length (tile_frames >= {TILE_FRAMES_RANGE[0]}); use a smaller size"
    # each tile must add 8 new frames: the overlap stays below the tile
    overlap = "" if req.tile_overlap_frames <= best - TEMPORAL_SCALE else \
        f" (with tile_overlap_frames at most {best - TEMPORAL_SCALE})"
    return f"{head}; the most that fits at this size: tile_frames {best}{overlap}"


def apply_plan(plan: RequestPlan | None, comps) -> None:
    """The plan's cap recorded on the components, its activation budget as the model's PlanRule
    (after the pipeline set its own), and on CUDA the cap as a hard limit
    (set_per_process_memory_fraction: an allocation past it raises OutOfMemoryError). The resident
    blocks were chosen when the transformer was built."""
    if plan is None:
        return
    comps.max_gpu_memory = plan.cap  # what LTX2LongVideo's auto mode plans one piece under
    comps.transformer.plan_rule = plan.plan_rule()
    if comps.device.type == "cuda":
        hard_cap(plan.cap, comps.device)
        torch.cuda.reset_peak_memory_stats(comps.device)


def hard_cap(cap_bytes: float, device) -> int:
    """Limit this process's allocations on `device` to `cap_bytes` (an allocation past it raises
    OutOfMemoryError); returns the device's total memory."""
    return cap_fraction(None, device, cap_bytes)


def cap_fraction(fraction: float | None, device, cap_bytes: float | None = None) -> int:
    """torch.cuda.set_per_process_memory_fraction for `device` (torch 2.11 wants an index, not
    'cuda'), given as a fraction or as bytes; returns the device's total memory."""
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total if fraction is None else fraction), index)
    return total
