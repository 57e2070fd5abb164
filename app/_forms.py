"""The submit form's option fields, derived from each operation's params struct (one source of truth):
its types, limits and `msgspec.Meta` descriptions, the same that document the params in OpenAPI."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import msgspec
from msgspec import inspect as mi

from streams import OPERATIONS, OperationSpec

FieldKind = Literal["int", "float", "bool", "choice", "text", "list"]
"""`list`: a list of strings, typed as one text separated by commas or spaces."""


@dataclass(frozen=True, slots=True)
class FormField:
    """One input of an operation's options."""

    name: str
    kind: FieldKind
    default: Any
    """Shown pre-filled; None leaves the input empty (the option is then not sent)."""
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def label(self) -> str:
        """The field name as words."""
        return self.name.replace("_", " ").capitalize()


@dataclass(frozen=True, slots=True)
class OperationForm:
    """An operation as the submit page offers it."""

    name: str
    description: str
    needs_file: bool
    fields: tuple[FormField, ...]


def _unwrapped(kind_of: mi.Type) -> tuple[mi.Type, str]:
    """The type under its `msgspec.Meta` wrappers, and the description the outermost one gives."""
    described = ""
    while isinstance(kind_of, mi.Metadata):
        described = described or str((kind_of.extra_json_schema or {}).get("description", ""))
        kind_of = kind_of.type
    return kind_of, described


def _field(field: mi.Field) -> FormField | None:
    kind_of, help_text = _unwrapped(field.type)
    if isinstance(kind_of, mi.UnionType):  # `X | None`: optional, left empty by default
        options = [t for t in kind_of.types if not isinstance(t, mi.NoneType)]
        if len(options) != 1:
            return None
        kind_of, inner_help = _unwrapped(options[0])
        help_text = help_text or inner_help
    default = None if field.default is msgspec.NODEFAULT else field.default
    kind: FieldKind
    choices: tuple[str, ...] = ()
    low = high = None
    if isinstance(kind_of, mi.BoolType):
        kind = "bool"
    elif isinstance(kind_of, (mi.IntType, mi.FloatType)):
        kind = "int" if isinstance(kind_of, mi.IntType) else "float"
        low, high = kind_of.ge, kind_of.le
    elif isinstance(kind_of, mi.LiteralType):
        kind, choices = "choice", tuple(str(v) for v in kind_of.values)
    elif isinstance(kind_of, mi.StrType):
        kind = "text"
    elif isinstance(kind_of, mi.ListType) and isinstance(_unwrapped(kind_of.item_type)[0], mi.StrType):
        kind = "list"
        default = None if default is None else ", ".join(default)
    else:
        return None
    return FormField(field.name, kind, default, help_text, choices, low, high)


def _form(spec: OperationSpec) -> OperationForm:
    info = mi.type_info(spec.params)
    assert isinstance(info, mi.StructType)
    fields = tuple(f for f in (_field(field) for field in info.fields) if f)
    return OperationForm(spec.name, spec.description, spec.needs_file, fields)


@cache
def operation_forms() -> tuple[OperationForm, ...]:
    """Every operation's form, in the order the operations are declared."""
    return tuple(_form(spec) for spec in OPERATIONS.values())
