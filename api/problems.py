"""Errors as RFC 9457 problem details (``application/problem+json``).

Handlers raise :class:`ApiProblem`; the app's middleware turns it (and aiohttp's own
HTTP errors, and anything unexpected) into one problem document. ``type`` is a URN
naming the kind of problem (``urn:brigade:problem:quota-exceeded``); ``about:blank``
for plain HTTP errors, as the RFC says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from aiohttp import web

from api.models import FieldProblem, Problem
from workflows import FieldError

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:brigade:problem:"


class ApiProblem(Exception):
    """An answer that is an error. ``kind`` becomes the problem's ``type``."""

    def __init__(
        self,
        status: int,
        kind: str | None,
        title: str,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] = (),
        limit: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.errors = list(errors)
        self.limit = limit
        self.headers = dict(headers or {})

    def document(self, instance: str) -> Problem:
        return Problem(
            type=f"{TYPE_PREFIX}{self.kind}" if self.kind else "about:blank",
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=[FieldProblem(field=e.field, message=e.message) for e in self.errors] or None,
            limit=self.limit,
        )

    def response(self, instance: str) -> web.Response:
        body = self.document(instance).model_dump(mode="json", exclude_none=True)
        return web.Response(
            status=self.status,
            text=json.dumps(body),
            content_type=PROBLEM_JSON,
            headers=self.headers,
        )


def invalid(errors: Sequence[FieldError], detail: str | None = None) -> ApiProblem:
    """422: the request is well-formed but some fields are not allowed."""
    return ApiProblem(
        422,
        "invalid-request",
        "The request has invalid fields",
        detail or "; ".join(error.message for error in errors),
        errors=errors,
    )


def bad_request(field: str, message: str) -> ApiProblem:
    """400: the request itself is malformed (a header, the JSON)."""
    errors = [FieldError(field, message)]
    return ApiProblem(400, "bad-request", "Bad request", message, errors=errors)


def unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(
        401,
        "unauthorized",
        "A valid API key is needed",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="brigade"'},
    )


def forbidden(detail: str) -> ApiProblem:
    return ApiProblem(403, "forbidden", "This key may not do that", detail)


def not_found(detail: str) -> ApiProblem:
    return ApiProblem(404, "not-found", "Not found", detail)


def unavailable(detail: str, retry_after: int = 5) -> ApiProblem:
    return ApiProblem(
        503,
        "unavailable",
        "A service the API needs is unavailable",
        detail,
        headers={"Retry-After": str(retry_after)},
    )
