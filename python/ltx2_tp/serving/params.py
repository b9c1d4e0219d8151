"""The fields of POST /v1/videos -> a GenerationRequest; every bad value is a 400 naming its field.

OpenAI's fields: prompt, model, seconds, size (input_reference and the other uploads:
serving/uploads.py; their companion fields: `pipeline_inputs` below). Through the
client's `extra_body`: num_frames, fps, seed, num_inference_steps (or steps), guidance_scale (or
guidance), negative_prompt, width, height, pipeline, the guidance fields under the CLI's names
(request.GUIDANCE_FIELDS), the opt-in approximations attention_window_frames, keyframe_stride,
step_cache_threshold, and LTX2LongVideo's long_video_mode (auto | dense | tiled), tile_frames,
tile_overlap_frames, tile_cond_strength, adain_factor, prompts (one per tile: a list, or its JSON
text in a form) and prompt_schedule ("0:a fox|12.5:a wolf"). `model` or `pipeline` picks the
pipeline (serving/pipelines.py); its own checks apply (size multiple, needed inputs, the
upsampler's smallest input), and its default steps (distilled: its fixed 8; other steps for it are
a 400, as are guidance fields: it has none). `size` "WxH" is rounded to multiples of 64 (the
two-stage pipeline's grid: 1280x720 -> 1280x704; 13x70 -> 64x64); width / height override it; the
job reports as `size` what is generated. `seconds` becomes the nearest 8k+1 frame count. Under
serve --max-gpu-memory a request is planned as generate plans it (planning.request_plan): an
LTX2LongVideo request in long_video_mode auto whose whole video does not fit is tiled, and then its
first tile is what must fit; a request over the plan is a 400 naming num_frames (or seconds) and
the largest count that fits, or, for a tile, tile_frames and the largest tile that fits.
Numbers arrive as form strings or JSON numbers: booleans, non-finite values (inf, nan, 1e400) and
non-integers where an integer is needed are refused.
"""

from __future__ import annotations

import dataclasses

import json
import math
import re
from dataclasses import dataclass

from ltx2_tp.latent_grid import LatentGrid
from ltx2_tp.pipelines.planning import CapCheck, request_plan
from ltx2_tp.pipelines.request import FPS_RANGE, GUIDANCE_FIELDS, GenerationRequest, RequestError
from ltx2_tp.pipelines.tiling import memory_frames
from ltx2_tp.serving.errors import ApiError
from ltx2_tp.serving.ic_loras import STRENGTH_RANGE, takes_lora
from ltx2_tp.serving.uploads import BY_TARGET, UPLOADS

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


def _items(fields: dict, name: str):
    """A field's list items: a JSON list as given, a form string "28", "28,29" or "[28, 29]" split;
    None when absent; anything else as is (the caller decides)."""
    v = fields.get(name)
    if v is None or v == "":
        return None
    return v.strip().strip("[]").replace(",", " ").split() if isinstance(v, str) else v


def int_list(fields: dict, name: str):
    """A list of integers: a JSON list, or a form string "28", "28,29" or "[28, 29]"."""
    v = _items(fields, name)
    if v is None:
        return None
    if not isinstance(v, list):
        raise ApiError(400, f"{name} must be a list of block indices, got {v!r}", name)
    return [number({name: x}, name, integer=True) for x in v]


def guidance_fields(fields: dict) -> dict:
    """The stage-1 guidance fields given (ltx-pipelines' names, the CLI's flags); ranges: req.validate."""
    out = {}
    for name in GUIDANCE_FIELDS:
        if name.endswith("_blocks"):
            v = int_list(fields, name)
        else:
            v = number(fields, name, integer=name.endswith("_skip_step"))
        if v is not None:
            out[name] = v
    return out


def number_list(fields: dict, name: str):
    """A list of numbers: a JSON list, a JSON number, or a form string "0.5", "1,0.5" or "[1, 0.5]"."""
    v = _items(fields, name)
    if v is None:
        return None
    return [number({name: x}, name) for x in (v if isinstance(v, list) else [v])]


