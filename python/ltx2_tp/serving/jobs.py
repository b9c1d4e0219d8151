"""Video jobs: a durable queue (serving/store.py) in front of one worker thread that owns the pipeline.

queued -> in_progress (progress 0-100 from the pipeline's steps) -> completed | failed.
- A failing job (out-of-memory included) is marked failed with {code, message}; its files are
  removed, GPU memory is released and the worker takes the next job.
- DELETE of a running job sets its cancel token: the pipeline stops at its next denoising step
  (serving/cancel.py), the worker removes the job's files and takes the next job at once.
- The worker writes into a staging directory; the files move into `output_dir/<id>/` only if the
  job still exists when it finishes (serving/files.py), so a deleted job never leaves files.
- `warmup` requests (serve --warmup, serving/warmup.py) run first, their output discarded; until
  they are done `warming_up` is True (/health: 503). A failing warm-up stops the server.
- On start (after a crash or a stop): completed jobs stay listed and downloadable until they
  expire; a job that was running is failed with code `server_restarted` (a job that may have
  crashed the server is not run again by itself); queued jobs run again in their order; files no
  job owns are removed; expiry goes on from the persisted expires_at.
"""

from __future__ import annotations

import gc
import math
import re
import shutil
import threading
import time
import traceback
from pathlib import Path

import torch

from ltx2_tp.pipelines.request import RequestError
from ltx2_tp.serving.cancel import CancelToken
from ltx2_tp.serving.events import log_event, log_job
from ltx2_tp.serving.files import STAGING, THUMBNAIL, JobFiles
from ltx2_tp.serving.job import ID_RE, Job, new_job_id
from ltx2_tp.serving.metrics import ServerMetrics, device_memory
from ltx2_tp.serving.sqlite_store import SQLiteJobStore
from ltx2_tp.serving.store import JobStore

# progress 0-100: stage 1 is most of the work, stage 2 a few steps, decoding the rest
PROGRESS_SPANS = {"stage1": (0, 80), "stage2": (80, 95)}
TILE_RE = re.compile(r"^tile (\d+)/(\d+) (.+)$")  # a tiled long video's stages: "tile 3/10 stage1"
RESTARTED = {"code": "server_restarted",
             "message": "the server stopped while this job was running; submit it again"}


class QueueFull(Exception):
    pass


