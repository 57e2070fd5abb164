"""The stages of `jobcast submit`: `--op` and then one `--then` per further stage, each followed
by its own `--param key=value`; typed by the operation's params struct and checked before upload."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from msgspec import inspect as mi


@dataclass
class Stage:
    """One operation as given on the command line, with its `key=value` pairs in order."""

    op: str
    pairs: list[str] = field(default_factory=list)


class StageAction(argparse.Action):
    """`--op OP` starts the first stage, `--then OP` each further one, in the order given."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: str | Sequence[Any] | None, option_string: str | None = None,
    ) -> None:  # fmt: skip
        """Append a stage, keeping any `--param` given before the first `--op` for it."""
        stages: list[Stage] = list(getattr(namespace, self.dest) or [])
        if option_string == "--op" and stages:
            parser.error("--op starts the first stage; give each further stage with --then")
        if option_string == "--then" and not stages:
            parser.error("--then adds a stage after the one --op starts; give --op first")
        early: list[str] = [] if stages else list(getattr(namespace, "early_params", None) or [])
        stages.append(Stage(str(values), early))
        setattr(namespace, self.dest, stages)


class ParamAction(argparse.Action):
    """`--param key=value` belongs to the stage it follows (before any `--op`: to the first)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
        values: str | Sequence[Any] | None, option_string: str | None = None,
    ) -> None:  # fmt: skip
        """Add the pair to the last stage given so far."""
        stages: list[Stage] = getattr(namespace, "stages", None) or []
        if stages:
            stages[-1].pairs.append(str(values))
        else:
            namespace.early_params = [*(getattr(namespace, "early_params", None) or []), str(values)]


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """`--op`, `--then` and `--param` of `jobcast submit`."""
    parser.add_argument("--op", dest="stages", action=StageAction, metavar="OP",
                        help="the operation (the first stage of a pipeline)")  # fmt: skip
    parser.add_argument("--then", dest="stages", action=StageAction, metavar="OP",
                        help="a further stage, on the main output of the one before: makes a pipeline")  # fmt: skip
    parser.add_argument("--param", action=ParamAction, metavar="KEY=VALUE",
                        help="a param of the --op/--then it follows (repeatable); a list param takes a,b,c")  # fmt: skip
    parser.set_defaults(stages=None, early_params=None)


def _inner(kind: mi.Type) -> mi.Type:
    """The type under its `msgspec.Meta` wrappers and an optional's `| None`."""
    while True:
        if isinstance(kind, mi.Metadata):
            kind = kind.type
        elif isinstance(kind, mi.UnionType):
            options = [t for t in kind.types if not isinstance(t, mi.NoneType)]
            if len(options) != 1:
                return kind
            kind = options[0]
        else:
            return kind


def typed_value(text: str, kind: mi.Type) -> Any:
    """A command-line value as the param's type wants it: a list from `a,b,c` (or JSON), text as it
    is, anything else as JSON when it parses (numbers, true, null), else as text."""
    kind = _inner(kind)
    if isinstance(kind, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        if text.lstrip().startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                pass
        return [typed_value(item.strip(), kind.item_type) for item in text.split(",") if item.strip()]
    if isinstance(kind, mi.StrType) or (
        isinstance(kind, mi.LiteralType) and all(isinstance(v, str) for v in kind.values)
    ):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def resolve(stages: list[Stage] | None) -> list[tuple[str, dict[str, Any]]]:
    """Each stage's operation and typed params, checked against its params struct: ClientError for
    an unknown operation or param, or a value the operation refuses, before anything is uploaded."""
    # Imported here: every subcommand builds the parser, and only the client commands need these.
    from jobcast.client import ClientError
    from streams import OPERATIONS

    if not stages:
        raise ClientError("give the operation with --op (and each further stage with --then)")
    known = sorted(name for name, spec in OPERATIONS.items() if spec.needs_file)
    resolved = []
    for number, stage in enumerate(stages, 1):
        where = f"stage {number} ({stage.op})" if len(stages) > 1 else stage.op
        spec = OPERATIONS.get(stage.op)
        if spec is None or not spec.needs_file:
            raise ClientError(f"unknown operation {stage.op!r}; known operations: {', '.join(known)}")
        info = mi.type_info(spec.params)
        assert isinstance(info, mi.StructType)
        fields = {f.name: f.type for f in info.fields}
        params: dict[str, Any] = {}
        for pair in stage.pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ClientError(f"--param expects key=value, got {pair!r}")
            if key not in fields:
                raise ClientError(f"{where} has no param {key!r}; its params: {', '.join(sorted(fields))}")
            params[key] = typed_value(value, fields[key])
        try:
            msgspec.convert(params, spec.params)
        except msgspec.ValidationError as exc:
            raise ClientError(f"{where}: {exc}") from None
        resolved.append((spec.name, params))
    return resolved