def video_request(fields: dict, limits: Limits, pipelines=None, inputs: dict | None = None
                  ) -> tuple[GenerationRequest, str, str]:
    """(request, seconds as given, size as generated). `pipelines`: serving/pipelines.py's
    ServedPipelines (which pipeline, its default steps, its checks); None: one pipeline under
    limits.model_name with the generic checks (SinglePipeline). `inputs`: the uploads, saved
    (serving/uploads.py save_uploads: field -> [Saved]); the pipeline's checks read them."""
    if pipelines is None:
        from ltx2_tp.serving.pipelines import SinglePipeline

        pipelines = SinglePipeline(limits.model_name, limits.default_steps)
    name = pipelines.resolve(text(fields, "model", 200), text(fields, "pipeline", 200))
    cls = pipelines.pipeline_class(name)
    prompt = text(fields, "prompt", limits.max_prompt_chars)
    if not prompt.strip():
        raise ApiError(400, "prompt is required", "prompt")
    negative = text(fields, "negative_prompt", limits.max_prompt_chars)
    fps = number(fields, "fps", limits.default_fps)
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ApiError(400, f"fps must be between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}, got {fps}", "fps")
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
    steps_field = "num_inference_steps" if fields.get("num_inference_steps") not in (None, "") else "steps"
    steps = number(fields, steps_field, None, integer=True)
    if steps is not None and cls.fixed_steps is not None and steps != cls.fixed_steps:
        raise ApiError(400, f"{name} runs its fixed {cls.fixed_steps} distilled sigmas; {steps_field} must be "
                            f"{cls.fixed_steps} or left out, got {steps}", steps_field)
    guidance = number(fields, "guidance_scale", number(fields, "guidance", 3.0))
    extra = guidance_fields(fields)
    given = [f for f in ("guidance_scale", "guidance", *extra) if fields.get(f) not in (None, "")]
    if given and not cls.guided:
        raise ApiError(400, f"{name} runs without guidance; leave out {', '.join(given)}", given[0])
    media, lora = pipeline_inputs(fields, inputs or {}, cls, name, pipelines)
    req = GenerationRequest(prompt=prompt, negative_prompt=negative, width=width, height=height, num_frames=frames,
                            fps=fps, seed=number(fields, "seed", 0, integer=True), guidance_scale=guidance,
                            num_inference_steps=pipelines.default_steps(name) if steps is None else steps,
                            pipeline=name,
                            # opt-in approximations (README "Approximations"), off unless given
                            attention_window_frames=number(fields, "attention_window_frames", None, integer=True),
                            keyframe_stride=number(fields, "keyframe_stride", 1, integer=True),
                            step_cache_threshold=number(fields, "step_cache_threshold", 0.0), **extra,
                            **tiling(fields, limits), **media, extra=lora)
    try:
        req.validate(max_frames=limits.max_frames, spatial_multiple=cls.spatial_multiple)
        pipelines.check(req)
    except RequestError as e:
        raise ApiError(400, str(e), _param(e.field, fields)) from None
    source = BY_TARGET["video_path"].name if req.video_path else None  # a retake is its source's size
    frames = memory_frames(req)  # a tiled video holds one tile at a time
    if limits.cap is not None:  # planned as the request's pipeline runs it (stages, guidance passes, tiles)
        field = source or ("num_frames" if fields.get("num_frames") not in (None, "") else "seconds")
        cap = limits.cap if name is None else dataclasses.replace(limits.cap, pipeline_cls=cls)  # None: one pipeline
        try:
            frames = request_plan(cap, req, field).frames
        except RequestError as e:  # over the cap (OverCap), or a tiled request's own rule
            raise ApiError(400, str(e), _param(e.field, fields)) from None
    tokens = LatentGrid(frames, req.height, req.width).video_tokens
    what = "num_frames x size" if frames == req.num_frames else "a tile (tile_frames x size)"
    if tokens > limits.max_video_tokens:
        raise ApiError(400, f"{'the source video' if source else what} needs {tokens} video tokens; this server's "
                            f"memory plan allows at most {limits.max_video_tokens} (lower num_frames, seconds or size)",
                       source or "num_frames")
    return req, str(seconds), f"{req.width}x{req.height}"


