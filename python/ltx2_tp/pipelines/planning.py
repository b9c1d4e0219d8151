"""A pipeline's request under a GPU memory cap: the one helper generate, serve, sglang and
LTX2LongVideo's `auto` mode call.

`plan_pipeline` maps a pipeline class to the planner's stages (two-stage classes: stage 1 at half
size, guided unless the class is not; stage 2 at full size) and plans the request
(memory/planner.py). `CapCheck` holds the planner's inputs that are fixed once the components are
built (`CapCheck.built` reads them off the components, under the process's cap: `process_cap`);
its `check` refuses a request over the cap as a RequestError naming the field the request used
(`num_frames` or `seconds`) and the largest value that fits at its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.memory.device import device_bytes
from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.memory.planner import COMPANION_BYTES, GEMMA3_12B_BYTES, Layout, PlanError, RequestPlan, plan_request
from ltx2_tp.pipelines.request import RequestError


def text_encoder_bytes(model: str) -> int:
    """Device bytes of the text encoder the model's pipeline builds (the tiny one: negligible)."""
    return 0 if model == "tiny" else GEMMA3_12B_BYTES


def plan_pipeline(cfg, pipeline_cls, *, width: int, height: int, num_frames: int, fps: float, cap: int,
                  num_gpus: int = 1, layout: Layout | None = None, storage: str | None = None,
                  resident_blocks: int | None = None, model: str = "", dtype_bytes: int = 2,
                  explain: bool = True, plan_rule: PlanRule | None = None) -> RequestPlan:
    """The planner's plan of one request of `pipeline_cls`, or PlanError (explain=False: without
    searching for the smallest change that would fit; plan_rule: a built model's, plan_request's)."""
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

    return plan_request(cfg, width=width, height=height, num_frames=num_frames, fps=fps, max_gpu_memory_bytes=cap,
                        two_stage=issubclass(pipeline_cls, LTX2TwoStagePipeline), guided=pipeline_cls.guided,
                        num_gpus=num_gpus, layout=layout, storage=storage or "bf16", resident_blocks=resident_blocks,
                        text_encoder_bytes=text_encoder_bytes(model),
                        companion_bytes=0 if model == "tiny" else COMPANION_BYTES, pipeline=pipeline_cls.name, model=model,
                        dtype_bytes=dtype_bytes, explain=explain, plan_rule=plan_rule)


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

    @classmethod
    def built(cls, comps, pipeline_cls) -> "CapCheck":
        """The components as built: this rank's layout (the transformer's ParallelContext), its
        blocks' storage (bf16 or the fp8 format), its resident blocks (all without block swap), the
        model dtype and PlanRule (its activation plans: the pipeline's chunk budget, or apply_plan's),
        under the process's cap (process_cap). Static sizes only: the same on every rank."""
        from ltx2_tp.memory.swap import resident_blocks
        from ltx2_tp.models.ltx2.quantization import storage

        model, ctx = comps.transformer, comps.ctx
        return cls(model.cfg, pipeline_cls, process_cap(comps), Layout(ctx.tp_size, ctx.ulysses_size, ctx.ring_size),
                   storage(model), resident_blocks(model), comps.name, comps.dtype.itemsize, model.plan_rule)

    def plan(self, width: int, height: int, num_frames: int, fps: float, explain: bool = True) -> RequestPlan:
        return plan_pipeline(self.cfg, self.pipeline_cls, width=width, height=height, num_frames=num_frames, fps=fps,
                             cap=self.cap, layout=self.layout, storage=self.storage,
                             resident_blocks=self.resident_blocks, model=self.model, dtype_bytes=self.dtype_bytes,
                             explain=explain, plan_rule=self.plan_rule)

    def check(self, width: int, height: int, num_frames: int, fps: float, field: str = "num_frames") -> None:
        """RequestError(field) when the request does not fit, with the largest value that does:
        frames (8k + 1) for num_frames, whole seconds (at `fps`) for seconds."""
        try:
            self.plan(width, height, num_frames, fps)
        except PlanError as e:
            frames = e.largest_frames
            if field == "seconds":
                if frames is None or frames == 1:
                    raise RequestError(field, f"{width}x{height} does not fit this server's GPU memory cap at any "
                                              "length; use a smaller size") from None
                raise RequestError(field, f"{num_frames} frames at {width}x{height} do not fit this server's GPU "
                                          f"memory cap; the most that fits at this size: {(frames - 1) / fps:g} "
                                          f"seconds ({frames} frames at {fps:g} fps)") from None
            if frames is None:
                raise RequestError(field, f"{width}x{height} does not fit this server's GPU memory cap at any "
                                          "length; use a smaller size") from None
            raise RequestError(field, f"{num_frames} frames at {width}x{height} do not fit this server's GPU memory "
                                      f"cap; the most that fits at this size: {frames}") from None


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
