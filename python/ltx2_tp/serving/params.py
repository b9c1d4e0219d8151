"""The fields of POST /v1/videos -> a GenerationRequest; every bad value is a 400 naming its field.

OpenAI's fields: prompt, model, seconds, size (input_reference: serving/uploads.py). Through the
client's `extra_body`: num_frames, fps, seed, num_inference_steps (or steps), guidance_scale (or
guidance), negative_prompt, width, height, and the opt-in approximations attention_window_frames,
keyframe_stride, step_cache_threshold. `size` "WxH" is rounded to multiples of 64 (the
two-stage pipeline's grid: 1280x720 -> 1280x704; 13x70 -> 64x64); width / height override it; the
job reports as `size` what is generated. `seconds` becomes the nearest 8k+1 frame count.
Numbers arrive as form strings or JSON numbers: booleans, non-finite values (inf, nan, 1e400) and
non-integers where an integer is needed are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ltx2_tp.pipelines.planning import CapCheck
from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.serving.errors import ApiError

SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


@dataclass
class Limits:
    model_name: str = "ltx-2-tiny"
    default_fps: float = 24.0
    default_steps: int = 8
    max_frames: int = 2001
    max_video_tokens: int = 400_000
    # the text encoder reads at most 1024 tokens (ltx-core's Gemma tokenizer), ~4 characters each
    max_prompt_chars: int = 10_000
    cap: "CapCheck | None" = None  # --max-gpu-memory: requests over the plan get 400 (pipelines/planning.py)


def _round64(v: int) -> int:
    return max(64, int(round(v / 64)) * 64)


def number(fields: dict, name: str, default=None, integer: bool = False):
    v = fields.get(name)
    if v is None or v == "":
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ApiError(400, f"{name} must be {kind}, got {v!r}", name)
    x = v
    if isinstance(v, str):
        try:
            x = int(v.strip())
        except ValueError:
            try:
                x = float(v.strip())
            except ValueError:
                raise ApiError(400, f"{name} must be {kind}, got {v!r}", name) from None
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ApiError(400, f"{name} must be a finite number, got {v!r}", name)
        if integer:
            if x != int(x):
                raise ApiError(400, f"{name} must be an integer, got {v!r}", name)
            x = int(x)
    return x


def text(fields: dict, name: str, limit: int, default: str = "") -> str:
    v = fields.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ApiError(400, f"{name} must be a string, got {type(v).__name__}", name)
    if len(v) > limit:
        raise ApiError(400, f"{name} is {len(v)} characters; at most {limit}", name, "string_above_max_length")
    return v


def video_request(fields: dict, limits: Limits) -> tuple[GenerationRequest, str, str]:
    """(request, seconds as given, size as generated)."""
    model = text(fields, "model", 200) or limits.model_name
    if model != limits.model_name:
        raise ApiError(400, f"unknown model {model!r}; this server serves {limits.model_name!r}", "model",
                       "model_not_found")
    prompt = text(fields, "prompt", limits.max_prompt_chars)
    if not prompt.strip():
        raise ApiError(400, "prompt is required", "prompt")
    negative = text(fields, "negative_prompt", limits.max_prompt_chars)
    fps = number(fields, "fps", limits.default_fps)
    if not 1 <= fps <= 120:
        raise ApiError(400, f"fps must be between 1 and 120, got {fps}", "fps")
    size = text(fields, "size", 32) or "768x512"
    m = SIZE_RE.match(size)
    if not m:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '1280x720'), got {size!r}", "size")
    width = number(fields, "width", _round64(int(m.group(1))), integer=True)
    height = number(fields, "height", _round64(int(m.group(2))), integer=True)
    seconds = fields.get("seconds")
    seconds = "4" if seconds is None or seconds == "" else seconds
    secs = number({"seconds": seconds}, "seconds")
    if not 0 < secs <= limits.max_frames / fps:
        raise ApiError(400, f"seconds must be above 0 and at most {limits.max_frames / fps:g} at {fps:g} fps "
                            f"({limits.max_frames} frames), got {seconds!r}", "seconds")
    frames = number(fields, "num_frames", int(round(secs * fps / 8)) * 8 + 1, integer=True)
    steps = number(fields, "num_inference_steps", number(fields, "steps", limits.default_steps, integer=True),
                   integer=True)
    guidance = number(fields, "guidance_scale", number(fields, "guidance", 3.0))
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, width=width, height=height, num_frames=frames,
                            fps=fps, seed=number(fields, "seed", 0, integer=True), num_inference_steps=steps,
                            guidance_scale=guidance,
                            # opt-in approximations (README "Approximations"), off unless given
                            attention_window_frames=number(fields, "attention_window_frames", None, integer=True),
                            keyframe_stride=number(fields, "keyframe_stride", 1, integer=True),
                            step_cache_threshold=number(fields, "step_cache_threshold", 0.0))
    try:
        req.validate(max_frames=limits.max_frames)
    except RequestError as e:
        raise ApiError(400, str(e), e.field) from None
    if req.video_tokens > limits.max_video_tokens:
        raise ApiError(400, f"num_frames x size needs {req.video_tokens} video tokens; this server's memory plan "
                            f"allows at most {limits.max_video_tokens} (lower num_frames, seconds or size)", "num_frames")
    if limits.cap is not None:
        field = "num_frames" if fields.get("num_frames") not in (None, "") else "seconds"
        try:
            limits.cap.check(req.width, req.height, req.num_frames, req.fps, field)
        except RequestError as e:
            raise ApiError(400, str(e), e.field) from None
    return req, str(seconds), f"{req.width}x{req.height}"