def tiling(fields: dict, limits: Limits) -> dict:
    """LTX2LongVideo's fields, those given (the request's defaults otherwise; ranges: request.py)."""
    out = {}
    mode = text(fields, "long_video_mode", 16)
    if mode:
        out["long_video_mode"] = mode
    for name in ("tile_frames", "tile_overlap_frames"):
        v = number(fields, name, integer=True)
        if v is not None:
            out[name] = v
    for name in ("tile_cond_strength", "adain_factor"):
        v = number(fields, name)
        if v is not None:
            out[name] = v
    prompts = fields.get("prompts")
    if isinstance(prompts, str) and prompts.strip():  # a form field: its JSON text
        try:
            prompts = json.loads(prompts)
        except ValueError:
            raise ApiError(400, "prompts must be a list of strings (JSON in a form field)", "prompts") from None
    if prompts is not None and prompts != "":
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompts must be a list of strings", "prompts")
        if sum(len(p) for p in prompts) > limits.max_prompt_chars:
            raise ApiError(400, f"prompts have more than {limits.max_prompt_chars} characters", "prompts",
                           "string_above_max_length")
        out["prompts"] = prompts
    schedule = fields.get("prompt_schedule")
    if schedule is not None and schedule != "":
        if isinstance(schedule, str):
            schedule = text(fields, "prompt_schedule", limits.max_prompt_chars)
        out["prompt_schedule"] = schedule
    return out


# The request fields that hold paths: a client never gives them (the server reads no path a request
# names); the uploads fill them. Given, each is a 400 saying which upload to send instead.
PATH_FIELDS = ("image_path", "images", "video_path", "audio_path", "video_conditioning")
# What only a pipeline reading an upload takes, by the request field the upload fills.
COMPANIONS = {"video_path": ("start_time", "end_time"), "audio_path": ("audio_start_time", "audio_max_duration"),
              "video_conditioning": ("video_conditioning_strength", "conditioning_attention_strength", "ic_lora",
                                     "ic_lora_strength")}


def pipeline_inputs(fields: dict, inputs: dict, cls, name: str | None, pipelines) -> tuple[dict, dict]:
    """(the request fields the uploads fill, with their companions; GenerationRequest.extra: the
    IC-LoRA). Each upload must be one the pipeline reads, each input it needs must be there, and the
    companions are checked against what the upload holds (a retake's start/end within the source,
    A2Vid's audio_start_time within the audio)."""
    for f in (*PATH_FIELDS, *UPLOADS):
        if fields.get(f) not in (None, ""):
            up = UPLOADS.get(f) or BY_TARGET.get(f, UPLOADS["input_reference"])
            raise ApiError(400, f"{f}: this server reads no file paths from a request; send the file as the "
                                f"multipart file field {up.name!r} ({up.what})", f)
    label = name or "this server's pipeline"
    given = {UPLOADS[k].target: v for k, v in inputs.items()}
    for target, companions in COMPANIONS.items():
        if target in cls.inputs:
            continue
        up = BY_TARGET[target]
        if target in given:
            raise ApiError(400, f"{label} does not read {up.name} ({up.what})", up.name, "unsupported_input")
        for f in companions:
            if fields.get(f) not in (None, ""):
                raise ApiError(400, f"{f} is for the pipeline reading {up.name} ({up.what}); {label} does not", f,
                               "unsupported_input")
    for target in cls.inputs:
        up = BY_TARGET.get(target)
        if target in COMPANIONS and target not in given:
            raise ApiError(400, f"{label} needs {up.what}: send it as the multipart file field {up.name!r}",
                           up.name, "missing_input")
    out: dict = {}
    if "image_path" in given:
        out["image_path"] = str(given["image_path"][0].path)
    if "video_path" in given:
        out.update(_retake_fields(fields, given["video_path"][0]))
    if "audio_path" in given:
        out.update(_audio_fields(fields, given["audio_path"][0]))
    if "video_conditioning" in given:
        out.update(_reference_fields(fields, given["video_conditioning"]))
    lora = {}
    if takes_lora(cls):
        lora = _ic_lora(fields, pipelines)
    return out, lora


