"""LTX2LongVideo: the two-stage flow laid out for long videos.

Its DiT chunks by a memory budget: the pipeline gives the transformer a `PlanRule` once, and each
forward (stage 1 at half size, stage 2 at full size) then chooses chunk sizes for the tokens this
rank holds (memory/plan.py; the planner proper comes later). Its VAE decode is streamed like every
pipeline's (pieces sized by free memory); with --decode-mode exact it uses ltx-core's temporal tiles
when the whole video's activations would not fit in free memory (pipelines/decode.py's
plan_temporal_tile). TP/SP come from the components' parallel
context (torchrun / sglang).
"""

from __future__ import annotations

from ltx2_tp.memory.plan import PlanRule
from ltx2_tp.pipelines.decode import AUTO
from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2LongVideo(LTX2TwoStagePipeline):
    name = "LTX2LongVideo"

    def __init__(self, components, memory_budget_gib: float = 2.0):
        super().__init__(components)
        components.transformer.plan_rule = PlanRule(budget_bytes=memory_budget_gib * 2**30)

    def temporal_tile_frames(self, req: GenerationRequest) -> int | str | None:
        return AUTO
