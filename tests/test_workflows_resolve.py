"""Template.resolve: defaults, random seeds, and one clear FieldError per bad value."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import pytest

from workflows import Catalog, FieldError, ParameterError, Template
from workflows.template import MAX_RANDOM_SEED


@pytest.fixture(scope="module")
def sd15() -> Template:
    return Catalog.load().get("sd15-txt2img")


def _errors(template: Template, values: dict[str, object]) -> list[FieldError]:
    with pytest.raises(ParameterError) as caught:
        template.resolve(values)
    return caught.value.errors


def _one(template: Template, values: dict[str, object]) -> FieldError:
    errors = _errors(template, values)
    assert len(errors) == 1, errors
    return errors[0]


def test_defaults_fill_every_parameter(sd15: Template) -> None:
    resolved = sd15.resolve({"prompt": "a red cube"}, rng=random.Random(7))
    assert set(resolved) == set(sd15.manifest.params)
    assert resolved["negative"] == ""
    assert resolved["steps"] == 25
    assert resolved["cfg"] == 7.0
    assert isinstance(resolved["cfg"], float)
    assert resolved["width"] == resolved["height"] == 512
    assert resolved["batch"] == 1
    assert resolved["checkpoint"] == "v1-5-pruned-emaonly.safetensors"


def test_given_values_win(sd15: Template) -> None:
    resolved = sd15.resolve(
        {"prompt": "p", "negative": "n", "seed": 42, "steps": 10, "cfg": 4.5, "width": 768}
    )
    assert (resolved["negative"], resolved["seed"], resolved["steps"]) == ("n", 42, 10)
    assert (resolved["cfg"], resolved["width"], resolved["height"]) == (4.5, 768, 512)


def test_seed_is_drawn_in_range_and_reproducible(sd15: Template) -> None:
    seeds = [sd15.resolve({"prompt": "p"}, rng=random.Random(i))["seed"] for i in range(200)]
    assert all(isinstance(s, int) and 0 <= s <= MAX_RANDOM_SEED for s in seeds)
    assert len(set(seeds)) == len(seeds)
    again = sd15.resolve({"prompt": "p"}, rng=random.Random(3))["seed"]
    assert again == seeds[3]


def test_seed_without_rng_uses_system_randomness(sd15: Template) -> None:
    seeds = {sd15.resolve({"prompt": "p"})["seed"] for _ in range(5)}
    assert len(seeds) == 5


def test_none_means_not_given(sd15: Template) -> None:
    resolved = sd15.resolve({"prompt": "p", "seed": None, "steps": None}, rng=random.Random(1))
    assert resolved["steps"] == 25
    assert isinstance(resolved["seed"], int)


def test_int_is_accepted_for_a_float(sd15: Template) -> None:
    resolved = sd15.resolve({"prompt": "p", "cfg": 8})
    assert resolved["cfg"] == 8.0
    assert isinstance(resolved["cfg"], float)


def test_width_not_a_multiple(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "p", "width": 513})
    assert error == FieldError(
        "width", "width: 513 is not a multiple of 8 (allowed: 64 to 1024, a multiple of 8)"
    )


def test_steps_above_and_below_bounds(sd15: Template) -> None:
    assert _one(sd15, {"prompt": "p", "steps": 500}).message == (
        "steps: 500 is above the maximum (allowed: 1 to 150)"
    )
    assert _one(sd15, {"prompt": "p", "steps": 0}).message == (
        "steps: 0 is below the minimum (allowed: 1 to 150)"
    )
    assert _one(sd15, {"prompt": "p", "cfg": 30.5}).message == (
        "cfg: 30.5 is above the maximum (allowed: 1 to 30)"
    )


def test_prompt_too_long(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "x" * 2100})
    assert error == FieldError(
        "prompt", "prompt: 2100 characters is too long (allowed: at most 1500 characters)"
    )


def test_prompt_length_counts_characters_not_bytes(sd15: Template) -> None:
    resolved = sd15.resolve({"prompt": "猫" * 1500})
    assert resolved["prompt"] == "猫" * 1500
    assert _one(sd15, {"prompt": "🐱" * 1501}).message.startswith("prompt: 1501 characters")


def test_unknown_parameter(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "p", "foo": 1})
    assert error.field == "foo"
    assert error.message == (
        'foo: unknown parameter for workflow "sd15-txt2img" (allowed: prompt, negative,'
        " seed, steps, cfg, width, height, batch, checkpoint)"
    )


def test_unknown_parameter_with_a_hostile_name_is_escaped(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "p", "x\x00" + "y" * 100: 1})
    assert "\x00" not in error.message
    assert error.field.startswith('"x\\u0000yyy')
    assert len(error.field) <= 40


@pytest.mark.parametrize(
    ("field", "value", "shown", "kind"),
    [
        ("width", "512", '"512"', "must be a whole number"),
        ("width", 512.0, "512.0", "must be a whole number"),
        ("width", True, "true", "must be a whole number"),
        ("batch", [1], "[1]", "must be a whole number"),
        ("cfg", "7", '"7"', "must be a number"),
        ("cfg", False, "false", "must be a number"),
        ("cfg", float("nan"), "NaN", "must be a finite number"),
        ("negative", 5, "5", "must be text"),
        ("checkpoint", 0, "0", "must be text"),
    ],
)
def test_wrong_type(sd15: Template, field: str, value: object, shown: str, kind: str) -> None:
    error = _one(sd15, {"prompt": "p", field: value})
    assert error.field == field
    assert error.message.startswith(f"{field}: {shown} {kind} (allowed: ")


def test_list_valued_prompt_is_rejected(sd15: Template) -> None:
    error = _one(sd15, {"prompt": ["4", 0]})
    assert error.message == ('prompt: ["4", 0] must be text (allowed: at most 1500 characters)')


def test_dict_valued_prompt_is_rejected(sd15: Template) -> None:
    error = _one(sd15, {"prompt": {"3": {"class_type": "SaveImage"}}})
    assert error.field == "prompt"
    assert "must be text" in error.message
    assert error.message.startswith('prompt: {"3": {"class_type": "SaveImag')


def test_nul_in_prompt_is_rejected(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "a cat\x00"})
    assert error.field == "prompt"
    assert "control character (U+0000) at character 6" in error.message
    assert "only newline and tab are allowed" in error.message
    assert "\x00" not in error.message


@pytest.mark.parametrize("char", ["\x01", "\x1b", "\r", "\x0b"])
def test_other_control_characters_are_rejected(sd15: Template, char: str) -> None:
    assert "control character" in _one(sd15, {"prompt": f"a{char}b"}).message


def test_newline_and_tab_are_allowed(sd15: Template) -> None:
    assert sd15.resolve({"prompt": "line one\n\tline two"})["prompt"] == "line one\n\tline two"


def test_lone_surrogate_is_rejected(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "a\ud800b"})
    assert "unpaired surrogate (U+D800)" in error.message
    error.message.encode("utf-8")


def test_checkpoint_is_any_file_name_the_server_may_list(sd15: Template) -> None:
    """The server knows its files; ComfyUI refuses one it lacks, naming the input."""
    assert sd15.resolve({"prompt": "p", "checkpoint": "mine.safetensors"})["checkpoint"] == (
        "mine.safetensors"
    )
    error = _one(sd15, {"prompt": "p", "checkpoint": "x" * 256})
    assert error.field == "checkpoint"
    assert "at most 255 characters" in error.message


def test_a_value_outside_a_choice_list_names_the_choices(tmp_path: Path) -> None:
    source = Catalog.load().get("sd15-txt2img").source.parent
    manifest = json.loads((source / "sd15-txt2img.manifest.json").read_text())
    manifest["params"]["checkpoint"] = {
        "type": "choice",
        "choices": ["v1-5-pruned-emaonly.safetensors"],
        "default": "v1-5-pruned-emaonly.safetensors",
        "bind": manifest["params"]["checkpoint"]["bind"],
    }
    (tmp_path / "sd15-txt2img.manifest.json").write_text(json.dumps(manifest))
    shutil.copy(source / "sd15-txt2img.json", tmp_path)
    template = Template.load(tmp_path / "sd15-txt2img.manifest.json")

    error = _one(template, {"prompt": "p", "checkpoint": "x.safetensors"})

    assert error == FieldError(
        "checkpoint",
        'checkpoint: "x.safetensors" is not allowed (allowed: v1-5-pruned-emaonly.safetensors)',
    )


def test_long_bad_values_are_truncated(sd15: Template) -> None:
    error = _one(sd15, {"prompt": "p", "steps": "z" * 5000})
    assert len(error.message) < 120
    assert "…" in error.message


def test_missing_required(sd15: Template) -> None:
    error = _one(sd15, {})
    assert error == FieldError(
        "prompt", "prompt: a value is required (allowed: at most 1500 characters)"
    )


def test_every_error_is_collected(sd15: Template) -> None:
    errors = _errors(sd15, {"foo": 1, "width": 513, "steps": 500, "checkpoint": "x" * 300})
    assert [e.field for e in errors] == ["foo", "prompt", "steps", "width", "checkpoint"]
    with pytest.raises(ParameterError) as caught:
        sd15.resolve({"foo": 1, "width": 513})
    assert str(caught.value) == "; ".join(e.message for e in caught.value.errors)
    assert "width: 513 is not a multiple of 8" in str(caught.value)


def test_parameter_error_survives_pickling(sd15: Template) -> None:
    with pytest.raises(ParameterError) as caught:
        sd15.resolve({"width": 513})
    copy = pickle.loads(pickle.dumps(caught.value))
    assert copy.errors == caught.value.errors
    assert str(copy) == str(caught.value)


def test_flux_has_no_negative() -> None:
    flux = Catalog.load().get("flux-schnell-txt2img")
    error = _one(flux, {"prompt": "p", "negative": "blurry"})
    assert error.field == "negative"
    assert "unknown parameter" in error.message
    assert _one(flux, {"prompt": "p", "width": 1000}).message == (
        "width: 1000 is not a multiple of 16 (allowed: 256 to 2048, a multiple of 16)"
    )


def test_absurd_values_give_messages_not_crashes(sd15: Template) -> None:
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    assert _one(sd15, {"prompt": "p", "width": 10**5000}).message.startswith(
        "width: <int> is above the maximum"
    )
    assert "is too large for a number" in _one(sd15, {"prompt": "p", "cfg": 10**400}).message
    assert _one(sd15, {"prompt": "p", "steps": nested}).message.startswith(
        "steps: <list> must be a whole number"
    )
