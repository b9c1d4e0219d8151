"""OpenAI-compatible video API (what the official `openai` client sends), served by FastAPI.

POST /v1/videos (multipart as the client sends it, or JSON) · GET /v1/videos/{id} · GET /v1/videos
· DELETE /v1/videos/{id} · GET /v1/videos/{id}/content?variant=video|thumbnail

Beyond OpenAI's fields (prompt, model, seconds, size, input_reference), these arrive through the
client's `extra_body`: num_frames, fps, seed, num_inference_steps (or steps), guidance_scale (or
guidance), negative_prompt, width, height. `size` "WxH" is rounded to multiples of 64 (the
two-stage pipeline's grid: 1280x720 -> 1280x704); `seconds` becomes the nearest 8k+1 frame count.
Errors use OpenAI's shape {"error": {message, type, param, code}} and name the field.
"""

from __future__ import annotations

import io
import re

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from ltx2_tp.pipelines.request import GenerationRequest, RequestError
from ltx2_tp.serving.jobs import Job, JobManager, QueueFull

MEDIA_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}
SIZE_RE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _err(status: int, message: str, param: str | None = None, code: str = "invalid_value") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _round64(v: int) -> int:
    return max(64, int(round(v / 64)) * 64)


def create_app(manager: JobManager, model_name: str = "ltx-2-tiny", api_key: str | None = None,
               max_upload_bytes: int = 10 * 2**20, max_video_tokens: int = 400_000, default_fps: float = 24.0,
               default_steps: int = 8, poll_after_ms: int = 500, max_frames: int = 2001) -> FastAPI:
    app = FastAPI(title="ltx2_tp", version="0.1.0")

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _err(e.status, e.message, e.param, e.code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return _err(401, "missing or wrong API key (Authorization: Bearer ...)", None, "invalid_api_key")
        return await call_next(request)

    def _int(fields: dict, name: str, default=None):
        v = fields.get(name)
        if v is None or v == "":
            return default
        try:
            return int(float(v)) if float(v) == int(float(v)) else int(v)
        except (TypeError, ValueError):
            raise ApiError(400, f"{name} must be an integer, got {v!r}", name) from None

    def _float(fields: dict, name: str, default=None):
        v = fields.get(name)
        if v is None or v == "":
            return default
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ApiError(400, f"{name} must be a number, got {v!r}", name) from None

    async def _parse(request: Request) -> tuple[dict, object]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload = form.get("input_reference")
            return fields, (upload if upload is not None and not isinstance(upload, str) else None)
        try:
            body = await request.json()
        except Exception:
            raise ApiError(400, "body must be multipart/form-data or JSON", None) from None
        if not isinstance(body, dict):
            raise ApiError(400, "JSON body must be an object", None)
        if body.get("input_reference") is not None:
            raise ApiError(400, "input_reference must be sent as a multipart file", "input_reference")
        return body, None

    def _build(fields: dict) -> tuple[GenerationRequest, str, str]:
        model = fields.get("model") or model_name
        if model != model_name:
            raise ApiError(400, f"unknown model {model!r}; this server serves {model_name!r}", "model", "model_not_found")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt is required", "prompt")
        fps = _float(fields, "fps", default_fps)
        size = str(fields.get("size") or "768x512")
        m = SIZE_RE.match(size)
        if not m:
            raise ApiError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '1280x720'), got {size!r}", "size")
        width = _int(fields, "width", _round64(int(m.group(1))))
        height = _int(fields, "height", _round64(int(m.group(2))))
        seconds = str(fields.get("seconds") or "4")
        try:
            secs = float(seconds)
            assert secs > 0
        except (ValueError, AssertionError):
            raise ApiError(400, f"seconds must be a positive number, got {seconds!r}", "seconds") from None
        frames = _int(fields, "num_frames", int(round(secs * (fps or default_fps) / 8)) * 8 + 1)
        req = GenerationRequest(
            prompt=prompt, negative_prompt=str(fields.get("negative_prompt") or ""), width=width, height=height,
            num_frames=frames, fps=fps, seed=_int(fields, "seed", 0),
            num_inference_steps=_int(fields, "num_inference_steps", _int(fields, "steps", default_steps)),
            guidance_scale=_float(fields, "guidance_scale", _float(fields, "guidance", 3.0)))
        try:
            req.validate(max_frames=max_frames)
        except RequestError as e:
            raise ApiError(400, str(e), e.field) from None
        if req.video_tokens > max_video_tokens:
            raise ApiError(400, f"num_frames x size needs {req.video_tokens} video tokens; this server's memory plan "
                                f"allows at most {max_video_tokens} (lower num_frames, seconds or size)", "num_frames")
        return req, seconds, size

    async def _save_upload(upload, job_id: str) -> str:
        from PIL import Image, UnidentifiedImageError

        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"input_reference is larger than {max_upload_bytes} bytes", "input_reference", "file_too_large")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            raise ApiError(400, "input_reference must be an image (PNG, JPEG, WebP)", "input_reference") from None
        d = manager.job_dir(job_id)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "input_reference.png"
        img.save(path)
        return str(path)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        fields, upload = await _parse(request)
        req, seconds, size = _build(fields)
        job_id = manager.new_id()
        if upload is not None:
            req.image_path = await _save_upload(upload, job_id)
        job = Job(id=job_id, request=req, model=model_name, seconds=seconds, size=size)
        if req.image_path:
            from pathlib import Path

            job.upload_path = Path(req.image_path)
        try:
            manager.submit(job)
        except QueueFull:
            import shutil

            shutil.rmtree(manager.job_dir(job_id), ignore_errors=True)
            raise ApiError(429, "the job queue is full; retry later", None, "rate_limit_exceeded") from None
        return JSONResponse(job.to_openai(), headers={"openai-poll-after-ms": str(poll_after_ms)})

    def _job(video_id: str) -> Job:
        try:
            return manager.get(video_id)
        except KeyError:
            raise ApiError(404, f"no video {video_id!r}", "video_id", "not_found") from None

    @app.get("/v1/videos/{video_id}")
    async def retrieve(video_id: str):
        return JSONResponse(_job(video_id).to_openai(), headers={"openai-poll-after-ms": str(poll_after_ms)})

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc"):
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be between 1 and 100", "limit")
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
        page = jobs[:limit]
        data = [j.to_openai() for j in page]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}

    @app.delete("/v1/videos/{video_id}")
    async def delete(video_id: str):
        _job(video_id)
        manager.delete(video_id)
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
        if variant == "thumbnail":
            return FileResponse(job.thumbnail_path, media_type="image/png")
        return FileResponse(job.video_path, media_type=MEDIA_TYPES[job.request.output_format])

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": manager.queue.qsize()}

    return app
