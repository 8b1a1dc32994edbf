"""Deterministic, schema-valid JSON instances, worded after the field names and the prompt.

Covers what structured-output schemas use in practice (the ones pydantic, the OpenAI and
Anthropic SDKs generate): ``$ref``/``$defs``, ``anyOf``/``oneOf``/``allOf``, ``const``,
``enum``, nullable type lists, string formats and lengths, numeric bounds and
``multipleOf``, ``minItems``/``maxItems``/``prefixItems`` and required properties.
``pattern`` is not honoured: no general way to satisfy it exists.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 6
_FORMATS = {
    "date-time": "2024-01-01T12:00:00Z",
    "date": "2024-01-01",
    "time": "12:00:00Z",
    "duration": "PT1M",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


def topic_of(prompt: str, *, words: int = 12) -> str:
    """The first words of a prompt, on one line: what the fake's answers are about."""
    parts = prompt.split()
    topic = " ".join(parts[:words])
    return topic + (" ..." if len(parts) > words else "")


def schema_instance(schema: Mapping[str, Any], *, prompt: str, name: str = "answer") -> Any:
    """A value valid against ``schema``, with strings derived from field names and ``prompt``."""
    return _Builder(schema, topic=topic_of(prompt, words=8)).value(schema, name=name)


class _Builder:
    def __init__(self, root: Mapping[str, Any], *, topic: str) -> None:
        self._root = root
        self._topic = topic

    def value(self, schema: Any, *, name: str, index: int | None = None, depth: int = 0) -> Any:
        if not isinstance(schema, Mapping):  # `true` or a malformed schema: anything goes
            return self._string({}, name=name, index=index)
        schema = self._resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][(index or 0) % len(schema["enum"])]
        for keyword in ("anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list) and options:
                chosen = next((o for o in options if not _is_null(self._resolve(o))), options[0])
                rest = {k: v for k, v in schema.items() if k != keyword}
                return self.value(
                    {**rest, **self._resolve(chosen)}, name=name, index=index, depth=depth
                )
        kind = _type_of(schema)
        if kind == "object":
            return self._object(schema, name=name, index=index, depth=depth)
        if kind == "array":
            return self._array(schema, name=name, depth=depth)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer", index=index or 0)
        if kind == "boolean":
            return (index or 0) % 2 == 0
        if kind == "null":
            return None
        return self._string(schema, name=name, index=index)

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        """Follow local ``$ref`` pointers and merge ``allOf`` into one schema."""
        seen = 0
        while isinstance(schema.get("$ref"), str) and seen < 32:
            target = self._pointer(schema["$ref"])
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part) if isinstance(part, Mapping) else {}
                props = {**merged.get("properties", {}), **part.get("properties", {})}
                required = [*merged.get("required", []), *part.get("required", [])]
                merged = {**part, **merged, "properties": props, "required": required}
            schema = merged
        return schema

    def _pointer(self, ref: str) -> Mapping[str, Any]:
        if not ref.startswith("#"):
            return {}
        node: Any = self._root
        for token in filter(None, ref[1:].split("/")):
            token = token.replace("~1", "/").replace("~0", "~")
            node = node.get(token, {}) if isinstance(node, Mapping) else {}
        return node if isinstance(node, Mapping) else {}

    def _object(
        self, schema: Mapping[str, Any], *, name: str, index: int | None, depth: int
    ) -> dict[str, Any]:
        """All properties (only the required ones when deep); an item's fields share its index."""
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        keep = [k for k in properties if depth < _MAX_DEPTH or k in required]
        result = {
            key: self.value(properties[key], name=key, index=index, depth=depth + 1) for key in keep
        }
        extra = schema.get("additionalProperties", True)
        while len(result) < int(schema.get("minProperties", 0)) and extra is not False:
            key = f"{_singular(name)}_{len(result) + 1}"
            result[key] = self.value(
                extra if isinstance(extra, Mapping) else {"type": "string"},
                name=key,
                depth=depth + 1,
            )
        return result

    def _array(self, schema: Mapping[str, Any], *, name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or (
            schema["items"] if isinstance(schema.get("items"), list) else []
        )
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else None
        if items is None:
            items = schema.get("additionalItems") if prefix else {"type": "string"}
        item_kind = _type_of(self._resolve(items)) if isinstance(items, Mapping) else "string"
        default = 3 if item_kind not in ("object", "array") else 2
        count = max(int(schema.get("minItems", 0)), len(prefix) if prefix else default)
        if depth >= _MAX_DEPTH:
            count = max(int(schema.get("minItems", 0)), len(prefix))
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        if not isinstance(items, Mapping) and items is not True:
            count = min(count, len(prefix))  # `items: false` closes the tuple
        singular = _singular(name)
        return [
            self.value(
                prefix[i] if i < len(prefix) else items, name=singular, index=i, depth=depth + 1
            )
            for i in range(count)
        ]

    def _string(self, schema: Mapping[str, Any], *, name: str, index: int | None) -> str:
        label = _label(name) + (f" {index + 1}" if index is not None else "")
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "value"
        fmt = schema.get("format")
        if fmt in _FORMATS:
            return _FORMATS[fmt]
        if fmt == "email":
            return f"{slug}@example.com"
        if fmt in ("uri", "url", "iri", "uri-reference"):
            return f"https://example.com/{slug}"
        if fmt == "uuid":
            return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{slug}/{self._topic}"))
        text = f"{label}: {self._topic}" if self._topic else label
        min_length = int(schema.get("minLength", 0))
        while len(text) < min_length:
            text = f"{text} {label}"
        if "maxLength" in schema:
            text = text[: int(schema["maxLength"])].rstrip() or text[: int(schema["maxLength"])]
        return text


def _is_null(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "null"


def _type_of(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _number(schema: Mapping[str, Any], *, integer: bool, index: int) -> int | float:
    low, high = schema.get("minimum"), schema.get("maximum")
    low_open, high_open = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(low_open, bool):  # draft 4: a flag on `minimum`
        low_open = low if low_open else None
    if isinstance(high_open, bool):
        high_open = high if high_open else None
    if integer:
        if low_open is not None:
            low = max(low if low is not None else -math.inf, math.floor(low_open) + 1)
        if high_open is not None:
            high = min(high if high is not None else math.inf, math.ceil(high_open) - 1)
        low_open = high_open = None
    floor = low if low is not None else low_open
    ceiling = high if high is not None else high_open
    if floor is not None and ceiling is not None:
        value: float = floor + (ceiling - floor) * ((index + 1) / (index + 2))
        if integer:
            value = min(math.floor(floor) + index, ceiling)
            value = value if value >= floor else math.ceil(floor)
    elif floor is not None:
        value = floor + index + (1 if low_open is not None and low is None else 0)
    elif ceiling is not None:
        value = min(1 + index, ceiling - (1 if high_open is not None and high is None else 0))
    else:
        value = 1 + index if integer else 1.5 + index
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and step > 0:
        value = math.ceil(value / step) * step
        if ceiling is not None and value > ceiling:
            value = math.floor(ceiling / step) * step
    return int(value) if integer else float(value)


def _label(name: str) -> str:
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ").replace("-", " ")
    return " ".join(words.split()).capitalize() or "Value"


def _singular(name: str) -> str:
    if name.endswith("ies") and len(name) > 4:
        return name[:-3] + "y"
    if name.endswith(("sses", "xes", "ches", "shes")):
        return name[:-2]
    if name.endswith("s") and not name.endswith("ss") and len(name) > 3:
        return name[:-1]
    return name
