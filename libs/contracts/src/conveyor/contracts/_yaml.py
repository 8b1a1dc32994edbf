"""The YAML reader for definitions: PyYAML's safe loader (libyaml's when present) that
refuses a key given twice in one mapping. PyYAML keeps the last silently, so the first
(one of two ``with:`` blocks, say) would vanish without a word."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DefinitionLoader", "code_point"]


class DefinitionLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML, duplicate keys refused (see the module's docstring)."""


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base` then overriding a key of base is the point of a merge
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


DefinitionLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def code_point(character: str | int) -> int:
    """The C reader gives the offending character as a number, the Python one as text."""
    return ord(character) if isinstance(character, str) else int(character)
