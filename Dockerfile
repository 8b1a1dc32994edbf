# One image for every Conveyor service; docker-compose.yml runs it with a different command
# per service (python -m conveyor.scheduler, conveyor.step_runner, conveyor.media,
# conveyor.run_recorder). The `conveyor` CLI is in it too.
FROM python:3.11-slim

# uv, pinned to the series the lock file and the uv_build backend were made with
COPY --from=ghcr.io/astral-sh/uv:0.13 /uv /uvx /bin/

# ffmpeg and ffprobe for the media service (Debian's package)
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Third-party dependencies first, from the lock file alone, so that a code change does not
# reinstall them: only the workspace manifests are needed for that.
COPY pyproject.toml uv.lock ./
COPY libs/contracts/pyproject.toml libs/contracts/
COPY libs/runtime/pyproject.toml libs/runtime/
COPY libs/testing/pyproject.toml libs/testing/
COPY services/scheduler/pyproject.toml services/scheduler/
COPY services/step-runner/pyproject.toml services/step-runner/
COPY services/media/pyproject.toml services/media/
COPY services/run-recorder/pyproject.toml services/run-recorder/
COPY cli/pyproject.toml cli/
RUN uv sync --frozen --no-dev --no-install-workspace

# Then Conveyor itself.
COPY libs libs
COPY services services
COPY cli cli
COPY examples examples
RUN uv sync --frozen --no-dev

RUN useradd --create-home --uid 1000 conveyor \
    && mkdir -p /data/media /data/artifacts \
    && chown -R conveyor:conveyor /data
USER conveyor
ENV CONVEYOR_MEDIA_ROOT=/data/media

CMD ["conveyor", "--help"]
