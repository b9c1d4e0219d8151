"""Pipeline registry: name -> class.

The built-in pipelines are listed here (imported on first use: they pull in ltx-core); the
pipeline modules do not import the registry. `register_pipeline` adds a class from elsewhere.
"""

from __future__ import annotations

_REGISTERED: dict[str, type] = {}

# A second name for each built-in pipeline: ltx-pipelines' module (its entry point, `python -m
# ltx_pipelines.distilled`), which is what its users call the pipeline. A client may pass either.
ALIASES = {"ti2vid_two_stages": "LTX2TwoStagePipeline", "ti2vid_two_stages_hq": "LTX2TwoStageHQPipeline",
           "ti2vid_one_stage": "LTX2Pipeline", "distilled": "LTX2DistilledPipeline",
           "keyframe_interpolation": "LTX2KeyframeInterpolationPipeline", "retake": "LTX2RetakePipeline",
           "ic_lora": "LTX2ICLoraPipeline", "a2vid_two_stage": "LTX2A2VidPipeline", "long_video": "LTX2LongVideo"}


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


def resolve_pipeline_name(name: str) -> str | None:
    """The registered class name for a class name or its alias; None if it is neither."""
    name = ALIASES.get(name, name)
    return name if name in _pipelines() else None


def pipeline_aliases(name: str) -> list[str]:
    return [a for a, n in ALIASES.items() if n == name]


def get_pipeline_class(name: str) -> type:
    pipelines = _pipelines()
    if name not in pipelines:
        raise ValueError(f"unknown pipeline {name!r}; registered: {sorted(pipelines)}")
    return pipelines[name]
