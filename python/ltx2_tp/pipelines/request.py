"""A generation request and its validation: every bad value names its field and the allowed range,
before any model is loaded. Shared by the CLI, the HTTP server and the sglang adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

OUTPUT_FORMATS = ("mp4", "webm", "gif")


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

    def validate(self, max_frames: int = 2001, max_side: int = 4096) -> "GenerationRequest":
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
        if not (1 <= self.num_frames <= max_frames) or (self.num_frames - 1) % 8:
            raise RequestError("num_frames", f"must be 8k+1 between 1 and {max_frames} (e.g. 9, 121, 241), got {self.num_frames}")
        for name in ("width", "height"):
            v = getattr(self, name)
            # two-stage: stage 1 runs at half size, which must still be a multiple of 32
            if not (64 <= v <= max_side) or v % 64:
                raise RequestError(name, f"must be a multiple of 64 between 64 and {max_side}, got {v}")
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
        return ((self.num_frames - 1) // 8 + 1) * (self.height // 32) * (self.width // 32)
