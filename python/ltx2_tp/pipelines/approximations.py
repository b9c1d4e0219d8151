"""A request's opt-in APPROXIMATIONS (off unless its fields ask; README "Approximations"):

- `attention_window_frames` K: temporal-window video self-attention (layers/windowed_attention.py),
  set on the DiT's plan rule for the run (any pipeline; not with ring attention or a
  self-attention mask);
- `keyframe_stride` S: stage 1 denoises every S-th latent frame (pipelines/keyframe_stride.py; the
  two-stage pipelines whose stage 2 refines every frame);
- `step_cache_threshold` T: the denoising loops reuse a step's output while the DiT input barely
  moved (pipelines/step_cache.py; the Euler loops, not res_2s).

`check` refuses what a pipeline cannot do (naming the field) before anything runs; `applied` sets
them for one run and collects what they did (skipped steps and DiT passes, frames denoised) into
the run's report, which the result carries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from ltx2_tp.pipelines import step_cache
from ltx2_tp.pipelines.request import GenerationRequest, RequestError


def check(pipeline_cls, req: GenerationRequest) -> None:
    name = pipeline_cls.name
    if req.keyframe_stride > 1 and not pipeline_cls.supports_keyframe_stride:
        raise RequestError("keyframe_stride", f"{name} does not support it (it needs a stage 2 that refines every "
                           "frame after the interpolation: the two-stage pipelines); use 1")
    if req.step_cache_threshold > 0 and not pipeline_cls.supports_step_cache:
        raise RequestError("step_cache_threshold", f"{name} does not support it (its res_2s sampler evaluates the "
                           "DiT twice per step); use 0")
    if req.attention_window_frames is not None and req.video_conditioning and req.conditioning_attention_strength < 1:
        raise RequestError("attention_window_frames", "not supported with conditioning_attention_strength < 1 "
                           "(a self-attention mask); leave it unset")


def check_layout(req: GenerationRequest, ring_size: int) -> None:
    if req.attention_window_frames is not None and ring_size > 1:
        raise RequestError("attention_window_frames", f"not supported with ring attention (ring size "
                           f"{ring_size}); use Ulysses sequence parallelism or leave it unset")


@contextmanager
def applied(c, req: GenerationRequest, report: dict) -> Iterator[dict]:
    """While inside, the DiT and the denoising loops run the request's approximations."""
    model = c.transformer
    rule = model.plan_rule
    if req.attention_window_frames is not None:
        model.plan_rule = replace(rule, attention_window_frames=req.attention_window_frames)
        report["attention_window_frames"] = req.attention_window_frames
    try:
        with step_cache.enabled(req.step_cache_threshold, report.setdefault("step_cache", {})):
            yield report
    finally:
        model.plan_rule = rule
        if not report["step_cache"]:
            del report["step_cache"]


def describe(report: dict) -> list[str]:
    """One line per approximation that ran (the CLI prints them under the stage table)."""
    lines = []
    if "attention_window_frames" in report:
        lines.append(f"approximation: temporal-window attention, {report['attention_window_frames']} latent frames "
                     "each way")
    for stage, r in report.get("keyframe_stride", {}).items():
        lines.append(f"approximation: keyframe stride, {stage} denoised {r['denoised_frames']} of {r['frames']} "
                     "latent frames (the rest interpolated)")
    for stage, r in report.get("step_cache", {}).items():
        lines.append(f"approximation: step cache, {stage} skipped {r['skipped_steps']} of {r['steps']} steps "
                     f"({r['skipped_dit_passes']} of {r['dit_passes'] + r['skipped_dit_passes']} DiT passes)")
    return lines
