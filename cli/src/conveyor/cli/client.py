"""A small synchronous client for Conveyor's two HTTP APIs.

The control API (served by the scheduler) registers pipelines and triggers runs; the run
recorder answers questions about what happened. ``ConveyorClient`` talks to both and turns
every failure into a ``ConveyorError`` whose message is fit to show a user::

    from conveyor.cli.client import ConveyorClient

    with ConveyorClient() as conveyor:          # CONVEYOR_API_URL / CONVEYOR_RECORDER_URL
        run = conveyor.trigger("hello", {"name": "Ada"})
        final = conveyor.wait_for_run(run["run_id"], timeout=60)
        print(final["status"], final["output"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.cli.errors import (
    ApiError,
    ApiUnreachable,
    NotFound,
    PipelineRejected,
    Rejected,
    RunTimeout,
)

__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_RECORDER_URL",
    "TERMINAL_RUN_STATUSES",
    "ClientSettings",
    "ConveyorClient",
]

DEFAULT_API_URL = "http://127.0.0.1:8701"
DEFAULT_RECORDER_URL = "http://127.0.0.1:8700"
TERMINAL_RUN_STATUSES = frozenset({"succeeded", "failed", "cancelled", "skipped"})

_CONTROL = "control API"
_RECORDER = "run recorder"


class ClientSettings(BaseSettings):
    """``CONVEYOR_API_URL`` and ``CONVEYOR_RECORDER_URL``."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    api_url: str = DEFAULT_API_URL
    recorder_url: str = DEFAULT_RECORDER_URL


