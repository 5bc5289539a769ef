"""The manifest: a template's named parameters, their types and bounds, and where they bind.

A manifest is JSON on disk next to its graph (``<name>.manifest.json`` beside
``<name>.json``). The models here validate the manifest on its own; the checks that need
the graph (does the bound node exist, is the input a literal) live in ``template.py``.

:meth:`Parameter.check` is the one place a value is judged against a parameter: admission
uses it for users' values and the manifest uses it for its own defaults, so both say the
same thing in the same words.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

Scalar = str | int | float | bool
"""What a parameter resolves to, and what binding writes into a graph."""

ParamType = Literal["string", "int", "float", "choice", "bool", "image"]

WORKFLOW_NAME = r"^[a-z0-9][a-z0-9-]{0,63}$"
PARAM_NAME = r"^[a-z][a-z0-9_]{0,31}$"

INPUT_IMAGE_KEY = re.compile(
    r"(?:(?!\.\.?/)[A-Za-z0-9._-]{1,64}/){0,8}inputs/[0-9a-f]{64}\.(?:png|jpg|webp)"
)
"""The value of an ``image`` parameter: the key of an input image a frontend stored,
``<prefix>/inputs/<sha256 of the bytes>.<png|jpg|webp>`` (``storage.inputs``). Nothing
else, so a job can never name a path, a URL or another job's objects; the store checks
the prefix itself when the renderer reads the key."""

# Newline and tab are ordinary in prompts; every other C0 control (NUL above all) is
# refused because ComfyUI, PNG text chunks and Discord each mangle them differently.
# Lone surrogates can only arrive through JSON "\ud800" escapes and cannot be encoded
# as UTF-8 later, so they are refused here rather than crash a renderer.
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff]")

_SHOW_LIMIT = 40


def show(value: object) -> str:
    """Render a user's value for an error message: JSON-like, one line, truncated."""
    if isinstance(value, str) and len(value) > _SHOW_LIMIT:
        value = value[:_SHOW_LIMIT]
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):  # an int past Python's digit limit, deep nesting
            text = f"<{type(value).__name__}>"
    # Lone surrogates would make the message itself unencodable.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 1] + "…"


def _number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Binding(_Model):
    """One place a parameter's value goes: the literal input ``input`` of graph node ``node``."""

    node: str = Field(min_length=1)
    input: str = Field(min_length=1)


