"""Small HTTP helpers shared by the routes: JSON in, JSON out, pydantic errors named."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from api.problems import ApiProblem, bad_request
from workflows import FieldError


def json_response(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        model.model_dump(mode="json"), status=status, headers=headers, dumps=_dumps
    )


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def field_errors(exc: ValidationError, model: type[BaseModel]) -> list[FieldError]:
    """pydantic's errors about ``model`` as ``FieldError`` s naming the field and what is
    allowed there."""
    errors = []
    allowed_fields = ", ".join(model.model_fields)
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        kind = error["type"]
        if kind == "string_type":
            text = "must be a string"
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            text = "must be a whole number"
        elif kind in ("float_type", "float_parsing"):
            text = "must be a number"
        elif kind == "bool_type":
            text = "must be true or false"
        elif kind == "missing":
            text = "is required"
        elif kind == "extra_forbidden":
            text = f"is not a field (allowed: {allowed_fields})"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            text = "must be a JSON object"
        else:
            text = str(error["msg"]).removeprefix("Value error, ")
        errors.append(FieldError(field, f"{field}: {text}"))
    return errors


async def read_json(request: web.Request) -> Any:
    """The body as JSON, or 415 (not JSON) / 400 (malformed) / 413 (too large)."""
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise ApiProblem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"Send the body as application/json, not {request.content_type}.",
        )
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise bad_request("body", f"body: not valid JSON ({exc})") from exc
