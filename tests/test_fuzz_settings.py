"""Hypothesis over the environment (issue 7): each settings class built from random
values of its own variables is a settings object, or a pydantic ``ValidationError``
whose every error names one of the variables that were set; never another exception.

Budgets are small for the suite; ``BRIGADE_HYPOTHESIS_PROFILE=thorough`` runs 20 times
as many examples by hand."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from tests.test_settings import SETTINGS, env_names

THOROUGH = os.environ.get("BRIGADE_HYPOTHESIS_PROFILE") == "thorough"


def budget(examples: int) -> settings:
    """``examples`` in the suite, twenty times as many in the thorough profile; no
    deadline (the machine is shared) and no example database in the working tree."""
    return settings(
        max_examples=examples * 20 if THOROUGH else examples, deadline=None, database=None
    )


#: What an environment variable can hold: no NUL, no surrogate (os.environ refuses both).
ENV_TEXT = st.text(
    alphabet=st.characters(
        categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co", "Cn"],
        blacklist_characters="\x00",
    ),
    max_size=40,
)
NEAR_VALID = st.sampled_from(
    [
        "",
        " ",
        "0",
        "1",
        "-1",
        "65536",
        "99999999999999999999999999",
        "1e999",
        "-1e999",
        "nan",
        "inf",
        "-inf",
        "1.5",
        "0x10",
        "1_000",
        "true",
        "false",
        "yes",
        "none",
        "null",
        "[]",
        "[1, 2]",
        '["a"]',
        "{}",
        '{"a": 1}',
        "[",
        "a,b,,c",
        ",",
        "1,2,x",
        "auto",
        "json",
        "cuda",
        "path",
        "amqp://u:p@h:5672/",
        "http://127.0.0.1:9000",
        "../../etc",
        "/tmp",
        "x" * 300,
    ]
)
VALUES = NEAR_VALID | ENV_TEXT | st.integers().map(str) | st.floats().map(str)


def _prefix(model: type[BaseSettings]) -> str:
    return str(model.model_config.get("env_prefix", ""))


@pytest.mark.parametrize("model", SETTINGS, ids=lambda model: model.__name__)
@given(data=st.data())
@budget(80)
def test_settings_are_built_or_refused_by_name(
    model: type[BaseSettings], data: st.DataObject
) -> None:
    names = sorted(env_names(model))
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    env = {name: data.draw(VALUES, label=name) for name in chosen}
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            built = model(_env_file=None)
        except ValidationError as exc:
            prefix = _prefix(model)
            for error in exc.errors():
                assert error["loc"], error
                variable = f"{prefix}{error['loc'][0]}".upper()
                assert variable in env, (variable, env, error)
            return
    assert isinstance(built, model)


@given(value=VALUES)
@example(value="1e999")
@budget(60)
def test_quota_defaults_become_quota_settings_or_are_refused(value: str) -> None:
    from jobs.quotas import QuotaDefaults

    for name in sorted(env_names(QuotaDefaults)):
        with mock.patch.dict(os.environ, {name: value}, clear=True):
            try:
                defaults = QuotaDefaults(_env_file=None)
            except ValidationError as exc:
                refused: ValidationError | None = exc
            else:
                refused = None
        if refused is not None:
            assert all(f"QUOTA_{e['loc'][0]}".upper() == name for e in refused.errors())
        else:
            assert defaults.settings() is not None
