"""The prompt library on disk: ``prompts/*.yaml`` beside a pipeline file, or above it.

``conveyor pipelines validate|apply`` look for a ``prompts/`` directory in the pipeline
file's directory and then in each parent (so ``examples/brief.yaml`` finds the repository's
``prompts/``), unless ``--prompts DIR`` names one. Only the prompts a pipeline names with
``prompt_ref`` are sent with it: the control API resolves them into the registered
version, which then no longer depends on the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conveyor.contracts import Problem, parse_prompt

__all__ = ["PromptLibrary", "find_prompts_dir", "prompt_refs"]

_SUFFIXES = (".yaml", ".yml", ".json")


def find_prompts_dir(pipeline_file: Path) -> Path | None:
    """The nearest ``prompts/`` directory at or above the file's directory."""
    start = pipeline_file.resolve().parent
    for directory in (start, *start.parents):
        candidate = directory / "prompts"
        if candidate.is_dir():
            return candidate
    return None


def prompt_refs(source: str) -> list[str]:
    """The prompt names a definition's steps use (empty when it does not parse: the
    pipeline's own validation reports that)."""
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError:
        return []
    steps = data.get("steps") if isinstance(data, dict) else None
    names = []
    for step in steps if isinstance(steps, list) else []:
        config = step.get("with") if isinstance(step, dict) else None
        ref = config.get("prompt_ref") if isinstance(config, dict) else None
        if isinstance(ref, str):
            names.append(ref)
    return list(dict.fromkeys(names))


@dataclass
class PromptLibrary:
    """The prompts of one directory, by name, each with the file it came from."""

    directory: Path | None
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    """Problems of a prompt's file, by prompt name (the file's stem when unreadable)."""

    @classmethod
    def load(cls, directory: Path | None) -> PromptLibrary:
        library = cls(directory)
        if directory is None:
            return library
        for path in sorted(p for p in directory.iterdir() if p.suffix in _SUFFIXES):
            library._add(path)
        return library

    def _add(self, path: Path) -> None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            message = f"not a readable YAML prompt: {getattr(exc, 'problem', None) or exc}"
            self.problems[path.stem] = [Problem(file=str(path), message=message)]
            return
        name = raw.get("name", path.stem) if isinstance(raw, dict) else path.stem
        name = str(name)
        if name in self.files:
            message = f"prompt {name!r} is also defined in {self.files[name]}"
            self.problems.setdefault(name, []).append(
                Problem(file=str(path), field="name", message=message)
            )
            return
        self.files[name] = path
        _, issues = parse_prompt(name, raw)
        if issues:
            self.problems[name] = [
                Problem(file=str(path), field=f or None, message=m) for f, m in issues
            ]
        else:
            self.prompts[name] = dict(raw)

    def for_pipeline(self, source: str) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
        """The prompts a definition names, and the problems of their files.

        An unknown name is left to ``load_pipeline``, which names the step and the field.
        """
        sent: dict[str, dict[str, Any]] = {}
        problems: list[Problem] = []
        for name in prompt_refs(source):
            if name in self.problems:
                problems.extend(self.problems[name])
            elif name in self.prompts:
                sent[name] = self.prompts[name]
        return sent, problems