class JobManager:
    def __init__(self, pipeline, output_dir: str | Path, max_queue: int = 8, ttl_s: int = 3600,
                 store: JobStore | None = None, idle_poll_s: float = 1.0, warmup=()):
        self.pipeline = pipeline
        self.warmup = list(warmup)  # GenerationRequests run before the first job
        self.warming_up = bool(self.warmup)
        self.warmup_error: str | None = None
        self.files = JobFiles(output_dir)
        self.store = store if store is not None else SQLiteJobStore(self.files.root)
        self.max_queue, self.ttl_s, self.idle_poll_s = max_queue, ttl_s, idle_poll_s
        self.metrics = ServerMetrics(self.store, self.rank_memory)
        self.on_fatal = None  # called with the exception when the ranks can no longer work together
        self._lock = threading.Lock()  # a job's end (publish files, mark completed) vs its deletion
        self._wake = threading.Event()
        self._running: tuple[str, CancelToken] | None = None
        self._stopping = False
        self._job_s = 5.0  # moving average of a job's wall time: the Retry-After of a full queue
        self.recover()
        self.worker = threading.Thread(target=self._work, name="ltx2-worker", daemon=True)
        self.worker.start()

    # ---- public ----------------------------------------------------------------------------
    def new_id(self) -> str:
        return new_job_id()

    def submit(self, job: Job) -> Job:
        if not self.store.add(job, self.max_queue):
            raise QueueFull()
        log_job(job.id, "queued", size=job.size, frames=job.request.num_frames,
                steps=job.request.num_inference_steps, pipeline=job.request.pipeline)
        self._wake.set()
        return job

    def queue_full(self) -> bool:
        return self.queue_depth() >= self.max_queue

    def queue_depth(self) -> int:
        return self.store.count_by_status().get("queued", 0)

    def retry_after_s(self) -> int:
        """A full queue frees a place when the running job ends: about one job's time."""
        return max(1, math.ceil(self._job_s))

    def get(self, job_id: str) -> Job:
        self.expire()
        if not ID_RE.match(job_id):
            raise KeyError(job_id)
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def list(self) -> list[Job]:
        self.expire()
        return self.store.list()

    def delete(self, job_id: str) -> Job:
        if not ID_RE.match(job_id):
            raise KeyError(job_id)
        with self._lock:
            job = self.store.delete(job_id)
            if job is None:
                raise KeyError(job_id)
            running = self._running is not None and self._running[0] == job_id
            if running:  # the worker stops at the next step and removes the files itself
                self._running[1].cancel()
            else:
                self.files.remove(job_id)
        log_job(job_id, "deleted", was=job.status)
        return job

    def expire(self) -> None:
        now = time.time()
        for job_id in self.store.expired(now):
            with self._lock:
                if self.store.delete(job_id) is not None:
                    self.files.remove(job_id)
            log_job(job_id, "expired")

    def rank_memory(self) -> list[tuple[int, int]]:
        """(allocated, reserved) GPU bytes per rank, as of the last step (0 on CPU)."""
        per_rank = getattr(self.pipeline, "rank_memory", None)
        if callable(per_rank):
            return per_rank()
        c = getattr(self.pipeline, "c", None)
        return [device_memory(c.device if c is not None else "cpu")]

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the worker: a running job stops at its next step and stays `in_progress` in the store,
        so the next start fails it with `server_restarted`, as after a crash. True if the worker ended."""
        self._stopping = True
        with self._lock:
            if self._running is not None:
                self._running[1].cancel()
        self._wake.set()
        self.worker.join(timeout)
        if self.worker.is_alive():  # inside a long step: the store stays open for it
            return False
        self.store.close()
        return True

    # ---- start -----------------------------------------------------------------------------
    def recover(self) -> None:
        now = int(time.time())
        for job in self.store.list():
            if job.status == "in_progress":
                self.store.finish(job.id, "failed", now, now + self.ttl_s, RESTARTED)
                log_job(job.id, "failed", code=RESTARTED["code"])
            elif job.status == "queued":
                log_job(job.id, "requeued")
        self.expire()
        owned = {}
        for job in self.store.list():
            if job.status == "completed":
                owned[job.id] = {self.files.video_name(job), THUMBNAIL}
            elif job.status == "queued":  # its uploads, which it runs with
                owned[job.id] = self.files.input_names(job.request)
        for p in self.files.sweep(owned):
            log_job(p.name if ID_RE.match(p.name) else "-", "swept", path=str(p))

    # ---- worker ----------------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Each warm-up request through the pipeline (every rank, when it drives several), its
        files removed. A failure is fatal: the server was asked to be ready for these shapes."""
        from ltx2_tp.compile import compile_cache_stats
        from ltx2_tp.serving.warmup import shape_of

        staging = self.files.root / STAGING / "warmup"
        try:
            for req in self.warmup:
                if self._stopping:
                    return
                staging.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                self.pipeline(req, staging / f"warmup.{req.output_format}")
                log_event("warmup", size=shape_of(req), steps=req.num_inference_steps,
                          seconds=round(time.time() - t0, 3), **compile_cache_stats())
        except BaseException as e:  # noqa: BLE001 - reported, then the server stops
            traceback.print_exc()
            self.warmup_error = f"{type(e).__name__}: {e}"[:2000]
            self._stopping = True
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.warming_up = False

    def _work(self) -> None:
        if self.warmup:
            self._warm_up()
        while not self._stopping:
            token = CancelToken()
            with self._lock:
                job = self.store.claim_next(time.time())
                if job is not None:
                    self._running = (job.id, token)
            if job is None:
                self._wake.wait(self.idle_poll_s)
                self._wake.clear()
                idle = getattr(self.pipeline, "idle", None)  # several ranks: keep the followers' channel alive
                if callable(idle) and not self._stopping:
                    self._guard(idle)
                self._guard(self.expire)
                continue
            try:
                self._run(job, token)
            except BaseException:  # noqa: BLE001 - e.g. the store's disk is full: log it, keep serving
                traceback.print_exc()
                with self._lock:
                    self._running = None

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the worker thread never dies
            traceback.print_exc()
            if getattr(e, "fatal", False) and self.on_fatal is not None:
                self._stopping = True
                self.on_fatal(e)

    def _progress(self, job: Job, token: CancelToken):
        last: dict[str, float] = {}
        shown = [0]

        def progress(stage: str, done: int, total: int) -> None:
            now = time.perf_counter()
            if done > 0 and stage in last:
                self.metrics.step_seconds.labels(stage_kind(stage)).observe(now - last[stage])
            last[stage] = now
            p = max(shown[0], progress_percent(stage, done, total))
            if p != shown[0] or done == 0:
                shown[0] = p
                if not self.store.set_progress(job.id, p):  # deleted elsewhere (another server process)
                    token.cancel()
            token.check()

        return progress

    def _mode(self, req) -> dict:
        """LTX2LongVideo's choice for `req` ({"long_video_mode": dense | tiled, ...}) for the job's log."""
        choose = getattr(self.pipeline, "choose_mode", None)
        if not callable(choose):
            return {}
        try:
            choice = choose(req)
        except Exception:  # noqa: BLE001 - a bad request fails in the pipeline, with its own message
            return {}
        extra = {"tiles": len(choice.tiles)} if choice.tiles else {}
        return {"long_video_mode": choice.mode, "mode_reason": choice.reason, **extra}

    def _run(self, job: Job, token: CancelToken) -> None:
        t0 = time.time()
        req = job.request
        log_job(job.id, "in_progress", waited_s=round(t0 - job.created_at, 3), **self._mode(req))
        self.files.localize(job)
        staging = self.files.staging_dir(job.id)
        staging.mkdir(parents=True, exist_ok=True)
        video_name = self.files.video_name(job)
        outcome, error, result = "completed", None, None
        try:
            token.check()
            result = self.pipeline(req, staging / video_name, progress=self._progress(job, token))
            token.check()  # deleted while decoding: nothing is published
            _thumbnail(result.path, staging / THUMBNAIL)
        except BaseException as e:  # noqa: BLE001 - a job never takes the server down
            if token.cancelled:  # deleted (or the server stops): whatever it raised on the way out
                outcome = "cancelled"
            else:
                outcome, error = "failed", _error(e)
                if error["code"] == "internal_error":
                    traceback.print_exc()
            fatal = e if getattr(e, "fatal", False) else None
        else:
            fatal = None
        now = int(time.time())
        with self._lock:
            self._running = None
            if outcome == "completed":
                if self.store.get(job.id) is not None:
                    self.files.publish(job.id, [video_name, THUMBNAIL])
                    if not self.store.finish(job.id, "completed", now, now + self.ttl_s):
                        outcome = "cancelled"
                else:
                    outcome = "cancelled"
            elif outcome == "failed" and not self.store.finish(job.id, "failed", now, now + self.ttl_s, error):
                outcome = "cancelled"
        if outcome == "completed":
            self.files.remove_inputs(job)
            self._job_s = 0.8 * self._job_s + 0.2 * (time.time() - t0)
            for stage, s in result.stage_times.items():
                self.metrics.stage_seconds.labels(stage).observe(s)
        elif outcome == "cancelled" and self._stopping and self.store.get(job.id) is not None:
            outcome = "stopped"  # the server stops: the row stays in_progress, failed on the next start
            shutil.rmtree(staging, ignore_errors=True)
        else:
            self.files.remove(job.id)  # a failed or deleted job owns no file
        self.metrics.jobs_finished.labels(outcome).inc()
        extra = {"code": error["code"]} if error else {}
        log_job(job.id, outcome, seconds=round(time.time() - t0, 3), **extra)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if fatal is not None and self.on_fatal is not None:
            self._stopping = True
            self.on_fatal(fatal)


