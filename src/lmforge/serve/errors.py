"""Errors in OpenAI's JSON shape, and the gate every request passes: API key check and metrics."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve.metrics import Metrics

OPEN_PATHS = ("/health",)
log = logging.getLogger("lmforge.serve")


class APIError(Exception):
    """An error returned as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(LmforgeError)
    async def _user(request: Request, err: LmforgeError):
        return error_response(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            param, message = None, "the request body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return error_response(err.status_code, message, code=kind)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        # The client gets an id, never the exception: its text can hold paths, inputs or internals.
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s %s %s failed", request_id, request.method, request.url.path,
                  exc_info=(type(err), err, err.__traceback__))
        return error_response(500, f"internal error (request id {request_id}; the server log has the details)",
                              type="server_error", code=request_id)


class Gate:
    """ASGI middleware: checks `Authorization: Bearer KEY` on every route but /health, and records each
    request's route, status and latency (for a stream: until its last byte)."""

    def __init__(self, app, api_key: Optional[str], metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
                response = error_response(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, tracked)
            await self.app(scope, receive, tracked)
        finally:
            self.metrics.request(scope["path"], status[0], time.perf_counter() - start)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False
