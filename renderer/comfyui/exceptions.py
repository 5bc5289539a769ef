"""What every ComfyUI answer means, decided here and nowhere else.

Each error the ComfyUI client raises is already a :class:`renderer.exceptions.RenderError`,
so the worker's ``classify()`` reads its reason, whether it is transient, and a message
safe to show a user (no traceback, no server paths). What each answer becomes:

* connection refused or reset, a timeout, HTTP 5xx, 408 or 429, the WebSocket gone for
  good → :class:`ComfyUIUnavailable` (``backend_down``, transient);
* HTTP 400 from ``POST /prompt`` with ``error``/``node_errors`` → :class:`PromptRejected`
  (``invalid``, permanent), its message naming each node and input;
* any other 4xx, or a body ComfyUI would not send → :class:`UnexpectedResponse`
  (``internal``, transient);
* ``execution_error`` with an OOM marker in its type or message → :class:`GPUOutOfMemory`
  (``oom``, transient; the backend frees memory and retries once itself, and a second
  OOM becomes :class:`renderer.exceptions.OutOfMemoryExhausted`, permanent);
* ``execution_error`` raised by the node's environment (network, timeout, a CUDA
  fault) → :class:`ExecutionGlitch` (``internal``, transient);
* any other ``execution_error`` → :class:`ExecutionFailed` (``internal``, permanent);
* ``execution_interrupted`` (our cancel, or anyone's ``/interrupt``) →
  :class:`PromptInterrupted` (``cancelled``, permanent);
* no progress nor node change for the stall limit → :class:`PromptStalled` (``timeout``,
  transient), after interrupting the prompt;
* after a reconnect, the prompt in neither history nor queue (ComfyUI restarted) →
  :class:`PromptLost` (``backend_down``, transient).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from renderer.exceptions import (
    BackendUnavailable,
    InvalidWorkflow,
    OutOfMemory,
    PermanentRenderError,
    RenderCancelled,
    RenderError,
    RenderTimeout,
    TransientRenderError,
)

#: Substrings of an ``execution_error``'s type or message that mean the device ran out
#: of memory (torch's ``OutOfMemoryError``, CUDA's allocator, ComfyUI's own wording).
OOM_MARKERS = ("outofmemoryerror", "cuda out of memory", "allocation on device", "out of memory")
#: Exception classes (last dotted part) raised by a node's environment rather than by the
#: job: another attempt, perhaps on another worker, may well succeed.
TRANSIENT_EXCEPTIONS = frozenset(
    {
        "BrokenPipeError",
        "ConnectTimeout",
        "ConnectionAbortedError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ReadTimeout",
        "TimeoutError",
    }
)
#: Message substrings that mean the GPU itself faulted (the next job may find it reset).
TRANSIENT_MARKERS = ("cuda error", "cudnn_status", "cublas_status")

OOM_MESSAGE = "The image was too large for this GPU's memory. Try a smaller size or fewer images."
UNAVAILABLE_MESSAGE = "The image server could not be reached."

# A path-like token: starts a word with `/`, `\` or a drive letter and has a separator.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s\\/'\"]+)+")
_NODE_ID_IN_DETAILS = re.compile(r"Node ID '#([^']+)'")
_FILE_NAME = re.compile(r"\.[A-Za-z0-9]{1,12}$")
_SHOWN_NODE_ERRORS = 3
_SHOWN_VALUE_CHARS = 60


class ComfyUIUnavailable(BackendUnavailable):
    """ComfyUI did not answer: refused, reset, timed out, 5xx, or the socket stayed down."""

    def __init__(self, detail: str) -> None:
        super().__init__(UNAVAILABLE_MESSAGE, detail=detail)


class PromptLost(BackendUnavailable):
    """After a reconnect ComfyUI knew nothing of the prompt: it restarted and lost it."""

    def __init__(self, prompt_id: str) -> None:
        super().__init__(
            "The image server restarted during the render.",
            detail=f"prompt {prompt_id} is in neither ComfyUI's history nor its queue",
        )
        self.prompt_id = prompt_id


class UnexpectedResponse(TransientRenderError):
    """An answer this client does not understand (an odd status or body)."""

    def __init__(self, detail: str) -> None:
        super().__init__("The image server gave an unexpected answer.", detail=detail)


class PromptRejected(InvalidWorkflow):
    """``POST /prompt`` answered 400: the graph failed ComfyUI's validation."""

    def __init__(
        self, user_message: str, *, error_type: str, node_errors: Mapping[str, Any]
    ) -> None:
        super().__init__(user_message, detail=f"{error_type}: {user_message}")
        self.error_type = error_type
        self.node_errors = dict(node_errors)


