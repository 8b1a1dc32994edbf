"""Generate (``--write DIR``) or verify (``--check DIR``) the AsyncAPI 3.0 documents of the
events, one per service, from the services' FastStream apps.

The documents are generated from code and committed; ``--check`` fails when they are not
current, so a change to an event or a subscriber cannot land without its document.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml

__all__ = ["generate", "main"]

APPS = {
    "scheduler": "conveyor.scheduler.main",
    "step-runner": "conveyor.step_runner.main",
    "media": "conveyor.media.main",
    "run-recorder": "conveyor.run_recorder.main",
}

# Fixed values, so that the documents do not depend on the environment they are made in.
_ENVIRONMENT = {
    "CONVEYOR_KAFKA_BOOTSTRAP": "kafka:9092",
    "CONVEYOR_KAFKA_TOPIC_PREFIX": "conveyor",
    "CONVEYOR_DATABASE_URL": "postgresql://postgres@postgres:5432/conveyor",
}


def generate() -> dict[str, str]:
    os.environ.update(_ENVIRONMENT)
    from faststream.specification import AsyncAPI

    documents = {}
    for service, module_name in APPS.items():
        app = importlib.import_module(module_name).create_app()
        if app.schema is None or not isinstance(app.schema, AsyncAPI):
            app.schema = AsyncAPI(title=f"Conveyor {service}", version="1")
        app.schema.title = f"Conveyor {service}"
        # FastStream's channel order follows set iteration, which changes with the hash
        # seed: sorted keys make the document a pure function of the code.
        spec = yaml.safe_load(app.schema.to_specification().to_yaml())
        documents[f"{service}.yaml"] = yaml.safe_dump(spec, sort_keys=True, allow_unicode=True)
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="DIR")
    mode.add_argument("--check", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    documents = generate()
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in documents.items():
            (args.write / name).write_text(text, encoding="utf-8")
        return 0
    stale = [
        name
        for name, text in documents.items()
        if not (args.check / name).exists() or (args.check / name).read_text("utf-8") != text
    ]
    if stale:
        sys.stderr.write(
            f"AsyncAPI documents out of date: {', '.join(stale)}; run `make docs` and commit\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
