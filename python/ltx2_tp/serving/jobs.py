"""Video jobs: a bounded queue in front of one worker thread that owns the pipeline.

queued -> in_progress (progress 0-100 from the pipeline's steps) -> completed | failed.
A failing job (out-of-memory included) is marked failed with {code, message}, GPU memory is
released, and the worker takes the next job. Finished files live in `output_dir/<id>/` until
`expires_at`; deleting a job removes them. Job ids are `video_<32 hex>` and are checked against
that pattern before they touch a path.
"""

from __future__ import annotations

import gc
import itertools
import queue
import re
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ltx2_tp.pipelines.request import GenerationRequest, RequestError

ID_RE = re.compile(r"^video_[0-9a-f]{32}$")
_SEQ = itertools.count()  # creation order (created_at has 1 s resolution)


class QueueFull(Exception):
    pass


@dataclass
class Job:
    id: str
    request: GenerationRequest
    model: str
    seconds: str
    size: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    video_path: Path | None = None
    thumbnail_path: Path | None = None
    upload_path: Path | None = None
    seq: int = field(default_factory=lambda: next(_SEQ))

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "model": self.model, "progress": self.progress,
                "prompt": self.request.prompt, "seconds": self.seconds, "size": self.size, "status": self.status,
                "error": self.error, "remixed_from_video_id": None}


class JobManager:
    def __init__(self, pipeline, output_dir: str | Path, max_queue: int = 8, ttl_s: int = 3600):
        self.pipeline = pipeline
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue[str] = queue.Queue(maxsize=max_queue)
        self.worker = threading.Thread(target=self._work, name="ltx2-worker", daemon=True)
        self.worker.start()

    # ---- public ----------------------------------------------------------------------------
    def new_id(self) -> str:
        return f"video_{uuid.uuid4().hex}"

    def job_dir(self, job_id: str) -> Path:
        if not ID_RE.match(job_id):
            raise KeyError(job_id)
        d = (self.output_dir / job_id).resolve()
        if d.parent != self.output_dir:  # belt and braces: never outside output_dir
            raise KeyError(job_id)
        return d

    def submit(self, job: Job) -> Job:
        with self.lock:
            self.jobs[job.id] = job
            try:
                self.queue.put_nowait(job.id)
            except queue.Full:
                del self.jobs[job.id]
                raise QueueFull() from None
        return job

    def get(self, job_id: str) -> Job:
        self.expire()
        if not ID_RE.match(job_id):
            raise KeyError(job_id)
        with self.lock:
            return self.jobs[job_id]

    def list(self) -> list[Job]:
        self.expire()
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.seq)

    def delete(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self.lock:
            self.jobs.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return job

    def expire(self) -> None:
        now = time.time()
        with self.lock:
            dead = [j for j in self.jobs.values() if j.expires_at is not None and j.expires_at <= now]
            for j in dead:
                self.jobs.pop(j.id, None)
        for j in dead:
            shutil.rmtree(self.job_dir(j.id), ignore_errors=True)

    # ---- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job_id = self.queue.get()
            with self.lock:
                job = self.jobs.get(job_id)
            if job is None:  # deleted while queued
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        job.status, job.progress = "in_progress", 0
        d = self.job_dir(job.id)
        d.mkdir(parents=True, exist_ok=True)
        weights = {"stage1": (0, 80), "stage2": (80, 95)}

        def progress(stage: str, done: int, total: int) -> None:
            lo, hi = weights.get(stage, (95, 99))
            job.progress = max(job.progress, int(lo + (hi - lo) * done / max(total, 1)))

        try:
            result = self.pipeline(job.request, d / f"video.{job.request.output_format}", progress=progress)
            job.thumbnail_path = _thumbnail(result.path, d / "thumbnail.png")
            job.video_path = result.path
            job.status, job.progress = "completed", 100
        except BaseException as e:  # a job never takes the server down
            code = "out_of_memory" if isinstance(e, torch.OutOfMemoryError) else (
                "invalid_request" if isinstance(e, RequestError) else "internal_error")
            job.error = {"code": code, "message": f"{type(e).__name__}: {e}"[:2000]}
            job.status = "failed"
            if code == "internal_error":
                traceback.print_exc()
            for p in d.glob("*"):  # never a partial file
                p.unlink(missing_ok=True)
        finally:
            job.completed_at = int(time.time())
            job.expires_at = job.completed_at + self.ttl_s
            if job.upload_path is not None:
                job.upload_path.unlink(missing_ok=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _thumbnail(video: Path, out: Path) -> Path:
    import av
    from PIL import Image

    with av.open(str(video)) as f:
        frame = next(f.decode(video=0)).to_ndarray(format="rgb24")
    Image.fromarray(frame).save(out)
    return out
