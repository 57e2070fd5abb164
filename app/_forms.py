"""The submit form's option fields, derived from each operation's params struct (one source of truth)."""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import msgspec
from msgspec import inspect as mi

from streams import OPERATIONS, OperationSpec

FieldKind = Literal["int", "float", "bool", "choice", "text"]


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


def _attribute_docs(struct: type[msgspec.Struct]) -> dict[str, str]:
    """The docstrings written under each field, from the struct and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(struct.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, msgspec.Struct)) or klass is msgspec.Struct:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _field(field: mi.Field, help_text: str) -> FormField | None:
    kind_of = field.type
    if isinstance(kind_of, mi.UnionType):  # `X | None`: optional, left empty by default
        options = [t for t in kind_of.types if not isinstance(t, mi.NoneType)]
        if len(options) != 1:
            return None
        kind_of = options[0]
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
    else:
        return None
    return FormField(field.name, kind, default, help_text, choices, low, high)


def _form(spec: OperationSpec) -> OperationForm:
    info = mi.type_info(spec.params)
    assert isinstance(info, mi.StructType)
    docs = _attribute_docs(spec.params)
    fields = tuple(f for f in (_field(field, docs.get(field.name, "")) for field in info.fields) if f)
    return OperationForm(spec.name, spec.description, spec.needs_file, fields)


@cache
def operation_forms() -> tuple[OperationForm, ...]:
    """Every operation's form, in the order the operations are declared."""
    return tuple(_form(spec) for spec in OPERATIONS.values())
