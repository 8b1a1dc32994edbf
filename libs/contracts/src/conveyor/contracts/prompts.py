"""The prompt library and AUTO asks: prompt text a pipeline does not spell out itself.

A library prompt (``prompts/summarize.yaml``) declares its variables and its text::

    name: summarize
    variables: {text: {type: string}, words: {type: integer, default: 50}}
    system: You write tight summaries.
    template: "Summarize in {{ words }} words: {{ text }}"

An ``llm`` step names it with ``prompt_ref`` and passes ``prompt_vars`` (values may be
templates over the run: ``"{{ steps.fetch.output.text }}"``). ``expand_prompt_ref``
replaces both with the prompt's ``system`` and ``prompt`` text at registration, so the
registered version is self-contained and never changes when the library does. Each
variable becomes a ``{% set %}`` in front of the text, so the runner renders the run's
values into it with their types intact.

An AUTO ask (``"<AUTO>a system prompt for a friendly tutor</AUTO>"``) anywhere in a step's
``with`` is answered by a model. With ``auto: {resolve: registration}`` (default) that
happens once, when the pipeline is registered; the answer and the ask are kept in the
spec's ``auto_resolved``. With ``auto: {resolve: run_start}`` it happens once per run:
``spec_for_run`` (in ``pipeline``) puts a synthetic ``llm`` step with the id ``auto``
(``AUTO_STEP``) in front of the pipeline, asking every question in one call with an
``output_schema`` of one string field per ask (``auto_field``); ``fill_auto`` puts that
step's answers in place of the tags when a step's config is built for a run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from jinja2 import TemplateSyntaxError, meta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conveyor.contracts.templates import _environment, _single_expression

__all__ = [
    "AUTO_STEP",
    "AUTO_TAG",
    "RESERVED_NAMES",
    "AutoOptions",
    "AutoResolution",
    "PromptSpec",
    "PromptVariable",
    "auto_asks",
    "auto_field",
    "expand_prompt_ref",
    "fill_auto",
    "literal_text",
    "parse_prompt",
    "step_auto_asks",
]

AUTO_TAG = re.compile(r"<AUTO>(?P<ask>.*?)</AUTO>", re.DOTALL)
AUTO_STEP = "auto"
"""The id of the synthetic step answering ``resolve: run_start`` asks (reserved then)."""
_TEMPLATE_MARKS = re.compile(r"\{\{|\{%|\{#")
_NOT_FIELD = re.compile(r"[^A-Za-z0-9_]+")
RESERVED_NAMES = frozenset({"input", "steps", "item", "item_index", "secrets"})
"""Names a step's templates read from the run: a prompt variable may not hide them."""

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptVariable(_Model):
    type: Literal["string", "number", "integer", "boolean", "object", "array", "any"] = "any"
    default: Any = None
    """Without a default the variable is required."""
    description: str | None = None

    @property
    def required(self) -> bool:
        return "default" not in self.model_fields_set


class PromptSpec(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=128)
    description: str | None = None
    variables: dict[str, PromptVariable] = Field(default_factory=dict)
    system: str | None = None
    template: str = Field(min_length=1)


class AutoOptions(_Model):
    """``auto:`` on a pipeline: how ``<AUTO>`` asks in its steps are answered."""

    resolve: Literal["registration", "run_start"] = "registration"
    """When: once, as the version is registered (the answers are stored in the version),
    or once per run, by a synthetic ``llm`` step ``auto`` that every step waits for."""
    model: str = "openai/gpt-4o-mini"
    """``provider/model``: ``openai/...`` or ``anthropic/...``."""


class AutoResolution(_Model):
    """One AUTO ask and the model's answer, as recorded in the registered version."""

    ask: str
    value: str
    model: str


