"""A tenant's limits are written out in four places: the stored settings
(``QuotaSettings``), their defaults from the environment (``QuotaDefaults``), the API's
change body (``QuotaChange``) and the bot's ``/quota set`` fields. A limit added to one
and not the others, or bounded differently, would be refused or let through depending
on where an admin sets it: these tests keep the four in step."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from api.models import QuotaChange
from bot.cogs.admin import NUMBER_FIELDS, PLAIN_LISTS, RESTRICTING_LISTS
from jobs.quotas import QuotaDefaults, QuotaSettings

#: Set by its own commands (``/queue pause``, ``POST .../pause``), not as a limit.
NOT_A_LIMIT = {"paused"}


def bounds(model: type[BaseModel]) -> dict[str, list[Any]]:
    return {name: field.metadata for name, field in model.model_fields.items()}


def test_the_api_changes_every_limit_with_the_same_bounds() -> None:
    stored = bounds(QuotaSettings)
    for name in NOT_A_LIMIT:
        del stored[name]
    assert bounds(QuotaChange) == stored


def test_the_bot_sets_every_limit() -> None:
    limits = set(QuotaSettings.model_fields) - NOT_A_LIMIT
    fields = [*NUMBER_FIELDS, *RESTRICTING_LISTS, *PLAIN_LISTS]
    assert sorted(fields) == sorted(limits)


def test_every_number_has_a_default_with_the_same_bounds() -> None:
    stored = bounds(QuotaSettings)
    assert bounds(QuotaDefaults) == {name: stored[name] for name in NUMBER_FIELDS}
