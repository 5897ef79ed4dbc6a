"""OpenAI-style error bodies and the exception handlers that produce them.

Every error the server returns has the shape ``{"error": {"message", "type", "param", "code"}}``,
whatever raised it: our own checks (APIError), pydantic validation (400, never FastAPI's 422),
Starlette's routing (404/405) or an unexpected bug (logged, 500).
"""
from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("loopserve.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """An error meant for the client, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _AsciiJSONResponse(JSONResponse):
    """Error bodies may quote client input (a model name, say) that is not valid Unicode (lone
    surrogates from JSON escapes): ASCII-escaped JSON encodes whatever the text holds."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_FIELD_IN_MESSAGE = re.compile(r"^([a-z_]+) (?:must|is invalid|has)\b")


def from_value_error(e: Exception, default_param: str | None = None) -> APIError:
    """SamplingParams' ValueErrors start with the offending field's name: make that the param."""
    msg = str(e) or e.__class__.__name__
    m = _FIELD_IN_MESSAGE.match(msg)
    return bad_request(msg, param=m.group(1) if m else default_param)


# ---- pydantic validation errors -> 400 --------------------------------------------------------

def _param_from_loc(loc: tuple, known_fields: set[str]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'.

    Union members show up in the location as type names ('str', 'list[int]'); we keep only
    indices and names that are real request fields, and stop at the first other element.
    """
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p in known_fields:
            out += f".{p}" if out else p
        else:
            break
    return out or None


def validation_error(exc: RequestValidationError, known_fields: set[str]) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    etype = first.get("type", "")
    if etype == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"malformed JSON in the request body: {ctx.get('error', 'cannot parse it')}")
    loc = tuple(first.get("loc", ()))
    if loc == ("body",) and etype in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return bad_request("the request body must be a JSON object")
    param = _param_from_loc(loc, known_fields)
    msg = first.get("msg", "invalid value")
    where = param or ".".join(str(p) for p in loc[1:]) or "body"
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 and etype != "missing" else ""
    return bad_request(f"{where}: {msg}{extra}", param=param)


# ---- handlers ----------------------------------------------------------------------------------

def install_error_handlers(app: FastAPI, known_fields: set[str]) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc, known_fields).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            msg = f"no route {request.method} {request.url.path}"
            code = "not_found"
        elif status == 405:
            msg = f"method {request.method} is not allowed for {request.url.path}"
            code = "method_not_allowed"
        else:
            msg = str(exc.detail) if exc.detail else "request failed"
            code = None
        return APIError(status, msg, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {exc.__class__.__name__}").response()