def parse_prompt(name: str, raw: Any) -> tuple[PromptSpec | None, list[tuple[str, str]]]:
    """Validate one library prompt: ``(spec, [])`` or ``(None, [(field, message)...])``."""
    if not isinstance(raw, dict):
        return None, [("", "a prompt must be a mapping with name, variables and template")]
    try:
        prompt = PromptSpec.model_validate({"name": name, **raw})
    except ValidationError as exc:
        return None, [
            (
                ".".join(str(p) for p in err["loc"]),
                "unknown field" if err["type"] == "extra_forbidden" else err["msg"],
            )
            for err in exc.errors(include_url=False)
        ]
    if prompt.name != name:
        return None, [("name", f"is {prompt.name!r}, but the prompt is filed as {name!r}")]
    problems: list[tuple[str, str]] = []
    for var, declared in prompt.variables.items():
        if var in RESERVED_NAMES or not var.isidentifier():
            problems.append((f"variables.{var}", "is reserved or not a valid name"))
        elif not declared.required and not _has_type(declared.default, declared.type, True):
            problems.append((f"variables.{var}.default", f"must be {declared.type}"))
    for field in ("system", "template"):
        text = getattr(prompt, field)
        if text is None:
            continue
        try:
            used = meta.find_undeclared_variables(_environment().parse(text))
        except TemplateSyntaxError as exc:
            problems.append((field, f"template does not parse: {exc.message}"))
            continue
        for var in sorted(used - set(prompt.variables)):
            problems.append((field, f"uses undeclared variable {var!r}"))
    return (None, problems) if problems else (prompt, [])


