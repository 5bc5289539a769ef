"""Propose a manifest for a graph exported with ComfyUI's Save (API): ``brigade workflows add``.

The proposal comes from reading the graph, not from guessing at names: the text encoders
that a sampler's ``positive`` and ``negative`` inputs lead back to (through ControlNet
and conditioning nodes) become ``prompt`` and ``negative``; the sampler's seed, steps,
cfg and denoise, the empty latent's size and batch, the checkpoint, LoRA, ControlNet
and upscale-model loaders become parameters with bounds and the graph's own values as
defaults; every ``LoadImage`` becomes an image input. A title given to a node
(``_meta.title``) names what it binds, and a title ``fixed`` or ``fixed: ...`` keeps the
node out of the manifest. ``docs/workflows.md`` states every rule for users.

:func:`propose` is pure (a graph in, a :class:`Proposal` out) and raises
:class:`ImportRefused`, naming the node, for a graph Brigade could not run. :func:`add`
is what the command does with files: read the graph, write ``<name>.manifest.json``
next to it, and load the result back with :meth:`Template.load`.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workflows.exceptions import WorkflowError
from workflows.manifest import PARAM_NAME, WORKFLOW_NAME, Parameter, show
from workflows.template import MAX_RANDOM_SEED, Template, _is_link


class ImportRefused(WorkflowError):
    """The graph cannot become a template; the message says why and names the node."""


# -- what Brigade knows about core node classes -----------------------------------------

#: Output nodes whose images ComfyUI writes as ``output`` files: the job's results.
IMAGE_OUTPUTS = frozenset({"SaveImage", "SaveAnimatedWEBP", "SaveAnimatedPNG"})
#: Other output nodes: ComfyUI runs what leads to them, but Brigade stores none of their
#: files (``PreviewImage`` writes temporary files; the rest are not images).
OTHER_OUTPUTS = frozenset(
    {"PreviewImage", "SaveLatent", "SaveVideo", "SaveWEBM", "SaveAudio", "SaveGLB"}
)

_SAMPLERS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
_LATENTS = frozenset({"EmptyLatentImage", "EmptySD3LatentImage"})
#: Text encoders and their text inputs (several for the dual-encoder models).
_ENCODERS: dict[str, tuple[str, ...]] = {
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeSDXL": ("text_g", "text_l"),
    "CLIPTextEncodeSDXLRefiner": ("text",),
    "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl"),
    "CLIPTextEncodeFlux": ("clip_l", "t5xxl"),
}
#: Nodes a conditioning passes through on its way to a sampler: for each of the node's
#: outputs (by index), the inputs that conditioning came from.
_CONDITIONING: dict[str, tuple[tuple[str, ...], ...]] = {
    "ControlNetApply": (("conditioning",),),
    "ControlNetApplyAdvanced": (("positive",), ("negative",)),
    "ControlNetApplySD3": (("positive",), ("negative",)),
    "ConditioningCombine": (("conditioning_1", "conditioning_2"),),
    "ConditioningConcat": (("conditioning_to", "conditioning_from"),),
    "ConditioningAverage": (("conditioning_to", "conditioning_from"),),
    "ConditioningSetArea": (("conditioning",),),
    "ConditioningSetAreaPercentage": (("conditioning",),),
    "ConditioningSetAreaStrength": (("conditioning",),),
    "ConditioningSetMask": (("conditioning",),),
    "ConditioningSetTimestepRange": (("conditioning",),),
    "FluxGuidance": (("conditioning",),),
    "unCLIPConditioning": (("conditioning",),),
    "InpaintModelConditioning": (("positive",), ("negative",)),
    "InstructPixToPixConditioning": (("positive",), ("negative",)),
}
#: A conditioning through these no longer depends on its text (e.g. a zeroed negative).
_CONDITIONING_ENDS = frozenset({"ConditioningZeroOut"})
_LORAS = frozenset({"LoraLoader", "LoraLoaderModelOnly"})
_CONTROLNET_APPLY = frozenset({"ControlNetApply", "ControlNetApplyAdvanced", "ControlNetApplySD3"})
#: Where an image read by LoadImage is used to start sampling from (img2img, inpainting).
_IMAGE_STARTS = {
    "VAEEncode": "pixels",
    "VAEEncodeForInpaint": "pixels",
    "InpaintModelConditioning": "pixels",
}
_PRIMITIVES = {
    "PrimitiveInt": "int",
    "PrimitiveFloat": "float",
    "PrimitiveString": "string",
    "PrimitiveStringMultiline": "string",
    "PrimitiveBoolean": "bool",
}
#: Titles ComfyUI gives new nodes (display names): not chosen by the user, name nothing.
_DEFAULT_TITLES: dict[str, frozenset[str]] = {
    cls: frozenset(titles)
    for cls, titles in {
        "KSampler": ("KSampler",),
        "KSamplerAdvanced": ("KSampler (Advanced)",),
        "CheckpointLoaderSimple": ("Load Checkpoint",),
        "CLIPTextEncode": (
            "CLIP Text Encode (Prompt)",
            "CLIP Text Encode (Positive Prompt)",
            "CLIP Text Encode (Negative Prompt)",
        ),
        "EmptyLatentImage": ("Empty Latent Image",),
        "EmptySD3LatentImage": ("Empty SD3 Latent Image", "EmptySD3LatentImage"),
        "LoraLoader": ("Load LoRA",),
        "LoraLoaderModelOnly": ("Load LoRA", "LoraLoaderModelOnly", "Load LoRA (Model Only)"),
        "ControlNetLoader": ("Load ControlNet Model",),
        "ControlNetApply": ("Apply ControlNet", "Apply ControlNet (OLD)"),
        "ControlNetApplyAdvanced": ("Apply ControlNet", "Apply ControlNet (Advanced)"),
        "ControlNetApplySD3": ("Apply Controlnet with VAE", "Apply ControlNet with VAE"),
        "LoadImage": ("Load Image",),
        "UpscaleModelLoader": ("Load Upscale Model",),
        "PrimitiveInt": ("Int",),
        "PrimitiveFloat": ("Float",),
        "PrimitiveString": ("String",),
        "PrimitiveStringMultiline": ("String (Multiline)",),
        "PrimitiveBoolean": ("Boolean",),
    }.items()
}

#: Titles that name the standard text parameters.
_TEXT_ALIASES = {
    "prompt": "prompt",
    "positive": "prompt",
    "positive_prompt": "prompt",
    "prompt_positive": "prompt",
    "negative": "negative",
    "negative_prompt": "negative",
    "prompt_negative": "negative",
}

_PARAM_NAME = re.compile(PARAM_NAME)
_WORKFLOW_NAME = re.compile(WORKFLOW_NAME)
_NAME_LIMIT = 32


# -- parameter kinds: type, bounds, description ----------------------------------------


@dataclass(frozen=True)
class _Kind:
    type: str
    #: For users (listings, help). ``{of}`` becomes ` of "<title>"` for a titled node.
    description: str
    low: float | None = None
    high: float | None = None
    #: Several places under one name must hold one value (not so for a required text,
    #: an image, or a seed, which the job always sets).
    same_value: bool = True
    #: The ComfyUI models folder of a model file parameter (the manifest's ``folder``).
    folder: str | None = None


_KINDS: dict[str, _Kind] = {
    "prompt": _Kind("string", "What to draw.", same_value=False),
    "negative": _Kind("string", "What to keep out of the image."),
    "text": _Kind("string", "Text{of}."),
    "image": _Kind("image", "An image for the workflow{of}.", same_value=False),
    "seed": _Kind(
        "int",
        "Noise seed{of}; the same seed and settings give the same image."
        " Drawn at random when not given.",
        same_value=False,
    ),
    "steps": _Kind("int", "Sampling steps{of}: more is slower and usually finer.", 1, 150),
    "cfg": _Kind("float", "Classifier-free guidance{of}: how closely to follow the prompt.", 0, 30),
    "denoise": _Kind(
        "float", "How much to repaint{of}: 1 repaints everything, lower keeps more.", 0, 1
    ),
    "width": _Kind("int", "Image width in pixels{of}.", 64, 2048),
    "height": _Kind("int", "Image height in pixels{of}.", 64, 2048),
    "batch": _Kind("int", "Images per job{of}.", 1, 4),
    "checkpoint": _Kind(
        "string",
        "Checkpoint file name{of} as the ComfyUI server lists it (models/checkpoints);"
        " the server refuses a file it does not have.",
        folder="checkpoints",
    ),
    "lora": _Kind(
        "string",
        "LoRA file name{of} as the ComfyUI server lists it (models/loras).",
        folder="loras",
    ),
    "lora_strength": _Kind(
        "float", "How strongly the LoRA{of} applies; negative values invert it.", -2, 2
    ),
    "controlnet": _Kind(
        "string",
        "ControlNet model file name{of} as the ComfyUI server lists it (models/controlnet).",
        folder="controlnet",
    ),
    "controlnet_strength": _Kind(
        "float", "How strongly the ControlNet{of} steers the image.", 0, 2
    ),
    "upscale_model": _Kind(
        "string",
        "Upscale model file name{of} as the ComfyUI server lists it (models/upscale_models).",
        folder="upscale_models",
    ),
    "string": _Kind("string", "Text{of}."),
    "int": _Kind("int", "A whole number{of}."),
    "float": _Kind("float", "A number{of}."),
    "bool": _Kind("bool", "On or off{of}."),
}
#: Descriptions of the images Brigade names by their use.
_IMAGE_USES = {
    "image": "The image to start from.",
    "controlnet_image": "The reference image the ControlNet follows.",
}
#: The order of parameters in the manifest; a LoRA's or ControlNet's file and strength
#: stay together.
_ORDER = {
    kind: rank
    for rank, kinds in enumerate(
        (
            ("prompt",),
            ("negative",),
            ("text",),
            ("image",),
            ("seed",),
            ("steps",),
            ("cfg",),
            ("denoise",),
            ("width",),
            ("height",),
            ("batch",),
            ("checkpoint",),
            ("lora", "lora_strength"),
            ("controlnet", "controlnet_strength"),
            ("upscale_model",),
            ("string", "int", "float", "bool"),
        )
    )
    for kind in kinds
}
#: Standard names a title may give a primitive node (a seed in a ``PrimitiveInt``).
_TITLE_KINDS = frozenset(
    {"prompt", "negative", "seed", "steps", "cfg", "denoise", "width", "height", "batch"}
)
#: Text inputs longer than these defaults get a limit that holds the graph's own text.
_TEXT_LIMITS = {"prompt": 1500, "negative": 1000, "text": 1500, "string": 1500}
_FILE_NAME_LIMIT = 255


# -- the result ------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """One proposed parameter: its manifest entry and, in words, where it binds."""

    name: str
    param: dict[str, Any]
    places: tuple[str, ...]


@dataclass(frozen=True)
class Fixed:
    """A literal left as the graph has it; ``reason`` is empty for plain node settings."""

    node: str
    label: str
    input: str | None
    value: Any
    reason: str = ""


@dataclass(frozen=True)
class Proposal:
    """A proposed manifest (JSON-ready), what it binds, and what it leaves fixed."""

    manifest: dict[str, Any]
    bound: tuple[Bound, ...]
    fixed: tuple[Fixed, ...]
    #: Nodes, in words: those no output needs, and the outputs (the manifest has ids).
    ignored: tuple[str, ...]
    output_labels: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """The proposal for a person: each parameter with its bounds and bindings, then
        what stays as the graph has it and why."""
        lines = [f'workflow "{self.manifest["name"]}" ({", ".join(self.manifest["backends"])})']
        lines.append("bound:")
        width = max((len(b.name) for b in self.bound), default=0)
        for bound in self.bound:
            lines.append(f"  {bound.name:<{width}}  {_summary(bound.param)}")
            lines.extend(f"  {'':<{width}}    -> {place}" for place in bound.places)
        reasoned = [f for f in self.fixed if f.reason]
        settings = [f for f in self.fixed if not f.reason]
        if reasoned or settings:
            lines.append("left fixed:")
        by_reason: dict[str, list[Fixed]] = {}
        for fixed in reasoned:
            by_reason.setdefault(fixed.reason, []).append(fixed)
        for reason, items in by_reason.items():
            places = ", ".join(
                f"{f.label} {f.input} {show(f.value)}" if f.input else f.label for f in items
            )
            lines.append(f"  {places}: {reason}")
        by_node: dict[str, list[Fixed]] = {}
        for fixed in settings:
            by_node.setdefault(fixed.label, []).append(fixed)
        for label, items in by_node.items():
            values = ", ".join(f"{f.input} {show(f.value)}" for f in items)
            lines.append(f"  {label}: {values}")
        lines.append(f"outputs: {', '.join(self.output_labels)}")
        if self.ignored:
            lines.append("not connected to an output, so ComfyUI skips them (nothing bound):")
            lines.extend(f"  {label}" for label in self.ignored)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _summary(param: Mapping[str, Any]) -> str:
    parts = [param["type"]]
    if param.get("required"):
        parts.append("required")
    if param.get("random"):
        parts.append("random")
    if "default" in param:
        parts.append(f"default {show(param['default'])}")
    if "min" in param or "max" in param:
        parts.append(f"{param.get('min')}..{param.get('max')}")
    if "multiple_of" in param:
        parts.append(f"multiple of {param['multiple_of']}")
    if "max_length" in param:
        parts.append(f"at most {param['max_length']} characters")
    return ", ".join(parts)


# -- entry points ----------------------------------------------------------------------


def workflow_name(path: str | Path) -> str:
    """A workflow name from a graph's file name: ``My Portrait_api.json`` -> ``my-portrait``."""
    stem = Path(path).name.removesuffix(".json")
    stem = re.sub(r"[ _.-]api$", "", stem, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", _ascii(stem).lower()).strip("-")
    return slug[:64].rstrip("-") or "workflow"


def add(
    graph_path: Path,
    *,
    name: str | None = None,
    backends: Sequence[str] = ("comfyui",),
    force: bool = False,
) -> tuple[Proposal, Path]:
    """Propose a manifest for the graph at ``graph_path`` and write it next to the graph as
    ``<name>.manifest.json``; return the proposal and the manifest's path.

    Raises :class:`ImportRefused` when the graph cannot be read or run, the name is not a
    workflow name, or the manifest exists and ``force`` is false. The written manifest
    is loaded back with :meth:`Template.load`; if that fails (a bug here), the file is
    removed and the load error raised.
    """
    name = name if name is not None else workflow_name(graph_path)
    if _WORKFLOW_NAME.fullmatch(name) is None:
        raise ImportRefused(
            f'"{name}" is not a workflow name: lowercase letters, digits and "-",'
            " at most 64, starting with a letter or digit"
        )
    target = graph_path.with_name(f"{name}.manifest.json")
    if target.exists() and not force:
        raise ImportRefused(f"{target.name} exists; give --force to replace it, or another --name")
    try:
        graph = json.loads(graph_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ImportRefused("no such file") from exc
    except UnicodeDecodeError as exc:
        raise ImportRefused(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ImportRefused(f"cannot read it: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ImportRefused(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    proposal = propose(graph, name=name, graph_file=graph_path.name, backends=backends)
    try:
        target.write_text(json.dumps(proposal.manifest, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ImportRefused(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        Template.load(target)
    except WorkflowError:
        target.unlink()
        raise
    return proposal, target


def propose(
    graph: object,
    *,
    name: str,
    graph_file: str,
    backends: Sequence[str] = ("comfyui",),
    title: str | None = None,
) -> Proposal:
    """Read an API-format graph and propose its manifest.

    Raises :class:`ImportRefused` for what Brigade cannot run: not an API-format graph
    (the UI format, a /prompt body), a node without a class or inputs, a link to a
    missing node, a cycle, no ``SaveImage`` (or other image-saving output), or no
    place for the prompt every job carries.
    """
    nodes = _checked(graph)
    _refuse_cycles(nodes)
    outputs = [i for i in _sorted(nodes) if nodes[i]["class_type"] in IMAGE_OUTPUTS]
    others = [i for i in _sorted(nodes) if nodes[i]["class_type"] in OTHER_OUTPUTS]
    if not outputs:
        raise ImportRefused(_no_output(nodes, others))
    live = _upstream(nodes, [*outputs, *others])
    reader = _Reader(nodes, live)
    reader.read()
    params, bound = reader.params()
    if "prompt" not in params:
        raise ImportRefused(reader.no_prompt())
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "title": title or name,
        "description": f"Imported from {graph_file} by brigade workflows add.",
        "graph": graph_file,
        "backends": list(backends),
        "params": params,
        "outputs": outputs,
    }
    notes = [
        f"{_label(i, nodes[i])} is an output whose files Brigade does not store"
        " (only Save Image's are); ComfyUI still runs it"
        for i in others
    ]
    return Proposal(
        manifest=manifest,
        bound=tuple(bound),
        fixed=tuple(reader.fixed_report()),
        ignored=tuple(_label(i, nodes[i]) for i in _sorted(nodes) if i not in live),
        output_labels=tuple(_label(i, nodes[i]) for i in outputs),
        notes=tuple(notes),
    )


# -- refusals: what ComfyUI itself would not run ---------------------------------------


def _checked(graph: object) -> dict[str, dict[str, Any]]:
    if not isinstance(graph, dict):
        raise ImportRefused("a graph must be a JSON object of nodes (ComfyUI's API format)")
    if isinstance(graph.get("nodes"), list) and "links" in graph:
        raise ImportRefused(
            "this is a UI-format workflow (it has nodes and links lists);"
            " in ComfyUI use Save (API), or Export (API) in the Workflow menu"
        )
    if isinstance(graph.get("prompt"), dict) and "class_type" not in graph["prompt"]:
        raise ImportRefused('this looks like a /prompt request body; save only its "prompt" object')
    if not graph:
        raise ImportRefused("the graph has no nodes")
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            raise ImportRefused(f'node "{node_id}" is not a JSON object')
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise ImportRefused(f'node "{node_id}" has no class_type')
        if not isinstance(node.get("inputs"), dict):
            raise ImportRefused(f"{_label(node_id, node)} has no inputs object")
    for node_id, node in graph.items():
        for key, value in node["inputs"].items():
            if _is_link(value) and value[0] not in graph:
                raise ImportRefused(
                    f'{_label(node_id, node)} input "{key}" links to node "{value[0]}",'
                    " which is not in the graph (a node deleted after it was wired?)"
                )
    return graph


def _refuse_cycles(nodes: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a graph whose links loop, naming the nodes in the loop (a depth-first walk
    up the links, without recursion: exported graphs can be long chains)."""
    done: set[str] = set()
    for start in _sorted(nodes):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(_sources(nodes[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node_id, pending = stack[-1]
            source = next(pending, None)
            if source is None:
                stack.pop()
                path.pop()
                on_path.discard(node_id)
                done.add(node_id)
                continue
            if source in on_path:
                cycle = [*path[path.index(source) :], source]
                # Links point at sources; the data flows the other way round.
                shown = " -> ".join(_label(i, nodes[i]) for i in reversed(cycle))
                raise ImportRefused(f"the graph has a cycle: {shown}; ComfyUI cannot run it")
            if source not in done:
                stack.append((source, iter(_sources(nodes[source]))))
                path.append(source)
                on_path.add(source)


def _no_output(nodes: Mapping[str, Mapping[str, Any]], others: Sequence[str]) -> str:
    if others:
        listed = ", ".join(_label(i, nodes[i]) for i in others)
        return (
            f"no Save Image node: the only outputs are {listed}, whose files Brigade does"
            " not store (Preview Image's are temporary); add a Save Image where the"
            " results come out"
        )
    return (
        "no output node: ComfyUI runs only what leads to an output such as Save Image,"
        " so this graph would do nothing; add a Save Image where the results come out"
    )


# -- reading the graph -----------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """A literal a parameter can be written into."""

    node: str
    input: str
    value: Any


@dataclass
class _Candidate:
    """A parameter the reading proposes; candidates with one name become one parameter."""

    name: str
    kind: str
    sites: list[_Site]
    origin: str  # the node it was read from
    title: str | None  # the user's title that named it, if any
    order: int


class _Reader:
    """Reads the nodes ComfyUI would run (``live``) and collects candidates and what is
    left fixed, with reasons."""

    def __init__(self, nodes: Mapping[str, Mapping[str, Any]], live: set[str]) -> None:
        self.nodes = nodes
        self.live = live
        self.candidates: list[_Candidate] = []
        self.fixed: dict[tuple[str, str | None], Fixed] = {}
        self.claimed: set[tuple[str, str]] = set()
        self.bound: set[tuple[str, str]] = set()
        self.prompt_trouble: list[str] = []
        self.samplers = self.of(_SAMPLERS)
        #: node -> (consumer node, its input) for every link
        self.consumers: dict[str, list[tuple[str, str]]] = {}
        for node_id in _sorted(nodes):
            for key, value in nodes[node_id]["inputs"].items():
                link = _link(value)
                if link is not None:
                    self.consumers.setdefault(link[0], []).append((node_id, key))

    # -- helpers

    def of(self, classes: Iterable[str]) -> list[str]:
        """The live nodes of these classes not titled fixed, in id order."""
        wanted = set(classes)
        return [
            i
            for i in _sorted(self.nodes)
            if i in self.live
            and self.nodes[i]["class_type"] in wanted
            and not _is_fixed(self.nodes[i])
        ]

    def label(self, node_id: str) -> str:
        return _label(node_id, self.nodes[node_id])

    def titled(self, node_id: str) -> tuple[str, str] | None:
        """``(name, title)`` when the user titled the node with something name-worthy."""
        title = _user_title(self.nodes[node_id])
        slug = _slug(title) if title else None
        return (slug, title) if slug and title else None

    def numbered(self, node_ids: Sequence[str], node_id: str, base: str) -> str:
        """``base`` for the only untitled one of its kind, ``base_1``, ``base_2``... else."""
        untitled = [i for i in node_ids if self.titled(i) is None]
        return base if len(untitled) == 1 else _join(base, str(untitled.index(node_id) + 1))

    def leave(self, node_id: str, input_name: str | None, reason: str) -> None:
        value = self.nodes[node_id]["inputs"].get(input_name) if input_name else None
        self.fixed[(node_id, input_name)] = Fixed(
            node_id, self.label(node_id), input_name, value, reason
        )

    def site(self, node_id: str, input_name: str) -> _Site | str:
        """The literal behind an input (following a link to a primitive node), or why
        there is none."""
        value = self.nodes[node_id]["inputs"][input_name]
        link = _link(value)
        if link is None:
            return _Site(node_id, input_name, value)
        source = self.nodes[link[0]]
        if source["class_type"] in _PRIMITIVES and "value" in source["inputs"]:
            if _is_fixed(source):
                return f"it comes from {_label(link[0], source)}, titled fixed"
            if _link(source["inputs"]["value"]) is None:
                return _Site(link[0], "value", source["inputs"]["value"])
        return f"it comes from {_label(link[0], source)}, not a value Brigade can set"

    def offer(
        self,
        name: str,
        kind: str,
        node_id: str,
        inputs: Sequence[str],
        title: str | None = None,
    ) -> bool:
        """Propose parameter ``name`` for these inputs of ``node_id``; each that holds a
        literal of the kind's type (or comes from a primitive node) is a place for it.
        Says whether there was any."""
        sites: list[_Site] = []
        for input_name in inputs:
            if input_name not in self.nodes[node_id]["inputs"]:
                continue
            found = self.site(node_id, input_name)
            if isinstance(found, str):
                self.leave(node_id, input_name, f'not bound as "{name}": {found}')
                continue
            if (found.node, found.input) in self.claimed:
                continue  # one primitive feeding several inputs: bound once
            problem = _type_problem(_KINDS[kind].type, found.value)
            if problem is not None:
                self.leave(found.node, found.input, f'not bound as "{name}": {problem}')
                continue
            sites.append(found)
            self.claimed.add((found.node, found.input))
        if sites:
            self.candidates.append(
                _Candidate(name, kind, sites, node_id, title, order=len(self.candidates))
            )
        return bool(sites)

    # -- the reading, in the order names are claimed

    def read(self) -> None:
        for node_id in _sorted(self.nodes):
            if node_id in self.live and _is_fixed(self.nodes[node_id]):
                self.leave(node_id, None, "titled fixed: nothing in it is bound")
        self.read_primitives()
        self.read_encoders()
        self.read_images()
        self.read_samplers()
        self.read_latents()
        self.read_loaders("CheckpointLoaderSimple", "ckpt_name", "checkpoint")
        self.read_loras()
        self.read_controlnets()
        self.read_loaders("UpscaleModelLoader", "model_name", "upscale_model")

    def read_primitives(self) -> None:
        """A titled primitive node is a parameter of its own type, named by its title;
        untitled ones are bound through the input they feed."""
        for node_id in self.of(_PRIMITIVES):
            titled = self.titled(node_id)
            if titled is None:
                continue
            name = _TEXT_ALIASES.get(titled[0], titled[0])
            kind = name if name in _TITLE_KINDS else _PRIMITIVES[self.nodes[node_id]["class_type"]]
            self.offer(name, kind, node_id, ["value"], titled[1])

    def read_encoders(self) -> None:
        """``prompt``: the one untitled text encoder a sampler's positive input leads to;
        ``negative`` likewise; a titled encoder is named by its title."""
        leads: dict[str, dict[str, list[str]]] = {"prompt": {}, "negative": {}}
        for sampler in self.samplers:
            for role, side in (("prompt", "positive"), ("negative", "negative")):
                encoders, unknown = self.walk(self.nodes[sampler]["inputs"].get(side))
                leads[role][sampler] = encoders
                if role == "prompt":
                    self.prompt_trouble.extend(
                        f"the positive input of {self.label(sampler)} leads to"
                        f" {self.label(n)}, which Brigade cannot follow to a text encoder"
                        for n in unknown
                    )
        on_both = {e for es in leads["prompt"].values() for e in es} & {
            e for es in leads["negative"].values() for e in es
        }
        named: dict[str, tuple[str, str, str | None]] = {}  # encoder -> name, kind, title
        for encoder in self.of(_ENCODERS):
            titled = self.titled(encoder)
            if titled is not None:
                name = _TEXT_ALIASES.get(titled[0], titled[0])
                named[encoder] = (name, name if name in leads else "text", titled[1])
        ambiguous: dict[str, str] = {}
        for role, by_sampler in leads.items():
            for encoders in by_sampler.values():
                untitled = [e for e in encoders if e not in named and e not in on_both]
                if len(untitled) == 1:
                    named[untitled[0]] = (role, role, None)
            for sampler, encoders in by_sampler.items():
                untitled = [e for e in encoders if e not in named and e not in on_both]
                if len(untitled) > 1:
                    side = "positive" if role == "prompt" else "negative"
                    listed = ", ".join(self.label(e) for e in untitled)
                    trouble = (
                        f"the {side} input of {self.label(sampler)} combines several text"
                        f' encoders ({listed}); title the one that takes the {role} "{role}"'
                    )
                    if role == "prompt":
                        self.prompt_trouble.append(trouble)
                    for encoder in untitled:
                        ambiguous.setdefault(encoder, trouble)
        for encoder in on_both - set(named):
            ambiguous.setdefault(
                encoder, "it feeds both a positive and a negative input; title it to bind it"
            )
        for encoder in _sorted(named):
            name, kind, title = named[encoder]
            inputs = _ENCODERS[self.nodes[encoder]["class_type"]]
            if not self.offer(name, kind, encoder, inputs, title) and kind == "prompt":
                self.prompt_trouble.append(
                    f"the prompt's text encoder {self.label(encoder)} has no text Brigade can set"
                )
        for encoder in _sorted(set(ambiguous) - set(named)):
            for input_name in _ENCODERS[self.nodes[encoder]["class_type"]]:
                if input_name in self.nodes[encoder]["inputs"]:
                    self.leave(encoder, input_name, ambiguous[encoder])

    def walk(self, start: object) -> tuple[list[str], list[str]]:
        """The text encoders a conditioning input leads back to, and the nodes where the
        walk stopped because it does not know how a conditioning passes through them."""
        encoders: list[str] = []
        unknown: list[str] = []
        queue = [start]
        seen: set[tuple[str, int]] = set()
        while queue:
            link = _link(queue.pop(0))
            if link is None or link in seen:
                continue
            seen.add(link)
            node_id, index = link
            node = self.nodes[node_id]
            cls = node["class_type"]
            if cls in _ENCODERS:
                if node_id not in encoders and not _is_fixed(node):
                    encoders.append(node_id)
            elif cls in _CONDITIONING:
                paths = _CONDITIONING[cls]
                sources = paths[index] if index < len(paths) else ()
                queue.extend(node["inputs"].get(name) for name in sources)
            elif cls not in _CONDITIONING_ENDS and node_id not in unknown:
                unknown.append(node_id)
        return encoders, unknown

    def read_images(self) -> None:
        """Every LoadImage is a required image, named by its title, else by its use."""
        by_use: dict[str, list[str]] = {}
        for node_id in self.of(["LoadImage"]):
            titled = self.titled(node_id)
            if titled is not None:
                self.offer(titled[0], "image", node_id, ["image"], titled[1])
            else:
                by_use.setdefault(self.image_use(node_id), []).append(node_id)
        for base, node_ids in by_use.items():
            for n, node_id in enumerate(node_ids, 1):
                name = base if len(node_ids) == 1 else _join(base, str(n))
                self.offer(name, "image", node_id, ["image"])

    def image_use(self, load: str) -> str:
        """Where an untitled LoadImage's image goes, first found downstream: a ControlNet
        (``<controlnet>_image``) or the latent sampling starts from (``image``)."""
        queue = [load]
        seen = {load}
        while queue:
            for node_id, key in self.consumers.get(queue.pop(0), ()):
                if node_id not in self.live:
                    continue
                cls = self.nodes[node_id]["class_type"]
                if cls in _CONTROLNET_APPLY and key == "image":
                    return _join(self.controlnet_base(node_id), "image")
                if _IMAGE_STARTS.get(cls) == key:
                    return "image"
                if node_id not in seen:
                    seen.add(node_id)
                    queue.append(node_id)
        return "image"

    def read_samplers(self) -> None:
        """``seed``, ``steps``, ``cfg``, ``denoise``. With several samplers, a titled one's
        settings are ``<title>_steps``...; untitled ones share the names (when they hold
        one value); the seed is always one ``seed``."""
        several = len(self.samplers) > 1
        for sampler in self.samplers:
            node = self.nodes[sampler]
            cls = node["class_type"]
            inputs = node["inputs"]
            titled = self.titled(sampler) if several else None
            prefix, title = titled if titled else (None, None)
            if cls == "KSamplerAdvanced" and inputs.get("add_noise") == "disable":
                self.leave(sampler, "noise_seed", "add_noise is disabled: the seed is unused")
            else:
                # One seed per job, whatever the titles: Brigade shows, stores and reuses
                # the job's seed (reroll, variations), and it reproduces the whole image.
                self.offer("seed", "seed", sampler, [_SAMPLERS[cls]])
            split = _advanced_split(inputs) if cls == "KSamplerAdvanced" else None
            if split is not None:
                self.leave(sampler, "steps", split)
            else:
                self.offer(_join(prefix, "steps"), "steps", sampler, ["steps"], title)
            self.offer(_join(prefix, "cfg"), "cfg", sampler, ["cfg"], title)
            if cls != "KSampler" or "denoise" not in inputs:
                continue
            start = _link(inputs.get("latent_image"))
            if start is not None and self.nodes[start[0]]["class_type"] in _LATENTS:
                self.leave(
                    sampler,
                    "denoise",
                    "the sampler starts from an empty latent, where a denoise below 1 only"
                    " spoils the image",
                )
            else:
                self.offer(_join(prefix, "denoise"), "denoise", sampler, ["denoise"], title)

    def read_latents(self) -> None:
        """``width``, ``height``, ``batch`` of the empty latent (prefixed by the title when
        there are several)."""
        latents = self.of(_LATENTS)
        for latent in latents:
            titled = self.titled(latent) if len(latents) > 1 else None
            prefix, title = titled if titled else (None, None)
            for role, input_name in (
                ("width", "width"),
                ("height", "height"),
                ("batch", "batch_size"),
            ):
                self.offer(_join(prefix, role), role, latent, [input_name], title)

    def read_loaders(self, cls: str, input_name: str, kind: str) -> None:
        """A model file: named by the loader's title, else the kind (numbered when several
        untitled loaders hold different files)."""
        loaders = self.of([cls])
        for loader in loaders:
            titled = self.titled(loader)
            name, title = titled if titled else (kind, None)
            if titled is None and kind != "checkpoint":
                name = self.numbered(loaders, loader, kind)
            self.offer(name, kind, loader, [input_name], title)

    def read_loras(self) -> None:
        """``lora``/``lora_strength``; a chain is numbered from the checkpoint on
        (``lora_1``, ``lora_1_strength``, ``lora_2``...); a title names them."""
        chain = sorted(self.of(_LORAS), key=lambda i: (self.lora_depth(i), _id_key(i)))
        for lora in chain:
            titled = self.titled(lora)
            base, title = titled if titled else (self.numbered(chain, lora, "lora"), None)
            inputs = self.nodes[lora]["inputs"]
            self.offer(base, "lora", lora, ["lora_name"], title)
            # One strength for the model and the text encoder, unless the graph sets two.
            apart = inputs.get("strength_clip") != inputs.get("strength_model")
            strengths = ["strength_model"] if apart else ["strength_model", "strength_clip"]
            self.offer(_join(base, "strength"), "lora_strength", lora, strengths, title)
            if apart:
                name = _join(base, "clip_strength")
                self.offer(name, "lora_strength", lora, ["strength_clip"], title)

    def lora_depth(self, lora: str) -> int:
        """How many LoRAs come before this one on its model's way from the checkpoint."""
        depth = 0
        link = _link(self.nodes[lora]["inputs"].get("model"))
        while link is not None and self.nodes[link[0]]["class_type"] in _LORAS:
            depth += 1  # the graph has no cycles, so this ends
            link = _link(self.nodes[link[0]]["inputs"].get("model"))
        return depth

    def controlnet_names(self) -> dict[str, str]:
        loaders = self.of(["ControlNetLoader"])
        names = {}
        for loader in loaders:
            titled = self.titled(loader)
            names[loader] = titled[0] if titled else self.numbered(loaders, loader, "controlnet")
        return names

    def controlnet_base(self, apply: str) -> str:
        """The name an Apply ControlNet's strength and image go by: its title, else its
        loader's name."""
        titled = self.titled(apply)
        if titled is not None:
            return titled[0]
        link = _link(self.nodes[apply]["inputs"].get("control_net"))
        if link is not None:
            return self.controlnet_names().get(link[0], "controlnet")
        return "controlnet"

    def read_controlnets(self) -> None:
        for loader, name in self.controlnet_names().items():
            titled = self.titled(loader)
            self.offer(name, "controlnet", loader, ["control_net_name"], titled and titled[1])
        for apply in self.of(_CONTROLNET_APPLY):
            titled = self.titled(apply)
            name = _join(self.controlnet_base(apply), "strength")
            self.offer(name, "controlnet_strength", apply, ["strength"], titled and titled[1])

    # -- from candidates to parameters

    def params(self) -> tuple[dict[str, dict[str, Any]], list[Bound]]:
        """One parameter per name. Places under one name must be of one kind and (but for
        texts the job always sets, images and seeds) hold one value, else they stay
        fixed with the reason."""
        groups: dict[str, list[_Candidate]] = {}
        for candidate in self.candidates:
            groups.setdefault(candidate.name, []).append(candidate)
        made: list[tuple[tuple[int, int], str, dict[str, Any], list[_Site]]] = []
        for name, group in groups.items():
            first = group[0]
            for other in group:
                if other.kind != first.kind:
                    for site in other.sites:
                        self.leave(
                            site.node,
                            site.input,
                            f'the name "{name}" is taken by {self.label(first.origin)}',
                        )
            sites = [s for c in group if c.kind == first.kind for s in c.sites]
            kind = _KINDS[first.kind]
            if kind.same_value and any(s.value != sites[0].value for s in sites[1:]):
                for site in sites:
                    self.leave(
                        site.node,
                        site.input,
                        f'each would be "{name}", but they hold different values;'
                        " title the nodes to bind them apart",
                    )
                continue
            spec = _spec(first, self.nodes[first.origin]["class_type"], sites[0].value)
            spec["bind"] = [{"node": s.node, "input": s.input} for s in sites]
            problem = _spec_problem(spec)
            if problem is not None:
                for site in sites:
                    self.leave(site.node, site.input, f'not bound as "{name}": {problem}')
                continue
            made.append(((_ORDER[first.kind], first.order), name, spec, sites))
        made.sort(key=lambda m: m[0])
        for _, _, _, sites in made:
            for site in sites:
                self.bound.add((site.node, site.input))
                self.fixed.pop((site.node, site.input), None)
        params = {name: spec for _, name, spec, _ in made}
        bound = [
            Bound(name, spec, tuple(f"{self.label(s.node)} {s.input}" for s in sites))
            for _, name, spec, sites in made
        ]
        return params, bound

    def fixed_report(self) -> list[Fixed]:
        """What stays as the graph has it: the entries with reasons, and every other
        literal of the nodes ComfyUI runs."""
        report = sorted(self.fixed.values(), key=lambda f: (_id_key(f.node), f.input or ""))
        reasoned = {(f.node, f.input) for f in report}
        for node_id in _sorted(self.live):
            if (node_id, None) in reasoned:
                continue
            for key, value in self.nodes[node_id]["inputs"].items():
                if _link(value) is None and (node_id, key) not in reasoned | self.bound:
                    report.append(Fixed(node_id, self.label(node_id), key, value))
        return report

    def no_prompt(self) -> str:
        """Why no ``prompt`` parameter was found, and what to do about it."""
        fix = (
            'title the text encoder (or the String primitive) that takes the prompt "prompt":'
            " every Brigade job carries a prompt"
        )
        if self.prompt_trouble:
            why = "; ".join(self.prompt_trouble)
        elif not self.samplers:
            why = "no KSampler or KSamplerAdvanced runs, so no text encoder is known to take it"
        elif named := [c for c in self.candidates if c.kind == "text"]:
            why = ", ".join(f'{self.label(c.origin)} is titled to name "{c.name}"' for c in named)
        else:
            why = "no sampler's positive input leads to a text encoder"
        return f"no place for the prompt: {why}; {fix}"


def _advanced_split(inputs: Mapping[str, Any]) -> str | None:
    """Why a KSamplerAdvanced's steps stay fixed: it runs only part of them (a base and
    refiner pair splitting one schedule), and the parts are counted in steps."""
    steps, start, end = (inputs.get(k) for k in ("steps", "start_at_step", "end_at_step"))
    if isinstance(steps, int) and start == 0 and isinstance(end, int) and end >= steps:
        return None
    return (
        f"the sampler runs steps {show(start)} to {show(end)} of them; a new total would"
        " move that split"
    )


# -- parameter specs -------------------------------------------------------------------


def _spec(candidate: _Candidate, cls: str, value: Any) -> dict[str, Any]:
    """The manifest entry (without ``bind``) for a candidate whose places hold ``value``."""
    kind = _KINDS[candidate.kind]
    title = candidate.title
    description = kind.description.format(of=f' of "{title}"' if title else "")
    if candidate.kind == "image" and title is None:
        description = _IMAGE_USES.get(candidate.name.rstrip("_0123456789"), description)
    spec: dict[str, Any] = {"type": kind.type, "description": description}
    if candidate.kind in ("prompt", "image"):
        spec["required"] = True
        if candidate.kind == "prompt":
            spec["max_length"] = _TEXT_LIMITS["prompt"]
    elif candidate.kind == "seed":
        spec |= {"min": 0, "max": MAX_RANDOM_SEED, "random": True}
    elif kind.type == "string":
        limit = _TEXT_LIMITS.get(candidate.kind, _FILE_NAME_LIMIT)
        spec |= {"default": value, "max_length": max(limit, len(value))}
        if kind.folder is not None:
            spec["folder"] = kind.folder
    elif kind.type == "bool":
        spec["default"] = value
    else:
        spec["default"] = float(value) if kind.type == "float" else value
        if kind.low is not None and kind.high is not None:
            spec["min"], spec["max"] = _widen(kind.low, kind.high, value, kind.type)
        if candidate.kind in ("width", "height"):
            step = 16 if cls == "EmptySD3LatentImage" and value % 16 == 0 else 8
            if value % step == 0:
                spec["multiple_of"] = step
                spec["min"] = -(-spec["min"] // step) * step
                spec["max"] = spec["max"] // step * step
    return spec


def _widen(low: float, high: float, value: float, type_: str) -> tuple[float, float]:
    """The kind's bounds, widened to hold the graph's own value (always a valid default)."""
    low, high = min(low, value), max(high, value)
    if type_ == "int":
        return math.floor(low), math.ceil(high)
    return float(low), float(high)


def _spec_problem(spec: Mapping[str, Any]) -> str | None:
    """What the manifest's own rules say against a proposed parameter (a default text
    with a control character in it, say)."""
    try:
        Parameter.model_validate(spec)
    except ValidationError as exc:
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return None


def _type_problem(type_: str, value: Any) -> str | None:
    """Why a literal cannot hold a parameter of this type (the loader checks the same)."""
    if type_ in ("string", "image"):
        return None if isinstance(value, str) else f"it holds {show(value)}, not text"
    if type_ == "bool":
        return None if isinstance(value, bool) else f"it holds {show(value)}, not true or false"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"it holds {show(value)}, not a number"
    if type_ == "int" and not isinstance(value, int):
        return f"it holds {show(value)}, not a whole number"
    if not math.isfinite(value):
        return f"it holds {show(value)}, not a finite number"
    return None


# -- names and labels ------------------------------------------------------------------


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _slug(title: str) -> str | None:
    """A parameter name from a node title, or None when it has no letters or digits."""
    slug = re.sub(r"[^a-z0-9]+", "_", _ascii(title).lower()).strip("_")
    if not slug:
        return None
    if not slug[0].isalpha():
        slug = f"p_{slug}"
    return slug[:_NAME_LIMIT].rstrip("_")


def _join(base: str | None, suffix: str) -> str:
    """``base_suffix``, the base cut so the whole fits a parameter name."""
    if not base:
        return suffix
    room = _NAME_LIMIT - len(suffix) - 1
    return f"{base[:room].rstrip('_')}_{suffix}"


def _user_title(node: Mapping[str, Any]) -> str | None:
    """The title the user gave a node; None for ComfyUI's default title, or none."""
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    if not isinstance(title, str) or not title.strip():
        return None
    title = title.strip()
    cls = node["class_type"]
    if title == cls or title in _DEFAULT_TITLES.get(cls, ()):
        return None
    return title


def _is_fixed(node: Mapping[str, Any]) -> bool:
    """Titled ``fixed`` or ``fixed: ...``: the user keeps the node out of the manifest."""
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    if not isinstance(title, str):
        return False
    title = title.strip().lower()
    return title == "fixed" or title.startswith("fixed:")


def _label(node_id: str, node: Mapping[str, Any]) -> str:
    """``node 6 (Positive, CLIPTextEncode)``, as ``workflows check`` names nodes."""
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    cls = node.get("class_type", "?")
    if isinstance(title, str) and title and title != cls:
        return f"node {node_id} ({title}, {cls})"
    return f"node {node_id} ({cls})"


def _link(value: object) -> tuple[str, int] | None:
    """A link ``[node_id, output_index]`` as a tuple; None for a literal."""
    if isinstance(value, list | tuple) and _is_link(value):
        return str(value[0]), int(value[1])
    return None


def _id_key(node_id: str) -> tuple[tuple[int, int | str], ...]:
    """ComfyUI's ids are numbers as text ("12", "5:3" inside a subgraph): number order."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in node_id.split(":"))


def _sorted(node_ids: Iterable[str]) -> list[str]:
    return sorted(node_ids, key=_id_key)


def _sources(node: Mapping[str, Any]) -> list[str]:
    return [link[0] for value in node["inputs"].values() if (link := _link(value)) is not None]


def _upstream(nodes: Mapping[str, Mapping[str, Any]], roots: Iterable[str]) -> set[str]:
    """The nodes ComfyUI runs for these outputs: them and everything they link back to."""
    found: set[str] = set()
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id not in found:
            found.add(node_id)
            stack.extend(_sources(nodes[node_id]))
    return found
