"""The OpenAPI 3.1 document (``GET /openapi.json``), generated from the pydantic models
the handlers answer with (``api.models``) and take (``jobs.models.JobRequest``): the
schemas cannot drift from the code. OpenAPI 3.1 speaks JSON Schema 2020-12, which is
what pydantic writes, so the schemas go in as they are.

CI runs schemathesis against a running API with this document (``tests/test_api_schema.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.jobs import IDEMPOTENCY_KEY, MAX_LIST
from api.models import (
    Health,
    InputImageView,
    JobList,
    JobTicket,
    JobView,
    KeyCreated,
    KeyList,
    KeyRequest,
    KeyView,
    Problem,
    Queue,
    QuotaChange,
    QuotaUsage,
    TenantQuota,
    WorkerList,
    WorkflowList,
)
from api.problems import PROBLEM_JSON
from jobs.models import JobRequest, JobStatus

_REF = "#/components/schemas/{model}"

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (JobRequest, "validation"),
    (KeyRequest, "validation"),
    (QuotaChange, "validation"),
    (JobTicket, "serialization"),
    (JobView, "serialization"),
    (JobList, "serialization"),
    (WorkflowList, "serialization"),
    (Queue, "serialization"),
    (WorkerList, "serialization"),
    (QuotaUsage, "serialization"),
    (Health, "serialization"),
    (InputImageView, "serialization"),
    (KeyCreated, "serialization"),
    (KeyView, "serialization"),
    (KeyList, "serialization"),
    (TenantQuota, "serialization"),
    (Problem, "serialization"),
]

_PROBLEMS = {
    400: "Malformed: a missing or bad header, or a body that is not JSON",
    401: "No API key, or an unknown or revoked one",
    403: "This key may not use this route",
    404: "No such job (or not this tenant's)",
    409: "The job has already finished",
    413: "The body is larger than API_MAX_BODY_BYTES",
    415: "The body is not JSON",
    422: "Invalid fields: `errors` names each field and what is allowed",
    429: "A quota limit is reached: `limit` names it; `Retry-After` when it frees up",
    503: "The broker (or another service) is unavailable; retry after `Retry-After`",
}


def _ref(model: type[BaseModel], names: Mapping[Any, dict[str, Any]]) -> dict[str, Any]:
    mode: JsonSchemaMode = "validation" if (model, "validation") in names else "serialization"
    return names[(model, mode)]


def document(*, images: bool = False, status_page: bool = False) -> dict[str, Any]:
    """The OpenAPI document; ``images`` and ``status_page`` add those routes when served."""
    names, top = models_json_schema(_MODELS, ref_template=_REF)

    def body(model: type[BaseModel], media: str = "application/json") -> dict[str, Any]:
        return {"content": {media: {"schema": _ref(model, names)}}}

    def answer(
        description: str, model: type[BaseModel] | None = None, **headers: str
    ) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description}
        if model is not None:
            response.update(body(model))
        if headers:
            response["headers"] = {
                name.replace("_", "-"): {"description": text, "schema": {"type": "string"}}
                for name, text in headers.items()
            }
        return response

    def problems(*codes: int) -> dict[str, Any]:
        out = {}
        for code in codes:
            headers = {}
            if code in (429, 503):
                headers["Retry-After"] = {
                    "description": "Seconds to wait before trying again",
                    "schema": {"type": "string"},
                }
            out[str(code)] = {
                "description": _PROBLEMS[code],
                "content": {PROBLEM_JSON: {"schema": _ref(Problem, names)}},
                **({"headers": headers} if headers else {}),
            }
        return out

    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": "The job id (a UUID) the submit answered.",
    }
    tenant = {
        "name": "tenant",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    tenant_auth: list[dict[str, list[str]]] = [{"apiKey": []}]
    admin_auth: list[dict[str, list[str]]] = [{"adminKey": []}]
    auth_problems = problems(401, 403)

    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "operationId": "submitJob",
                "summary": "Submit a job",
                "description": (
                    "Validates the request against the workflow's parameters and the "
                    "tenant's quota, records it, and queues it. The `Idempotency-Key` "
                    "header is required: the same key returns the same job (`200`, "
                    "`Idempotent-Replayed: true`); the same key with another body is `422`."
                ),
                "security": tenant_auth,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY.pattern},
                        "description": "A new unique value (a UUID) per job; the same on retries.",
                    }
                ],
                "requestBody": {"required": True, **body(JobRequest)},
                "responses": {
                    "202": answer("Admitted and queued", JobTicket, Location="The job's URL"),
                    "200": answer(
                        "Admitted before under this Idempotency-Key: the same job",
                        JobTicket,
                        Location="The job's URL",
                        Idempotent_Replayed="`true`",
                    ),
                    **problems(400, 413, 415, 422, 429, 503),
                    **auth_problems,
                },
            },
            "get": {
                "operationId": "listJobs",
                "summary": "This tenant's jobs, newest first",
                "security": tenant_auth,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
                    },
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": [s.value for s in JobStatus]},
                    },
                ],
                "responses": {"200": answer("Jobs", JobList), **problems(422), **auth_problems},
            },
        },
        "/v1/jobs/{job_id}": {
            "get": {
                "operationId": "getJob",
                "summary": "A job: status, position while queued, outputs, failure",
                "security": tenant_auth,
                "parameters": [job_id],
                "responses": {"200": answer("The job", JobView), **problems(404), **auth_problems},
            },
            "delete": {
                "operationId": "cancelJob",
                "summary": "Cancel a job, queued or rendering",
                "security": tenant_auth,
                "parameters": [job_id],
                "responses": {
                    "200": answer("Cancelled: the job, now failed (cancelled)", JobView),
                    **problems(404, 409, 503),
                    **auth_problems,
                },
            },
        },
        "/v1/jobs/{job_id}/events": {
            "get": {
                "operationId": "jobEvents",
                "summary": "The job's events as Server-Sent Events, until its end",
                "description": (
                    "`state`, then `position` while queued, `accepted`, `progress`, "
                    "`preview` (a data: URL), then one `succeeded` or `failed`; comments "
                    "as heartbeats. `Last-Event-ID` skips what was seen; `end` gets `204`."
                ),
                "security": tenant_auth,
                "parameters": [
                    job_id,
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "The stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "204": {"description": "Last-Event-ID was `end`: nothing more to send"},
                    **problems(404),
                    **auth_problems,
                },
            }
        },
        "/v1/inputs": {
            "post": {
                "operationId": "uploadInput",
                "summary": "Upload an input image for a workflow's image parameter",
                "description": (
                    "The body is a PNG, JPEG or WebP image (or multipart/form-data with "
                    "the file in `image`), at most `INPUT_IMAGE_MAX_BYTES` and "
                    "`INPUT_IMAGE_MAX_PIXELS`; it is decoded to prove it is one. The answer's "
                    "`key` goes in a job's `params` under the image parameter. No URLs."
                ),
                "security": tenant_auth,
                "requestBody": {
                    "required": True,
                    "content": {
                        **{
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in ("image/png", "image/jpeg", "image/webp")
                        },
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {"image": {"type": "string", "format": "binary"}},
                                "required": ["image"],
                            }
                        },
                    },
                },
                "responses": {
                    "201": answer("Stored: its key", InputImageView),
                    **problems(400, 413, 415, 422, 503),
                    **auth_problems,
                },
            }
        },
        "/v1/workflows": {
            "get": {
                "operationId": "listWorkflows",
                "summary": "Workflows and their parameters, with bounds",
                "security": tenant_auth,
                "responses": {"200": answer("Workflows", WorkflowList), **auth_problems},
            }
        },
        "/v1/queue": {
            "get": {
                "operationId": "getQueue",
                "summary": "Depth per lane (the broker); jobs queued and running (the ledger)",
                "security": tenant_auth,
                "responses": {"200": answer("Lanes", Queue), **problems(503), **auth_problems},
            }
        },
        "/v1/workers": {
            "get": {
                "operationId": "listWorkers",
                "summary": "Renderers heard from recently: GPU, VRAM, current job",
                "security": tenant_auth,
                "responses": {"200": answer("Workers", WorkerList), **auth_problems},
            }
        },
        "/v1/quota": {
            "get": {
                "operationId": "getQuota",
                "summary": "This tenant's limits and this key's use of them today",
                "security": tenant_auth,
                "responses": {"200": answer("Quota", QuotaUsage), **auth_problems},
            }
        },
        "/v1/admin/keys": {
            "post": {
                "operationId": "createKey",
                "summary": "Create an API key for a tenant (shown once)",
                "security": admin_auth,
                "requestBody": {"required": True, **body(KeyRequest)},
                "responses": {
                    "201": answer("The key", KeyCreated, Location="The key's URL"),
                    **problems(400, 413, 415, 422),
                    **auth_problems,
                },
            },
            "get": {
                "operationId": "listKeys",
                "summary": "API keys (never the keys themselves)",
                "security": admin_auth,
                "parameters": [{"name": "tenant", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": answer("Keys", KeyList), **auth_problems},
            },
        },
        "/v1/admin/keys/{key_id}": {
            "delete": {
                "operationId": "revokeKey",
                "summary": "Revoke an API key, at once",
                "security": admin_auth,
                "parameters": [
                    {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": answer("The revoked key", KeyView),
                    **problems(404),
                    **auth_problems,
                },
            }
        },
        "/v1/admin/tenants/{tenant}/quota": {
            "get": {
                "operationId": "getTenantQuota",
                "summary": "A tenant's limits",
                "security": admin_auth,
                "parameters": [tenant],
                "responses": {
                    "200": answer("Limits", TenantQuota),
                    **problems(422),
                    **auth_problems,
                },
            },
            "patch": {
                "operationId": "setTenantQuota",
                "summary": "Change some of a tenant's limits (`null`: no limit)",
                "security": admin_auth,
                "parameters": [tenant],
                "requestBody": {"required": True, **body(QuotaChange)},
                "responses": {
                    "200": answer("Limits", TenantQuota),
                    **problems(400, 413, 415, 422),
                    **auth_problems,
                },
            },
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "The process answers",
                "security": [],
                "responses": {"200": answer("Up", Health)},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "The broker, the ledger and the store answer",
                "security": [],
                "responses": {
                    "200": answer("Ready", Health),
                    "503": answer("Not ready: `checks` says what failed", Health),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }
    if images:
        paths["/images/{key}"] = {
            "get": {
                "operationId": "getImage",
                "summary": "An image of the local store (embedded mode); `key` may hold `/`",
                "security": [],
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The PNG",
                        "content": {"image/png": {"schema": {"type": "string"}}},
                    },
                    **problems(404),
                },
            }
        }
    if status_page:
        paths["/"] = {
            "get": {
                "operationId": "statusPage",
                "summary": "The status page (API_STATUS_PAGE)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Brigade API",
            "version": "1",
            "description": (
                "Submit image jobs to Brigade's renderers and follow them. Every `/v1/` "
                "route takes `Authorization: Bearer <key>`; errors are RFC 9457 problem "
                "details. See docs/api.md."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key (`brg_...`)",
                },
                "adminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "API_ADMIN_KEY",
                },
            },
        },
    }
