"""Pipeline registry: name -> class.

The built-in pipelines are listed here (imported on first use: they pull in ltx-core); the
pipeline modules do not import the registry. `register_pipeline` adds a class from elsewhere.
"""

from __future__ import annotations

_REGISTERED: dict[str, type] = {}


def register_pipeline(cls: type) -> type:
    _REGISTERED[cls.name] = cls
    return cls


def _pipelines() -> dict[str, type]:
    from ltx2_tp.pipelines.a2vid import LTX2A2VidPipeline
    from ltx2_tp.pipelines.distilled import LTX2DistilledPipeline
    from ltx2_tp.pipelines.ic_lora import LTX2ICLoraPipeline
    from ltx2_tp.pipelines.keyframes import LTX2KeyframeInterpolationPipeline
    from ltx2_tp.pipelines.long_video import LTX2LongVideo
    from ltx2_tp.pipelines.one_stage import LTX2Pipeline
    from ltx2_tp.pipelines.retake import LTX2RetakePipeline
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline
    from ltx2_tp.pipelines.two_stage_hq import LTX2TwoStageHQPipeline

    builtin = (LTX2TwoStagePipeline, LTX2TwoStageHQPipeline, LTX2Pipeline, LTX2DistilledPipeline,
               LTX2KeyframeInterpolationPipeline, LTX2RetakePipeline, LTX2ICLoraPipeline, LTX2A2VidPipeline,
               LTX2LongVideo)
    return {**{cls.name: cls for cls in builtin}, **_REGISTERED}


def pipeline_names() -> list[str]:
    return sorted(_pipelines())


def get_pipeline_class(name: str) -> type:
    pipelines = _pipelines()
    if name not in pipelines:
        raise ValueError(f"unknown pipeline {name!r}; registered: {sorted(pipelines)}")
    return pipelines[name]
