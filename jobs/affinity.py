"""Model affinity: which waiting job a renderer should take next, so models load rarely
and no job waits past a bound.

Loading a checkpoint costs a GPU seconds to minutes; a renderer (one per GPU, one big
model resident at a time) that takes jobs in arrival order reloads whenever consecutive
jobs want different models. :func:`choose` picks, for one renderer with a free slot,
from the jobs waiting in fair order (``jobs/fairness.py``):

1. a job that has waited ``bound`` seconds or more, the first of them in fair order,
   whatever its model: nothing starves, and fairness still decides among the late;
2. else the first job (in fair order) for the model this renderer has loaded, or one
   that needs no particular model;
3. else the renderer switches: to the model that no other renderer has loaded with the
   most jobs waiting (ties: the one whose first job comes first in fair order);
4. else every waiting model is loaded elsewhere: the renderer helps with the model whose
   backlog its renderers cannot start within ``bound`` (jobs * ``render_seconds`` /
   renderers having it), the largest such; if none, it stays idle, because that load
   would buy nothing the bound asks for (and a job that does reach the bound is taken
   by rule 1 by whoever is free).

This module is the decision alone, pure and measured by simulation
(``tests/test_affinity.py``: with a mixed backlog over K renderers, model loads against
the offline optimum, and the longest wait against the bound). :func:`choose_model` is
the same decision by model; ``renderer/affinity.py`` runs it at the broker, where each
model has a queue whose messages move to the lane's queue after the bound (rule 1 is
then the broker's), and ``tests/test_affinity_fleet.py`` measures it through renderers
and emulated ComfyUI servers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Models folders whose file decides where a job renders best: loading one of these is
#: what costs a GPU seconds to minutes (a job's ``model``).
AFFINITY_FOLDERS = ("checkpoints", "diffusion_models", "unet")


@dataclass(frozen=True, slots=True)
class Candidate:
    """A waiting job, as affinity sees it."""

    job_id: str
    #: The model file it needs (its checkpoint), or None when any renderer will do.
    model: str | None
    #: Seconds since it was admitted.
    waited: float


def choose(
    waiting: Sequence[Candidate],
    loaded: str | None,
    loaded_elsewhere: Mapping[str, int],
    *,
    bound: float,
    render_seconds: float,
) -> Candidate | None:
    """The job a renderer with ``loaded`` resident should take next from ``waiting``
    (in fair order), or None: nothing waits, or nothing is worth a load now.
    ``loaded_elsewhere``: how many other renderers of the lane have each model resident."""
    if not waiting:
        return None
    for candidate in waiting:
        if candidate.waited >= bound:
            return candidate
    for candidate in waiting:
        if candidate.model is None or (loaded is not None and candidate.model == loaded):
            return candidate
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for rank, candidate in enumerate(waiting):
        if candidate.model is not None:
            counts[candidate.model] = counts.get(candidate.model, 0) + 1
            first.setdefault(candidate.model, rank)
    model = choose_model(counts, None, loaded_elsewhere, bound=bound, render_seconds=render_seconds)
    return None if model is None else waiting[first[model]]


def choose_model(
    counts: Mapping[str, int],
    loaded: str | None,
    loaded_elsewhere: Mapping[str, int],
    *,
    bound: float,
    render_seconds: float,
) -> str | None:
    """Rules 2 to 5 by model, for a renderer that sees only how many jobs wait for each
    model (``counts``, in the order their first jobs came: ties go to the earlier) and
    how many other renderers have each loaded: the model whose jobs it should take next,
    or None (stay idle). Jobs past the bound are not in ``counts``: the broker has moved
    them to the lane's queue, which every renderer takes first (rule 1)."""
    waiting = [model for model, count in counts.items() if count > 0]
    if loaded is not None and loaded in waiting:
        return loaded
    cold = [m for m in waiting if not loaded_elsewhere.get(m)]
    if cold:
        return max(cold, key=lambda m: (counts[m], -waiting.index(m)))
    behind = [m for m in waiting if counts[m] * render_seconds / loaded_elsewhere[m] > bound]
    if behind:
        return max(behind, key=lambda m: (counts[m] / loaded_elsewhere[m], -waiting.index(m)))
    return None