def expand_prompt_ref(
    config: dict[str, Any], prompts: Mapping[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Replace ``prompt_ref``/``prompt_vars`` in a step's ``with`` by the prompt's text.

    Returns the new config and the problems found, each ``(field, message)`` with the
    field relative to the step (``with.prompt_vars.text``).
    """
    config = dict(config)
    ref = config.pop("prompt_ref", None)
    given = config.pop("prompt_vars", None)
    if ref is None:
        return config, [("with.prompt_vars", "needs prompt_ref, the prompt they fill in")]
    if not isinstance(ref, str) or ref not in prompts:
        known = ", ".join(sorted(prompts)) or "none were sent: is there a prompts/ directory?"
        return config, [("with.prompt_ref", f"unknown prompt {ref!r} (known: {known})")]
    prompt, invalid = parse_prompt(ref, prompts[ref])
    if prompt is None:
        detail = "; ".join(f"{f}: {m}" if f else m for f, m in invalid)
        return config, [("with.prompt_ref", f"prompt {ref!r} is invalid: {detail}")]
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return config, [("with.prompt_vars", "must be a mapping of variable names to values")]
    problems = _variable_problems(prompt, given)
    clash = [key for key in ("prompt", "messages") if key in config]
    if clash:
        problems.append(("with.prompt_ref", f"cannot be combined with {clash[0]!r}"))
    values = {var: given.get(var, declared.default) for var, declared in prompt.variables.items()}
    expressions: dict[str, str] = {}
    for var, value in values.items():
        try:
            expressions[var] = _set_statement(var, value)
        except ValueError as exc:
            problems.append((f"with.prompt_vars.{var}", str(exc)))
    if problems:
        return config, problems
    config["prompt"] = _with_variables(prompt.template, expressions)
    if prompt.system is not None:
        config.setdefault("system", _with_variables(prompt.system, expressions))
    return config, []


def _variable_problems(prompt: PromptSpec, given: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    declared_names = ", ".join(sorted(prompt.variables)) or "none"
    for var in sorted(set(given) - set(prompt.variables)):
        problems.append(
            (
                f"with.prompt_vars.{var}",
                f"prompt {prompt.name!r} declares no variable {var!r} (declared: {declared_names})",
            )
        )
    for var, declared in prompt.variables.items():
        if var not in given:
            if declared.required:
                problems.append(
                    (f"with.prompt_vars.{var}", f"required by prompt {prompt.name!r}, not given")
                )
        elif not _has_type(given[var], declared.type, not declared.required):
            problems.append(
                (
                    f"with.prompt_vars.{var}",
                    f"must be {declared.type}, got {type(given[var]).__name__}",
                )
            )
    return problems


def _has_type(value: Any, type_: str, none_ok: bool) -> bool:
    """Static values are checked now; a template is checked by the runner once rendered."""
    if value is None:
        return none_ok
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        return True
    expected = _TYPES.get(type_)
    if expected is None:
        return True
    wrong_bool = isinstance(value, bool) and type_ in ("number", "integer")
    return isinstance(value, expected) and not wrong_bool


def _set_statement(var: str, value: Any) -> str:
    # Text mixing templates (or an AUTO ask, answered later) goes in a block set: it stays
    # text, and an answer pasted in needs no quoting.
    if isinstance(value, str) and (
        "<AUTO>" in value
        or (("{{" in value or "{%" in value) and _single_expression(value) is None)
    ):
        return f"{{% set {var} %}}{value}{{% endset %}}"
    return f"{{% set {var} = {_expression(value)} %}}"


def _expression(value: Any) -> str:
    """A Jinja expression for a variable's value: a literal, or the template's expression."""
    if isinstance(value, str):
        if "<AUTO>" in value:
            raise ValueError("an <AUTO> ask inside a list or mapping: give it its own variable")
        if "{{" in value or "{%" in value:
            expr = _single_expression(value)
            if expr is None:
                raise ValueError(
                    "inside a list or mapping, a template must be one {{ expression }}"
                )
            return f"({expr})"
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_expression(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {_expression(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ValueError(f"cannot pass a {type(value).__name__} to a prompt")


def _with_variables(text: str, expressions: dict[str, str]) -> str:
    used = meta.find_undeclared_variables(_environment().parse(text))
    preamble = "".join(expressions[var] for var in expressions if var in used)
    return preamble + text


def auto_asks(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield ``(path, ask)`` for every ``<AUTO>ask</AUTO>`` inside ``value``, in order."""
    if isinstance(value, str):
        for match in AUTO_TAG.finditer(value):
            yield path, match["ask"].strip()
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from auto_asks(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from auto_asks(item, f"{path}[{index}]")


def step_auto_asks(step_id: str, config: Any) -> list[tuple[str, str]]:
    """``(path, ask)`` for each ``<AUTO>`` tag of one step's ``with``, in order. The path is
    ``steps.<id>.with.<key>``; the second tag in one string is ``...#2``, and so on."""
    found: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for path, ask in auto_asks(config, f"steps.{step_id}.with"):
        seen[path] = seen.get(path, 0) + 1
        found.append((path if seen[path] == 1 else f"{path}#{seen[path]}", ask))
    return found


def auto_field(path: str) -> str:
    """The ``output_schema`` field answering the ask at ``path``:
    ``steps.draft.with.system`` -> ``steps__draft__with__system``."""
    return _NOT_FIELD.sub("__", path).strip("_")


def literal_text(text: str) -> str:
    """Step configs are templates: an answer that happens to contain ``{{`` stays text."""
    if _TEMPLATE_MARKS.search(text):
        return "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}"
    return text


def fill_auto(config: Any, path: str, answers: Mapping[str, Any]) -> Any:
    """``config`` (found at ``path``, e.g. ``steps.draft.with``) with each ``<AUTO>`` tag
    replaced by its answer: ``answers`` maps ``auto_field(path)`` to the text. A tag
    without an answer is left as it is."""
    if isinstance(config, str):
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            count += 1
            answer = answers.get(auto_field(path if count == 1 else f"{path}#{count}"))
            return literal_text(answer) if isinstance(answer, str) else match[0]

        return AUTO_TAG.sub(replace, config)
    if isinstance(config, dict):
        return {k: fill_auto(v, f"{path}.{k}", answers) for k, v in config.items()}
    if isinstance(config, list):
        return [fill_auto(v, f"{path}[{i}]", answers) for i, v in enumerate(config)]
    return config
