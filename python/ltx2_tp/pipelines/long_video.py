"""LTX2LongVideo: the two-stage flow laid out for long videos.

Before each request it chooses chunk sizes for the tokens this rank holds (memory/plan.py's rule;
the planner proper comes later) and decodes the VAE in temporal tiles when the whole video's
activations would not fit in free memory (pipelines/decode.py's plan_temporal_tile). TP/SP come
from the components' parallel context (torchrun / sglang).
"""

from __future__ import annotations

from ltx2_tp.memory.plan import plan_for
from ltx2_tp.pipelines.decode import AUTO
from ltx2_tp.pipelines.registry import register_pipeline
from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


@register_pipeline
class LTX2LongVideo(LTX2TwoStagePipeline):
    name = "LTX2LongVideo"

    def __init__(self, components, memory_budget_gib: float = 2.0):
        super().__init__(components)
        self.memory_budget_gib = memory_budget_gib

    def prepare(self, req: GenerationRequest) -> None:
        t = self.c.transformer
        local = -(-req.video_tokens // t.ctx.sp_size)
        t.plan = plan_for(local, t.cfg.inner_dim, t.ctx.tp_size, budget_bytes=self.memory_budget_gib * 2**30,
                          ulysses_size=t.ctx.ulysses_size)

    def temporal_tile_frames(self, req: GenerationRequest) -> int | str | None:
        return AUTO
