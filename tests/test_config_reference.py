"""docs/configuration.md documents every key batchd.toml may hold, as the code has it: each key of Settings
and of the models it nests (job types, tenants, prices, the emulator and its faults), with its default, the
variable that overrides it and its description, and no key the code does not have.

The reference is generated (batchd/dev/config_reference.py) and compared whole; the table is also read back
here and checked against the models by a walk of its own, so that a fault of the generator does not pass
unseen."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from batchd.config import Settings, unknown_variables
from batchd.dev import config_reference
from batchd.pricing import ModelRates

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
# | `key` | default | `ENV` or — | description |
ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \| (`[A-Z0-9_<>]+`|—) \| (.*) \|$", re.MULTILINE)
DERIVED = re.compile(r"^([0-9.]+)x input$")


def models_within(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field nests, and the name part its entries add: "" (a section), ".NAME" (a table of named
    entries), "" for a list of tables too (its keys are written inside each entry)."""
    if get_origin(annotation) in (dict, list):
        inner = get_args(annotation)[-1]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, ".NAME" if get_origin(annotation) is dict else ""
        return None
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate, ""
    return None


def every_field(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, FieldInfo, bool]]:
    """(dotted name, field, is a key) for every field of the settings, sections included; named entries'
    names as NAME (or MODEL, for prices)."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = models_within(field.annotation)
        yield dotted, field, nested is None
        if nested is not None:
            inner, entry = nested
            if entry and dotted == "pricing.models":
                entry = ".MODEL"
            yield from every_field(inner, f"{dotted}{entry}.")


def documented() -> dict[str, tuple[str, str, str]]:
    rows: dict[str, tuple[str, str, str]] = {}
    for key, default, env, description in ROW.findall(DOC.read_text()):
        assert key not in rows, f"{key} is documented twice"
        rows[key] = (default, env, description)
    return rows


def test_the_committed_reference_is_the_generated_one() -> None:
    generated = config_reference.replaced(DOC.read_text(), config_reference.markdown())
    assert DOC.read_text() == generated, (
        "docs/configuration.md differs from the settings: run `python -m batchd.dev.config_reference --write`"
    )


def test_every_field_has_a_description() -> None:
    missing = [name for name, field, _ in every_field() if not (field.description or "").strip()]
    assert missing == []


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    keys = {name for name, _, is_key in every_field() if is_key}
    rows = documented()
    assert len(keys) > 100
    assert sorted(keys - set(rows)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(rows) - keys) == [], "docs/configuration.md documents keys the settings do not have"


def test_each_documented_default_is_the_models() -> None:
    rows = documented()
    for name, field, is_key in every_field():
        if not is_key:
            continue
        default, _, _ = rows[name]
        if field.default is PydanticUndefined and field.default_factory is None:
            derived = DERIVED.match(default)
            if derived is None:
                assert default == "required", name
                continue
            # A cache rate left out is its multiple of the model's input rate.
            rates = ModelRates.model_validate({"input": 8, "output": 1})
            assert getattr(rates, name.rsplit(".", 1)[1]) == Decimal(8) * Decimal(derived[1]), name
            continue
        value = field.get_default(call_default_factory=True)
        if default == "unset":
            assert value is None, name
            continue
        assert re.fullmatch(r"`[^`]+`", default), (name, default)
        written = tomllib.loads(f"value = {default.strip('`')}")["value"]
        # As batchd.toml would give it: validated by the field's type.
        assert field.annotation is not None
        assert TypeAdapter(field.annotation).validate_python(written) == value, (name, default, value)


def test_each_documented_variable_is_one_batchd_reads() -> None:
    for name, (_, env, _) in documented().items():
        if env == "—":
            assert ".http." in name, f"{name}: only a list's entries lack a variable of their own"
            continue
        variable = env.strip("`")
        parts = name.replace(".NAME", "").replace(".MODEL", "").split(".")
        expected = "BATCHD_" + "__".join(parts).upper()
        assert variable.replace("__<NAME>", "").replace("__<MODEL>", "") == expected, name
        as_set = variable.replace("<NAME>", "ACME").replace("<MODEL>", "CLAUDE-X")
        assert unknown_variables({as_set: "1"}) == [], variable


def test_each_description_is_the_fields() -> None:
    rows = documented()
    for name, field, is_key in every_field():
        if is_key:
            assert rows[name][2] == (field.description or "").replace("|", "\\|"), name


@pytest.mark.parametrize(
    "section", ["database", "emulator", "tenants.NAME", "pricing.models.MODEL.long_prompt"]
)
def test_each_section_has_a_heading_with_its_description(section: str) -> None:
    text = DOC.read_text()
    assert f"### `[{section}]`" in text
    _, field, _ = next(
        entry for entry in every_field() if entry[0] in (section, section.removesuffix(".NAME"))
    )
    heading = text.split(f"### `[{section}]`", 1)[1]
    assert heading.lstrip("\n").startswith(field.description or "?")
