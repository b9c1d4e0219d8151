"""Every error in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: ours and the
framework's own (unknown route 404, 405, request validation, multipart parse failures, a body over
the limit, an unexpected exception)."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

LOG = logging.getLogger("ltx2_tp.serving")
_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "request_too_large", 415: "unsupported_media_type", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_, e: ApiError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)  # Starlette's: 404 route, 405, 400 multipart, 413 body
    async def _http(_, e: HTTPException):
        param = getattr(e, "param", None)
        return error_response(e.status_code, str(e.detail), param, None, dict(e.headers or {}) or None)

    @app.exception_handler(RequestValidationError)  # FastAPI's 422: a 400 naming the field, as ours
    async def _validation(_, e: RequestValidationError):
        errs = e.errors()
        loc = [str(x) for x in errs[0].get("loc", ())] if errs else []
        param = loc[-1] if loc and loc[-1] not in ("body", "query", "path") else None
        msg = "; ".join(f"{'.'.join(map(str, x.get('loc', ())[1:])) or 'body'}: {x.get('msg')}" for x in errs)
        return error_response(400, msg or "invalid request", param, "invalid_value")

    @app.exception_handler(Exception)  # a bug: 500 in the same shape, the traceback in the log only
    async def _internal(_, e: Exception):
        LOG.exception("unhandled error")
        return error_response(500, f"internal error: {type(e).__name__}", None, "internal_error")


class BodyLimit:
    """413 for a body over `max_bytes`: from Content-Length before reading any of it, or while it
    streams in when there is none. An over-limit body is read and dropped up to `drain_bytes` so
    the client, still sending, gets the 413 instead of a reset connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, multipart_max_bytes: int | None = None,
                 drain_bytes: int = 64 * 2**20):
        """`multipart_max_bytes`: a multipart form's limit (its uploads); other bodies: `max_bytes`."""
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes
        self.multipart_max_bytes = multipart_max_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"")
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.multipart_max_bytes if multipart else self.max_bytes
        param = None  # which upload made a form this large is not known before it is parsed
        message = f"request body is larger than {limit} bytes" + (
            " (the uploads' limits together: --max-upload-bytes for input_reference, --max-media-upload-bytes "
            "for the videos and audio)" if multipart else "")
        if length.isdigit() and int(length) > limit:
            if int(length) <= self.drain_bytes:
                more = True
                while more:
                    msg = await receive()
                    more = msg.get("more_body", False) and msg["type"] == "http.request"
            return await error_response(413, message, param)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    e = HTTPException(413, message)
                    e.param = param
                    raise e
            return msg

        return await self.app(scope, counted, send)
