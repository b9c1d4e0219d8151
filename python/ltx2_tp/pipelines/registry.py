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
    from ltx2_tp.pipelines.long_video import LTX2LongVideo
    from ltx2_tp.pipelines.two_stage import LTX2TwoStagePipeline

    builtin = (LTX2TwoStagePipeline, LTX2LongVideo)
    return {**{cls.name: cls for cls in builtin}, **_REGISTERED}


def pipeline_names() -> list[str]:
    return sorted(_pipelines())


def get_pipeline_class(name: str) -> type:
    pipelines = _pipelines()
    if name not in pipelines:
        raise ValueError(f"unknown pipeline {name!r}; registered: {sorted(pipelines)}")
    return pipelines[name]
