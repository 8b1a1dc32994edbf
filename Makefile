# Every target sets itself up: a fresh clone needs only Python 3.11+ (uv is installed with
# pip when missing). The Python that uv uses is the machine's own; nothing is downloaded
# but packages.
export UV_PYTHON_DOWNLOADS := never
# Services start as fresh processes (tests start hundreds): compiled bytecode makes each
# start seconds faster, and this machine sets PYTHONDONTWRITEBYTECODE.
export UV_COMPILE_BYTECODE := 1
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: setup demo up test chaos bench lint format docs docs-check clean

setup:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@$(UV) sync --locked --quiet

demo: setup  ## the example pipelines end to end on a fresh local stack
	$(UV) run conveyor demo

up: setup  ## broker + database + every service in the foreground
	$(UV) run conveyor up

test: setup  ## unit, integration and end-to-end tests (real broker, real PostgreSQL)
	$(UV) run pytest

chaos: setup  ## the reliability suite at full scale: kills under load, poison, a broker restart
	CONVEYOR_CHAOS_SCALE=full $(UV) run pytest tests/chaos -m chaos

bench: setup  ## Conveyor vs Celery, same workload and machine; appends bench/results.md
	$(UV) run python bench/run.py

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy $(foreach p,contracts runtime scheduler run_recorder media step_runner cli testing,-p conveyor.$(p))

format: setup
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

docs: setup  ## regenerate the AsyncAPI documents from the FastStream apps
	$(UV) run python -m conveyor.cli.asyncapi --write docs/asyncapi

docs-check: setup
	$(UV) run python -m conveyor.cli.asyncapi --check docs/asyncapi

clean:
	rm -rf .conveyor .pytest_cache .ruff_cache .mypy_cache
