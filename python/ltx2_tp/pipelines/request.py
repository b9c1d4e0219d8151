"""A generation request and its validation: every bad value names its field and the allowed range,
before any model is loaded. Shared by the CLI, the HTTP server and the sglang adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from ltx2_tp.latent_grid import SPATIAL_SCALE, TEMPORAL_SCALE, LatentGrid

OUTPUT_FORMATS = ("mp4", "webm", "gif")
MAX_FRAMES = 2001  # one piece (dense): what every pipeline accepts
FPS_RANGE = (1.0, 120.0)  # a request's fps (a retake's source is held to it too)
MAX_SIDE = 4096  # pixels, a video's (or a reference image's) largest side
MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE  # an uploaded image's pixels: the largest video side, squared
MAX_MEDIA_BYTES = 256 * 2**20  # serve --max-media-upload-bytes: a request's uploaded videos and audio together
# A tiled long video (LTX2LongVideo) holds one tile in memory however long it is: the cap only keeps
# a typo from queueing a day of work (an hour at 24 fps).
TILED_MAX_FRAMES = 86401
LONG_VIDEO_MODES = ("auto", "dense", "tiled")
TILE_FRAMES_RANGE = (24, 1000)  # ComfyUI's looping sampler's (tile_frames, multiples of 8)
# What a pipeline whose first stage runs at half size needs (LTX2TwoStagePipeline and its
# subclasses): the half size must itself be a multiple of the DiT's 32. Pipelines carry their own
# `spatial_multiple`; this is the default for callers that validate before choosing one.
TWO_STAGE_SPATIAL_MULTIPLE = 2 * SPATIAL_SCALE


# The stage-1 guidance fields (ltx-pipelines' argument names, as the CLI's flags): float scales,
# integer skip steps, lists of block indices. guidance_scale (the video CFG) is apart: every caller has it.
GUIDANCE_FIELDS = ("video_stg_guidance_scale", "video_rescale_scale", "video_stg_blocks", "a2v_guidance_scale",
                   "video_skip_step", "audio_cfg_guidance_scale", "audio_stg_guidance_scale", "audio_rescale_scale",
                   "audio_stg_blocks", "v2a_guidance_scale", "audio_skip_step")


class RequestError(ValueError):
    """A request field outside its allowed values (the CLI exits 2, the server answers 400)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 768
    height: int = 512
    num_frames: int = 121
    fps: float = 24.0
    num_inference_steps: int = 40
    guidance_scale: float = 3.0
    seed: int = 0
    image_path: str | None = None
    output_format: str = "mp4"
    extra: dict = field(default_factory=dict)
    # the registered pipeline class that runs it (pipelines/registry.py); None: the caller's default.
    # The server persists it with the job, so a restarted server resumes the job with its pipeline.
    pipeline: str | None = None
    # Stage-1 multimodal guidance (ltx-pipelines' argument names; guidance_scale is the video CFG).
    # None: the pipeline's default for the model (pipelines/guidance.py).
    video_stg_guidance_scale: float | None = None
    video_rescale_scale: float | None = None
    video_stg_blocks: list[int] | None = None
    a2v_guidance_scale: float | None = None  # the video guider's modality scale
    video_skip_step: int | None = None
    audio_cfg_guidance_scale: float | None = None
    audio_stg_guidance_scale: float | None = None
    audio_rescale_scale: float | None = None
    audio_stg_blocks: list[int] | None = None
    v2a_guidance_scale: float | None = None  # the audio guider's modality scale
    audio_skip_step: int | None = None
    # Inputs of the other official pipelines (ltx-pipelines' argument names)
    images: list[tuple] = field(default_factory=list)  # (path, frame_idx, strength[, crf]): --image
    video_path: str | None = None  # retake: the source video
    start_time: float | None = None  # retake: the region to regenerate, seconds
    end_time: float | None = None
    video_conditioning: list[tuple] = field(default_factory=list)  # IC-LoRA: (path, strength) reference videos
    conditioning_attention_strength: float = 1.0  # IC-LoRA
    audio_path: str | None = None  # A2Vid: the audio to put video to
    audio_start_time: float = 0.0
    audio_max_duration: float | None = None
    # Opt-in APPROXIMATIONS (pipelines/approximations.py; never on unless asked):
    attention_window_frames: int | None = None  # video self-attention sees latent frames within K (None: all)
    keyframe_stride: int = 1  # stage 1 denoises every S-th latent frame and the last, the rest interpolated
    step_cache_threshold: float = 0.0  # reuse a step's DiT output while its input moved less than T (0: off)
    # LTX2LongVideo: one piece or temporal tiles (pipelines/tiling.py). Tile and overlap are in
    # ComfyUI LTXVLoopingSampler's units (frames, multiples of 8; its defaults 80 / 24).
    long_video_mode: str = "auto"  # auto | dense | tiled
    tile_frames: int = 80
    tile_overlap_frames: int = 24
    tile_cond_strength: float = 0.5  # the previous tile's overlap held at this strength (1: kept as is)
    adain_factor: float = 0.0  # each tile's latent statistics pulled this far toward the first tile's
    prompts: list[str] = field(default_factory=list)  # per tile, in order (the last repeats); []: prompt
    prompt_schedule: list = field(default_factory=list)  # [(seconds, prompt)]: the prompt in force by time

    def validate(self, max_frames: int = MAX_FRAMES, max_side: int = MAX_SIDE,
                 spatial_multiple: int = TWO_STAGE_SPATIAL_MULTIPLE) -> "GenerationRequest":
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
        check_video_size(self.num_frames, self.height, self.width, spatial_multiple, max_frames, max_side)
        if not (FPS_RANGE[0] <= float(self.fps) <= FPS_RANGE[1]):
            raise RequestError("fps", f"must be between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}, got {self.fps}")
        if not (1 <= self.num_inference_steps <= 200):
            raise RequestError("num_inference_steps", f"must be between 1 and 200, got {self.num_inference_steps}")
        if not (0.0 <= float(self.guidance_scale) <= 30.0):
            raise RequestError("guidance_scale", f"must be between 0 and 30, got {self.guidance_scale}")
        if not (0 <= int(self.seed) < 2**63):
            raise RequestError("seed", f"must be between 0 and 2**63-1, got {self.seed}")
        _check_guidance(self)
        _check_inputs(self)
        _check_approximations(self)
        _check_tiling(self)
        if self.output_format not in OUTPUT_FORMATS:
            raise RequestError("output_format", f"must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        return self

    @property
    def video_tokens(self) -> int:
        return LatentGrid(self.num_frames, self.height, self.width).video_tokens


def check_video_size(num_frames: int, height: int, width: int, spatial_multiple: int,
                     max_frames: int | None = None, max_side: int | None = None) -> None:
    """The one check of a video's size, used at every boundary (requests, `ltx2-tp dit`): frames
    8k+1, height and width multiples of `spatial_multiple` (32 for the DiT alone, more for a
    pipeline that also runs at a reduced size). Raises RequestError naming the field."""
    if num_frames < 1 or (max_frames and num_frames > max_frames) or (num_frames - 1) % TEMPORAL_SCALE:
        limit = f" between 1 and {max_frames}" if max_frames else ""
        raise RequestError("num_frames", f"must be 8k+1{limit} (e.g. 9, 121, 241), got {num_frames}")
    m = spatial_multiple
    for name, v in (("width", width), ("height", height)):
        if v < m or (max_side and v > max_side) or v % m:
            allowed = f"a multiple of {m} between {m} and {max_side}" if max_side else f"a positive multiple of {m}"
            raise RequestError(name, f"must be {allowed}, got {v}")


def _check_guidance(r: GenerationRequest) -> None:
    """Ranges of the guidance fields; block indices are checked against the model by the pipeline."""
    for name, lo, hi in (("video_stg_guidance_scale", 0, 30), ("video_rescale_scale", 0, 1), ("a2v_guidance_scale", 0, 30),
                         ("audio_cfg_guidance_scale", 0, 30), ("audio_stg_guidance_scale", 0, 30),
                         ("audio_rescale_scale", 0, 1), ("v2a_guidance_scale", 0, 30)):
        v = getattr(r, name)
        if v is not None and not (lo <= float(v) <= hi):
            raise RequestError(name, f"must be between {lo} and {hi}, got {v}")
    for name in ("video_skip_step", "audio_skip_step"):
        v = getattr(r, name)
        if v is not None and not (isinstance(v, int) and 0 <= v <= 100):
            raise RequestError(name, f"must be an integer between 0 and 100, got {v}")
    for name in ("video_stg_blocks", "audio_stg_blocks"):
        v = getattr(r, name)
        if v is not None and not all(isinstance(b, int) and b >= 0 for b in v):
            raise RequestError(name, f"must be a list of block indices >= 0, got {v}")


MAX_WINDOW_FRAMES = 250  # latent frames: 2001 frames are 251, so a larger window is exact attention
MAX_KEYFRAME_STRIDE = 16  # latent frames between keyframes: 128 video frames
MAX_STEP_CACHE_THRESHOLD = 1.0  # an accumulated relative change of 1 already skips nearly every allowed step


def check_attention_window(k) -> None:
    """The temporal window's radius (also `ltx2-tp dit --attention-window-frames`)."""
    if k is not None and not (_is_int(k) and 1 <= k <= MAX_WINDOW_FRAMES):
        raise RequestError("attention_window_frames", f"must be an integer between 1 and {MAX_WINDOW_FRAMES} "
                           f"(latent frames each way; unset: exact attention), got {k!r}")


def _check_approximations(r: GenerationRequest) -> None:
    check_attention_window(r.attention_window_frames)
    s = r.keyframe_stride
    if not (_is_int(s) and 1 <= s <= MAX_KEYFRAME_STRIDE):
        raise RequestError("keyframe_stride", f"must be an integer between 1 and {MAX_KEYFRAME_STRIDE} "
                           f"(1: every frame), got {s!r}")
    t = r.step_cache_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0.0 <= t <= MAX_STEP_CACHE_THRESHOLD):
        raise RequestError("step_cache_threshold", f"must be a number between 0 and {MAX_STEP_CACHE_THRESHOLD:g} "
                           f"(0: off), got {t!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_inputs(r: GenerationRequest) -> None:
    for i, img in enumerate(r.images):
        try:
            assert 3 <= len(img) <= 4
            int(img[1]), float(img[2]), [int(x) for x in img[3:]]
        except (AssertionError, ValueError, TypeError):
            raise RequestError("images", f"image {i}: give PATH FRAME_IDX STRENGTH [CRF], got {list(img)}") from None
        if not (0 <= int(img[1]) < r.num_frames):
            raise RequestError("images", f"image {i}: frame index must be between 0 and {r.num_frames - 1}, got {img[1]}")
        if not (0.0 <= float(img[2]) <= 1.0):
            raise RequestError("images", f"image {i}: strength must be between 0 and 1, got {img[2]}")
    for i, ref in enumerate(r.video_conditioning):
        try:
            ok = len(ref) == 2 and 0.0 <= float(ref[1]) <= 1.0
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise RequestError("video_conditioning", f"reference {i}: give PATH STRENGTH (0 to 1), got {list(ref)}")
    if not (0.0 <= float(r.conditioning_attention_strength) <= 1.0):
        raise RequestError("conditioning_attention_strength",
                           f"must be between 0 and 1, got {r.conditioning_attention_strength}")
    if r.start_time is not None and r.end_time is not None and not (0 <= r.start_time < r.end_time):
        raise RequestError("start_time", f"must be >= 0 and below end_time ({r.end_time}), got {r.start_time}")
    if r.audio_start_time < 0:
        raise RequestError("audio_start_time", f"must be >= 0, got {r.audio_start_time}")
    if r.audio_max_duration is not None and r.audio_max_duration <= 0:
        raise RequestError("audio_max_duration", f"must be > 0, got {r.audio_max_duration}")


def _check_tiling(r: GenerationRequest) -> None:
    """Ranges of the long-video fields (ComfyUI's looping sampler's, in frames: tiles 24-1000 and
    overlaps from 16, multiples of 8; each tile adds at least 8 new frames)."""
    if r.long_video_mode not in LONG_VIDEO_MODES:
        raise RequestError("long_video_mode", f"must be one of {', '.join(LONG_VIDEO_MODES)}, got {r.long_video_mode!r}")
    t, o = r.tile_frames, r.tile_overlap_frames
    lo, hi = TILE_FRAMES_RANGE
    if not (isinstance(t, int) and lo <= t <= hi and t % TEMPORAL_SCALE == 0):
        raise RequestError("tile_frames", f"must be a multiple of 8 between {lo} and {hi}, got {t}")
    if not (isinstance(o, int) and 16 <= o <= t - 8 and o % TEMPORAL_SCALE == 0):
        raise RequestError("tile_overlap_frames", f"must be a multiple of 8 between 16 and tile_frames - 8 "
                           f"({t - 8}), got {o}")
    for name in ("tile_cond_strength", "adain_factor"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise RequestError(name, f"must be between 0 and 1, got {v!r}")
    if not isinstance(r.prompts, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in r.prompts):
        raise RequestError("prompts", "must be a list of non-empty strings (one per tile)")
    if r.prompts and r.prompt_schedule:
        raise RequestError("prompts", "give per-tile prompts or a prompt schedule, not both")
    r.prompt_schedule = parse_prompt_schedule(r.prompt_schedule)


def parse_prompt_schedule(schedule) -> list[tuple[float, str]]:
    """A schedule by time, as text "0:a fox in the snow|12.5:the fox runs" (one "SECONDS:prompt" per
    "|" or line) or as [(seconds, prompt), ...] -> [(seconds, prompt)], times strictly increasing
    from >= 0. The prompt in force at time t is the last entry at or before t (before the first: `prompt`)."""
    if not schedule:
        return []
    if isinstance(schedule, str):
        entries = []
        for part in (p for line in schedule.splitlines() for p in line.split("|")):
            if not part.strip():
                continue
            time, sep, text = part.partition(":")
            try:
                entries.append((float(time), text.strip()) if sep else None)
            except ValueError:
                entries.append(None)
            if entries[-1] is None:
                raise RequestError("prompt_schedule", f"each entry must be SECONDS:prompt (e.g. '0:a fox|12.5:a wolf'), "
                                   f"got {part.strip()!r}")
    elif isinstance(schedule, (list, tuple)):
        entries = []
        for e in schedule:
            ok = isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[1], str)
            try:
                entries.append((float(e[0]), e[1].strip()) if ok and not isinstance(e[0], bool) else None)
            except (TypeError, ValueError):
                entries.append(None)
            if entries[-1] is None:
                raise RequestError("prompt_schedule", f"each entry must be [seconds, prompt], got {e!r}")
    else:
        raise RequestError("prompt_schedule", f"must be 'SECONDS:prompt|...' or a list of [seconds, prompt], "
                           f"got {type(schedule).__name__}")
    times = [t for t, _ in entries]
    if any(not (t >= 0 and t < float("inf")) for t in times) or any(b <= a for a, b in zip(times, times[1:])):
        raise RequestError("prompt_schedule", f"times must be finite, >= 0 and increasing, got {times}")
    if any(not text for _, text in entries):
        raise RequestError("prompt_schedule", "every entry needs a non-empty prompt")
    return entries
