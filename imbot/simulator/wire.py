"""Easemob's REST wire format as the simulator speaks it: error bodies and send validation.

Error bodies follow reference §3.2/§3.9::

    {"error": "message_send_error", "exception": "MessageSendException",
     "timestamp": 1748575460150, "duration": 0, "error_code": 14007,
     "error_description": "message is too large"}
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

# Default (error, exception, description) per status for injected failures.
DEFAULT_ERRORS: dict[int, tuple[str, str, str]] = {
    400: (
        "invalid_request_body",
        "IllegalArgumentException",
        "Request body is invalid. Please check body is correct.",
    ),
    401: (
        "unauthorized",
        "UnauthorizedException",
        "Unable to authenticate due to expired access token",
    ),
    403: ("message_send_error", "MessageSendException", "message send reach limit"),
    404: ("service_resource_not_found", "ResourceNotFoundException", "Service resource not found"),
    408: ("request_timeout", "RequestTimeoutException", "Request Timeout"),
    413: ("Request Entity Too Large", "RequestEntityTooLargeException", "Request Entity Too Large"),
    415: ("web_application", "WebApplicationException", "Unsupported Media Type"),
    429: ("reach_limit", "ReachLimitException", "This request has reached api limit"),
    500: ("unsupported_service_operation", "WebApplicationException", "Internal Server Error"),
    502: ("web_application", "WebApplicationException", "Bad Gateway"),
    503: ("web_application", "WebApplicationException", "Service Unavailable"),
    504: ("web_application", "WebApplicationException", "Gateway Timeout"),
}

TOO_LARGE = "message is too large"
TOO_LARGE_CODE = 14007
SEND_ERROR = ("message_send_error", "MessageSendException")
MESSAGE_TYPES = frozenset({"txt", "img", "audio", "video", "file", "loc", "cmd", "custom"})
TARGETS_PER_CALL = {"users": 600, "chatgroups": 3, "chatrooms": 10}


def error_response(
    status: int,
    description: str | None = None,
    *,
    error: str | None = None,
    exception: str | None = None,
    error_code: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    default_error, default_exception, default_description = DEFAULT_ERRORS.get(
        status, ("web_application", "WebApplicationException", "error")
    )
    description = description or default_description
    if error is None:
        # A description from the send-error family implies Easemob's send error class.
        error = SEND_ERROR[0] if description == TOO_LARGE else default_error
    if error_code is None and description == TOO_LARGE and status == 400:
        error_code = TOO_LARGE_CODE
    body: dict[str, Any] = {
        "error": error,
        "exception": exception or default_exception,
        "timestamp": int(time.time() * 1000),
        "duration": 0,
        "error_description": description,
    }
    if error_code is not None:
        body["error_code"] = error_code
    return web.json_response(body, status=status, headers=headers)


def send_error(description: str, *, error_code: int | None = None) -> web.Response:
    return error_response(
        400, description, error=SEND_ERROR[0], exception=SEND_ERROR[1], error_code=error_code
    )


def invalid_body() -> web.Response:
    return error_response(400)


def validate_send(kind: str, body: Any) -> web.Response | dict[str, Any]:
    """The normalised send request, or the 400 Easemob would answer (reference §3.4, §3.9)."""
    if not isinstance(body, dict):
        return invalid_body()
    sender = body.get("from", "admin")  # omitted: Easemob sends as "admin"
    if not isinstance(sender, str):
        return invalid_body()
    if not sender:
        return send_error("param from can't be empty")
    to = body.get("to")
    if to is None or to == [] or to == "":
        return send_error("param to can't be empty")
    if not isinstance(to, list) or not all(isinstance(t, str) and t for t in to):
        return invalid_body()
    limit = TARGETS_PER_CALL[kind]
    if len(to) > limit:
        return send_error(f"params to's size can't exceed limit {limit}")
    kind_of_message = body.get("type")
    if not kind_of_message:
        return send_error("param type can't be empty")
    if kind_of_message not in MESSAGE_TYPES:
        return invalid_body()
    message_body = body.get("body")
    if not message_body:
        return send_error("param body can't be empty")
    if not isinstance(message_body, dict):
        return invalid_body()
    if kind_of_message == "txt" and not isinstance(message_body.get("msg"), str):
        return invalid_body()
    if "ext" in body and not isinstance(body["ext"], dict):
        return send_error("param ext must be JSONObject")
    return {**body, "from": sender}