class ConveyorClient:
    """Both APIs behind one object; every method raises ``ConveyorError`` on failure."""

    def __init__(
        self,
        api_url: str | None = None,
        recorder_url: str | None = None,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
    ) -> None:
        settings = ClientSettings() if api_url is None or recorder_url is None else None
        self.api_url = (api_url or (settings.api_url if settings else DEFAULT_API_URL)).rstrip("/")
        self.recorder_url = (
            recorder_url or (settings.recorder_url if settings else DEFAULT_RECORDER_URL)
        ).rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"user-agent": "conveyor-cli"},
        )

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ConveyorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- control API ----------------------------------------------------------------------

    def register_pipeline(
        self,
        source: str,
        *,
        filename: str | None = None,
        prompts: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a definition (YAML or JSON text): ``{"name", "version", "digest", "created"}``.

        ``created`` is false when the definition equals the latest version. ``prompts``
        are the library prompts its steps name with ``prompt_ref`` (name -> prompt).
        """
        body: dict[str, Any] = {"source": source, "filename": filename}
        if prompts:
            body["prompts"] = prompts
        extra: dict[str, Any] = {}
        if "<AUTO>" in source + str(prompts):  # the control API asks a model first
            extra["timeout"] = httpx.Timeout(max(self._timeout, 180.0), connect=2.0)
        result: dict[str, Any] = self._call(_CONTROL, "POST", "/pipelines", json=body, **extra)
        return result

    def list_pipelines(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._call(_CONTROL, "GET", "/pipelines").get("items", [])
        return items

    def trigger(
        self,
        pipeline: str,
        input: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        requested_by: str = "cli",
    ) -> dict[str, Any]:
        """Request a run: ``{"run_id", "event_id", "pipeline"}``."""
        body = {
            "pipeline": pipeline,
            "input": input or {},
            "idempotency_key": idempotency_key,
            "requested_by": requested_by,
        }
        result: dict[str, Any] = self._call(_CONTROL, "POST", "/runs", json=body)
        return result

    def api_healthy(self) -> bool:
        return self._healthy(self.api_url)

    def schedules(self) -> list[dict[str, Any]]:
        """Cron schedules: ``[{"pipeline", "cron", "timezone", "catch_up", "paused",
        "next_fire_at", "last_fired_at"}]``."""
        items: list[dict[str, Any]] = self._call(_CONTROL, "GET", "/schedules").get("items", [])
        return items

    def pause(self, name: str, *, by: str | None = None) -> dict[str, Any]:
        """Stop a pipeline's schedule firing; ``NotFound`` when it has none."""
        return self._schedule_change(name, "pause", by)

    def unpause(self, name: str, *, by: str | None = None) -> dict[str, Any]:
        """Fire again from the next tick (the paused period is not caught up)."""
        return self._schedule_change(name, "unpause", by)

    def _schedule_change(self, name: str, action: str, by: str | None) -> dict[str, Any]:
        path = f"/pipelines/{quote(name, safe='')}/{action}"
        result: dict[str, Any] = self._call(_CONTROL, "POST", path, json={"by": by})
        return result

    def cancel_run(
        self, run_id: str, *, reason: str | None = None, requested_by: str = "cli"
    ) -> dict[str, Any]:
        """Cancel a run: ``{"run_id"}``. ``NotFound`` for an unknown run, ``Rejected`` (409)
        when it has ended already."""
        body = {"reason": reason, "requested_by": requested_by}
        path = f"/runs/{quote(run_id, safe='')}/cancel"
        result: dict[str, Any] = self._call(_CONTROL, "POST", path, json=body)
        return result

    def resume_run(self, run_id: str, *, requested_by: str = "cli") -> dict[str, Any]:
        """Resume a parked run: ``{"run_id"}``; ``Rejected`` (409) when it is not parked."""
        path = f"/runs/{quote(run_id, safe='')}/resume"
        result: dict[str, Any] = self._call(
            _CONTROL, "POST", path, json={"requested_by": requested_by}
        )
        return result

    def retry_run(
        self,
        run_id: str,
        *,
        from_step: str | None = None,
        edits: dict[str, Any] | None = None,
        requested_by: str = "cli",
    ) -> dict[str, Any]:
        """Run a finished run again from ``from_step`` (default: its first failed or cancelled
        step), upstream outputs reused, after applying ``edits`` such as ``{"input.name": "Bob",
        "steps.draft.with.prompt": "..."}``: ``{"run_id"}``. ``Rejected`` while the run still
        runs (409), or for an unknown step or path (422)."""
        body = {"from_step": from_step, "set": edits or {}, "requested_by": requested_by}
        path = f"/runs/{quote(run_id, safe='')}/retry"
        result: dict[str, Any] = self._call(_CONTROL, "POST", path, json=body)
        return result

    # --- run recorder ---------------------------------------------------------------------

    def list_runs(
        self,
        *,
        pipeline: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page: ``{"items": [run summary...], "next_cursor": str | None}``."""
        params = _params(pipeline=pipeline, status=status, limit=limit, cursor=cursor)
        result: dict[str, Any] = self._call(_RECORDER, "GET", "/runs", params=params)
        return result

    def get_run(self, run_id: str) -> dict[str, Any]:
        """A run with every step attempt; ``NotFound`` when the recorder does not know it
        (or it was deleted: the message says so)."""
        response = self._request(_RECORDER, "GET", f"/runs/{run_id}")
        if response.status_code == 404:
            raise NotFound(f"no run with id {run_id!r} is recorded")
        result: dict[str, Any] = _decode(_RECORDER, self.recorder_url, response)
        return result

    def delete_run(self, run_id: str, *, requested_by: str = "cli") -> dict[str, Any]:
        """Delete an ended run's history (its artifacts follow): ``{"run_id", "deleted_at",
        "deleted_by", "already_deleted"}``. ``NotFound`` for an unknown run, ``Rejected``
        (409) while it runs."""
        path = f"/runs/{quote(run_id, safe='')}"
        params = {"requested_by": requested_by}
        result: dict[str, Any] = self._call(_RECORDER, "DELETE", path, params=params)
        return result

    def run_state(self, run_id: str) -> str:
        """``"present"``, ``"deleted"`` (410) or ``"unknown"`` (404) in the recorder."""
        response = self._request(_RECORDER, "GET", f"/runs/{quote(run_id, safe='')}")
        if response.status_code == 410:
            return "deleted"
        if response.status_code == 404:
            return "unknown"
        _decode(_RECORDER, self.recorder_url, response)
        return "present"

    def find_run(self, run_id: str) -> dict[str, Any] | None:
        try:
            return self.get_run(run_id)
        except NotFound:
            return None

    def list_errors(
        self, *, pipeline: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        params = _params(pipeline=pipeline, limit=limit)
        items: list[dict[str, Any]] = self._call(_RECORDER, "GET", "/errors", params=params).get(
            "items", []
        )
        return items

    def dead_letters(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self._call(
            _RECORDER, "GET", "/dead-letters", params=_params(limit=limit)
        ).get("items", [])
        return items

    def recorder_healthy(self) -> bool:
        return self._healthy(self.recorder_url)

    def wait_for_run(
        self,
        run_id: str,
        *,
        timeout: float | None = None,
        appear_timeout: float = 30.0,
        poll_interval: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the recorder until the run ends; return its final record.

        A run just triggered is unknown to the recorder for a moment, so ``NotFound`` is
        raised only once ``appear_timeout`` has passed without it showing up. ``on_update``
        sees every record fetched, for live progress.
        """
        started = time.monotonic()
        while True:
            run = self.find_run(run_id)
            elapsed = time.monotonic() - started
            if run is None:
                if elapsed > appear_timeout:
                    raise NotFound(
                        f"run {run_id} did not appear in the run recorder at "
                        f"{self.recorder_url} within {appear_timeout:.0f}s"
                    )
            else:
                if on_update is not None:
                    on_update(run)
                if run.get("status") in TERMINAL_RUN_STATUSES:
                    return run
            if timeout is not None and elapsed > timeout:
                status = run.get("status") if run else "not recorded yet"
                raise RunTimeout(
                    f"run {run_id} did not finish within {timeout:.0f}s (status: {status})"
                )
            time.sleep(poll_interval)

    # --- plumbing -------------------------------------------------------------------------

    def _base(self, api: str) -> str:
        return self.api_url if api == _CONTROL else self.recorder_url

    def _healthy(self, base: str) -> bool:
        try:
            response = self._http.get(f"{base}/healthz", timeout=2.0)
        except (httpx.HTTPError, httpx.InvalidURL):
            return False
        return response.status_code == 200

    def _call(self, api: str, method: str, path: str, **kwargs: Any) -> Any:
        return _decode(api, self._base(api), self._request(api, method, path, **kwargs))

    def _request(self, api: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        base = self._base(api)
        try:
            return self._http.request(method, f"{base}{path}", **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise ApiUnreachable(
                f"cannot reach the {api} at {base}: is `conveyor up` running?"
            ) from None
        except httpx.TimeoutException:
            raise ApiUnreachable(
                f"the {api} at {base} did not answer within {self._timeout:.0f}s"
            ) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ApiUnreachable(f"cannot reach the {api} at {base}: {exc}") from None


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _decode(api: str, base: str, response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    if status < 400:
        if body is None:
            raise ApiError(
                f"the {api} at {base} answered {status} without JSON: {response.text[:200]!r}",
                status=status,
            )
        return body
    detail = body.get("detail") if isinstance(body, dict) else None
    if status in (404, 410):  # 410: a deleted run
        raise NotFound(_detail_text(detail) or f"{response.request.url.path} is not known")
    if status == 422:
        if isinstance(detail, dict) and isinstance(detail.get("problems"), list):
            raise PipelineRejected(detail["problems"])
        raise Rejected(_detail_text(detail) or "the request was rejected")
    if status == 409:  # the run's state refuses it: already ended, still running
        raise Rejected(_detail_text(detail) or "the request conflicts with the run's state")
    text = _detail_text(detail) or response.text[:200] or response.reason_phrase
    raise ApiError(f"the {api} at {base} answered {status}: {text}", status=status)


def _detail_text(detail: Any) -> str:
    """FastAPI's ``detail``: a string, or a list of validation errors, or a dict."""
    if detail is None:
        return ""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{where}: {item.get('msg', item)}" if where else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict) and "message" in detail:
        return str(detail["message"])
    return str(detail)
