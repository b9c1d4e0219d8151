"""LTX2KeyframeInterpolationPipeline: ltx-pipelines' keyframe_interpolation with our DiT.

The two-stage flow with every image (`--image PATH FRAME_IDX STRENGTH`) appended as keyframe
tokens at its frame (ltx-core's VideoConditionByKeyframeIndex, also frame 0), at both stages; the
video between them is generated.
"""

from __future__ import annotations

from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2KeyframeInterpolationPipeline(LTX2TwoStagePipeline):
    name = "LTX2KeyframeInterpolationPipeline"
    keyframes = True