class Parameter(_Model):
    """A named, typed value a job may set, with its bounds, default and bindings.

    ``default`` is what an absent value becomes. A parameter is either ``required``, or
    has a ``default``, or (an int such as ``seed``) is ``random``: absent, it is drawn.
    An ``image`` parameter has no default: optional and absent, the graph keeps its own
    literal (the resolved parameters leave it out).
    """

    type: ParamType
    """``image``: an input image (see :data:`INPUT_IMAGE_KEY`), bound to a ``LoadImage``
    node's ``image`` input; the renderer uploads it and binds the backend's file name."""
    description: str = ""
    required: StrictBool = False
    default: StrictBool | StrictInt | StrictFloat | StrictStr | None = None
    min: StrictInt | StrictFloat | None = None
    max: StrictInt | StrictFloat | None = None
    multiple_of: Annotated[StrictInt, Field(gt=0)] | None = None
    max_length: Annotated[StrictInt, Field(gt=0)] | None = None
    choices: list[StrictStr] | None = None
    bind: list[Binding] = Field(min_length=1)
    random: StrictBool = False
    #: For a model file (a checkpoint, a LoRA, ...): the ComfyUI models folder it is read
    #: from (``checkpoints``, ``loras``, ``controlnet``, ``upscale_models``, ...). A
    #: tenant's ``models`` allow-list applies to these parameters.
    folder: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")] | None = None

    @model_validator(mode="before")
    @classmethod
    def _float_default(cls, data: Any) -> Any:
        # JSON writes 7.0 as 7 often enough; a float parameter's default is still a float.
        if (
            isinstance(data, dict)
            and data.get("type") == "float"
            and type(data.get("default")) is int
        ):
            return {**data, "default": float(data["default"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Parameter:
        problem = self._shape_problem()
        if problem is None and self.default is not None:
            value_problem = self.check(self.default)
            if value_problem is not None:
                problem = f"default {value_problem} (allowed: {self.allowed()})"
        if problem is not None:
            raise ValueError(problem)
        return self

    def _shape_problem(self) -> str | None:
        numeric = self.type in ("int", "float")
        misplaced = [
            key
            for key, applies in (
                ("min", numeric),
                ("max", numeric),
                ("multiple_of", self.type == "int"),
                ("max_length", self.type == "string"),
                ("choices", self.type == "choice"),
                ("folder", self.type in ("string", "choice")),
            )
            if getattr(self, key) is not None and not applies
        ]
        if self.random and self.type != "int":
            misplaced.append("random")
        if misplaced:
            return f"{', '.join(misplaced)} does not apply to a {self.type} parameter"
        if self.type == "int":
            for key in ("min", "max"):
                if isinstance(getattr(self, key), float):
                    return f"{key} must be a whole number for an int parameter"
        if self.min is not None and self.max is not None and self.min > self.max:
            return f"min {_number(self.min)} is greater than max {_number(self.max)}"
        for key in ("min", "max"):
            bound = getattr(self, key)
            if isinstance(bound, float) and not math.isfinite(bound):
                return f"{key} must be a finite number"
        if self.type == "string" and self.max_length is None:
            return "a string parameter needs max_length"
        if self.type == "choice":
            if not self.choices:
                return "a choice parameter needs a non-empty list of choices"
            if len(set(self.choices)) != len(self.choices):
                return "choices are not unique"
        if self.type == "image" and self.default is not None:
            return (
                "an image parameter cannot have a default;"
                " make it optional to keep the graph's own image"
            )
        if self.required and self.default is not None:
            return "a required parameter cannot have a default"
        if self.required and self.random:
            return "a random parameter cannot be required"
        if not self.required and not self.random and self.default is None and self.type != "image":
            return "needs a default (or required: true, or random: true)"
        bound_to = [(b.node, b.input) for b in self.bind]
        if len(set(bound_to)) != len(bound_to):
            return "binds the same node input twice"
        return None

    def allowed(self) -> str:
        """Say in words which values this parameter accepts, for error messages and help."""
        if self.type == "string":
            return f"at most {self.max_length} characters"
        if self.type == "choice":
            return ", ".join(self.choices or ())
        if self.type == "bool":
            return "true or false"
        if self.type == "image":
            return "an image uploaded with the job (PNG, JPEG or WebP)"
        if self.min is not None and self.max is not None:
            text = f"{_number(self.min)} to {_number(self.max)}"
        elif self.min is not None:
            text = f"at least {_number(self.min)}"
        elif self.max is not None:
            text = f"at most {_number(self.max)}"
        else:
            text = "any whole number" if self.type == "int" else "any number"
        if self.multiple_of is not None:
            text += f", a multiple of {self.multiple_of}"
        return text

    def check(self, value: object) -> str | None:
        """Say what is wrong with ``value`` for this parameter, or None when it fits.

        The answer starts with the value (truncated) or its length, e.g.
        ``513 is not a multiple of 8``; callers prefix the field name and append
        :meth:`allowed`. Types are strict: a bool is not an int, a list is not text.
        """
        if self.type in ("string", "choice"):
            if not isinstance(value, str):
                return f"{show(value)} must be text"
            if self.type == "choice":
                return None if value in (self.choices or ()) else f"{show(value)} is not allowed"
            if self.max_length is not None and len(value) > self.max_length:
                return f"{len(value)} characters is too long"
            bad = _FORBIDDEN.search(value)
            if bad is not None:
                code = f"U+{ord(bad.group()):04X}"
                what = (
                    "an unpaired surrogate" if ord(bad.group()) >= 0xD800 else "a control character"
                )
                return (
                    f"contains {what} ({code}) at character {bad.start() + 1};"
                    " only newline and tab are allowed"
                )
            return None
        if self.type == "bool":
            return None if isinstance(value, bool) else f"{show(value)} must be true or false"
        if self.type == "image":
            if isinstance(value, str) and INPUT_IMAGE_KEY.fullmatch(value) is not None:
                return None
            return f"{show(value)} is not the key of a stored input image"
        if self.type == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{show(value)} must be a whole number"
        elif isinstance(value, bool) or not isinstance(value, int | float):
            return f"{show(value)} must be a number"
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{show(value)} must be a finite number"
        elif abs(value) > sys.float_info.max:
            return f"{show(value)} is too large for a number"
        if self.min is not None and value < self.min:
            return f"{show(value)} is below the minimum"
        if self.max is not None and value > self.max:
            return f"{show(value)} is above the maximum"
        if self.multiple_of is not None and value % self.multiple_of != 0:
            return f"{show(value)} is not a multiple of {self.multiple_of}"
        return None

    def coerce(self, value: Scalar) -> Scalar:
        """Return a checked value in this parameter's own type (an int given for a float)."""
        if self.type == "float" and not isinstance(value, float):
            return float(value)
        return value


class Manifest(_Model):
    """A template's manifest: its name, where its graph is, and its parameters."""

    schema_version: Literal[1]
    name: Annotated[str, Field(pattern=WORKFLOW_NAME)]
    title: str = Field(min_length=1)
    description: str = ""
    graph: str = Field(min_length=1)
    backends: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    params: dict[Annotated[str, Field(pattern=PARAM_NAME)], Parameter]
    outputs: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    lanes: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)

    @field_validator("graph")
    @classmethod
    def _relative(cls, graph: str) -> str:
        for flavour in (PurePosixPath(graph), PureWindowsPath(graph)):
            if flavour.is_absolute() or flavour.anchor or ".." in flavour.parts:
                raise ValueError(f"{graph!r} must be a path relative to the manifest, inside it")
        return graph

    @field_validator("backends", "outputs", "lanes")
    @classmethod
    def _unique(cls, items: list[str] | None) -> list[str] | None:
        if items is not None and len(set(items)) != len(items):
            raise ValueError("entries are not unique")
        return items

    @model_validator(mode="after")
    def _one_role_per_input(self) -> Manifest:
        owner: dict[tuple[str, str], str] = {}
        for name, param in self.params.items():
            for binding in param.bind:
                key = (binding.node, binding.input)
                if key in owner and owner[key] != name:
                    raise ValueError(
                        f'parameters "{owner[key]}" and "{name}" both bind node'
                        f' "{binding.node}" input "{binding.input}"'
                    )
                owner[key] = name
        return self
