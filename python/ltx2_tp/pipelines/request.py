"""A generation request and its validation: every bad value names its field and the allowed range,
before any model is loaded. Shared by the CLI, the HTTP server and the sglang adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from ltx2_tp.latent_grid import SPATIAL_SCALE, TEMPORAL_SCALE, LatentGrid

OUTPUT_FORMATS = ("mp4", "webm", "gif")
# What a pipeline whose first stage runs at half size needs (LTX2TwoStagePipeline and its
# subclasses): the half size must itself be a multiple of the DiT's 32. Pipelines carry their own
# `spatial_multiple`; this is the default for callers that validate before choosing one.
TWO_STAGE_SPATIAL_MULTIPLE = 2 * SPATIAL_SCALE


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

    def validate(self, max_frames: int = 2001, max_side: int = 4096,
                 spatial_multiple: int = TWO_STAGE_SPATIAL_MULTIPLE) -> "GenerationRequest":
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
        check_video_size(self.num_frames, self.height, self.width, spatial_multiple, max_frames, max_side)
        if not (1.0 <= float(self.fps) <= 120.0):
            raise RequestError("fps", f"must be between 1 and 120, got {self.fps}")
        if not (1 <= self.num_inference_steps <= 200):
            raise RequestError("num_inference_steps", f"must be between 1 and 200, got {self.num_inference_steps}")
        if not (0.0 <= float(self.guidance_scale) <= 30.0):
            raise RequestError("guidance_scale", f"must be between 0 and 30, got {self.guidance_scale}")
        if not (0 <= int(self.seed) < 2**63):
            raise RequestError("seed", f"must be between 0 and 2**63-1, got {self.seed}")
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
