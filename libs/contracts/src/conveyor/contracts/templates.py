"""Sandboxed Jinja2 templates over a run's data: ``{{ input.x }}``, ``{{ steps.a.output }}``.

A string that is one expression and nothing else (``"{{ input.companies }}"``) renders to
the expression's native value, so a list stays a list; any other string renders to text.
Undefined names are errors, never silent empty strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "TemplateError",
    "TemplateReads",
    "is_truthy",
    "referenced_steps",
    "render_text",
    "render_value",
    "template_reads",
    "template_strings",
]

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


class TemplateError(ValueError):
    """A template that does not parse, or names something its context lacks."""


def _tojson(value: Any) -> str:
    import json

    return json.dumps(value, default=str)


class _DataEnvironment(SandboxedEnvironment):
    """Templates read JSON data: ``input.items`` is the key ``items`` when there is one,
    not the dict method of that name (Jinja's default prefers the attribute)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


@lru_cache(maxsize=1)
def _environment() -> SandboxedEnvironment:
    env = _DataEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["tojson"] = _tojson
    return env


@lru_cache(maxsize=2048)
def _compile_template(source: str) -> jinja2.Template:
    return _environment().from_string(source)


@lru_cache(maxsize=2048)
def _compile_expression(source: str) -> Any:
    return _environment().compile_expression(source, undefined_to_none=False)


def _single_expression(source: str) -> str | None:
    match = _SINGLE_EXPRESSION.match(source)
    if match is None or "{{" in match["expr"] or "{%" in source:
        return None
    return match["expr"].strip()


def render_text(source: str, context: dict[str, Any]) -> str:
    try:
        return _compile_template(source).render(context)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{source!r}: {exc}") from None


def _render_string(source: str, context: dict[str, Any]) -> Any:
    if "{{" not in source and "{%" not in source:
        return source
    expr = _single_expression(source)
    if expr is None:
        return render_text(source, context)
    try:
        value = _compile_expression(expr)(**context)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{source!r}: {exc}") from None
    if isinstance(value, jinja2.Undefined):
        raise TemplateError(f"{source!r}: {expr} is undefined")
    return value


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside ``value`` (dicts and lists are walked)."""
    if isinstance(value, str):
        return _render_string(value, context)
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    return value


_FALSE_STRINGS = frozenset({"", "false", "0", "no", "off", "none", "null"})


def is_truthy(value: Any) -> bool:
    """Truth of a rendered ``when``: text like ``"False"`` is false, as a reader expects."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_STRINGS
    return bool(value)


def template_strings(value: Any) -> Iterator[tuple[str, str]]:
    """Yield ``(path, source)`` for every templated string inside ``value``."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "{{" in item or "{%" in item:
                yield path, item
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))


def referenced_steps(source: str) -> set[str]:
    """Step ids a template reads through ``steps.<id>`` or ``steps['<id>']``.

    Raises TemplateError when the template does not parse.
    """
    try:
        tree = _environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{source!r}: {exc.message}") from None
    return _steps_read(tree)


def _steps_read(tree: nodes.Template) -> set[str]:
    found: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr):
            if isinstance(node.node, nodes.Name) and node.node.name == "steps":
                found.add(node.attr)
        elif isinstance(node, nodes.Getitem) and (
            isinstance(node.node, nodes.Name)
            and node.node.name == "steps"
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
        ):
            found.add(node.arg.value)
    return found


@dataclass(frozen=True)
class TemplateReads:
    """What a template reads from its context: the names it loads and never sets itself
    (Jinja's globals such as ``range`` left out), the step ids it reads through
    ``steps``, and the keys it reads of ``input``."""

    names: frozenset[str]
    steps: frozenset[str]
    input_keys: frozenset[str]


def _is_name(node: nodes.Node, name: str) -> bool:
    return isinstance(node, nodes.Name) and node.name == name


@lru_cache(maxsize=2048)
def template_reads(source: str) -> TemplateReads:
    """Raises TemplateError when the template does not parse.

    A name set anywhere in the template (``{% set %}``, a loop variable) counts as its
    own: coarser than Jinja's scoping, and a fraction of the cost of its analysis."""
    env = _environment()
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{source!r}: {exc.message}") from None
    loaded: set[str] = set()
    stored: set[str] = set()
    for name in tree.find_all(nodes.Name):
        (stored if name.ctx in ("store", "param") else loaded).add(name.name)
    for block in tree.find_all(nodes.AssignBlock):
        if isinstance(block.target, nodes.Name):
            stored.add(block.target.name)
    keys: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node, nodes.Getattr) and _is_name(node.node, "input"):
            keys.add(node.attr)
        elif (
            isinstance(node, nodes.Getitem)
            and _is_name(node.node, "input")
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
        ):
            keys.add(node.arg.value)
    return TemplateReads(
        names=frozenset(loaded - stored - set(env.globals) - {"loop"}),
        steps=frozenset(_steps_read(tree)),
        input_keys=frozenset(keys),
    )
