"""``output_schema``: from the step's shorthand to a JSON Schema, and a validator for answers.

The shorthand is a field map: ``{title: string, tags: [string], meta: {score: number},
note: "string?"}`` (``?``: may be null; types: string, integer, number, boolean, any).
A mapping with ``properties``, or whose keys are all JSON Schema keywords with a ``type``,
is taken as a JSON Schema as it is. Providers want an object at the root, so any other
root is wrapped as ``{"value": ...}`` for the request and unwrapped from the answer.

Answers are validated by a pydantic model built from the schema (strict types; extra
fields refused where the schema says ``additionalProperties: false``).
"""

from __future__ import annotations

import copy
import json
import keyword
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

__all__ = ["OutputSchema", "SchemaError"]

_TYPES = {"string", "integer", "number", "boolean", "object", "array", "null"}
_KEYWORDS = {
    "type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf",
    "$defs", "definitions", "$ref", "$schema", "title", "description", "additionalProperties",
    "format", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "pattern", "default", "examples", "nullable",
}  # fmt: skip
_SCALARS: dict[str, Any] = {
    "string": {"type": "string"},
    "str": {"type": "string"},
    "text": {"type": "string"},
    "integer": {"type": "integer"},
    "int": {"type": "integer"},
    "number": {"type": "number"},
    "float": {"type": "number"},
    "boolean": {"type": "boolean"},
    "bool": {"type": "boolean"},
}
_MAX_DEPTH = 12


class SchemaError(ValueError):
    """An ``output_schema`` that cannot be understood."""


def _compact(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, str):
        name = value.strip()
        nullable = name.endswith("?")
        name = name.rstrip("?").strip().lower()
        if name == "any":
            return {}
        if name not in _SCALARS:
            raise SchemaError(f"output_schema{path}: unknown type {value!r}")
        schema = dict(_SCALARS[name])
        return {"anyOf": [schema, {"type": "null"}]} if nullable else schema
    if isinstance(value, list):
        if len(value) != 1:
            raise SchemaError(f"output_schema{path}: a list is written [type], one element")
        return {"type": "array", "items": _compact(value[0], f"{path}[]")}
    if isinstance(value, dict):
        if _is_json_schema(value):
            return value
        return {
            "type": "object",
            "properties": {str(k): _compact(v, f"{path}.{k}") for k, v in value.items()},
            "required": [str(k) for k in value],
            "additionalProperties": False,
        }
    raise SchemaError(f"output_schema{path}: expected a type name, [type] or a map")


def _is_json_schema(value: dict[str, Any]) -> bool:
    if "properties" in value and isinstance(value["properties"], dict):
        return True
    kind = value.get("type")
    typed = kind in _TYPES or (isinstance(kind, list) and set(kind) <= _TYPES)
    return bool(value) and set(value) <= _KEYWORDS and (typed or "$ref" in value)


def _strict_ready(schema: Any, root: dict[str, Any], depth: int = 0) -> bool:
    """Whether OpenAI's strict mode accepts the schema once objects close."""
    if depth > _MAX_DEPTH or not isinstance(schema, dict):
        return False
    if "$ref" in schema:
        return True  # the definitions are checked on their own
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties")
        extra = schema.get("additionalProperties", False)
        if not isinstance(props, dict) or extra not in (False, None):
            return False
        if set(schema.get("required", [])) != set(props):
            return False
        schema["additionalProperties"] = False
        return all(_strict_ready(p, root, depth + 1) for p in props.values())
    if "items" in schema:
        return _strict_ready(schema["items"], root, depth + 1)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return all(_strict_ready(s, root, depth + 1) for s in schema[key])
    return bool(schema)  # "any" ({}) cannot be expressed in strict mode


