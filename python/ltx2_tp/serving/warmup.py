"""`serve --warmup WxHxF[,WxHxF...]`: shapes the server compiles before it takes requests.

Each shape is one dummy request with the API's defaults (serving/params.py: the same fps, guidance
and so the same batch of guidance passes as a request of that size) and WARMUP_STEPS stage-1 steps:
compiled block graphs depend on the token counts and the pass batch, not on the step count, so two
steps compile everything a full request at that shape runs. The job worker runs them before its
first job (serving/jobs.py) and discards the video; until they are done /health answers 503
{"status": "warming_up"} and POST /v1/videos 503 with Retry-After. With the compile cache
(compile.py: --compile-cache-dir, by default under --output-dir) a restarted server's warm-up loads
the compiled graphs from disk instead of compiling them again.
"""

from __future__ import annotations

import re

from ltx2_tp.pipelines.request import GenerationRequest
from ltx2_tp.serving.errors import ApiError
from ltx2_tp.serving.params import Limits, video_request

WARMUP_STEPS = 2
SHAPE_RE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def warmup_requests(text: str, limits: Limits, pipelines=None, spatial_multiple: int = 64) -> list[GenerationRequest]:
    """'768x512x121,1280x704x121' -> one request per shape, checked as the API checks a request
    (`pipelines`: serving/pipelines.py's ServedPipelines; None: the generic checks only, the server's
    default pipeline). Raises ValueError naming the bad shape."""
    from ltx2_tp.serving.pipelines import SinglePipeline

    pipelines = pipelines if pipelines is not None else SinglePipeline(limits.model_name, WARMUP_STEPS,
                                                                       spatial_multiple)
    out = []
    for item in (s.strip() for s in text.split(",")):
        m = SHAPE_RE.match(item)
        if not m:
            raise ValueError(f"{item!r} is not WIDTHxHEIGHTxFRAMES (e.g. 768x512x121)")
        w, h, f = (int(x) for x in m.groups())
        fields = {"prompt": "warm-up", "width": w, "height": h, "num_frames": f, "num_inference_steps": WARMUP_STEPS}
        try:
            req, _, _ = video_request(fields, limits, pipelines)
        except ApiError as e:
            raise ValueError(f"{item}: {e.message}") from None
        out.append(req)
    return out


def shape_of(req: GenerationRequest) -> str:
    return f"{req.width}x{req.height}x{req.num_frames}"