class NodeExecutionError(RenderError):
    """Fields every ``execution_error`` carries, whatever it was classified as."""

    def __init__(
        self,
        user_message: str,
        *,
        detail: str,
        node_id: str | None,
        node_type: str | None,
        exception_type: str,
    ) -> None:
        super().__init__(user_message, detail=detail)
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type


class GPUOutOfMemory(NodeExecutionError, OutOfMemory):
    """A node ran out of device memory."""


class ExecutionGlitch(NodeExecutionError, TransientRenderError):
    """A node failed for a reason outside the job (network, timeout, a GPU fault)."""


class ExecutionFailed(NodeExecutionError, PermanentRenderError):
    """A node failed in a way another attempt would repeat."""


class PromptInterrupted(RenderCancelled):
    """ComfyUI interrupted the prompt: our cancel, or someone's ``/interrupt``."""

    def __init__(self, prompt_id: str, *, requested: bool) -> None:
        super().__init__(
            "The job was cancelled." if requested else "The render was interrupted on the server.",
            detail=f"prompt {prompt_id} interrupted ({'by us' if requested else 'not by us'})",
        )
        self.prompt_id = prompt_id
        self.requested = requested


class PromptStalled(RenderTimeout):
    """No progress nor node change for the stall limit: interrupted, worth another try."""

    def __init__(self, prompt_id: str, seconds: float, node: str | None) -> None:
        where = f" in {node}" if node else ""
        super().__init__(
            f"The render stopped making progress{where}.",
            detail=f"prompt {prompt_id}: nothing for {seconds:g}s{where}",
        )
        self.prompt_id = prompt_id


def for_status(status: int, method: str, path: str, body: str) -> RenderError:
    """The error for an HTTP status this client did not expect (``PromptRejected`` is
    built by :func:`rejection`, which needs the graph)."""
    detail = f"{method} {path} answered {status}: {safe_text(body, limit=200) or 'no body'}"
    if status >= 500 or status in (408, 429):
        return ComfyUIUnavailable(detail)
    return UnexpectedResponse(detail)


def rejection(body: object, graph: Mapping[str, Any]) -> PromptRejected | None:
    """The :class:`PromptRejected` a 400 body from ``POST /prompt`` means, or ``None`` when
    the body is not ComfyUI's validation answer.

    The message names each failing node (id, ``_meta.title`` and class) and its input, e.g.
    ``Node 4 (Load Checkpoint, CheckpointLoaderSimple): ckpt_name "x.safetensors" is not
    in the list of files on this server``.
    """
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    node_errors = body.get("node_errors")
    if not isinstance(node_errors, Mapping):
        node_errors = {}
    if not isinstance(error, Mapping) and not node_errors:
        return None
    error = error if isinstance(error, Mapping) else {}
    error_type = str(error.get("type") or "invalid_prompt")
    parts: list[str] = []
    for node_id, entry in node_errors.items():
        if not isinstance(entry, Mapping):
            continue
        label = node_label(str(node_id), graph, _text(entry.get("class_type")))
        errors = entry.get("errors")
        for item in errors if isinstance(errors, list) else []:
            if isinstance(item, Mapping):
                parts.append(f"{label}: {_describe_node_error(item)}")
    if parts:
        message = "; ".join(parts[:_SHOWN_NODE_ERRORS])
        if len(parts) > _SHOWN_NODE_ERRORS:
            message += f" (and {len(parts) - _SHOWN_NODE_ERRORS} more)"
    else:
        text = safe_text(str(error.get("message") or "")) or "The workflow is invalid."
        details = str(error.get("details") or "")
        found = _NODE_ID_IN_DETAILS.search(details)
        if found is not None:
            message = f"{node_label(found.group(1), graph)}: {text}"
        elif details and details != error.get("message") and (shown := safe_text(details)):
            message = f"{text} ({shown})"
        else:
            message = text
    return PromptRejected(message, error_type=error_type, node_errors=node_errors)


