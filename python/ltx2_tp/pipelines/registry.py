"""Pipeline registry: name -> class. `get_pipeline_class` imports the built-in pipelines on first use."""

from __future__ import annotations

_PIPELINES: dict[str, type] = {}


def register_pipeline(cls: type) -> type:
    _PIPELINES[cls.name] = cls
    return cls


def _load_builtin() -> None:
    from ltx2_tp.pipelines import (a2vid, distilled, ic_lora, keyframes, long_video, one_stage,  # noqa: F401
                                   retake, two_stage, two_stage_hq)  # (they register themselves)


def pipeline_names() -> list[str]:
    _load_builtin()
    return sorted(_PIPELINES)


def get_pipeline_class(name: str) -> type:
    _load_builtin()
    if name not in _PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; registered: {sorted(_PIPELINES)}")
    return _PIPELINES[name]
