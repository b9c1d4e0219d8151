"""OpenAI-compatible video API (what the official `openai` client sends), served by FastAPI.

POST /v1/videos (multipart as the client sends it, or JSON) · GET /v1/videos/{id} · GET /v1/videos
· DELETE /v1/videos/{id} (a running job stops at its next step) · GET /v1/videos/{id}/content
?variant=video|thumbnail · GET /v1/models (the pipelines a request may pick) · GET /metrics
(Prometheus) · GET /health (200 {"status": "ok"}; 503 {"status": "warming_up"} while `serve --warmup`
compiles, when POST /v1/videos is also a 503)

Fields and their checks: serving/params.py; the uploads (input_reference, video_reference,
audio_path, video_conditioning): serving/uploads.py; IC-LoRA files by name: serving/ic_loras.py.
Every error is in OpenAI's shape {"error": {message, type, param, code}} (serving/errors.py); a
full queue is a 429 with Retry-After.

A request with uploads: the queue is checked first (nothing is read into a full queue), then each
upload is checked and written into the job's directory, then the fields are checked with them (the
pipeline reads them: a retake's size and length are its source's); any refusal removes the
directory.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ltx2_tp.pipelines.request import MAX_IMAGE_PIXELS, MAX_MEDIA_BYTES
from ltx2_tp.serving.errors import ApiError, BodyLimit, error_response, install_error_handlers
from ltx2_tp.serving.job import Job
from ltx2_tp.serving.jobs import JobManager, QueueFull
from ltx2_tp.serving.params import Limits, video_request
from ltx2_tp.serving.pipelines import SinglePipeline
from ltx2_tp.serving.uploads import UPLOADS, UploadLimits, check_names, save_uploads

MEDIA_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
WARMING_UP_RETRY_S = 10


def create_app(manager: JobManager, model_name: str = "ltx-2-tiny", api_key: str | None = None,
               max_upload_bytes: int = 10 * 2**20, max_video_tokens: int = 400_000, default_fps: float = 24.0,
               default_steps: int = 8, poll_after_ms: int = 500, max_frames: int = 2001,
               max_prompt_chars: int = 10_000, max_image_pixels: int = MAX_IMAGE_PIXELS, cap=None,
               pipelines=None, max_media_upload_bytes: int = MAX_MEDIA_BYTES) -> FastAPI:
    """`pipelines`: the ServedPipelines a request picks from (serving/pipelines.py); None: the
    manager's one pipeline under `model_name`. `cap`: the planner's CapCheck (serve --max-gpu-memory).
    `max_upload_bytes`: input_reference; `max_media_upload_bytes`: a request's videos and audio together."""
    app = FastAPI(title="ltx2_tp", version="0.1.0")
    limits = Limits(model_name, default_fps, default_steps, max_frames, max_video_tokens, max_prompt_chars, cap)
    upload_limits = UploadLimits(max_upload_bytes, max_image_pixels, max_media_upload_bytes, max_frames)
    pipelines = pipelines if pipelines is not None else SinglePipeline(model_name, default_steps)
    created = int(time.time())
    poll = {"openai-poll-after-ms": str(poll_after_ms)}
    install_error_handlers(app)
    # the image, two prompts of up to 4 bytes a character, and the other fields; a form also its videos and audio
    body = max_upload_bytes + 8 * max_prompt_chars + 64 * 2**10
    app.add_middleware(BodyLimit, max_bytes=body, multipart_max_bytes=body + max_media_upload_bytes)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(401, "missing or wrong API key (Authorization: Bearer ...)", None, "invalid_api_key")
        return await call_next(request)

    async def _parse(request: Request):
        """(fields, files {field: [UploadFile]}, form or None): the caller closes the form (its spooled files)."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
            form = await request.form(max_files=sum(u.many for u in UPLOADS.values()), max_fields=64,
                                      max_part_size=max(2**20, 4 * max_prompt_chars))
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            files: dict[str, list] = {}
            for k, v in form.multi_items():
                if not isinstance(v, str):
                    files.setdefault(k, []).append(v)
            try:
                check_names(files)
            except BaseException:
                await form.close()
                raise
            return fields, files, form
        try:
            body = await request.json()
        except HTTPException:
            raise
        except Exception:
            raise ApiError(400, "body must be multipart/form-data or JSON", None) from None
        if not isinstance(body, dict):
            raise ApiError(400, "JSON body must be an object", None)
        for name in UPLOADS:
            if body.get(name) is not None:
                raise ApiError(400, f"{name} must be sent as a multipart file", name)
        return body, {}, None

    def _queue_full() -> ApiError:
        return ApiError(429, "the job queue is full; retry later", None, "rate_limit_exceeded",
                        {"Retry-After": str(manager.retry_after_s())})

    @app.post("/v1/videos")
    async def create_video(request: Request):
        if manager.warming_up:  # serve --warmup: compiling the listed shapes
            raise ApiError(503, "the server is warming up (compiling its --warmup shapes); retry later", None,
                           "warming_up", {"Retry-After": str(WARMING_UP_RETRY_S)})
        fields, files, form = await _parse(request)
        try:
            job_id = manager.new_id()
            try:
                inputs = {}
                if files:
                    if manager.queue_full():  # before reading any upload
                        raise _queue_full()
                    inputs = await save_uploads(files, manager.files.job_dir(job_id), upload_limits)
                # the pipeline's checks read the uploads (a retake's source size): off the event loop
                req, seconds, size = await run_in_threadpool(video_request, fields, limits, pipelines, inputs)
                if manager.queue_full():
                    raise _queue_full()
                job = manager.submit(Job(id=job_id, request=req, model=fields.get("model") or model_name,
                                         seconds=seconds, size=size))
            except QueueFull:
                manager.files.remove(job_id)
                raise _queue_full() from None
            except BaseException:
                manager.files.remove(job_id)
                raise
        finally:
            if form is not None:
                await form.close()
        return JSONResponse(job.to_openai(), headers=poll)

    def _job(video_id: str) -> Job:
        try:
            return manager.get(video_id)
        except KeyError:
            raise ApiError(404, f"no video {video_id!r}", "video_id", "not_found") from None

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        return JSONResponse(_job(video_id).to_openai(), headers=poll)

    @app.get("/v1/videos")
    async def list_videos(request: Request):
        q = request.query_params
        try:
            limit = int(q.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be an integer between 1 and 100, got {q.get('limit')!r}", "limit")
        order, after = q.get("order", "desc"), q.get("after")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'", "order")
        jobs = manager.list()
        if order == "desc":
            jobs = jobs[::-1]
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise ApiError(400, f"after: no video {after!r}", "after")
            jobs = jobs[ids.index(after) + 1 :]
        data = [j.to_openai() for j in jobs[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        try:
            manager.delete(video_id)
        except KeyError:
            raise ApiError(404, f"no video {video_id!r}", "video_id", "not_found") from None
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content")
    async def content(video_id: str, variant: str = "video"):
        job = _job(video_id)
        if variant not in ("video", "thumbnail"):
            raise ApiError(400, f"variant must be 'video' or 'thumbnail', got {variant!r}", "variant")
        if job.status in ("queued", "in_progress"):
            raise ApiError(409, f"video {video_id} is {job.status}; content exists once it is completed", "video_id",
                           "video_not_ready")
        if job.status != "completed":
            raise ApiError(404, f"video {video_id} failed; it has no content", "video_id", "not_found")
        path = manager.files.thumbnail(job) if variant == "thumbnail" else manager.files.video(job)
        if not path.is_file():
            raise ApiError(404, f"video {video_id}: its {variant} file is gone", "video_id", "not_found")
        media = "image/png" if variant == "thumbnail" else MEDIA_TYPES[job.request.output_format]
        return FileResponse(path, media_type=media)

    @app.get("/v1/models")
    async def models():
        """The names a request's `model` (or extra_body `pipeline`) may give; `pipeline`: what runs."""
        return {"object": "list", "data": [{"id": m["id"], "object": "model", "created": created, "owned_by": "ltx2_tp",
                                            "pipeline": m["pipeline"], "aliases": m["aliases"]}
                                           for m in pipelines.models()]}

    @app.get("/metrics")
    async def metrics():
        body, ctype = manager.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/health")
    async def health():
        if manager.warmup_error is not None:
            return JSONResponse({"status": "failed", "error": manager.warmup_error}, status_code=503)
        if manager.warming_up:
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {"status": "ok", "queued": manager.queue_depth()}

    return app