def _describe_node_error(error: Mapping[str, Any]) -> str:
    kind = error.get("type")
    extra = error.get("extra_info")
    extra = extra if isinstance(extra, Mapping) else {}
    name = _text(extra.get("input_name")) or _text(error.get("details")) or "an input"
    received = extra.get("received_value")
    config = extra.get("input_config")
    options: Mapping[str, Any] = {}
    input_type: object = None
    if isinstance(config, list) and config:
        input_type = config[0]
        if len(config) > 1 and isinstance(config[1], Mapping):
            options = config[1]
    if kind == "value_not_in_list":
        files = _looks_like_file(received) or (
            isinstance(input_type, list) and any(_looks_like_file(v) for v in input_type[:5])
        )
        where = "in the list of files on this server" if files else "one of the allowed values"
        return f"{name} {_show(received)} is not {where}"
    if kind == "value_bigger_than_max":
        limit = options.get("max")
        return f"{name} {_show(received)} is above the maximum" + (
            f" of {limit}" if limit is not None else ""
        )
    if kind == "value_smaller_than_min":
        limit = options.get("min")
        return f"{name} {_show(received)} is below the minimum" + (
            f" of {limit}" if limit is not None else ""
        )
    if kind == "required_input_missing":
        return f"{name} is missing"
    if kind == "invalid_input_type":
        wanted = f"a valid {input_type}" if isinstance(input_type, str) else "of the right type"
        return f"{name} {_show(received)} is not {wanted}"
    if kind == "return_type_mismatch":
        return f"{name} is connected to an output of the wrong type"
    if kind in ("exception_during_inner_validation", "exception_during_validation"):
        if extra.get("exception_type") == "KeyError":
            missing = str(extra.get("exception_message") or "").strip("'\"")
            if missing.isalnum():
                return f"{name} is linked to node {missing}, which is not in the workflow"
        return f"{name} could not be validated"
    message = safe_text(str(error.get("message") or "")) or "is invalid"
    return f"{name}: {message}"


def execution_failure(data: Mapping[str, Any], graph: Mapping[str, Any]) -> NodeExecutionError:
    """The error an ``execution_error`` frame (or history message) means."""
    exception_type = str(data.get("exception_type") or "")
    exception_message = str(data.get("exception_message") or "")
    node_id = _text(data.get("node_id"))
    node_type = _text(data.get("node_type"))
    where = node_label(node_id, graph, node_type) if node_id else "a node"
    short_type = exception_type.rsplit(".", 1)[-1] or "Error"
    detail = f"{where}: {exception_type}: {safe_text(exception_message, limit=500)}"
    fields: dict[str, Any] = {
        "detail": detail,
        "node_id": node_id,
        "node_type": node_type,
        "exception_type": exception_type,
    }
    haystack = f"{exception_type}\n{exception_message}".lower()
    if any(marker in haystack for marker in OOM_MARKERS):
        return GPUOutOfMemory(OOM_MESSAGE, **fields)
    said = safe_text(exception_message)
    message = f"The render failed in {where}: {short_type}" + (f": {said}" if said else "")
    if short_type in TRANSIENT_EXCEPTIONS or any(m in haystack for m in TRANSIENT_MARKERS):
        return ExecutionGlitch(message, **fields)
    return ExecutionFailed(message, **fields)


def node_label(node_id: str, graph: Mapping[str, Any], class_type: str | None = None) -> str:
    """``Node 4 (Load Checkpoint, CheckpointLoaderSimple)``: the id, the title when the graph
    has one that differs from the class, and the class."""
    node = graph.get(node_id)
    title: str | None = None
    if isinstance(node, Mapping):
        class_type = class_type or _text(node.get("class_type"))
        meta = node.get("_meta")
        if isinstance(meta, Mapping):
            title = _text(meta.get("title"))
    names = [name for name in (title, class_type) if name]
    if len(names) == 2 and names[0] == names[1]:
        names = names[:1]
    return f"Node {node_id} ({', '.join(names)})" if names else f"Node {node_id}"


def safe_text(text: str, *, limit: int = 160) -> str:
    """The first line of ``text`` with server paths blanked and the length capped: what a
    user may see of a server's own message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = _PATH.sub("<path>", lines[0])
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _looks_like_file(value: object) -> bool:
    return isinstance(value, str) and bool(_FILE_NAME.search(value))


def _show(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = safe_text(text, limit=_SHOWN_VALUE_CHARS)
    return f'"{text}"' if isinstance(value, str) else text


def _text(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) and value else None
