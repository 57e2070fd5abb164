"""OpenAPI for a job's `params`: each operation's params struct, so /schema describes every param
(with the `msgspec.Meta` descriptions and limits the submit form shows too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import OpenAPIType, Schema
from litestar.plugins import OpenAPISchemaPlugin
from litestar.typing import FieldDefinition

from streams import OPERATIONS


@dataclass(frozen=True, slots=True)
class OperationParamsDoc:
    """`Annotated` mark of a params field whose schema lists the operations' params structs."""


OPERATION_PARAMS = OperationParamsDoc()


class OperationParamsSchema(OpenAPISchemaPlugin):
    """Documents a field marked `OPERATION_PARAMS` as any one operation's params struct (or null,
    when optional). Documentation only: the API checks params against the struct that their
    operation names, with the same errors as before."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        """The marked fields only."""
        return OPERATION_PARAMS in field_definition.metadata

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Schema:
        """An `anyOf` of references to each params struct's component schema."""
        structs = dict.fromkeys(spec.params for spec in OPERATIONS.values())
        choices = Schema(
            type=OpenAPIType.OBJECT,
            any_of=[schema_creator.for_field_definition(FieldDefinition.from_annotation(s)) for s in structs],
        )
        if not field_definition.is_optional:
            return choices
        return Schema(one_of=[choices, Schema(type=OpenAPIType.NULL)])