def stage_kind(stage: str) -> str:
    """"tile 3/10 stage1" -> "stage1" (the metrics' stage label stays one of a few)."""
    m = TILE_RE.match(stage)
    return m.group(3) if m else stage


def progress_percent(stage: str, done: int, total: int) -> int:
    """0-100 for a progress call: PROGRESS_SPANS within a request, or within its tile's share of a tiled one."""
    m = TILE_RE.match(stage)
    lo, hi = PROGRESS_SPANS.get(stage_kind(stage), (95, 99))
    p = lo + (hi - lo) * done / max(total, 1)
    if m:  # tile k of n: its own 0-100 scaled into [k-1, k) / n of 99
        k, n = int(m.group(1)), int(m.group(2))
        return int(99 * (k - 1 + p / 100) / max(n, 1))
    return int(p)


def _error(e: BaseException) -> dict:
    code = getattr(e, "code", None)
    if not isinstance(code, str):
        code = ("out_of_memory" if isinstance(e, torch.OutOfMemoryError) else
                "invalid_request" if isinstance(e, RequestError) else "internal_error")
    return {"code": code, "message": f"{type(e).__name__}: {e}"[:2000]}


def _thumbnail(video: Path, out: Path) -> Path:
    import av
    from PIL import Image

    with av.open(str(video)) as f:
        frame = next(f.decode(video=0)).to_ndarray(format="rgb24")
    Image.fromarray(frame).save(out)
    return out
