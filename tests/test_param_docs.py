"""Every param of every operation is described once, on its params struct, and that description
(with its limits) reaches both the OpenAPI document at /schema and the submit form."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import httpx
import msgspec

from streams import OPERATIONS


class FormOptions(HTMLParser):
    """The submit page's option inputs: (operation, field) -> help text and number bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.operation: str | None = None
        self.help: str | None = None
        self.inputs: dict[tuple[str, str], dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Remember the operation's fieldset and the option's label; record each input in them."""
        attributes = dict(attrs)
        if tag == "fieldset" and "options" in (attributes.get("class") or ""):
            self.operation = attributes.get("data-op")
        elif tag == "label" and attributes.get("class") == "option":
            self.help = attributes.get("title")
        elif tag in ("input", "select") and self.operation and attributes.get("name"):
            key = (self.operation, attributes["name"] or "")
            self.inputs[key] = {"help": self.help, "min": attributes.get("min"), "max": attributes.get("max")}

    def handle_endtag(self, tag: str) -> None:
        """Leave the fieldset or label."""
        if tag == "fieldset":
            self.operation = None
        elif tag == "label":
            self.help = None


def bound(prop: dict[str, Any], key: str) -> float | None:
    """`minimum` or `maximum` of a property, as a number (the form's attributes are text)."""
    return float(prop[key]) if key in prop else None


async def test_every_param_is_described_in_openapi_and_in_the_submit_form(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200, response.text
    components = response.json()["components"]["schemas"]
    for field in ("params", "parameters"):  # seed 003's name documents the same
        documented = components["SubmitJob"]["properties"][field]
        (choices,) = [branch for branch in documented["oneOf"] if branch.get("type") != "null"]
        refs = sorted(choice["$ref"].rpartition("/")[2] for choice in choices["anyOf"])
        assert refs == sorted({spec.params.__name__ for spec in OPERATIONS.values()}), field

    page = await client.get("/ui/")
    assert page.status_code == 200, page.text
    form = FormOptions()
    form.feed(page.text)

    assert len(OPERATIONS) >= 6
    for name, spec in OPERATIONS.items():
        properties = components[spec.params.__name__]["properties"]
        fields = [f.name for f in msgspec.structs.fields(spec.params)]
        assert sorted(properties) == sorted(fields), name
        for field in fields:
            prop = properties[field]
            description = prop.get("description")
            assert isinstance(description, str), f"{name}.{field}: {prop}"
            assert len(description) > 10, f"{name}.{field}: {prop}"
            option = form.inputs.get((name, field))
            assert option is not None, f"{name}.{field} has no input on the submit form"
            assert option["help"] == description, f"{name}.{field}"
            for key, attr in (("minimum", "min"), ("maximum", "max")):
                shown = option[attr]
                assert bound(prop, key) == (None if shown is None else float(shown)), f"{name}.{field} {key}"
