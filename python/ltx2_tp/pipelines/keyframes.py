"""LTX2KeyframeInterpolationPipeline: ltx-pipelines' keyframe_interpolation with our DiT.

The two-stage flow with every image (`--image PATH FRAME_IDX STRENGTH`) appended as keyframe
tokens at its frame (ltx-core's VideoConditionByKeyframeIndex, also frame 0), at both stages; the
video between them is generated.
"""

from __future__ import annotations

from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline


class LTX2KeyframeInterpolationPipeline(LTX2TwoStagePipeline):
    name = "LTX2KeyframeInterpolationPipeline"
    keyframes = True
    inputs = ("images",)  # or image_path (the server's input_reference): a keyframe at frame 0

    @classmethod
    def check_request(cls, req: GenerationRequest, num_layers: int) -> None:
        super().check_request(req, num_layers)
        if not req.images and not req.image_path:
            raise RequestError("images", "the keyframe pipeline needs at least one image (PATH FRAME_IDX STRENGTH)")