@dataclass(frozen=True)
class OutputSchema:
    """The JSON Schema sent to the provider and the validator of what comes back."""

    schema: dict[str, Any]
    """Always an object at the root (what the providers accept)."""
    strict: bool
    wrapped: bool
    model: type[BaseModel]

    @classmethod
    def parse(cls, value: dict[str, Any] | str) -> OutputSchema:
        if isinstance(value, str):
            value = {"value": value}
            spec = _compact(value, "")
            wrapped = True
        else:
            spec = copy.deepcopy(_compact(value, ""))
            wrapped = spec.get("type") not in ("object", None) or "properties" not in spec
            if wrapped:
                spec = {
                    "type": "object",
                    "properties": {"value": spec},
                    "required": ["value"],
                    "additionalProperties": False,
                }
        strict_copy = copy.deepcopy(spec)
        defs = strict_copy.get("$defs") or strict_copy.get("definitions") or {}
        strict = _strict_ready(strict_copy, strict_copy) and all(
            _strict_ready(d, strict_copy) for d in defs.values()
        )
        model = _Builder(spec).model(spec, "Answer")
        return cls(schema=strict_copy if strict else spec, strict=strict, wrapped=wrapped,
                   model=model)  # fmt: skip

    def validate(self, text: str | None) -> Any:
        """The answer parsed and validated; raises ValueError with a readable reason."""
        if not text:
            raise ValueError("the answer is empty, not JSON")
        text = _strip_fences(text)
        try:
            self.model.model_validate_json(text)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:5]
            ]
            raise ValueError("; ".join(problems)) from None
        data = json.loads(text)  # as the model wrote it: 1 stays 1 where a number is asked
        return data.get("value") if self.wrapped else data


def _strip_fences(text: str) -> str:
    """Models sometimes wrap JSON in a Markdown code fence even when asked not to."""
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    return match.group(1) if match else text


class _Builder:
    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._count = 0

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target: Any = self._root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return target if isinstance(target, dict) else {}

    def model(self, schema: dict[str, Any], name: str, depth: int = 0) -> type[BaseModel]:
        self._count += 1
        required = set(schema.get("required", []))
        fields: dict[str, Any] = {}
        for i, (prop, sub) in enumerate((schema.get("properties") or {}).items()):
            kind = self.type_of(sub, f"{name}_{i}", depth + 1)
            attr = _attr_name(prop, i)
            default: Any = ... if prop in required else None
            fields[attr] = (kind if prop in required else Optional[kind],  # noqa: UP045
                            Field(default, alias=prop))  # fmt: skip
        extra: Literal["forbid", "allow"] = (
            "forbid" if schema.get("additionalProperties") is False else "allow"
        )
        config = ConfigDict(strict=True, extra=extra, populate_by_name=False)
        return create_model(f"{name}{self._count}", __config__=config, **fields)

    def type_of(self, schema: Any, name: str, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(schema, dict):
            return Any
        schema = self._resolve(schema)
        if "const" in schema:
            return Literal[schema["const"]]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return Literal[tuple(schema["enum"])]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                kinds = tuple(
                    self.type_of(o, f"{name}_{j}", depth + 1) for j, o in enumerate(options)
                )
                return Union[kinds]  # noqa: UP007
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = tuple(self.type_of({**schema, "type": k}, name, depth) for k in kind)
            return Union[kinds]  # noqa: UP007
        if kind == "object" or "properties" in schema:
            if not schema.get("properties"):
                return dict[str, Any]
            return self.model(schema, name, depth)
        if kind == "array":
            return list[self.type_of(schema.get("items", {}), f"{name}_item", depth + 1)]  # type: ignore[misc]
        return {"string": str, "integer": int, "number": float, "boolean": bool,
                "null": type(None)}.get(kind, Any)  # fmt: skip


def _attr_name(prop: str, index: int) -> str:
    name = re.sub(r"\W", "_", prop)
    if not name or name[0].isdigit() or name.startswith("_") or keyword.iskeyword(name):
        name = f"f{index}_{name}"
    if name in BaseModel.__dict__ or name.startswith("model_"):
        name = f"f{index}_{name}"
    return name
