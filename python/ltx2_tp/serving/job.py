"""One video job as the server keeps it: the request, where it stands, and how it is shown.

queued -> in_progress (progress 0-100) -> completed | failed. A deleted job is gone (404), which
is also how a cancelled one ends. Job ids are `video_<32 hex>` and are checked against that
pattern before they touch a path.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from ltx2_tp.pipelines.request import GenerationRequest

ID_RE = re.compile(r"^video_[0-9a-f]{32}$")
STATUSES = ("queued", "in_progress", "completed", "failed")


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


@dataclass
class Job:
    id: str
    request: GenerationRequest
    model: str
    seconds: str
    size: str  # "WxH" as generated (after rounding and extra_body width / height)
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    started_at: float | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None  # {"code", "message"}
    seq: int | None = None  # submission order, given by the store (created_at has 1 s resolution)

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "model": self.model, "progress": self.progress,
                "prompt": self.request.prompt, "seconds": self.seconds, "size": self.size, "status": self.status,
                "error": self.error, "remixed_from_video_id": None}
