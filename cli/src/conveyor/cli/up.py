"""``conveyor up``: a broker, a database and every service, supervised in the foreground.

``local_stack`` is the same thing as a context manager, for ``conveyor demo`` and tests::

    with local_stack(quiet=True) as stack:
        with stack.client() as conveyor:
            conveyor.register_pipeline(Path("examples/hello.yaml").read_text())

Everything it starts it stops on the way out, in reverse order: services (SIGTERM, then a
wait), the embedded broker, the embedded PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from conveyor.cli import _startup
from conveyor.cli import stack as _stack
from conveyor.cli.client import ClientSettings, ConveyorClient
from conveyor.cli.errors import BadInput, StackError

__all__ = ["DEFAULT_BROKER_PORT", "LocalStack", "local_stack", "parse_services", "run_up"]

DEFAULT_BROKER_PORT = 19092
_DEFAULT_HOME = Path(".conveyor")
# which service answers which API's /healthz
_API_SERVICE = "scheduler"
_RECORDER_SERVICE = "run-recorder"
# Fast group joins on the embedded broker: a join takes about half the session timeout.
_EMBEDDED_BROKER_TIMINGS = {
    "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
}


@dataclass
class LocalStack:
    """What ``local_stack`` started, and where to reach it."""

    api_url: str
    recorder_url: str
    bootstrap: str
    database_url: str
    topic_prefix: str
    home: Path
    logs: Path
    media_root: Path
    embedded_broker: bool
    embedded_database: bool
    supervisor: _stack.Supervisor
    service_env: dict[str, str] = field(default_factory=dict)
    fake_llm_url: str | None = None
    """Set when no LLM key or endpoint was configured: the fake provider's URL."""

    def client(self, **kwargs: Any) -> ConveyorClient:
        return ConveyorClient(self.api_url, self.recorder_url, **kwargs)

    @property
    def client_env(self) -> dict[str, str]:
        """The variables that point a CLI or client at this stack."""
        return {
            "CONVEYOR_API_URL": self.api_url,
            "CONVEYOR_RECORDER_URL": self.recorder_url,
            "CONVEYOR_KAFKA_BOOTSTRAP": self.bootstrap,
            "CONVEYOR_KAFKA_TOPIC_PREFIX": self.topic_prefix,
        }

    @property
    def processes(self) -> list[_stack.ServiceProcess]:
        return self.supervisor.services