def _retake_fields(fields: dict, src) -> dict:
    """The source video and the region [start_time, end_time) to regenerate, within the source."""
    up, length = BY_TARGET["video_path"].name, src.info.seconds
    out = {"video_path": str(src.path)}
    for f in ("start_time", "end_time"):
        t = number(fields, f)
        if t is not None and not 0 <= t <= length:
            raise ApiError(400, f"{f} must be between 0 and {length:g} s ({up}: {src.info.frames} frames at "
                                f"{src.info.fps:g} fps), got {t:g}", f)
        out[f] = t
    return out


def _audio_fields(fields: dict, audio) -> dict:
    """A2Vid's audio and where to read it from (audio_start_time within the audio)."""
    up, length = BY_TARGET["audio_path"].name, audio.info.audio_seconds
    start = number(fields, "audio_start_time", 0.0)
    if length is not None and not 0 <= start < length:
        raise ApiError(400, f"audio_start_time must be at least 0 and below {length:g} s ({up}'s length), "
                            f"got {start:g}", "audio_start_time")
    out = {"audio_path": str(audio.path), "audio_start_time": start}
    duration = number(fields, "audio_max_duration")
    if duration is not None:
        out["audio_max_duration"] = duration
    return out


def _reference_fields(fields: dict, refs: list) -> dict:
    """IC-LoRA's reference videos with their strengths (one for all, or one per file in order)."""
    strengths = number_list(fields, "video_conditioning_strength") or [1.0]
    if len(strengths) == 1:
        strengths = strengths * len(refs)
    if len(strengths) != len(refs):
        raise ApiError(400, f"video_conditioning_strength: give one strength, or one per video_conditioning file "
                            f"({len(refs)}), got {len(strengths)}", "video_conditioning_strength")
    if not all(0.0 <= s <= 1.0 for s in strengths):
        raise ApiError(400, f"video_conditioning_strength must be between 0 and 1, got {strengths}",
                       "video_conditioning_strength")
    out = {"video_conditioning": [(str(r.path), float(s)) for r, s in zip(refs, strengths)]}
    cas = number(fields, "conditioning_attention_strength")
    if cas is not None:
        out["conditioning_attention_strength"] = cas
    return out


def _ic_lora(fields: dict, pipelines) -> dict:
    """The IC-LoRA a request names (one of serve --ic-lora's) and its strength: GenerationRequest.extra."""
    name = text(fields, "ic_lora", 64) or None
    strength = number(fields, "ic_lora_strength")
    if name is None:
        if strength is not None:
            raise ApiError(400, "ic_lora_strength needs ic_lora (the IC-LoRA it scales)", "ic_lora_strength")
        return {}
    try:
        pipelines.ic_loras.check(name)
    except RequestError as e:
        raise ApiError(400, str(e), "ic_lora", "lora_not_found") from None
    lo, hi = STRENGTH_RANGE
    if strength is not None and not lo <= strength <= hi:
        raise ApiError(400, f"ic_lora_strength must be between {lo:g} and {hi:g}, got {strength:g}", "ic_lora_strength")
    return {"ic_lora": name, "ic_lora_strength": 1.0 if strength is None else float(strength)}


def _param(field: str, fields: dict) -> str:
    """The request field an error names, as the client sent it: a path field is the upload that
    fills it (the image: input_reference); a width / height the client did not give came from size."""
    if field == "images":
        return UPLOADS["input_reference"].name
    if field in BY_TARGET:
        return BY_TARGET[field].name
    if field in ("width", "height") and fields.get(field) in (None, ""):
        return "size"
    return field