def parse_services(text: str | None) -> list[str]:
    """``scheduler,step-runner`` -> names, each a known service."""
    if not text:
        return list(_stack.SERVICES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _stack.SERVICES]
    if unknown:
        known = ", ".join(_stack.SERVICES)
        raise BadInput(f"unknown service {unknown[0]!r} (known: {known})")
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def local_stack(
    *,
    services: Sequence[str] | None = None,
    runners: int = 1,
    home: Path | None = None,
    quiet: bool = False,
    console: Console | None = None,
    api_url: str | None = None,
    recorder_url: str | None = None,
    bootstrap: str | None = None,
    database_url: str | None = None,
    topic_prefix: str | None = None,
    broker_port: int = DEFAULT_BROKER_PORT,
    free_ports: bool = False,
    modules: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout: float = 60.0,
    fake_llm: bool | None = None,
) -> Iterator[LocalStack]:
    """Start a broker, a database and the services; yield once both APIs answer.

    Each piece comes from the environment when set (``CONVEYOR_KAFKA_BOOTSTRAP``,
    ``CONVEYOR_DATABASE_URL``, ``CONVEYOR_API_URL``, ``CONVEYOR_RECORDER_URL``), else is
    started here: the embedded broker (memory only) and an embedded PostgreSQL with its
    data under ``home/pg``. ``free_ports`` picks free ports for whatever is busy instead
    of failing. ``quiet`` keeps service output to the log files under ``home/logs``.
    ``fake_llm`` starts the fake LLM provider for the services (default: when neither the
    environment nor ``extra_env`` configures a provider).
    """
    modules = {**_stack.SERVICES, **(modules or {})}
    names = list(services) if services is not None else list(_stack.SERVICES)
    _startup.check_runnable(modules, names)
    if runners < 1:
        raise BadInput("--runners must be at least 1")

    settings = ClientSettings()
    api_url = (api_url or settings.api_url).rstrip("/")
    recorder_url = (recorder_url or settings.recorder_url).rstrip("/")
    if _API_SERVICE in names:
        port = _startup.claim_port(
            _startup.port_of(api_url, 8701),
            what="control API",
            env_hint="CONVEYOR_API_URL",
            free_ports=free_ports,
        )
        api_url = _startup.with_port(api_url, port)
    if _RECORDER_SERVICE in names:
        port = _startup.claim_port(
            _startup.port_of(recorder_url, 8700),
            what="run recorder",
            env_hint="CONVEYOR_RECORDER_URL",
            free_ports=free_ports,
        )
        recorder_url = _startup.with_port(recorder_url, port)

    home = (home or _DEFAULT_HOME).resolve()
    logs = home / "logs"
    media_root = Path(os.environ.get("CONVEYOR_MEDIA_ROOT") or home / "media").resolve()
    artifacts = Path(os.environ.get("CONVEYOR_MEDIA_ARTIFACT_DIR") or home / "artifacts").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    media_root.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if not quiet and console is not None:
            console.print(message)

    output = _startup.ServiceOutput(logs, None if quiet else console)

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(output.close)

        bootstrap = bootstrap or os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP")
        embedded_broker = not bootstrap
        if not bootstrap:
            port = _startup.claim_port(
                broker_port,
                what="embedded broker",
                env_hint="CONVEYOR_KAFKA_BOOTSTRAP",
                free_ports=free_ports,
            )
            try:
                broker = _stack.start_broker(port, log_file=logs / "broker.log")
            except RuntimeError as exc:
                raise StackError(f"{exc} (see {logs / 'broker.log'})") from None
            cleanup.callback(broker.stop)
            bootstrap = broker.bootstrap
            say(
                f"broker     {bootstrap}  [yellow]embedded Tansu, memory only: topics and "
                f"offsets are lost when it stops[/yellow]"
            )
        else:
            say(f"broker     {bootstrap}")

        database_url = database_url or os.environ.get("CONVEYOR_DATABASE_URL")
        embedded_database = not database_url
        if not database_url:
            try:
                server, server_url = _stack.start_embedded_postgres(home / "pg")
            except Exception as exc:
                raise StackError(f"the embedded PostgreSQL did not start: {exc}") from None
            cleanup.callback(server.cleanup)  # type: ignore[attr-defined]
            database_url = _stack.create_database(server_url, "conveyor")
            say(f"database   embedded PostgreSQL, data in {home / 'pg'}")
        else:
            say(f"database   {_startup.hide_password(database_url)}")

        prefix = topic_prefix or os.environ.get("CONVEYOR_KAFKA_TOPIC_PREFIX") or "conveyor"
        partitions = _startup.topic_partitions(
            runners=runners,
            configured=(extra_env or {}).get("CONVEYOR_KAFKA_PARTITIONS")
            or os.environ.get("CONVEYOR_KAFKA_PARTITIONS"),
            embedded=embedded_broker,
        )
        _startup.ensure_topics(bootstrap, prefix, partitions)

        env = {
            "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
            "CONVEYOR_DATABASE_URL": database_url,
            "CONVEYOR_KAFKA_TOPIC_PREFIX": prefix,
            "CONVEYOR_API_URL": api_url,
            "CONVEYOR_RECORDER_URL": recorder_url,
            "CONVEYOR_API_PORT": str(_startup.port_of(api_url, 8701)),
            "CONVEYOR_RECORDER_PORT": str(_startup.port_of(recorder_url, 8700)),
            "CONVEYOR_MEDIA_ROOT": str(media_root),
            "CONVEYOR_MEDIA_ARTIFACT_DIR": str(artifacts),
            # the services create what is missing with the same count
            **({"CONVEYOR_KAFKA_PARTITIONS": str(partitions)} if partitions else {}),
        }
        if embedded_broker:
            # Group joins take about half the session timeout; Apache Kafka refuses a
            # session timeout below its group.min.session.timeout.ms (6 s by default).
            for variable, value in _EMBEDDED_BROKER_TIMINGS.items():
                env[variable] = os.environ.get(variable, value)
        echo = output.supervisor_echo()
        fake_llm_url = None
        if fake_llm is None:
            fake_llm = not _startup.llm_configured({**os.environ, **(extra_env or {})})
        if fake_llm and _startup.fake_provider_available():
            llm_port = _stack.free_port()
            fake_llm_url = f"http://127.0.0.1:{llm_port}"
            llm = _stack.Supervisor(
                [_startup.fake_provider_process(llm_port, output.sink_for("fake-llm"))], echo=echo
            )
            llm.start()
            cleanup.callback(llm.stop)
            try:
                _stack.wait_for_port("127.0.0.1", llm_port, timeout=15)
            except TimeoutError:
                tail = _startup.log_tail(logs / "fake-llm.log")
                raise StackError(f"the fake LLM provider did not start: {tail}") from None
            env.update(_startup.fake_provider_env(fake_llm_url))
            say(f"[yellow]llm        {_startup.fake_provider_notice(fake_llm_url)}[/yellow]")
        elif fake_llm:
            say("[yellow]llm        no LLM API key found, and no fake provider installed[/yellow]")
        env.update(extra_env or {})
        processes: list[_stack.ServiceProcess] = []
        for name in names:
            count = runners if name == "step-runner" else 1
            for index in range(1, count + 1):
                process_name = f"{name}-{index}" if count > 1 else name
                processes.append(
                    _stack.ServiceProcess(
                        process_name, modules[name], dict(env), sink=output.sink_for(process_name)
                    )
                )
        supervisor = _stack.Supervisor(processes, echo=echo)
        say("services   " + ", ".join(p.name for p in processes))
        supervisor.start()
        cleanup.callback(supervisor.stop)

        checks = []
        if _API_SERVICE in names:
            checks.append(("control API", api_url, _API_SERVICE))
        if _RECORDER_SERVICE in names:
            checks.append(("run recorder", recorder_url, _RECORDER_SERVICE))
        _startup.wait_ready(checks, supervisor=supervisor, logs=logs, timeout=ready_timeout)

        yield LocalStack(
            api_url=api_url,
            recorder_url=recorder_url,
            bootstrap=bootstrap,
            database_url=database_url,
            topic_prefix=prefix,
            home=home,
            logs=logs,
            media_root=media_root,
            embedded_broker=embedded_broker,
            embedded_database=embedded_database,
            supervisor=supervisor,
            service_env=env,
            fake_llm_url=fake_llm_url,
        )


def run_up(*, services: Sequence[str], runners: int, home: Path | None, console: Console) -> None:
    """Run the stack until SIGINT or SIGTERM, then stop everything gracefully."""
    # Both signals raise KeyboardInterrupt here, even when started with SIGINT ignored
    # (as a shell does for `conveyor up &`): the stack must always be stopped cleanly.
    previous = {
        sig: signal.signal(sig, signal.default_int_handler)
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with local_stack(services=services, runners=runners, home=home, console=console) as s:
            console.print()
            console.print("[bold green]ready[/bold green]")
            if _API_SERVICE in services:
                console.print(f"  control API   {s.api_url}")
            if _RECORDER_SERVICE in services:
                console.print(
                    f"  run recorder  {s.recorder_url}   (OpenAPI at {s.recorder_url}/docs)"
                )
            console.print(f"  logs          {s.logs}")
            console.print(
                "  try: conveyor pipelines apply examples/ && "
                "conveyor run hello -i name=Ada --follow"
            )
            console.print("[dim]Ctrl-C stops everything[/dim]")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                console.print("stopping services…")
    except KeyboardInterrupt:
        console.print("interrupted while starting; stopped what had started")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("stopped")
